"""Export of a (compressed, recovered) model to formats other tools load.

``'hf'``: a Hugging Face checkpoint directory, ``config.json`` + ``model.safetensors`` (+ the
tokenizer's files when the model has a transformers tokenizer), loaded by
``transformers.AutoModelForCausalLM.from_pretrained``. Every linear is written dense in
``[out, in]`` layout: a compressed leaf as its dequantized (and masked) weight, with its low-rank
adapter merged in (``merge_adapters=True``) or left out.

``'peft'``: the low-rank adapters (EoRA, SVD, SRR, LoRA from fine-tuning; quantized ones
dequantized) as a PEFT LoRA adapter, ``adapter_model.safetensors`` + ``adapter_config.json``, for
the ``'hf'`` export of the same model with its adapters left out. Our adapter adds
``(x @ a) @ b``; PEFT adds ``B(A(x)) * lora_alpha / r``, so ``A = a^T``, ``B = b^T`` and
``lora_alpha = r`` (per module through ``rank_pattern``/``alpha_pattern`` where ranks differ).
Linears without an adapter get none (PEFT's zero-initialised ``B`` leaves them as they are).

``'gptq'`` and ``'compressed-tensors'``: the quantized (and 2:4) linears in those libraries'
packed layouts (:mod:`models.gptq_format`, :mod:`models.ct_format`), the rest dense, with the
``quantization_config`` in ``config.json``; transformers loads them through its integrations of
those libraries. A quantized base cannot take merged adapters: they are left out and go to a
``'peft'`` export.

Every export is written under a temporary name and renamed at the end, so a half-written export
never carries the final name.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Callable

import numpy as np

from kernels import formats
from models import config as config_lib
from models import llama
from models.config import ModelConfig
from models import loading
from models import tree

FORMATS = ('hf', 'gptq', 'compressed-tensors', 'peft')
QUANTIZED_FORMATS = tuple(loading.QUANTIZED_FORMATS)
ARCHITECTURES = {v: k for k, v in config_lib.SUPPORTED_ARCHITECTURES.items()}


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
      'head_dim': cfg.head_dim, 'hidden_act': _HF_ACTIVATIONS[cfg.activation],
      'rope_theta': cfg.rope_theta,
      'rms_norm_eps': cfg.rms_norm_eps, 'tie_word_embeddings': cfg.tie_word_embeddings,
      'max_position_embeddings': cfg.max_position_embeddings, 'torch_dtype': 'float32',
      'bos_token_id': cfg.bos_token_id, 'eos_token_id': cfg.eos_token_id,
      'pad_token_id': cfg.pad_token_id,
  }
  if cfg.model_type in ('gemma2', 'gemma3_text', 'phi3'):
    return _family_config(cfg, out)
  out.update(_moe_config(cfg))
  if cfg.model_type in ('qwen2', 'qwen2_moe'):
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
  scaling = {k: v for k, v in _rope_parameters(cfg).items() if k != 'rope_theta'}
  if scaling['rope_type'] != 'default':
    out['rope_scaling'] = scaling
  return out


def _moe_config(cfg: ModelConfig) -> dict[str, Any]:
  """The mixture-of-experts fields of ``config.json`` (none for a dense model)."""
  if not cfg.num_experts:
    return {}
  if cfg.model_type == 'mixtral':
    if cfg.expert_intermediate_size != cfg.intermediate_size or not cfg.norm_topk_prob:
      raise ExportError('Mixtral experts are intermediate_size wide and renormalise the top-k')
    return {'num_local_experts': cfg.num_experts, 'num_experts_per_tok': cfg.num_experts_per_tok}
  out = {'num_experts': cfg.num_experts, 'num_experts_per_tok': cfg.num_experts_per_tok,
         'moe_intermediate_size': cfg.expert_intermediate_size,
         'norm_topk_prob': cfg.norm_topk_prob, 'decoder_sparse_step': 1, 'mlp_only_layers': []}
  if cfg.model_type == 'qwen2_moe':
    out['shared_expert_intermediate_size'] = cfg.shared_expert_size
  elif cfg.shared_expert_size:
    raise ExportError(f'{ARCHITECTURES[cfg.model_type]} has no shared expert')
  return out


_HF_ACTIVATIONS = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh'}


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
  """Transformers' ``rope_parameters`` of the (global) RoPE of ``cfg``."""
  out: dict[str, Any] = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_llama3 is not None:
    factor, low, high, old = cfg.rope_llama3
    out.update(rope_type='llama3', factor=factor, low_freq_factor=low, high_freq_factor=high,
               original_max_position_embeddings=old)
  elif cfg.rope_linear_factor != 1.0:
    out.update(rope_type='linear', factor=cfg.rope_linear_factor)
  return out


def _number(x: float | None) -> float | int | None:
  """An integral float as the int transformers' typed configs expect."""
  return int(x) if x is not None and float(x).is_integer() else x


def _family_config(cfg: ModelConfig, out: dict[str, Any]) -> dict[str, Any]:
  """``config.json`` fields of Gemma 2/3 and Phi-3 (their RoPE lives in ``rope_parameters``)."""
  for k in ('rope_theta', 'hidden_act'):
    out.pop(k)
  if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
    raise ExportError(f'{ARCHITECTURES[cfg.model_type]} has no linear biases; this model has some')
  rope = _rope_parameters(cfg)
  if cfg.model_type == 'phi3':
    out.update(hidden_act=_HF_ACTIVATIONS[cfg.activation], sliding_window=cfg.sliding_window,
               rope_parameters=dict(rope, partial_rotary_factor=cfg.partial_rotary_factor),
               original_max_position_embeddings=cfg.max_position_embeddings)
    return out
  out.update(hidden_activation=_HF_ACTIVATIONS[cfg.activation], sliding_window=cfg.sliding_window,
             layer_types=list(cfg.layer_types or ['full_attention'] * cfg.num_layers),
             query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar),
             attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
             attention_bias=False)
  if cfg.model_type == 'gemma3_text':
    local = {'rope_type': 'default', 'rope_theta': cfg.rope_local_theta or cfg.rope_theta}
    out['rope_parameters'] = {'full_attention': rope, 'sliding_attention': local}
  else:
    out['rope_parameters'] = rope
  return out


def _fused_refusal(cfg: ModelConfig, fmt: str) -> str:
  return (f'{ARCHITECTURES[cfg.model_type]} stores {", ".join(loading.fused_modules(cfg))} fused, '
          f'which {fmt} cannot express from our separate linears; export --format=hf')


def _dense(leaf, merge_adapters: bool) -> np.ndarray:
  w = formats.effective_weight(leaf) if merge_adapters else formats.to_dense(leaf)
  return np.asarray(w, np.float32)


def block_linears(params: dict[str, Any], cfg: ModelConfig | None = None) -> dict[str, Any]:
  """``{Hugging Face module name: leaf}`` of every block linear, in order (``cfg`` names Mixtral's
  experts as its checkpoints do)."""
  model_type = None if cfg is None else cfg.model_type
  return {f'model.layers.{i}.{loading.hf_module(lin, model_type)}': tree.get_linear(block, lin)
          for i, block in enumerate(params['layers']) for lin in llama.block_linear_names(block)}


def _packed_linears(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """The block linears a quantized format writes (a mixture's routers stay dense)."""
  routers = {loading.hf_module(r, cfg.model_type) for r in llama.ROUTERS}
  return {m: leaf for m, leaf in block_linears(params, cfg).items()
          if m.split('.', 3)[3] not in routers}


def hf_state_dict(params: dict[str, Any], cfg: ModelConfig, *, merge_adapters: bool = True,
                  linear_tensors: Callable[[str, Any], dict[str, np.ndarray]] | None = None
                  ) -> dict[str, np.ndarray]:
  """Hugging Face tensor names -> float32 arrays (linears ``[out, in]``) of a param tree.

  ``linear_tensors(module, leaf)``, when given, writes each block linear's weight instead (a
  quantized format's tensors); biases, norms, embeddings and the head stay dense.
  """
  out = {'model.embed_tokens.weight': np.asarray(params['embed_tokens']['embedding'], np.float32),
         'model.norm.weight': np.asarray(params['norm']['scale'], np.float32)}
  if 'lm_head' in params:
    out['lm_head.weight'] = np.ascontiguousarray(_dense(params['lm_head']['kernel'], merge_adapters).T)
  elif not cfg.tie_word_embeddings:
    raise ExportError('the model has no lm_head but its config does not tie the embeddings')
  fused = loading.fused_modules(cfg)
  if fused and linear_tensors is not None:
    raise ExportError(_fused_refusal(cfg, 'a quantized format'))
  for i, block in enumerate(params['layers']):
    pre = f'model.layers.{i}.'
    for norm in llama.norm_names(cfg):
      out[f'{pre}{norm.replace("/", ".")}.weight'] = np.asarray(
          llama.get_node(block, norm)['scale'], np.float32)
    for module, lins in fused.items():  # Phi-3: one matrix of several of our linears
      parts = [llama.get_node(block, lin) for lin in lins]
      out[f'{pre}{module}.weight'] = np.concatenate(
          [_dense(node['kernel'], merge_adapters).T for node in parts], axis=0)
      if any('bias' in node for node in parts):
        raise ExportError(f'{pre}{module}: {ARCHITECTURES[cfg.model_type]} has no biases there')
    for lin in llama.linear_names(cfg):
      if any(lin in lins for lins in fused.values()):
        continue
      node = llama.get_node(block, lin)
      module = f'{pre}{loading.hf_module(lin, cfg.model_type)}'
      if linear_tensors is not None and lin not in llama.ROUTERS:  # routers stay dense
        out.update(linear_tensors(module, node['kernel']))
      else:
        out[f'{module}.weight'] = np.ascontiguousarray(_dense(node['kernel'], merge_adapters).T)
      if 'bias' in node:
        out[f'{module}.bias'] = np.asarray(node['bias'], np.float32)
  return out


def peft_tensors(params: dict[str, Any], cfg: ModelConfig | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """The PEFT LoRA tensors of every adapter of a param tree, and each module's rank.

  A fused module (Phi-3's ``qkv_proj``, ``gate_up_proj``) gets one adapter holding its parts':
  ``A = [a_q | a_k | a_v]`` and ``B`` block-diagonal, so ``x A B = [x a_q b_q, x a_k b_k,
  x a_v b_v]`` exactly, at the sum of their ranks (a part without an adapter adds nothing).
  """
  tensors, ranks = {}, {}
  fused = {} if cfg is None else loading.fused_modules(cfg)
  in_fused = {lin for lins in fused.values() for lin in lins}

  def factors(leaf):
    if not isinstance(leaf, formats.CompressedLinear) or leaf.adapter is None:
      return None
    return tuple(np.asarray(formats.dequantize(x) if isinstance(x, formats.QuantizedWeight) else x,
                            np.float32) for x in (leaf.adapter.a, leaf.adapter.b))

  def put(module, a, b):
    tensors[f'base_model.model.{module}.lora_A.weight'] = np.ascontiguousarray(a.T)
    tensors[f'base_model.model.{module}.lora_B.weight'] = np.ascontiguousarray(b.T)
    ranks[module] = int(a.shape[1])

  model_type = None if cfg is None else cfg.model_type
  for i, block in enumerate(params['layers']):
    for lin in llama.block_linear_names(block):
      if lin in in_fused:
        continue
      module = f'model.layers.{i}.{loading.hf_module(lin, model_type)}'
      ab = factors(tree.get_linear(block, lin))
      if ab is None:
        continue
      if '.experts.' in module:
        raise ExportError(f'{module}: PEFT attaches LoRA to modules, and transformers holds a '
                          "mixture's experts as one fused parameter: export --format=hf "
                          '(adapters merged) instead')
      put(module, *ab)
    for module, lins in fused.items():
      leaves = [tree.get_linear(block, lin) for lin in lins]
      parts = [factors(leaf) for leaf in leaves]
      if all(p is None for p in parts):
        continue
      n_in = leaves[0].shape[0]
      parts = [p if p is not None else (np.zeros((n_in, 0), np.float32),
                                        np.zeros((0, leaf.shape[1]), np.float32))
               for p, leaf in zip(parts, leaves)]
      a = np.concatenate([p[0] for p in parts], axis=1)
      b = np.zeros((a.shape[1], sum(p[1].shape[1] for p in parts)), np.float32)
      r = c = 0
      for pa, pb in parts:
        b[r:r + pb.shape[0], c:c + pb.shape[1]] = pb
        r, c = r + pb.shape[0], c + pb.shape[1]
      put(f'model.layers.{i}.{module}', a, b)
  if not ranks:
    raise ExportError('the model carries no low-rank adapters: nothing to write as PEFT')
  return tensors, ranks


def peft_config(ranks: dict[str, int]) -> dict[str, Any]:
  """``adapter_config.json`` for modules of the given ranks, each with scale ``alpha / r = 1``."""
  r = max(set(ranks.values()), key=list(ranks.values()).count)  # the commonest rank
  other = {m: k for m, k in ranks.items() if k != r}
  return {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': r, 'lora_alpha': r,
          'target_modules': sorted({m.rsplit('.', 1)[1] for m in ranks}),
          'layers_to_transform': sorted({int(m.split('.')[2]) for m in ranks}),
          'rank_pattern': other, 'alpha_pattern': other, 'lora_dropout': 0.0, 'bias': 'none',
          'fan_in_fan_out': False, 'use_rslora': False, 'init_lora_weights': True,
          'inference_mode': True, 'base_model_name_or_path': None}


def save_peft(out_dir: str | pathlib.Path, params: dict[str, Any], *,
              cfg: ModelConfig | None = None, overwrite: bool = False) -> pathlib.Path:
  """Writes the ``'peft'`` adapter export of ``params`` to ``out_dir``; load it with
  ``peft.PeftModel.from_pretrained(base, out_dir)`` on the ``'hf'`` export with
  ``merge_adapters=False``."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  out = check_output_dir(out_dir, overwrite)
  tensors, ranks = peft_tensors(params, cfg)
  config = peft_config(ranks)

  def write(tmp):
    save_file(tensors, str(tmp / 'adapter_model.safetensors'), metadata={'format': 'pt'})
    (tmp / 'adapter_config.json').write_text(json.dumps(config, indent=2) + '\n')
  return write_dir(out, write)


def write_dir(out: pathlib.Path, write) -> pathlib.Path:
  """Runs ``write(tmp)`` into ``OUT.tmp`` and renames it to ``out`` (replacing it) at the end."""
  tmp = out.with_name(out.name + '.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    write(tmp)
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
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
  out = check_output_dir(out_dir, overwrite)
  config = hf_config(cfg)
  return _write_checkpoint(out, hf_state_dict(params, cfg, merge_adapters=merge_adapters),
                           config, tokenizer)


def _write_checkpoint(out: pathlib.Path, tensors: dict[str, np.ndarray], config: dict[str, Any],
                      tokenizer: Any) -> pathlib.Path:
  """``model.safetensors`` + ``config.json`` (+ the tokenizer's files) into ``out``, renamed into
  place at the end."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  # safetensors writes an array's buffer as it lies: every tensor must be C-contiguous.
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

  def write(tmp):
    save_file(tensors, str(tmp / 'model.safetensors'), metadata={'format': 'pt'})
    (tmp / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    if tokenizer is not None and hasattr(tokenizer, 'save_pretrained'):
      tokenizer.save_pretrained(str(tmp))
  return write_dir(out, write)


def save_quantized(out_dir: str | pathlib.Path, fmt: str, params: dict[str, Any],
                   cfg: ModelConfig, *, tokenizer: Any = None, merge_adapters: bool = False,
                   overwrite: bool = False) -> pathlib.Path:
  """Writes the ``'gptq'`` or ``'compressed-tensors'`` export of ``params`` to ``out_dir``.

  Adapters cannot be merged into quantized weights: with ``merge_adapters`` a model that has them
  is refused, otherwise they are left out. Checks come before anything is written.
  """
  out = check_output_dir(out_dir, overwrite)
  fmt_lib = loading.quantized_format(fmt)
  if loading.fused_modules(cfg):
    raise ExportError(_fused_refusal(cfg, fmt))
  linears = _packed_linears(params, cfg)
  with_adapter = [m for m, leaf in linears.items()
                  if isinstance(leaf, formats.CompressedLinear) and leaf.adapter is not None]
  if with_adapter and merge_adapters:
    raise ExportError(f'{with_adapter[0]} has a low-rank adapter, which cannot be merged into '
                      f'{fmt} weights: pass --nomerge_adapters to leave the adapters out, and '
                      'export them with --format=peft')
  qcfg = fmt_lib.quantization_config(linears)
  config = dict(hf_config(cfg), quantization_config=qcfg)
  tensors = hf_state_dict(
      params, cfg, merge_adapters=False,
      linear_tensors=lambda module, leaf: fmt_lib.linear_tensors(module, leaf, qcfg))
  return _write_checkpoint(out, tensors, config, tokenizer)


PEFT_BASES = ('hf',) + QUANTIZED_FORMATS


def save(out_dir: str | pathlib.Path, fmt: str, params: dict[str, Any], cfg: ModelConfig, *,
         tokenizer: Any = None, merge_adapters: bool = True, peft_base: str = 'hf',
         overwrite: bool = False) -> pathlib.Path:
  """Writes the export of format ``fmt`` to ``out_dir``: ``'hf'`` as :func:`save_hf`, ``'gptq'``
  and ``'compressed-tensors'`` as :func:`save_quantized`; ``'peft'`` as ``OUT/base`` (the
  ``peft_base`` export without adapters: ``'hf'``, ``'gptq'`` or ``'compressed-tensors'``) and
  ``OUT/adapter`` (:func:`save_peft`), in one rename. Every check comes before anything is
  written."""
  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt!r} is not one of {FORMATS}')
  if peft_base not in PEFT_BASES:
    raise ExportError(f'--peft_base={peft_base!r} is not one of {PEFT_BASES}')
  out = check_output_dir(out_dir, overwrite)
  if fmt == 'hf':
    return save_hf(out, params, cfg, tokenizer=tokenizer, merge_adapters=merge_adapters,
                   overwrite=overwrite)
  if fmt in QUANTIZED_FORMATS:
    return save_quantized(out, fmt, params, cfg, tokenizer=tokenizer,
                          merge_adapters=merge_adapters, overwrite=overwrite)
  if loading.fused_modules(cfg) and peft_base != 'hf':
    raise ExportError(_fused_refusal(cfg, f'--peft_base={peft_base}'))
  peft_tensors(params, cfg)  # raises before writing when there are no adapters
  if peft_base == 'hf':
    write_base = lambda d: save_hf(d, params, cfg, tokenizer=tokenizer, merge_adapters=False)
  else:
    loading.quantized_format(peft_base).check_linears(_packed_linears(params, cfg))
    write_base = lambda d: save_quantized(d, peft_base, params, cfg, tokenizer=tokenizer)
  return write_dir(out, lambda tmp: (write_base(tmp / 'base'),
                                     save_peft(tmp / 'adapter', params, cfg=cfg)))
