"""Serving layouts (kernels/layouts.py): act-order weights re-laid out with contiguous groups.

Properties: the re-laid weight dequantizes to the original rows permuted, bit for bit; the product
through the permuted activations equals the original exactly when every partial sum is exact
(integer-valued data in float32); the Pallas kernel (interpret mode) runs the serving leaf without
``g_idx`` (no gathered scales) and matches the reference; masks and float adapters follow the
permutation; the inverse gives back the stored leaf exactly; unequal groups and traced ``g_idx``
are refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import formats, layouts, lowbit_pallas, reference
from kernels.formats import CompressedLinear, LowRank, PermutedInput, QuantizedWeight, QuantSpec
from tests.kernels import kernel_data as kd

BF16 = jnp.bfloat16


def _act_order(k=128, n=48, bits=4, group=32, seed=0, pow2_scales=False):
  rng = np.random.default_rng(seed)
  spec = QuantSpec(bits=bits, group_size=group)
  groups = spec.num_groups(k)  # the last group is shorter when `group` does not divide k
  codes = rng.integers(0, 2 ** bits, (k, n))
  zeros = rng.integers(0, 2 ** bits, (groups, n))
  if pow2_scales:
    scales = 2.0 ** rng.integers(-3, 1, (groups, n))
  else:
    scales = rng.uniform(0.5, 1.5, (groups, n)) / 2 ** bits
  g_idx = rng.permutation(np.arange(k) // group)
  return QuantizedWeight.from_ints(jnp.asarray(codes), jnp.asarray(scales, jnp.float32),
                                   jnp.asarray(zeros), spec, g_idx=jnp.asarray(g_idx))


def _assert_same_leaf(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_contiguous_groups_dequantize_to_the_permuted_rows_exactly():
  q = _act_order(bits=3, k=192, group=64)
  q2, perm = layouts.contiguous_act_order(q)
  assert q2.g_idx is None and (q2.bits, q2.group_size, q2.in_features) == (3, 64, 192)
  assert sorted(np.asarray(perm).tolist()) == list(range(192))
  np.testing.assert_array_equal(np.asarray(formats.dequantize(q2)),
                                np.asarray(formats.dequantize(q))[np.asarray(perm)])
  # rows of one group keep their order (a stable sort), so the permutation is canonical
  g = np.asarray(q.g_idx)[np.asarray(perm)]
  assert np.all(np.diff(g) >= 0)


def test_linear_through_permuted_activations_is_exact():
  q = _act_order(pow2_scales=True)
  leaf = layouts.act_order_leaf(q)
  x = jnp.asarray(np.random.default_rng(1).integers(-3, 4, (5, 128)), jnp.float32)
  y = reference.linear(x, q)
  np.testing.assert_array_equal(np.asarray(reference.linear(x[..., leaf.perm], leaf.inner)),
                                np.asarray(y))
  np.testing.assert_array_equal(np.asarray(kernels.linear(x, leaf)), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(formats.to_dense(leaf)), np.asarray(formats.to_dense(q)))


def test_pallas_kernel_runs_the_serving_leaf_without_gathered_scales(monkeypatch):
  rng = np.random.default_rng(2)
  w, dense = kd.quantized(rng, 256, 64, 4, 64, act_order=True)
  leaf = layouts.act_order_leaf(w)
  seen = []
  real = lowbit_pallas.lowbit_matmul

  def spy(x, q, adapter=None, **kw):
    seen.append(q.g_idx)
    return real(x, q, adapter, **kw)

  monkeypatch.setattr(lowbit_pallas, 'lowbit_matmul', spy)
  for m in (1, 3):
    x = kd.activations(rng, (m, 256), BF16)
    y = lowbit_pallas.linear(x, leaf, interpret=True)
    assert kd.rel_err(y, kd.reference(x, dense)) < kd.REL_TOL[jnp.dtype(BF16)]
    # the same computation as the kernel on the permuted activations and contiguous weight
    y2 = lowbit_pallas.linear(x[:, leaf.perm], leaf.inner, interpret=True)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y2, np.float32))
  assert seen and all(g is None for g in seen)


def test_compressed_linear_with_mask_and_adapter():
  rng = np.random.default_rng(3)
  q = _act_order(k=64, n=32, group=16, seed=3)
  ad, ab = kd.adapter(rng, 64, 32, 4)
  mask = jnp.asarray(rng.random((64, 32)) < 0.7)
  stored = CompressedLinear(weight=q, mask=mask, adapter=ad)
  leaf = layouts.act_order_leaf(stored)
  assert isinstance(leaf, PermutedInput) and leaf.inner.weight.g_idx is None
  np.testing.assert_array_equal(np.asarray(formats.effective_weight(leaf)),
                                np.asarray(formats.effective_weight(stored)))
  assert formats.weight_nbytes(leaf) == formats.weight_nbytes(stored)
  x = kd.activations(rng, (2, 3, 64), jnp.float32)
  np.testing.assert_allclose(np.asarray(kernels.linear(x, leaf)),
                             np.asarray(kernels.linear(x, stored)), rtol=1e-5, atol=1e-5)
  _assert_same_leaf(layouts.restore_act_order(leaf), stored)
  # the kernel fuses the (row-permuted) adapter of the serving leaf
  fused = layouts.act_order_leaf(CompressedLinear(weight=q, adapter=ad))
  xb = kd.activations(rng, (1, 64), BF16)
  y = lowbit_pallas.linear(xb, fused, interpret=True)
  ref = kd.reference(xb, np.asarray(formats.to_dense(q), np.float64), ab)
  assert kd.rel_err(y, ref) < kd.REL_TOL[jnp.dtype(BF16)]


def test_ragged_groups_relay_out_and_run_through_the_kernel():
  """g32 on 80 inputs (groups of 32, 32 and 16 rows): the act-order weight re-lays out with the
  shorter group last, dequantizes to the permuted rows exactly, restores exactly, and the Pallas
  kernel (interpret mode) runs the serving leaf like the gathered-scale path and the reference."""
  rng = np.random.default_rng(6)
  w, dense = kd.quantized(rng, 80, 48, 4, 32, act_order=True)
  np.testing.assert_array_equal(np.bincount(np.asarray(w.g_idx)), [32, 32, 16])
  q2, perm = layouts.contiguous_act_order(w)
  assert q2.g_idx is None and q2.scales.shape == (3, 48)
  np.testing.assert_array_equal(np.asarray(q2.group_index())[64:], 2)
  np.testing.assert_array_equal(np.asarray(formats.dequantize(q2)),
                                np.asarray(formats.dequantize(w))[np.asarray(perm)])
  leaf = layouts.act_order_leaf(w)
  assert isinstance(leaf, PermutedInput)
  _assert_same_leaf(layouts.restore_act_order(leaf), w)
  x = kd.activations(rng, (3, 80), BF16)
  ref = kd.reference(x, dense)
  for y in (lowbit_pallas.linear(x, leaf, interpret=True),
            lowbit_pallas.linear(x, w, interpret=True),
            reference.linear(x.astype(jnp.float32), leaf)):
    assert kd.rel_err(y, ref) < kd.REL_TOL[jnp.dtype(BF16)]
  # A g_idx whose last group has full length is not the contiguous layout of a ragged weight.
  g = np.asarray(w.g_idx).copy()
  g[np.flatnonzero(g == 0)[0]] = 2  # groups of 31, 32 and 17 rows
  bad = QuantizedWeight.from_ints(w.ints(), w.scales, w.zeros, w.spec, g_idx=jnp.asarray(g))
  with pytest.raises(ValueError, match='unequal size.*16 in the last'):
    layouts.contiguous_act_order(bad)


def test_restore_gives_back_the_stored_leaf():
  q = _act_order(bits=2, k=96, group=32, seed=4)
  _assert_same_leaf(layouts.restore_act_order(layouts.act_order_leaf(q)), q)


def test_tree_round_trip_leaves_other_leaves_alone():
  q = _act_order(seed=5)
  plain, _ = kd.quantized(np.random.default_rng(5), 128, 48, 4, 64)
  tree = {'a': {'kernel': q}, 'b': {'kernel': plain}, 'c': {'kernel': jnp.ones((4, 4))},
          'norm': jnp.ones(4)}
  served = layouts.for_serving(tree)
  assert isinstance(served['a']['kernel'], PermutedInput)
  assert served['b']['kernel'] is plain and served['c']['kernel'] is tree['c']['kernel']
  _assert_same_leaf(layouts.restore_for_storage(served), tree)


def test_unequal_groups_and_traced_g_idx_are_refused():
  spec = QuantSpec(bits=4, group_size=32)
  g = np.arange(64) // 32
  g[0] = 1  # group 0 has 31 rows, group 1 has 33
  q = QuantizedWeight.from_ints(jnp.zeros((64, 16), jnp.int32), jnp.ones((2, 16)),
                                jnp.zeros((2, 16)), spec, g_idx=jnp.asarray(g))
  with pytest.raises(ValueError, match='unequal size'):
    layouts.contiguous_act_order(q)
  assert layouts.act_order_leaf(q) is None  # keeps the gathered-scale path
  good = _act_order(k=64, group=32)
  with pytest.raises(ValueError, match='load time'):
    jax.jit(lambda w: layouts.contiguous_act_order(w)[0].qweight)(good)


def test_leaf_without_g_idx_is_unchanged():
  plain, _ = kd.quantized(np.random.default_rng(6), 64, 16, 4, 32)
  q2, perm = layouts.contiguous_act_order(plain)
  assert q2 is plain and np.array_equal(np.asarray(perm), np.arange(64))
  assert layouts.act_order_leaf(plain) is None
  assert layouts.act_order_leaf(LowRank(a=jnp.ones((4, 2)), b=jnp.ones((2, 4)))) is None
