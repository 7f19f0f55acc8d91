"""Smoke test of the LoRA-initialisation table script on the tiny byte-level model."""

import jax
import numpy as np
import pytest

from experiments import compress_lib, lora_table


def test_lora_table_smoke(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  words = ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'compress', 'recover', 'layer']
  path = tmp_path / 'corpus.txt'
  path.write_text(' '.join(rng.choice(words, size=6000)) + '\n')
  common = lora_table.common
  real, real_eval = common.calibration_for, common.eval_windows_for
  monkeypatch.setattr(common, 'calibration_for',
                      lambda tok, src, n, t, seed: real(tok, str(path), n, t, seed))
  monkeypatch.setattr(common, 'eval_windows_for',
                      lambda tok, src, t, n: real_eval(tok, str(path), t, n))
  monkeypatch.setattr(common, 'probe_items', lambda p: [])
  monkeypatch.setitem(compress_lib.COMPRESSIONS, 'rtn w2g32',
                      dict(quant='rtn', bits=2, group_size=32))
  res = lora_table.run(out_dir=str(tmp_path / 'l'), rows=['rtn w2g32'], model='tiny-llama',
                       lora_rank=4, ft_steps=3, ft_samples=4, ft_seqlen=16, loftq_iters=2,
                       calib_samples=8, calib_seqlen=32, eval_data=('a',), eval_windows=2,
                       eval_seqlen=32)
  rows = {(r['init'], r['stage']): r for r in res['rows'] if r['compression'] != 'dense'}
  assert set(rows) == {(n, s) for n in lora_table.INIT_NAMES.values() for s in ('before', 'after')}
  # The EoRA model and a LoftQ start are closer to the dense model than the compression alone.
  assert rows[('EoRA', 'before')]['kl a'] < rows[('QLoRA (zero)', 'before')]['kl a']
  assert rows[('LoftQ', 'before')]['kl a'] < rows[('QLoRA (zero)', 'before')]['kl a']
  assert len(res['finetune']['rtn w2g32 | eora']['losses']) == 3
  assert (tmp_path / 'l' / 'loss_curves.png').exists()

  # A cached EoRA model of a higher rank is truncated instead of recomputed (no statistics pass);
  # a rank above every cached one falls back to computing it.
  def no_stats():
    raise AssertionError('statistics recomputed')

  models_dir = tmp_path / 'l' / 'models'
  cached = lora_table.checkpoint.load_model(models_dir / 'rtn_w2g32_eora4')[1]
  c = compress_lib.compressions(['rtn w2g32'], model='tiny-llama', calib_samples=8,
                                calib_seqlen=32)['rtn w2g32']
  loaded = lora_table.loading.load_model('tiny-llama')
  calib = common.calibration_for(loaded.tokenizer(), 'python-docs', 8, 32, 0)
  got = lora_table.eora_start(None, calib, c, 'rtn w2g32', 2, tmp_path / 'm', no_stats,
                              str(models_dir))
  want = lora_table.compensate.truncate_adapters(cached, 2)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert got['layers'][0]['mlp']['down_proj']['kernel'].adapter.a.shape[-1] == 2
  with pytest.raises(AssertionError, match='recomputed'):
    lora_table.eora_start(None, calib, c, 'rtn w2g32', 8, tmp_path / 'm', no_stats,
                          str(models_dir))
  with pytest.raises(AssertionError, match='recomputed'):  # another calibration: not reused
    lora_table.eora_start(None, calib[:4], c, 'rtn w2g32', 2, tmp_path / 'm', no_stats,
                          str(models_dir))
