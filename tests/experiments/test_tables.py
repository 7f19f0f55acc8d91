"""Smoke tests of the paper-table scripts on the tiny byte-level model."""

import numpy as np
import pytest

from experiments import compress_lib, eora_tables, free_lunch, srr_budget
from kernels import QuantSpec


@pytest.fixture
def corpus(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  words = ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'compress', 'recover', 'layer']
  path = tmp_path / 'corpus.txt'
  path.write_text(' '.join(rng.choice(words, size=6000)) + '\n')
  real = eora_tables.common.calibration_for
  # The scripts calibrate on named corpora; point every name at the small local file.
  monkeypatch.setattr(eora_tables.common, 'calibration_for',
                      lambda tok, src, n, t, seed: real(tok, str(path), n, t, seed))
  real_eval = eora_tables.common.eval_windows_for
  monkeypatch.setattr(eora_tables.common, 'eval_windows_for',
                      lambda tok, src, t, n: real_eval(tok, str(path), t, n))
  monkeypatch.setattr(eora_tables.common, 'probe_items', lambda p: [])
  return path


def test_eora_tables_smoke(corpus, tmp_path, monkeypatch):
  monkeypatch.setitem(compress_lib.COMPRESSIONS, 'rtn w2g32', dict(quant='rtn', bits=2, group_size=32))
  res = eora_tables.run(sections=list(eora_tables.SECTIONS), out_dir=str(tmp_path / 'e'),
                        rows=['rtn w2g32'], rank=8, ranks=(4, 8), sweep_rows=['rtn w2g32'],
                        bits_ranks=(8,), model='tiny-llama', calib_samples=8, calib_seqlen=32,
                        eval_data=('a', 'b'), eval_windows=2, sweep_windows=2, eval_seqlen=32)
  kl = {r['recovery']: r['kl a'] for r in res['tables'] if r['compression'] != 'dense'}
  assert kl['eora'] < kl['none'] and kl['svd'] < kl['none']
  assert len(res['rank_sweep']) == 2 and len(res['adapter_bits']) == 3
  assert (tmp_path / 'e' / 'rank_sweep_rtn_w2g32.png').exists()
  assert (tmp_path / 'e' / 'adapter_bits.png').exists()
  assert {r['recovery'] for r in res['calib_domain']} >= {'none', 'eora eigenspace shakespeare'}


def test_srr_budget_smoke(corpus, tmp_path, monkeypatch):
  monkeypatch.setattr(srr_budget, 'SETTINGS', {'w2g32': QuantSpec(bits=2, group_size=32)})
  res = srr_budget.run(out_dir=str(tmp_path / 's'), blocks=(1,), ranks=(4, 8), settings=('w2g32',),
                       k_sweep_rank=8, k_fractions=(0.0, 0.5), model='tiny-llama', calib_samples=8,
                       calib_seqlen=32)
  row = res['rows'][0]
  assert row['eora r8'] <= row['svd r8'] + 1e-6 and row['eora r8'] < row['none']
  assert row['eora r8'] <= row['eora r4'] + 1e-6
  ks = {r['k choice']: r for r in res['k_sweep']}
  col = [k for k in ks['searched'] if k.startswith('mean')][0]
  assert ks['searched'][col] <= ks['fixed k=0r'][col] + 1e-6
  assert (tmp_path / 's' / 'srr_budget.png').exists()


def test_free_lunch_smoke(corpus, tmp_path, monkeypatch):
  res = free_lunch.run(sections=list(free_lunch.SECTIONS), out_dir=str(tmp_path / 'f'),
                       rows=['wanda 50%', 'magnitude 50%'], window_row='wanda 50%',
                       windows=('matrix', 'block'), global_steps=(2, 8), global_lr=1e-3,
                       model='tiny-llama', calib_samples=4, calib_seqlen=32, recon_samples=4,
                       recon_lr=3e-3, recon_epochs=2, eval_data=('a', 'b'), eval_windows=2,
                       other_windows=2, eval_seqlen=32)
  crit = {(r['compression'], r['reconstruction']): r for r in res['criteria']}
  for row in ('wanda 50%', 'magnitude 50%'):
    assert crit[(row, 'block')]['kl a'] < crit[(row, 'none')]['kl a']
  wins = {r['window']: r for r in res['windows']}
  assert set(wins) == {'dense', 'none', 'matrix', 'block'}
  assert wins['block']['loop_MiB'] > 0 and wins['matrix']['windows'] == 14
  glob = {r['method']: r for r in res['global']}
  assert glob['global retraining, 8 steps']['train_compute'] > glob['block reconstruction']['train_compute']
  assert (tmp_path / 'f' / 'global_compute.png').exists()


def test_compress_cached_computes_statistics_only_on_a_miss(tmp_path, monkeypatch):
  from experiments import compress_lib
  from models import checkpoint, config as config_lib, llama
  import jax
  cfg = config_lib.tiny_config(num_layers=1)
  params = llama.init_params(cfg, jax.random.key(0))
  from experiments import config as run_config
  c = run_config.CompressConfig(model='tiny-llama', batch_size=4)
  cache = tmp_path / 'm'
  key = compress_lib.compress_key(c, None, None, shared_stats=True)
  checkpoint.save_model(cache, params, cfg, {'timing': {'numerics_seconds': 1.5}, 'cache_key': key})

  def no_stats():
    raise AssertionError('statistics computed')

  got, timing = compress_lib.compress_cached(None, None, c, cache, stats=no_stats)
  assert timing == {'numerics_seconds': 1.5}
  np.testing.assert_array_equal(np.asarray(got['embed_tokens']['embedding']),
                                np.asarray(params['embed_tokens']['embedding']))
  # A cached model of other settings (here: propagated calibration) is refused, not reported.
  with pytest.raises(checkpoint.CheckpointError, match='other settings'):
    compress_lib.compress_cached(None, None, c, cache)
  # A miss calls the callable once and hands its result to the pipeline.
  seen = {}

  def fake_compress(*args, precomputed_stats=None, precomputed_aux_stats=None, **kw):
    seen['stats'], seen['aux'] = precomputed_stats, precomputed_aux_stats
    raise RuntimeError('stop')

  monkeypatch.setattr(compress_lib.pipeline, 'compress_model', fake_compress)
  monkeypatch.setattr(compress_lib, 'build_spec', lambda c: None)
  monkeypatch.setattr(compress_lib, 'build_rules', lambda c, s: None)
  loaded = type('L', (), {'params': params, 'config': cfg})()
  with pytest.raises(RuntimeError, match='stop'):
    compress_lib.compress_cached(loaded, None, c, tmp_path / 'miss', stats=lambda: 'S',
                                 aux_stats=lambda: 'A')
  assert seen == {'stats': 'S', 'aux': 'A'}
  # The key hashes the settings that differ from their defaults: a setting at its default (as a
  # flag added later is) leaves it unchanged, any other value changes it.
  assert compress_lib.changed_settings(c) == {'model': 'tiny-llama', 'batch_size': 4}
  assert key == compress_lib.compress_key(
      run_config.CompressConfig(model='tiny-llama', batch_size=4, param_sharding='replicated'),
      None, None, shared_stats=True)
  assert key != compress_lib.compress_key(
      run_config.CompressConfig(model='tiny-llama', batch_size=8), None, None, shared_stats=True)


def test_idp_table_smoke(corpus, tmp_path):
  from experiments import idp_table
  res = idp_table.run(out_dir=str(tmp_path / 'i'), model='tiny-llama', compression='rtn w2g64',
                      calib_samples=4, calib_seqlen=32, train_windows=4, train_seqlen=32,
                      prompt_len=2, steps=2, eval_data=('a', 'b'), eval_windows=2,
                      eval_seqlen=32, latency_batch=1, latency_reps=1, lora_rank=2)
  rows = {r['method']: r for r in res['table']}
  assert set(rows) == {'dense', 'compressed', 'one prompt', 'idp pool', 'lora'}
  assert all(np.isfinite(r['ppl a']) and r['latency_s' if m != 'dense' else 'ppl b'] > 0
             for m, r in rows.items())
  # Two prompts of 2 tokens per layer entry against rank-2 adapters on every linear.
  assert 0 < rows['idp pool']['added_params'] < rows['lora']['added_params']
  assert res['idp_vs_lora']['params_ratio'] > 1
  assert sum(res['routing']['a']) == pytest.approx(1.0)


def test_eora_robust_smoke(corpus, tmp_path, monkeypatch):
  from experiments import eora_robust  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(compress_lib.COMPRESSIONS, 'rtn w2g32', dict(quant='rtn', bits=2, group_size=32))
  res = eora_robust.run(sections=list(eora_robust.SECTIONS), out_dir=str(tmp_path / 'r'),
                        rows=['rtn w2g32'], rank=4, lambdas=(0.0, 1.0, 1e6), auto_grid=(0.0, 1.0),
                        max_rank=16, model='tiny-llama', calib_samples=8, calib_seqlen=32,
                        eval_data=('a', 'b'), eval_windows=2, eval_seqlen=32, probes=False)
  by = {r['recovery']: r for r in res['shrink'] if r['compression'] == 'rtn w2g32'}
  # lambda -> inf is plain SVD: the same perplexity up to rounding
  assert abs(by['eora lambda=1e+06']['ppl a'] / by['svd']['ppl a'] - 1) < 1e-3
  assert by['eora lambda=0']['kl a'] < by['none']['kl a']
  assert sum(by['auto']['auto_lambda_counts'].values()) == 7 * 2  # every linear chose a value
  assert (tmp_path / 'r' / 'shrink_rtn_w2g32.png').exists()
  rows = {r['recovery']: r for r in res['budget'] if r['compression'] == 'rtn w2g32'}
  for w in ('absolute', 'relative'):  # the same adapter size as uniform rank 4, spent elsewhere
    assert rows[f'global {w}']['adapter_params'] <= rows['uniform r4']['adapter_params']
    assert rows[f'global {w}']['rank_max'] > 4 or rows[f'global {w}']['rank_min'] < 4
  assert (tmp_path / 'r' / 'budget_ranks.png').exists()


def test_recon_defaults_smoke(tmp_path):
  from experiments import recon_defaults  # pylint: disable=g-import-not-at-top
  text = tmp_path / 'corpus.txt'
  text.write_text(' '.join(np.random.default_rng(0).choice(['a', 'bc', 'model', 'weight'], 3000)))
  res = recon_defaults.run(out_dir=str(tmp_path / 'd'), lrs=(1e-3,), model='tiny-llama',
                           calib_data=str(text), eval_data=(str(text),), calib_samples=4,
                           calib_seqlen=32, eval_windows=2, eval_seqlen=32, recon_samples=4,
                           probes='none')
  (row,) = res['rows']
  assert row['recon_lr'] == 1e-3 and row['ppl_recovered'] > 0
  assert row['gap_closed'] == pytest.approx(
      (row['ppl_compressed'] - row['ppl_recovered']) / (row['ppl_compressed'] - row['ppl_dense']))
  assert (tmp_path / 'd' / 'results.json').exists()
  # a rerun into the same directory keeps the finished learning rate and runs only the new one
  again = recon_defaults.run(out_dir=str(tmp_path / 'd'), lrs=(1e-3,), model='tiny-llama',
                             calib_data=str(text), eval_data=(str(text),), calib_samples=4,
                             calib_seqlen=32, eval_windows=2, eval_seqlen=32, recon_samples=4,
                             probes='none')
  assert again['rows'] == res['rows']


def test_composed_smoke(corpus, tmp_path, monkeypatch):
  from experiments import composed  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(compress_lib.COMPRESSIONS, 'rtn w2g32', dict(quant='rtn', bits=2, group_size=32))
  res = composed.run(out_dir=str(tmp_path / 'c'), rows=['rtn w2g32'], rank=4, recon_lr=3e-3,
                     adapter_lr=3e-3, recon_samples=4, model='tiny-llama', calib_samples=4,
                     calib_seqlen=32, eval_data=('a', 'b'), eval_windows=2, eval_seqlen=32,
                     probes=False)
  by = {r['recipe']: r for r in res['rows'] if r['compression'] == 'rtn w2g32'}
  # equal added parameters for every adapter recipe; none for the weights' reconstruction
  sizes = {by[k]['adapter_params'] for k in by if k not in ('none', 'reconstruct weights')}
  assert len(sizes) == 1 and by['reconstruct weights']['adapter_params'] == 0
  assert by['eora -> reconstruct adapters']['kl a'] < by['none']['kl a']
  assert by['reconstruct LoRA']['train_compute'] > 0
  assert (tmp_path / 'c' / 'composed.md').exists()


def test_srr_global_layers_smoke(corpus, tmp_path, monkeypatch):
  monkeypatch.setattr(srr_budget, 'SETTINGS', {'w2g32': QuantSpec(bits=2, group_size=32)})
  res = srr_budget.run_global(out_dir=str(tmp_path / 'g'), blocks=(1,), settings=('w2g32',),
                              rank=4, max_rank=16, model='tiny-llama', calib_samples=8,
                              calib_seqlen=32)
  rows = {r['allotment']: r for r in res['rows']}
  budget = rows['eora uniform']['adapter_params']
  assert all(r['adapter_params'] <= budget for r in rows.values())
  # each allotment starts from its uniform choice, so it never leaves more weighted error; the
  # searched k is never worse than k = 0 at the same rank
  assert rows['srr uniform (searched k)']['mean rel error'] <= rows['eora uniform'][
      'mean rel error'] + 1e-9
  assert (tmp_path / 'g' / 'global.md').exists()
