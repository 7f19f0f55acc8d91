"""Tests for compress/prune.py: PruneSpec, score-based masks (magnitude, Wanda), the sparse leaf."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import prune
from compress.prune import PruneSpec
from kernels import formats


def _rng(seed=0):
  return np.random.default_rng(seed)


def _weight(n_in=64, n_out=24, seed=0):
  return _rng(seed).standard_normal((n_in, n_out)).astype(np.float32)


def _hessian(n_in=64, n_tokens=256, seed=1):
  x = _rng(seed).standard_normal((n_tokens, n_in)).astype(np.float32)
  x *= np.exp(_rng(seed + 1).uniform(-1.0, 1.0, n_in)).astype(np.float32)
  return x.T @ x


def _assert_nm(mask, n, m):
  mask = np.asarray(mask)
  kept = mask.reshape(mask.shape[0] // m, m, mask.shape[1]).sum(axis=1)
  assert (kept == n).all(), np.unique(kept)


# --------------------------------------------------------------------------------- PruneSpec


@pytest.mark.parametrize('text, sparsity, n, m', [
    ('0.5', 0.5, 0, 0), ('0.7', 0.7, 0, 0), (' 0.25 ', 0.25, 0, 0),
    ('2:4', 0.5, 2, 4), ('4:8', 0.5, 4, 8), ('1:4', 0.75, 1, 4)])
def test_parse(text, sparsity, n, m):
  spec = PruneSpec.parse(text)
  assert (spec.sparsity, spec.n, spec.m) == (sparsity, n, m)
  assert spec.is_nm == (m > 0)
  assert PruneSpec.parse(spec.pattern) == spec
  hash(spec)  # usable as a static argument


def test_pattern_strings():
  assert PruneSpec.parse('2:4').pattern == '2:4'
  assert PruneSpec(sparsity=0.5).pattern == '0.5'


@pytest.mark.parametrize('text, message', [
    ('1.5', r'sparsity must lie in \(0, 1\)'),
    ('0', r'sparsity must lie in \(0, 1\)'),
    ('1', r'sparsity must lie in \(0, 1\)'),
    ('-0.5', r'sparsity must lie in \(0, 1\)'),
    ('3:2', r'0 < n < m'),
    ('4:4', r'0 < n < m'),
    ('0:4', r'0 < n < m'),
    ('abc', r"cannot parse pruning pattern 'abc'"),
    ('2:x', r"cannot parse pruning pattern '2:x'"),
    (':4', r"cannot parse pruning pattern ':4'"),
    ('', r"cannot parse pruning pattern ''"),
])
def test_parse_errors_name_the_problem(text, message):
  with pytest.raises(ValueError, match=message):
    PruneSpec.parse(text)


def test_constructor_errors():
  with pytest.raises(ValueError, match='given without m'):
    PruneSpec(n=2)
  with pytest.raises(ValueError, match='conflicts with the 2:4 pattern'):
    PruneSpec(sparsity=0.3, n=2, m=4)
  with pytest.raises(ValueError, match='must be an int'):
    PruneSpec(n=2.0, m=4)
  with pytest.raises(ValueError, match='non-negative'):
    PruneSpec(n=-1, m=4)
  assert PruneSpec(sparsity=0.75, n=1, m=4).sparsity == 0.75  # consistent value accepted


def test_num_pruned_and_shape_check():
  assert PruneSpec(sparsity=0.7).num_pruned(100) == 70
  assert PruneSpec(sparsity=0.7).num_pruned(256) == int(256 * 0.7)
  assert PruneSpec.parse('2:4').num_pruned(64) == 32
  with pytest.raises(ValueError, match='multiple of 8'):
    PruneSpec.parse('4:8').check_shape(36)


# ------------------------------------------------------------------------------ selection


def _stable_sort_selection(scores, k, axis):
  order = np.argsort(scores, axis=axis, kind='stable')
  first = np.take(order, np.arange(k), axis=axis)
  out = np.zeros(scores.shape, bool)
  np.put_along_axis(out, first, True, axis=axis)
  return out


@pytest.mark.parametrize('shape', [(7, 40), (40, 7), (3, 4, 5), (300, 6)])
def test_lowest_k_mask_is_stable_sort_selection(shape):
  """Same set as the Wanda reference's stable sort, with many ties, -0.0/+0.0 and negatives."""
  rng = _rng(3)
  select = jax.jit(prune.lowest_k_mask, static_argnums=(1, 2))
  for trial in range(4):
    scores = (rng.integers(-3, 4, size=shape) * rng.choice([1.0, 0.5, -0.0], size=shape)).astype(
        np.float32)
    if trial % 2:
      scores = rng.standard_normal(shape).astype(np.float32)
    for axis in range(len(shape)):
      for k in sorted({0, 1, shape[axis] // 2, shape[axis] - 1, shape[axis]}):
        got = np.asarray(select(jnp.asarray(scores), k, axis))
        np.testing.assert_array_equal(got, _stable_sort_selection(scores, k, axis))
        assert (got.sum(axis=axis) == k).all()


def test_lowest_k_mask_rejects_bad_k():
  with pytest.raises(ValueError, match='cannot select 5 of 4'):
    prune.lowest_k_mask(jnp.zeros((4, 3)), 5, axis=0)


# -------------------------------------------------------------------------- magnitude, wanda


@pytest.mark.parametrize('n_in, sparsity', [(64, 0.5), (100, 0.7), (96, 0.3)])
def test_exact_sparsity_per_output_unit(n_in, sparsity):
  w = _weight(n_in)
  spec = PruneSpec(sparsity=sparsity)
  masks = (jax.jit(prune.magnitude_mask, static_argnums=1)(w, spec),
           jax.jit(prune.wanda_mask, static_argnums=2)(w, _hessian(n_in), spec))
  for mask in masks:
    assert mask.dtype == jnp.bool_ and mask.shape == w.shape
    pruned = (~np.asarray(mask)).sum(axis=0)
    assert (pruned == int(n_in * sparsity)).all(), np.unique(pruned)


@pytest.mark.parametrize('pattern, n, m', [('2:4', 2, 4), ('4:8', 4, 8)])
def test_nm_holds_in_every_group(pattern, n, m):
  w = _weight(64)
  spec = PruneSpec.parse(pattern)
  _assert_nm(prune.magnitude_mask(w, spec), n, m)
  _assert_nm(prune.wanda_mask(w, _hessian(64), spec), n, m)


@pytest.mark.parametrize('pattern', ['0.5', '2:4', '4:8'])
def test_masks_keep_the_highest_scores(pattern):
  """Within each selection set, every kept score >= every pruned score."""
  w, h = _weight(64), _hessian(64)
  spec = PruneSpec.parse(pattern)
  scores = np.asarray(prune.wanda_scores(w, h))
  mask = np.asarray(prune.wanda_mask(w, h, spec))
  group = spec.m if spec.is_nm else 64
  s = scores.reshape(64 // group, group, -1)
  k = mask.reshape(64 // group, group, -1)
  kept_min = np.where(k, s, np.inf).min(axis=1)
  pruned_max = np.where(~k, s, -np.inf).max(axis=1)
  assert (kept_min >= pruned_max).all()


def test_wanda_scores_use_input_norms():
  w, h = _weight(32), _hessian(32)
  expected = np.abs(w) * np.sqrt(np.diag(h))[:, None]
  np.testing.assert_allclose(prune.wanda_scores(w, h), expected, rtol=1e-6)


@pytest.mark.parametrize('pattern', ['0.5', '0.7', '2:4', '4:8'])
def test_wanda_with_identity_hessian_is_magnitude(pattern):
  w = _weight(64)
  spec = PruneSpec.parse(pattern)
  for h in (np.eye(64, dtype=np.float32), 3.0 * np.eye(64, dtype=np.float32)):
    np.testing.assert_array_equal(prune.wanda_mask(w, h, spec), prune.magnitude_mask(w, spec))


def test_wanda_differs_from_magnitude_with_uneven_inputs():
  """Guards the test above: with a non-uniform diagonal the masks must differ."""
  w, h = _weight(64), _hessian(64)
  spec = PruneSpec(sparsity=0.5)
  wanda, magnitude = prune.wanda_mask(w, h, spec), prune.magnitude_mask(w, spec)
  assert (np.asarray(wanda) != np.asarray(magnitude)).any()


def test_wanda_and_magnitude_return_pruned_weights():
  w, h = _weight(64), _hessian(64)
  spec = PruneSpec.parse('2:4')
  w_p, mask = prune.wanda(w, h, spec)
  np.testing.assert_array_equal(w_p, np.where(mask, w, 0))
  w_p, mask = prune.magnitude(w, spec)
  np.testing.assert_array_equal(w_p, np.where(mask, w, 0))


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match='hessian shape'):
    prune.wanda_mask(_weight(64), np.eye(32, dtype=np.float32), PruneSpec())
  with pytest.raises(ValueError, match='multiple of 4'):
    prune.magnitude_mask(_weight(62), PruneSpec.parse('2:4'))


def test_jit_with_static_spec():
  w, h = _weight(64), _hessian(64)
  for pattern in ('0.5', '2:4'):
    spec = PruneSpec.parse(pattern)
    jitted = jax.jit(functools.partial(prune.wanda_mask, spec=spec))
    np.testing.assert_array_equal(jitted(w, h), prune.wanda_mask(w, h, spec))
    jitted = jax.jit(functools.partial(prune.magnitude_mask, spec=spec))
    np.testing.assert_array_equal(jitted(w), prune.magnitude_mask(w, spec))


# ----------------------------------------------------------------------------- sparse leaf


def test_make_sparse_leaf_24_round_trips():
  w = _weight(64)
  spec = PruneSpec.parse('2:4')
  mask = prune.magnitude_mask(w, spec)
  leaf = prune.make_sparse_leaf(w, mask, spec)  # unpruned w: the mask is applied here
  assert isinstance(leaf, formats.CompressedLinear)
  assert isinstance(leaf.weight, formats.Sparse24Weight)
  assert leaf.weight.values.shape == (32, 24)
  np.testing.assert_array_equal(formats.sparse24_decompress(leaf.weight), np.where(mask, w, 0))
  np.testing.assert_array_equal(formats.to_dense(leaf), np.where(mask, w, 0))


@pytest.mark.parametrize('pattern', ['0.5', '4:8'])
def test_make_sparse_leaf_masked(pattern):
  w = _weight(64)
  spec = PruneSpec.parse(pattern)
  mask = prune.magnitude_mask(w, spec)
  leaf = prune.make_sparse_leaf(w, mask, spec)
  assert isinstance(leaf, formats.CompressedLinear)
  np.testing.assert_array_equal(leaf.mask, mask)
  np.testing.assert_array_equal(leaf.weight, np.where(mask, w, 0))
  np.testing.assert_array_equal(formats.to_dense(leaf), np.where(mask, w, 0))


def test_make_sparse_leaf_shape_mismatch():
  with pytest.raises(ValueError, match='mask shape'):
    prune.make_sparse_leaf(_weight(64), np.ones((64, 8), bool), PruneSpec())
