"""The sequential pipeline on the tiny random Llama: shapes, leaf types, resume, recipes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import allocate, calibration, pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from kernels import formats, QuantSpec
from models import checkpoint, llama, tree
from tests.utils import tiny_model


@pytest.fixture(scope='module')
def tiny():
  return tiny_model(calib_shape=(8, 32))


def _spec(**kw):
  return rules_lib.LinearSpec(**kw)


GPTQ3 = _spec(quant='gptq', qspec=QuantSpec(bits=3, group_size=32))
WANDA24 = _spec(prune='wanda', sparsity=PruneSpec.parse('2:4'))
SGPT50_GPTQ4 = _spec(prune='sparsegpt', sparsity=PruneSpec.parse('0.5'), quant='gptq',
                     qspec=QuantSpec(bits=4, group_size=32))


def _leaves(params):
  return [b[s][n]['kernel'] for b in params['layers'] for s, n in
          (x.split('/') for x in llama.LINEAR_NAMES)]


@pytest.mark.parametrize('spec,weight_type', [
    (GPTQ3, formats.QuantizedWeight),
    (WANDA24, formats.Sparse24Weight),
    (_spec(prune='sparsegpt', sparsity=PruneSpec.parse('2:4'), quant='gptq',
           qspec=QuantSpec(bits=4, group_size=32)), formats.Sparse24Weight),
    (SGPT50_GPTQ4, formats.QuantizedWeight),
    (_spec(prune='magnitude', sparsity=PruneSpec.parse('0.5')), jax.Array),
    (_spec(quant='rtn', qspec=QuantSpec(bits=4, group_size=-1)), formats.QuantizedWeight),
])
def test_leaf_types_shapes_and_forward(tiny, spec, weight_type):
  cfg, params, calib = tiny
  out, reports = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False)
  assert len(reports) == 7 * cfg.num_layers
  for leaf, dense in zip(_leaves(out), _leaves(params)):
    assert isinstance(leaf, formats.CompressedLinear)
    assert isinstance(leaf.weight, weight_type)
    assert tuple(leaf.shape) == tuple(dense.shape)
  # Untouched: embeddings, norms, LM head.
  assert out['embed_tokens']['embedding'] is params['embed_tokens']['embedding']
  assert out['lm_head']['kernel'] is params['lm_head']['kernel']
  logits = llama.forward(out, jnp.asarray(calib[:2]), cfg)
  assert logits.shape == (2, 32, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
  for r in reports:
    assert 0 < r.rel_error < 1.0
  if spec.prune != 'none':
    assert all(abs(r.sparsity - 0.5) < 0.02 for r in reports)


def test_report_error_matches_direct_measurement(tiny):
  cfg, params, calib = tiny
  out, reports = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(GPTQ3),
                                         progress=False)
  # Block 0's q_proj input is the norm of the embeddings: identical for dense and compressed runs.
  x = llama.embed(params, jnp.asarray(calib), cfg)
  _, inputs = llama.block_apply(params['layers'][0], x, cfg, return_inputs=True)
  xin = inputs['attn_in'].reshape(-1, cfg.hidden_size)
  w = params['layers'][0]['self_attn']['q_proj']['kernel']
  w_hat = formats.to_dense(out['layers'][0]['self_attn']['q_proj']['kernel'])
  direct = float(jnp.linalg.norm(xin @ w - xin @ w_hat) / jnp.linalg.norm(xin @ w))
  assert reports[0].name == 'layers/0/self_attn/q_proj'
  np.testing.assert_allclose(reports[0].rel_error, direct, rtol=1e-3)


def test_propagated_inputs_differ_from_dense_inputs(tiny):
  cfg, params, calib = tiny
  a, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(GPTQ3), progress=False)
  b, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(GPTQ3), dense_inputs=True,
                                 progress=False)
  first = lambda p, i: formats.to_dense(p['layers'][i]['self_attn']['q_proj']['kernel'])
  np.testing.assert_array_equal(first(a, 0), first(b, 0))  # block 0 sees the same inputs
  assert not np.array_equal(first(a, 1), first(b, 1))


def test_true_sequential_runs_and_differs(tiny):
  cfg, params, calib = tiny
  a, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(GPTQ3), progress=False)
  b, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(GPTQ3),
                                 true_sequential=True, progress=False)
  da = formats.to_dense(a['layers'][0]['mlp']['down_proj']['kernel'])
  db = formats.to_dense(b['layers'][0]['mlp']['down_proj']['kernel'])
  assert not np.array_equal(da, db)


def test_resume_equals_uninterrupted(tiny, tmp_path):
  cfg, params, calib = tiny
  rules = rules_lib.uniform(SGPT50_GPTQ4)
  full, rep_full = pipeline.compress_model(params, cfg, calib, rules, progress=False)
  ckpt = tmp_path / 'ckpt'
  pipeline.compress_model(params, cfg, calib, rules, checkpoint_dir=str(ckpt), stop_after=1,
                          progress=False)
  resumed, rep_res = pipeline.compress_model(params, cfg, calib, rules, checkpoint_dir=str(ckpt),
                                             progress=False)
  jax.tree.map(np.testing.assert_array_equal, full, resumed)
  assert [r.name for r in rep_full] == [r.name for r in rep_res]
  # A different run refuses the checkpoint instead of mixing results.
  with pytest.raises(checkpoint.CheckpointError, match='different run'):
    pipeline.compress_model(params, cfg, calib, rules_lib.uniform(GPTQ3), checkpoint_dir=str(ckpt),
                            progress=False)
  # So do another batch size (it changes the statistics' rounding) and another input model, even
  # one that differs in a single weight of the last block.
  with pytest.raises(checkpoint.CheckpointError, match='different run'):
    pipeline.compress_model(params, cfg, calib, rules, checkpoint_dir=str(ckpt), batch_size=4,
                            progress=False)
  other = jax.tree.map(lambda x: x, params)
  other['layers'][-1] = tree.set_linear(
      other['layers'][-1], 'mlp/down_proj',
      tree.get_linear(other['layers'][-1], 'mlp/down_proj').at[0, 0].add(1e-3))
  with pytest.raises(checkpoint.CheckpointError, match='different run'):
    pipeline.compress_model(other, cfg, calib, rules, checkpoint_dir=str(ckpt), progress=False)


def test_rules_first_match_wins_and_none_skips(tiny):
  cfg, params, calib = tiny
  rules = [rules_lib.Rule(r'layers/0/.*', None),
           rules_lib.Rule(r'.*/mlp/down_proj/kernel', dataclasses.replace(
               GPTQ3, qspec=QuantSpec(bits=4, group_size=32)))] + rules_lib.uniform(GPTQ3)
  out, reports = pipeline.compress_model(params, cfg, calib, rules, progress=False)
  assert out['layers'][0]['mlp']['down_proj']['kernel'] is params['layers'][0]['mlp']['down_proj']['kernel']
  assert out['layers'][1]['mlp']['down_proj']['kernel'].weight.bits == 4
  assert out['layers'][1]['mlp']['up_proj']['kernel'].weight.bits == 3
  assert len(reports) == 7 * (cfg.num_layers - 1)


def test_parse_rule_and_errors():
  r = rules_lib.parse_rule('.*/down_proj/kernel=4', GPTQ3)
  assert r.spec.qspec.bits == 4
  assert rules_lib.parse_rule('.*=none', GPTQ3).spec is None
  with pytest.raises(ValueError, match='REGEX=BITS'):
    rules_lib.parse_rule('nothing', GPTQ3)
  with pytest.raises(ValueError, match='bits=5'):
    rules_lib.parse_rule('.*=5', GPTQ3)
  with pytest.raises(ValueError, match='unknown pruning method'):
    rules_lib.LinearSpec(prune='obs')
  with pytest.raises(ValueError, match='needs a sparsity'):
    rules_lib.LinearSpec(prune='wanda')


def test_group_size_not_dividing_is_an_error_before_work_only_for_sparsegpt(tiny):
  cfg, params, calib = tiny
  spec = _spec(quant='gptq', qspec=QuantSpec(bits=4, group_size=48))
  pipeline.validate_rules(params, rules_lib.uniform(spec))  # a shorter last group: fine
  joint = _spec(prune='sparsegpt', sparsity=PruneSpec.parse('0.5'), quant='gptq',
                qspec=QuantSpec(bits=4, group_size=48))
  with pytest.raises(ValueError, match='group_size=48 does not divide the input dimension 64'):
    pipeline.validate_rules(params, rules_lib.uniform(joint))


def test_nan_in_calibration_statistics_is_named(tiny):
  cfg, params, calib = tiny
  bad = jax.tree.map(lambda x: x, params)
  bad['embed_tokens'] = {'embedding': params['embed_tokens']['embedding'].at[int(calib[0, 0])].set(jnp.nan)}
  with pytest.raises(ValueError, match='layers/0'):
    pipeline.compress_model(bad, cfg, calib, rules_lib.uniform(GPTQ3), progress=False)


def test_lm_head_only_when_asked(tiny):
  cfg, params, calib = tiny
  spec = _spec(quant='rtn', qspec=QuantSpec(bits=8, group_size=32))
  out, reports = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec, include_head=True),
                                         progress=False)
  assert isinstance(out['lm_head']['kernel'], formats.CompressedLinear)
  assert reports[-1].name == 'lm_head'


def test_auto_bits_meets_budget_and_mixes(tiny):
  cfg, params, calib = tiny
  spec = _spec(quant='rtn', qspec=QuantSpec(bits=3, group_size=32))
  rules = allocate.auto_bits_rules(params, cfg, calib, spec, budget=2.5, candidates=(2, 3, 4),
                                   progress=False)
  sizes = {r.pattern: None for r in rules}
  assert len(sizes) == 7 * cfg.num_layers
  out, _ = pipeline.compress_model(params, cfg, calib, rules, progress=False)
  bits, count = [], []
  for leaf in _leaves(out):
    bits.append(leaf.weight.bits)
    count.append(np.prod(leaf.shape))
  avg = float(np.dot(bits, count) / np.sum(count))
  assert avg <= 2.5 + 1e-9 and avg > 2.2
  assert len(set(bits)) > 1
  with pytest.raises(ValueError, match='outside the candidates'):
    allocate.auto_bits_rules(params, cfg, calib, spec, budget=5.0, progress=False)
  # The user's rules win: a linear they fix (here: left dense) is not allocated.
  keep = [rules_lib.parse_rule('.*/down_proj/kernel=none', spec)]
  allotted = allocate.auto_bits_rules(params, cfg, calib, spec, budget=2.5, progress=False,
                                      keep=keep)
  assert len(allotted) == 6 * cfg.num_layers
  assert not any('down_proj' in r.pattern for r in allotted)
  out, _ = pipeline.compress_model(params, cfg, calib, keep + allotted + rules_lib.uniform(spec),
                                   progress=False)
  assert not isinstance(tree.get_linear(out['layers'][0], 'mlp/down_proj'),
                        formats.CompressedLinear)


def test_orbax_round_trip_of_compressed_model(tiny, tmp_path):
  cfg, params, calib = tiny
  out, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(SGPT50_GPTQ4),
                                   progress=False)
  checkpoint.save_model(tmp_path / 'm', out, cfg)
  cfg2, back, _ = checkpoint.load_model(tmp_path / 'm')
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, out, back)
  tokens = jnp.asarray(calib[:1])
  np.testing.assert_array_equal(llama.forward(out, tokens, cfg), llama.forward(back, tokens, cfg))


def test_precomputed_dense_stats_equal_dense_input_run(tiny):
  cfg, params, calib = tiny
  rules = rules_lib.uniform(WANDA24)
  a, rep_a = pipeline.compress_model(params, cfg, calib, rules, dense_inputs=True, progress=False)
  stats = calibration.dense_statistics(params, cfg, calib, progress=False)
  b, rep_b = pipeline.compress_model(params, cfg, calib, rules, precomputed_stats=stats,
                                     progress=False)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # Collected in the run, Wanda's statistics hold diag(H) alone and its reports say so; the
  # precomputed ones are whole. Same masks either way.
  assert all(r.extra.get('rel_error') == 'diagonal H' for r in rep_a)
  assert not any('rel_error' in r.extra for r in rep_b)
  with pytest.raises(ValueError, match='true_sequential'):
    pipeline.compress_model(params, cfg, calib, rules, precomputed_stats=stats, true_sequential=True,
                            progress=False)


def test_awq_folds_scales_and_keeps_the_function(tiny):
  cfg, params, calib = tiny
  spec = _spec(quant='awq', qspec=QuantSpec(bits=8, group_size=32))
  out, reports = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False)
  assert len(reports) == 7 * cfg.num_layers and all(r.seconds > 0 for r in reports)
  # 1/s went into the norms, s into the quantized rows: at 8 bits the model barely changes.
  assert not np.allclose(out['layers'][0]['input_layernorm']['scale'],
                         params['layers'][0]['input_layernorm']['scale'])
  tokens = jnp.asarray(calib[:2])
  ref, got = llama.forward(params, tokens, cfg), llama.forward(out, tokens, cfg)
  assert float(jnp.abs(got - ref).max()) < 0.05 * float(jnp.abs(ref).max())


@pytest.mark.parametrize('other', ['.*/k_proj/kernel=none', '.*/up_proj/kernel=none'])
def test_awq_mixed_with_another_method_keeps_the_function(tiny, other):
  """A linear that shares AWQ's input (or produces it) but is not AWQ-quantized must not see a
  folded 1/s it was not compensated for: the model stays as close as with AWQ everywhere."""
  cfg, params, calib = tiny
  spec = _spec(quant='awq', qspec=QuantSpec(bits=8, group_size=32))
  tokens = jnp.asarray(calib[:2])
  ref = llama.forward(params, tokens, cfg)
  err = {}
  for name, extra in (('all', []), ('mixed', [rules_lib.parse_rule(other, spec)])):
    out, _ = pipeline.compress_model(params, cfg, calib, extra + rules_lib.uniform(spec),
                                     progress=False)
    err[name] = float(jnp.abs(llama.forward(out, tokens, cfg) - ref).max())
  assert err['mixed'] <= 1.5 * err['all'] + 1e-6, err
