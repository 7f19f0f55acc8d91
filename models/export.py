"""Export of a (compressed, recovered) model to formats other tools load.

``'hf'``: a Hugging Face checkpoint directory, ``config.json`` + ``model.safetensors`` (+ the
tokenizer's files when the model has a transformers tokenizer), loaded by
``transformers.AutoModelForCausalLM.from_pretrained``. Every linear is written dense in
``[out, in]`` layout: a compressed leaf as its dequantized (and masked) weight, with its low-rank
adapter merged in (``merge_adapters=True``) or left out. The directory is written under a
temporary name and renamed at the end, so a half-written export never carries the final name.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import numpy as np

from kernels import formats
from models import llama
from models.config import ModelConfig
from models.loading import HF_LINEARS

FORMATS = ('hf',)
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                 'qwen2': 'Qwen2ForCausalLM'}


class ExportError(ValueError):
  """The model cannot be written in the requested format, or the output folder is not usable."""


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """The ``config.json`` of a model of ``cfg`` (the inverse of :func:`models.config.from_hf_dict`)."""
  if cfg.model_type not in ARCHITECTURES:
    raise ExportError(f'no Hugging Face architecture for model type {cfg.model_type!r}')
  out: dict[str, Any] = {
      'architectures': [ARCHITECTURES[cfg.model_type]], 'model_type': cfg.model_type,
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size,
      'intermediate_size': cfg.intermediate_size, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim, 'hidden_act': 'silu', 'rope_theta': cfg.rope_theta,
      'rms_norm_eps': cfg.rms_norm_eps, 'tie_word_embeddings': cfg.tie_word_embeddings,
      'max_position_embeddings': cfg.max_position_embeddings, 'torch_dtype': 'float32',
      'bos_token_id': cfg.bos_token_id, 'eos_token_id': cfg.eos_token_id,
  }
  if cfg.model_type == 'qwen2':
    if not cfg.qkv_bias or cfg.o_bias:
      raise ExportError('Qwen2 has q/k/v biases and no o_proj bias; this model differs')
  elif cfg.qkv_bias != cfg.o_bias:
    raise ExportError(f'{ARCHITECTURES[cfg.model_type]} has one attention_bias for q/k/v and o; '
                      'this model has biases on only some of them')
  else:
    out['attention_bias'] = cfg.qkv_bias
  out['mlp_bias'] = cfg.mlp_bias
  if cfg.sliding_window is not None:
    out['sliding_window'] = cfg.sliding_window
  if cfg.rope_llama3 is not None:
    factor, low, high, old = cfg.rope_llama3
    out['rope_scaling'] = {'rope_type': 'llama3', 'factor': factor, 'low_freq_factor': low,
                           'high_freq_factor': high, 'original_max_position_embeddings': old}
  elif cfg.rope_linear_factor != 1.0:
    out['rope_scaling'] = {'rope_type': 'linear', 'factor': cfg.rope_linear_factor}
  return out


def _dense(leaf, merge_adapters: bool) -> np.ndarray:
  w = formats.effective_weight(leaf) if merge_adapters else formats.to_dense(leaf)
  return np.asarray(w, np.float32)


def hf_state_dict(params: dict[str, Any], cfg: ModelConfig, *,
                  merge_adapters: bool = True) -> dict[str, np.ndarray]:
  """Hugging Face tensor names -> float32 arrays (linears ``[out, in]``) of a param tree."""
  hf_name = {v: k for k, v in HF_LINEARS.items()}
  out = {'model.embed_tokens.weight': np.asarray(params['embed_tokens']['embedding'], np.float32),
         'model.norm.weight': np.asarray(params['norm']['scale'], np.float32)}
  if 'lm_head' in params:
    out['lm_head.weight'] = np.ascontiguousarray(_dense(params['lm_head']['kernel'], merge_adapters).T)
  elif not cfg.tie_word_embeddings:
    raise ExportError('the model has no lm_head but its config does not tie the embeddings')
  for i, block in enumerate(params['layers']):
    pre = f'model.layers.{i}.'
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      out[f'{pre}{norm}.weight'] = np.asarray(block[norm]['scale'], np.float32)
    for lin in llama.LINEAR_NAMES:
      sub, name = lin.split('/')
      node = block[sub][name]
      out[f'{pre}{hf_name[(sub, name)]}.weight'] = np.ascontiguousarray(
          _dense(node['kernel'], merge_adapters).T)
      if 'bias' in node:
        out[f'{pre}{hf_name[(sub, name)]}.bias'] = np.asarray(node['bias'], np.float32)
  return out


def check_output_dir(out_dir: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
  """Raises ExportError unless ``out_dir`` can take an export (absent, empty, or ``overwrite``)."""
  out = pathlib.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise ExportError(f'--out={out} exists and is not a directory')
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ExportError(f'--out={out} is not empty; pass --overwrite to replace it')
  return out


def save_hf(out_dir: str | pathlib.Path, params: dict[str, Any], cfg: ModelConfig, *,
            tokenizer: Any = None, merge_adapters: bool = True,
            overwrite: bool = False) -> pathlib.Path:
  """Writes the ``'hf'`` export of ``params`` to ``out_dir`` (see the module docstring); the
  tokenizer's files too when it has ``save_pretrained``. Checks come before anything is written."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  out = check_output_dir(out_dir, overwrite)
  config = hf_config(cfg)
  # safetensors writes an array's buffer as it lies: every tensor must be C-contiguous.
  tensors = {k: np.ascontiguousarray(v) for k, v in
             hf_state_dict(params, cfg, merge_adapters=merge_adapters).items()}
  tmp = out.with_name(out.name + '.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    save_file(tensors, str(tmp / 'model.safetensors'), metadata={'format': 'pt'})
    (tmp / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    if tokenizer is not None and hasattr(tokenizer, 'save_pretrained'):
      tokenizer.save_pretrained(str(tmp))
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
