"""Model configuration of Llama-family decoders, read from a Hugging Face ``config.json`` or GGUF metadata.

Supported: Llama 2/3 (incl. ``llama3`` RoPE scaling), Mistral (optional sliding window), Qwen2/2.5
(bias on q/k/v), SmolLM/SmolLM2 (Llama architecture), tied or untied embeddings, grouped-query attention.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

import numpy as np

SUPPORTED_ARCHITECTURES = {
    'LlamaForCausalLM': 'llama',
    'MistralForCausalLM': 'mistral',
    'Qwen2ForCausalLM': 'qwen2',
}
SUPPORTED_GGUF_ARCHITECTURES = ('llama', 'qwen2')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyper-parameters of a Llama-family decoder (hashable: usable as a static jit argument)."""
  model_type: str = 'llama'
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # llama3 scaling as a hashable tuple: (factor, low_freq_factor, high_freq_factor, original_max_pos).
  rope_llama3: tuple[float, float, float, int] | None = None
  # linear scaling factor ('linear' rope_type), 1.0 = none.
  rope_linear_factor: float = 1.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.')

  @property
  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = self.num_heads * self.head_dim
    kv = self.num_kv_heads * self.head_dim
    block = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    block += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + (2 * f + d) * self.mlp_bias
    head = 0 if self.tie_word_embeddings else v * d
    return self.num_layers * block + v * d + d + head

  def inv_freq(self) -> np.ndarray:
    """RoPE inverse frequencies [head_dim / 2], float64, with llama3/linear scaling applied."""
    inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
    if self.rope_llama3 is not None:
      factor, low, high, old_ctx = self.rope_llama3
      low_wavelen = old_ctx / low
      high_wavelen = old_ctx / high
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
      smooth = (old_ctx / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
      inv = np.where(medium, smoothed, scaled)
    return inv / self.rope_linear_factor

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _rope_fields(rope_scaling: Mapping[str, Any] | None) -> dict[str, Any]:
  if not rope_scaling:
    return {}
  kind = rope_scaling.get('rope_type', rope_scaling.get('type'))
  if kind in (None, 'default'):
    return {}
  if kind == 'llama3':
    return {'rope_llama3': (float(rope_scaling['factor']), float(rope_scaling['low_freq_factor']),
                            float(rope_scaling['high_freq_factor']),
                            int(rope_scaling['original_max_position_embeddings']))}
  if kind == 'linear':
    return {'rope_linear_factor': float(rope_scaling['factor'])}
  raise ValueError(f'unsupported rope_scaling type {kind!r}; supported: default, linear, llama3.')


def from_hf_dict(cfg: Mapping[str, Any]) -> ModelConfig:
  """Builds a :class:`ModelConfig` from the contents of a Hugging Face ``config.json``."""
  archs = cfg.get('architectures') or []
  model_type = cfg.get('model_type')
  kind = None
  for a in archs:
    if a in SUPPORTED_ARCHITECTURES:
      kind = SUPPORTED_ARCHITECTURES[a]
  if kind is None and model_type in SUPPORTED_ARCHITECTURES.values() and not archs:
    kind = model_type
  if kind is None:
    raise ValueError(
        f'unsupported architecture {archs or model_type!r} in config.json; supported: '
        f'{sorted(SUPPORTED_ARCHITECTURES)}.')
  heads = cfg['num_attention_heads']
  head_dim = cfg.get('head_dim') or cfg['hidden_size'] // heads
  rope_scaling = cfg.get('rope_scaling')
  rope_theta = cfg.get('rope_theta')
  rope_params = cfg.get('rope_parameters')  # newer transformers: theta/scaling live here
  if rope_params:
    rope_theta = rope_params.get('rope_theta', rope_theta)
    if rope_scaling is None:
      rope_scaling = rope_params
  sliding = None
  if kind == 'mistral':
    sliding = cfg.get('sliding_window')
  elif kind == 'qwen2' and cfg.get('use_sliding_window'):
    raise ValueError('Qwen2 with use_sliding_window=true is not supported.')
  eos = cfg.get('eos_token_id')
  if isinstance(eos, list):
    eos = eos[0]
  attention_bias = bool(cfg.get('attention_bias', False))
  return ModelConfig(
      model_type=kind,
      vocab_size=cfg['vocab_size'],
      hidden_size=cfg['hidden_size'],
      intermediate_size=cfg['intermediate_size'],
      num_layers=cfg['num_hidden_layers'],
      num_heads=heads,
      num_kv_heads=cfg.get('num_key_value_heads') or heads,
      head_dim=head_dim,
      rope_theta=float(rope_theta or 10000.0),
      rms_norm_eps=float(cfg.get('rms_norm_eps', 1e-6)),
      tie_word_embeddings=bool(cfg.get('tie_word_embeddings', False)),
      qkv_bias=True if kind == 'qwen2' else attention_bias,
      o_bias=False if kind == 'qwen2' else attention_bias,
      mlp_bias=bool(cfg.get('mlp_bias', False)),
      sliding_window=sliding,
      max_position_embeddings=int(cfg.get('max_position_embeddings', 2048)),
      bos_token_id=cfg.get('bos_token_id'),
      eos_token_id=eos,
      **_rope_fields(rope_scaling),
  )


def from_hf_json(path: str | pathlib.Path) -> ModelConfig:
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'no config.json at {path}')
  return from_hf_dict(json.loads(path.read_text()))


def from_gguf_metadata(meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
  """Builds a config from GGUF key/value metadata (already decoded to Python values)."""
  arch = meta.get('general.architecture')
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise ValueError(
        f'unsupported GGUF architecture {arch!r}; supported: {list(SUPPORTED_GGUF_ARCHITECTURES)}.')
  g = lambda k, d=None: meta.get(f'{arch}.{k}', d)
  heads = int(g('attention.head_count'))
  hidden = int(g('embedding_length'))
  head_dim = int(g('attention.key_length', hidden // heads))
  vocab = meta.get(f'{arch}.vocab_size') or len(meta['tokenizer.ggml.tokens'])
  rope_scaling = None
  if g('rope.scaling.type') == 'linear':
    rope_scaling = {'rope_type': 'linear', 'factor': g('rope.scaling.factor')}
  return ModelConfig(
      model_type=arch,
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(g('feed_forward_length')),
      num_layers=int(g('block_count')),
      num_heads=heads,
      num_kv_heads=int(g('attention.head_count_kv', heads)),
      head_dim=head_dim,
      rope_theta=float(g('rope.freq_base', 10000.0)),
      rms_norm_eps=float(g('attention.layer_norm_rms_epsilon', 1e-6)),
      tie_word_embeddings='output.weight' not in tensor_names,
      qkv_bias='blk.0.attn_q.bias' in tensor_names,
      o_bias='blk.0.attn_output.bias' in tensor_names,
      max_position_embeddings=int(g('context_length', 2048)),
      bos_token_id=meta.get('tokenizer.ggml.bos_token_id'),
      eos_token_id=meta.get('tokenizer.ggml.eos_token_id'),
      **_rope_fields(rope_scaling),
  )


def tiny_config(**overrides) -> ModelConfig:
  """A small Llama used by unit tests (byte-level vocabulary)."""
  base = dict(model_type='llama', vocab_size=256, hidden_size=64, intermediate_size=128,
              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=512)
  base.update(overrides)
  return ModelConfig(**base)
