"""The GPTQ checkpoint format, both ways: what AutoGPTQ / GPTQModel / transformers / vLLM load.

Per quantized linear ``model.layers.{i}.{module}`` (``[out, in]`` in torch terms):

* ``qweight``: int32 ``[in * bits / 32, out]``, the codes packed along the input axis: every run
  of 32 consecutive input rows is a little-endian bit stream of ``bits`` words (for 2/4/8 bits
  value ``k`` sits at bits ``bits * k`` of word ``k // (32 / bits)``; 3-bit runs straddle words).
  This is exactly our :class:`kernels.formats.QuantizedWeight` ``qweight``, so it is written as is.
* ``qzeros``: int32 ``[groups, out * bits / 32]``, the zero points packed the same way along the
  output axis.
* ``scales``: float16 ``[groups, out]``, ``groups = ceil(in / group_size)``: when
  ``group_size`` does not divide ``in`` the last group is shorter (GPTQ's reference and
  AutoGPTQ / GPTQModel write such checkpoints, e.g. g128 on a 576-wide input).
* ``g_idx``: int32 ``[in]``, the group of each input row (``i // group_size`` without act-order).
* ``bias``: float16 ``[out]`` where the linear has one.

The weight is ``(code - zero) * scale`` of the row's group. Zero points come in two conventions,
named by ``quantization_config.checkpoint_format``:

* ``"gptq"`` (v1, what AutoGPTQ wrote and every loader reads): ``qzeros`` holds ``zero - 1``;
  loaders add one back. A zero point of 0 has no v1 code (``-1`` does not fit the field), so
* ``"gptq_v2"`` (GPTQModel's): ``qzeros`` holds ``zero`` itself.

We write v1 whenever every zero point is at least 1 (symmetric grids always are: their zero is
``2^(bits-1)``) and v2 otherwise, and read both. Scales are stored in float16, as the loaders
expect; a round trip through this format therefore gives back codes, zeros and ``g_idx``
unchanged and scales rounded to float16 (a second export is bit-identical).

What the format cannot hold is refused (:class:`models.export.ExportError` naming the linear):
an unquantized block linear, a mask or 2:4 weight, linears of one model with different bits,
group size or symmetry (the format has one ``quantization_config``), widths that are not
multiples of 32. Low-rank adapters are not part of the format: they go to a ``peft`` export on
this base (PEFT attaches them to GPTQ linears). Loaders compute the dequantized weight in
float16, so their logits differ from ours by float16 rounding of the weights.

A checkpoint's fused module (Phi-3's ``qkv_proj``, ``gate_up_proj``) is one linear here: it comes
as one leaf of its parts' columns side by side (:func:`models.export.fuse_leaves`, whose unpacked
zero points are packed here whatever the parts' widths) and is read as one, then split into our
linears (:func:`models.loading.load_hf_dir`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from kernels import formats
from kernels import packing
from models.export import ExportError

QUANT_METHOD = 'gptq'
CHECKPOINT_FORMATS = ('gptq', 'gptq_v2')
TENSORS = ('qweight', 'qzeros', 'scales', 'g_idx')


def _quantized(module: str, leaf: Any) -> formats.QuantizedWeight:
  if not isinstance(leaf, formats.CompressedLinear):
    raise ExportError(f'{module} is not quantized: the gptq format holds only quantized linears '
                      '(quantize every block linear, or export with --format=hf)')
  if leaf.mask is not None:
    raise ExportError(f'{module} carries a pruning mask: the gptq format cannot hold one '
                      '(use --format=compressed-tensors or hf)')
  if isinstance(leaf.weight, formats.Sparse24Weight):
    raise ExportError(f'{module} is 2:4 sparse: the gptq format cannot hold it '
                      '(use --format=compressed-tensors or hf)')
  if not isinstance(leaf.weight, formats.QuantizedWeight):
    raise ExportError(f'{module} is not quantized: the gptq format holds only quantized linears '
                      '(quantize every block linear, or export with --format=hf)')
  q = leaf.weight
  in_f, out_f = q.shape
  if in_f % 32 or out_f % 32:
    raise ExportError(f'{module} is {in_f} x {out_f}: the gptq format packs 32 values per run, '
                      'both widths must be multiples of 32')
  return q


def _act_order(q: formats.QuantizedWeight) -> bool:
  if q.g_idx is None:
    return False
  g = np.asarray(q.g_idx)
  return bool(np.any(g != np.arange(q.in_features) // q.spec.group_len(q.in_features)))


def check_linears(linears: Mapping[str, Any]) -> tuple[int, int, bool]:
  """The one ``(bits, group_size, symmetric)`` of a model's block linears ``{module: leaf}``,
  judged from the leaves' types and static fields only (arrays may be ``ShapeDtypeStruct``).

  Raises:
    ExportError: a leaf the format cannot hold (see the module docstring).
  """
  specs = {}
  for module, leaf in linears.items():
    q = _quantized(module, leaf)
    specs[module] = (q.bits, q.group_size, q.symmetric)
  if not specs:
    raise ExportError('the model has no linears to write')
  first = next(iter(specs))
  for module, spec in specs.items():
    if spec != specs[first]:
      raise ExportError(
          f'{module} is quantized as (bits, group_size, symmetric) = {spec} but {first} as '
          f'{specs[first]}: the gptq format has one setting for the whole model')
  return specs[first]


def quantization_config(linears: Mapping[str, Any]) -> dict[str, Any]:
  """The ``quantization_config`` of a model's block linears ``{hf module name: leaf}``.

  Raises:
    ExportError: a leaf the format cannot hold (see the module docstring).
  """
  bits, group_size, symmetric = check_linears(linears)
  act_order = any(_act_order(leaf.weight) for leaf in linears.values())
  zero_min = min(int(np.min(np.asarray(leaf.weight.zeros))) for leaf in linears.values())
  return {'quant_method': QUANT_METHOD, 'bits': bits, 'group_size': group_size,
          'desc_act': act_order, 'sym': symmetric, 'static_groups': False,
          'true_sequential': True, 'lm_head': False, 'damp_percent': 0.01,
          'checkpoint_format': 'gptq' if zero_min >= 1 else 'gptq_v2'}


def linear_tensors(module: str, leaf: Any, qcfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The GPTQ tensors of one quantized linear, named ``{module}.qweight`` etc."""
  q = _quantized(module, leaf)
  zeros = np.asarray(q.zeros, np.int64)
  if qcfg['checkpoint_format'] == 'gptq':
    zeros = zeros - 1
  g_idx = np.asarray(q.group_index(), np.int32)
  return {
      f'{module}.qweight': np.asarray(q.qweight, np.int32),
      f'{module}.qzeros': packing.pack_np(zeros.astype(np.int32), q.bits, axis=1),
      f'{module}.scales': np.asarray(q.scales, np.float16),
      f'{module}.g_idx': g_idx,
  }


def check_config(qcfg: Mapping[str, Any]) -> None:
  """Raises ValueError for a GPTQ ``quantization_config`` we cannot read exactly."""
  fmt = qcfg.get('checkpoint_format', 'gptq')
  if fmt not in CHECKPOINT_FORMATS:
    raise ValueError(f'GPTQ checkpoint_format {fmt!r} is not one of {CHECKPOINT_FORMATS} '
                      '(marlin / bitblas repacks are for kernels; load the gptq original)')
  bits = qcfg.get('bits')
  if bits not in packing.SUPPORTED_BITS:
    raise ValueError(f'GPTQ bits={bits} is not one of {packing.SUPPORTED_BITS}')
  if qcfg.get('lm_head'):
    raise ValueError('a GPTQ checkpoint with a quantized lm_head is not supported')


def read_linear(module: str, get: Callable[[str], np.ndarray], in_features: int,
                qcfg: Mapping[str, Any], dtype=jnp.float32) -> formats.CompressedLinear:
  """One quantized linear of a GPTQ checkpoint as our leaf (``get(name)`` reads a tensor).

  ``g_idx`` is kept only where it is not the contiguous ``i // group_size``.
  """
  bits, group_size = int(qcfg['bits']), int(qcfg['group_size'])
  sym = bool(qcfg.get('sym', True))
  qweight = np.asarray(get(f'{module}.qweight')).view(np.int32)
  out_features = qweight.shape[1]
  if qweight.shape[0] * 32 // bits != in_features:
    raise ValueError(f'{module}.qweight has shape {qweight.shape}: {bits}-bit codes of '
                      f'{in_features} inputs need {in_features * bits // 32} rows')
  zeros = np.asarray(packing.unpack(np.asarray(get(f'{module}.qzeros')).view(np.int32), bits,
                                    axis=1))[:, :out_features]
  if qcfg.get('checkpoint_format', 'gptq') == 'gptq':
    zeros = zeros + 1
  scales = np.asarray(get(f'{module}.scales'))
  spec = formats.QuantSpec(bits=bits, group_size=group_size, symmetric=sym)
  g_idx = None
  try:
    g = np.asarray(get(f'{module}.g_idx'), np.int64)
  except KeyError:
    g = None
  if g is not None and np.any(g != np.arange(in_features) // spec.group_len(in_features)):
    g_idx = jnp.asarray(g, jnp.int32)
  q = formats.QuantizedWeight(
      qweight=jnp.asarray(qweight), scales=jnp.asarray(scales, dtype),
      zeros=jnp.asarray(zeros.astype(np.uint8)), g_idx=g_idx, bits=bits, group_size=group_size,
      in_features=in_features, symmetric=sym)
  if q.scales.shape != q.zeros.shape:
    raise ValueError(f'{module}: scales {q.scales.shape} and zeros {q.zeros.shape} differ')
  if g_idx is None and q.scales.shape[0] != spec.num_groups(in_features):
    raise ValueError(f'{module}.scales has {q.scales.shape[0]} rows: {in_features} inputs in '
                     f'groups of {group_size} need ceil({in_features} / {group_size}) = '
                     f'{spec.num_groups(in_features)}')
  return formats.CompressedLinear(weight=q)
