"""The weight leaf types: how a compressed linear layer is stored.

A linear layer's ``kernel`` leaf in a param pytree is either a plain array ``[in, out]`` (Flax
layout, ``y = x @ W``) or a :class:`CompressedLinear`. Compression replaces the leaf at the same path
and renames no keys. Output features are the last axis of every field, so one ``P(None, 'model')``
shards them all.

Leaf types:

* :class:`QuantizedWeight`: group-wise b-bit integers packed into int32 words in GPTQ's layout
  (``qweight``), float scales, integer zero points, optional act-order ``g_idx``.
* :class:`Sparse24Weight`: 2:4 semi-structured weight, the kept values (dense or quantized) plus the
  position of each kept value inside its group of 4 input rows.
* :class:`LowRank`: ``y += (x @ a) @ b``; ``a``/``b`` are arrays or :class:`QuantizedWeight`.
* :class:`CompressedLinear`: ``weight`` (any of the above or a dense array) + optional boolean
  ``mask`` + optional ``adapter``.
* :class:`PermutedInput`: a serving layout made at load time (:mod:`kernels.layouts`): an inner
  weight whose input rows were permuted, and the permutation applied to the activations. Exports,
  training and compression take the stored layouts above, never this one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kernels import packing


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """Quantization grid. Hashable, so it can be a static argument.

  Groups are contiguous runs of ``group_size`` input rows: row ``i`` belongs to group
  ``i // group_size`` and there are ``ceil(in / group_size)`` groups. When ``group_size`` does
  not divide ``in`` the last group is shorter (``in - (groups - 1) * group_size`` rows) and has
  its own scale and zero, as in GPTQ's reference code and checkpoints (g128 on a 576-wide input:
  four groups of 128 and one of 64). A ``group_size`` of at least ``in`` gives one group.

  Attributes:
    bits: 2, 3, 4 or 8.
    group_size: input rows sharing one scale/zero; -1 means one group per output unit.
    symmetric: symmetric grid (zero point fixed at 2^(b-1)) instead of min/max asymmetric.
  """
  bits: int = 4
  group_size: int = 128
  symmetric: bool = False

  def __post_init__(self):
    packing.check_bits(self.bits)
    if self.group_size != -1 and self.group_size <= 0:
      raise ValueError(f'group_size must be positive or -1 (per output unit), got {self.group_size}.')

  def num_groups(self, in_features: int) -> int:
    """``ceil(in / group_size)`` (1 for ``group_size=-1``); the last group may be shorter."""
    if self.group_size == -1:
      return 1
    return max(1, -(-in_features // self.group_size))

  def group_len(self, in_features: int) -> int:
    """Rows of every group but possibly the last: row ``i`` is in group ``i // group_len``."""
    return in_features if self.group_size == -1 else self.group_size

  def last_group_len(self, in_features: int) -> int:
    """Rows of the last group: ``group_len``, or fewer when it does not divide ``in``."""
    return in_features - (self.num_groups(in_features) - 1) * self.group_len(in_features)

  def is_ragged(self, in_features: int) -> bool:
    """True when the last group is shorter than the others (``group_size`` does not divide
    ``in``)."""
    return self.last_group_len(in_features) != self.group_len(in_features)

  def group_lengths(self, in_features: int) -> np.ndarray:
    """int64 ``[groups]``: the rows of each group."""
    lens = np.full(self.num_groups(in_features), self.group_len(in_features), np.int64)
    lens[-1] = self.last_group_len(in_features)
    return lens


@flax.struct.dataclass
class QuantizedWeight:
  """Group-wise low-bit weight in Flax layout ``[in, out]``.

  Invariant: ``dequantize(q) == (unpack(q.qweight)[:in] - q.zeros[g]) * q.scales[g]`` where
  ``g = q.g_idx`` if present else ``arange(in) // group_len``. There are
  ``ceil(in / group_size)`` groups; the last one is shorter when ``group_size`` does not divide
  ``in`` (see :class:`QuantSpec`).

  Attributes:
    qweight: int32 ``[ceil(in / 32) * bits, out]``, GPTQ packing along the input axis (rows past
      ``in_features`` are zero padding).
    scales: float ``[groups, out]``, ``groups = ceil(in / group_size)``.
    zeros: uint8 ``[groups, out]`` integer zero points (GPTQ's packed ``qzeros`` stores these minus
      one; export converts).
    g_idx: int32 ``[in]`` group of each input row (act-order), or None for contiguous groups.
  """
  qweight: jax.Array
  scales: jax.Array
  zeros: jax.Array
  g_idx: jax.Array | None = None
  bits: int = flax.struct.field(pytree_node=False, default=4)
  group_size: int = flax.struct.field(pytree_node=False, default=128)
  in_features: int = flax.struct.field(pytree_node=False, default=0)
  symmetric: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def shape(self) -> tuple[int, int]:
    return (self.in_features, self.qweight.shape[-1])

  @property
  def spec(self) -> QuantSpec:
    return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

  @classmethod
  def from_ints(cls, q: jax.Array, scales: jax.Array, zeros: jax.Array, spec: QuantSpec,
                g_idx: jax.Array | None = None) -> 'QuantizedWeight':
    """Packs integer codes ``q`` [in, out] in [0, 2^bits) with their scales and zeros [groups, out]."""
    in_features = q.shape[0]
    pad = (-in_features) % 32
    qp = jnp.pad(jnp.asarray(q, jnp.int32), ((0, pad), (0, 0)))
    return cls(qweight=packing.pack(qp, spec.bits, axis=0), scales=scales,
               zeros=jnp.asarray(zeros).astype(jnp.uint8),
               g_idx=None if g_idx is None else jnp.asarray(g_idx, jnp.int32),
               bits=spec.bits, group_size=spec.group_size, in_features=in_features,
               symmetric=spec.symmetric)

  def ints(self) -> jax.Array:
    """The integer codes ``[in, out]`` (int32)."""
    return packing.unpack(self.qweight, self.bits, axis=0)[:self.in_features]

  def group_index(self) -> jax.Array:
    if self.g_idx is not None:
      return self.g_idx
    return jnp.arange(self.in_features) // self.spec.group_len(self.in_features)

  def nbytes_effective(self) -> int:
    """Storage in bytes: packed codes + scales (16-bit) + zeros (bits each) + g_idx."""
    out = self.qweight.shape[-1]
    n = self.in_features * out * self.bits / 8 + self.scales.size * 2 + self.zeros.size * self.bits / 8
    if self.g_idx is not None:
      n += self.in_features * 4
    return int(n)


@flax.struct.dataclass
class Sparse24Weight:
  """2:4 semi-structured weight in Flax layout ``[in, out]``.

  In every group of 4 consecutive input rows of each output column exactly 2 entries are kept.

  Attributes:
    values: the kept values ``[in / 2, out]``, a float array or a :class:`QuantizedWeight` (2:4 +
      int4); row ``2 * g + k`` holds the k-th kept entry (in increasing position) of group ``g``.
    indices: uint8 ``[in / 2, out]``, the position (0..3) of each kept value inside its group.
  """
  values: Union[jax.Array, QuantizedWeight]
  indices: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    half, out = self.values.shape  # an array's or a QuantizedWeight's logical shape
    return (2 * half, out)


@flax.struct.dataclass
class LowRank:
  """Low-rank correction ``y += (x @ a) @ b``; ``a: [in, r]``, ``b: [r, out]``, arrays or quantized.

  ``preserved``: how many leading rank components are directions SRR preserved from the weight
  itself (fine-tuning scales their gradient); 0 for a pure error correction.
  """
  a: Union[jax.Array, QuantizedWeight]
  b: Union[jax.Array, QuantizedWeight]
  preserved: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  def first(self, rank: int) -> 'LowRank':
    """The first ``rank`` components (float factors only: SVD, EoRA and SRR order them by value,
    so this is exactly the lower-rank result)."""
    if isinstance(self.a, QuantizedWeight) or isinstance(self.b, QuantizedWeight):
      raise ValueError('cannot truncate a quantized adapter; truncate first, then quantize')
    if not 0 <= rank <= self.rank:
      raise ValueError(f'rank {rank} asked of an adapter of rank {self.rank}')
    return LowRank(a=self.a[:, :rank], b=self.b[:rank], preserved=min(self.preserved, rank))


@flax.struct.dataclass
class CompressedLinear:
  """A compressed linear weight ``[in, out]``.

  Attributes:
    weight: a dense array (pruned weights hold exact zeros), :class:`QuantizedWeight` or
      :class:`Sparse24Weight`.
    mask: optional bool ``[in, out]``; True = kept. None means no unstructured mask.
    adapter: optional :class:`LowRank` correction added to the output.
  """
  weight: Union[jax.Array, QuantizedWeight, Sparse24Weight]
  mask: jax.Array | None = None
  adapter: LowRank | None = None

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.weight.shape)


def with_adapter(leaf, adapter: LowRank | None) -> CompressedLinear:
  """``leaf`` (a compressed weight, or a :class:`CompressedLinear`) carrying ``adapter``."""
  if not isinstance(leaf, CompressedLinear):
    leaf = CompressedLinear(weight=leaf)
  return dataclasses.replace(leaf, adapter=adapter)


@flax.struct.dataclass
class PermutedInput:
  """``y = linear(x[..., perm], inner)``: a weight re-laid out at load time for the kernels.

  An act-order GPTQ weight (``g_idx``) becomes one with contiguous groups once its input rows are
  sorted by group (:func:`kernels.layouts.contiguous_act_order`); the activations are permuted
  the same way at run time (a gather of ``M x in`` values, small next to the weight at decode),
  so the kernel reads one scale row per group instead of gathering a scale per input row.

  Attributes:
    inner: the permuted weight ``[in, out]``: a :class:`QuantizedWeight` or a
      :class:`CompressedLinear` (its mask and float adapter rows permuted too).
    perm: int32 ``[in]``; row ``i`` of ``inner`` is row ``perm[i]`` of the original weight.
  """
  inner: Union[QuantizedWeight, 'CompressedLinear']
  perm: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.inner.shape)


Weight = Union[jax.Array, CompressedLinear]

LEAF_TYPES = (QuantizedWeight, Sparse24Weight, LowRank, CompressedLinear, PermutedInput)


def is_weight_leaf(x) -> bool:
  """``is_leaf`` predicate that stops tree traversal at compressed weights."""
  return isinstance(x, LEAF_TYPES)


def unpermute_rows(dense: jax.Array, perm: jax.Array) -> jax.Array:
  """The rows of ``dense`` put back in original order: ``out[perm[i]] = dense[i]``."""
  return jnp.zeros_like(dense).at[perm].set(dense)


def dequantize(q: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """Dense ``[in, out]`` weight of a :class:`QuantizedWeight`."""
  g = q.group_index()
  ints = q.ints().astype(jnp.float32)
  zeros = q.zeros.astype(jnp.float32)[g]
  scales = q.scales.astype(jnp.float32)[g]
  return ((ints - zeros) * scales).astype(dtype)


def sparse24_compress(w: jax.Array) -> Sparse24Weight:
  """Compresses a dense ``[in, out]`` array that satisfies 2:4 along the input axis.

  Groups with more than 2 non-zeros raise; groups with fewer keep explicit zeros.
  """
  w = jnp.asarray(w)
  n_in, _ = w.shape
  if n_in % 4:
    raise ValueError(f'2:4 sparsity needs the input dimension to be a multiple of 4, got {n_in}.')
  values, indices, dense_group = _sparse24_pack(w)
  if bool(dense_group):
    raise ValueError('weight is not 2:4 sparse: some group of 4 input rows has more than 2 non-zeros.')
  return Sparse24Weight(values=values, indices=indices)


@jax.jit
def _sparse24_pack(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(values, indices, whether some group has more than 2 non-zeros)`` of ``w [in, out]``."""
  n_in, n_out = w.shape
  g = w.reshape(n_in // 4, 4, n_out)
  nz = (g != 0)
  # Rank positions: non-zeros first, then zeros, each by position; keep the first two ranked, in
  # position order. Elementwise (a sort is slow on CPUs): rank = how many keys are smaller.
  key = jnp.where(nz, 0, 4) + jnp.arange(4)[None, :, None]  # distinct, [G, 4, out]
  rank = jnp.sum(key[:, None, :, :] < key[:, :, None, :], axis=2)  # [G, 4, out]
  kept = rank < 2
  first = jnp.argmax(kept, axis=1)
  last = 3 - jnp.argmax(kept[:, ::-1], axis=1)
  order = jnp.stack([first, last], axis=1)  # [G, 2, out]
  values = jnp.take_along_axis(g, order, axis=1).reshape(n_in // 2, n_out)
  return (values, order.reshape(n_in // 2, n_out).astype(jnp.uint8),
          jnp.any(nz.sum(axis=1) > 2))


def sparse24_decompress(s: Sparse24Weight, dtype=jnp.float32) -> jax.Array:
  vals = s.values
  if isinstance(vals, QuantizedWeight):
    vals = dequantize(vals, dtype)
  half, n_out = vals.shape
  idx = s.indices.astype(jnp.int32).reshape(half // 2, 2, n_out)
  v = vals.astype(dtype).reshape(half // 2, 2, n_out)
  onehot = jax.nn.one_hot(idx, 4, axis=2, dtype=dtype)  # [G, 2, 4, out]
  dense = jnp.einsum('gkpo,gko->gpo', onehot, v)
  return dense.reshape(2 * half, n_out)


def split_columns(leaf: Any, sizes: Sequence[int]) -> list[Any]:
  """A weight leaf of ``sum(sizes)`` output units as one leaf per consecutive run of ``sizes``
  columns (e.g. q/k/v compressed as one matrix, then stored as three). Every array of two or more
  axes of a leaf without an adapter has the output units on its last axis (codes, scales, zeros,
  masks, 2:4 values and indices); one-axis arrays (act-order ``g_idx``, permutations) are per input
  row and shared."""
  total = int(sum(sizes))
  arrays, treedef = jax.tree.flatten(leaf)
  for a in arrays:
    if a.ndim >= 2 and a.shape[-1] != total:
      raise ValueError(f'split_columns: an array of shape {tuple(a.shape)} in a leaf of '
                       f'{total} output units')
  bounds = np.cumsum([0, *sizes])
  return [jax.tree.unflatten(treedef, [a[..., lo:hi] if a.ndim >= 2 else a for a in arrays])
          for lo, hi in zip(bounds[:-1], bounds[1:])]


def to_dense(w, dtype=jnp.float32) -> jax.Array:
  """Dense ``[in, out]`` effective weight of any weight leaf, excluding the adapter."""
  if isinstance(w, CompressedLinear):
    dense = to_dense(w.weight, dtype)
    if w.mask is not None:
      dense = jnp.where(w.mask, dense, jnp.zeros((), dtype))
    return dense
  if isinstance(w, QuantizedWeight):
    return dequantize(w, dtype)
  if isinstance(w, Sparse24Weight):
    return sparse24_decompress(w, dtype)
  if isinstance(w, PermutedInput):
    return unpermute_rows(to_dense(w.inner, dtype), w.perm)
  return jnp.asarray(w).astype(dtype)


def effective_weight(w, dtype=jnp.float32) -> jax.Array:
  """Dense ``[in, out]`` weight including the adapter's ``a @ b`` (for analysis, not inference)."""
  if isinstance(w, PermutedInput):
    return unpermute_rows(effective_weight(w.inner, dtype), w.perm)
  dense = to_dense(w, dtype)
  if isinstance(w, CompressedLinear) and w.adapter is not None:
    dense = dense + to_dense(w.adapter.a, dtype) @ to_dense(w.adapter.b, dtype)
  return dense


def weight_nbytes(w) -> int:
  """Bytes to store a weight leaf (dense at 16 bits per value; masks at 1 bit; 2:4 metadata 2 bits)."""
  if isinstance(w, CompressedLinear):
    n = weight_nbytes(w.weight)
    if w.mask is not None:
      n += w.mask.size // 8
    if w.adapter is not None:
      n += weight_nbytes(w.adapter.a) + weight_nbytes(w.adapter.b)
    return n
  if isinstance(w, QuantizedWeight):
    return w.nbytes_effective()
  if isinstance(w, Sparse24Weight):
    return weight_nbytes(w.values) + w.indices.size // 4
  if isinstance(w, PermutedInput):
    return weight_nbytes(w.inner) + w.perm.size * 4
  return int(np.prod(w.shape)) * 2


def sparse24_from_quantized(q: QuantizedWeight, mask: jax.Array) -> Sparse24Weight:
  """2:4 + low-bit: keeps the codes of a quantized ``[in, out]`` weight at the 2:4 ``mask``.

  The kept values' groups are the original groups halved (every group of ``g`` input rows holds
  ``g / 2`` kept values), so scales and zeros carry over unchanged. Needs contiguous groups.
  """
  if q.g_idx is not None:
    raise ValueError('2:4 compression of an act-order (g_idx) weight is not supported')
  n_in, n_out = q.shape
  m = jnp.asarray(mask).reshape(n_in // 4, 4, n_out)
  if bool(jnp.any(m.sum(axis=1) != 2)):
    raise ValueError('mask is not exactly 2:4 along the input axis')
  order = jnp.sort(jnp.argsort(~m, axis=1, stable=True)[:, :2], axis=1)  # [G, 2, out]
  codes = jnp.take_along_axis(q.ints().reshape(n_in // 4, 4, n_out), order, axis=1)
  half_group = -1 if q.group_size == -1 else q.group_size // 2
  spec = QuantSpec(bits=q.bits, group_size=half_group, symmetric=q.symmetric)
  values = QuantizedWeight.from_ints(codes.reshape(n_in // 2, n_out), q.scales, q.zeros, spec)
  return Sparse24Weight(values=values, indices=order.reshape(n_in // 2, n_out).astype(jnp.uint8))
