"""Qwen3, Gemma 2, Gemma 3, Phi-3 and the mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE)
against transformers, and every stage on each.

Tiny random models are built from transformers' own config classes (no download): logits on a
right-padded batch longer than the sliding window, greedy generation with the KV cache past the
window, the export read back by transformers, then compression (Wanda 2:4, GPTQ 4-bit), EoRA,
reconstruction, LoRA and IDP on each family.
"""

import dataclasses
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from kernels import QuantSpec
from models import config as config_lib
from models import evaluate
from models import export
from models import llama
from models import loading
from models import tree
from recover import compensate
from recover import finetune
from recover import prompting
from recover import reconstruct as rec
from recover import train
from experiments import tiny_families as families

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PARITY_TOL = 1e-4


@pytest.fixture(scope='module', params=families.FAMILIES + families.MOE_FAMILIES)
def family(request, tmp_path_factory):
  """``(name, transformers model, our config, our params, checkpoint dir)``."""
  name = request.param
  path = tmp_path_factory.mktemp(name)
  model, _ = families.hf_model(name)
  model.save_pretrained(path, safe_serialization=True)
  cfg, params = loading.load_hf_dir(path)
  return name, model, cfg, params, path


def _padded_batch(vocab: int):
  tokens = np.random.default_rng(0).integers(1, vocab, size=(2, 3 * families.SLIDING_WINDOW))
  mask = np.ones_like(tokens)
  mask[1, -6:] = 0  # right padding: the real positions never see it under causal attention
  tokens[1, -6:] = 0
  return tokens, mask.astype(bool)


def test_config_fields(family):
  name, _, cfg, params, _ = family
  assert cfg.model_type == {'gemma3': 'gemma3_text'}.get(name, name)
  if name in families.MOE_FAMILIES:
    mlp = params['layers'][0]['mlp']
    assert len(mlp['experts']) == cfg.num_experts == families.NUM_EXPERTS
    assert mlp['gate']['kernel'].shape == (64, families.NUM_EXPERTS)
    assert ('shared_expert' in mlp) == (name == 'qwen2_moe')
    assert cfg.norm_topk_prob == (name != 'qwen2_moe')
  attn = params['layers'][0]['self_attn']
  assert ('q_norm' in attn) == (name in ('qwen3', 'gemma3', 'qwen3_moe'))
  assert ('pre_feedforward_layernorm' in params['layers'][0]) == name.startswith('gemma')
  if name.startswith('gemma'):
    assert cfg.layer(0).sliding_window == families.SLIDING_WINDOW
    assert cfg.layer(1).sliding_window is None
  if name == 'gemma3':  # the local base on sliding layers, the scaled global one elsewhere
    assert (cfg.layer(0).rope_theta, cfg.layer(0).rope_linear_factor) == (10000.0, 1.0)
    assert (cfg.layer(1).rope_theta, cfg.layer(1).rope_linear_factor) == (1e6, 2.0)
  if name == 'phi3':  # the fused matrices arrive split
    assert params['layers'][0]['self_attn']['k_proj']['kernel'].shape == (64, 32)
    assert params['layers'][0]['mlp']['up_proj']['kernel'].shape == (64, 96)
    assert cfg.rotary_dim == 8


def test_logits_match_transformers(family):
  name, model, cfg, params, _ = family
  tokens, mask = _padded_batch(cfg.vocab_size)
  with torch.no_grad():
    ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits
  out = np.asarray(jax.jit(lambda p, t: llama.forward(p, t, cfg))(params, jnp.asarray(tokens)))
  ref = ref.numpy()
  assert np.abs(ref[mask]).max() > 1.0, name  # not a comparison of near-zero tensors
  assert np.abs(out[mask] - ref[mask]).max() < PARITY_TOL, name


def test_family_features_matter(family):
  """Each family-specific piece changes the logits (so the parity test would catch its absence)."""
  name, _, cfg, params, _ = family
  tokens, _ = _padded_batch(cfg.vocab_size)
  base = np.asarray(llama.forward(params, jnp.asarray(tokens), cfg))
  variants = {}
  if cfg.sliding_window:
    variants['sliding window'] = dict(sliding_window=None, layer_types=None, rope_local_theta=None)
  if name in families.MOE_FAMILIES:
    variants['top-k renormalisation'] = dict(norm_topk_prob=not cfg.norm_topk_prob)
  if name == 'gemma2':
    variants.update(softcap=dict(attn_softcap=None, final_softcap=None),
                    norm=dict(norm_plus_one=False), scale=dict(query_pre_attn_scalar=None))
  if name == 'phi3':
    variants['partial rotary'] = dict(partial_rotary_factor=1.0)
  if name in ('gemma2', 'gemma3'):
    variants['embedding scale'] = dict(embed_scale=False)
  if name in ('qwen3', 'qwen3_moe'):
    variants['q/k norm'] = None
  for what, change in variants.items():
    if change is None:
      p = jax.tree.map(lambda x: x, params)
      for layer in p['layers']:
        del layer['self_attn']['q_norm'], layer['self_attn']['k_norm']
      other = llama.forward(p, jnp.asarray(tokens), dataclasses.replace(cfg, qk_norm=False))
    else:
      other = llama.forward(params, jnp.asarray(tokens), dataclasses.replace(cfg, **change))
    assert np.abs(np.asarray(other) - base).max() > 1e-2, (name, what)


def test_greedy_generation_with_cache_matches_transformers(family, tmp_path):
  name, _, cfg, _, _ = family
  model, _ = families.hf_model(name, weight_std=0.05)  # smaller weights: varied tokens
  model.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = loading.load_hf_dir(tmp_path)
  prompt = np.random.default_rng(1).integers(1, cfg.vocab_size, size=(2, 12))
  n_new = 2 * families.SLIDING_WINDOW  # the cache runs past the window
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=int),
                         max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
  ours = np.asarray(llama.generate(params, jnp.asarray(prompt), cfg, max_new_tokens=n_new))
  np.testing.assert_array_equal(ours, ref.numpy()[:, prompt.shape[1]:])


def test_hf_export_reads_back_in_transformers(family, tmp_path):
  name, model, cfg, params, _ = family
  out = export.save_hf(tmp_path / 'out', params, cfg)
  again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager')
  tokens, mask = _padded_batch(cfg.vocab_size)
  with torch.no_grad():
    a = model(torch.tensor(tokens)).logits.numpy()
    b = again.float()(torch.tensor(tokens)).logits.numpy()
  assert np.abs(a - b).max() < 1e-5, name
  assert config_lib.from_hf_json(out) == cfg
  if name == 'phi3':
    with pytest.raises(export.ExportError, match='fused'):
      export.save(tmp_path / 'gptq', 'gptq', params, cfg)


def _sampled(params, cfg, n, seed):
  """Token windows drawn from the model itself: text on which its perplexity means something."""
  start = np.random.default_rng(seed).integers(1, cfg.vocab_size, size=(n, 1))
  gen = llama.generate(params, jnp.asarray(start), cfg, max_new_tokens=31, temperature=1.0,
                       key=jax.random.key(seed))
  return np.concatenate([start, np.asarray(gen)], axis=1)


WANDA24 = rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec(n=2, m=4))
GPTQ4 = rules_lib.LinearSpec(quant='gptq', qspec=QuantSpec(bits=4, group_size=-1))


def test_compression_and_recovery_on_each_family(family):
  name, _, cfg, params, _ = family
  calib, held = _sampled(params, cfg, 64, 0), _sampled(params, cfg, 16, 1)
  ppl = lambda p: evaluate.perplexity(p, cfg, held, progress=False)['ppl']
  dense = ppl(params)
  rows = {'dense': dense}
  for label, spec in (('wanda 2:4', WANDA24), ('gptq w4', GPTQ4)):
    # Adapters do not change what the next block sees (propagate_adapters=False), so the run's
    # compressed weights without their adapters are the compression alone.
    eora, reports = pipeline.compress_model(
        params, cfg, calib, rules_lib.uniform(spec), progress=False,
        recovery=compensate.Compensator(method='eora', rank=8))
    rows[label], rows[label + ' + eora'] = ppl(tree.strip_adapters(eora)), ppl(eora)
    if cfg.num_experts:  # every expert's report says how many calibration tokens it received
      routed = [r.extra['routed_tokens'] for r in reports if r.name.endswith('/up_proj')
                and '/experts/' in r.name]
      assert len(routed) == cfg.num_layers * cfg.num_experts
      per_block = np.asarray(routed).reshape(cfg.num_layers, cfg.num_experts).sum(axis=1)
      np.testing.assert_array_equal(per_block, calib.size * cfg.num_experts_per_tok)
    assert np.isfinite(rows[label]) and rows[label] > dense, (name, rows)
    assert rows[label + ' + eora'] < rows[label], (name, rows)
  print(name, json.dumps({k: round(float(v), 3) for k, v in rows.items()}))


# One family per code path of the recovery stages: Gemma's four norms and sliding layers, Phi-3's
# split matrices and partial rotary, a mixture with a shared expert, and one without.
RECOVERY_FAMILIES = ('gemma3', 'phi3', 'qwen2_moe', 'mixtral')


@pytest.mark.parametrize('name', RECOVERY_FAMILIES)
def test_reconstruction_lora_and_idp_run(name, tmp_path):
  cfg, params = loading.load_hf_dir(families.save(name, tmp_path))
  calib = _sampled(params, cfg, 8, 0)
  comp, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(WANDA24), progress=False)
  # Submodule windows: attention and MLP halves, each with its own norms (Gemma's four).
  config = rec.ReconConfig(window='submodule', epochs=3, batch_size=4,
                           optim=train.OptimConfig(lr=3e-3, warmup=0.0, weight_decay=0.0))
  out, reports = rec.reconstruct(comp, params, cfg, calib, config, progress=False)
  assert len(reports) == 2 * cfg.num_layers
  assert sum(r.loss_after for r in reports) < sum(r.loss_before for r in reports), name
  tuned, info = finetune.finetune(
      comp, cfg, calib, finetune.FinetuneConfig(method='lora', steps=4, batch_size=4, lora_rank=4),
      progress=False)
  assert np.isfinite(evaluate.perplexity(tuned, cfg, calib, progress=False)['ppl'])
  pool, idp = prompting.train_pool(
      comp, cfg, [calib[:4], calib[4:]],
      prompting.IDPConfig(num_prompts=2, prompt_len=2, steps=6, batch_size=2, lr=3e-2, seed=0))
  assert bool(np.all(np.isfinite(np.asarray(idp['losses']))))
  routed = prompting.forward_with_pool(comp, cfg, pool, jnp.asarray(calib[:2]))
  assert bool(jnp.all(jnp.isfinite(routed)))


@pytest.mark.parametrize('field,value,match', [
    ('rope_scaling', {'rope_type': 'longrope', 'short_factor': [1.0], 'long_factor': [1.0]},
     'unsupported rope_scaling type'),
    ('hidden_act', 'relu2', 'unsupported activation'),
    ('use_bidirectional_attention', True, 'use_bidirectional_attention'),
    ('layer_types', ['chunked_attention'] * 2, 'unsupported attention layer type'),
])
def test_unimplemented_fields_are_refused(field, value, match):
  base = {'architectures': ['Gemma2ForCausalLM' if field in ('use_bidirectional_attention',
                                                              'layer_types') else 'Phi3ForCausalLM'],
          'vocab_size': 32, 'hidden_size': 16, 'intermediate_size': 32, 'num_hidden_layers': 2,
          'num_attention_heads': 2, 'num_key_value_heads': 1, 'sliding_window': 4}
  with pytest.raises(ValueError, match=match):
    config_lib.from_hf_dict(dict(base, **{field: value}))


def test_multimodal_gemma3_is_refused_with_a_hint():
  with pytest.raises(ValueError, match='text-only Gemma3ForCausalLM'):
    config_lib.from_hf_dict({'architectures': ['Gemma3ForConditionalGeneration'],
                             'model_type': 'gemma3'})


# --------------------------------------------------------------------------- starved experts

def _starving_moe():
  """A tiny random mixture whose router never picks expert 1: every hidden state carries a large
  constant feature that the router weighs strongly against that expert."""
  cfg = config_lib.tiny_config(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  params['embed_tokens']['embedding'] = params['embed_tokens']['embedding'].at[:, 0].add(3.0)
  for block in params['layers']:
    block['mlp']['gate']['kernel'] = block['mlp']['gate']['kernel'].at[0, 1].set(-50.0)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  return cfg, params, calib


def _expert_reports(reports, e):
  return [r for r in reports if f'/experts/{e}/' in r.name]


@pytest.mark.parametrize('starved', pipeline.STARVED)
def test_starved_expert_is_reported_and_handled(starved):
  cfg, params, calib = _starving_moe()
  out, reports = pipeline.compress_model(
      params, cfg, calib, rules_lib.uniform(GPTQ4), progress=False,
      moe=pipeline.MoeCalibration(min_tokens=8, starved=starved))
  starving = _expert_reports(reports, 1)
  assert starving and all(r.extra['routed_tokens'] == 0 and r.extra['starved'] == starved
                          for r in starving)
  fed = _expert_reports(reports, 0)
  assert all(r.extra['routed_tokens'] > 0 and 'starved' not in r.extra for r in fed)
  for r in starving:
    assert r.method == ('rtn w4' if starved == 'rtn' else 'gptq w4'), r.method
  if starved == 'rtn':  # exactly round-to-nearest of the dense weight
    from compress import quantize  # pylint: disable=g-import-not-at-top
    w = tree.get_linear(params['layers'][0], 'mlp/experts/1/up_proj')
    ours = tree.get_linear(out['layers'][0], 'mlp/experts/1/up_proj').weight
    np.testing.assert_array_equal(np.asarray(ours.qweight),
                                  np.asarray(quantize.rtn(w, GPTQ4.qspec).qweight))
  else:  # calibrated on every token of the block instead
    assert all(np.isfinite(r.rel_error) for r in starving)
  assert np.isfinite(evaluate.perplexity(out, cfg, calib, progress=False)['ppl'])


def test_experts_calibrated_on_all_tokens():
  cfg, params, calib = _starving_moe()
  _, reports = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(GPTQ4), progress=False,
                                       moe=pipeline.MoeCalibration(routed=False))
  experts = [r for r in reports if '/experts/' in r.name]
  assert experts and all(r.extra['tokens'] == calib.size and 'starved' not in r.extra
                         for r in experts)


def test_main_command_on_a_mixture_reports_expert_tokens(tmp_path):
  """The main command on a tiny Qwen2-MoE checkpoint with a tokenizer: GPTQ + EoRA, evaluated,
  with every expert's calibration tokens in results.json."""
  from experiments import compress_lib, config  # pylint: disable=g-import-not-at-top
  model = families.save('qwen2_moe', tmp_path / 'model', tokenizer=True)
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('def main():\n    return compress(model, bits=4)\n' * 200)
  c = config.CompressConfig(model=str(model), quant='gptq', bits=4, group_size=-1, recover='eora',
                            rank=8, calib_data=str(corpus), calib_samples=8, calib_seqlen=32,
                            eval_data=(str(corpus),), eval_seqlen=32, eval_windows=4,
                            probes='none', batch_size=4, moe_min_tokens=40)
  res = compress_lib.run(c, out_dir=str(tmp_path / 'out'))
  assert all(np.isfinite(res[k]) for k in ('ppl_dense', 'ppl_compressed', 'ppl_recovered'))
  tokens = res['summary']['expert_tokens']
  assert sorted(tokens) == ['0', '1'] and all(len(t) == families.NUM_EXPERTS for t in tokens.values())
  assert all(sum(t) == 8 * 32 * 2 for t in tokens.values())  # top-2 of every calibration token
  starved = {f'layers/{b}/mlp/experts/{e}' for b, t in tokens.items() for e, n in enumerate(t)
             if n < 40}
  assert set(res['summary']['starved_experts']) == starved


# --------------------------------------------------------------------------- GGUF

_GGUF_BLOCK = {'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
               'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
               'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down',
               'input_layernorm': 'attn_norm', 'self_attn.q_norm': 'attn_q_norm',
               'self_attn.k_norm': 'attn_k_norm',
               # Phi-3's fused matrices keep their fusion (ffn_up: gate then up).
               'self_attn.qkv_proj': 'attn_qkv', 'mlp.gate_up_proj': 'ffn_up',
               # Mixtures: the router, Qwen2-MoE's shared expert and its gate.
               'mlp.gate': 'ffn_gate_inp', 'block_sparse_moe.gate': 'ffn_gate_inp',
               'mlp.shared_expert.gate_proj': 'ffn_gate_shexp',
               'mlp.shared_expert.up_proj': 'ffn_up_shexp',
               'mlp.shared_expert.down_proj': 'ffn_down_shexp',
               'mlp.shared_expert_gate': 'ffn_gate_inp_shexp'}
_GGUF_QWEN = dict(_GGUF_BLOCK, post_attention_layernorm='ffn_norm')
_GGUF_GEMMA = dict(_GGUF_BLOCK, post_attention_layernorm='post_attention_norm',
                   pre_feedforward_layernorm='ffn_norm',
                   post_feedforward_layernorm='post_ffw_norm')
_GGUF_ARCH = {'qwen3': 'qwen3', 'gemma2': 'gemma2', 'gemma3': 'gemma3', 'phi3': 'phi3',
              'mixtral': 'llama', 'qwen2_moe': 'qwen2moe', 'qwen3_moe': 'qwen3moe'}
# One expert's projection in a checkpoint (Mixtral's w1/w3/w2 are gate/up/down).
_HF_EXPERT = re.compile(
    r'model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight')
_GGUF_EXPERT = {'gate_proj': 'gate', 'w1': 'gate', 'up_proj': 'up', 'w3': 'up', 'down_proj': 'down',
                'w2': 'down'}


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter's q/k row permutation (``LlamaModel.permute``), which loading undoes."""
  rows = w.shape[0]
  return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(name: str, hf_dir, hf_cfg, path, extra=None):
  """A GGUF file of a tiny transformers checkpoint (saved in ``hf_dir``) written as llama.cpp's
  converter writes it: its tensor names and metadata keys, Gemma's norms stored as ``1 + w``,
  Mixtral as architecture ``llama`` with its q/k rows permuted (the others rotate halves), each
  projection's experts stacked into one ``[experts, out, in]`` tensor, Phi-3's fused matrices as
  they are. ``extra(writer)`` adds keys or tensors."""
  gguf = pytest.importorskip('gguf')
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  w = gguf.GGUFWriter(str(path), _GGUF_ARCH[name])
  w.add_context_length(hf_cfg.max_position_embeddings)
  w.add_embedding_length(hf_cfg.hidden_size)
  w.add_block_count(hf_cfg.num_hidden_layers)
  w.add_feed_forward_length(hf_cfg.intermediate_size)
  w.add_head_count(hf_cfg.num_attention_heads)
  w.add_head_count_kv(hf_cfg.num_key_value_heads)
  if name != 'phi3':  # Phi3MiniModel writes no head size (hidden / heads)
    w.add_key_length(hf_cfg.head_dim)
    w.add_value_length(hf_cfg.head_dim)
  w.add_layer_norm_rms_eps(hf_cfg.rms_norm_eps)
  w.add_vocab_size(hf_cfg.vocab_size)
  rope = hf_cfg.rope_parameters
  w.add_rope_freq_base((rope.get('full_attention') or rope)['rope_theta'])
  if name.startswith('gemma') or name == 'phi3':
    w.add_sliding_window(hf_cfg.sliding_window)
  if name == 'gemma2':
    w.add_attn_logit_softcapping(hf_cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(hf_cfg.final_logit_softcapping)
  if name == 'gemma3':
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(rope['full_attention']['factor'])
  if name == 'phi3':  # the rotated dims, as Phi3MiniModel computes them
    w.add_rope_dimension_count(int(rope.get('partial_rotary_factor', 1.0) * hf_cfg.hidden_size)
                               // hf_cfg.num_attention_heads)
    w.add_rope_scaling_orig_ctx_len(hf_cfg.original_max_position_embeddings)
  if name == 'mixtral':
    w.add_rope_dimension_count(hf_cfg.head_dim)
  if name in families.MOE_FAMILIES:
    w.add_expert_count(families.NUM_EXPERTS)
    w.add_expert_used_count(hf_cfg.num_experts_per_tok)
  if name in ('qwen2_moe', 'qwen3_moe'):
    w.add_expert_feed_forward_length(hf_cfg.moe_intermediate_size)
  if name == 'qwen2_moe':
    w.add_expert_shared_feed_forward_length(hf_cfg.shared_expert_intermediate_size)
  if extra is not None:
    extra(w)
  block = _GGUF_GEMMA if name.startswith('gemma') else _GGUF_QWEN
  experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
  for key, arr in load_file(pathlib.Path(hf_dir) / 'model.safetensors').items():
    arr = arr.astype(np.float32)
    if m := _HF_EXPERT.fullmatch(key):
      experts.setdefault((m[1], _GGUF_EXPERT[m[3]]), {})[int(m[2])] = arr
      continue
    if name == 'mixtral' and key.endswith(('q_proj.weight', 'k_proj.weight')):
      arr = _llama_permute(arr, hf_cfg.num_attention_heads if 'q_proj' in key
                           else hf_cfg.num_key_value_heads)
    if key.endswith('shared_expert_gate.weight'):
      arr = arr.reshape(-1)  # llama.cpp's tensor is [n_embd]
    if name.startswith('gemma') and key.endswith('norm.weight'):
      arr = arr + 1.0
    if key == 'model.embed_tokens.weight':
      out = 'token_embd.weight'
    elif key == 'model.norm.weight':
      out = 'output_norm.weight'
    elif key == 'lm_head.weight':
      if hf_cfg.tie_word_embeddings:
        continue
      out = 'output.weight'
    else:
      _, _, i, rest = key.split('.', 3)
      module, kind = rest.rsplit('.', 1)
      out = f'blk.{i}.{block[module]}.{kind}'
    w.add_tensor(out, np.ascontiguousarray(arr))
  for (i, proj), per_expert in experts.items():  # torch.stack(experts, dim=0), as the converter
    w.add_tensor(f'blk.{i}.ffn_{proj}_exps.weight',
                 np.stack([per_expert[e] for e in range(len(per_expert))]))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _gguf_of(name: str, tmp_path, extra=None, **overrides):
  """``(transformers model, its checkpoint dir, GGUF path)`` of a tiny ``family``."""
  model, hf_cfg = families.hf_model(name, **overrides)
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  return model, tmp_path / 'hf', _write_gguf(name, tmp_path / 'hf', hf_cfg,
                                             tmp_path / f'{name}.gguf', extra)


@pytest.mark.parametrize('name', families.FAMILIES + families.MOE_FAMILIES)
def test_gguf_matches_transformers(name, tmp_path):
  """A GGUF written with llama.cpp's conventions loads, whole and through the lazy reader
  (``--stream``), into the model transformers computes."""
  overrides = {}
  if name.startswith('gemma'):
    # Gemma's GGUF has no query_pre_attn_scalar: llama.cpp scales by head_dim (except for the
    # 27B models), and Gemma 3's layer pattern is fixed (one global layer in six).
    overrides['query_pre_attn_scalar'] = 16
  if name == 'gemma3':
    overrides.update(num_hidden_layers=6, layer_types=['sliding_attention'] * 5 + ['full_attention'])
  model, hf_dir, path = _gguf_of(name, tmp_path, **overrides)
  cfg, params = loading.load_gguf(path)
  ref_cfg, _ = loading.load_hf_dir(hf_dir)
  assert cfg.rms_norm_eps == pytest.approx(ref_cfg.rms_norm_eps)  # GGUF holds it in float32
  assert dataclasses.replace(cfg, rms_norm_eps=ref_cfg.rms_norm_eps) == dataclasses.replace(
      ref_cfg, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  assert loading.load_config(str(path)) == cfg  # from the header alone
  tokens, mask = _padded_batch(cfg.vocab_size)
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  out = np.asarray(llama.forward(params, jnp.asarray(tokens), cfg))
  diff = np.abs(out[mask] - ref[mask]).max()
  assert diff < PARITY_TOL, name
  lazy_cfg, lazy = loading.load_gguf(path, lazy=True)
  assert lazy_cfg == cfg and isinstance(lazy['layers'], loading.LazyLayers)
  blocks = [lazy['layers'][i] for i in range(cfg.num_layers)]
  for i, block in enumerate(blocks):  # each block read on demand is the eager one
    assert jax.tree.structure(block) == jax.tree.structure(params['layers'][i]), (name, i)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(block),
                                                   jax.tree.leaves(params['layers'][i]))), (name, i)
  streamed = np.asarray(llama.forward(dict(lazy, layers=blocks), jnp.asarray(tokens), cfg))
  assert np.abs(streamed[mask] - ref[mask]).max() < PARITY_TOL, name
  print(f'{name} gguf: max abs logit diff {diff:.2e} (of {np.abs(ref[mask]).max():.1f})')


@pytest.mark.parametrize('name,extra,match', [
    # Phi-3's longrope as Phi3MiniModel writes it: factor tensors and the attention factor.
    ('phi3', lambda w: (w.add_rope_scaling_attn_factors(1.19),
                        w.add_tensor('rope_factors_long.weight', np.full(4, 2.0, np.float32)),
                        w.add_tensor('rope_factors_short.weight', np.ones(4, np.float32))),
     'longrope scaling .*rope_factors_long'),
    ('phi3', lambda w: w.add_string('phi3.rope.scaling.type', 'longrope'),
     "rope.scaling.type 'longrope'"),
    ('qwen3_moe', lambda w: w.add_uint32('qwen3moe.expert_gating_func', 2),  # sigmoid
     'expert_gating_func=2'),
    # Llama 3.1's llama3 scaling as llama.cpp writes it (a `llama` file): one factor tensor.
    ('mixtral', lambda w: w.add_tensor('rope_freqs.weight', np.ones(4, np.float32)),
     'per-frequency RoPE factors .*rope_freqs'),
], ids=['phi3-longrope-factors', 'phi3-longrope-type', 'qwen3_moe-sigmoid-router',
        'llama-rope-freqs'])
def test_gguf_unimplemented_fields_are_refused(name, extra, match, tmp_path):
  """What the GGUF loader does not implement is refused by name, from the header as from the
  file (as the Hugging Face path refuses Phi-3's longrope)."""
  _, _, path = _gguf_of(name, tmp_path, extra)
  with pytest.raises(ValueError, match=match):
    loading.load_gguf(path)
  with pytest.raises(ValueError, match=match):
    loading.load_config(str(path))


# --------------------------------------------------------------------------- fused matrices

@pytest.mark.parametrize('spec', [GPTQ4, WANDA24, rules_lib.LinearSpec(
    prune='sparsegpt', sparsity=PruneSpec(n=2, m=4))], ids=['gptq', 'wanda', 'sparsegpt'])
def test_splitting_a_fused_matrix_changes_no_code_or_mask(spec):
  """Why Phi-3's qkv_proj is split at load: given the shared input statistics, GPTQ, Wanda and
  SparseGPT treat every output unit on its own, so compressing [q | k | v] as one matrix gives
  exactly the codes and masks of compressing q, k and v apart (only low-rank adapters differ)."""
  from compress import calibration, matrix  # pylint: disable=g-import-not-at-top
  from kernels import formats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)
  stats = calibration.update_stats(calibration.init_stats(64), x)
  parts = [jnp.asarray(rng.normal(size=(64, n)) * 0.1, jnp.float32) for n in (64, 32, 32)]
  fused, _ = matrix.compress_matrix(jnp.concatenate(parts, axis=1), stats, spec)
  alone = [matrix.compress_matrix(w, stats, spec)[0] for w in parts]
  dense = lambda leaf: np.asarray(formats.to_dense(leaf))  # noqa: E731
  np.testing.assert_array_equal(dense(fused), np.concatenate([dense(l) for l in alone], axis=1))


def test_phi3_adapters_export_to_peft_on_the_fused_modules(tmp_path):
  """EoRA adapters of q/k/v and gate/up become one LoRA per fused module (ranks added, B
  block-diagonal): PEFT on the hf export computes our logits."""
  peft = pytest.importorskip('peft')
  cfg, params = loading.load_hf_dir(families.save('phi3', tmp_path / 'hf'))
  calib = _sampled(params, cfg, 16, 0)
  rules = [rules_lib.Rule(r'layers/.*/(self_attn/[qv]_proj|mlp/.*)/kernel', GPTQ4)]
  out, _ = pipeline.compress_model(params, cfg, calib, rules, progress=False,
                                   recovery=compensate.Compensator(method='eora', rank=4))
  path = export.save(tmp_path / 'peft', 'peft', out, cfg)
  config = json.loads((path / 'adapter' / 'adapter_config.json').read_text())
  assert set(config['target_modules']) == {'qkv_proj', 'gate_up_proj', 'down_proj'}
  ranks = {f'model.layers.{i}.{m}': config['rank_pattern'].get(f'model.layers.{i}.{m}', config['r'])
           for i in range(2) for m in ('self_attn.qkv_proj', 'mlp.gate_up_proj', 'mlp.down_proj')}
  assert ranks == {f'model.layers.{i}.{m}': r for i in range(2)  # q and v: 4 each; k: none
                   for m, r in (('self_attn.qkv_proj', 8), ('mlp.gate_up_proj', 8),
                                ('mlp.down_proj', 4))}
  base = transformers.AutoModelForCausalLM.from_pretrained(path / 'base',
                                                           attn_implementation='eager')
  model = peft.PeftModel.from_pretrained(base.float(), path / 'adapter').eval()
  tokens, mask = _padded_batch(cfg.vocab_size)
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(llama.forward(out, jnp.asarray(tokens), cfg))
  assert np.abs(ours[mask] - ref[mask]).max() < 1e-4
  with pytest.raises(export.ExportError, match='fused'):
    export.save(tmp_path / 'gptq_peft', 'peft', out, cfg, peft_base='gptq')
