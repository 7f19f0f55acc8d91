"""The compressed-tensors checkpoint format, both ways: what transformers and vLLM load.

``config.json`` carries a ``quantization_config`` with ``quant_method: "compressed-tensors"``;
each of its ``config_groups`` is a scheme (``weights``: int bits, ``strategy`` ``group`` with
``group_size`` or ``channel``, ``symmetric``) applied to the linears its ``targets`` name
(``"Linear"``, exact module names, or ``re:`` regexes), minus the top-level ``ignore`` list.
Linears no group targets are plain ``weight`` tensors.

Quantized linears are written ``pack-quantized``. Per linear ``model.layers.{i}.{module}``
(``[out, in]`` in torch terms):

* ``weight_packed``: int32 ``[out, ceil(in * bits / 32)]``, the codes packed along the input axis.
  The codes are stored offset to unsigned, ``q + 2^(bits-1)`` of the signed ``q`` the library
  quantizes to, which is exactly our code in ``[0, 2^bits)``. Every run of 32 inputs is a
  little-endian bit stream of ``bits`` words, the same order as :mod:`kernels.packing` (so the
  packing is reused), padded to 32 and cut to ``ceil(in * bits / 32)`` words.
* ``weight_scale``: float32 ``[out, groups]`` (``[out, 1]`` per channel), in the model's dtype as
  the library keeps it, so scales round-trip exactly.
* ``weight_zero_point`` (asymmetric only): int32 ``[ceil(out * bits / 32), groups]``, the zero
  points packed the same way along the *output* axis. The library's signed zero point is
  ``zero - 2^(bits-1)``; stored offset, it is our zero itself. Symmetric schemes store none: their
  zero is ``2^(bits-1)``, which is what our symmetric grids use.
* ``weight_shape``: int64 ``[2]``, ``(out, in)``.

The weight is ``(code - zero) * scale`` of the input's group (contiguous groups of
``group_size`` inputs; one group per output unit for ``channel``), bit for bit what we compute.

Sparse linears are written dense (their ``weight`` holds the exact zeros, or their packed codes
hold the zero point where pruned) and named in ``quantization_config.sparsity_config`` with
``format: "dense"``, ``sparsity_structure`` (``"2:4"`` when every sparse linear is 2:4, else
``"unstructured"``) and ``targets``. compressed-tensors 0.15 removed its sparse compressors
(``sparse-24-bitmask``, ``sparse-bitmask``, ``marlin-24``): transformers with compressed-tensors
>= 0.15 skips their tensors with only a warning and runs the model with random weights in their
place, so writing those layouts would give a checkpoint that current loaders misread. Dense with
sparsity metadata loads everywhere, and the structure in the metadata is read back by us. So:

* 2:4 with float values (:class:`~kernels.formats.Sparse24Weight`): a dense ``weight``.
* 2:4 + int (a Sparse24Weight whose values are quantized): ``pack-quantized`` with the zero point
  as the code of every pruned entry (which dequantizes to exactly 0) and groups twice the values'
  group size, the groups of the dense input rows.
* An unstructured mask: the masked dense weight, or for a quantized weight its codes with the zero
  point where the mask is False.

Reading back, a ``pack-quantized`` linear named in a 2:4 ``sparsity_config`` becomes a 2:4 + int
leaf and one named unstructured a quantized leaf with the mask ``code != zero``; a dense one
(:func:`read_dense`) becomes a float Sparse24Weight or a dense leaf with the mask ``weight != 0``.
A kept entry that is exactly zero (or whose code is the zero point) cannot be told from a pruned
one: it comes back pruned (2:4: as one of the two kept entries of its group), the same weight.
Checkpoints of compressed-tensors < 0.15 in ``sparse-24-bitmask`` / ``sparse-bitmask`` layout
(``compressed`` values, a ``bitmask`` with one bit per entry, little-endian along the input axis,
``shape``, ``row_offsets``) are read too, and so is the ``weight_g_idx`` of ``actorder: "group"``
checkpoints (written before compressed-tensors dropped it).

What the format cannot hold is refused (:class:`models.export.ExportError` naming the linear):

* bit widths other than 2, 4 and 8: compressed-tensors 0.18 changed how it packs the widths that
  do not divide 32 (3 bits: earlier versions put 10 codes in each word, later ones 32 codes in 3
  words) and readers do not check the writer's version, so a 3-bit file would be misread by one
  side or the other. We read 3 bits from files whose ``version`` is 0.18 or later.
* a group size that does not divide the input width (a shorter last group, which GPTQ writes):
  compressed-tensors 0.20 sizes such a scale as ``ceil(in / group_size)`` groups but its
  quantize and dequantize raise ("tensor column shape must be divisble by the given
  group_size"), so no loader of the library could read the file. Such checkpoints are refused
  when read too.
* act-order ``g_idx`` (groups that are not contiguous): ``actorder: "group"`` and its
  ``weight_g_idx``, deprecated in compressed-tensors 0.18, are refused by 0.20 when it parses the
  config. GPTQ with act-order and static groups has contiguous groups and is written.
* a model in which nothing is quantized or sparse (use the ``hf`` export).

Linears with different schemes go into separate config groups that name their modules (one scheme:
``targets: ["Linear"]``). A checkpoint's fused module (Phi-3's ``qkv_proj``, ``gate_up_proj``) is
one linear here, named as such: one leaf of its parts' columns side by side
(:func:`models.export.fuse_leaves`), read back as one and split into our linears by the loader.
``version`` is not written (we are not the library). Low-rank adapters are not part of the
format: export them with ``peft``.

Loaders, as of compressed-tensors 0.20 and transformers 5: the library's own API (the config
applied to the model, ``ModelCompressor.compress_model``, the tensors loaded,
``decompress_model``) reads every export. transformers reads it by default when every scheme is
symmetric (it builds asymmetric layers with unpacked zero points and refuses the packed ones, the
library's own checkpoints included), and with ``CompressedTensorsConfig(dequantize=True)`` when
there is one config group (that path dequantizes every linear with the first group's scheme).
vLLM's kernels take 4 and 8 bits.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kernels import formats
from kernels import packing
from models.export import ExportError

QUANT_METHOD = 'compressed-tensors'
PACK_QUANTIZED = 'pack-quantized'
# Tensor-name suffixes of a linear in this format: pack-quantized, then the legacy sparse layouts.
TENSORS = ('weight_packed', 'weight_scale', 'weight_zero_point', 'weight_shape', 'weight_g_idx',
           'compressed', 'bitmask', 'shape', 'row_offsets')
WRITE_BITS = (2, 4, 8)  # the widths whose packing every compressed-tensors version agrees on
READ_BITS = (2, 3, 4, 8)  # 3 bits only from files of version >= 0.18 (see the module docstring)
DENSE_PACKING_VERSION = (0, 18)
SPARSITY_FORMATS = ('dense', 'sparse-24-bitmask', 'sparse-bitmask')
LINEAR_CLASSES = ('Linear', 'LinearBase')  # class-name targets that match a block linear


# ----------------------------------------------------------------------------------------------
# Packing: compressed-tensors' bit order is ours (kernels.packing), cut to the words it needs.

def _num_words(n: int, bits: int) -> int:
  return -(-n * bits // 32)


def pack_codes(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """Packs codes in ``[0, 2^bits)`` along ``axis`` into ``ceil(n * bits / 32)`` int32 words."""
  codes = np.moveaxis(np.asarray(codes, np.int32), axis, 0)
  n = codes.shape[0]
  padded = np.pad(codes, ((0, -n % 32),) + ((0, 0),) * (codes.ndim - 1))
  words = packing.pack_np(padded, bits, axis=0)[:_num_words(n, bits)]
  return np.ascontiguousarray(np.moveaxis(words, 0, axis))


def unpack_codes(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
  """The ``n`` codes along ``axis`` of words written by :func:`pack_codes` (or the library)."""
  words = np.moveaxis(np.asarray(words).view(np.int32), axis, 0)
  if words.shape[0] != _num_words(n, bits):
    raise ValueError(f'{words.shape[0]} packed words do not hold {n} {bits}-bit codes '
                     f'({_num_words(n, bits)} do)')
  padded = np.pad(words, ((0, -words.shape[0] % bits),) + ((0, 0),) * (words.ndim - 1))
  codes = np.asarray(packing.unpack(padded, bits, axis=0))[:n]
  return np.moveaxis(codes, 0, axis)


# ----------------------------------------------------------------------------------------------
# Export.

def _group_len(q: formats.QuantizedWeight) -> int:
  return q.spec.group_len(q.in_features)


def _abstract(x: Any) -> bool:
  """An array stand-in (a check of a run's flags before any work): its values are unknown."""
  return isinstance(x, jax.ShapeDtypeStruct)


def _contiguous(q: formats.QuantizedWeight) -> bool:
  if q.g_idx is None:
    return True
  if _abstract(q.g_idx):  # only act-order with dynamic groups makes a g_idx
    return False
  return bool(np.all(np.asarray(q.g_idx) == np.arange(q.in_features) // _group_len(q)))


def _check_quantized(module: str, q: formats.QuantizedWeight) -> None:
  if q.bits not in WRITE_BITS:
    raise ExportError(
        f'{module} is quantized to {q.bits} bits: compressed-tensors is written at '
        f'{", ".join(map(str, WRITE_BITS))} bits only (its packing of widths that do not divide '
        '32 changed in compressed-tensors 0.18, so older and newer readers would disagree); '
        'use --format=gptq or hf for 3 bits')
  if not _contiguous(q):
    raise ExportError(
        f'{module} has an act-order g_idx: compressed-tensors 0.20 refuses actorder="group" '
        '(weight_g_idx), so its groups must be contiguous; quantize with act-order and static '
        'groups, or use --format=gptq')
  if _abstract(q.zeros):
    return
  zeros = np.asarray(q.zeros)
  if q.symmetric and np.any(zeros != 1 << (q.bits - 1)):
    raise ExportError(f'{module} is symmetric but its zero points are not {1 << (q.bits - 1)}: '
                      'compressed-tensors symmetric schemes have no zero points to store them')
  if zeros.size and int(zeros.max()) >= 1 << q.bits:
    raise ExportError(f'{module} has zero points up to {int(zeros.max())}, beyond {q.bits} bits')


def _check_whole_groups(module: str, in_features: int, group_size: int) -> None:
  """Raises ExportError where ``group_size`` leaves a shorter last group (see the module
  docstring)."""
  if group_size != -1 and in_features % group_size:
    raise ExportError(f'{module} has {in_features} inputs in groups of {group_size}: '
                      'compressed-tensors cannot hold a shorter last group (its group '
                      'quantization needs group_size to divide the input width); use '
                      '--format=gptq or a group size that divides it')


def _check_leaf(module: str, leaf: Any) -> None:
  """Raises ExportError for a block linear the format cannot hold; arrays may be abstract."""
  if not isinstance(leaf, formats.CompressedLinear):
    return
  w, mask = leaf.weight, leaf.mask
  if isinstance(w, formats.Sparse24Weight):
    if mask is not None:
      raise ExportError(f'{module} is 2:4 sparse and carries a mask: compressed-tensors '
                        'cannot hold both')
    v = w.values
    if isinstance(v, formats.QuantizedWeight):
      _check_quantized(module, v)
      if v.group_size != -1 and v.group_size % 2:
        raise ExportError(f'{module} is 2:4 with groups of {v.group_size} kept values: the dense '
                          'groups would not align with the groups of 4 inputs')
      _check_whole_groups(module, 2 * v.in_features,
                          -1 if v.group_size == -1 else 2 * v.group_size)
  elif isinstance(w, formats.QuantizedWeight):
    _check_quantized(module, w)
    _check_whole_groups(module, w.in_features, w.group_size)
  elif len(getattr(w, 'shape', ())) != 2:
    raise ExportError(f'{module} holds a {type(w).__name__}, which compressed-tensors cannot '
                      'hold')


def check_linears(linears: Mapping[str, Any]) -> None:
  """Raises ExportError unless the format can hold every block linear ``{module: leaf}``, judged
  from the leaves' types and static fields where their arrays are ``ShapeDtypeStruct``."""
  for module, leaf in linears.items():
    _check_leaf(module, leaf)
  if not any(isinstance(leaf, formats.CompressedLinear) for leaf in linears.values()):
    raise ExportError('no block linear is quantized or sparse: there is nothing for '
                      'compressed-tensors to hold (export with --format=hf)')


class _Plan:
  """How one block linear is written: its dense codes and spec, or its dense weight."""

  def __init__(self, module: str, leaf: Any):
    self.quant: formats.QuantizedWeight | None = None  # pack-quantized (pruned codes zeroed)
    self.sparsity: str | None = None  # '2:4', 'unstructured' or None
    if not isinstance(leaf, formats.CompressedLinear):
      return
    _check_leaf(module, leaf)
    w, mask = leaf.weight, leaf.mask
    if isinstance(w, formats.Sparse24Weight):
      self.sparsity = '2:4'
      if isinstance(w.values, formats.QuantizedWeight):
        self.quant = _dense_codes_of_sparse24(module, w)
    elif isinstance(w, formats.QuantizedWeight):
      self.quant = w
      if mask is not None:
        self.sparsity = 'unstructured'
        self.quant = _zero_masked_codes(w, np.asarray(mask))
    elif mask is not None:
      self.sparsity = 'unstructured'

  @property
  def scheme(self) -> tuple[int, int, bool] | None:
    if self.quant is None:
      return None
    return (self.quant.bits, self.quant.group_size, self.quant.symmetric)


def _zero_count(plan: _Plan, leaf: Any) -> int:
  """Entries of the written weight that are zero (codes: the zero point)."""
  if plan.quant is not None:
    q = plan.quant
    return int(np.sum(np.asarray(q.ints()) == np.asarray(q.zeros)[np.asarray(q.group_index())]))
  return int(np.sum(np.asarray(formats.to_dense(leaf)) == 0))


def _zero_masked_codes(q: formats.QuantizedWeight, mask: np.ndarray) -> formats.QuantizedWeight:
  """``q`` with the zero point as the code of every entry the mask prunes (same dense weight)."""
  g = np.asarray(q.group_index())
  zeros = np.asarray(q.zeros, np.int32)
  codes = np.where(mask, np.asarray(q.ints()), zeros[g])
  return formats.QuantizedWeight.from_ints(jnp.asarray(codes), q.scales, q.zeros, q.spec)


def _dense_codes_of_sparse24(module: str, s: formats.Sparse24Weight) -> formats.QuantizedWeight:
  """A 2:4 + int weight as a dense quantized one: kept codes in place, the zero point elsewhere."""
  v = s.values
  half, out = v.shape
  n_in = 2 * half
  group_size = -1 if v.group_size == -1 else 2 * v.group_size
  spec = formats.QuantSpec(bits=v.bits, group_size=group_size, symmetric=v.symmetric)
  zeros = np.asarray(v.zeros, np.int32)
  g = np.arange(n_in) // spec.group_len(n_in)
  codes = zeros[g].copy()
  rows = 4 * (np.arange(half)[:, None] // 2) + np.asarray(s.indices, np.int64)
  np.put_along_axis(codes, rows, np.asarray(v.ints()), axis=0)
  return formats.QuantizedWeight.from_ints(jnp.asarray(codes), v.scales, v.zeros, spec)


def _weights_args(bits: int, group_size: int, symmetric: bool) -> dict[str, Any]:
  args = {'num_bits': bits, 'type': 'int', 'symmetric': symmetric, 'dynamic': False}
  if group_size == -1:
    args.update(strategy='channel', group_size=None)
  else:
    args.update(strategy='group', group_size=group_size)
  return args


def quantization_config(linears: Mapping[str, Any]) -> dict[str, Any]:
  """The ``quantization_config`` of a model's block linears ``{hf module name: leaf}``.

  Raises:
    ExportError: a leaf the format cannot hold (see the module docstring).
  """
  plans = {module: _Plan(module, leaf) for module, leaf in linears.items()}
  if not any(p.quant is not None or p.sparsity for p in plans.values()):
    raise ExportError('no block linear is quantized or sparse: there is nothing for '
                      'compressed-tensors to hold (export with --format=hf)')
  schemes: dict[tuple[int, int, bool], list[str]] = {}
  for module, plan in plans.items():
    if plan.scheme is not None:
      schemes.setdefault(plan.scheme, []).append(module)
  groups, ignore = {}, ['lm_head']
  for k, (scheme, modules) in enumerate(schemes.items()):
    groups[f'group_{k}'] = {
        'targets': ['Linear'] if len(schemes) == 1 else modules,
        'weights': _weights_args(*scheme), 'input_activations': None,
        'output_activations': None, 'format': PACK_QUANTIZED}
  if len(schemes) == 1:
    ignore += [m for m, p in plans.items() if p.quant is None]
  sparse = [m for m, p in plans.items() if p.sparsity]
  sparsity_config: dict[str, Any] = {}
  if sparse:
    all_24 = all(plans[m].sparsity == '2:4' for m in sparse)
    sparsity_config = {
        'format': 'dense', 'sparsity_structure': '2:4' if all_24 else 'unstructured',
        'targets': ['Linear'] if len(sparse) == len(plans) else sparse,
        'ignore': ['lm_head'] if len(sparse) == len(plans) else [],
        'global_sparsity': sum(_zero_count(plans[m], linears[m]) for m in sparse) / sum(
            int(np.prod(linears[m].shape)) for m in sparse)}
  return {'quant_method': QUANT_METHOD, 'format': PACK_QUANTIZED if schemes else 'dense',
          'quantization_status': 'compressed', 'config_groups': groups, 'ignore': ignore,
          'kv_cache_scheme': None, 'global_compression_ratio': None,
          'sparsity_config': sparsity_config, 'transform_config': {}}


def linear_tensors(module: str, leaf: Any, qcfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The compressed-tensors tensors of one block linear, named ``{module}.weight_packed`` etc."""
  del qcfg  # the leaf alone decides its layout, as it did for the config
  plan = _Plan(module, leaf)
  if plan.quant is None:
    return {f'{module}.weight': np.ascontiguousarray(
        np.asarray(formats.to_dense(leaf), np.float32).T)}
  q = plan.quant
  codes = np.asarray(q.ints()).T  # [out, in]
  out = {
      f'{module}.weight_packed': pack_codes(codes, q.bits, axis=1),
      f'{module}.weight_scale': np.ascontiguousarray(np.asarray(q.scales, np.float32).T),
      f'{module}.weight_shape': np.asarray(codes.shape, np.int64),
  }
  if not q.symmetric:
    out[f'{module}.weight_zero_point'] = pack_codes(np.asarray(q.zeros).T, q.bits, axis=0)
  return out


# ----------------------------------------------------------------------------------------------
# Import.

def _version(qcfg: Mapping[str, Any]) -> tuple[int, ...] | None:
  m = re.match(r'(\d+)\.(\d+)', str(qcfg.get('version') or ''))
  return (int(m.group(1)), int(m.group(2))) if m else None


def _strategy(args: Mapping[str, Any]) -> str:
  strategy = args.get('strategy')
  if strategy is None:
    group_size = args.get('group_size')
    strategy = 'tensor' if group_size is None else 'channel' if group_size == -1 else 'group'
  return str(strategy).lower()


def _targets(module: str, targets) -> list[str]:
  """The ``targets`` that match a block linear, most specific first, as compressed-tensors
  orders them (exact names, then regexes, each sorted; then class names)."""
  targets = sorted(targets or [], key=lambda t: ('re:' in t, t))
  by_name = [t for t in targets
             if (re.match(t[3:], module) is not None if t.startswith('re:') else t == module)]
  return by_name + [t for t in targets if t in LINEAR_CLASSES and t not in by_name]


def _ignored(module: str, ignore) -> bool:
  return bool(_targets(module, ignore))


def scheme_for(module: str, qcfg: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
  """``(group name, scheme)`` of the config group that quantizes ``module``, or None."""
  if _ignored(module, qcfg.get('ignore')):
    return None
  owner: dict[str, tuple[str, Mapping[str, Any]]] = {}
  for name, scheme in (qcfg.get('config_groups') or {}).items():
    for target in scheme.get('targets') or []:
      owner[target] = (name, scheme)  # a later group listing the same target wins, as there
  matched = _targets(module, owner)
  return owner[matched[0]] if matched else None


def _sparsity_for(module: str, qcfg: Mapping[str, Any]) -> tuple[str, str] | None:
  """``(format, structure)`` of the sparsity_config when it names ``module``, else None."""
  sp = qcfg.get('sparsity_config') or {}
  if not sp or _ignored(module, sp.get('ignore')):
    return None
  targets = sp.get('targets')
  if targets is None:
    targets = ['Linear']  # the library's default: every layer
  if not _targets(module, targets):
    return None
  return sp['format'], str(sp.get('sparsity_structure') or 'unstructured').lower()


def _check_scheme(name: str, scheme: Any, top_format: str, version) -> None:
  where = f'compressed-tensors config group {name!r}'
  if not isinstance(scheme, Mapping):
    raise ValueError(f'{where} is the preset {name!r} ({scheme}): preset names are not read, '
                     'only schemes written out')
  fmt = scheme.get('format') or top_format
  if fmt != PACK_QUANTIZED:
    raise ValueError(f'{where} has format {fmt!r}: we read {PACK_QUANTIZED!r} (integer weights '
                     'packed into int32) only')
  for kind in ('input_activations', 'output_activations'):
    if scheme.get(kind):
      raise ValueError(f'{where} quantizes {kind}: we read weight-only quantization')
  args = scheme.get('weights')
  if not args:
    raise ValueError(f'{where} has no weights scheme')
  if str(args.get('type', 'int')).lower() != 'int':
    raise ValueError(f'{where} has {args.get("type")} weights: we read int weights only')
  bits = args.get('num_bits')
  if bits not in READ_BITS:
    raise ValueError(f'{where} has num_bits={bits}: we read {READ_BITS}')
  if 32 % bits and (version is None or version < DENSE_PACKING_VERSION):
    raise ValueError(
        f'{where} has {bits}-bit weights from compressed-tensors '
        f'{"of unknown version" if version is None else ".".join(map(str, version))}: '
        f'their packing changed in {".".join(map(str, DENSE_PACKING_VERSION))}, and we read '
        'only the newer one')
  strategy = _strategy(args)
  if strategy not in ('group', 'channel'):
    raise ValueError(f'{where} has strategy {strategy!r}: we read "group" and "channel"')
  if strategy == 'group' and not (isinstance(args.get('group_size'), int)
                                  and args['group_size'] > 0):
    raise ValueError(f'{where} has strategy "group" without a positive group_size')
  if args.get('dynamic'):
    raise ValueError(f'{where} has dynamic weight quantization')


def check_config(qcfg: Mapping[str, Any]) -> None:
  """Raises ValueError for a compressed-tensors ``quantization_config`` we cannot read exactly."""
  if qcfg.get('quant_method') != QUANT_METHOD:
    raise ValueError(f'quant_method {qcfg.get("quant_method")!r} is not {QUANT_METHOD!r}')
  version = _version(qcfg)
  for name, scheme in (qcfg.get('config_groups') or {}).items():
    _check_scheme(name, scheme, qcfg.get('format') or 'dense', version)
  if qcfg.get('kv_cache_scheme'):
    raise ValueError('a compressed-tensors checkpoint with a quantized KV cache is not supported')
  if qcfg.get('transform_config'):
    raise ValueError('a compressed-tensors checkpoint with transforms (rotations, '
                     'transform_config) is not supported')
  sp = qcfg.get('sparsity_config') or {}
  if sp:
    if sp.get('format') not in SPARSITY_FORMATS:
      raise ValueError(f'compressed-tensors sparsity format {sp.get("format")!r} is not one of '
                       f'{SPARSITY_FORMATS}')
    structure = str(sp.get('sparsity_structure') or 'unstructured').lower()
    if sp['format'] == 'sparse-24-bitmask' and structure != '2:4':
      raise ValueError(f'sparse-24-bitmask with sparsity_structure {structure!r} (not 2:4)')
    if structure != 'unstructured' and not re.fullmatch(r'\d+:\d+', structure):
      raise ValueError(f'compressed-tensors sparsity_structure {structure!r} is not '
                       '"unstructured" or N:M')


def _optional(get: Callable[[str], np.ndarray], name: str) -> np.ndarray | None:
  try:
    return get(name)
  except KeyError:
    return None


def _read_packed(module: str, get, in_features: int, args: Mapping[str, Any],
                 dtype) -> formats.QuantizedWeight:
  bits, sym = int(args['num_bits']), bool(args.get('symmetric', True))
  group_size = int(args['group_size']) if _strategy(args) == 'group' else -1
  spec = formats.QuantSpec(bits=bits, group_size=group_size, symmetric=sym)
  shape = tuple(int(s) for s in np.asarray(get(f'{module}.weight_shape')).reshape(-1))
  if len(shape) != 2 or shape[1] != in_features:
    raise ValueError(f'{module}.weight_shape is {shape}, the config implies {in_features} inputs')
  if spec.is_ragged(in_features):
    raise ValueError(f'{module} has {in_features} inputs in groups of {group_size}: '
                     'compressed-tensors cannot dequantize a shorter last group, so we do not '
                     'read one either')
  out_features = shape[0]
  words = np.asarray(get(f'{module}.weight_packed'))
  if words.shape[0] != out_features:
    raise ValueError(f'{module}.weight_packed has {words.shape[0]} rows for {out_features} '
                     'outputs')
  try:
    codes = unpack_codes(words, bits, in_features, axis=1)  # [out, in]
  except ValueError as e:
    raise ValueError(f'{module}.weight_packed: {e}') from e
  groups = spec.num_groups(in_features)
  scales = np.asarray(get(f'{module}.weight_scale'))
  if scales.shape != (out_features, groups):
    raise ValueError(f'{module}.weight_scale has shape {scales.shape}, expected '
                     f'{(out_features, groups)}')
  if sym:
    zeros = np.full((out_features, groups), 1 << (bits - 1), np.int32)
  else:
    zp = np.asarray(get(f'{module}.weight_zero_point'))
    try:
      zeros = unpack_codes(zp, bits, out_features, axis=0)
    except ValueError as e:
      raise ValueError(f'{module}.weight_zero_point: {e}') from e
    if zeros.shape != (out_features, groups):
      raise ValueError(f'{module}.weight_zero_point holds {zeros.shape} zero points, expected '
                       f'{(out_features, groups)}')
  g_idx = _optional(get, f'{module}.weight_g_idx')
  if g_idx is not None:
    g_idx = np.asarray(g_idx, np.int64).reshape(-1)
    if g_idx.shape != (in_features,) or g_idx.min() < 0 or g_idx.max() >= groups:
      raise ValueError(f'{module}.weight_g_idx is not a group per input ({groups} groups)')
    if np.all(g_idx == np.arange(in_features) // spec.group_len(in_features)):
      g_idx = None
  return formats.QuantizedWeight.from_ints(
      jnp.asarray(codes.T), jnp.asarray(scales.T, dtype), jnp.asarray(zeros.T), spec,
      g_idx=None if g_idx is None else jnp.asarray(g_idx, jnp.int32))


def _kept_24(nonzero: np.ndarray, module: str) -> np.ndarray:
  """The 2:4 mask ``[in, out]`` keeping the non-zeros, topped up with the first zeros."""
  n_in, n_out = nonzero.shape
  if n_in % 4:
    raise ValueError(f'{module} is named 2:4 sparse but has {n_in} inputs (not a multiple of 4)')
  nz = nonzero.reshape(n_in // 4, 4, n_out)
  if np.any(nz.sum(axis=1) > 2):
    raise ValueError(f'{module} is named 2:4 sparse but some group of 4 inputs holds more than '
                     '2 non-zeros')
  order = np.sort(np.argsort(~nz, axis=1, kind='stable')[:, :2], axis=1)
  mask = np.zeros_like(nz)
  np.put_along_axis(mask, order, True, axis=1)
  return mask.reshape(n_in, n_out)


def _with_sparsity(module: str, q: formats.QuantizedWeight,
                   structure: str) -> formats.CompressedLinear:
  """A quantized linear named in the sparsity_config as our 2:4 or masked leaf."""
  nonzero = np.asarray(q.ints()) != np.asarray(q.zeros)[np.asarray(q.group_index())]
  if structure == '2:4':
    if q.g_idx is not None:
      raise ValueError(f'{module} is 2:4 with an act-order g_idx, which we cannot hold')
    return formats.CompressedLinear(
        weight=formats.sparse24_from_quantized(q, jnp.asarray(_kept_24(nonzero, module))))
  return formats.CompressedLinear(weight=q, mask=jnp.asarray(nonzero))


def _read_bitmask(module: str, get, in_features: int, sparse_format: str,
                  dtype) -> formats.CompressedLinear:
  """A linear in the legacy sparse-24-bitmask / sparse-bitmask layout (before 0.15)."""
  shape = tuple(int(s) for s in np.asarray(get(f'{module}.shape')).reshape(-1))
  if len(shape) != 2 or shape[1] != in_features:
    raise ValueError(f'{module}.shape is {shape}, the config implies {in_features} inputs')
  bits = np.asarray(get(f'{module}.bitmask')).view(np.uint8)
  if bits.shape != (shape[0], -(-shape[1] // 8)):
    raise ValueError(f'{module}.bitmask has shape {bits.shape} for a {shape} weight')
  mask = np.unpackbits(bits, axis=-1, count=shape[1], bitorder='little').astype(bool)
  values = np.asarray(get(f'{module}.compressed'), np.float32).reshape(-1)
  if values.size != int(mask.sum()):
    raise ValueError(f'{module}: {values.size} compressed values for {int(mask.sum())} '
                     'bitmask entries')
  dense = np.zeros(shape, np.float32)
  dense[mask] = values
  if sparse_format == 'sparse-24-bitmask':
    kept = mask.T.reshape(in_features // 4, 4, shape[0])
    if np.any(kept.sum(axis=1) != 2):
      raise ValueError(f'{module}: the sparse-24-bitmask keeps other than 2 of some 4 inputs')
    order = np.argsort(~kept, axis=1, kind='stable')[:, :2]
    vals = np.take_along_axis(dense.T.reshape(in_features // 4, 4, shape[0]), order, axis=1)
    return formats.CompressedLinear(weight=formats.Sparse24Weight(
        values=jnp.asarray(vals.reshape(in_features // 2, shape[0]), dtype),
        indices=jnp.asarray(order.reshape(in_features // 2, shape[0]).astype(np.uint8))))
  return formats.CompressedLinear(weight=jnp.asarray(dense.T, dtype), mask=jnp.asarray(mask.T))


def read_linear(module: str, get: Callable[[str], np.ndarray], in_features: int,
                qcfg: Mapping[str, Any], dtype=jnp.float32) -> formats.CompressedLinear:
  """One block linear of a compressed-tensors checkpoint as our leaf (``get(name)`` reads a tensor).

  ``pack-quantized`` tensors give a quantized leaf (2:4 or masked when the ``sparsity_config``
  names the linear); legacy ``sparse-24-bitmask`` / ``sparse-bitmask`` tensors a float 2:4 or
  masked one. ``g_idx`` is kept only where it is not the contiguous ``i // group_size``.
  """
  sparsity = _sparsity_for(module, qcfg)
  if _optional(get, f'{module}.weight_packed') is not None:
    owner = scheme_for(module, qcfg)
    if owner is None:
      raise ValueError(f'{module} has packed weights but no config group quantizes it')
    q = _read_packed(module, get, in_features, owner[1]['weights'], dtype)
    if sparsity is not None:
      return _with_sparsity(module, q, sparsity[1])
    return formats.CompressedLinear(weight=q)
  if _optional(get, f'{module}.compressed') is not None:
    if sparsity is None or sparsity[0] not in ('sparse-24-bitmask', 'sparse-bitmask'):
      raise ValueError(f'{module} has bitmask-compressed tensors but the sparsity_config does not '
                       'name it in a bitmask format')
    if scheme_for(module, qcfg) is not None:
      raise ValueError(f'{module} is both quantized and bitmask-compressed, which we cannot read')
    return _read_bitmask(module, get, in_features, sparsity[0], dtype)
  raise KeyError(f'{module}.weight_packed')


def read_dense(module: str, kernel: Any, qcfg: Mapping[str, Any]) -> Any:
  """The leaf of a block linear read as a plain dense ``kernel [in, out]``: a float 2:4 leaf or a
  masked one where the ``sparsity_config`` names it (``format: "dense"``), else ``kernel``."""
  sparsity = _sparsity_for(module, qcfg)
  if sparsity is None or not hasattr(kernel, 'ndim') or isinstance(kernel, formats.LEAF_TYPES):
    return kernel
  if sparsity[0] != 'dense':
    return kernel  # a bitmask format leaves the linears it did not compress dense, as here
  w = np.asarray(kernel)
  if sparsity[1] == '2:4':
    _kept_24(w != 0, module)  # raises, naming the linear, where it is not 2:4
    return formats.CompressedLinear(weight=formats.sparse24_compress(kernel))
  return formats.CompressedLinear(weight=kernel, mask=jnp.asarray(w != 0))
