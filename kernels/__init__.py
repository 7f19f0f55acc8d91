"""Weight formats, packing and the ``linear`` entry point (imports nothing from the other packages)."""

from kernels.api import linear, last_implementation, register, set_default
from kernels.formats import (
    CompressedLinear, LowRank, QuantizedWeight, QuantSpec, Sparse24Weight, dequantize,
    effective_weight, is_weight_leaf, sparse24_compress, sparse24_decompress, to_dense,
    weight_nbytes)
from kernels.packing import SUPPORTED_BITS, pack, unpack
