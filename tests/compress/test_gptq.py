"""Tests for compress/gptq.py.

Properties: GPTQ's layer output error is below RTN's; the result matches a float64 NumPy port of the
reference algorithm (IST-DASLab/gptq ``fasterquant``) written here as an oracle; ``loss`` equals the
damped-Hessian error; act-order / static groups / masks / dead inputs / damping retries behave as
documented; jit with statics bound.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import gptq as gptq_lib
from compress.quantize import group_qparams, rtn_dense
from kernels.formats import QuantSpec, dequantize

N_IN, N_OUT, N_TOK = 64, 24, 96


# Backend optimization off: halves XLA:CPU compile time of these small problems, which dominates
# the runtime of this file.
_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


@functools.lru_cache(maxsize=None)
def _jitted(fn, spec, **statics):
  """One compile per (function, spec, statics) across the whole module."""
  return jax.jit(functools.partial(fn, spec=spec, **statics), compiler_options=_COMPILER_OPTIONS)


def _problem(seed, correlated, n_in=N_IN, n_out=N_OUT, n_tok=N_TOK):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n_tok, n_in))
  if correlated:  # X = Z @ L: strongly correlated input features
    x = x @ (rng.standard_normal((n_in, n_in)) / np.sqrt(n_in) + 0.3 * np.eye(n_in))
  w = rng.standard_normal((n_in, n_out)) * 0.1
  return x.astype(np.float32), w.astype(np.float32), (x.T @ x).astype(np.float32)


def _err(x, w, w_hat):
  x = np.asarray(x, np.float64)
  return float(np.sum((x @ np.asarray(w, np.float64) - x @ np.asarray(w_hat, np.float64)) ** 2))


def _reference_gptq(w, h, spec, blocksize=128, percdamp=0.01, actorder=False,
                    static_groups=False):
  """Float64 NumPy transcription of the reference ``fasterquant`` (paper layout W [out, in])."""
  W = np.asarray(w, np.float64).T.copy()
  H = np.asarray(h, np.float64).copy()
  rows, columns = W.shape
  maxq = 2 ** spec.bits - 1
  groupsize = spec.group_size

  def find_params(x):
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    if spec.symmetric:
      xmax = np.maximum(np.abs(xmin), xmax)
      xmin = np.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(both, -1, xmin), np.where(both, 1, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if spec.symmetric else np.round(-xmin / scale)
    return scale, zero

  scale, zero = find_params(W)
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  if static_groups:
    groups = [find_params(W[:, i:i + groupsize]) for i in range(0, columns, groupsize)]
  if actorder:
    perm = np.argsort(-np.diag(H), kind='stable')
    W, H = W[:, perm], H[perm][:, perm]
    invperm = np.argsort(perm)
  H[np.arange(columns), np.arange(columns)] += percdamp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
  Q = np.zeros_like(W)
  loss = 0.0
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    W1, Err1, Hinv1 = W[:, i1:i2].copy(), np.zeros((rows, i2 - i1)), Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w_col, d = W1[:, i], Hinv1[i, i]
      if groupsize != -1:
        if not static_groups:
          if (i1 + i) % groupsize == 0:
            scale, zero = find_params(W[:, i1 + i:i1 + i + groupsize])
        else:
          idx = perm[i1 + i] if actorder else i1 + i
          scale, zero = groups[idx // groupsize]
      q = scale * (np.clip(np.round(w_col / scale) + zero, 0, maxq) - zero)
      Q[:, i1 + i] = q
      loss += np.sum((w_col - q) ** 2 / d ** 2) / 2
      err1 = (w_col - q) / d
      W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
      Err1[:, i] = err1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  if actorder:
    Q = Q[:, invperm]
  return Q.T, loss


@pytest.mark.parametrize('bits', [2, 3, 4])
@pytest.mark.parametrize('group_size', [32, -1])
@pytest.mark.parametrize('symmetric', [False, True])
def test_gptq_beats_rtn(bits, group_size, symmetric):
  spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
  f = _jitted(gptq_lib.gptq, spec)
  for correlated in (False, True):
    x, w, h = _problem(bits * 10 + group_size + 7 * symmetric, correlated)
    qw, info = f(w, h)
    assert bool(info.ok) and int(info.retries) == 0
    e_gptq, e_rtn = _err(x, w, dequantize(qw)), _err(x, w, rtn_dense(w, spec))
    assert e_gptq < 0.95 * e_rtn, (correlated, e_gptq, e_rtn)


# Most tests use SPEC and default statics, whose compiled GPTQ test_gptq_beats_rtn already built.
SPEC = QuantSpec(bits=3, group_size=32)


@pytest.mark.parametrize('act_order,static_groups,block_size,group_size', [
    (False, False, 128, 32),
    (False, False, 24, 32),  # groups start inside lazy batches; 24 does not divide 64 (padding)
    (True, False, 128, 32),
    (True, True, 128, 32),
    (True, False, 40, -1),
])
def test_gptq_matches_reference_port(act_order, static_groups, block_size, group_size):
  spec = QuantSpec(bits=3, group_size=group_size)
  x, w, h = _problem(11, correlated=True)
  h[np.arange(N_IN), np.arange(N_IN)] *= np.random.default_rng(0).uniform(1.0, 3.0, N_IN)
  statics = {}
  if act_order:
    statics['act_order'] = True
  if static_groups:
    statics['static_groups'] = True
  if block_size != 128:
    statics['block_size'] = block_size
  qw, info = _jitted(gptq_lib.gptq, spec, **statics)(w, h)
  ref, ref_loss = _reference_gptq(w, h, spec, block_size, 0.01, act_order, static_groups)
  # float32 vs float64: a rare rounding decision may flip, nothing more.
  mismatch = np.mean(np.abs(np.asarray(dequantize(qw)) - ref) > 1e-4 * np.abs(w).max())
  assert mismatch < 0.01, mismatch
  np.testing.assert_allclose(float(info.loss), ref_loss, rtol=1e-3)


@pytest.mark.parametrize('act_order', [False, True])
def test_loss_equals_damped_hessian_error(act_order):
  # The packed codes, scales and g_idx reproduce exactly the weights the error feedback used.
  x, w, h = _problem(3, correlated=True)
  qw, info = _jitted(gptq_lib.gptq, SPEC, act_order=act_order)(w, h)
  hd = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(N_IN)
  d = np.asarray(w, np.float64) - np.asarray(dequantize(qw), np.float64)
  np.testing.assert_allclose(float(info.loss), 0.5 * np.trace(d.T @ hd @ d), rtol=1e-3)


def test_act_order_g_idx_and_dequantize_consistency():
  x, w, _ = _problem(5, correlated=True)
  x[:, ::3] *= 4.0  # make diag(H) far from sorted
  h = (x.T @ x).astype(np.float32)
  qw, info = _jitted(gptq_lib.gptq, SPEC, act_order=True)(w, h)
  dense, _ = _jitted(gptq_lib.gptq_dense, SPEC, act_order=True)(w, h)
  np.testing.assert_array_equal(np.asarray(dequantize(qw)), np.asarray(dense))
  g_idx = np.asarray(qw.g_idx)
  assert g_idx.shape == (N_IN,) and g_idx.dtype == np.int32
  assert g_idx.min() >= 0 and g_idx.max() < SPEC.num_groups(N_IN)
  np.testing.assert_array_equal(np.bincount(g_idx, minlength=2), [32, 32])
  assert not np.array_equal(g_idx, np.arange(N_IN) // 32)
  diag = np.diag(h)
  assert diag[g_idx == 0].min() >= diag[g_idx == 1].max()  # groups follow decreasing diag(H)
  assert _err(x, w, dense) < _err(x, w, rtn_dense(w, SPEC))


@pytest.mark.parametrize('act_order', [False, True])
def test_static_groups_use_grids_of_the_original_weight(act_order):
  x, w, h = _problem(6, correlated=True)
  qw, _ = _jitted(gptq_lib.gptq, SPEC, act_order=act_order, static_groups=True)(w, h)
  assert qw.g_idx is None  # groups stay consecutive input rows
  scales, zeros = group_qparams(jnp.asarray(w), SPEC)
  np.testing.assert_allclose(np.asarray(qw.scales), np.asarray(scales), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(qw.zeros), np.asarray(zeros).astype(np.uint8))
  assert _err(x, w, dequantize(qw)) < _err(x, w, rtn_dense(w, SPEC))


def test_failing_cholesky_retries_with_more_damping():
  w = np.random.default_rng(7).standard_normal((N_IN, N_OUT)).astype(np.float32)
  h = np.zeros((N_IN, N_IN), np.float32)
  h[0, 1] = h[1, 0] = 3.0  # all inputs dead -> H = I + this entry: indefinite (eigenvalue -2)
  f = _jitted(gptq_lib.gptq, SPEC, damp=0.0)
  qw, info = f(w, h)
  # damp 0 -> 0.01 -> 0.1 -> 1 all fail (need damp > 2 x mean(diag(H)) = 2); 10 succeeds.
  assert bool(info.ok) and int(info.retries) == 4
  assert float(info.damp) == pytest.approx(10.0, rel=1e-5)
  assert np.all(np.isfinite(np.asarray(dequantize(qw))))
  # Real data made indefinite: damp 0 fails, the retries recover.
  x, w, h = _problem(8, correlated=True)
  h = h - 1.05 * np.linalg.eigvalsh(h.astype(np.float64)).min() * np.eye(N_IN, dtype=np.float32)
  h[np.arange(N_IN), np.arange(N_IN)] -= 0.1 * np.diag(h).mean()
  assert np.linalg.eigvalsh(h.astype(np.float64)).min() < 0
  qw, info = f(w, h)
  assert bool(info.ok) and int(info.retries) >= 1
  assert np.all(np.isfinite(np.asarray(dequantize(qw))))
  # Beyond repair within max_damp_retries (needs damp > 1e6): under jit reported, not raised.
  h = np.zeros((N_IN, N_IN), np.float32)
  h[0, 1] = h[1, 0] = 1e6
  qw, info = f(w, h)
  assert not bool(info.ok) and int(info.retries) == 5


@pytest.mark.parametrize('act_order', [False, True])
def test_mask_keeps_pruned_weights_exactly_zero(act_order):
  x, w, h = _problem(9, correlated=True)
  mask = np.random.default_rng(9).uniform(size=w.shape) < 0.5
  qw, info = _jitted(gptq_lib.gptq, SPEC, act_order=act_order)(w, h, mask=mask)
  dense = np.asarray(dequantize(qw))
  assert np.all(dense[~mask] == 0.0)
  assert np.count_nonzero(dense[mask]) > 0.7 * mask.sum()
  # Error feedback compensates for the pruning: better than quantizing the masked weight with RTN.
  w_masked = np.where(mask, w, 0)
  rtn_masked = np.where(mask, np.asarray(rtn_dense(w_masked, SPEC)), 0)
  assert _err(x, w, dense) < _err(x, w, rtn_masked)
  # Already-pruned input: same zeros; the dense input's pruned values were compensated for.
  qw_pre, _ = _jitted(gptq_lib.gptq, SPEC, act_order=act_order)(w_masked, h, mask=mask)
  dense_pre = np.asarray(dequantize(qw_pre))
  assert np.all(dense_pre[~mask] == 0.0)
  assert _err(x, w, dense) < _err(x, w, dense_pre)


def test_dead_inputs_are_zeroed_and_finite():
  x, w, _ = _problem(10, correlated=False)
  x[:, [3, 40]] = 0.0
  h = (x.T @ x).astype(np.float32)
  qw, info = _jitted(gptq_lib.gptq, SPEC)(w, h)
  dense = np.asarray(dequantize(qw))
  assert bool(info.ok) and int(info.retries) == 0 and np.all(np.isfinite(dense))
  assert np.all(dense[[3, 40]] == 0.0)
  assert _err(x, w, dense) < _err(x, w, rtn_dense(w, SPEC))


def test_eager_matches_jit_and_raises_on_failure():
  x, w, h = _problem(12, correlated=True)
  q_jit, info_jit = _jitted(gptq_lib.gptq, SPEC)(w, h)
  q_eager, info_eager = gptq_lib.gptq(w, h, SPEC)
  np.testing.assert_allclose(np.asarray(dequantize(q_jit)), np.asarray(dequantize(q_eager)),
                             atol=1e-6)
  np.testing.assert_allclose(float(info_jit.loss), float(info_eager.loss), rtol=1e-4)
  bad = np.eye(N_IN, dtype=np.float32)
  bad[0, 1] = bad[1, 0] = 3.0  # needs damp > 2 x mean(diag); one retry (0 -> 0.01) is not enough
  with pytest.raises(ValueError, match='Cholesky'):
    gptq_lib.gptq(w, bad, SPEC, damp=0.0, max_damp_retries=1)


def test_output_structure():
  _, w, h = _problem(12, correlated=True)
  out = jax.eval_shape(functools.partial(gptq_lib.gptq, spec=SPEC), w, h)
  qw_shape, info_shape = jax.tree.map(lambda a: (a.shape, a.dtype), out)
  assert qw_shape.qweight == (((N_IN // 32) * 3, N_OUT), jnp.int32), qw_shape
  assert qw_shape.scales == ((2, N_OUT), jnp.float32)
  assert qw_shape.zeros == ((2, N_OUT), jnp.uint8)
  assert qw_shape.g_idx is None
  assert info_shape.retries == ((), jnp.int32) and info_shape.ok == ((), jnp.bool_)


def test_inverse_factor():
  rng = np.random.default_rng(13)
  a = rng.standard_normal((300, 200))
  h = jnp.asarray(a.T @ a, jnp.float32)
  U, damp, retries, ok = jax.jit(gptq_lib.damped_inverse_cholesky)(h)
  hd = np.asarray(h, np.float64) + 0.01 * np.mean(np.diag(np.asarray(h))) * np.eye(200)
  ref = np.linalg.cholesky(np.linalg.inv(hd)).T
  assert bool(ok) and int(retries) == 0 and float(damp) == pytest.approx(0.01)
  np.testing.assert_allclose(np.asarray(U), ref, atol=1e-4 * np.abs(ref).max())


def test_bad_arguments_raise():
  w = np.zeros((N_IN, N_OUT), np.float32)
  with pytest.raises(ValueError, match='hessian'):
    gptq_lib.gptq(w, np.eye(N_IN - 1, dtype=np.float32), QuantSpec(bits=4, group_size=16))
  with pytest.raises(ValueError, match='mask'):
    gptq_lib.gptq(w, np.eye(N_IN, dtype=np.float32), QuantSpec(bits=4, group_size=16),
                  mask=np.ones((N_IN, N_OUT + 1), bool))
