"""Tests for recover/lowrank.py: optimality and consistency properties, float64 numpy references."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import quantize as quantize_lib
from kernels import formats, reference
from kernels.formats import QuantizedWeight, QuantSpec
from recover import lowrank

N_IN, N_OUT, N_TOK = 64, 48, 512


def _inputs(n_tok=N_TOK, n_in=N_IN, seed=0, feature_scale=None):
  """Correlated inputs X = Z @ L [n_tok, in] (float32), optionally with per-feature scales."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n_tok, n_in))
  # Mixing L = U diag(s) V^T with singular values spread over e^-1.5 .. e^1.5: anisotropic and
  # correlated, yet well conditioned (cond(H) ~ 400).
  u, _ = np.linalg.qr(rng.standard_normal((n_in, n_in)))
  v, _ = np.linalg.qr(rng.standard_normal((n_in, n_in)))
  x = z @ ((u * np.exp(np.linspace(-1.5, 1.5, n_in))) @ v.T)
  if feature_scale is not None:
    x = x * feature_scale[None, :]
  return x.astype(np.float32)


def _hessian(x):
  return (x.T @ x).astype(np.float32)


_rtn3_dense = jax.jit(functools.partial(quantize_lib.rtn_dense,
                                        spec=QuantSpec(bits=3, group_size=16)))
_to_dense = jax.jit(formats.to_dense)


def _error_problem(seed=0, n_in=N_IN, n_out=N_OUT):
  """A weight and its 3-bit RTN error dW (float32)."""
  rng = np.random.default_rng(100 + seed)
  w = rng.standard_normal((n_in, n_out)).astype(np.float32)
  w_hat = np.asarray(_rtn3_dense(jnp.asarray(w)))
  return w, (w - w_hat).astype(np.float32)


def _x_err(x, d, lr=None):
  """||X (d - a b)||_F in float64."""
  x = np.asarray(x, np.float64)
  d = np.asarray(d, np.float64)
  if lr is not None:
    d = d - np.asarray(lr.a, np.float64) @ np.asarray(lr.b, np.float64)
  return float(np.linalg.norm(x @ d))


def _closed_form_min(x, d, rank):
  """min over rank-r C of ||X d - X C||_F: the tail singular values of X d (any rank-r matrix in
  col(X) is X C with rank(C) <= r)."""
  s = np.linalg.svd(np.asarray(x, np.float64) @ np.asarray(d, np.float64), compute_uv=False)
  return float(np.sqrt(np.sum(s[rank:] ** 2)))


def _rtn_fn(spec):
  """A jitted RTN ``quantize_fn`` for SRR: R -> (QuantizedWeight, dense R_hat)."""
  def fn(r):
    return quantize_lib.rtn(r, spec), quantize_lib.rtn_dense(r, spec)
  return jax.jit(fn)


# ---------------------------------------------------------------------------------------------
# SVD / EoRA.


def test_svd_compensate_is_truncated_svd():
  _, d = _error_problem()
  lr = lowrank.svd_compensate(jnp.asarray(d), 10)
  assert lr.a.shape == (N_IN, 10) and lr.b.shape == (10, N_OUT)
  assert lr.a.dtype == jnp.float32
  u, s, vt = np.linalg.svd(d.astype(np.float64), full_matrices=False)
  ref = (u[:, :10] * s[:10]) @ vt[:10]
  np.testing.assert_allclose(np.asarray(lr.a) @ np.asarray(lr.b), ref, atol=1e-5)
  # sqrt(S) split: both factors have the same column/row norms sqrt(s).
  np.testing.assert_allclose(np.linalg.norm(lr.a, axis=0), np.sqrt(s[:10]), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(lr.b, axis=1), np.sqrt(s[:10]), rtol=1e-5)


@pytest.mark.parametrize('rank', [1, 8, 24])
def test_eora_is_optimal(rank):
  x = _inputs()
  h = _hessian(x)
  _, d = _error_problem()
  lr = lowrank.eora(jnp.asarray(d), jnp.asarray(h), rank, num_tokens=N_TOK, name='blk/q')
  assert not np.any(np.isnan(np.asarray(lr.a)))
  err = _x_err(x, d, lr)
  best = _closed_form_min(x, d, rank)
  assert err == pytest.approx(best, rel=1e-4)
  assert err <= _x_err(x, d, lowrank.svd_compensate(jnp.asarray(d), rank)) * (1 + 1e-6)
  rng = np.random.default_rng(rank)
  for _ in range(20):
    a = rng.standard_normal((N_IN, rank)) * 0.1
    b = rng.standard_normal((rank, N_OUT)) * 0.1
    assert err <= _x_err(x, d, formats.LowRank(a=a, b=b))
  # Strictly better than plain SVD on correlated inputs (the weighting matters).
  assert err < 0.99 * _x_err(x, d, lowrank.svd_compensate(jnp.asarray(d), rank))


def test_eora_from_shared_basis_matches_eora():
  x = _inputs()
  h = jnp.asarray(_hessian(x))
  basis = lowrank.eigen_basis(h, name='blk/qkv')
  assert basis.num_clamped == 0 and basis.in_features == N_IN
  for seed in range(2):
    _, d = _error_problem(seed)
    direct = lowrank.eora(jnp.asarray(d), h, 6)
    shared = lowrank.eora_from_basis(jnp.asarray(d), basis, 6, 'blk/k')
    np.testing.assert_allclose(np.asarray(direct.a) @ np.asarray(direct.b),
                               np.asarray(shared.a) @ np.asarray(shared.b), atol=1e-6)
  # num_tokens only rescales H: same product.
  _, d = _error_problem()
  p1 = lowrank.eora(jnp.asarray(d), h, 6)
  p2 = lowrank.eora(jnp.asarray(d), h, 6, num_tokens=N_TOK)
  np.testing.assert_allclose(np.asarray(p1.a) @ np.asarray(p1.b),
                             np.asarray(p2.a) @ np.asarray(p2.b), atol=1e-5)


def test_eora_error_non_increasing_and_exact_at_full_rank():
  x = _inputs()
  h = jnp.asarray(_hessian(x))
  _, d = _error_problem()
  basis = lowrank.eigen_basis(h)
  errs = [_x_err(x, d, lowrank.eora_from_basis(jnp.asarray(d), basis, r))
          for r in range(0, N_OUT + 1, 4)]
  assert errs[0] == pytest.approx(_x_err(x, d), rel=1e-6)  # rank 0: no correction
  for prev, nxt in zip(errs, errs[1:]):
    assert nxt <= prev * (1 + 1e-6)
  assert errs[-1] / errs[0] < 1e-5  # r = min(in, out), full-rank H: ~0


def test_eora_identity_hessian_equals_svd():
  _, d = _error_problem()
  e = lowrank.eora(jnp.asarray(d), jnp.eye(N_IN, dtype=jnp.float32), 7)
  s = lowrank.svd_compensate(jnp.asarray(d), 7)
  np.testing.assert_allclose(np.asarray(e.a) @ np.asarray(e.b),
                             np.asarray(s.a) @ np.asarray(s.b), atol=1e-5)


def test_eora_rank_deficient_hessian():
  n_tok = 24  # fewer tokens than the 64 input features
  x = _inputs(n_tok=n_tok)
  h = _hessian(x)
  _, d = _error_problem()
  with pytest.warns(UserWarning, match='layers_3/mlp/down_proj') as record:
    lr = lowrank.eora(jnp.asarray(d), jnp.asarray(h), 8, num_tokens=n_tok,
                      name='layers_3/mlp/down_proj')
  assert any('(24 tokens) is too little' in str(r.message) for r in record)
  # Enough tokens, but inputs confined to fewer directions: the hint names the cause instead.
  with pytest.warns(UserWarning, match='fewer directions than features'):
    lowrank.eora(jnp.asarray(d), jnp.asarray(h), 8, num_tokens=10 * N_IN, name='x')
  a, b = np.asarray(lr.a), np.asarray(lr.b)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  err = _x_err(x, d, lr)
  assert err == pytest.approx(_closed_form_min(x, d, 8), rel=1e-4)
  # The null space of X gets nothing: a stays in the row space of X.
  null = np.linalg.svd(x.astype(np.float64))[2][n_tok:]  # [in - n, in]
  assert np.linalg.norm(null @ a) < 1e-4 * np.linalg.norm(a)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    basis = lowrank.eigen_basis(jnp.asarray(h), name='x')
  assert basis.num_clamped == N_IN - n_tok and len(rec) == 1
  # A zero Hessian (no tokens) gives a zero, finite correction.
  with pytest.warns(UserWarning):
    z = lowrank.eora(jnp.asarray(d), jnp.zeros((N_IN, N_IN)), 4, name='empty')
  assert np.all(np.asarray(z.a) == 0) and np.all(np.isfinite(np.asarray(z.b)))


def test_full_rank_hessian_gives_no_warning():
  h = jnp.asarray(_hessian(_inputs()))
  _, d = _error_problem()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    lowrank.eora(jnp.asarray(d), h, 4, name='ok')


def test_bad_inputs_raise():
  _, d = _error_problem()
  h = jnp.eye(N_IN)
  with pytest.raises(ValueError, match='rank'):
    lowrank.eora(jnp.asarray(d), h, N_OUT + 1)
  with pytest.raises(ValueError, match='rank'):
    lowrank.svd_compensate(jnp.asarray(d), -1)
  with pytest.raises(ValueError, match='input features'):
    lowrank.eora(jnp.asarray(d), jnp.eye(N_IN + 1), 2, name='L')
  with pytest.raises(ValueError, match='square'):
    lowrank.eora(jnp.asarray(d), jnp.ones((N_IN, 3)), 2)
  with pytest.raises(ValueError, match='scaling'):
    lowrank.srr(jnp.asarray(d), h, 4, _rtn_fn(QuantSpec(bits=4, group_size=16)), scaling='x')
  with pytest.raises(ValueError, match='k must be'):
    lowrank.srr(jnp.asarray(d), h, 4, _rtn_fn(QuantSpec(bits=4, group_size=16)), k=5)


# ---------------------------------------------------------------------------------------------
# ACT-S.


def test_act_scaled_between_svd_and_eora():
  scales = np.exp(np.linspace(-2.0, 2.0, N_IN))  # strongly varying feature norms
  x = _inputs(feature_scale=scales, seed=3)
  h = jnp.asarray(_hessian(x))
  _, d = _error_problem(3)
  r = 8
  e = _x_err(x, d, lowrank.eora(jnp.asarray(d), h, r))
  act = _x_err(x, d, lowrank.act_scaled_svd(jnp.asarray(d), h, r, num_tokens=N_TOK))
  svd = _x_err(x, d, lowrank.svd_compensate(jnp.asarray(d), r))
  assert e <= act * (1 + 1e-6)
  assert act < svd  # the diagonal scaling matters here


def test_act_scaled_equals_eora_for_diagonal_hessian():
  diag = np.exp(np.linspace(-1.0, 1.5, N_IN)).astype(np.float32)
  h = jnp.asarray(np.diag(diag))
  _, d = _error_problem()
  e = lowrank.eora(jnp.asarray(d), h, 9)
  act = lowrank.act_scaled_svd(jnp.asarray(d), h, 9)
  np.testing.assert_allclose(np.asarray(e.a) @ np.asarray(e.b),
                             np.asarray(act.a) @ np.asarray(act.b), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SRR.


def _srr_problem():
  x = _inputs(seed=5)
  h = jnp.asarray(_hessian(x))
  rng = np.random.default_rng(7)
  # A weight with a few dominant directions, as SRR assumes.
  w = (rng.standard_normal((N_IN, 4)) @ rng.standard_normal((4, N_OUT)) * 2.0
       + rng.standard_normal((N_IN, N_OUT)) * 0.3).astype(np.float32)
  return x, h, w


def test_srr_k0_equals_quantize_then_eora():
  x, h, w = _srr_problem()
  qfn = _rtn_fn(QuantSpec(bits=3, group_size=16))
  compressed, adapter, info = lowrank.srr(jnp.asarray(w), h, 8, qfn, k=0, name='blk/o')
  assert info['k'] == 0
  ref_q, ref_dense = qfn(jnp.asarray(w))
  ref = lowrank.eora(jnp.asarray(w) - ref_dense, h, 8)
  np.testing.assert_array_equal(np.asarray(compressed.qweight), np.asarray(ref_q.qweight))
  np.testing.assert_allclose(np.asarray(adapter.a) @ np.asarray(adapter.b),
                             np.asarray(ref.a) @ np.asarray(ref.b), atol=1e-6)


@pytest.mark.parametrize('scaling', ['exact', 'diag'])
def test_srr_k_rule_and_preserved_part(scaling):
  x, h, w = _srr_problem()
  r = 8
  qfn = _rtn_fn(QuantSpec(bits=3, group_size=16))
  _, adapter, info = lowrank.srr(jnp.asarray(w), h, r, qfn, scaling=scaling)
  # Independent float64 reference of S W.
  h64 = np.asarray(h, np.float64)
  if scaling == 'exact':
    lam, q = np.linalg.eigh(h64)
    s = (q * np.sqrt(lam)) @ q.T
    s_inv = (q / np.sqrt(lam)) @ q.T
  else:
    s = np.diag(np.sqrt(np.diag(h64)))
    s_inv = np.diag(1.0 / np.sqrt(np.diag(h64)))
  u, sig, vt = np.linalg.svd(s @ w.astype(np.float64), full_matrices=False)
  k = int(np.floor(r * np.sum(sig[:r] ** 2) / np.sum(sig ** 2)))
  assert info['k'] == k and 0 < k < r
  assert adapter.a.shape == (N_IN, r) and adapter.b.shape == (r, N_OUT)
  preserved = s_inv @ (u[:, :k] * sig[:k]) @ vt[:k]
  np.testing.assert_allclose(np.asarray(adapter.a[:, :k]) @ np.asarray(adapter.b[:k]), preserved,
                             atol=1e-4 * np.abs(preserved).max())


def test_srr_search_beats_quantize_then_eora():
  x, h, w = _srr_problem()
  r = 8
  qfn = _rtn_fn(QuantSpec(bits=3, group_size=16))
  compressed, adapter, info = lowrank.srr_search_k(jnp.asarray(w), h, r, qfn, ks=[0, 2, 4, 6, 8])
  assert set(info['errors']) == {0, 2, 4, 6, 8}
  assert info['errors'][info['k']] == min(info['errors'].values())
  total = np.asarray(_to_dense(compressed), np.float64) + (
      np.asarray(adapter.a, np.float64) @ np.asarray(adapter.b, np.float64))
  err = float(np.linalg.norm(x.astype(np.float64) @ (w - total)))
  assert err == pytest.approx(info['errors'][info['k']], rel=1e-4)
  # Baseline: quantize W, then EoRA at the full rank.
  _, w_hat = qfn(jnp.asarray(w))
  base = _x_err(x, w - np.asarray(w_hat), lowrank.eora(jnp.asarray(w) - w_hat, h, r))
  assert info['errors'][0] == pytest.approx(base, rel=1e-4)
  assert err <= base * (1 + 1e-5)
  assert info['k'] > 0 and err < base  # preserving dominant directions helps here


def test_srr_candidates_cut_to_any_rank_are_srr_at_that_rank():
  """A candidate computed at the largest rank, cut to rank r, is SRR at rank r with its k (the same
  residual codes, the same product); its error curve is the output error it leaves at each rank."""
  x, h, w = _srr_problem()
  qfn = _rtn_fn(QuantSpec(bits=3, group_size=16))
  cands = lowrank.srr_candidates(jnp.asarray(w), h, 16, qfn, rank=8, num_tokens=N_TOK,
                                 name='blk/o')
  ks = [c.k for c in cands]
  assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == 8 and {2, 4, 6} <= set(ks)
  x64 = x.astype(np.float64)
  for cand in cands:
    assert cand.adapter.rank == 16 and cand.adapter.preserved == cand.k
    assert len(cand.gains) == 16 - cand.k and np.all(np.diff(cand.gains) <= 1e-12)
    for r in sorted({cand.k, 8, 16}):
      q, ad, _ = lowrank.srr(jnp.asarray(w), h, r, qfn, k=cand.k, num_tokens=N_TOK)
      np.testing.assert_array_equal(np.asarray(q.qweight), np.asarray(cand.compressed.qweight))
      cut = np.asarray(cand.adapter.a[:, :r], np.float64) @ np.asarray(cand.adapter.b[:r],
                                                                        np.float64)
      np.testing.assert_allclose(cut, np.asarray(ad.a, np.float64) @ np.asarray(ad.b, np.float64),
                                 atol=1e-5 * max(np.abs(cut).max(), 1.0))
      total = np.asarray(_to_dense(cand.compressed), np.float64) + cut
      err = np.sum((x64 @ (w - total)) ** 2) / N_TOK
      assert cand.error(r) == pytest.approx(err, rel=1e-4)
  with pytest.raises(ValueError, match='outside'):
    cands[-1].error(4)  # below its preserved k


# ---------------------------------------------------------------------------------------------
# Adapter quantization.


@pytest.mark.parametrize('rank,group_size', [(8, 16), (32, 16)])
def test_quantize_adapter(rank, group_size):
  x = _inputs()
  _, d = _error_problem()
  lr = lowrank.eora(jnp.asarray(d), jnp.asarray(_hessian(x)), rank)
  q = jax.jit(functools.partial(lowrank.quantize_adapter, bits=4, group_size=group_size))(lr)
  assert isinstance(q.a, QuantizedWeight) and isinstance(q.b, QuantizedWeight)
  assert q.a.group_size == group_size
  assert q.b.group_size == (group_size if rank % group_size == 0 else -1)
  for fq, f in ((q.a, lr.a), (q.b, lr.b)):
    deq = np.asarray(_to_dense(fq))
    scale = np.asarray(fq.scales)[np.asarray(fq.group_index())]
    assert np.all(np.abs(deq - np.asarray(f)) <= scale / 2 + 1e-6)
  exact = np.asarray(lr.a) @ np.asarray(lr.b)
  approx = np.asarray(_to_dense(q.a)) @ np.asarray(_to_dense(q.b))
  assert np.linalg.norm(approx - exact) < 0.15 * np.linalg.norm(exact)
  # Usable by the reference linear.
  w_hat = jnp.zeros((N_IN, N_OUT))
  y = jax.jit(reference.linear)(jnp.asarray(x[:4]),
                                formats.CompressedLinear(weight=w_hat, adapter=q))
  np.testing.assert_allclose(np.asarray(y), x[:4] @ approx, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Robust EoRA: covariance shrinkage.


@pytest.mark.parametrize('lam', [0.05, 1.0])
def test_shrunk_eora_is_the_closed_form_optimum_of_the_shrunk_objective(lam):
  """``shrink = lambda`` minimises ||X E||^2 + lambda tr(H)/d ||E||^2 over rank-r corrections: the
  plain EoRA optimum of the inputs X stacked over sqrt(lambda tr(H)/d) I."""
  x = _inputs()
  h = _hessian(x)
  _, d = _error_problem()
  rank = 8
  lr = lowrank.eora(jnp.asarray(d), jnp.asarray(h), rank, shrink=lam)
  c = lam * np.trace(h.astype(np.float64)) / N_IN
  x_aug = np.concatenate([x.astype(np.float64), np.sqrt(c) * np.eye(N_IN)], axis=0)
  assert _x_err(x_aug, d, lr) == pytest.approx(_closed_form_min(x_aug, d, rank), rel=1e-6)
  # ... which is worse than EoRA on X alone, better than EoRA on the identity part alone.
  eora = lowrank.eora(jnp.asarray(d), jnp.asarray(h), rank)
  assert _x_err(x, d, lr) >= _x_err(x, d, eora) * (1 - 1e-9)
  assert np.linalg.norm(d - np.asarray(lr.a) @ np.asarray(lr.b)) <= np.linalg.norm(
      d - np.asarray(eora.a) @ np.asarray(eora.b)) * (1 + 1e-9)


def test_shrink_zero_is_eora_and_large_shrink_is_svd():
  x = _inputs()
  h = _hessian(x)
  _, d = _error_problem()
  prod = lambda lr: np.asarray(lr.a, np.float64) @ np.asarray(lr.b, np.float64)
  np.testing.assert_array_equal(prod(lowrank.eora(jnp.asarray(d), jnp.asarray(h), 8, shrink=0.0)),
                                prod(lowrank.eora(jnp.asarray(d), jnp.asarray(h), 8)))
  np.testing.assert_allclose(prod(lowrank.eora(jnp.asarray(d), jnp.asarray(h), 8, shrink=1e7)),
                             prod(lowrank.svd_compensate(jnp.asarray(d), 8)), atol=1e-4)
  # shrinkage removes the clamping of a rank-deficient H: every direction gets the floor
  basis = lowrank.eigen_basis(jnp.asarray(_hessian(_inputs(n_tok=16))), shrink=0.1)
  assert basis.num_clamped == 0


def test_shrunk_basis_equals_a_new_decomposition():
  h = jnp.asarray(_hessian(_inputs()))
  direct = lowrank.eigen_basis(h, num_tokens=N_TOK, shrink=0.3)
  again = lowrank.shrunk_basis(lowrank.eigen_basis(h, num_tokens=N_TOK), 0.3)
  np.testing.assert_array_equal(np.asarray(direct.sqrt_l), np.asarray(again.sqrt_l))
  np.testing.assert_array_equal(np.asarray(direct.inv_sqrt_l), np.asarray(again.inv_sqrt_l))


def test_choose_shrink_picks_the_held_out_minimum():
  x = _inputs()
  _, d = _error_problem()
  grid = [0.0, 0.01, 0.1, 1.0, 10.0]
  fit = lowrank.eigen_basis(jnp.asarray(_hessian(x)))
  # Held out = the fitting data: EoRA itself (lambda = 0) is the optimum (Eckart-Young).
  lam, errs = lowrank.choose_shrink(jnp.asarray(d), fit, jnp.asarray(_hessian(x)), 8, grid)
  assert lam == 0.0 and errs[0] == min(errs) and len(errs) == len(grid)
  # Held out = isotropic inputs (another "domain"): plain SVD's metric, so the largest value wins.
  lam, errs = lowrank.choose_shrink(jnp.asarray(d), fit, jnp.eye(N_IN), 8, grid)
  assert lam == 10.0 and errs == sorted(errs, reverse=True)


def test_bad_shrink_is_refused():
  h = jnp.asarray(_hessian(_inputs()))
  for bad in (-0.1, float('nan'), float('inf'), 'big'):
    with pytest.raises(ValueError, match='shrink'):
      lowrank.eigen_basis(h, shrink=bad)
