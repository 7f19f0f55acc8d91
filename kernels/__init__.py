"""Weight formats, packing and the ``linear`` entry point (imports nothing from the other packages)."""

from kernels.api import (
    default_order, interpret_mode, last_choice, last_implementation, linear, recording, register,
    set_default, set_interpret)
from kernels.formats import (
    CompressedLinear, LowRank, PermutedInput, QuantizedWeight, QuantSpec, Sparse24Weight,
    dequantize, effective_weight, is_weight_leaf, sparse24_compress, sparse24_decompress, to_dense,
    weight_nbytes)
from kernels.packing import SUPPORTED_BITS, pack, unpack

__all__ = [
    'CompressedLinear',
    'LowRank',
    'PermutedInput',
    'QuantSpec',
    'QuantizedWeight',
    'SUPPORTED_BITS',
    'Sparse24Weight',
    'default_order',
    'dequantize',
    'effective_weight',
    'interpret_mode',
    'is_weight_leaf',
    'last_choice',
    'last_implementation',
    'linear',
    'pack',
    'recording',
    'register',
    'set_default',
    'set_interpret',
    'sparse24_compress',
    'sparse24_decompress',
    'to_dense',
    'unpack',
    'weight_nbytes',
]
