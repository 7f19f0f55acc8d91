"""The sequential compression pipeline: calibrate, compress and propagate block by block.

For block ``i`` (METHODS.md §1, as the GPTQ/SparseGPT/Wanda references do):

1. run the calibration hidden states that the *already compressed* blocks ``0..i-1`` produced
   through block ``i`` and accumulate ``H = X^T X`` (float32) for every distinct linear input
   (q/k/v share one, gate/up share one);
2. compress every linear of the block with the spec its rule gives (optionally true-sequential:
   q/k/v, then o, then gate/up, then down, re-collecting statistics after each stage);
3. optionally add a compensation (``compensate`` callback, e.g. EoRA from ``recover/``) from the
   same statistics, or from the statistics of a separate recovery set (``aux_tokens``);
4. run the compressed block to produce the next block's inputs.

``dense_inputs=True`` collects statistics from the dense model's activations instead (the
inputs stay dense all the way). Memory: one block's weights plus the calibration activations.
Progress: one bar step per block. The finished blocks, the propagated activations and the report
are checkpointed (``checkpoint_dir``) at most every ``checkpoint_every_s`` seconds and after the
last block; a rerun with the same arguments resumes after the last saved block and gives
identical results.

``compress_model`` is the only tree walker; the one-matrix numerics live in their own modules.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from compress import awq as awq_lib
from compress import calibration
from compress import gptq as gptq_lib
from compress import prune as prune_lib
from compress import quantize
from compress import sparsegpt as sparsegpt_lib
from compress.rules import LinearSpec, Rule, match
from kernels import formats
from models import checkpoint
from models import llama
from models.config import ModelConfig

Params = dict[str, Any]
# compensate(name, w_dense [in,out], leaf, stats, aux_stats, spec) -> leaf (with an adapter); aux_stats
# is None unless a separate recovery set was given.
Compensator = Callable[[str, jax.Array, Any, calibration.LinearStats, Any, LinearSpec], Any]


@dataclasses.dataclass
class LayerReport:
  """One row of the per-layer report."""
  name: str
  method: str
  rel_error: float           # ||X W - X W_hat|| / ||X W|| on the calibration inputs
  sparsity: float            # fraction of exact zeros in the effective weight
  bits: float                # weight bits (16 = float)
  seconds: float             # numerics time of this layer
  rel_error_recovered: float | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- one matrix


def compress_matrix(w: jax.Array, stats: calibration.LinearStats | None, spec: LinearSpec,
                    name: str = '') -> tuple[formats.CompressedLinear, dict[str, Any]]:
  """Compresses one ``[in, out]`` weight by ``spec`` (AWQ excepted: it needs the block).

  Returns the leaf and a dict of method details (e.g. GPTQ damping retries).
  """
  spec.check_shape(tuple(w.shape), name)
  w = jnp.asarray(w, jnp.float32)
  h = None if stats is None else stats.hessian
  info: dict[str, Any] = {}
  mask = None
  w_work = w
  sp = spec.sparsity
  if spec.prune == 'sparsegpt':
    if spec.quant == 'gptq':
      qw, mask = _jit(sparsegpt_lib.sparsegpt_quant, spec=sp, quant=spec.qspec,
                      block_size=spec.block_size, percdamp=spec.damp)(w, h)
      return _finish(qw, mask, spec), info
    w_work, mask = _jit(sparsegpt_lib.sparsegpt, spec=sp, block_size=spec.block_size,
                        percdamp=spec.damp)(w, h)
  elif spec.prune == 'wanda':
    w_work, mask = _jit(prune_lib.wanda, spec=sp)(w, h)
  elif spec.prune == 'magnitude':
    w_work, mask = _jit(prune_lib.magnitude, spec=sp)(w)

  if spec.quant == 'none':
    return prune_lib.make_sparse_leaf(w_work, mask, sp), info
  if spec.quant == 'rtn':
    qw = _jit(quantize.rtn, spec=spec.qspec)(w_work)
  elif spec.quant == 'gptq':
    qw, ginfo = _jit(gptq_lib.gptq, spec=spec.qspec, block_size=spec.block_size, damp=spec.damp,
                     act_order=spec.act_order, static_groups=spec.static_groups)(w_work, h, mask=mask)
    gptq_lib.report(ginfo, name)
    info['gptq_damp_retries'] = int(ginfo.retries)
  else:
    raise ValueError(f'{spec.quant} is applied per block, not per matrix')
  return _finish(qw, mask, spec), info


def _finish(qw: formats.QuantizedWeight, mask, spec: LinearSpec) -> formats.CompressedLinear:
  if mask is None:
    return formats.CompressedLinear(weight=qw)
  sp = spec.sparsity
  if sp.is_nm and (sp.n, sp.m) == (2, 4) and qw.g_idx is None:
    return formats.CompressedLinear(weight=formats.sparse24_from_quantized(qw, mask))
  return formats.CompressedLinear(weight=qw, mask=mask)


@functools.lru_cache(maxsize=None)
def _jit_cached(fn, statics: tuple):
  return jax.jit(functools.partial(fn, **dict(statics)))


def _jit(fn, **statics):
  return _jit_cached(fn, tuple(sorted(statics.items())))


@jax.jit
def _error_terms(w, w_hat, h):
  return calibration.output_error(w, jnp.zeros_like(w), h), calibration.output_error(w, w_hat, h)


def _output_error(w, w_hat, h) -> float:
  """``||X W - X W_hat|| / ||X W||`` from ``H = X^T X``."""
  base, err = (float(v) for v in _error_terms(w, w_hat, h))
  return float(np.sqrt(err / base)) if base > 0 else 0.0


@jax.jit
def _leaf_dense(leaf):
  return formats.to_dense(leaf), formats.effective_weight(leaf)


def _sparsity(w_eff) -> float:
  return float(jnp.mean(w_eff == 0))


# --------------------------------------------------------------------------- block helpers


def get_linear(block: Params, lin: str):
  """The weight leaf of linear ``lin`` (e.g. ``'self_attn/q_proj'``) of a block."""
  sub, name = lin.split('/')
  return block[sub][name]['kernel']


def set_linear(block: Params, lin: str, leaf) -> Params:
  """A copy of ``block`` with linear ``lin``'s weight leaf replaced (containers copied, not arrays)."""
  sub, name = lin.split('/')
  out = dict(block)
  out[sub] = dict(block[sub])
  out[sub][name] = dict(block[sub][name], kernel=leaf)
  return out


@functools.lru_cache(maxsize=None)
def _stats_fn(cfg: ModelConfig, keys: tuple[str, ...], dtype_name: str):
  """Jitted ``(block, x, stats) -> stats`` accumulating the statistics of the named inputs."""
  def fn(block, x, stats):
    _, inputs = llama.block_apply(block, x, cfg, return_inputs=True)
    return {k: calibration.update_stats(stats[k], inputs[k]) for k in keys}
  return jax.jit(fn, donate_argnums=(2,))


@functools.lru_cache(maxsize=None)
def _out_fn(cfg: ModelConfig, dtype_name: str):
  return jax.jit(lambda block, x: llama.block_apply(block, x, cfg))


def _in_features(cfg: ModelConfig, key: str) -> int:
  return {'attn_in': cfg.hidden_size, 'o_in': cfg.num_heads * cfg.head_dim,
          'mlp_in': cfg.hidden_size, 'down_in': cfg.intermediate_size}[key]


def collect_stats(block: Params, xs: np.ndarray | jax.Array, cfg: ModelConfig,
                  keys: Sequence[str], batch_size: int) -> dict[str, calibration.LinearStats]:
  """Statistics of the inputs ``keys`` (see ``llama.LINEAR_INPUTS``) of ``block`` on ``xs [N,T,D]``."""
  keys = tuple(sorted(set(keys)))
  stats = {k: calibration.init_stats(_in_features(cfg, k)) for k in keys}
  fn = _stats_fn(cfg, keys, jnp.dtype(xs.dtype).name)
  for i in range(0, xs.shape[0], batch_size):
    stats = fn(block, jnp.asarray(xs[i:i + batch_size]), stats)
  return stats


def run_block(block: Params, xs, cfg: ModelConfig, batch_size: int) -> jax.Array:
  fn = _out_fn(cfg, jnp.dtype(xs.dtype).name)
  return jnp.concatenate([fn(block, jnp.asarray(xs[i:i + batch_size]))
                          for i in range(0, xs.shape[0], batch_size)], axis=0)


# --------------------------------------------------------------------------- AWQ (per block)


def _awq_block(block: Params, stats: dict[str, calibration.LinearStats], specs: dict[str, LinearSpec],
               cfg: ModelConfig, prefix: str, compensate: Compensator | None = None,
               aux_stats: dict[str, calibration.LinearStats] | None = None
               ) -> tuple[Params, list[LayerReport]]:
  """AWQ on one block: search per-input-channel scales for each group of linears sharing an input,
  fold ``1/s`` into the preceding op (RMSNorm scale, or up_proj's output columns for down_proj),
  then quantize ``diag(s) W`` (with optional clip search). o_proj is scaled only when v_proj's output
  matches its input (no GQA), as in the llm-awq reference; otherwise it is plain RTN."""
  block = jax.tree.map(lambda x: x, block)  # shallow copy of containers
  reports = []
  groups = [
      (('self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj'), 'attn_in', ('input_layernorm',)),
      (('mlp/gate_proj', 'mlp/up_proj'), 'mlp_in', ('post_attention_layernorm',)),
      (('mlp/down_proj',), 'down_in', ('up_proj_out',)),
      (('self_attn/o_proj',), 'o_in', ('v_proj_out',)),
  ]
  scales_in: dict[str, jax.Array] = {}
  t_search = time.time()
  dense = {lin: jnp.asarray(get_linear(block, lin), jnp.float32) for lin in llama.LINEAR_NAMES}
  for lins, key, (prev,) in groups:
    lins = tuple(l for l in lins if l in specs and specs[l].quant == 'awq')
    if not lins:
      continue
    if prev == 'v_proj_out' and cfg.num_heads != cfg.num_kv_heads:
      continue
    spec = specs[lins[0]]
    st = stats[key]
    w_cat = jnp.concatenate([dense[l] for l in lins], axis=1)
    s = _jit(awq_lib.awq_search, spec=spec.qspec)(w_cat, st.hessian,
                                                  calibration.mean_abs_activation(st))
    scales_in[key] = s
    for l in lins:
      dense[l] = dense[l] * s[:, None]
    if prev in ('input_layernorm', 'post_attention_layernorm'):
      block[prev] = {'scale': block[prev]['scale'] / s.astype(block[prev]['scale'].dtype)}
    elif prev == 'up_proj_out':
      dense['mlp/up_proj'] = dense['mlp/up_proj'] / s[None, :]
    elif prev == 'v_proj_out':  # only reached without GQA (checked above)
      dense['self_attn/v_proj'] = dense['self_attn/v_proj'] / s[None, :]
  n_awq = sum(1 for s_ in specs.values() if s_.quant == 'awq')
  search_share = (time.time() - t_search) / max(1, n_awq)  # the shared scale search, split evenly
  for lin in llama.LINEAR_NAMES:
    spec = specs.get(lin)
    if spec is None or spec.quant != 'awq':
      continue
    key = llama.LINEAR_INPUTS[lin]
    h = stats[key].hessian
    s = scales_in.get(key)
    if s is not None:
      h = h / s[:, None] / s[None, :]  # statistics of the rescaled input x / s
    t0 = time.time()
    if spec.awq_clip:
      max_val = _jit(awq_lib.awq_clip, spec=spec.qspec)(dense[lin], h)
      w_fit = awq_lib.apply_clip(dense[lin], max_val, spec.qspec)
    else:
      w_fit = dense[lin]
    qw = _jit(quantize.rtn, spec=spec.qspec)(w_fit)
    leaf = formats.CompressedLinear(weight=qw)
    block = set_linear(block, lin, leaf)
    jax.block_until_ready(qw)
    reports.append((lin, dense[lin], h, leaf, time.time() - t0 + search_share))
  # Linears whose folding changed but which are not AWQ-quantized keep the rescaled dense weight.
  for lin in ('mlp/up_proj', 'self_attn/v_proj'):
    if lin not in specs or specs[lin].quant != 'awq':
      block = set_linear(block, lin, dense[lin].astype(jnp.asarray(get_linear(block, lin)).dtype))
  out = []
  for lin, w_ref, h, leaf, secs in reports:
    w_hat, _ = _leaf_dense(leaf)
    rep = LayerReport(name=f'{prefix}/{lin}', method=specs[lin].describe(),
                      rel_error=_output_error(w_ref, w_hat, h), sparsity=_sparsity(w_hat),
                      bits=specs[lin].bits, seconds=secs)
    if compensate is not None:
      # The target is the rescaled dense weight diag(s) W on the rescaled input x / s.
      key = llama.LINEAR_INPUTS[lin]
      s = scales_in.get(key)
      rescale = lambda st: st if s is None else dataclasses.replace(
          st, hessian=st.hessian / s[:, None] / s[None, :], act_abs_sum=st.act_abs_sum / s)
      st = rescale(stats[key])
      aux = None if aux_stats is None else rescale(aux_stats[key])
      t1 = time.time()
      leaf = compensate(rep.name, w_ref, leaf, st, aux, specs[lin])
      rep.extra['recover_seconds'] = time.time() - t1
      rep.rel_error_recovered = _output_error(w_ref, _leaf_dense(leaf)[1], h)
      block = set_linear(block, lin, leaf)
    out.append(rep)
  return block, out


# --------------------------------------------------------------------------- the pipeline


def validate_rules(params: Params, rules: Sequence[Rule]) -> list[dict[str, LinearSpec]]:
  """Checks every rule against the layer it selects (before any work); returns the specs per block."""
  specs_per_block = []
  for i, block in enumerate(params['layers']):
    specs = {}
    for lin in llama.LINEAR_NAMES:
      spec = match(rules, f'layers/{i}/{lin}/kernel')
      if spec is not None and not spec.is_noop:
        spec.check_shape(tuple(get_linear(block, lin).shape), f'layers/{i}/{lin}')
        specs[lin] = spec
    specs_per_block.append(specs)
  head_spec = match(rules, 'lm_head/kernel')
  if head_spec is not None and 'lm_head' in params:
    head_spec.check_shape(tuple(params['lm_head']['kernel'].shape), 'lm_head')
  return specs_per_block


def strip_adapters(params: Params) -> Params:
  """The same tree with every adapter removed (the compression alone)."""
  def strip(x):
    if isinstance(x, formats.CompressedLinear) and x.adapter is not None:
      return dataclasses.replace(x, adapter=None)
    return x
  return jax.tree.map(strip, params, is_leaf=formats.is_weight_leaf)


def dense_statistics(params: Params, cfg: ModelConfig, tokens: np.ndarray, *, batch_size: int = 8,
                     dtype=jnp.float32, blocks: Sequence[int] | None = None,
                     progress: bool = True) -> list[dict[str, calibration.LinearStats] | None]:
  """Statistics of every linear input of every block on the *dense* model's activations.

  One pass over the model; the result can be handed to :func:`compress_model` as
  ``precomputed_stats`` so that several compressions calibrated on dense inputs share it.
  ``blocks`` limits which blocks get statistics (the others hold None).
  """
  keys = sorted(set(llama.LINEAR_INPUTS.values()))
  wanted = set(range(cfg.num_layers)) if blocks is None else set(blocks)
  x = llama.embed(params, jnp.asarray(tokens), dtype)
  out: list[dict[str, calibration.LinearStats] | None] = [None] * cfg.num_layers
  for i in tqdm(range(max(wanted) + 1), desc='dense statistics', disable=not progress):
    block = params['layers'][i]
    if i in wanted:
      out[i] = collect_stats(block, x, cfg, keys, batch_size)
      for k, st in out[i].items():
        calibration.check_finite(st, f'layers/{i}/{k}')
    if i < max(wanted):
      x = run_block(block, x, cfg, batch_size)
  return out


def auto_bits_rules(params: Params, cfg: ModelConfig, calib_tokens: np.ndarray, spec: LinearSpec, *,
                    budget: float, candidates: Sequence[int] = (2, 3, 4), batch_size: int = 8,
                    dtype=jnp.float32, progress: bool = True) -> list[Rule]:
  """Mixed precision from measured sensitivity under an average-bits budget.

  Runs the dense model over the calibration set block by block, measures every linear's relative
  output error ``||X (W - RTN_b(W))|| / ||X W||`` for each candidate bit width ``b`` (RTN at the
  spec's group size as a fast proxy of the final method), then allots bits greedily: start every
  layer at the lowest width and repeatedly upgrade the layer with the largest drop in squared
  relative error per added bit-parameter, while the parameter-weighted average stays within
  ``budget``. Returns one exact-path rule per linear (to put ahead of the uniform rules).
  """
  cands = sorted(set(int(b) for b in candidates))
  if not cands:
    raise ValueError('auto bits needs at least one candidate bit width')
  if not cands[0] <= budget <= cands[-1]:
    raise ValueError(f'average-bits budget {budget} is outside the candidates {cands}')
  if spec.qspec is None:
    raise ValueError('auto bits needs a quantization method')
  all_stats = dense_statistics(params, cfg, calib_tokens, batch_size=batch_size, dtype=dtype,
                               progress=progress)
  errors: dict[str, list[float]] = {}
  sizes: dict[str, int] = {}
  for i in range(cfg.num_layers):
    block = params['layers'][i]
    stats = all_stats[i]
    for lin in llama.LINEAR_NAMES:
      w = jnp.asarray(get_linear(block, lin), jnp.float32)
      h = stats[llama.LINEAR_INPUTS[lin]].hessian
      path = f'layers/{i}/{lin}/kernel'
      errs = []
      for b in cands:
        qs = dataclasses.replace(spec.qspec, bits=b)
        errs.append(_output_error(w, _jit(quantize.rtn_dense, spec=qs)(w), h) ** 2)
      errors[path] = errs
      sizes[path] = int(w.size)
  level = {p: 0 for p in errors}
  total = sum(sizes.values())
  used = cands[0] * total
  while True:
    best, best_gain = None, 0.0
    for p, l in level.items():
      if l + 1 >= len(cands):
        continue
      extra = (cands[l + 1] - cands[l]) * sizes[p]
      if used + extra > budget * total + 1e-9:
        continue
      gain = (errors[p][l] - errors[p][l + 1]) / extra
      if best is None or gain > best_gain:
        best, best_gain = p, gain
    if best is None:
      break
    used += (cands[level[best] + 1] - cands[level[best]]) * sizes[best]
    level[best] += 1
  return [Rule(re.escape(p), dataclasses.replace(spec, qspec=dataclasses.replace(
      spec.qspec, bits=cands[l]))) for p, l in level.items()]


def _run_fingerprint(params, cfg, calib, rules, options) -> str:
  settings = repr([(r.pattern, r.spec) for r in rules]) + json.dumps(options, sort_keys=True,
                                                                      default=str)
  return checkpoint.run_fingerprint(cfg, calib, settings, [params['embed_tokens']['embedding'][:4]])


def compress_model(params: Params, cfg: ModelConfig, calib_tokens: np.ndarray, rules: Sequence[Rule],
                   *, dense_inputs: bool = False, true_sequential: bool = False,
                   batch_size: int = 8, dtype=jnp.float32, checkpoint_dir: str | None = None,
                   compensate: Compensator | None = None, aux_tokens: np.ndarray | None = None,
                   propagate_adapters: bool = False,
                   precomputed_stats: Sequence[dict[str, calibration.LinearStats]] | None = None,
                   precomputed_aux_stats: Sequence[dict[str, calibration.LinearStats]] | None = None,
                   progress: bool = True, stop_after: int | None = None,
                   checkpoint_every_s: float = 60.0) -> tuple[Params, list[LayerReport]]:
  """Compresses every linear that a rule selects, block by block.

  Args:
    params: the dense model's params (not modified).
    cfg: its config.
    calib_tokens: ``[N, T]`` calibration token windows.
    rules: the recipe (first match wins; unmatched linears stay dense).
    dense_inputs: collect statistics from dense activations instead of the compressed model's.
    true_sequential: re-collect statistics after each stage of a block (q/k/v, o, gate/up, down).
    batch_size: sequences per jitted calibration step.
    dtype: compute dtype of the calibration passes.
    checkpoint_dir: checkpoint finished blocks here and resume from it.
    checkpoint_every_s: write the checkpoint when this many seconds have passed since the last
      one (and after the last block); 0 writes after every block. An interruption repeats at
      most this much work.
    compensate: optional callback adding a low-rank correction to each compressed leaf.
    aux_tokens: optional ``[N2, T2]`` separate calibration set whose statistics are handed to
      ``compensate`` (e.g. task data for EoRA's eigenspace).
    propagate_adapters: pass the next block's inputs through the compensated block. Default False:
      the inputs come from the compressed block without its adapters, so the compressed weights are
      exactly those of the same run without compensation (and ``strip_adapters`` of the result is
      that run's result), and the adapters are computed from the compression pass's statistics.
    precomputed_stats: per-block statistics from :func:`dense_statistics` (implies dense-input
      calibration; no forward pass runs). Lets several compressions share one calibration pass.
    precomputed_aux_stats: the same for the recovery set (``aux_tokens`` is then not needed).
    progress: show a progress bar.
    stop_after: stop after this many blocks (for tests of resumption).

  Returns:
    ``(compressed params, per-layer report)``.
  """
  calib_tokens = np.asarray(calib_tokens, np.int32)
  specs_per_block = validate_rules(params, rules)
  head_spec = match(rules, 'lm_head/kernel')
  if head_spec is not None and head_spec.quant in ('awq',):
    raise ValueError('AWQ on the LM head is not supported')

  options = dict(dense_inputs=dense_inputs, true_sequential=true_sequential, dtype=jnp.dtype(dtype).name,
                 propagate_adapters=propagate_adapters,
                 compensate=getattr(compensate, 'fingerprint', None if compensate is None else 'yes'),
                 aux=None if aux_tokens is None else hashlib.sha256(np.asarray(aux_tokens).tobytes()).hexdigest())
  fingerprint = _run_fingerprint(params, cfg, calib_tokens, rules, options)

  pre = precomputed_stats is not None
  if pre:
    if true_sequential:
      raise ValueError('precomputed (dense-input) statistics cannot be used with true_sequential')
    if head_spec is not None and not head_spec.is_noop:
      raise ValueError('compressing the LM head needs propagated inputs, not precomputed statistics')
    dense_inputs = True
  x = None if pre else llama.embed(params, jnp.asarray(calib_tokens), dtype)
  x_dense = x if dense_inputs else None
  x_aux = None if aux_tokens is None or precomputed_aux_stats is not None else llama.embed(
      params, jnp.asarray(aux_tokens), dtype)

  def get_stats(i, block, src, keys):
    if pre:
      return {k: precomputed_stats[i][k] for k in keys}
    return collect_stats(block, src, cfg, keys, batch_size)
  layers = list(params['layers'])
  reports: list[LayerReport] = []
  start = 0
  ckpt = pathlib.Path(checkpoint_dir) if checkpoint_dir else None
  if ckpt is not None and (ckpt / 'state').exists():
    state, meta = checkpoint.load_tree(ckpt / 'state')
    if meta.get('fingerprint') != fingerprint:
      raise checkpoint.CheckpointError(
          f'checkpoint in {ckpt} was written by a different run (model, data, recipe or options '
          'differ); remove it or use another checkpoint directory')
    start = int(meta['next_block'])
    for j in range(start):
      block_j, block_meta = checkpoint.load_tree(ckpt / f'block_{j:03d}')
      if block_meta.get('fingerprint') != fingerprint:
        raise checkpoint.CheckpointError(f'checkpoint {ckpt}/block_{j:03d} belongs to another run')
      layers[j] = block_j
    x = None if state.get('x') is None else state['x'].astype(dtype)
    x_dense = None if state.get('x_dense') is None else state['x_dense'].astype(dtype)
    x_aux = None if state.get('x_aux') is None else state['x_aux'].astype(dtype)
    reports = [LayerReport(**r) for r in meta['reports']]
    logging.info('resuming compression at block %d from %s', start, ckpt)

  saved_upto, last_save = start, time.time()
  bar = tqdm(range(start, cfg.num_layers), desc='compress', unit='block', disable=not progress,
             initial=start, total=cfg.num_layers)
  for i in bar:
    t_block = time.time()
    block = layers[i]
    specs = specs_per_block[i]
    src = x_dense if dense_inputs else x
    needed = sorted({llama.LINEAR_INPUTS[l] for l in specs})
    aux_stats = None
    if compensate is not None and precomputed_aux_stats is not None and specs:
      aux_stats = {k: precomputed_aux_stats[i][k] for k in needed}
    elif compensate is not None and x_aux is not None and specs:
      aux_stats = collect_stats(block, x_aux, cfg, needed, batch_size)
    new_block = block
    if not specs:
      pass
    elif any(s.quant == 'awq' for s in specs.values()):
      stats = get_stats(i, block, src, needed)
      for k, st in stats.items():
        calibration.check_finite(st, f'layers/{i}/{k}')
      new_block, rep = _awq_block(block, stats, specs, cfg, f'layers/{i}', compensate, aux_stats)
      rest = {l: s for l, s in specs.items() if s.quant != 'awq'}
      new_block, rep2 = _compress_linears(new_block, block, rest, stats, cfg, i, compensate, aux_stats)
      reports += rep + rep2
    else:
      stages = llama.SEQUENTIAL_STAGES if true_sequential else (llama.LINEAR_NAMES,)
      for stage in stages:
        stage_specs = {l: specs[l] for l in stage if l in specs}
        if not stage_specs:
          continue
        keys = sorted({llama.LINEAR_INPUTS[l] for l in stage_specs})
        stats_block = new_block if (true_sequential and not dense_inputs) else block
        stats = get_stats(i, stats_block, src, keys)
        for k, st in stats.items():
          calibration.check_finite(st, f'layers/{i}/{k}')
        new_block, rep = _compress_linears(new_block, block, stage_specs, stats, cfg, i, compensate,
                                           aux_stats)
        reports += rep
    layers[i] = new_block
    # A compensator that re-compresses the weights themselves (SRR) must propagate its adapters.
    keep = propagate_adapters or getattr(compensate, 'changes_weights', False)
    prop_block = new_block if keep else strip_adapters(new_block)
    if not pre:
      x = run_block(prop_block, x, cfg, batch_size)
    if dense_inputs and not pre:
      x_dense = run_block(block, x_dense, cfg, batch_size)
    if x_aux is not None:
      x_aux = run_block(prop_block, x_aux, cfg, batch_size)
    if progress:
      errs = [r.rel_error for r in reports if r.name.startswith(f'layers/{i}/')]
      bar.set_postfix(err=f'{np.mean(errs):.4f}' if errs else '-', sec=f'{time.time() - t_block:.1f}')
    stop = stop_after is not None and i + 1 >= stop_after
    if ckpt is not None and (stop or i + 1 == cfg.num_layers or
                             time.time() - last_save >= checkpoint_every_s):
      # The finished blocks first, then the state that points past them: a crash in between
      # only repeats these blocks.
      for j in range(saved_upto, i + 1):
        checkpoint.save_tree(ckpt / f'block_{j:03d}', layers[j], {'fingerprint': fingerprint})
      state = {'x': x, 'x_dense': x_dense, 'x_aux': x_aux}
      checkpoint.save_tree(ckpt / 'state', state, {
          'fingerprint': fingerprint, 'next_block': i + 1,
          'reports': [dataclasses.asdict(r) for r in reports]})
      saved_upto, last_save = i + 1, time.time()
    if stop:
      break

  out = dict(params)
  out['layers'] = layers
  if head_spec is not None and not head_spec.is_noop and 'lm_head' in params and (
      stop_after is None or stop_after >= cfg.num_layers):
    hx = llama.rms_norm(x, params['norm']['scale'], cfg.rms_norm_eps)
    st = calibration.update_stats(calibration.init_stats(cfg.hidden_size), hx)
    w = params['lm_head']['kernel']
    t0 = time.time()
    leaf, info = compress_matrix(w, st, head_spec, 'lm_head')
    out['lm_head'] = {'kernel': leaf}
    w_hat = formats.to_dense(leaf)
    reports.append(LayerReport(name='lm_head', method=head_spec.describe(),
                               rel_error=_output_error(w, w_hat, st.hessian),
                               sparsity=_sparsity(w_hat), bits=head_spec.bits,
                               seconds=time.time() - t0, extra=info))
  return out, reports


def _compress_linears(new_block, dense_block, specs, stats, cfg, i, compensate, aux_stats):
  reports = []
  for lin, spec in specs.items():
    name = f'layers/{i}/{lin}'
    w = jnp.asarray(get_linear(dense_block, lin), jnp.float32)
    st = stats[llama.LINEAR_INPUTS[lin]]
    t0 = time.time()
    leaf, info = compress_matrix(w, st, spec, name)
    w_hat, _ = _leaf_dense(leaf)
    jax.block_until_ready(w_hat)
    secs = time.time() - t0
    rep = LayerReport(name=name, method=spec.describe(), rel_error=_output_error(w, w_hat, st.hessian),
                      sparsity=_sparsity(w_hat), bits=spec.bits, seconds=secs, extra=info)
    if compensate is not None:
      t1 = time.time()
      aux = None if aux_stats is None else aux_stats[llama.LINEAR_INPUTS[lin]]
      leaf = compensate(name, w, leaf, st, aux, spec)
      rep.extra['recover_seconds'] = time.time() - t1
      rep.rel_error_recovered = _output_error(w, _leaf_dense(leaf)[1], st.hessian)
    new_block = set_linear(new_block, lin, leaf)
    reports.append(rep)
  return new_block, reports


def summarize(reports: Sequence[LayerReport]) -> dict[str, Any]:
  """Aggregate numbers of a per-layer report."""
  if not reports:
    return {}
  return {
      'layers': len(reports),
      'mean_rel_error': float(np.mean([r.rel_error for r in reports])),
      'max_rel_error': float(np.max([r.rel_error for r in reports])),
      'mean_sparsity': float(np.mean([r.sparsity for r in reports])),
      'numerics_seconds': float(np.sum([r.seconds for r in reports])),
  }
