"""Tests for compress/awq.py: scale search, clipping search, and how the result is applied."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import awq as awq_lib
from compress.calibration import init_stats, mean_abs_activation, output_error, update_stats
from compress.quantize import rtn_dense
from kernels.formats import QuantSpec, dequantize

N_IN, N_OUT, N_TOK = 64, 32, 256
_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}  # faster compiles for tiny problems


@functools.lru_cache(maxsize=None)
def _jitted(fn, spec, **statics):
  return jax.jit(functools.partial(fn, spec=spec, **statics), compiler_options=_COMPILER_OPTIONS)


def _problem(seed, outliers):
  """Calibration statistics of X [tokens, in] and a weight [in, out].

  With ``outliers`` a few input channels are 20x larger, as in LLM activations; AWQ's premise.
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((N_TOK, N_IN)) @ (np.eye(N_IN) + 0.2 * rng.standard_normal((N_IN, N_IN)))
  if outliers:
    x[:, rng.choice(N_IN, 4, replace=False)] *= 20.0
  x = x.astype(np.float32)
  w = (rng.standard_normal((N_IN, N_OUT)) * 0.1).astype(np.float32)
  stats = update_stats(init_stats(N_IN), x)
  return x, w, stats.hessian, mean_abs_activation(stats)


def _err(x, w, w_hat):
  x = np.asarray(x, np.float64)
  return float(np.sum((x @ np.asarray(w, np.float64) - x @ np.asarray(w_hat, np.float64)) ** 2))


@pytest.mark.parametrize('bits,group_size,symmetric', [
    (3, 32, False), (4, -1, False), (3, -1, True), (4, 32, True)])
def test_awq_never_worse_than_rtn_and_helps_with_outliers(bits, group_size, symmetric):
  spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
  search = _jitted(awq_lib.awq_grid_errors, spec)
  dense_fn = _jitted(awq_lib.awq_dense, spec)
  for outliers in (False, True):
    x, w, h, act = _problem(bits + group_size, outliers)
    alphas, errors = search(w, h, act)
    # Separately compiled programs may break the grid's exact rounding ties (e.g. -xmax / scale
    # = -3.5 on the symmetric 3-bit grid) differently: one code step moves the error ~0.1%.
    tol = 5e-3
    assert float(alphas[0]) == 0.0
    e_rtn_h = float(output_error(w, rtn_dense(w, spec), h))
    np.testing.assert_allclose(float(errors[0]), e_rtn_h, rtol=tol)  # alpha = 0 is RTN
    e_awq, e_rtn = _err(x, w, dense_fn(w, h, act)), _err(x, w, rtn_dense(w, spec))
    np.testing.assert_allclose(e_awq, float(errors.min()), rtol=tol)  # the H-based error is exact
    assert e_awq <= e_rtn * (1 + tol)
    if outliers:
      assert e_awq < 0.9 * e_rtn, (e_awq, e_rtn)


def test_scales_are_normalised_and_applied_to_input_rows():
  spec = QuantSpec(bits=3, group_size=32)
  x, w, h, act = _problem(1, outliers=True)
  s0 = awq_lib.awq_scales(act, 0.0)
  np.testing.assert_array_equal(np.asarray(s0), np.ones(N_IN, np.float32))
  s = np.asarray(awq_lib.awq_scales(act, 0.5))
  np.testing.assert_allclose(np.sqrt(s.max() * s.min()), 1.0, rtol=1e-5)
  order = np.argsort(np.asarray(act))
  assert np.all(np.diff(s[order]) >= 0)  # larger activations get larger scales
  q, s = _jitted(awq_lib.awq, spec)(w, h, act)
  assert q.shape == (N_IN, N_OUT) and s.shape == (N_IN,)
  assert not np.allclose(np.asarray(s), 1.0)  # the outliers make a non-trivial alpha win
  # y = (x / s) @ dequantize(q) is the dense weight diag(1/s) dequantize(q).
  dense = _jitted(awq_lib.awq_dense, spec)(w, h, act)
  np.testing.assert_allclose(np.asarray(dense), np.asarray(dequantize(q)) / np.asarray(s)[:, None],
                             rtol=1e-6, atol=1e-7)
  y_scaled = (x / np.asarray(s)) @ np.asarray(dequantize(q))
  np.testing.assert_allclose(y_scaled, x @ np.asarray(dense), rtol=1e-3, atol=1e-3)
  s_search = _jitted(awq_lib.awq_search, spec)(w, h, act)
  np.testing.assert_array_equal(np.asarray(s_search), np.asarray(s))


def _heavy_tailed_problem(seed):
  x, _, h, act = _problem(seed, outliers=False)
  w = (np.random.default_rng(seed).standard_t(2.0, (N_IN, N_OUT)) * 0.05).astype(np.float32)
  return x, w, h, act


def test_clip_never_worse_per_group_and_exact_without_groups():
  # group_size = -1: the clipping search scores the full output error, so clipping cannot hurt.
  spec = QuantSpec(bits=3, group_size=-1)
  x, w, h, act = _heavy_tailed_problem(2)
  e_clip = _err(x, w, _jitted(awq_lib.awq_dense, spec, clip=True)(w, h, act))
  e_noclip = _err(x, w, _jitted(awq_lib.awq_dense, spec)(w, h, act))
  assert e_clip <= e_noclip * (1 + 1e-5)
  assert e_clip < 0.95 * e_noclip  # heavy-tailed weights: clipping the outliers pays off

  # Grouped: each group is scored on its own input slice (cross-group terms ignored, as in the
  # reference), so that block-diagonal error is what cannot increase.
  spec = QuantSpec(bits=3, group_size=16)
  q_clip, s = _jitted(awq_lib.awq, spec, clip=True)(w, h, act)
  q_noclip, s2 = _jitted(awq_lib.awq, spec)(w, h, act)
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s2))  # the scale search is unaffected
  s = np.asarray(s, np.float64)
  ws = np.asarray(w, np.float64) * s[:, None]
  hs = np.asarray(h, np.float64) / np.outer(s, s)

  def group_errors(q):
    d = (np.asarray(dequantize(q), np.float64) - ws).reshape(4, 16, N_OUT)
    hb = np.stack([hs[16 * g:16 * g + 16, 16 * g:16 * g + 16] for g in range(4)])
    return np.einsum('gio,gij,gjo->go', d, hb, d)

  e_c, e_n = group_errors(q_clip), group_errors(q_noclip)
  assert np.all(e_c <= e_n * (1 + 1e-4) + 1e-9)
  assert e_c.sum() < e_n.sum()


def test_clip_thresholds_are_on_the_reference_grid():
  spec = QuantSpec(bits=3, group_size=16)
  _, w, h, _ = _heavy_tailed_problem(3)
  max_val = np.asarray(_jitted(awq_lib.awq_clip, spec)(w, h))
  org = np.abs(w).reshape(4, 16, N_OUT).max(axis=1)
  ratio = max_val / org
  grid = 1.0 - np.arange(10) / 20  # 1.0, 0.95, ..., 0.55
  assert np.all(np.min(np.abs(ratio[..., None] - grid), axis=-1) < 1e-5)
  assert np.any(ratio < 1.0) and np.any(ratio == 1.0)
  clipped = np.asarray(awq_lib.apply_clip(jnp.asarray(w), jnp.asarray(max_val), spec))
  assert np.all(np.abs(clipped).reshape(4, 16, N_OUT).max(axis=1) <= max_val + 1e-7)


def test_jit_matches_eager():
  spec = QuantSpec(bits=4, group_size=32)
  _, w, h, act = _problem(4, outliers=True)
  dense_jit = _jitted(awq_lib.awq_dense, spec)(w, h, act)
  dense_eager = awq_lib.awq_dense(w, h, act, spec)
  np.testing.assert_allclose(np.asarray(dense_jit), np.asarray(dense_eager), rtol=1e-6, atol=1e-7)


def test_bad_arguments_raise():
  _, w, h, act = _problem(5, outliers=False)
  spec = QuantSpec(bits=4, group_size=32)
  with pytest.raises(ValueError, match='hessian'):
    awq_lib.awq(w, h[:-1, :-1], act, spec)
  with pytest.raises(ValueError, match='act_mean'):
    awq_lib.awq(w, h, act[:-1], spec)
