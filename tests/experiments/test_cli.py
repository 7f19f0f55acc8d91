"""Smoke tests of the experiment scripts on the tiny byte-level model (no large assets needed for
the model; the text comes from the shipped corpora)."""

import dataclasses
import json

import numpy as np
import pytest

from experiments import compress_lib as compress_exp
from experiments import config
from experiments import compress_table
from experiments import evaluate as evaluate_exp


@pytest.fixture(autouse=True)
def _text_file(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  words = ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'compress', 'recover', 'layer']
  text = ' '.join(rng.choice(words, size=6000)) + '\n'
  path = tmp_path / 'corpus.txt'
  path.write_text(text)
  monkeypatch.setenv('TEST_CORPUS', str(path))
  return path


def _corpus(tmp_path):
  return str(tmp_path / 'corpus.txt')


def test_evaluate_run(tmp_path):
  out = evaluate_exp.run(model='tiny-llama', eval_data=[_corpus(tmp_path)], eval_seqlen=64,
                         eval_windows=3, batch_size=2, probes='none')
  assert out['eval_tokens'] == 3 * 63 and np.isfinite(out['ppl']) and out['ppl'] > 1


def _config(tmp_path, **kw):
  base = dict(model='tiny-llama', calib_data=_corpus(tmp_path), calib_samples=4, calib_seqlen=32,
              eval_data=(_corpus(tmp_path),), eval_seqlen=32, eval_windows=2, probes='none',
              batch_size=2, group_size=32)
  base.update(kw)
  return config.CompressConfig(**base)


def test_compress_run_with_recovery_and_save(tmp_path):
  c = _config(tmp_path, quant='gptq', bits=3, recover='eora', rank=8)
  res = compress_exp.run(c, out_dir=str(tmp_path / 'out'), save=str(tmp_path / 'saved'))
  for k in ('ppl_dense', 'ppl_compressed', 'kl_compressed', 'top1_compressed', 'ppl_recovered',
            'kl_recovered', 'compress_seconds', 'recover_seconds', 'adapter_share'):
    assert k in res and np.isfinite(res[k]), k
  assert res['kl_recovered'] < res['kl_compressed']
  assert 0 < res['adapter_share'] < 0.5
  assert len(res['layers']) == 14
  json.dumps(res)  # JSON-serialisable


@pytest.mark.parametrize('kw,match', [
    (dict(prune='obs'), 'not a pruning method'),
    (dict(quant='gptq', bits=5), 'bits=5'),
    (dict(prune='wanda', sparsity='1.5'), '1.5'),
    (dict(prune='sparsegpt', quant='gptq', bits=4, group_size=48), 'group_size=48 does not divide'),
    (dict(quant='rtn', recover='lora'), 'not a recovery method'),
    (dict(prune='wanda', reconstruct='rows'), 'reconstruction window'),
    (dict(prune='wanda', reconstruct='block', recon_inputs='teacher'), 'recon_inputs'),
    (dict(prune='wanda', finetune='sgd'), 'not a fine-tuning method'),
    (dict(quant='rtn', finetune='lora', lora_init='eora'), '--recover=eora'),
    (dict(reconstruct='block'), 'need a compression'),
])
def test_bad_flags_fail_before_work(tmp_path, kw, match):
  c = _config(tmp_path, **kw)
  with pytest.raises(ValueError, match=match):
    compress_exp.run(c)


def test_compress_table_smoke(tmp_path, monkeypatch):
  monkeypatch.setattr(compress_exp, 'COMPRESSIONS', {
      'wanda 2:4': dict(prune='wanda', sparsity='2:4'),
      'rtn w2g32': dict(quant='rtn', bits=2, group_size=32)})
  monkeypatch.setattr(compress_table.common, 'probe_items', lambda path: [])
  rows = compress_table.run(methods=['wanda 2:4', 'rtn w2g32'], out_dir=str(tmp_path / 't'),
                            model='tiny-llama', calib_samples=4, calib_seqlen=32,
                            eval_data=[_corpus(tmp_path)], eval_windows=2, eval_seqlen=32)
  assert [r['method'] for r in rows] == ['dense', 'wanda 2:4', 'rtn w2g32']
  assert rows[1][f'ppl {_corpus(tmp_path)}'] != rows[0][f'ppl {_corpus(tmp_path)}']
  # A rerun loads the cached compressed models instead of recomputing them.
  again = compress_table.run(methods=['wanda 2:4'], out_dir=str(tmp_path / 't'), model='tiny-llama',
                             calib_samples=4, calib_seqlen=32, eval_data=[_corpus(tmp_path)],
                             eval_windows=2, eval_seqlen=32)
  assert again[1]['numerics_s'] == rows[1]['numerics_s']


def test_compress_run_with_reconstruction(tmp_path):
  c = _config(tmp_path, prune='wanda', sparsity='0.5', reconstruct='block', recon_samples=4,
              recon_epochs=4, recon_lr=3e-3)
  res = compress_exp.run(c, out_dir=str(tmp_path / 'out'))
  assert res['kl_recovered'] < res['kl_compressed']
  for k in ('train_seconds', 'tokens_seen', 'trainable_params', 'train_compute'):
    assert res[k] > 0, k
  assert res['tokens_seen'] == 2 * 8 * 2 * 32  # windows x steps (2 per epoch x 4) x batch x seqlen
  assert all(w['loss_after'] < w['loss_before'] for w in res['windows'])
  assert (tmp_path / 'out' / 'recon_checkpoint' / 'state').exists()
  json.dumps(res)


@pytest.mark.parametrize('kw', [
    dict(quant='rtn', bits=3, finetune='qat', ft_lr=2e-2),
    dict(quant='rtn', bits=3, recover='eora', rank=4, finetune='lora', lora_rank=4, lora_init='eora'),
    dict(prune='wanda', sparsity='2:4', finetune='global', ft_lr=1e-3),
    dict(quant='rtn', bits=3, finetune='idp', ft_lr=1e-2),
])
def test_compress_run_with_finetuning(tmp_path, kw):
  c = _config(tmp_path, ft_steps=6, ft_samples=4, **kw)
  res = compress_exp.run(c, out_dir=str(tmp_path / 'out'), save=str(tmp_path / 'saved'))
  assert np.isfinite(res['ppl_recovered']) and res['ppl_recovered'] != res['ppl_compressed']
  assert res['tokens_seen'] > 0 and res['trainable_params'] > 0 and res['train_seconds'] > 0
  if kw['finetune'] == 'idp':
    assert res['kl_recovered'] is None and res['idp']['added_parameters'] == res['trainable_params']
    assert (tmp_path / 'saved_prompt_pool').exists()
  json.dumps(res)


def test_auto_bits_keeps_the_users_rules(tmp_path):
  """An explicit --rules entry wins over the automatic allocation (it used to be overridden)."""
  c = _config(tmp_path, quant='rtn', bits=3, auto_bits=3.0, rules=('.*/down_proj/kernel=none',))
  res = compress_exp.run(c, out_dir=str(tmp_path / 'out'))
  names = [r['name'] for r in res['layers']]
  assert len(names) == 12 and not any('down_proj' in n for n in names)
  assert {r['bits'] for r in res['layers']} <= {2, 3, 4}


def test_global_rank_budget_and_robust_eora(tmp_path):
  """--rank_budget=global spends the adapter parameters of --rank everywhere, unevenly; the
  ranks are in the results and the PEFT export (rank_pattern)."""
  c = _config(tmp_path, quant='rtn', bits=2, recover='eora', rank=4, rank_budget='global',
              budget_max_rank=16, eora_shrink=0.1, adapter_bits=4, export='peft')
  res = compress_exp.run(c, out_dir=str(tmp_path / 'out'))
  rb = res['rank_budget']
  assert rb['weighting'] == 'absolute'
  relative = compress_exp.run(dataclasses.replace(c, budget_weighting='relative', export='none'))
  assert relative['rank_budget']['weighting'] == 'relative'
  assert relative['rank_budget']['ranks'] != rb['ranks']
  assert rb['used_params'] <= rb['budget_params'] and rb['rank_max'] <= 16
  assert rb['rank_min'] < 4 < rb['rank_max'] or rb['rank_min'] < rb['rank_max']
  assert np.isfinite(res['ppl_recovered']) and res['kl_recovered'] < res['kl_compressed']
  adapter = json.loads((tmp_path / 'out' / 'export_peft' / 'adapter' / 'adapter_config.json')
                       .read_text())
  assert adapter['rank_pattern']  # the ranks differ per module
  json.dumps(res)


def test_srr_global_budget_and_its_resume(tmp_path):
  """--recover=srr --rank_budget=global picks each linear's preserved k and rank within the
  uniform size; a second run on the same directory finds the compression done and allots from the
  candidates on disk, to the same model."""
  c = _config(tmp_path, quant='rtn', bits=2, recover='srr', rank=4, rank_budget='global',
              budget_max_rank=8, budget_weighting='relative', export='peft')
  out = str(tmp_path / 'out')
  res = compress_exp.run(c, out_dir=out)
  rb = res['rank_budget']
  assert rb['used_params'] <= rb['budget_params'] and rb['rank_max'] <= 8
  assert rb['rank_min'] < rb['rank_max'] and set(rb['preserved']) == set(rb['ranks'])
  assert rb['weighting'] == 'relative'
  assert all(0 <= rb['preserved'][p] <= 4 for p in rb['preserved'])
  assert np.isfinite(res['ppl_recovered']) and res['kl_recovered'] < res['kl_compressed']
  adapter = json.loads((tmp_path / 'out' / 'export_peft' / 'adapter' / 'adapter_config.json')
                       .read_text())
  assert adapter['rank_pattern']
  again = compress_exp.run(c, out_dir=out)
  assert again['rank_budget'] == rb and again['ppl_recovered'] == res['ppl_recovered']


def test_composed_recipe_trains_only_the_adapters(tmp_path):
  """compression -> EoRA -> block reconstruction of the adapters -> 4-bit adapters: the
  compressed weights are those of the compression alone; the adapters changed and are 4-bit."""
  from kernels import formats  # pylint: disable=g-import-not-at-top
  from models import checkpoint, tree  # pylint: disable=g-import-not-at-top
  c = _config(tmp_path, quant='rtn', bits=2, recover='eora', rank=4, adapter_bits=4,
              reconstruct='block', recon_train='adapters', recon_samples=4, recon_epochs=4,
              recon_lr=3e-3)
  res = compress_exp.run(c, out_dir=str(tmp_path / 'out'), save=str(tmp_path / 'saved'))
  assert all(w['loss_after'] < w['loss_before'] for w in res['windows'])
  alone = compress_exp.run(_config(tmp_path, quant='rtn', bits=2, recover='eora', rank=4),
                           save=str(tmp_path / 'alone'))
  _, got, _ = checkpoint.load_model(str(tmp_path / 'saved'))
  _, ref, _ = checkpoint.load_model(str(tmp_path / 'alone'))
  for path, leaf in tree.linear_leaves(got).items():
    other = tree.linear_leaves(ref)[path]
    np.testing.assert_array_equal(np.asarray(formats.to_dense(tree.strip_adapter(leaf))),
                                  np.asarray(formats.to_dense(tree.strip_adapter(other))))
    assert isinstance(leaf.adapter.a, formats.QuantizedWeight)
    assert leaf.adapter.a.bits == 4
  assert res['trainable_params'] < 0.2 * res['model_bytes']  # adapters only
  assert res['ppl_recovered'] != alone['ppl_recovered']


@pytest.mark.parametrize('kw,match', [
    (dict(quant='rtn', recover='svd', eora_shrink=0.1), 'applies to --recover=eora'),
    (dict(quant='rtn', recover='svd', rank_budget='global'), 'needs --recover=eora or srr'),
    (dict(quant='rtn', recover='eora', rank=8, rank_budget='global', budget_max_rank=4),
     'below --rank'),
    (dict(quant='rtn', reconstruct='block', recon_train='adapters', recon_peft=True),
     'contradicts'),
])
def test_new_recovery_flags_fail_before_work(tmp_path, kw, match):
  with pytest.raises(ValueError, match=match):
    compress_exp.run(_config(tmp_path, **kw))


def test_srr_global_budget_starts_from_no_other_runs_candidates(tmp_path):
  """A fresh compression clears the candidate store it writes to, so candidates a different run
  left there can never enter the model."""
  stale = tmp_path / 'out' / 'srr_candidates' / 'p0' / 'layers.7.mlp.up_proj.curves.pkl'
  stale.parent.mkdir(parents=True)
  stale.write_bytes(b'not ours')
  c = _config(tmp_path, quant='rtn', bits=2, recover='srr', rank=4, rank_budget='global',
              budget_max_rank=8)
  res = compress_exp.run(c, out_dir=str(tmp_path / 'out'))
  assert res['rank_budget']['used_params'] <= res['rank_budget']['budget_params']
  assert not stale.exists()  # cleared: the tiny model has no block 7
