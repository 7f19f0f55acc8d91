"""The 'gptq' export, proven by loading it with transformers' GPTQ integration (GPTQModel's CPU
kernel, in a separate process) and matching our logits; the import of weights GPTQModel's own
packer wrote; and what the format cannot hold, refused before anything is written. Group sizes
that do not divide an input width (a shorter last group) export, load back bit for bit, load in
transformers and pack in GPTQModel as ours do. Phi-3's fused ``qkv_proj`` and ``gate_up_proj``
(a tiny random Phi-3 of transformers' own ``Phi3Config``) export as one packed matrix each, load in
transformers + GPTQModel with our logits, and split back into our q/k/v and gate/up leaves.

Tolerance: the loaders dequantize in float16 (``(code - zero) * scale`` rounded to float16), so
their weights equal ours to float16 rounding (relative 2^-11 of each weight) and the tiny model's
logits (about 3 in magnitude) to 1e-2.
"""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import gptq as gptq_lib
from compress import matrix
from compress import pipeline
from compress import quantize
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import config as config_lib_exp
from experiments import tiny_families as families
from kernels import QuantSpec, formats
from models import config as config_lib
from models import export
from models import gptq_format
from models import llama
from models import loading
from models import tree
from recover import compensate

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('optimum')
pytest.importorskip('gptqmodel')

Q4 = QuantSpec(bits=4, group_size=32)
CASES = {
    'gptq_w4g32_act_order': rules_lib.LinearSpec(quant='gptq', qspec=Q4, act_order=True),
    'rtn_w3g32_sym': rules_lib.LinearSpec(
        quant='rtn', qspec=QuantSpec(bits=3, group_size=32, symmetric=True)),
    'awq_w4g32': rules_lib.LinearSpec(quant='awq', qspec=Q4),
    'gptq_w8_per_channel': rules_lib.LinearSpec(
        quant='gptq', qspec=QuantSpec(bits=8, group_size=-1)),
}


def _tiny():
  cfg = config_lib.tiny_config(num_layers=2, tie_word_embeddings=False)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  return cfg, params, calib


def _with_zero_point_0(params):
  """The same model with one zero point set to 0, which only the v2 convention can write."""
  leaf = params['layers'][0]['self_attn']['q_proj']['kernel']
  q = leaf.weight
  q = dataclasses.replace(q, zeros=q.zeros.at[0, 0].set(0))
  out = jax.tree.map(lambda x: x, params)
  out['layers'][0]['self_attn']['q_proj']['kernel'] = dataclasses.replace(leaf, weight=q)
  return out


def _weights_to_pack(model, tmp):
  """The float weights, scales, zeros and g_idx of every block linear, for GPTQModel's packer."""
  arrays = {}
  for module, leaf in export.block_linears(model).items():
    q = leaf.weight
    scales = np.asarray(q.scales, np.float16).astype(np.float32)
    arrays[f'{module}.w'] = np.asarray(formats.dequantize(dataclasses.replace(
        q, scales=jnp.asarray(scales)))).T.copy()
    arrays[f'{module}.scales'] = scales
    arrays[f'{module}.zeros'] = np.asarray(q.zeros, np.int32)
    arrays[f'{module}.g_idx'] = np.asarray(q.group_index(), np.int32)
    arrays['bits'], arrays['group_size'] = np.asarray(q.bits), np.asarray(q.group_size)
  np.savez(tmp / 'to_pack.npz', **arrays)
  return tmp / 'to_pack.npz'


def _export_job(tmp, name: str, model, cfg, weight: str) -> dict:
  """Exports ``model`` as ``tmp/name`` (a ``*_peft`` name: adapters on a gptq base, else gptq)
  and returns the third-party loader's job for it (logits on ``tmp/tokens.npy``, ``weight``)."""
  if name.endswith('_peft'):
    export.save(tmp / name, 'peft', model, cfg, peft_base='gptq')
    job = {'base': str(tmp / name / 'base'), 'adapter': str(tmp / name / 'adapter')}
  else:
    export.save(tmp / name, 'gptq', model, cfg)
    job = {'base': str(tmp / name), 'adapter': None}
  return dict(job, tokens=str(tmp / 'tokens.npy'), out=str(tmp / f'{name}.npy'), weight=weight)


@pytest.fixture(scope='module')
def loaded(tmp_path_factory):
  """Every case exported, loaded by transformers + GPTQModel in one subprocess."""
  tmp = tmp_path_factory.mktemp('gptq')
  cfg, params, calib = _tiny()
  tokens = calib[:2]
  np.save(tmp / 'tokens.npy', tokens)
  models, jobs = {}, []
  for name, spec in CASES.items():
    out, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False)
    models[name] = out
  models['v2_zero_point_0'] = _with_zero_point_0(models['gptq_w4g32_act_order'])
  eora, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(CASES['awq_w4g32']),
                                    progress=False,
                                    recovery=compensate.Compensator(method='eora', rank=8))
  models['awq_w4g32_eora_peft'] = eora
  for name, model in models.items():
    jobs.append(_export_job(tmp, name, model, cfg, 'model.layers.0.self_attn.q_proj'))
  jobs.append({'pack': str(_weights_to_pack(models['gptq_w4g32_act_order'], tmp)),
               'out': str(tmp / 'packed_by_gptqmodel.npz')})
  (tmp / 'jobs.json').write_text(json.dumps(jobs))
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.third_party', str(tmp / 'jobs.json')],
      capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return cfg, models, tokens, tmp


@pytest.mark.parametrize('name', list(CASES) + ['v2_zero_point_0', 'awq_w4g32_eora_peft'])
def test_transformers_gptq_loads_the_export_and_matches_our_logits(loaded, name):
  cfg, models, tokens, tmp = loaded
  model = models[name]
  want = np.asarray(llama.forward(model, jnp.asarray(tokens), cfg))
  got = np.load(tmp / f'{name}.npy')
  np.testing.assert_allclose(got, want, atol=1e-2, rtol=0)
  # The loader's weight is ours to float16 rounding (scales are stored in float16).
  leaf = model['layers'][0]['self_attn']['q_proj']['kernel'].weight
  ours = np.asarray(formats.dequantize(dataclasses.replace(
      leaf, scales=jnp.asarray(leaf.scales, jnp.float16).astype(jnp.float32))))
  theirs = np.load(tmp / f'{name}.npy.w.npy')
  np.testing.assert_allclose(theirs, ours, rtol=2 ** -10, atol=1e-6)
  qcfg = json.loads(((tmp / name / 'base') if name.endswith('_peft') else tmp / name)
                    .joinpath('config.json').read_text())['quantization_config']
  assert qcfg['checkpoint_format'] == ('gptq_v2' if name.startswith('v2') else 'gptq')
  assert qcfg['desc_act'] == (leaf.g_idx is not None)


def test_round_trip_gives_identical_leaves_and_bytes(loaded, tmp_path):
  cfg, models, _, tmp = loaded
  for name in CASES:
    _, back = loading.load_hf_dir(tmp / name)
    for module, leaf in export.block_linears(models[name]).items():
      q, r = leaf.weight, export.block_linears(back)[module].weight
      for field in ('qweight', 'zeros'):
        np.testing.assert_array_equal(np.asarray(getattr(r, field)), np.asarray(getattr(q, field)))
      np.testing.assert_array_equal(np.asarray(r.scales), np.asarray(q.scales, np.float16))
      assert (r.g_idx is None) == (q.g_idx is None) and (r.bits, r.group_size, r.symmetric) == (
          q.bits, q.group_size, q.symmetric)
      if q.g_idx is not None:
        np.testing.assert_array_equal(np.asarray(r.g_idx), np.asarray(q.g_idx))
    again = export.save(tmp_path / name, 'gptq', back, cfg)
    assert (again / 'model.safetensors').read_bytes() == (tmp / name / 'model.safetensors'
                                                          ).read_bytes()


@pytest.mark.parametrize('convention', ['gptq', 'gptq_v2'])
def test_weights_gptqmodel_packed_load_into_our_leaves(loaded, tmp_path, convention):
  """GPTQModel's own packer, from the float weights, in both zero-point conventions: a
  checkpoint of its tensors loads to our leaves (codes, zeros and act-order groups equal)."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  cfg, models, tokens, tmp = loaded
  name = 'gptq_w4g32_act_order'
  theirs = np.load(tmp / 'packed_by_gptqmodel.npz')
  tensors = load_file(str(tmp / name / 'model.safetensors'))
  suffix = '_v1' if convention == 'gptq' else '_v2'
  for module in export.block_linears(models[name]):
    tensors[f'{module}.qweight'] = theirs[f'{module}.qweight']
    tensors[f'{module}.qzeros'] = theirs[f'{module}.qzeros{suffix}']
  out = tmp_path / convention
  out.mkdir()
  save_file(tensors, str(out / 'model.safetensors'))
  config = json.loads((tmp / name / 'config.json').read_text())
  config['quantization_config']['checkpoint_format'] = convention
  (out / 'config.json').write_text(json.dumps(config))
  _, back = loading.load_hf_dir(out)
  for module, leaf in export.block_linears(models[name]).items():
    r = export.block_linears(back)[module]
    assert isinstance(r, formats.CompressedLinear)
    np.testing.assert_array_equal(np.asarray(r.weight.ints()), np.asarray(leaf.weight.ints()))
    np.testing.assert_array_equal(np.asarray(r.weight.zeros), np.asarray(leaf.weight.zeros))
    np.testing.assert_array_equal(np.asarray(r.weight.group_index()),
                                  np.asarray(leaf.weight.group_index()))
  want = np.asarray(llama.forward(models[name], jnp.asarray(tokens), cfg))
  np.testing.assert_allclose(np.asarray(llama.forward(back, jnp.asarray(tokens), cfg)), want,
                             atol=2e-3, rtol=0)


def _compressed(spec, params=None, rules=None):
  cfg, p, calib = _tiny()
  rules = rules if rules is not None else rules_lib.uniform(spec)
  out, _ = pipeline.compress_model(p if params is None else params, cfg, calib, rules,
                                   progress=False)
  return cfg, out


@pytest.mark.parametrize('case, spec, rules, match', [
    ('mask', rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('0.5'), quant='gptq',
                                  qspec=Q4), None, 'q_proj carries a pruning mask'),
    ('2:4', rules_lib.LinearSpec(prune='sparsegpt', sparsity=PruneSpec.parse('2:4'),
                                 quant='gptq', qspec=Q4), None, 'q_proj is 2:4 sparse'),
    ('dense_linear', rules_lib.LinearSpec(quant='rtn', qspec=Q4),
     [rules_lib.Rule(r'layers/1/mlp/up_proj/kernel', None)] + rules_lib.uniform(
         rules_lib.LinearSpec(quant='rtn', qspec=Q4)), 'layers.1.mlp.up_proj is not quantized'),
    ('mixed_bits', rules_lib.LinearSpec(quant='rtn', qspec=Q4),
     [rules_lib.Rule(r'.*/down_proj/kernel', rules_lib.LinearSpec(
         quant='rtn', qspec=QuantSpec(bits=8, group_size=32)))] + rules_lib.uniform(
             rules_lib.LinearSpec(quant='rtn', qspec=Q4)), 'one setting for the whole model'),
])
def test_what_gptq_cannot_hold_is_refused_before_writing(tmp_path, case, spec, rules, match):
  del case
  cfg, model = _compressed(spec, rules=rules)
  with pytest.raises(export.ExportError, match=match):
    export.save(tmp_path / 'out', 'gptq', model, cfg)
  assert not (tmp_path / 'out').exists() and not (tmp_path / 'out.tmp').exists()


def test_adapters_are_not_merged_into_packed_weights(tmp_path):
  cfg, params, calib = _tiny()
  model, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(CASES['awq_w4g32']),
                                     progress=False,
                                     recovery=compensate.Compensator(method='svd', rank=4))
  with pytest.raises(export.ExportError, match='cannot be merged into gptq weights'):
    export.save(tmp_path / 'out', 'gptq', model, cfg)
  assert not (tmp_path / 'out').exists()
  path = export.save(tmp_path / 'out', 'gptq', model, cfg, merge_adapters=False)
  _, back = loading.load_hf_dir(path)
  assert all(leaf.adapter is None for leaf in export.block_linears(back).values())


def test_the_main_command_refuses_what_gptq_cannot_hold_before_any_work(tmp_path):
  """The same refusals from the flags alone, through the abstract leaves of the rules."""
  base = dict(model='tiny-llama', calib_data='shakespeare', eval_data=('shakespeare',),
              calib_seqlen=32, eval_seqlen=32, group_size=32, probes='none')
  bad = {
      'carries a pruning mask': dict(prune='wanda', sparsity='0.5', quant='gptq', bits=4),
      'is 2:4 sparse': dict(prune='wanda', sparsity='2:4'),
      'up_proj is not quantized': dict(quant='gptq', bits=4, rules=('.*/up_proj/kernel=none',)),
      'cannot hold the low-rank adapters': dict(quant='gptq', bits=4, recover='eora'),
      'one setting for the whole model': dict(quant='gptq', bits=4,
                                              rules=('.*/down_proj/kernel=8',)),
  }
  for want, flags in bad.items():
    problems = config_lib_exp.validate(config_lib_exp.CompressConfig(**base, **flags,
                                                                     export='gptq'),
                                       out_dir=str(tmp_path / 'run'))
    assert any(want in p for p in problems), (want, problems)
  ok = config_lib_exp.validate(config_lib_exp.CompressConfig(
      **base, quant='gptq', bits=4, recover='eora', rank=8, export='peft', peft_base='gptq'),
                               out_dir=str(tmp_path / 'run'))
  assert ok == []


def test_abstract_leaves_have_the_structure_compression_gives():
  cfg, params, calib = _tiny()
  specs = list(CASES.values()) + [
      rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('2:4')),
      rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('0.5')),
      rules_lib.LinearSpec(prune='sparsegpt', sparsity=PruneSpec.parse('2:4'), quant='gptq',
                           qspec=Q4),
      rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('2:4'), quant='gptq',
                           qspec=Q4, act_order=True),
      rules_lib.LinearSpec(quant='gptq', qspec=Q4, act_order=True, static_groups=True)]
  shape_of = lambda x: (tuple(x.shape), np.dtype(x.dtype).name)
  for spec in specs:
    out, _ = pipeline.compress_model(params, cfg, calib[:2], rules_lib.uniform(spec),
                                     progress=False)
    leaf = out['layers'][0]['mlp']['down_proj']['kernel']
    abstract = matrix.abstract_leaf(spec, (cfg.intermediate_size, cfg.hidden_size))
    assert jax.tree.structure(abstract) == jax.tree.structure(leaf), spec.describe()
    assert jax.tree.leaves(jax.tree.map(shape_of, abstract)) == jax.tree.leaves(
        jax.tree.map(shape_of, leaf)), spec.describe()


def test_unreadable_gptq_configs_are_refused():
  with pytest.raises(ValueError, match="checkpoint_format 'marlin'"):
    gptq_format.check_config({'quant_method': 'gptq', 'bits': 4, 'checkpoint_format': 'marlin'})
  with pytest.raises(ValueError, match='bits=5'):
    gptq_format.check_config({'quant_method': 'gptq', 'bits': 5})
  with pytest.raises(ValueError, match="quantization method 'bitsandbytes' is not supported"):
    loading.quantized_format('bitsandbytes')


# --------------------------------------------------------------------------- ragged groups

RAGGED = QuantSpec(bits=4, group_size=64)


def _ragged_model():
  """A one-block model with widths 96 and 160 quantized in groups of 64: every linear has a
  shorter last group (96 = 64 + 32, 160 = 64 + 64 + 32). q_proj is GPTQ with act-order (a
  g_idx that permutes the ragged groups), the rest RTN."""
  cfg = config_lib.tiny_config(num_layers=1, hidden_size=96, intermediate_size=160, num_heads=6,
                               num_kv_heads=2, head_dim=16)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  block = params['layers'][0]
  for lin in llama.block_linear_names(block):
    w = jnp.asarray(tree.get_linear(block, lin), jnp.float32)
    if lin == 'self_attn/q_proj':
      x = np.random.default_rng(0).standard_normal((64, w.shape[0])).astype(np.float32)
      x[:, ::5] *= 3.0  # act-order moves rows across the groups
      q, _ = gptq_lib.gptq(w, x.T @ x, RAGGED, act_order=True)
      assert q.g_idx is not None
    else:
      q = quantize.rtn(w, RAGGED)
    assert q.scales.shape[0] == -(-w.shape[0] // 64) and RAGGED.is_ragged(w.shape[0])
    block = tree.set_linear(block, lin, formats.CompressedLinear(weight=q))
  params = dict(params, layers=[block])
  return cfg, params


@pytest.fixture(scope='module')
def ragged(tmp_path_factory):
  """The ragged model exported, and (when the loaders run in time) loaded by transformers +
  GPTQModel and repacked by GPTQModel's packer, in one subprocess."""
  tmp = tmp_path_factory.mktemp('gptq_ragged')
  cfg, model = _ragged_model()
  path = export.save(tmp / 'ragged', 'gptq', model, cfg)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size))
  np.save(tmp / 'tokens.npy', tokens)
  jobs = [{'base': str(path), 'adapter': None, 'tokens': str(tmp / 'tokens.npy'),
           'out': str(tmp / 'ragged.npy'), 'weight': 'model.layers.0.self_attn.q_proj'},
          {'pack': str(_weights_to_pack(model, tmp)), 'out': str(tmp / 'packed_by_gptqmodel.npz')}]
  (tmp / 'jobs.json').write_text(json.dumps(jobs))
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.third_party', str(tmp / 'jobs.json')],
      capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return cfg, model, tokens, tmp, path


def test_ragged_groups_round_trip_bit_identically(ragged, tmp_path):
  cfg, model, _, _, path = ragged
  qcfg = json.loads((path / 'config.json').read_text())['quantization_config']
  assert (qcfg['bits'], qcfg['group_size'], qcfg['desc_act']) == (4, 64, True)
  _, back = loading.load_hf_dir(path)
  for module, leaf in export.block_linears(model).items():
    q, r = leaf.weight, export.block_linears(back)[module].weight
    assert r.scales.shape == q.scales.shape == (-(-q.in_features // 64), q.shape[1])
    for field in ('qweight', 'zeros'):
      np.testing.assert_array_equal(np.asarray(getattr(r, field)), np.asarray(getattr(q, field)))
    np.testing.assert_array_equal(np.asarray(r.scales), np.asarray(q.scales, np.float16))
    np.testing.assert_array_equal(np.asarray(r.group_index()), np.asarray(q.group_index()))
    assert (r.g_idx is None) == (q.g_idx is None)
  again = export.save(tmp_path / 'again', 'gptq', back, cfg)
  assert (again / 'model.safetensors').read_bytes() == (path / 'model.safetensors').read_bytes()


def test_transformers_reads_ragged_groups(ragged):
  cfg, model, tokens, tmp, _ = ragged
  want = np.asarray(llama.forward(model, jnp.asarray(tokens), cfg))
  np.testing.assert_allclose(np.load(tmp / 'ragged.npy'), want, atol=1e-2, rtol=0)
  leaf = model['layers'][0]['self_attn']['q_proj']['kernel'].weight
  ours = np.asarray(formats.dequantize(dataclasses.replace(
      leaf, scales=jnp.asarray(leaf.scales, jnp.float16).astype(jnp.float32))))
  np.testing.assert_allclose(np.load(tmp / 'ragged.npy.w.npy'), ours, rtol=2 ** -10, atol=1e-6)


def test_gptqmodel_packs_ragged_groups_as_we_do(ragged):
  _, model, _, tmp, _ = ragged
  theirs = np.load(tmp / 'packed_by_gptqmodel.npz')
  for module, leaf in export.block_linears(model).items():
    np.testing.assert_array_equal(theirs[f'{module}.qweight'], np.asarray(leaf.weight.qweight))


# --------------------------------------------------------------------------- Phi-3: fused modules

W3 = QuantSpec(bits=3, group_size=32)
PHI3_CASES = {  # name: (spec of every block linear, Phi3Config overrides)
    'phi3_gptq_w4g32': (rules_lib.LinearSpec(quant='gptq', qspec=Q4), {}),
    'phi3_gptq_w4g32_act_order': (rules_lib.LinearSpec(quant='gptq', qspec=Q4, act_order=True),
                                  {}),
    # head_dim 8: q/k/v are 32/16/16 columns, so at 3 bits (32 zeros in 3 int32 words) v's zero
    # points start inside a packed run of qkv_proj's qzeros.
    'phi3_hd8_rtn_w3g32': (rules_lib.LinearSpec(quant='rtn', qspec=W3), {'head_dim': 8}),
}
PHI3_FUSED = {'self_attn.qkv_proj': ('self_attn', ('q_proj', 'k_proj', 'v_proj')),
              'mlp.gate_up_proj': ('mlp', ('gate_proj', 'up_proj'))}


def _phi3(path, **overrides):
  """A tiny random Phi-3 (transformers' Phi3Config, saved and loaded: its fused matrices split)
  and calibration windows."""
  cfg, params = loading.load_hf_dir(families.save('phi3', path, **overrides))
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  return cfg, params, calib


def _parts(model, i, module):
  sub, lins = PHI3_FUSED[module]
  return [model['layers'][i][sub][lin]['kernel'] for lin in lins]


def _fp16_dense(q):
  """Our dequantized weight ``[in, out]`` with the scales rounded to float16, as stored."""
  return np.asarray(formats.dequantize(dataclasses.replace(
      q, scales=jnp.asarray(q.scales, jnp.float16).astype(jnp.float32))))


def _fp16_weights(model):
  """The model with each quantized block linear as the loader's float16 weight (codes minus zero
  times the float16 scale, rounded to float16 once), adapters kept."""
  leaves = {}
  for path, leaf in tree.linear_leaves(model).items():
    if isinstance(leaf, formats.CompressedLinear) and path.startswith('layers/'):
      w = jnp.asarray(_fp16_dense(leaf.weight), jnp.float16).astype(jnp.float32)
      leaves[path] = dataclasses.replace(leaf, weight=w)
  return tree.replace_leaves(model, leaves)


@pytest.fixture(scope='module')
def phi3(tmp_path_factory):
  """Every Phi-3 case compressed by the pipeline and exported (and an EoRA run as a PEFT adapter
  on its gptq base), loaded by transformers + GPTQModel in one subprocess."""
  tmp = tmp_path_factory.mktemp('gptq_phi3')
  models, jobs, tokens = {}, [], None
  for name, (spec, overrides) in PHI3_CASES.items():
    cfg, params, calib = _phi3(tmp / f'{name}_hf', **overrides)
    models[name] = (cfg, pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec),
                                                 progress=False)[0])
    if name == 'phi3_gptq_w4g32_act_order':
      eora, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec),
                                        progress=False,
                                        recovery=compensate.Compensator(method='eora', rank=4))
      models['phi3_gptq_w4g32_act_order_eora_peft'] = (cfg, eora)
    tokens = calib[:2]
  np.save(tmp / 'tokens.npy', tokens)
  for name, (cfg, model) in models.items():
    jobs.append(_export_job(tmp, name, model, cfg, 'model.layers.0.self_attn.qkv_proj'))
  (tmp / 'jobs.json').write_text(json.dumps(jobs))
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.third_party', str(tmp / 'jobs.json')],
      capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return models, tokens, tmp


@pytest.mark.parametrize('name', list(PHI3_CASES) + ['phi3_gptq_w4g32_act_order_eora_peft'])
def test_phi3_export_loads_in_transformers_gptq_and_matches_our_logits(phi3, name):
  models, tokens, tmp = phi3
  cfg, model = models[name]
  want = np.asarray(llama.forward(model, jnp.asarray(tokens), cfg))
  got = np.load(tmp / f'{name}.npy')
  rounded = np.asarray(llama.forward(_fp16_weights(model), jnp.asarray(tokens), cfg))
  print(f'{name}: max |logit diff| {np.abs(got - want).max():.2e} of {np.abs(want).max():.2f}; '
        f'against float16-rounded weights {np.abs(got - rounded).max():.2e}')
  np.testing.assert_allclose(got, want, atol=1e-2, rtol=0)
  # All of that difference is the float16 rounding of the weights (Phi-3's logits are larger than
  # the tiny Llama's): with our weights rounded the same way the logits agree to float32 sums.
  np.testing.assert_allclose(got, rounded, atol=1e-4, rtol=0)
  # The loader's qkv_proj ([in, out], as GPTQModel dequantizes it) is our q, k and v side by
  # side, to float16 rounding of the scales.
  ours = np.concatenate([_fp16_dense(leaf.weight) for leaf in _parts(model, 0,
                                                                      'self_attn.qkv_proj')], 1)
  np.testing.assert_allclose(np.load(tmp / f'{name}.npy.w.npy'), ours, rtol=2 ** -10, atol=1e-6)
  base = tmp / name / 'base' if name.endswith('_peft') else tmp / name
  qcfg = json.loads((base / 'config.json').read_text())['quantization_config']
  assert qcfg['desc_act'] == ('act_order' in name)
  tensors = loading.SafetensorsFile(base / 'model.safetensors').keys()
  assert 'model.layers.1.mlp.gate_up_proj.qweight' in tensors
  assert not any('.q_proj.' in t or '.gate_proj.' in t for t in tensors)


def test_phi3_act_order_is_one_permutation_per_fused_module(phi3):
  """The pipeline solves q/k/v (and gate/up) under one rule as one matrix of one H: one act-order
  permutation, which the fused module's one g_idx holds."""
  models, _, _ = phi3
  _, model = models['phi3_gptq_w4g32_act_order']
  for i in range(2):
    for module in PHI3_FUSED:
      g = [np.asarray(leaf.weight.g_idx) for leaf in _parts(model, i, module)]
      assert all(np.array_equal(x, g[0]) for x in g), (i, module)
      assert np.any(g[0] != np.arange(g[0].size) // 32), (i, module)  # not contiguous


@pytest.mark.parametrize('name', list(PHI3_CASES))
def test_phi3_import_splits_the_fused_matrices_exactly(phi3, tmp_path, name):
  """The export read back: q/k/v and gate/up leaves with our codes, zeros, float16 scales and
  g_idx; each part dequantizes to its columns of the fused matrix; a second export is the same
  file."""
  models, _, tmp = phi3
  cfg, model = models[name]
  _, back = loading.load_hf_dir(tmp / name)
  for module, leaf in export.block_linears(model).items():
    q, r = leaf.weight, export.block_linears(back)[module].weight
    for field in ('qweight', 'zeros'):
      np.testing.assert_array_equal(np.asarray(getattr(r, field)), np.asarray(getattr(q, field)))
    np.testing.assert_array_equal(np.asarray(r.scales), np.asarray(q.scales, np.float16))
    assert (r.bits, r.group_size, r.symmetric, r.in_features) == (
        q.bits, q.group_size, q.symmetric, q.in_features)
    assert (r.g_idx is None) == (q.g_idx is None)
    if q.g_idx is not None:
      np.testing.assert_array_equal(np.asarray(r.g_idx), np.asarray(q.g_idx))
  f = loading.SafetensorsFile(tmp / name / 'model.safetensors')
  qcfg = json.loads((tmp / name / 'config.json').read_text())['quantization_config']
  for i in range(cfg.num_layers):
    for module in PHI3_FUSED:
      fused = gptq_format.read_linear(f'model.layers.{i}.{module}', f.get, cfg.hidden_size, qcfg)
      parts = [np.asarray(formats.to_dense(leaf)) for leaf in _parts(back, i, module)]
      np.testing.assert_array_equal(np.concatenate(parts, axis=1),
                                    np.asarray(formats.to_dense(fused)))
  again = export.save(tmp_path / 'again', 'gptq', back, cfg)
  assert (again / 'model.safetensors').read_bytes() == (tmp / name / 'model.safetensors'
                                                        ).read_bytes()


PHI3_Q3 = rules_lib.LinearSpec(quant='rtn', qspec=W3)
PHI3_RTN4 = rules_lib.LinearSpec(quant='rtn', qspec=Q4)


@pytest.mark.parametrize('case, rules, match', [
    ('bits', [rules_lib.Rule(r'.*/q_proj/kernel', PHI3_Q3)] + rules_lib.uniform(PHI3_RTN4),
     r'^model\.layers\.0\.self_attn\.qkv_proj holds q_proj, k_proj, v_proj fused into one '
     r'matrix, but k_proj is 4-bit and q_proj 3-bit: [^\n]*$'),
    ('group_size', [rules_lib.Rule(r'.*/up_proj/kernel', rules_lib.LinearSpec(
        quant='rtn', qspec=QuantSpec(bits=4, group_size=64)))] + rules_lib.uniform(PHI3_RTN4),
     r'model\.layers\.0\.mlp\.gate_up_proj holds gate_proj, up_proj fused into one matrix, but '
     r'up_proj has groups of 64 and gate_proj groups of 32'),
    ('act_order', [rules_lib.Rule(r'.*/q_proj/kernel', rules_lib.LinearSpec(
        quant='gptq', qspec=Q4, act_order=True))] + rules_lib.uniform(
            rules_lib.LinearSpec(quant='gptq', qspec=Q4)),
     r'qkv_proj holds q_proj, k_proj, v_proj fused into one matrix, but k_proj has contiguous '
     r'groups and q_proj an act-order g_idx'),
    ('dense_part', [rules_lib.Rule(r'.*/k_proj/kernel', None)] + rules_lib.uniform(PHI3_RTN4),
     r'qkv_proj holds q_proj, k_proj, v_proj fused into one matrix, but k_proj is dense and '
     r'q_proj quantized'),
])
def test_phi3_parts_that_cannot_be_one_matrix_are_refused(tmp_path, case, rules, match):
  cfg, params, calib = _phi3(tmp_path / 'hf')
  model, _ = pipeline.compress_model(params, cfg, calib[:2], rules, progress=False)
  with pytest.raises(export.ExportError, match=match):
    export.save(tmp_path / 'out', 'gptq', model, cfg)
  assert not (tmp_path / 'out').exists() and not (tmp_path / 'out.tmp').exists(), case


def test_phi3_format_refusals_name_the_fused_parts(tmp_path):
  cfg, params, _ = _phi3(tmp_path / 'hf')
  with pytest.raises(export.ExportError, match=r'^model\.layers\.0\.self_attn\.qkv_proj \(fused '
                     r'q_proj, k_proj, v_proj\) is not quantized: '):
    export.save(tmp_path / 'out', 'gptq', params, cfg)
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('family, widths', [('mixtral', {'intermediate_size': 64}),
                                             ('qwen2_moe', {'moe_intermediate_size': 64})])
def test_a_mixture_exports_with_a_warning_and_reads_back_exactly(family, widths, tmp_path):
  """A packed mixture is written one module per expert (the names of the published GPTQ
  mixtures), with a warning that transformers 5 does not load it; our loader reads every expert
  back with identical codes and zeros."""
  # Expert widths the format packs (multiples of 32).
  cfg, params = loading.load_hf_dir(families.save(family, tmp_path / 'dense', **widths))
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  model, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(
      rules_lib.LinearSpec(quant='rtn', qspec=Q4)), progress=False)
  with pytest.warns(UserWarning, match='transformers 5 does not load them'):
    path = export.save(tmp_path / 'gptq', 'gptq', model, cfg)
  _, back = loading.load_hf_dir(path)
  ours, theirs = export.block_linears(model), export.block_linears(back)
  assert set(ours) == set(theirs)
  experts = [m for m in ours if '.experts.' in m]
  assert experts and all(isinstance(ours[m], formats.CompressedLinear) for m in experts)
  for module, leaf in ours.items():
    if not isinstance(leaf, formats.CompressedLinear):  # the router stays dense
      continue
    for field in ('qweight', 'zeros'):
      np.testing.assert_array_equal(np.asarray(getattr(theirs[module].weight, field)),
                                    np.asarray(getattr(leaf.weight, field)), err_msg=module)
