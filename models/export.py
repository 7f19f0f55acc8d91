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
A mixture's experts, which transformers holds as fused 3-D parameters (``mlp.experts.gate_up_proj``,
``down_proj``), and its router (``mlp.gate.weight``) are PEFT ``target_parameters``: one LoRA per
stacked parameter in PEFT's per-expert layout, every expert padded to the largest rank with zeros
(:func:`peft_tensors`).

``'gptq'`` and ``'compressed-tensors'``: the quantized (and 2:4) linears in those libraries'
packed layouts (:mod:`models.gptq_format`, :mod:`models.ct_format`), the rest dense, with the
``quantization_config`` in ``config.json``; transformers loads them through its integrations of
those libraries. A quantized base cannot take merged adapters: they are left out and go to a
``'peft'`` export. A fused module of the checkpoint (Phi-3's ``qkv_proj``, ``gate_up_proj``) is
written as one leaf of its parts' output columns side by side (:func:`fuse_leaves`: codes,
scales, zeros and masks concatenated, ``g_idx`` shared), which needs the parts compressed alike;
parts that differ are refused by name before anything is written.

Every export is written under a temporary name and renamed at the end, so a half-written export
never carries the final name.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import shutil
import warnings
from typing import Any, Callable, Iterator, Mapping

import jax
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


# ----------------------------------------------------------------------------------------------
# Fused modules (Phi-3's qkv_proj, gate_up_proj) in the packed formats: one leaf of their parts.

def _short(lin: str) -> str:
  return lin.rsplit('/', 1)[-1]


def _plain(leaf: Any) -> Any:
  """``leaf`` as a packed format sees it: without its adapter (never written into packed
  weights), and a compressed leaf that holds only a dense weight as that weight."""
  if not isinstance(leaf, formats.CompressedLinear):
    return leaf
  if leaf.adapter is not None:
    leaf = leaf.replace(adapter=None)
  if leaf.mask is None and not isinstance(leaf.weight, formats.LEAF_TYPES):
    return leaf.weight
  return leaf


def _kind(leaf: Any) -> str:
  """What kind of weight a (plain) leaf holds, in words."""
  if not isinstance(leaf, formats.CompressedLinear):
    return 'dense'
  w, masked = leaf.weight, leaf.mask is not None
  if isinstance(w, formats.Sparse24Weight):
    kind = '2:4 sparse' + (' and quantized' if isinstance(w.values, formats.QuantizedWeight)
                           else '')
    return kind + (' with a pruning mask' if masked else '')
  if isinstance(w, formats.QuantizedWeight):
    return 'quantized' + (' with a pruning mask' if masked else '')
  if isinstance(w, formats.LEAF_TYPES):
    return type(w).__name__
  return 'pruned (dense with a mask)' if masked else 'dense'


def _grid(leaf: Any) -> formats.QuantizedWeight | None:
  """The quantized weight of a (plain) leaf: its weight, or its 2:4 values; None if it has none."""
  if not isinstance(leaf, formats.CompressedLinear):
    return None
  w = leaf.weight
  if isinstance(w, formats.Sparse24Weight):
    w = w.values
  return w if isinstance(w, formats.QuantizedWeight) else None


def _abstract(x: Any) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct)


def _groups_text(group_size: int) -> str:
  return 'one group per output unit' if group_size == -1 else f'groups of {group_size}'


def _grid_difference(a: formats.QuantizedWeight, b: formats.QuantizedWeight) -> str | None:
  """How ``b``'s grid differs from ``a``'s (``'is X and ... Y'`` phrasing), None if it does not."""
  if a.bits != b.bits:
    return f'is {b.bits}-bit and {{first}} {a.bits}-bit'
  if a.group_size != b.group_size:
    return f'has {_groups_text(b.group_size)} and {{first}} {_groups_text(a.group_size)}'
  if a.symmetric != b.symmetric:
    return (f'is {"symmetric" if b.symmetric else "asymmetric"} and {{first}} '
            f'{"symmetric" if a.symmetric else "asymmetric"}')
  if a.g_idx is None and b.g_idx is None:
    return None
  if _abstract(a.g_idx) or _abstract(b.g_idx):  # values unknown: only act-order or not
    if (a.g_idx is None) == (b.g_idx is None):
      return None
  elif np.array_equal(np.asarray(a.group_index()), np.asarray(b.group_index())):
    return None
  if (a.g_idx is None) != (b.g_idx is None):
    return ('has contiguous groups and {first} an act-order g_idx' if b.g_idx is None
            else 'has an act-order g_idx and {first} contiguous groups')
  return 'has another act-order permutation (g_idx) than {first}'


def _concat(arrays: list[Any]) -> Any:
  """Arrays side by side along their last (output) axis, in host memory; shapes only where any
  is a ``ShapeDtypeStruct``."""
  if any(_abstract(a) for a in arrays):
    shape = tuple(arrays[0].shape[:-1]) + (sum(int(a.shape[-1]) for a in arrays),)
    return jax.ShapeDtypeStruct(shape, arrays[0].dtype)
  return np.concatenate([np.asarray(a) for a in arrays], axis=-1)


def fuse_leaves(module: str, parts: Mapping[str, Any]) -> Any:
  """One leaf of a fused module (``parts``: ``{our linear: leaf}`` in the fused order): the
  parts' output columns side by side, as the checkpoint's one matrix holds them (the inverse of
  :func:`kernels.formats.split_columns`). Codes, scales, zeros, masks and 2:4 values and indices
  are concatenated along the output axis; an act-order ``g_idx`` is per input row and shared.
  Adapters are left out (a packed format never holds them). Arrays may be ``ShapeDtypeStruct``
  (a check of a run's flags): the result then has their shapes.

  Raises:
    ExportError: parts that cannot be one matrix (of another kind, bits, group size, symmetry or
      act-order permutation), naming the module and the difference.
  """
  names = list(parts)
  leaves = [_plain(parts[lin]) for lin in names]
  fused = ', '.join(_short(lin) for lin in names)
  first, first_leaf = _short(names[0]), leaves[0]

  def refuse(lin, what):
    raise ExportError(
        f'{module} holds {fused} fused into one matrix, but {_short(lin)} {what}: the parts of '
        'a fused module are written as one and must be compressed alike (one rule for all of '
        'them), or export --format=hf')

  for lin, leaf in zip(names[1:], leaves[1:]):
    if _kind(leaf) != _kind(first_leaf):
      refuse(lin, f'is {_kind(leaf)} and {first} {_kind(first_leaf)}')
    a, b = _grid(first_leaf), _grid(leaf)
    if a is not None:
      diff = _grid_difference(a, b)
      if diff is not None:
        refuse(lin, diff.format(first=first))
  grid = _grid(first_leaf)
  if grid is not None:  # one g_idx for all (their groups are equal; a part may spell it None)
    leaves = [_with_grid(leaf, _grid(leaf).replace(g_idx=grid.g_idx)) for leaf in leaves]
  flat = [jax.tree.flatten(leaf) for leaf in leaves]
  treedef = flat[0][1]
  if any(t != treedef for _, t in flat):
    raise ExportError(f'{module} holds {fused} fused into one matrix, but their leaves differ in '
                      'structure: export --format=hf')
  arrays = [_concat(list(column)) if len(column[0].shape) >= 2 else column[0]
            for column in zip(*(a for a, _ in flat))]
  return jax.tree.unflatten(treedef, arrays)


def _with_grid(leaf: formats.CompressedLinear, q: formats.QuantizedWeight) -> Any:
  """``leaf`` with its quantized weight (or 2:4 values) ``q``."""
  w = leaf.weight
  if isinstance(w, formats.Sparse24Weight):
    return leaf.replace(weight=w.replace(values=q))
  return leaf.replace(weight=q)


def fuse_linears(linears: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """``{Hugging Face module: leaf}`` of block linears with the parts of each fused module of
  ``cfg``'s checkpoints (:func:`models.loading.fused_modules`) replaced by one leaf
  (:func:`fuse_leaves`), where the first part stood. Leaves may be abstract."""
  fused = loading.fused_modules(cfg)
  if not fused:
    return dict(linears)
  part_of = {loading.hf_module(lin, cfg.model_type): (module, lins)
             for module, lins in fused.items() for lin in lins}
  out: dict[str, Any] = {}
  for name, leaf in linears.items():
    hf = name.partition('.layers.')[2].partition('.')[2]  # model.layers.{i}.{hf}
    if hf not in part_of:
      out[name] = leaf
      continue
    module, lins = part_of[hf]
    prefix = name[:len(name) - len(hf)]
    key = prefix + module
    if key not in out:
      out[key] = fuse_leaves(key, {lin: linears[prefix + loading.hf_module(lin, cfg.model_type)]
                                   for lin in lins})
  return out


@contextlib.contextmanager
def _naming_fused(cfg: ModelConfig) -> Iterator[None]:
  """A format's refusal that names a fused module says which of our linears it holds."""
  fused = loading.fused_modules(cfg)
  try:
    yield
  except ExportError as e:
    if not fused:
      raise
    pattern = r'(model\.layers\.\d+\.(' + '|'.join(map(re.escape, fused)) + r'))(?!\w|\.\w)'
    msg = re.sub(pattern, lambda m: f'{m.group(1)} (fused '
                 f'{", ".join(_short(lin) for lin in fused[m.group(2)])})', str(e), count=1)
    if msg == str(e):
      raise
    raise ExportError(msg) from e


def _dense(leaf, merge_adapters: bool) -> np.ndarray:
  w = formats.effective_weight(leaf) if merge_adapters else formats.to_dense(leaf)
  return np.asarray(w, np.float32)


def block_linears(params: dict[str, Any], cfg: ModelConfig | None = None) -> dict[str, Any]:
  """``{Hugging Face module name: leaf}`` of every block linear, in order (``cfg`` names Mixtral's
  experts as its checkpoints do)."""
  model_type = None if cfg is None else cfg.model_type
  return {f'model.layers.{i}.{loading.hf_module(lin, model_type)}': tree.get_linear(block, lin)
          for i, block in enumerate(params['layers']) for lin in llama.block_linear_names(block)}


def _unfused_packed_linears(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """Our block linears that a quantized format writes (a mixture's routers stay dense)."""
  routers = {loading.hf_module(r, cfg.model_type) for r in llama.ROUTERS}
  return {m: leaf for m, leaf in block_linears(params, cfg).items()
          if m.split('.', 3)[3] not in routers}


def packed_linears(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """``{Hugging Face module: leaf}`` of the block linears a quantized format writes, as the
  checkpoint holds them: a fused module as one leaf (:func:`fuse_linears`; raises ExportError
  where its parts cannot be one matrix), a mixture's routers left out (they stay dense)."""
  return fuse_linears(_unfused_packed_linears(params, cfg), cfg)


def hf_state_dict(params: dict[str, Any], cfg: ModelConfig, *, merge_adapters: bool = True,
                  linear_tensors: Callable[[str, Any], dict[str, np.ndarray]] | None = None
                  ) -> dict[str, np.ndarray]:
  """Hugging Face tensor names -> float32 arrays (linears ``[out, in]``) of a param tree.

  ``linear_tensors(module, leaf)``, when given, writes each block linear's weight instead (a
  quantized format's tensors; a fused module's as one leaf, :func:`fuse_leaves`); biases, norms,
  embeddings and the head stay dense.
  """
  out = {'model.embed_tokens.weight': np.asarray(params['embed_tokens']['embedding'], np.float32),
         'model.norm.weight': np.asarray(params['norm']['scale'], np.float32)}
  if 'lm_head' in params:
    out['lm_head.weight'] = np.ascontiguousarray(_dense(params['lm_head']['kernel'], merge_adapters).T)
  elif not cfg.tie_word_embeddings:
    raise ExportError('the model has no lm_head but its config does not tie the embeddings')
  fused = loading.fused_modules(cfg)
  for i, block in enumerate(params['layers']):
    pre = f'model.layers.{i}.'
    for norm in llama.norm_names(cfg):
      out[f'{pre}{norm.replace("/", ".")}.weight'] = np.asarray(
          llama.get_node(block, norm)['scale'], np.float32)
    for module, lins in fused.items():  # Phi-3: one matrix of several of our linears
      parts = [llama.get_node(block, lin) for lin in lins]
      if any('bias' in node for node in parts):
        raise ExportError(f'{pre}{module}: {ARCHITECTURES[cfg.model_type]} has no biases there')
      if linear_tensors is not None:
        out.update(linear_tensors(f'{pre}{module}', fuse_leaves(
            f'{pre}{module}', {lin: node['kernel'] for lin, node in zip(lins, parts)})))
      else:
        out[f'{pre}{module}.weight'] = np.concatenate(
            [_dense(node['kernel'], merge_adapters).T for node in parts], axis=0)
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


# A mixture's experts and router as transformers 5 holds them, in every family we export (Mixtral,
# Qwen2-MoE, Qwen3-MoE): ``mlp.experts.gate_up_proj [E, 2 * ff, hidden]`` (each expert's gate rows,
# then its up rows), ``mlp.experts.down_proj [E, hidden, ff]`` and the router ``mlp.gate.weight
# [E, hidden]``, parameters of modules that are not Linear layers. PEFT adapts them through
# ``LoraConfig.target_parameters`` (its ``ParamWrapper``), named by the parameter.
_EXPERT_PARAMETERS = {'gate_up_proj': ('gate_proj', 'up_proj'), 'down_proj': ('down_proj',)}
_MIXTURES = ('mixtral', 'qwen2_moe', 'qwen3_moe')
_PARAMETER_TARGET = re.compile(r'\.mlp\.(experts\.(gate_up_proj|down_proj)|gate\.weight)$')


def _side_by_side(shapes: list[tuple[int, int]], parts: list[tuple[np.ndarray, np.ndarray] | None]
                  ) -> tuple[np.ndarray, np.ndarray] | None:
  """One adapter ``(a, b)`` of a matrix fused from parts of ``shapes`` (``[in, out]`` each) with
  adapters ``parts`` (None: none): ``a = [a_1 | a_2 ...]`` and ``b`` block-diagonal, so ``x a b =
  [x a_1 b_1, x a_2 b_2, ...]`` exactly, at the sum of their ranks. None if no part has one."""
  if all(p is None for p in parts):
    return None
  n_in = shapes[0][0]
  parts = [p if p is not None else (np.zeros((n_in, 0), np.float32),
                                    np.zeros((0, shape[1]), np.float32))
           for p, shape in zip(parts, shapes)]
  a = np.concatenate([p[0] for p in parts], axis=1)
  b = np.zeros((a.shape[1], sum(p[1].shape[1] for p in parts)), np.float32)
  r = c = 0
  for _, pb in parts:
    b[r:r + pb.shape[0], c:c + pb.shape[1]] = pb
    r, c = r + pb.shape[0], c + pb.shape[1]
  return a, b


def _expert_lora(parts: list[tuple[np.ndarray, np.ndarray] | None]
                 ) -> tuple[np.ndarray, np.ndarray, int] | None:
  """PEFT's ``lora_A.weight [r * E, in]``, ``lora_B.weight [out, r * E]`` and rank ``r`` of one
  stacked expert parameter from each expert's adapter ``(a [in, r_e], b [r_e, out])`` (None: none).

  PEFT's ``ParamWrapper`` gives every expert the same rank and reads expert ``e``'s ``A_e [r, in]``
  from rows ``e * r ...`` of ``lora_A`` and its ``B_e [out, r]`` from columns ``k * E + e`` of
  ``lora_B`` (rank-major), adding ``B_e A_e * lora_alpha / r`` to the parameter's ``[out, in]``
  slice of expert ``e``. So ``A_e = a^T``, ``B_e = b^T`` (scale 1 with ``lora_alpha = r``), each
  padded to the largest rank with zero rows/columns, and an expert without an adapter is a zero
  block: all exact.
  """
  present = [p for p in parts if p is not None]
  if not present:
    return None
  n_in, n_out = present[0][0].shape[0], present[0][1].shape[1]
  r, n = max(p[0].shape[1] for p in present), len(parts)
  if r == 0:
    return None
  a_rows = np.zeros((n, r, n_in), np.float32)
  b_cols = np.zeros((n_out, r, n), np.float32)
  for e, p in enumerate(parts):
    if p is not None:
      k = p[0].shape[1]
      a_rows[e, :k] = p[0].T
      b_cols[:, :k, e] = p[1].T
  return a_rows.reshape(n * r, n_in), b_cols.reshape(n_out, r * n), r


def peft_tensors(params: dict[str, Any], cfg: ModelConfig | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """The PEFT LoRA tensors of every adapter of a param tree, and each target's rank (keyed by the
  module's name, or by the parameter's for PEFT's ``target_parameters``: see
  :func:`peft_config`).

  A fused module (Phi-3's ``qkv_proj``, ``gate_up_proj``) gets one adapter holding its parts':
  ``A = [a_q | a_k | a_v]`` and ``B`` block-diagonal, so ``x A B = [x a_q b_q, x a_k b_k,
  x a_v b_v]`` exactly, at the sum of their ranks (a part without an adapter adds nothing).

  A mixture's experts (transformers' fused ``mlp.experts.gate_up_proj`` and ``down_proj``) get one
  LoRA per stacked parameter in PEFT's per-expert layout (:func:`_expert_lora`; gate and up fused
  per expert as above), its router one on ``mlp.gate.weight``. Attention, Qwen2-MoE's shared expert
  and its gate are Linear modules, as for a dense model.

  Raises:
    ExportError: no adapters, or adapters on the experts of a mixture whose experts we do not
      know transformers' layout of.
  """
  tensors, ranks = {}, {}
  fused = {} if cfg is None else loading.fused_modules(cfg)
  in_fused = {lin for lins in fused.values() for lin in lins}

  def factors(leaf):
    if not isinstance(leaf, formats.CompressedLinear) or leaf.adapter is None:
      return None
    return tuple(np.asarray(formats.dequantize(x) if isinstance(x, formats.QuantizedWeight) else x,
                            np.float32) for x in (leaf.adapter.a, leaf.adapter.b))

  def put(module, a, b, target=None):
    tensors[f'base_model.model.{module}.lora_A.weight'] = np.ascontiguousarray(a.T)
    tensors[f'base_model.model.{module}.lora_B.weight'] = np.ascontiguousarray(b.T)
    ranks[target or module] = int(a.shape[1])

  model_type = None if cfg is None else cfg.model_type
  for i, block in enumerate(params['layers']):
    pre = f'model.layers.{i}.'
    for lin in llama.block_linear_names(block):
      if lin in in_fused or lin.startswith('mlp/experts/'):
        continue
      ab = factors(tree.get_linear(block, lin))
      if ab is None:
        continue
      if lin == 'mlp/gate':  # a mixture's router: a `weight` parameter of transformers' router
        put(f'{pre}mlp.gate', *ab, target=f'{pre}mlp.gate.weight')
      else:
        put(f'{pre}{loading.hf_module(lin, model_type)}', *ab)
    experts = block['mlp'].get('experts') or []
    stacks = {}
    for param, lins in _EXPERT_PARAMETERS.items():
      per_expert = []
      for expert in experts:
        leaves = [expert[lin]['kernel'] for lin in lins]
        per_expert.append(_side_by_side([tuple(leaf.shape) for leaf in leaves],
                                        [factors(leaf) for leaf in leaves]))
      stack = _expert_lora(per_expert)
      if stack is not None:
        stacks[param] = stack
    if stacks and model_type is not None and model_type not in _MIXTURES:
      raise ExportError(f'{pre}mlp.experts: adapters on the experts of a {model_type} model, whose '
                        "experts' layout in transformers we do not know: export --format=hf "
                        '(adapters merged) instead')
    for param, (a, b, r) in stacks.items():
      # PEFT wraps the experts module once per targeted parameter, in the order the module
      # registers them: with both targeted, gate_up_proj's LoRA is the inner wrapper's.
      owner = f'{pre}mlp.experts' + ('.base_layer' if param == 'gate_up_proj' and len(stacks) == 2
                                     else '')
      tensors[f'base_model.model.{owner}.lora_A.weight'] = a
      tensors[f'base_model.model.{owner}.lora_B.weight'] = b
      ranks[f'{pre}mlp.experts.{param}'] = r
    for module, lins in fused.items():
      leaves = [tree.get_linear(block, lin) for lin in lins]
      ab = _side_by_side([tuple(leaf.shape) for leaf in leaves], [factors(leaf) for leaf in leaves])
      if ab is not None:
        put(f'{pre}{module}', *ab)
  if not ranks:
    raise ExportError('the model carries no low-rank adapters: nothing to write as PEFT')
  return tensors, ranks


def peft_config(ranks: dict[str, int]) -> dict[str, Any]:
  """``adapter_config.json`` for targets of the given ranks, each with scale ``alpha / r = 1``:
  modules (``target_modules``, by their last name, in ``layers_to_transform``) and a mixture's
  stacked experts and router (``target_parameters``, by their full names: PEFT names such a
  target, for ``rank_pattern`` too, by the parameter). PEFT 0.21 applies such a parameter's
  ``rank_pattern`` entry but warns that it "did not match any targeted module" (its check looks
  at modules only); the tensors it loads have our ranks."""
  r = max(set(ranks.values()), key=list(ranks.values()).count)  # the commonest rank
  other = {m: k for m, k in ranks.items() if k != r}
  modules = [m for m in ranks if not _PARAMETER_TARGET.search(m)]
  parameters = sorted(m for m in ranks if _PARAMETER_TARGET.search(m))
  config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': r, 'lora_alpha': r,
            'target_modules': sorted({m.rsplit('.', 1)[1] for m in modules}),
            'layers_to_transform': sorted({int(m.split('.')[2]) for m in modules}) or None,
            'rank_pattern': other, 'alpha_pattern': other, 'lora_dropout': 0.0, 'bias': 'none',
            'fan_in_fan_out': False, 'use_rslora': False, 'init_lora_weights': True,
            'inference_mode': True, 'base_model_name_or_path': None}
  if parameters:
    config['target_parameters'] = parameters
  return config


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
  if cfg.num_experts:
    warnings.warn(
        f'{fmt} export of a mixture of experts: the experts are written one module each (the '
        'names of the published GPTQ mixtures), which our loader reads back exactly; transformers '
        '5 does not load them (it holds the experts as fused parameters: the gptq checkpoint '
        'loads with its experts left at random initialisation, compressed-tensors refuses it)',
        stacklevel=2)
  with_adapter = [m for m, leaf in _unfused_packed_linears(params, cfg).items()
                  if isinstance(leaf, formats.CompressedLinear) and leaf.adapter is not None]
  if with_adapter and merge_adapters:
    raise ExportError(f'{with_adapter[0]} has a low-rank adapter, which cannot be merged into '
                      f'{fmt} weights: pass --nomerge_adapters to leave the adapters out, and '
                      'export them with --format=peft')
  linears = packed_linears(params, cfg)  # fused modules' parts checked first
  with _naming_fused(cfg):
    qcfg = fmt_lib.quantization_config(linears)
    del linears
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
  _, ranks = peft_tensors(params, cfg)  # raises before writing when there are no adapters
  experts = [t for t in ranks if '.mlp.experts.' in t]
  if experts and peft_base != 'hf':
    raise ExportError(f'{experts[0]}: the LoRA of the experts attaches to transformers\' fused '
                      f'expert parameters, which a {peft_base} base does not have (its experts '
                      'are packed one by one): pass --peft_base=hf')
  if peft_base == 'hf':
    write_base = lambda d: save_hf(d, params, cfg, tokenizer=tokenizer, merge_adapters=False)
  else:
    linears = packed_linears(params, cfg)
    with _naming_fused(cfg):
      loading.quantized_format(peft_base).check_linears(linears)
    del linears
    write_base = lambda d: save_quantized(d, peft_base, params, cfg, tokenizer=tokenizer)
  return write_dir(out, lambda tmp: (write_base(tmp / 'base'),
                                     save_peft(tmp / 'adapter', params, cfg=cfg)))
