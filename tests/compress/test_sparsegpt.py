"""Tests for compress/sparsegpt.py: agreement with the reference, sparsity patterns, layer error."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import prune, quantize
from compress.prune import PruneSpec
from compress.sparsegpt import inverse_hessian_factor, sparsegpt, sparsegpt_quant
from kernels import formats
from kernels.formats import QuantSpec


def _jit_sparsegpt(spec, block_size=128, quant=None):
  """``sparsegpt`` jitted with its statics bound; one jitted function per static configuration."""
  return _jit_sparsegpt_cached(spec, block_size, quant)


@functools.lru_cache(maxsize=None)
def _jit_sparsegpt_cached(spec, block_size, quant):
  return jax.jit(functools.partial(sparsegpt, spec=spec, block_size=block_size, quant=quant))


@functools.lru_cache(maxsize=None)
def _jit_sparsegpt_quant(spec, quant, block_size=128):
  return jax.jit(functools.partial(sparsegpt_quant, spec=spec, quant=quant, block_size=block_size))


def _correlated_inputs(n_tokens, n_in, seed):
  """X = Z @ L with a random mixing L and a spread of per-feature scales."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n_tokens, n_in))
  mix = rng.standard_normal((n_in, n_in)) / np.sqrt(n_in)
  scales = np.exp(rng.uniform(-1.5, 1.5, n_in))
  return ((z @ mix) * scales).astype(np.float32)


def _problem(n_in, n_out, n_tokens=1024, seed=0):
  """Correlated calibration inputs x [n_tokens, n_in], a weight [n_in, n_out], H = x^T x."""
  x = _correlated_inputs(n_tokens, n_in, seed)
  w = np.random.default_rng(seed + 100).standard_normal((n_in, n_out)).astype(np.float32)
  return x, w, x.T @ x


def _layer_error(x, w, w_hat):
  return float(np.linalg.norm(x.astype(np.float64) @ (w - np.asarray(w_hat, np.float64))))


def _assert_nm(mask, n, m):
  mask = np.asarray(mask)
  kept = mask.reshape(mask.shape[0] // m, m, mask.shape[1]).sum(axis=1)
  assert (kept == n).all(), np.unique(kept)


# ------------------------------------------------------------------- float64 reference port


def _ref_qparams(w, bits):
  """GPTQ quant.py find_params (asymmetric), reducing over axis 1 of w [rows, k]."""
  maxq = 2 ** bits - 1
  xmin = np.minimum(w.min(axis=1), 0)
  xmax = np.maximum(w.max(axis=1), 0)
  both = (xmin == 0) & (xmax == 0)
  xmin, xmax = np.where(both, -1, xmin), np.where(both, 1, xmax)
  scale = (xmax - xmin) / maxq
  return scale, np.round(-xmin / scale)


def _ref_quantize(w, scale, zero, bits):
  q = np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)
  return scale * (q - zero)


def _reference_fasterprune(W, H, sparsity, n, m, blocksize, percdamp, quant=None):
  """IST-DASLab sparsegpt.py ``fasterprune`` line by line, in float64, paper layout [rows, cols].

  Differences from the original (the library's documented choices): the unstructured block mask
  is chosen per row (``int(i2 * s) - int(i1 * s)`` lowest scores by a stable sort) instead of one
  threshold over the block; N:M keeps ``n`` of ``m``; with groups, the quantizer is refreshed at
  each group start (before that column's N:M choice) from the current weights with the already
  chosen pruned ones zeroed.
  """
  W = W.astype(np.float64).copy()
  H = H.astype(np.float64).copy()
  rows, columns = W.shape
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  damp = percdamp * np.mean(np.diag(H))
  H[np.arange(columns), np.arange(columns)] += damp
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # torch.linalg.cholesky(H^-1, upper=True)
  mask = np.zeros((rows, columns), bool)  # True = pruned, as the reference's mask1
  glen = None if quant is None else (columns if quant.group_size == -1 else quant.group_size)
  scale = zero = None
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1
    W1 = W[:, i1:i2].copy()
    Q1 = np.zeros_like(W1)
    Err1 = np.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    mask1 = np.zeros_like(W1, dtype=bool)
    if m == 0:
      tmp = W1 ** 2 / (np.diag(Hinv1).reshape((1, -1))) ** 2
      k = int(i2 * sparsity) - int(i1 * sparsity)
      np.put_along_axis(mask1, np.argsort(tmp, axis=1, kind='stable')[:, :k], True, axis=1)
    for i in range(count):
      w = W1[:, i]
      d = Hinv1[i, i]
      if quant is not None and (i1 + i) % glen == 0:
        g_end = min(i1 + i + glen, columns)
        own = np.where(mask1[:, i:min(g_end, i2) - i1], 0, W1[:, i:min(g_end, i2) - i1])
        scale, zero = _ref_qparams(np.concatenate([own, W[:, i2:g_end]], axis=1), quant.bits)
      if m != 0 and i % m == 0:
        tmp = W1[:, i:(i + m)] ** 2 / (np.diag(Hinv1)[i:(i + m)].reshape((1, -1))) ** 2
        np.put_along_axis(mask1[:, i:(i + m)], np.argsort(tmp, axis=1, kind='stable')[:, :m - n],
                          True, axis=1)
      q = w.copy()
      q[mask1[:, i]] = 0
      if quant is not None:
        q = _ref_quantize(q, scale, zero, quant.bits)
      Q1[:, i] = q
      err1 = (w - q) / d
      W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
      Err1[:, i] = err1
    W[:, i1:i2] = Q1
    mask[:, i1:i2] = mask1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return W, mask


# Problems and static configurations repeat on purpose across tests: each jitted configuration
# compiles once per shape (see _jit_sparsegpt).
_SMALL = dict(n_in=96, n_out=16, n_tokens=512, seed=3)
_LARGE = dict(n_in=256, n_out=128, n_tokens=2048, seed=0)

_REF_CASES = [
    ('0.7', 40, None, _SMALL),  # 40 * 0.7 is no integer (counts telescope); in = 96 padded to 120
    ('0.5', 128, None, _LARGE),
    ('2:4', 128, None, _LARGE),
    ('4:8', 24, None, _SMALL),  # 24 = one sub-block of 16 + a remainder of 8
    ('1:4', 8, None, _SMALL),   # a block smaller than a sub-block
    ('2:4', 40, QuantSpec(bits=3, group_size=48), _SMALL),  # groups start inside / straddle blocks
]


@pytest.mark.parametrize('pattern, block_size, quant, problem', _REF_CASES,
                         ids=['0.7-b40', '0.5-b128', '2:4-b128', '4:8-b24', '1:4-b8',
                              '2:4-b40-w3g48'])
def test_matches_reference_port(pattern, block_size, quant, problem):
  _, w, h = _problem(**problem)
  n_in = problem['n_in']
  spec = PruneSpec.parse(pattern)
  w_hat, mask = _jit_sparsegpt(spec, block_size, quant)(w, h)
  ref_w, ref_pruned = _reference_fasterprune(w.T, h, spec.sparsity, spec.n, spec.m, block_size,
                                             0.01, quant)
  np.testing.assert_array_equal(np.asarray(mask), ~ref_pruned.T)
  np.testing.assert_allclose(w_hat, ref_w.T, atol=2e-5 * np.abs(w).max())
  # Exact count per output unit for every in / block_size combination.
  assert ((~np.asarray(mask)).sum(axis=0) == spec.num_pruned(n_in)).all()
  assert (np.asarray(w_hat)[~np.asarray(mask)] == 0).all()


def test_inverse_hessian_factor_is_reference_hinv():
  _, _, h = _problem(48, 4, n_tokens=256)
  h[:, 5] = h[5, :] = 0  # a dead input
  hinv, dead = inverse_hessian_factor(h, 0.01)
  assert np.asarray(dead).tolist() == [i == 5 for i in range(48)]
  H = h.astype(np.float64)
  H[5, 5] = 1
  H += 0.01 * np.mean(np.diag(H)) * np.eye(48)
  expected = np.linalg.cholesky(np.linalg.inv(H)).T
  np.testing.assert_allclose(hinv, expected, rtol=2e-3, atol=1e-6 * np.abs(expected).max())
  assert (np.tril(np.asarray(hinv), -1) == 0).all()


# ----------------------------------------------------------------- patterns and layer error


@pytest.mark.parametrize('pattern', ['0.5', '2:4'])
@pytest.mark.parametrize('seed', [0, 1])
def test_sparsegpt_beats_wanda_beats_magnitude(pattern, seed):
  x, w, h = _problem(**{**_LARGE, 'seed': seed})
  spec = PruneSpec.parse(pattern)
  w_sgpt, m_sgpt = _jit_sparsegpt(spec)(w, h)  # in % block_size == 0
  w_wanda, m_wanda = prune.wanda(w, h, spec)
  w_mag, m_mag = prune.magnitude(w, spec)
  for mask in (m_sgpt, m_wanda, m_mag):
    if spec.is_nm:
      _assert_nm(mask, 2, 4)
    else:
      assert ((~np.asarray(mask)).sum(axis=0) == 128).all()
  assert (np.asarray(w_sgpt)[~np.asarray(m_sgpt)] == 0).all()
  assert w_sgpt.dtype == jnp.float32 and m_sgpt.dtype == jnp.bool_
  e_sgpt, e_wanda, e_mag = (_layer_error(x, w, v) for v in (w_sgpt, w_wanda, w_mag))
  assert e_sgpt < 0.95 * e_wanda < 0.95 * e_mag, (e_sgpt, e_wanda, e_mag)


@pytest.mark.parametrize('pattern, n, m, block_size, problem', [
    ('2:4', 2, 4, 128, _LARGE), ('4:8', 4, 8, 24, _SMALL)], ids=['2:4', '4:8'])
def test_nm_holds_for_all_methods(pattern, n, m, block_size, problem):
  _, w, h = _problem(**problem)
  spec = PruneSpec.parse(pattern)
  w_hat, mask = _jit_sparsegpt(spec, block_size)(w, h)
  for mk in (mask, prune.wanda_mask(w, h, spec), prune.magnitude_mask(w, spec)):
    _assert_nm(mk, n, m)
  assert (np.asarray(w_hat)[~np.asarray(mask)] == 0).all()


# ------------------------------------------------------------------------ joint quantization


def test_joint_quant_on_grid_respects_mask_and_beats_prune_then_rtn():
  x, w, h = _problem(**_LARGE)
  spec, quant = PruneSpec(sparsity=0.5), QuantSpec(bits=4, group_size=64)
  qw, mask = _jit_sparsegpt_quant(spec, quant)(w, h)
  assert isinstance(qw, formats.QuantizedWeight) and qw.shape == w.shape
  assert qw.scales.shape == (4, 128) and qw.bits == 4 and qw.group_size == 64
  w_joint = np.asarray(formats.dequantize(qw))
  mask = np.asarray(mask)
  assert ((~mask).sum(axis=0) == 128).all()

  # On the grid: every value is (code - zero) * scale of its group, with an integer code in range.
  g = np.arange(256) // 64
  scales, zeros = np.asarray(qw.scales)[g], np.asarray(qw.zeros, np.float64)[g]
  codes = w_joint.astype(np.float64) / scales + zeros
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
  assert codes.min() > -1e-3 and codes.max() < 15 + 1e-3
  assert (w_joint[~mask] == 0).all()  # pruned entries are exact zeros after packing
  assert np.unique(np.round(codes[:64, 0])).size > 4  # not a degenerate grid

  w_pruned, mask_p = _jit_sparsegpt(spec)(w, h)  # shared with the layer-error test
  w_seq = quantize.rtn_dense(w_pruned, quant)  # prune with SparseGPT, then RTN
  assert (np.asarray(w_seq)[~np.asarray(mask_p)] == 0).all()
  assert _layer_error(x, w, w_joint) < 0.97 * _layer_error(x, w, w_seq)


# ------------------------------------------------------------------------ numerics, jit, args


def test_dead_inputs_and_hessian_scale_invariance():
  _, w, h = _problem(**_SMALL)
  h[:, 7] = h[7, :] = 0  # input 7 never fires
  spec = PruneSpec(sparsity=0.7)
  w_hat, mask = _jit_sparsegpt(spec, 40)(w, h)
  assert np.isfinite(np.asarray(w_hat)).all()
  assert (np.asarray(w_hat)[7] == 0).all()
  w_hat2, mask2 = _jit_sparsegpt(spec, 40)(w, 37.0 * h)
  np.testing.assert_array_equal(mask, mask2)
  np.testing.assert_allclose(w_hat, w_hat2, atol=1e-4 * np.abs(w).max())


def test_cholesky_failure_raises_damp():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4096, 32)).astype(np.float32)
  h = x.T @ x / 4096
  h[0, 0] -= 1.03  # a small negative eigenvalue: not positive definite
  mean = np.mean(np.diag(h))
  assert not np.isfinite(np.asarray(jnp.linalg.cholesky(h + 0.01 * mean * np.eye(32)))).all()
  hinv, _ = jax.jit(inverse_hessian_factor)(h, 0.01)
  assert np.isfinite(np.asarray(hinv)).all()


def test_jit_output_structure():
  _, w, h = _problem(64, 16, n_tokens=256)
  spec, quant = PruneSpec.parse('4:8'), QuantSpec(bits=4, group_size=32)
  fn = functools.partial(sparsegpt_quant, spec=spec, quant=quant, block_size=32)
  qw, mask = jax.eval_shape(fn, w, h)
  assert (qw.qweight.shape, qw.scales.shape, qw.zeros.shape) == ((8, 16), (2, 16), (2, 16))
  assert qw.qweight.dtype == jnp.int32 and qw.zeros.dtype == jnp.uint8
  assert mask.shape == (64, 16) and mask.dtype == jnp.bool_
  w_hat, mask = jax.eval_shape(functools.partial(sparsegpt, spec=spec, block_size=32), w, h)
  assert (w_hat.shape, w_hat.dtype, mask.shape) == ((64, 16), jnp.float32, (64, 16))


def test_bad_arguments_raise():
  _, w, h = _problem(64, 16, n_tokens=256)
  with pytest.raises(ValueError, match='hessian shape'):
    sparsegpt(w, h[:32, :32], PruneSpec())
  with pytest.raises(ValueError, match='block_size=30 must be a multiple of m=8'):
    sparsegpt(w, h, PruneSpec.parse('4:8'), block_size=30)
  with pytest.raises(ValueError, match='multiple of 8'):
    sparsegpt(w[:60], h[:60, :60], PruneSpec.parse('4:8'))
  with pytest.raises(ValueError, match='does not divide'):
    sparsegpt(w, h, PruneSpec(), quant=QuantSpec(bits=4, group_size=48))
  with pytest.raises(ValueError, match='group_size=4 must be a multiple of m=8'):
    sparsegpt(w, h, PruneSpec.parse('4:8'), quant=QuantSpec(bits=4, group_size=4))
  with pytest.raises(ValueError, match='block_size must be a positive int'):
    sparsegpt(w, h, PruneSpec(), block_size=0)
