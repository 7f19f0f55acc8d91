"""Compensation inside the pipeline on the tiny model: adapters, truncation, SRR, orbax round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import pipeline
from compress import rules as rules_lib
from kernels import formats, QuantSpec
from models import checkpoint, llama, tree
from recover import compensate
from tests.utils import tiny_model


@pytest.fixture(scope='module')
def tiny():
  return tiny_model(calib_shape=(16, 32))


RTN2 = rules_lib.LinearSpec(quant='rtn', qspec=QuantSpec(bits=2, group_size=32))


def _run(tiny, method, rank, **kw):
  cfg, params, calib = tiny
  comp = compensate.Compensator(method=method, rank=rank, **kw)
  return pipeline.compress_model(params, cfg, calib, rules_lib.uniform(RTN2), recovery=comp,
                                 progress=False)


def test_eora_reduces_error_and_keeps_compressed_weights(tiny):
  cfg, params, calib = tiny
  plain, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(RTN2), progress=False)
  rec, reports = _run(tiny, 'eora', 8)
  jax.tree.map(np.testing.assert_array_equal, tree.strip_adapters(rec), plain)
  for r in reports:
    assert r.rel_error_recovered < r.rel_error
  svd = compensate.with_svd_adapters(params, tree.strip_adapters(rec), 8)
  # On its own calibration statistics EoRA is optimal, so it beats SVD layer by layer.
  _, rep_svd = _run(tiny, 'svd', 8)
  for e, s in zip(reports, rep_svd):
    assert e.rel_error_recovered <= s.rel_error_recovered * (1 + 1e-4)
  leaf = svd['layers'][0]['mlp']['up_proj']['kernel']
  assert leaf.adapter.rank == 8


def test_reports_carry_the_dense_output_energy(tiny):
  """Each compensated linear's report holds ||X W||^2 / n of its calibration inputs (block 0 sees
  the dense inputs, so its energies are the dense statistics')."""
  from compress import calibration  # pylint: disable=g-import-not-at-top
  from recover import budget  # pylint: disable=g-import-not-at-top
  cfg, params, calib = tiny
  _, reports = _run(tiny, 'eora', 8)
  stats = calibration.dense_statistics(params, cfg, calib, blocks=[0], progress=False)
  want = budget.output_energies(params, stats)
  got = {f'{r.name}/kernel': r.extra['output_energy'] for r in reports}
  assert len(want) == 7 and set(want) <= set(got)
  for path, e in want.items():
    assert got[path] == pytest.approx(e, rel=1e-4)


def test_truncation_equals_lower_rank_run(tiny):
  high, _ = _run(tiny, 'eora', 16)
  low, _ = _run(tiny, 'eora', 4)
  cut = compensate.truncate_adapters(high, 4)
  x = jax.random.normal(jax.random.key(3), (5, 64))
  for lin in ('self_attn/q_proj', 'mlp/gate_proj'):
    sub, n = lin.split('/')
    a = formats.effective_weight(cut['layers'][1][sub][n]['kernel'])
    b = formats.effective_weight(low['layers'][1][sub][n]['kernel'])
    np.testing.assert_allclose(x @ a, x @ b, rtol=2e-3, atol=2e-4)


def test_quantized_adapters_and_share(tiny):
  rec, _ = _run(tiny, 'eora', 8, adapter_bits=4, adapter_group_size=32)
  leaf = rec['layers'][0]['self_attn']['q_proj']['kernel']
  assert isinstance(leaf.adapter.a, formats.QuantizedWeight) and leaf.adapter.a.bits == 4
  share = compensate.adapter_share(rec)
  share16 = compensate.adapter_share(_run(tiny, 'eora', 8)[0])
  assert 0 < share['adapter_share'] < share16['adapter_share']


def test_srr_changes_weights_and_propagates(tiny):
  rec, reports = _run(tiny, 'srr', 8)
  plain, rep_plain = pipeline.compress_model(tiny[1] and tiny[1], tiny[0], tiny[2],
                                             rules_lib.uniform(RTN2), progress=False)
  # Block 0 sees identical inputs, so SRR's total error there is no worse than RTN + nothing.
  for r, p in zip(reports[:7], rep_plain[:7]):
    assert r.rel_error_recovered <= p.rel_error + 1e-6
  assert compensate.Compensator(method='srr', rank=4).changes_weights


def test_recovered_model_round_trips_through_orbax(tiny, tmp_path):
  cfg, _, calib = tiny
  rec, _ = _run(tiny, 'eora', 8, adapter_bits=4, adapter_group_size=32)
  checkpoint.save_model(tmp_path / 'm', rec, cfg)
  _, back, _ = checkpoint.load_model(tmp_path / 'm')
  jax.tree.map(np.testing.assert_array_equal, rec, back)
  t = jnp.asarray(calib[:1])
  np.testing.assert_array_equal(llama.forward(rec, t, cfg), llama.forward(back, t, cfg))


def test_bad_arguments():
  with pytest.raises(ValueError, match='unknown recovery method'):
    compensate.Compensator(method='lora', rank=4)
  with pytest.raises(ValueError, match='adapter_bits=5'):
    compensate.Compensator(method='eora', rank=4, adapter_bits=5)
  with pytest.raises(ValueError, match='rank must be positive'):
    compensate.Compensator(method='eora', rank=0)
