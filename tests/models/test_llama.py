"""Forward-pass parity with Hugging Face transformers (torch, float32) and generation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as config_lib
from models import llama, loading

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5)


def _hf_model(kind: str, **extra):
  torch.manual_seed(0)
  if kind == 'llama':
    cfg = transformers.LlamaConfig(**{**_COMMON, **extra})
    model = transformers.LlamaForCausalLM(cfg)
  elif kind == 'mistral':
    cfg = transformers.MistralConfig(**{**_COMMON, 'sliding_window': None, **extra})
    model = transformers.MistralForCausalLM(cfg)
  elif kind == 'qwen2':
    cfg = transformers.Qwen2Config(**{**_COMMON, **extra})
    model = transformers.Qwen2ForCausalLM(cfg)
  else:
    raise ValueError(kind)
  # Larger-than-default weights so that the logits are O(1) and the comparison is meaningful.
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.15 if p.ndim > 1 else 1.0)
  return model.float().eval()


@pytest.mark.parametrize('kind,extra', [
    ('llama', {}),
    ('llama', {'tie_word_embeddings': True, 'num_key_value_heads': 4}),
    ('llama', {'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                'high_freq_factor': 4.0, 'original_max_position_embeddings': 64},
               'rope_theta': 500000.0}),
    ('mistral', {}),
    ('qwen2', {}),
])
def test_logits_match_transformers(tmp_path, kind, extra):
  model = _hf_model(kind, **extra)
  model.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = loading.load_hf_dir(tmp_path)
  assert cfg.model_type == kind
  if kind == 'qwen2':
    assert cfg.qkv_bias and 'bias' in params['layers'][0]['self_attn']['q_proj']
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 100))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  out = np.asarray(jax.jit(lambda p, t: llama.forward(p, t, cfg))(params, jnp.asarray(tokens)))
  assert np.abs(ref).max() > 0.5  # the comparison is not between two near-zero tensors
  assert np.abs(out - ref).max() < 1e-4


def test_sharded_checkpoint(tmp_path):
  model = _hf_model('llama')
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size='100KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  cfg, params = loading.load_hf_dir(tmp_path)
  tokens = np.arange(40)[None] % cfg.vocab_size
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  out = np.asarray(llama.forward(params, jnp.asarray(tokens), cfg))
  assert np.abs(out - ref).max() < 1e-4


def test_bfloat16_compute_close_to_float32():
  cfg = config_lib.tiny_config()
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  tokens = jnp.arange(32)[None] % cfg.vocab_size
  f32 = llama.forward(params, tokens, cfg)
  bf16 = llama.forward(llama.cast_params(params, jnp.bfloat16), tokens, cfg, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  assert rel < 0.05


def _greedy_no_cache(params, prompt, cfg, n):
  toks = prompt
  for _ in range(n):
    logits = llama.forward(params, toks, cfg)
    nxt = jnp.argmax(logits[:, -1], axis=-1)[:, None]
    toks = jnp.concatenate([toks, nxt.astype(toks.dtype)], axis=1)
  return toks[:, prompt.shape[1]:]


@pytest.mark.parametrize('sliding_window', [None, 6])
def test_kv_cache_generation_equals_no_cache_greedy(sliding_window):
  cfg = config_lib.tiny_config(sliding_window=sliding_window)
  params = llama.init_params(cfg, jax.random.key(1), scale=0.2)
  prompt = jax.random.randint(jax.random.key(2), (2, 7), 0, cfg.vocab_size)
  ref = _greedy_no_cache(params, prompt, cfg, 12)
  out = jax.jit(lambda p, t: llama.generate(p, t, cfg, max_new_tokens=12))(params, prompt)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  assert len(set(np.asarray(out).ravel().tolist())) > 2  # not a degenerate constant sequence


def test_sliding_window_cache_is_a_ring_of_the_window():
  """A sliding-window layer caches only its window (a ring buffer): a prompt longer than the
  window and generation far past it give the tokens of the cache-free forward."""
  cfg = config_lib.tiny_config(sliding_window=5)
  assert [c['k'].shape[1] for c in llama.init_cache(cfg, 1, 64, window=True)] == [5, 5]
  assert [c['k'].shape[1] for c in llama.init_cache(cfg, 1, 64)] == [64, 64]
  params = llama.init_params(cfg, jax.random.key(1), scale=0.2)
  prompt = jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size)
  ref = _greedy_no_cache(params, prompt, cfg, 14)
  out = llama.generate(params, prompt, cfg, max_new_tokens=14)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_sampling_is_seeded():
  cfg = config_lib.tiny_config()
  params = llama.init_params(cfg, jax.random.key(1), scale=0.2)
  prompt = jnp.zeros((1, 3), jnp.int32)
  gen = lambda s: llama.generate(params, prompt, cfg, max_new_tokens=8, temperature=1.0, top_k=50,
                                 key=jax.random.key(s))
  np.testing.assert_array_equal(gen(0), gen(0))
  assert not np.array_equal(gen(0), gen(1))


def test_block_apply_returns_linear_inputs():
  cfg = config_lib.tiny_config()
  params = llama.init_params(cfg, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size))
  y, inputs = llama.block_apply(params['layers'][0], x, cfg, return_inputs=True)
  assert y.shape == x.shape
  assert set(inputs) == set(llama.LINEAR_INPUTS.values())
  assert inputs['down_in'].shape == (2, 5, cfg.intermediate_size)
  np.testing.assert_allclose(y, llama.block_apply(params['layers'][0], x, cfg), rtol=1e-6)


def test_unsupported_architecture(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(
      {'architectures': ['GPTNeoXForCausalLM'], 'model_type': 'gpt_neox'}))
  with pytest.raises(ValueError, match='unsupported architecture.*GPTNeoX'):
    loading.load_hf_dir(tmp_path)


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    loading.load_model(str(tmp_path / 'nope.gguf'))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    loading.load_model(str(tmp_path / 'missing_dir') + '/')
  with pytest.raises(ValueError, match='unknown model'):
    loading.load_model('no-such-model')
  (tmp_path / 'config.json').write_text(json.dumps({'architectures': ['LlamaForCausalLM']}))
  with pytest.raises((FileNotFoundError, KeyError)):
    loading.load_hf_dir(tmp_path)


def test_gguf_unknown_architecture(tmp_path):
  gguf = pytest.importorskip('gguf')
  path = tmp_path / 'weird.gguf'
  w = gguf.GGUFWriter(str(path), 'gpt2')
  w.add_block_count(1)
  w.add_tensor('token_embd.weight', np.zeros((8, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
    loading.load_gguf(path)


def test_corrupt_gguf(tmp_path):
  path = tmp_path / 'bad.gguf'
  path.write_bytes(b'not a gguf file at all')
  with pytest.raises(ValueError, match='cannot read GGUF'):
    loading.load_gguf(path)
