"""Group sizes that do not divide the input dimension: RTN, GPTQ and AWQ with a shorter last group.

Semantics (GPTQ's reference ``fasterquant`` and the GPTQ checkpoint format): ``ceil(in / g)``
groups, input row ``i`` in group ``i // g``, the last group ``in - (G - 1) g`` rows long with its
own scale and zero computed from those rows only. Here ``in = 80`` and ``g = 32``: groups of 32,
32 and 16 rows.

Properties: the last group's grid equals the grid of its rows alone (RTN, GPTQ static groups,
AWQ); dequantization error is bounded by half a step in every group, as with whole groups; GPTQ
matches the float64 port of the reference (whose ``W[:, i:i + groupsize]`` slices are naturally
shorter at the end) with and without act-order and static groups, and act-order's ``g_idx`` puts
the 16 least important rows in the last group; AWQ's clipping search scores the last group on its
own rows; a group size of at least ``in`` is one group.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from compress import awq as awq_lib
from compress import gptq as gptq_lib
from compress.quantize import compute_qparams, group_qparams, rtn, rtn_dense
from kernels.formats import QuantSpec, dequantize
from tests.compress.test_gptq import _err, _jitted, _problem, _reference_gptq

N_IN, N_OUT, N_TOK = 80, 24, 128
G = 32
LENS = [32, 32, 16]


def _ragged_problem(seed, correlated=True):
  x, w, h = _problem(seed, correlated, n_in=N_IN, n_out=N_OUT, n_tok=N_TOK)
  h[np.arange(N_IN), np.arange(N_IN)] *= np.random.default_rng(seed).uniform(1.0, 3.0, N_IN)
  return x, w, h


def _assert_last_group_grid(scales, zeros, rows, spec):
  """Row 2 of ``scales`` / ``zeros`` is the grid of the 16 ``rows`` alone."""
  s, z = compute_qparams(jnp.asarray(rows), spec, axis=0)
  np.testing.assert_array_equal(np.asarray(scales)[2], np.asarray(s))
  np.testing.assert_array_equal(np.asarray(zeros)[2].astype(np.float32), np.asarray(z))


@pytest.mark.parametrize('bits,symmetric', [(3, False), (4, True)])
def test_rtn_last_group_has_its_own_grid_and_bounded_error(bits, symmetric):
  spec = QuantSpec(bits=bits, group_size=G, symmetric=symmetric)
  _, w, _ = _ragged_problem(1)
  w[64:] *= 10.0  # a last group on another scale: a shared grid would be visibly wrong
  q = rtn(jnp.asarray(w), spec)
  assert q.scales.shape == q.zeros.shape == (3, N_OUT) and q.g_idx is None
  np.testing.assert_array_equal(np.bincount(np.asarray(q.group_index())), LENS)
  _assert_last_group_grid(q.scales, q.zeros, w[64:], spec)
  for k in range(2):
    _assert_last_group_grid(q.scales[k:k + 1].repeat(3, 0), q.zeros[k:k + 1].repeat(3, 0),
                            w[32 * k:32 * k + 32], spec)
  dense = np.asarray(dequantize(q))
  np.testing.assert_array_equal(dense, np.asarray(rtn_dense(jnp.asarray(w), spec)))
  # Half a step in every group, the last one included (its range holds every one of its rows).
  step = np.asarray(q.scales)[np.arange(N_IN) // G]
  assert np.all(np.abs(dense - w) <= 0.5 * step * (1 + 1e-5))


def test_group_size_of_at_least_in_is_one_group():
  _, w, _ = _ragged_problem(2)
  one = rtn(jnp.asarray(w), QuantSpec(bits=4, group_size=128))
  per_unit = rtn(jnp.asarray(w), QuantSpec(bits=4, group_size=-1))
  assert one.scales.shape == (1, N_OUT)
  np.testing.assert_array_equal(np.asarray(dequantize(one)), np.asarray(dequantize(per_unit)))
  scales, zeros = group_qparams(jnp.asarray(w), QuantSpec(bits=4, group_size=80))
  np.testing.assert_array_equal(np.asarray(scales), np.asarray(one.scales))
  np.testing.assert_array_equal(np.asarray(zeros).astype(np.uint8), np.asarray(one.zeros))


@pytest.mark.parametrize('act_order,static_groups,block_size', [
    (False, False, 128),
    (False, False, 24),  # groups start inside lazy batches, the last batch is partial
    (True, False, 128),
    (True, False, 20),
    (False, True, 128),
    (True, True, 128),
])
def test_gptq_matches_reference_port_on_a_ragged_width(act_order, static_groups, block_size):
  spec = QuantSpec(bits=3, group_size=G)
  x, w, h = _ragged_problem(11)
  statics = dict(act_order=act_order, static_groups=static_groups, block_size=block_size)
  qw, info = _jitted(gptq_lib.gptq, spec, **statics)(w, h)
  assert qw.scales.shape == qw.zeros.shape == (3, N_OUT)
  ref, ref_loss = _reference_gptq(w, h, spec, block_size, 0.01, act_order, static_groups)
  # float32 vs float64: a rare rounding decision may flip, nothing more.
  mismatch = np.mean(np.abs(np.asarray(dequantize(qw)) - ref) > 1e-4 * np.abs(w).max())
  assert mismatch < 0.01, mismatch
  np.testing.assert_allclose(float(info.loss), ref_loss, rtol=1e-3)
  assert _err(x, w, dequantize(qw)) < _err(x, w, rtn_dense(w, spec))
  dense, _ = _jitted(gptq_lib.gptq_dense, spec, **statics)(w, h)
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(dequantize(qw)))
  if act_order and not static_groups:
    # Groups are consecutive in decreasing diag(H): the 16 least important rows form group 2.
    g_idx = np.asarray(qw.g_idx)
    perm = np.argsort(-np.diag(h), kind='stable')
    np.testing.assert_array_equal(g_idx[perm], np.arange(N_IN) // G)
    np.testing.assert_array_equal(np.bincount(g_idx), LENS)
  else:
    assert qw.g_idx is None
  if static_groups:  # every grid, the short one included, from the original weight
    scales, zeros = group_qparams(jnp.asarray(w), spec)
    np.testing.assert_array_equal(np.asarray(qw.scales), np.asarray(scales))
    np.testing.assert_array_equal(np.asarray(qw.zeros), np.asarray(zeros).astype(np.uint8))
    _assert_last_group_grid(qw.scales, qw.zeros, w[64:], spec)


def test_gptq_last_group_grid_is_fitted_to_its_own_columns():
  """Without act-order the last group's grid is computed when column 64 is reached, from the
  updated columns 64..79 alone. Codes of those columns all lie on that grid, and rows 64..79 of
  a weight whose last group is 100x larger are not clipped (a grid fitted to padding or to other
  columns would clip or waste the range)."""
  spec = QuantSpec(bits=4, group_size=G)
  _, w, h = _ragged_problem(12, correlated=False)
  w[64:] *= 100.0
  qw, _ = _jitted(gptq_lib.gptq, spec)(w, h)
  codes = np.asarray(qw.ints())[64:]
  assert codes.min() == 0 and codes.max() == 15  # the range is used, and by these rows only
  rel = np.abs(np.asarray(dequantize(qw))[64:] - w[64:]) / np.abs(w[64:]).max(0)
  assert rel.max() < 0.2


def test_gptq_mask_on_a_ragged_width():
  spec = QuantSpec(bits=4, group_size=G)
  _, w, h = _ragged_problem(13)
  mask = np.random.default_rng(13).random((N_IN, N_OUT)) < 0.6
  qw, _ = gptq_lib.gptq(w, h, spec, mask=jnp.asarray(mask), block_size=24)
  dense = np.asarray(dequantize(qw))
  assert np.all(dense[~mask] == 0)


def test_awq_on_a_ragged_width():
  spec = QuantSpec(bits=3, group_size=G)
  x, w, h = _ragged_problem(14)
  x[:, 5] *= 20.0  # an outlier channel, so the search moves off alpha = 0
  h = (x.T @ x).astype(np.float32)
  act = np.abs(x).mean(0).astype(np.float32)
  alphas, errors = awq_lib.awq_grid_errors(w, h, act, spec, n_grid=10)
  assert float(np.min(errors)) <= float(errors[0])  # never worse than RTN (alpha = 0)
  q, s = awq_lib.awq(w, h, act, spec, n_grid=10)
  assert q.scales.shape == (3, N_OUT)
  ws = np.asarray(w) * np.asarray(s)[:, None]
  _assert_last_group_grid(q.scales, q.zeros, ws[64:], spec)
  dense = awq_lib.awq_dense(w, h, act, spec, n_grid=10)
  np.testing.assert_allclose(np.asarray(dense), np.asarray(dequantize(q)) / np.asarray(s)[:, None],
                             rtol=1e-6, atol=1e-7)
  assert _err(x, w, dense) <= _err(x, w, rtn_dense(w, spec)) * (1 + 1e-5)


def test_awq_clip_scores_the_last_group_on_its_own_rows():
  spec = QuantSpec(bits=3, group_size=G)
  x, w, h = _ragged_problem(15)
  w[64:] = np.random.default_rng(15).standard_t(2, (16, N_OUT)) * 0.1  # heavy tails: clipping pays
  n_grid, max_shrink = 20, 0.5
  max_val = np.asarray(awq_lib.awq_clip(w, h, spec, n_grid=n_grid, max_shrink=max_shrink))
  assert max_val.shape == (3, N_OUT)
  # Brute force on the 16 rows of the last group and its own Hessian block.
  wl, hl = w[64:].astype(np.float64), h[64:, 64:].astype(np.float64)
  org = np.abs(wl).max(0)
  ratios = 1.0 - np.arange(int(max_shrink * n_grid)) / n_grid
  last = QuantSpec(bits=3, group_size=-1)
  errs = []
  for r in ratios:
    clipped = np.clip(wl, -org * r, org * r).astype(np.float32)
    d = np.asarray(rtn_dense(jnp.asarray(clipped), last), np.float64) - wl
    errs.append(np.sum(d * (hl @ d), axis=0))
  want = org * ratios[np.argmin(np.asarray(errs), axis=0)]
  np.testing.assert_allclose(max_val[2], want, rtol=1e-6)
  assert np.any(want < org)  # not vacuous: some threshold is below the max
  clipped = np.asarray(awq_lib.apply_clip(jnp.asarray(w), jnp.asarray(max_val), spec))
  np.testing.assert_array_equal(clipped[64:], np.clip(w[64:], -max_val[2], max_val[2]))
  q, _ = awq_lib.awq(w, h, np.abs(x).mean(0), spec, n_grid=4, clip=True)
  assert q.scales.shape == (3, N_OUT)
