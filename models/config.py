"""Model configuration of the decoders we run, read from a Hugging Face ``config.json`` or GGUF metadata.

Supported: Llama 2/3 (incl. ``llama3`` RoPE scaling), Mistral (optional sliding window), Qwen2/2.5
(bias on q/k/v), Qwen3 (q/k RMSNorm), Gemma 2 (soft-capping, pre- and post-norms, interleaved
sliding-window attention), Gemma 3 text (q/k norm, a local and a global RoPE base), Phi-3 (fused
``qkv_proj`` / ``gate_up_proj``, split into q/k/v and gate/up when loaded; partial rotary),
SmolLM/SmolLM2 (Llama architecture); tied or untied embeddings, grouped-query attention.

Every architectural difference is a field of :class:`ModelConfig` that :mod:`models.llama` reads;
fields that vary by layer (Gemma's sliding and global layers) are resolved by
:meth:`ModelConfig.layer`, which every caller that runs one block uses.
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
    'Qwen3ForCausalLM': 'qwen3',
    'Gemma2ForCausalLM': 'gemma2',
    'Gemma3ForCausalLM': 'gemma3_text',
    'Phi3ForCausalLM': 'phi3',
    'MixtralForCausalLM': 'mixtral',
    'Qwen2MoeForCausalLM': 'qwen2_moe',
    'Qwen3MoeForCausalLM': 'qwen3_moe',
}
# llama.cpp writes Mixtral as 'llama' with experts (expert_count > 0).
SUPPORTED_GGUF_ARCHITECTURES = ('llama', 'qwen2', 'qwen3', 'gemma2', 'gemma3', 'phi3', 'qwen2moe',
                                'qwen3moe')
ATTENTION_KINDS = ('full_attention', 'sliding_attention')
ACTIVATIONS = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_tanh': 'gelu_tanh'}


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
  pad_token_id: int | None = None
  # Per-layer attention kinds (ATTENTION_KINDS); None: every layer is full attention (with
  # ``sliding_window`` applied to all layers when set, as Mistral does).
  layer_types: tuple[str, ...] | None = None
  # RoPE base of the sliding layers when it differs from the global one (Gemma 3's local base).
  rope_local_theta: float | None = None
  partial_rotary_factor: float = 1.0  # the first factor * head_dim channels are rotated (Phi)
  activation: str = 'silu'  # 'silu' or 'gelu_tanh' (GeGLU)
  norm_plus_one: bool = False  # RMSNorm multiplies by (1 + w) (Gemma)
  post_norms: bool = False  # norms after attention and MLP too (Gemma: four norms per block)
  qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
  embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size) (Gemma)
  query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5 (Gemma), else head_dim
  attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
  final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
  fused_qkv: bool = False  # stored as one qkv_proj / gate_up_proj (Phi-3); split in our tree
  fused_gate_up: bool = False
  # Mixture of experts (0 experts: a dense MLP). Every block routes each token to the top
  # ``num_experts_per_tok`` experts (softmax over all, then top-k, renormalised if norm_topk_prob);
  # a shared expert (Qwen2-MoE) runs on every token, scaled by sigmoid(shared_expert_gate).
  num_experts: int = 0
  num_experts_per_tok: int = 0
  expert_intermediate_size: int = 0
  shared_expert_size: int = 0
  norm_topk_prob: bool = True

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.')
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f'layer_types has {len(self.layer_types)} entries for '
                         f'{self.num_layers} layers')
      bad = sorted(set(self.layer_types) - set(ATTENTION_KINDS))
      if bad:
        raise ValueError(f'unsupported attention layer type {bad[0]!r}; supported: '
                         f'{list(ATTENTION_KINDS)}')
      if 'sliding_attention' in self.layer_types and not self.sliding_window:
        raise ValueError('sliding_attention layers need a sliding_window')
    if self.activation not in ('silu', 'gelu_tanh'):
      raise ValueError(f'unsupported activation {self.activation!r}; supported: silu, gelu_tanh')
    if not 0.0 < self.partial_rotary_factor <= 1.0:
      raise ValueError(f'partial_rotary_factor={self.partial_rotary_factor} is not in (0, 1]')
    if self.rotary_dim % 2:
      raise ValueError(f'the rotary dimension {self.rotary_dim} is odd')
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f'num_experts_per_tok={self.num_experts_per_tok} is not in '
                       f'[1, num_experts={self.num_experts}]')

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  def layer(self, i: int) -> 'ModelConfig':
    """The config block ``i`` runs with: its attention kind resolved into ``sliding_window`` and
    the RoPE settings of that kind; the config itself when every layer is the same."""
    if self.layer_types is None:
      return self
    if not 0 <= i < self.num_layers:
      raise IndexError(f'layer {i} of a {self.num_layers}-layer model')
    if self.layer_types[i] == 'sliding_attention':
      rope = {}
      if self.rope_local_theta is not None:  # the local base runs unscaled RoPE
        rope = dict(rope_theta=self.rope_local_theta, rope_llama3=None, rope_linear_factor=1.0)
      return dataclasses.replace(self, layer_types=None, rope_local_theta=None, **rope)
    return dataclasses.replace(self, layer_types=None, rope_local_theta=None, sliding_window=None)

  @property
  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = self.num_heads * self.head_dim
    kv = self.num_kv_heads * self.head_dim
    block = d * (q + 2 * kv) + q * d + 3 * d * f + (4 if self.post_norms else 2) * d
    block += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + (2 * f + d) * self.mlp_bias
    block += 2 * self.head_dim * self.qk_norm
    if self.num_experts:  # the experts, the router and the shared expert replace the dense MLP
      fe, fs = self.expert_intermediate_size, self.shared_expert_size
      block += -3 * d * f + self.num_experts * (3 * d * fe + d) + (3 * d * fs + d if fs else 0)
    head = 0 if self.tie_word_embeddings else v * d
    return self.num_layers * block + v * d + d + head

  def inv_freq(self) -> np.ndarray:
    """RoPE inverse frequencies [rotary_dim / 2], float64, with llama3/linear scaling applied."""
    dim = self.rotary_dim
    inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
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


def _architecture(cfg: Mapping[str, Any]) -> str:
  archs = cfg.get('architectures') or []
  model_type = cfg.get('model_type')
  for a in archs:
    if a in SUPPORTED_ARCHITECTURES:
      return SUPPORTED_ARCHITECTURES[a]
  if not archs and model_type in SUPPORTED_ARCHITECTURES.values():
    return model_type
  hint = ''
  if model_type == 'gemma3' or 'Gemma3ForConditionalGeneration' in archs:
    hint = ' (the multimodal Gemma 3: load a text-only Gemma3ForCausalLM checkpoint)'
  raise ValueError(
      f'unsupported architecture {archs or model_type!r} in config.json{hint}; supported: '
      f'{sorted(SUPPORTED_ARCHITECTURES)}.')


def _default_layer_types(kind: str, cfg: Mapping[str, Any], n: int) -> list[str]:
  """Transformers' defaults when a Gemma config has no ``layer_types``."""
  if kind == 'gemma2':
    return ['sliding_attention' if (i + 1) % 2 else 'full_attention' for i in range(n)]
  pattern = int(cfg.get('sliding_window_pattern') or cfg.get('_sliding_window_pattern') or 6)
  return ['sliding_attention' if (i + 1) % pattern else 'full_attention' for i in range(n)]


def _gemma3_rope(cfg: Mapping[str, Any]) -> tuple[float, float, Mapping[str, Any] | None]:
  """(global theta, local theta, global rope scaling) of a Gemma 3 config, old or new layout."""
  params = cfg.get('rope_parameters') or {}
  if 'full_attention' in params or 'sliding_attention' in params:
    full = params.get('full_attention') or {}
    local = params.get('sliding_attention') or {}
    if local.get('rope_type', 'default') != 'default':
      raise ValueError(f'unsupported rope type {local["rope_type"]!r} on sliding layers; '
                       'supported: default')
    return (float(full.get('rope_theta', 1e6)), float(local.get('rope_theta', 1e4)), full)
  return (float(cfg.get('rope_theta') or params.get('rope_theta') or 1e6),
          float(cfg.get('rope_local_base_freq') or 1e4), cfg.get('rope_scaling') or params or None)


def _moe_fields(kind: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The mixture-of-experts fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config."""
  if kind == 'mixtral':
    return dict(num_experts=int(cfg['num_local_experts']),
                num_experts_per_tok=int(cfg['num_experts_per_tok']),
                expert_intermediate_size=int(cfg['intermediate_size']), norm_topk_prob=True)
  if kind not in ('qwen2_moe', 'qwen3_moe'):
    return {}
  if cfg.get('mlp_only_layers') or int(cfg.get('decoder_sparse_step', 1)) != 1:
    raise ValueError('mlp_only_layers / decoder_sparse_step != 1 (dense MLP layers between the '
                     'sparse ones) are not supported')
  shared = int(cfg.get('shared_expert_intermediate_size') or 0) if kind == 'qwen2_moe' else 0
  return dict(num_experts=int(cfg.get('num_experts') or cfg['num_local_experts']),
              num_experts_per_tok=int(cfg['num_experts_per_tok']),
              expert_intermediate_size=int(cfg['moe_intermediate_size']),
              shared_expert_size=shared,
              norm_topk_prob=bool(cfg.get('norm_topk_prob', False)))


def from_hf_dict(cfg: Mapping[str, Any]) -> ModelConfig:
  """Builds a :class:`ModelConfig` from the contents of a Hugging Face ``config.json``.

  Fields that would change the computation and that we do not implement are refused by name.
  """
  kind = _architecture(cfg)
  gemma = kind in ('gemma2', 'gemma3_text')
  heads = cfg['num_attention_heads']
  head_dim = cfg.get('head_dim') or cfg['hidden_size'] // heads
  n_layers = cfg['num_hidden_layers']
  rope_scaling = cfg.get('rope_scaling')
  rope_theta = cfg.get('rope_theta')
  rope_params = cfg.get('rope_parameters')  # newer transformers: theta/scaling live here
  partial = cfg.get('partial_rotary_factor')
  rope_local = None
  if kind == 'gemma3_text':
    rope_theta, rope_local, rope_scaling = _gemma3_rope(cfg)
  elif rope_params:
    rope_theta = rope_params.get('rope_theta', rope_theta)
    partial = rope_params.get('partial_rotary_factor', partial)
    if rope_scaling is None:
      rope_scaling = rope_params
  act = cfg.get('hidden_activation') or cfg.get('hidden_act') or 'silu'
  if act not in ACTIVATIONS:
    raise ValueError(f'unsupported activation {act!r}; supported: {sorted(ACTIVATIONS)}')
  sliding, layer_types = None, None
  if kind in ('mistral', 'phi3', 'mixtral'):
    sliding = cfg.get('sliding_window')
  elif kind in ('qwen2', 'qwen3', 'qwen2_moe', 'qwen3_moe') and cfg.get('use_sliding_window'):
    raise ValueError(f'{kind} with use_sliding_window=true is not supported.')
  elif gemma:
    sliding = cfg.get('sliding_window')
    layer_types = tuple(cfg.get('layer_types') or _default_layer_types(kind, cfg, n_layers))
    if cfg.get('use_bidirectional_attention'):
      raise ValueError('use_bidirectional_attention=true is not supported (causal decoders only)')
  eos = cfg.get('eos_token_id')
  if isinstance(eos, list):
    eos = eos[0]
  attention_bias = bool(cfg.get('attention_bias', False))
  extra = _moe_fields(kind, cfg)
  if gemma:
    extra.update(norm_plus_one=True, post_norms=True, embed_scale=True,
                 query_pre_attn_scalar=float(cfg.get('query_pre_attn_scalar') or head_dim),
                 attn_softcap=cfg.get('attn_logit_softcapping'),
                 final_softcap=cfg.get('final_logit_softcapping'))
  return ModelConfig(
      model_type=kind,
      vocab_size=cfg['vocab_size'],
      hidden_size=cfg['hidden_size'],
      intermediate_size=cfg['intermediate_size'],
      num_layers=n_layers,
      num_heads=heads,
      num_kv_heads=cfg.get('num_key_value_heads') or heads,
      head_dim=head_dim,
      rope_theta=float(rope_theta or 10000.0),
      rms_norm_eps=float(cfg.get('rms_norm_eps', 1e-6)),
      tie_word_embeddings=bool(cfg.get('tie_word_embeddings', gemma)),
      qkv_bias=True if kind in ('qwen2', 'qwen2_moe') else attention_bias,
      o_bias=False if kind in ('qwen2', 'qwen2_moe') else attention_bias,
      mlp_bias=bool(cfg.get('mlp_bias', False)),
      sliding_window=sliding,
      max_position_embeddings=int(cfg.get('max_position_embeddings', 2048)),
      bos_token_id=cfg.get('bos_token_id'),
      eos_token_id=eos,
      pad_token_id=cfg.get('pad_token_id'),
      layer_types=layer_types,
      rope_local_theta=rope_local,
      partial_rotary_factor=float(partial or 1.0),
      activation=ACTIVATIONS[act],
      qk_norm=kind in ('qwen3', 'qwen3_moe', 'gemma3_text'),
      fused_qkv=kind == 'phi3',
      fused_gate_up=kind == 'phi3',
      **extra,
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
  elif g('rope.scaling.type') not in (None, 'none'):
    raise ValueError(f'unsupported GGUF rope.scaling.type {g("rope.scaling.type")!r}; supported: '
                     'none, linear')
  # llama.cpp keeps long-context RoPE as per-frequency factor tensors (Phi-3's longrope / su
  # scaling: rope_factors_long / rope_factors_short, with rope.scaling.attn_factor), which we do not
  # implement.
  factors = sorted(n for n in tensor_names if n.startswith(('rope_factors_long',
                                                             'rope_factors_short')))
  if factors:
    raise ValueError(f'unsupported GGUF longrope scaling (tensors {", ".join(factors)}); '
                     'supported: none, linear')
  # Llama 3.1's llama3 RoPE scaling is stored as one such tensor, rope_freqs (its parameters are
  # not in the metadata): refused rather than run with unscaled frequencies.
  if any(n.startswith('rope_freqs') for n in tensor_names):
    raise ValueError('unsupported GGUF per-frequency RoPE factors (tensor rope_freqs.weight, how '
                     "llama.cpp stores Llama 3.1's llama3 scaling); load the Hugging Face "
                     'directory instead, whose config.json carries the llama3 rope_scaling')
  if g('rope.scaling.attn_factor') not in (None, 1.0):
    raise ValueError(f'unsupported GGUF {arch}.rope.scaling.attn_factor='
                     f'{g("rope.scaling.attn_factor")} (longrope / yarn attention scaling)')
  n_layers = int(g('block_count'))
  extra: dict[str, Any] = {'qk_norm': arch in ('qwen3', 'gemma3', 'qwen3moe')}
  rot = g('rope.dimension_count')
  if rot is not None and int(rot) != head_dim:  # partial rotary (Phi-3): rot dims of each head
    factor = int(rot) / head_dim
    if int(head_dim * factor) < int(rot):  # so that rotary_dim gives back rot exactly
      factor = math.nextafter(factor, 1.0)
    extra['partial_rotary_factor'] = factor
  if arch == 'phi3':
    # Phi3MiniModel writes no key_length (head_dim = hidden / heads) and the sliding window, 0 for
    # none (Phi-4). llama.cpp currently runs Phi-3 without its window; transformers, the reference
    # of the checkpoint the file came from, applies it, and so do we (as for that checkpoint).
    extra.update(fused_qkv=True, fused_gate_up=True,
                 sliding_window=int(g('attention.sliding_window', 0) or 0) or None)
  n_experts = int(g('expert_count', 0) or 0)
  if n_experts:
    extra.update(_gguf_moe_fields(arch, g, n_experts, tensor_names))
  if arch in ('gemma2', 'gemma3'):
    # llama.cpp's conventions: the layer pattern (Gemma 2 alternates, Gemma 3 has one global layer
    # in six), Gemma 3's local RoPE base of 10000, and the 27B models' query scale hidden / heads.
    pattern = 2 if arch == 'gemma2' else 6
    big = hidden == (4608 if arch == 'gemma2' else 5376)
    extra.update(
        norm_plus_one=True, post_norms=True, embed_scale=True, activation='gelu_tanh',
        sliding_window=int(g('attention.sliding_window')),
        layer_types=tuple('sliding_attention' if (i + 1) % pattern else 'full_attention'
                          for i in range(n_layers)),
        query_pre_attn_scalar=float(hidden // heads if big else head_dim),
        attn_softcap=g('attn_logit_softcapping'), final_softcap=g('final_logit_softcapping'),
        rope_local_theta=10000.0 if arch == 'gemma3' else None)
  model_type = {'gemma3': 'gemma3_text', 'qwen2moe': 'qwen2_moe',
                'qwen3moe': 'qwen3_moe'}.get(arch, arch)
  if arch == 'llama' and n_experts:
    model_type = 'mixtral'
  return ModelConfig(
      model_type=model_type,
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(g('feed_forward_length')),
      num_layers=n_layers,
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
      **extra,
      **_rope_fields(rope_scaling),
  )


def _gguf_moe_fields(arch: str, g, n_experts: int, tensor_names: set[str]) -> dict[str, Any]:
  """The mixture-of-experts fields of a GGUF file (``g``: its ``{arch}.`` keys), as llama.cpp reads
  them: Mixtral (``llama``) experts are ``feed_forward_length`` wide, Qwen's
  ``expert_feed_forward_length`` (else ``feed_forward_length / expert_used_count``), Qwen2-MoE's
  shared expert ``expert_shared_feed_forward_length`` (else ``feed_forward_length``)."""
  if arch not in ('llama', 'qwen2moe', 'qwen3moe'):
    raise ValueError(f'GGUF architecture {arch!r} with experts is not supported')
  gating = g('expert_gating_func')
  if gating not in (None, 1):  # gguf.ExpertGatingFuncType: 1 softmax, 2 sigmoid
    raise ValueError(f'unsupported GGUF {arch}.expert_gating_func={gating}; supported: 1 (softmax)')
  if g('expert_weights_scale') not in (None, 0.0, 1.0):  # llama.cpp: 0 means unscaled
    raise ValueError(f'unsupported GGUF {arch}.expert_weights_scale={g("expert_weights_scale")}; '
                     'supported: 1')
  if int(g('leading_dense_block_count', 0) or 0):
    raise ValueError(f'GGUF {arch}.leading_dense_block_count (dense MLP layers before the sparse '
                     'ones) is not supported')
  ff, used = int(g('feed_forward_length')), int(g('expert_used_count'))
  expert = g('expert_feed_forward_length')
  shared = 0
  if arch == 'qwen2moe' and 'blk.0.ffn_up_shexp.weight' in tensor_names:
    shared = int(g('expert_shared_feed_forward_length') or ff)
  # Renormalising the top-k weights: transformers' Mixtral always does, Qwen2-MoE and Qwen3-MoE as
  # their config's norm_topk_prob says (false in the released Qwen1.5/Qwen2-MoE configs, true in
  # Qwen3-MoE's). llama.cpp's converters do not store it for these architectures and its graphs fix
  # the same per architecture (llama and qwen3moe renormalise, qwen2moe does not); we follow
  # expert_weights_norm when a file has it, else llama.cpp. A Qwen2-MoE whose config had
  # norm_topk_prob=true cannot be told from its GGUF: it runs as llama.cpp runs it, unrenormalised.
  return dict(num_experts=n_experts, num_experts_per_tok=used,
              expert_intermediate_size=int(expert or (ff if arch == 'llama' else ff // used)),
              shared_expert_size=shared,
              norm_topk_prob=bool(g('expert_weights_norm', arch != 'qwen2moe')))


def tiny_config(**overrides) -> ModelConfig:
  """A small Llama used by unit tests (byte-level vocabulary)."""
  base = dict(model_type='llama', vocab_size=256, hidden_size=64, intermediate_size=128,
              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=512)
  base.update(overrides)
  return ModelConfig(**base)
