"""Serving layouts chosen at load time: stored weights re-packed into what the kernels read fastest.

The stored formats (:mod:`kernels.formats`) stay GPTQ-compatible for export, training and
compression; :func:`for_serving` turns a param tree into its serving form once, after loading and
before the forward runs, and :func:`restore_act_order` goes back exactly.

Act-order (GPTQ ``desc_act``): ``g_idx[i]`` names the quantization group of input row ``i`` and
the rows of one group are scattered over the input, so a kernel must gather one scale and zero
row per input row. Sorting the input rows by group (a permutation ``perm``) makes every group
contiguous; ``x @ W == x[..., perm] @ W[perm]`` because a matmul does not care about the order of
its inner dimension, so the serving leaf is a :class:`kernels.formats.PermutedInput` holding the
row-permuted weight with ``g_idx=None`` and ``perm``. The dequantized weight of the serving leaf is
bit for bit the original one with its rows permuted; the product differs only by the order of the
float32 summation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import formats
from kernels.formats import CompressedLinear, LowRank, PermutedInput, QuantizedWeight


def _concrete(a, what: str) -> np.ndarray:
  if isinstance(a, jax.core.Tracer):
    raise ValueError(f'{what} must be concrete: re-lay weights out at load time, outside jit.')
  return np.asarray(a)


def contiguous_act_order(q: QuantizedWeight) -> tuple[QuantizedWeight, jax.Array]:
  """``(q2, perm)`` with ``q2`` holding ``q``'s rows ``perm`` and contiguous groups.

  ``dequantize(q2) == dequantize(q)[perm]`` exactly, so ``x @ dequantize(q) ==
  x[..., perm] @ dequantize(q2)`` up to the order of summation. ``perm`` is the stable sort of
  ``g_idx`` (rows of one group keep their order). Needs concrete arrays and every group holding
  the rows of the contiguous layout (``group_size`` rows, the last group
  ``in - (groups - 1) * group_size`` when ``group_size`` does not divide ``in``: what GPTQ's
  act-order writes, a permutation of ``i // group_size``); raises ``ValueError`` otherwise. A
  weight without ``g_idx`` comes back unchanged with the identity permutation.
  """
  k = q.in_features
  if q.g_idx is None:
    return q, jnp.arange(k, dtype=jnp.int32)
  g = _concrete(q.g_idx, 'g_idx').astype(np.int64)
  groups = q.scales.shape[0]
  glen = q.spec.group_len(k)
  if groups != q.spec.num_groups(k):
    raise ValueError(f'act-order weight with {groups} groups of {glen} rows for in_features={k}.')
  if g.shape != (k,) or g.min(initial=0) < 0 or g.max(initial=0) >= groups:
    raise ValueError(f'g_idx must hold {k} group numbers in [0, {groups}).')
  counts = np.bincount(g, minlength=groups)
  want = q.spec.group_lengths(k)
  if np.any(counts != want):
    last = f', {want[-1]} in the last' if want[-1] != glen else ''
    raise ValueError(f'act-order groups of unequal size (from {counts.min()} to {counts.max()} '
                     f'rows, want {glen}{last}): no contiguous layout; the kernel gathers scales '
                     'instead.')
  perm = np.argsort(g, kind='stable').astype(np.int32)
  codes = q.ints()[jnp.asarray(perm)]
  q2 = QuantizedWeight.from_ints(codes, q.scales, q.zeros, q.spec)
  return q2, jnp.asarray(perm)


def restore_act_order(w: PermutedInput) -> QuantizedWeight | CompressedLinear:
  """Inverse of :func:`act_order_leaf`: the stored (GPTQ act-order) leaf, exactly."""
  perm = jnp.asarray(w.perm)
  inv = jnp.argsort(perm)

  def back(q: QuantizedWeight) -> QuantizedWeight:
    glen = q.spec.group_len(q.in_features)
    g_idx = (jnp.arange(q.in_features, dtype=jnp.int32) // glen)[inv]
    return QuantizedWeight.from_ints(q.ints()[inv], q.scales, q.zeros, q.spec, g_idx=g_idx)

  inner = w.inner
  if isinstance(inner, QuantizedWeight):
    return back(inner)
  adapter = inner.adapter
  if adapter is not None:
    adapter = LowRank(a=jnp.asarray(adapter.a)[inv], b=adapter.b, preserved=adapter.preserved)
  mask = None if inner.mask is None else jnp.asarray(inner.mask)[inv]
  return CompressedLinear(weight=back(inner.weight), mask=mask, adapter=adapter)


def act_order_leaf(w) -> PermutedInput | None:
  """The serving form of an act-order leaf (a :class:`QuantizedWeight` with ``g_idx``, or a
  :class:`CompressedLinear` holding one with an optional mask and float adapter), or None when
  ``w`` is not one or cannot be made contiguous (unequal groups, a quantized adapter: those keep
  the gathered-scale path)."""
  if isinstance(w, QuantizedWeight):
    if w.g_idx is None:
      return None
    try:
      q2, perm = contiguous_act_order(w)
    except ValueError:
      return None
    return PermutedInput(inner=q2, perm=perm)
  if not (isinstance(w, CompressedLinear) and isinstance(w.weight, QuantizedWeight)
          and w.weight.g_idx is not None):
    return None
  adapter = w.adapter
  if adapter is not None and (isinstance(adapter.a, QuantizedWeight)
                              or isinstance(adapter.b, QuantizedWeight)):
    return None
  try:
    q2, perm = contiguous_act_order(w.weight)
  except ValueError:
    return None
  if adapter is not None:
    adapter = LowRank(a=jnp.asarray(adapter.a)[perm], b=adapter.b, preserved=adapter.preserved)
  mask = None if w.mask is None else jnp.asarray(w.mask)[perm]
  return PermutedInput(inner=CompressedLinear(weight=q2, mask=mask, adapter=adapter), perm=perm)


def for_serving(tree):
  """``tree`` (e.g. a model's params) with every weight leaf in its serving layout.

  Act-order leaves become :class:`kernels.formats.PermutedInput` (contiguous groups, activations
  permuted at run time); every other leaf is returned as it is. Run once after loading, outside
  jit; undo with :func:`restore_for_storage` before exporting or training.
  """
  def convert(leaf):
    new = act_order_leaf(leaf)
    return leaf if new is None else new
  return jax.tree.map(convert, tree, is_leaf=formats.is_weight_leaf)


def restore_for_storage(tree):
  """Inverse of :func:`for_serving`: the stored (GPTQ-compatible) layouts."""
  def convert(leaf):
    return restore_act_order(leaf) if isinstance(leaf, PermutedInput) else leaf
  return jax.tree.map(convert, tree, is_leaf=formats.is_weight_leaf)
