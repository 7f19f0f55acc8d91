"""Tests for compress/calibration.py: H = X^T X accumulation, merging and the NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import calibration as cal


def _inputs(seed=0, shape=(3, 40, 24)):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(shape).astype(np.float32)


def test_update_stats_equals_direct_xtx():
  x = _inputs()  # [batch, tokens, in]
  stats = cal.update_stats(cal.init_stats(24), jnp.asarray(x))
  x2 = x.reshape(-1, 24).astype(np.float64)
  np.testing.assert_allclose(np.asarray(stats.hessian), x2.T @ x2, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(stats.act_abs_sum), np.abs(x2).sum(0), rtol=1e-5)
  assert int(stats.num_tokens) == 120
  assert stats.hessian.dtype == jnp.float32 and stats.hessian.shape == (24, 24)
  np.testing.assert_allclose(np.asarray(cal.mean_hessian(stats)), x2.T @ x2 / 120, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(cal.mean_abs_activation(stats)), np.abs(x2).mean(0),
                             rtol=1e-5)


def test_update_stats_is_order_and_batching_invariant():
  x = _inputs(1).reshape(-1, 24)  # [120, in]
  whole = cal.update_stats(cal.init_stats(24), x)
  chunked = cal.init_stats(24)
  for idx in np.array_split(np.random.default_rng(2).permutation(120), 7):  # shuffled, uneven
    chunked = cal.update_stats(chunked, x[idx])
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
  merged = cal.merge_stats(cal.update_stats(cal.init_stats(24), x[:50]),
                           cal.update_stats(cal.init_stats(24), x[50:]))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_update_stats_casts_bf16_to_float32_and_jits():
  x = jnp.asarray(_inputs(3), jnp.bfloat16)
  stats = jax.jit(cal.update_stats)(cal.init_stats(24), x)
  assert stats.hessian.dtype == jnp.float32
  x64 = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, 24)
  # Exact products of the bf16 values: the accumulation must not round to bf16.
  np.testing.assert_allclose(np.asarray(stats.hessian), x64.T @ x64, rtol=1e-5, atol=1e-4)


def test_check_finite_names_the_layer():
  x = _inputs(4)
  stats = cal.update_stats(cal.init_stats(24), x)
  cal.check_finite(stats, 'layers_0/mlp/up_proj')  # finite: no error
  x[1, 5, 7] = np.nan
  bad = cal.update_stats(stats, x)
  with pytest.raises(ValueError, match='layers_3/self_attn/q_proj'):
    cal.check_finite(bad, 'layers_3/self_attn/q_proj')
  x[1, 5, 7] = np.inf
  with pytest.raises(ValueError, match='NaN/Inf'):
    cal.check_finite(cal.update_stats(cal.init_stats(24), x), 'down')


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match='24 input features'):
    cal.update_stats(cal.init_stats(24), jnp.zeros((5, 23)))
  with pytest.raises(ValueError, match='merge'):
    cal.merge_stats(cal.init_stats(24), cal.init_stats(8))
  with pytest.raises(ValueError):
    cal.init_stats(0)


def test_output_error_matches_direct_computation():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((64, 16))
  w = rng.standard_normal((16, 8))
  w_hat = w + 0.1 * rng.standard_normal((16, 8))
  h = cal.update_stats(cal.init_stats(16), jnp.asarray(x, jnp.float32)).hessian
  direct = np.sum((x @ w - x @ w_hat) ** 2)
  np.testing.assert_allclose(float(cal.output_error(w, w_hat, h)), direct, rtol=1e-4)
