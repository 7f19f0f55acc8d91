"""Tests for models/config.py.

Properties: a Hugging Face ``config.json`` dict (Llama 3 with llama3 RoPE scaling, Mistral, Qwen2,
SmolLM-style minimal Llama) parses into the expected :class:`ModelConfig`, with the documented
defaults for absent keys; unsupported architectures, RoPE types and Qwen2 sliding windows raise;
configs are frozen, hashable and equal by value; ``num_params`` counts the params ``init_params``
creates; ``inv_freq`` applies no / linear / llama3 scaling as documented; GGUF metadata parses.
"""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from models import config as config_lib
from models import llama
from models.config import ModelConfig

LLAMA3 = {
    'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': 1000,
    'hidden_size': 256, 'intermediate_size': 512, 'num_hidden_layers': 3,
    'num_attention_heads': 8, 'num_key_value_heads': 2, 'rope_theta': 500000.0,
    'rms_norm_eps': 1e-5, 'tie_word_embeddings': True, 'max_position_embeddings': 8192,
    'bos_token_id': 1, 'eos_token_id': [2, 3], 'attention_bias': False, 'mlp_bias': False,
    'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                     'high_freq_factor': 4.0, 'original_max_position_embeddings': 1024},
}
MINIMAL = {  # only the required keys
    'architectures': ['LlamaForCausalLM'], 'vocab_size': 100, 'hidden_size': 64,
    'intermediate_size': 128, 'num_hidden_layers': 2, 'num_attention_heads': 4,
}


def test_llama3():
  cfg = config_lib.from_hf_dict(LLAMA3)
  assert cfg == ModelConfig(
      model_type='llama', vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=3,
      num_heads=8, num_kv_heads=2, head_dim=32, rope_theta=500000.0,
      rope_llama3=(8.0, 1.0, 4.0, 1024), rms_norm_eps=1e-5, tie_word_embeddings=True,
      qkv_bias=False, o_bias=False, mlp_bias=False, sliding_window=None,
      max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
  assert isinstance(cfg.rope_llama3, tuple)  # hashable, not a list


def test_defaults_for_absent_keys():
  cfg = config_lib.from_hf_dict(MINIMAL)
  assert cfg.model_type == 'llama'
  assert cfg.num_kv_heads == 4          # no num_key_value_heads: multi-head attention
  assert cfg.head_dim == 16             # hidden_size / heads
  assert cfg.rope_theta == 10000.0
  assert cfg.rope_llama3 is None and cfg.rope_linear_factor == 1.0
  assert cfg.rms_norm_eps == 1e-6
  assert cfg.tie_word_embeddings is False
  assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (False, False, False)
  assert cfg.sliding_window is None
  assert cfg.max_position_embeddings == 2048
  assert cfg.bos_token_id is None and cfg.eos_token_id is None
  # Explicit nulls fall back too.
  cfg2 = config_lib.from_hf_dict(dict(MINIMAL, num_key_value_heads=None, head_dim=None,
                                      rope_theta=None, rope_scaling=None))
  assert cfg2 == cfg


def test_explicit_head_dim_and_attention_bias():
  cfg = config_lib.from_hf_dict(dict(MINIMAL, head_dim=32, attention_bias=True, mlp_bias=True))
  assert cfg.head_dim == 32  # not hidden / heads
  assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias


def test_model_type_without_architectures():
  d = {k: v for k, v in MINIMAL.items() if k != 'architectures'}
  for model_type in ('llama', 'mistral', 'qwen2'):
    assert config_lib.from_hf_dict(dict(d, model_type=model_type)).model_type == model_type


def test_mistral():
  cfg = config_lib.from_hf_dict(dict(MINIMAL, architectures=['MistralForCausalLM'],
                                     sliding_window=4096, attention_bias=False))
  assert cfg.model_type == 'mistral' and cfg.sliding_window == 4096
  assert not cfg.qkv_bias
  assert config_lib.from_hf_dict(dict(MINIMAL, architectures=['MistralForCausalLM'],
                                      sliding_window=None)).sliding_window is None
  # A sliding window on a Llama config is ignored (Llama has none).
  assert config_lib.from_hf_dict(dict(MINIMAL, sliding_window=4096)).sliding_window is None


def test_qwen2():
  cfg = config_lib.from_hf_dict(dict(MINIMAL, architectures=['Qwen2ForCausalLM'],
                                     use_sliding_window=False, sliding_window=4096))
  assert cfg.model_type == 'qwen2'
  assert cfg.qkv_bias and not cfg.o_bias  # Qwen2: bias on q/k/v only
  assert cfg.sliding_window is None
  with pytest.raises(ValueError, match='use_sliding_window=true is not supported'):
    config_lib.from_hf_dict(dict(MINIMAL, architectures=['Qwen2ForCausalLM'],
                                 use_sliding_window=True))


@pytest.mark.parametrize('overrides', [
    {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2'},
    {'architectures': ['LlamaModel']},  # not the causal-LM class
    {'architectures': [], 'model_type': 'falcon'},
    {'architectures': None, 'model_type': None},
    {'architectures': ['GemmaForCausalLM'], 'model_type': 'llama'},
])
def test_unsupported_architecture(overrides):
  with pytest.raises(ValueError, match='unsupported architecture'):
    config_lib.from_hf_dict(dict(MINIMAL, **overrides))


def test_missing_required_key():
  d = dict(MINIMAL)
  del d['hidden_size']
  with pytest.raises(KeyError, match='hidden_size'):
    config_lib.from_hf_dict(d)


def test_rope_scaling_kinds():
  linear = config_lib.from_hf_dict(dict(MINIMAL, rope_scaling={'type': 'linear', 'factor': 4}))
  assert linear.rope_linear_factor == 4.0 and linear.rope_llama3 is None
  default = config_lib.from_hf_dict(dict(MINIMAL, rope_scaling={'rope_type': 'default'}))
  assert default.rope_linear_factor == 1.0 and default.rope_llama3 is None
  with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
    config_lib.from_hf_dict(dict(MINIMAL, rope_scaling={'rope_type': 'yarn', 'factor': 2.0}))
  # Newer transformers: theta and scaling inside rope_parameters.
  cfg = config_lib.from_hf_dict(dict(MINIMAL, rope_parameters={
      'rope_type': 'llama3', 'rope_theta': 123.0, 'factor': 8.0, 'low_freq_factor': 1.0,
      'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}))
  assert cfg.rope_theta == 123.0 and cfg.rope_llama3 == (8.0, 1.0, 4.0, 64)
  plain = config_lib.from_hf_dict(dict(MINIMAL, rope_parameters={'rope_type': 'default',
                                                                 'rope_theta': 77.0}))
  assert plain.rope_theta == 77.0 and plain.rope_llama3 is None


def test_from_hf_json(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(LLAMA3))
  assert config_lib.from_hf_json(tmp_path) == config_lib.from_hf_dict(LLAMA3)
  assert config_lib.from_hf_json(tmp_path / 'config.json') == config_lib.from_hf_dict(LLAMA3)
  with pytest.raises(FileNotFoundError, match='no config.json'):
    config_lib.from_hf_json(tmp_path / 'missing')


def test_frozen_hashable_and_validated():
  a = config_lib.from_hf_dict(LLAMA3)
  b = config_lib.from_hf_dict(json.loads(json.dumps(LLAMA3)))
  assert a == b and hash(a) == hash(b)
  assert len({a, b, config_lib.tiny_config()}) == 2
  assert {a: 1}[b] == 1
  assert dataclasses.replace(a, rope_theta=1.0) != a
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.num_layers = 4
  jax.jit(lambda x, cfg: x * cfg.num_layers, static_argnums=1)(1.0, a)  # a valid static argument
  with pytest.raises(ValueError, match='num_heads=6 is not a multiple of num_kv_heads=4'):
    config_lib.tiny_config(num_heads=6, num_kv_heads=4)


def test_to_dict_roundtrip():
  cfg = config_lib.from_hf_dict(LLAMA3)
  d = cfg.to_dict()
  assert d['num_layers'] == 3 and d['rope_llama3'] == (8.0, 1.0, 4.0, 1024)
  assert ModelConfig(**d) == cfg


@pytest.mark.parametrize('overrides', [{}, {'tie_word_embeddings': True}, {'num_kv_heads': 4},
                                       {'num_layers': 3, 'intermediate_size': 96}])
def test_num_params_matches_init_params(overrides):
  cfg = config_lib.tiny_config(**overrides)
  params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
  assert cfg.num_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_num_params_counts_biases():
  cfg = config_lib.tiny_config(qkv_bias=True)
  no_bias = config_lib.tiny_config()
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  assert cfg.num_params == no_bias.num_params + cfg.num_layers * (q + 2 * kv)


def test_inv_freq():
  cfg = config_lib.tiny_config(head_dim=16, rope_theta=10000.0)
  expect = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
  inv = cfg.inv_freq()
  assert inv.shape == (8,) and inv.dtype == np.float64
  np.testing.assert_allclose(inv, expect, rtol=1e-12)
  linear = dataclasses.replace(cfg, rope_linear_factor=4.0)
  np.testing.assert_allclose(linear.inv_freq(), expect / 4.0, rtol=1e-12)


def test_inv_freq_llama3_regimes():
  """llama3 scaling: wavelengths below old_ctx / high_freq_factor are kept, those above
  old_ctx / low_freq_factor divided by ``factor``, the band between interpolated smoothly."""
  factor, low, high, old_ctx = 8.0, 1.0, 4.0, 64
  cfg = config_lib.tiny_config(head_dim=32, rope_theta=10000.0,
                               rope_llama3=(factor, low, high, old_ctx))
  base = config_lib.tiny_config(head_dim=32, rope_theta=10000.0).inv_freq()
  inv = cfg.inv_freq()
  wavelen = 2 * math.pi / base
  short = wavelen < old_ctx / high
  long_ = wavelen > old_ctx / low
  medium = ~short & ~long_
  assert short.any() and long_.any() and medium.any()  # the test covers all three regimes
  np.testing.assert_allclose(inv[short], base[short], rtol=1e-12)
  np.testing.assert_allclose(inv[long_], base[long_] / factor, rtol=1e-12)
  smooth = (old_ctx / wavelen[medium] - low) / (high - low)
  np.testing.assert_allclose(inv[medium],
                             (1 - smooth) * base[medium] / factor + smooth * base[medium],
                             rtol=1e-12)
  assert np.all(inv[medium] < base[medium]) and np.all(inv[medium] > base[medium] / factor)


def test_inv_freq_matches_transformers_llama3():
  rope_utils = pytest.importorskip('transformers.modeling_rope_utils')
  transformers = pytest.importorskip('transformers')
  hf = transformers.LlamaConfig(
      vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=2, rope_theta=10000.0,
      max_position_embeddings=256,
      rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                    'high_freq_factor': 4.0, 'original_max_position_embeddings': 64})
  fn = rope_utils.ROPE_INIT_FUNCTIONS['llama3']
  inv_hf, _ = fn(hf, 'cpu')
  ours = config_lib.from_hf_dict(hf.to_dict() | {'architectures': ['LlamaForCausalLM']})
  np.testing.assert_allclose(ours.inv_freq(), inv_hf.double().numpy(), rtol=1e-5)


def test_from_gguf_metadata():
  meta = {
      'general.architecture': 'llama', 'llama.attention.head_count': 8,
      'llama.attention.head_count_kv': 2, 'llama.embedding_length': 256,
      'llama.feed_forward_length': 512, 'llama.block_count': 3, 'llama.context_length': 4096,
      'llama.rope.freq_base': 500000.0, 'llama.attention.layer_norm_rms_epsilon': 1e-5,
      'tokenizer.ggml.tokens': ['a'] * 1000, 'tokenizer.ggml.bos_token_id': 1,
      'tokenizer.ggml.eos_token_id': 2,
  }
  cfg = config_lib.from_gguf_metadata(meta, {'output.weight', 'blk.0.attn_q.weight'})
  assert cfg == ModelConfig(
      model_type='llama', vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=3,
      num_heads=8, num_kv_heads=2, head_dim=32, rope_theta=500000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=False, qkv_bias=False, o_bias=False, max_position_embeddings=4096,
      bos_token_id=1, eos_token_id=2)
  # No output.weight: tied embeddings; q bias tensor: qkv bias; linear rope scaling.
  qwen = dict({k.replace('llama.', 'qwen2.'): v for k, v in meta.items()},
              **{'general.architecture': 'qwen2', 'qwen2.rope.scaling.type': 'linear',
                 'qwen2.rope.scaling.factor': 2.0, 'qwen2.vocab_size': 1234})
  cfg2 = config_lib.from_gguf_metadata(qwen, {'blk.0.attn_q.bias'})
  assert cfg2.model_type == 'qwen2' and cfg2.tie_word_embeddings and cfg2.qkv_bias
  assert cfg2.rope_linear_factor == 2.0 and cfg2.vocab_size == 1234
  with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma'"):
    config_lib.from_gguf_metadata({'general.architecture': 'gemma'}, set())


def test_tiny_config_overrides():
  cfg = config_lib.tiny_config(num_layers=5, vocab_size=300)
  assert cfg.num_layers == 5 and cfg.vocab_size == 300 and cfg.hidden_size == 64
  with pytest.raises(TypeError):
    config_lib.tiny_config(not_a_field=1)
