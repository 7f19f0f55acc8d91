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


@pytest.mark.parametrize('parts,d', [(1, 24), (2, 24), (3, 25), (4, 7), (3, 1030)])
def test_gram_blocks_equal_the_whole_product(monkeypatch, parts, d):
  """Only the blocks on and above the diagonal are multiplied; the result is X^T X, exactly
  symmetric, for widths that the parts do not divide."""
  monkeypatch.setattr(cal, 'GRAM_PARTS', ((None, parts),))
  x = _inputs(shape=(64, d)).reshape(64, d)
  g = np.asarray(jax.jit(cal.gram)(jnp.asarray(x)))
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(g, x64.T @ x64, rtol=1e-5, atol=1e-3)
  np.testing.assert_array_equal(g, g.T)


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


def test_diagonal_statistics_hold_the_diagonal_and_are_refused_where_h_is_needed():
  from compress import matrix  # pylint: disable=g-import-not-at-top
  from compress import rules as rules_lib  # pylint: disable=g-import-not-at-top
  from kernels import QuantSpec  # pylint: disable=g-import-not-at-top
  x = _inputs()
  full = cal.update_stats(cal.init_stats(24), x)
  diag = cal.update_stats(cal.init_stats(24, diagonal=True), x)
  np.testing.assert_allclose(np.asarray(diag.hessian), np.diag(np.diagonal(full.hessian)),
                             rtol=1e-5)
  np.testing.assert_array_equal(diag.act_abs_sum, full.act_abs_sum)
  w = jax.random.normal(jax.random.key(0), (24, 8))
  wanda = rules_lib.LinearSpec(prune='wanda', sparsity=rules_lib.PruneSpec.parse('2:4'))
  a, _ = matrix.compress_matrix(w, full, wanda)
  b, _ = matrix.compress_matrix(w, diag, wanda)  # Wanda reads diag(H) only: the same leaf
  jax.tree.map(np.testing.assert_array_equal, a, b)
  gptq = rules_lib.LinearSpec(quant='gptq', qspec=QuantSpec(bits=4, group_size=8))
  with pytest.raises(ValueError, match='needs the whole H'):
    matrix.compress_matrix(w, diag, gptq)
  with pytest.raises(ValueError, match='cannot merge'):
    cal.merge_stats(full, diag)


@pytest.mark.parametrize('rows', [16, 13])  # whole batches, and a last partial one
def test_passes_on_device_activations_match_host_ones(rows):
  """Activations on the devices run as one scanned program per block; in host memory
  (--offload=host) batch by batch: the same statistics and outputs up to rounding."""
  from models import config as config_lib  # pylint: disable=g-import-not-at-top
  from models import llama  # pylint: disable=g-import-not-at-top
  cfg = config_lib.tiny_config()
  block = llama.init_params(cfg, jax.random.key(0))['layers'][0]
  xs = jax.random.normal(jax.random.key(1), (rows, 16, cfg.hidden_size))
  keys = sorted(set(llama.linear_inputs(cfg).values()))
  dev = cal.collect_stats(block, xs, cfg.layer(0), keys, 4)
  host = cal.collect_stats(block, np.asarray(xs), cfg.layer(0), keys, 4)
  for k in keys:
    np.testing.assert_allclose(dev[k].hessian, host[k].hessian, rtol=2e-5, atol=1e-4)
    assert int(dev[k].num_tokens) == int(host[k].num_tokens) == rows * 16
  out = cal.run_block(block, xs, cfg.layer(0), 4)
  assert isinstance(out, jax.Array) and out.shape == xs.shape
  np.testing.assert_allclose(out, cal.run_block(block, np.asarray(xs), cfg.layer(0), 4),
                             rtol=1e-5, atol=1e-5)


def test_statistics_without_abs_sum_are_the_same_and_refused_by_awq():
  x = _inputs()
  full = cal.update_stats(cal.init_stats(24), x)
  lean = cal.update_stats(cal.init_stats(24, abs_sum=False), x)
  assert lean.act_abs_sum is None
  np.testing.assert_array_equal(lean.hessian, full.hessian)
  assert int(lean.num_tokens) == int(full.num_tokens)
  cal.check_finite(lean, 'q')
  merged = cal.merge_stats(lean, lean)
  assert merged.act_abs_sum is None
  np.testing.assert_allclose(merged.hessian, 2 * np.asarray(full.hessian), rtol=1e-6)
  with pytest.raises(ValueError, match='sum |x|'):
    cal.mean_abs_activation(lean)
  with pytest.raises(ValueError, match='cannot merge'):
    cal.merge_stats(lean, full)


def test_cpu_steps_bound_the_tokens_per_device(monkeypatch):
  from models import sharding  # pylint: disable=g-import-not-at-top
  assert jax.default_backend() == 'cpu'
  assert cal.step_size(8, 512) == 2 and cal.step_size(8, 64) == 8 and cal.step_size(8, 4096) == 1
  monkeypatch.setattr(cal, 'CPU_STEP_TOKENS', 4096)
  assert cal.step_size(8, 512) == 8 and cal.step_size(4, 512) == 4
  monkeypatch.setattr(cal, 'CPU_STEP_TOKENS', 1024)

  class Placement:  # a data axis of 4: at least one sequence per device and step
    data_size = 4
  monkeypatch.setattr(sharding, 'active', lambda: Placement())
  assert cal.step_size(8, 512) == 8 and cal.step_size(16, 4096) == 4


def test_smaller_steps_give_the_same_statistics_and_outputs(monkeypatch):
  """A pass in steps of fewer sequences than ``batch_size`` (the CPU's, :func:`step_size`) sums
  the same statistics and gives the same outputs, up to rounding."""
  from models import config as config_lib  # pylint: disable=g-import-not-at-top
  from models import llama  # pylint: disable=g-import-not-at-top
  cfg = config_lib.tiny_config()
  block = llama.init_params(cfg, jax.random.key(0))['layers'][0]
  xs = jax.random.normal(jax.random.key(1), (8, 32, cfg.hidden_size))
  keys = sorted(set(llama.linear_inputs(cfg).values()))
  runs = []
  for tokens in (1024, 64):  # 8 sequences per step, then 2
    monkeypatch.setattr(cal, 'CPU_STEP_TOKENS', tokens)
    runs.append((cal.collect_stats(block, xs, cfg.layer(0), keys, 8),
                 cal.run_block(block, xs, cfg.layer(0), 8)))
  (whole, out_whole), (steps, out_steps) = runs
  for k in keys:
    np.testing.assert_allclose(whole[k].hessian, steps[k].hessian, rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(whole[k].act_abs_sum, steps[k].act_abs_sum, rtol=2e-5)
    assert int(whole[k].num_tokens) == int(steps[k].num_tokens) == 8 * 32
  np.testing.assert_allclose(out_whole, out_steps, rtol=1e-5, atol=1e-5)
