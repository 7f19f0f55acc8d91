"""Tests for kernels/formats.py.

Properties: ``to_dense`` / ``effective_weight`` of every leaf type equal a NumPy hand computation
(groups, act-order ``g_idx``, padding of ``in_features`` to 32, masks, adapters); 2:4 compression
round-trips and rejects non-2:4 input; ``weight_nbytes`` counts as documented; ``is_weight_leaf``;
the pytree registration keeps static fields out of the leaves (and in the treedef); ``eval_shape``
and ``jit`` work on leaves.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import formats, packing
from kernels.formats import (
    CompressedLinear, LowRank, QuantizedWeight, QuantSpec, Sparse24Weight)


def _quantized(n_in, n_out, bits=4, group_size=16, g_idx=None, seed=0, symmetric=False):
  """A QuantizedWeight from random codes, plus the NumPy arrays it was built from."""
  rng = np.random.default_rng(seed)
  spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
  groups = spec.num_groups(n_in) if g_idx is None else int(np.max(g_idx)) + 1
  q = rng.integers(0, 2 ** bits, size=(n_in, n_out)).astype(np.int32)
  scales = rng.uniform(0.01, 0.1, size=(groups, n_out)).astype(np.float32)
  zeros = rng.integers(0, 2 ** bits, size=(groups, n_out)).astype(np.int32)
  qw = QuantizedWeight.from_ints(jnp.asarray(q), jnp.asarray(scales), jnp.asarray(zeros), spec,
                                 g_idx=g_idx)
  return qw, q, scales, zeros


def _hand_dequant(q, scales, zeros, g):
  return (q.astype(np.float64) - zeros[g].astype(np.float64)) * scales[g].astype(np.float64)


def _two_four(n_in, n_out, seed=0):
  """A random dense weight that is 2:4 along the input axis, and its mask."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((n_in, n_out)).astype(np.float32)
  mask = np.zeros((n_in // 4, 4, n_out), bool)
  for g in range(n_in // 4):
    for o in range(n_out):
      mask[g, rng.choice(4, 2, replace=False), o] = True
  mask = mask.reshape(n_in, n_out)
  return np.where(mask, w, 0.0).astype(np.float32), mask


# --------------------------------------------------------------------------- QuantSpec


def test_quant_spec_validation():
  with pytest.raises(ValueError, match='bits=5'):
    QuantSpec(bits=5)
  with pytest.raises(ValueError, match='group_size'):
    QuantSpec(group_size=0)
  with pytest.raises(ValueError, match='group_size'):
    QuantSpec(group_size=-2)
  spec = QuantSpec(bits=3, group_size=32)
  assert spec.num_groups(96) == 3 and spec.group_len(96) == 32
  assert QuantSpec(group_size=-1).num_groups(96) == 1
  assert QuantSpec(group_size=-1).group_len(96) == 96
  # A group size that does not divide `in` leaves a shorter last group: ceil(in / g) groups.
  assert spec.num_groups(40) == 2 and spec.group_len(40) == 32 and spec.last_group_len(40) == 8
  assert spec.is_ragged(40) and not spec.is_ragged(96)
  np.testing.assert_array_equal(QuantSpec(group_size=32).group_lengths(80), [32, 32, 16])
  assert QuantSpec(group_size=128).num_groups(576) == 5
  assert QuantSpec(group_size=128).last_group_len(576) == 64
  assert QuantSpec(group_size=64).num_groups(40) == 1  # wider than `in`: one group of 40
  assert QuantSpec(group_size=64).last_group_len(40) == 40
  assert not QuantSpec(group_size=-1).is_ragged(40)
  with pytest.raises(ValueError, match=r'^group_size must be positive or -1 \(per output unit\), '
                     r'got 0\.$'):
    QuantSpec(group_size=0)
  assert hash(spec) == hash(QuantSpec(bits=3, group_size=32))  # usable as a static argument


# --------------------------------------------------------------------------- QuantizedWeight


@pytest.mark.parametrize('n_in,bits,group_size', [(64, 4, 16), (40, 3, 8), (48, 2, -1),
                                                  (32, 8, 32),
                                                  # ragged: the last group is shorter
                                                  (80, 4, 32), (40, 3, 16), (100, 2, 64)])
def test_quantized_dequantize_matches_hand_computation(n_in, bits, group_size):
  qw, q, scales, zeros = _quantized(n_in, 6, bits, group_size, seed=n_in + bits)
  # Packed storage: ceil(in / 32) * bits rows of int32, zeros as uint8.
  assert qw.qweight.dtype == jnp.int32
  assert qw.qweight.shape == (-(-n_in // 32) * bits, 6)
  assert qw.zeros.dtype == jnp.uint8
  assert qw.shape == (n_in, 6)
  assert qw.spec == QuantSpec(bits=bits, group_size=group_size)
  np.testing.assert_array_equal(np.asarray(qw.ints()), q)
  glen = n_in if group_size == -1 else group_size
  g = np.arange(n_in) // glen
  assert qw.scales.shape == qw.zeros.shape == (-(-n_in // glen), 6)
  np.testing.assert_array_equal(np.asarray(qw.group_index()), g)
  expect = _hand_dequant(q, scales, zeros, g)
  np.testing.assert_allclose(np.asarray(formats.dequantize(qw)), expect, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(formats.to_dense(qw)), expect, rtol=1e-6, atol=1e-7)
  # The padding rows past in_features are zero codes.
  full = np.asarray(packing.unpack(qw.qweight, bits))
  np.testing.assert_array_equal(full[n_in:], 0)


def test_ragged_groups_pack_and_unpack_exactly():
  """g32 on 80 inputs: codes, scales and zeros survive packing bit for bit, and every row of the
  last (16-row) group dequantizes with that group's own scale and zero."""
  qw, q, scales, zeros = _quantized(80, 7, bits=3, group_size=32, seed=9)
  assert qw.scales.shape == (3, 7)
  again = QuantizedWeight.from_ints(qw.ints(), qw.scales, qw.zeros, qw.spec)
  for field in ('qweight', 'scales', 'zeros'):
    np.testing.assert_array_equal(np.asarray(getattr(again, field)), np.asarray(getattr(qw, field)))
  dense = np.asarray(formats.dequantize(qw))
  np.testing.assert_allclose(dense[64:], (q[64:] - zeros[2].astype(np.float64)) * scales[2],
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(dense[:64], _hand_dequant(q[:64], scales, zeros,
                                                       np.arange(64) // 32), rtol=1e-6, atol=1e-7)


def test_quantized_act_order_g_idx():
  n_in = 32
  g_idx = np.random.default_rng(1).permutation(np.arange(n_in) // 8).astype(np.int32)  # 4 groups
  qw, q, scales, zeros = _quantized(n_in, 5, 4, 8, g_idx=g_idx, seed=2)
  np.testing.assert_array_equal(np.asarray(qw.group_index()), g_idx)
  np.testing.assert_allclose(np.asarray(formats.dequantize(qw)),
                             _hand_dequant(q, scales, zeros, g_idx), rtol=1e-6, atol=1e-7)
  # Contiguous groups would give a different weight (the test is not vacuous).
  contiguous = _hand_dequant(q, scales, zeros, np.arange(n_in) // 8)
  assert not np.allclose(np.asarray(formats.dequantize(qw)), contiguous)


def test_dequantize_dtype():
  qw, *_ = _quantized(32, 4)
  assert formats.dequantize(qw, jnp.bfloat16).dtype == jnp.bfloat16
  assert formats.to_dense(qw, jnp.bfloat16).dtype == jnp.bfloat16


def test_quantized_nbytes_effective():
  qw, *_ = _quantized(64, 8, bits=4, group_size=16)
  # 64 * 8 codes at 4 bits + 4 * 8 scales at 16 bits + 4 * 8 zeros at 4 bits.
  assert qw.nbytes_effective() == 64 * 8 // 2 + 32 * 2 + 32 // 2
  assert formats.weight_nbytes(qw) == qw.nbytes_effective()
  g_idx = np.arange(64) // 16
  qa, *_ = _quantized(64, 8, bits=4, group_size=16, g_idx=g_idx)
  assert qa.nbytes_effective() == qw.nbytes_effective() + 64 * 4  # + int32 g_idx


# --------------------------------------------------------------------------- 2:4


def test_sparse24_roundtrip_and_layout():
  w, mask = _two_four(16, 5, seed=3)
  s = formats.sparse24_compress(w)
  assert s.values.shape == (8, 5) and s.indices.shape == (8, 5)
  assert s.indices.dtype == jnp.uint8
  assert s.shape == (16, 5)
  idx = np.asarray(s.indices).reshape(4, 2, 5)
  assert np.all(idx[:, 0] < idx[:, 1])  # kept positions in increasing order
  expect_idx = np.stack([np.nonzero(mask.reshape(4, 4, 5)[g, :, o])[0]
                         for g in range(4) for o in range(5)]).reshape(4, 5, 2).transpose(0, 2, 1)
  np.testing.assert_array_equal(idx, expect_idx)
  vals = np.asarray(s.values).reshape(4, 2, 5)
  wg = w.reshape(4, 4, 5)
  np.testing.assert_array_equal(vals, np.take_along_axis(wg, idx.astype(np.int64), axis=1))
  np.testing.assert_array_equal(np.asarray(formats.sparse24_decompress(s)), w)
  np.testing.assert_array_equal(np.asarray(formats.to_dense(s)), w)


def test_sparse24_fewer_than_two_nonzeros_keeps_explicit_zeros():
  w = np.zeros((8, 2), np.float32)
  w[1, 0] = 2.0             # group 0, column 0: one non-zero
  w[6, 1], w[7, 1] = 3.0, -1.0  # group 1, column 1: two non-zeros; the others are all zero
  s = formats.sparse24_compress(w)
  np.testing.assert_array_equal(np.asarray(formats.sparse24_decompress(s)), w)
  assert int(jnp.sum(s.values != 0)) == 3


def test_sparse24_rejects_bad_input():
  w = np.zeros((8, 2), np.float32)
  w[0:3, 0] = 1.0
  with pytest.raises(ValueError, match='not 2:4 sparse'):
    formats.sparse24_compress(w)
  with pytest.raises(ValueError, match='multiple of 4'):
    formats.sparse24_compress(np.zeros((6, 2), np.float32))


def test_sparse24_from_quantized_equals_masked_dequantized():
  qw, *_ = _quantized(64, 6, bits=4, group_size=16, seed=4)
  _, mask = _two_four(64, 6, seed=5)
  s = formats.sparse24_from_quantized(qw, mask)
  assert isinstance(s.values, QuantizedWeight)
  assert s.values.group_size == 8 and s.values.in_features == 32
  assert s.shape == (64, 6)
  expect = np.where(mask, np.asarray(formats.dequantize(qw)), 0.0)
  np.testing.assert_allclose(np.asarray(formats.to_dense(s)), expect, rtol=1e-6, atol=1e-7)
  # The quantized values store fewer bytes than the dense 2:4 values would.
  assert formats.weight_nbytes(s) == s.values.nbytes_effective() + s.indices.size // 4


def test_sparse24_from_quantized_rejects():
  qw, *_ = _quantized(32, 4, bits=4, group_size=16)
  bad = np.ones((32, 4), bool)
  with pytest.raises(ValueError, match='not exactly 2:4'):
    formats.sparse24_from_quantized(qw, bad)
  qa, *_ = _quantized(32, 4, bits=4, group_size=16, g_idx=np.arange(32) // 16)
  _, mask = _two_four(32, 4)
  with pytest.raises(ValueError, match='act-order'):
    formats.sparse24_from_quantized(qa, mask)


# --------------------------------------------------------------------------- CompressedLinear


def test_compressed_linear_mask_and_adapter():
  rng = np.random.default_rng(6)
  w = rng.standard_normal((12, 5)).astype(np.float32)
  mask = rng.random((12, 5)) < 0.5
  a = rng.standard_normal((12, 3)).astype(np.float32)
  b = rng.standard_normal((3, 5)).astype(np.float32)
  leaf = CompressedLinear(weight=jnp.asarray(w), mask=jnp.asarray(mask),
                          adapter=LowRank(a=jnp.asarray(a), b=jnp.asarray(b)))
  assert leaf.shape == (12, 5) and leaf.adapter.rank == 3
  masked = np.where(mask, w, 0.0)
  np.testing.assert_array_equal(np.asarray(formats.to_dense(leaf)), masked)  # no adapter
  np.testing.assert_allclose(np.asarray(formats.effective_weight(leaf)), masked + a @ b,
                             rtol=1e-5, atol=1e-5)
  # Without the adapter effective_weight is to_dense.
  plain = dataclasses.replace(leaf, adapter=None)
  np.testing.assert_array_equal(np.asarray(formats.effective_weight(plain)), masked)
  # A dense array's effective weight is itself (cast).
  np.testing.assert_array_equal(np.asarray(formats.effective_weight(w.astype(np.float16))),
                                w.astype(np.float16).astype(np.float32))


def test_compressed_linear_quantized_weight_and_quantized_adapter():
  qw, q, scales, zeros = _quantized(32, 4, bits=4, group_size=16, seed=7)
  qa, qa_ints, qa_s, qa_z = _quantized(32, 2, bits=8, group_size=-1, seed=8)
  b = np.random.default_rng(9).standard_normal((2, 4)).astype(np.float32)
  leaf = CompressedLinear(weight=qw, adapter=LowRank(a=qa, b=jnp.asarray(b)))
  base = _hand_dequant(q, scales, zeros, np.arange(32) // 16)
  a = _hand_dequant(qa_ints, qa_s, qa_z, np.zeros(32, int))
  np.testing.assert_allclose(np.asarray(formats.to_dense(leaf)), base, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(formats.effective_weight(leaf)), base + a @ b,
                             rtol=1e-5, atol=1e-5)


def test_weight_nbytes():
  w = jnp.ones((16, 8), jnp.float32)
  assert formats.weight_nbytes(w) == 16 * 8 * 2  # dense counts 16 bits per value
  mask = jnp.ones((16, 8), bool)
  assert formats.weight_nbytes(CompressedLinear(weight=w)) == 256
  assert formats.weight_nbytes(CompressedLinear(weight=w, mask=mask)) == 256 + 16
  ad = LowRank(a=jnp.ones((16, 2)), b=jnp.ones((2, 8)))
  assert formats.weight_nbytes(CompressedLinear(weight=w, mask=mask, adapter=ad)) == (
      256 + 16 + (32 + 16) * 2)
  s = formats.sparse24_compress(_two_four(16, 8)[0])
  assert formats.weight_nbytes(s) == 8 * 8 * 2 + 64 // 4  # values + 2 bits per kept value
  assert formats.weight_nbytes(CompressedLinear(weight=s)) == formats.weight_nbytes(s)


def test_is_weight_leaf():
  qw, *_ = _quantized(32, 4)
  s = formats.sparse24_compress(_two_four(8, 2)[0])
  lr = LowRank(a=jnp.ones((4, 1)), b=jnp.ones((1, 2)))
  for leaf in (qw, s, lr, CompressedLinear(weight=jnp.ones((4, 2)))):
    assert formats.is_weight_leaf(leaf)
  for other in (jnp.ones((4, 2)), np.ones((4, 2)), {'kernel': jnp.ones(2)}, None, 3.0):
    assert not formats.is_weight_leaf(other)
  tree = {'a': CompressedLinear(weight=qw), 'b': jnp.ones(3)}
  leaves = jax.tree.leaves(tree, is_leaf=formats.is_weight_leaf)
  assert len(leaves) == 2 and isinstance(leaves[0], CompressedLinear)


# --------------------------------------------------------------------------- pytrees


def test_pytree_leaves_and_static_fields():
  qw, *_ = _quantized(32, 4, bits=3, group_size=8)
  leaves, treedef = jax.tree.flatten(qw)
  assert len(leaves) == 3  # qweight, scales, zeros; g_idx=None is no leaf; statics are not leaves
  assert all(isinstance(x, jax.Array) for x in leaves)
  back = jax.tree.unflatten(treedef, leaves)
  assert (back.bits, back.group_size, back.in_features, back.symmetric) == (3, 8, 32, False)
  qa, *_ = _quantized(32, 4, bits=3, group_size=8, g_idx=np.arange(32) // 8)
  assert len(jax.tree.leaves(qa)) == 4
  # Static fields are part of the structure: different bits -> different treedef.
  q4, *_ = _quantized(32, 4, bits=4, group_size=8)
  assert jax.tree.structure(q4) != treedef
  # tree.map touches arrays only and keeps the statics.
  doubled = jax.tree.map(lambda x: x, qw)
  assert doubled.bits == 3 and doubled.in_features == 32
  lr = LowRank(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), preserved=1)
  assert len(jax.tree.leaves(lr)) == 2
  assert jax.tree.map(lambda x: x * 2, lr).preserved == 1
  leaf = CompressedLinear(weight=qw, mask=jnp.ones((32, 4), bool),
                          adapter=LowRank(a=jnp.ones((32, 2)), b=jnp.ones((2, 4))))
  assert len(jax.tree.leaves(leaf)) == 3 + 1 + 2
  s = formats.sparse24_compress(_two_four(8, 2)[0])
  assert len(jax.tree.leaves(CompressedLinear(weight=s))) == 2


def test_eval_shape_and_jit_on_leaves():
  qw, *_ = _quantized(40, 6, bits=4, group_size=8)
  out = jax.eval_shape(formats.to_dense, qw)
  assert out.shape == (40, 6) and out.dtype == jnp.float32
  shapes = jax.eval_shape(lambda x: x, qw)
  assert isinstance(shapes, QuantizedWeight) and shapes.in_features == 40
  assert shapes.qweight.shape == qw.qweight.shape
  leaf = CompressedLinear(weight=qw, mask=jnp.asarray(np.arange(240).reshape(40, 6) % 3 != 0))
  jitted = jax.jit(formats.effective_weight)(leaf)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(formats.effective_weight(leaf)))
  s = formats.sparse24_compress(_two_four(16, 3)[0])
  assert jax.eval_shape(formats.to_dense, CompressedLinear(weight=s)).shape == (16, 3)


def test_leaf_types_constant():
  assert set(formats.LEAF_TYPES) == {QuantizedWeight, Sparse24Weight, LowRank, CompressedLinear,
                                     formats.PermutedInput}
