"""Tiny random models of every supported family, built with transformers' own config classes.

Used by the parity tests (logits and greedy generation against transformers), by the per-family
pipeline tests and by :mod:`experiments.families_table`. Weights are drawn larger than
transformers' defaults, norms included, so that every family-specific piece (``1 + w`` norms,
soft-capping, q/k norms, routing) moves the logits. :func:`save` can add a character-level
tokenizer so that the main command runs on the checkpoint as on any other.
"""

from __future__ import annotations

import pathlib

SLIDING_WINDOW = 8
_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=256, rms_norm_eps=1e-5, eos_token_id=None,
               bos_token_id=None, pad_token_id=0)
_ALTERNATING = ['sliding_attention', 'full_attention']

FAMILIES = ('qwen3', 'gemma2', 'gemma3', 'phi3')
MOE_FAMILIES = ('mixtral', 'qwen2_moe', 'qwen3_moe')
NUM_EXPERTS = 4


def hf_model(family: str, seed: int = 0, weight_std: float = 0.15, **overrides):
  """``(transformers model, its config)`` of a tiny random model of ``family``, float32, eager
  attention; ``overrides`` replace config fields."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  if family == 'llama':
    cfg = transformers.LlamaConfig(**_COMMON)
    cls = transformers.LlamaForCausalLM
  elif family == 'qwen3':
    cfg = transformers.Qwen3Config(**_COMMON)
    cls = transformers.Qwen3ForCausalLM
  elif family == 'gemma2':
    cfg = transformers.Gemma2Config(**_COMMON, sliding_window=SLIDING_WINDOW, layer_types=_ALTERNATING,
                                    query_pre_attn_scalar=24, attn_logit_softcapping=20.0,
                                    final_logit_softcapping=10.0)
    cls = transformers.Gemma2ForCausalLM
  elif family == 'gemma3':
    cfg = transformers.Gemma3TextConfig(
        **_COMMON, sliding_window=SLIDING_WINDOW, layer_types=_ALTERNATING, query_pre_attn_scalar=24,
        rope_parameters={'sliding_attention': {'rope_type': 'default', 'rope_theta': 10000.0},
                         'full_attention': {'rope_type': 'linear', 'factor': 2.0,
                                            'rope_theta': 1000000.0}})
    cls = transformers.Gemma3ForCausalLM
  elif family == 'phi3':
    cfg = transformers.Phi3Config(
        **_COMMON, sliding_window=SLIDING_WINDOW,
        rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0,
                         'partial_rotary_factor': 0.5})
    cls = transformers.Phi3ForCausalLM
  elif family == 'mixtral':
    cfg = transformers.MixtralConfig(**{**_COMMON, 'intermediate_size': 48}, sliding_window=None,
                                     num_local_experts=NUM_EXPERTS, num_experts_per_tok=2)
    cls = transformers.MixtralForCausalLM
  elif family == 'qwen2_moe':
    cfg = transformers.Qwen2MoeConfig(**_COMMON, num_experts=NUM_EXPERTS, num_experts_per_tok=2,
                                      moe_intermediate_size=48, shared_expert_intermediate_size=64,
                                      norm_topk_prob=False)
    cls = transformers.Qwen2MoeForCausalLM
  elif family == 'qwen3_moe':
    cfg = transformers.Qwen3MoeConfig(**_COMMON, num_experts=NUM_EXPERTS, num_experts_per_tok=2,
                                      moe_intermediate_size=48, norm_topk_prob=True)
    cls = transformers.Qwen3MoeForCausalLM
  else:
    raise ValueError(family)
  for k, v in overrides.items():
    setattr(cfg, k, v)
  cfg._attn_implementation = 'eager'  # pylint: disable=protected-access
  model = cls(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:  # around the unit norm: (1 + w) for Gemma, w for the others
        p.copy_((0.0 if family.startswith('gemma') else 1.0) + 0.3 * torch.randn_like(p))
      else:
        p.normal_(0.0, weight_std if p.ndim > 1 else 0.5)
  return model.float().eval(), cfg


def save(family: str, path: pathlib.Path, *, tokenizer: bool = False,
         max_shard_size: str | None = None, **kwargs) -> pathlib.Path:
  """Writes a tiny ``family`` checkpoint (safetensors + config.json) to ``path``, and with
  ``tokenizer`` a character-level tokenizer of its vocabulary. ``max_shard_size`` (e.g.
  ``'200KB'``) splits the weights into several shards with an index, as big checkpoints are."""
  model, _ = hf_model(family, **kwargs)
  model.save_pretrained(path, safe_serialization=True,
                        **({} if max_shard_size is None else {'max_shard_size': max_shard_size}))
  if tokenizer:
    char_tokenizer(_COMMON['vocab_size']).save_pretrained(path)
  return path


def char_tokenizer(vocab_size: int):
  """A transformers tokenizer with one id per printable ASCII character (and ``<unk>`` = 0)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  chars = [chr(c) for c in range(32, 127)] + ['\n']
  vocab = {'<unk>': 0, **{ch: i + 1 for i, ch in enumerate(chars)}}
  assert len(vocab) <= vocab_size
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex('.|\n'), 'isolated')
  tok.decoder = tokenizers.decoders.Fuse()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>')
