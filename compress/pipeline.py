"""The sequential compression pipeline: calibrate, compress and propagate block by block.

For block ``i`` (compress/METHODS.md §4, as the GPTQ/SparseGPT/Wanda references do):

1. run the calibration hidden states that the *already compressed* blocks ``0..i-1`` produced
   through block ``i`` and accumulate ``H = X^T X`` (float32) for every distinct linear input
   (q/k/v share one, gate/up share one);
2. compress every linear of the block with the spec its rule gives (optionally true-sequential:
   q/k/v, then o, then gate/up, then down, re-collecting statistics after each stage);
3. optionally add a correction (a :class:`~compress.matrix.LinearRecovery`, e.g. EoRA from
   ``recover/``) from the same statistics, or from those of a separate recovery set
   (``aux_tokens``);
4. run the compressed block to produce the next block's inputs.

``dense_inputs=True`` collects statistics from the dense model's activations instead (the
inputs stay dense all the way). An asymmetric spec (GPTAQ, ``LinearSpec.asymmetric``) makes the
pipeline carry both streams, the compressed model's hidden states through the compressed blocks
and the dense model's through the dense blocks, and collect the cross term of the two streams'
linear inputs (``LinearStats.cross``) with ``H`` of the compressed stream, in one pass.
Memory: one block's weights plus the calibration activations (twice with GPTAQ).
Progress: one bar step per block. The finished blocks, the propagated activations and the report
are checkpointed (``checkpoint_dir``, a :class:`~models.checkpoint.ResumableSweep`) at most every
``checkpoint_every_s`` seconds and after the last block; a rerun with the same arguments resumes
after the last saved block and gives identical results.

``compress_model`` is the only tree walker. What it calls lives with its concept: the one-matrix
dispatch in :mod:`compress.matrix`, statistics collection in :mod:`compress.calibration`, AWQ's
block-level search in :mod:`compress.awq`, the automatic bit allocation in :mod:`compress.allocate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress import awq as awq_lib
from compress import calibration
from compress import regional
from compress.matrix import LayerReport, LinearRecovery, compress_matrices, compress_matrix
from compress.matrix import measure, needs_full_hessian, recover_linear
from compress.matrix import spec_of_leaf
from compress.rules import LinearSpec, Rule, match
from kernels import formats
from models import checkpoint
from models import llama
from models import sharding
from models import tree
from models.config import ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MoeCalibration:
  """How the experts of a mixture of experts are calibrated.

  Attributes:
    routed: each expert's statistics come from the tokens the router sends to it (the model's own
      computation); False calibrates every expert on every token of the block.
    min_tokens: an expert that receives fewer calibration tokens than this is *starved*: it is
      reported, and handled by ``starved``.
    starved: ``'all_tokens'``: calibrate it on every token of the block (the fix reference tools
      added after users asked); ``'rtn'``: compress it without data (round-to-nearest on the same
      grid, magnitude pruning at the same sparsity).
  """
  routed: bool = True
  min_tokens: int = 16
  starved: str = 'all_tokens'

  def __post_init__(self):
    if self.starved not in STARVED:
      raise ValueError(f'--moe_starved={self.starved!r}: choose from {STARVED}')
    if self.min_tokens < 0:
      raise ValueError(f'--moe_min_tokens must be >= 0, got {self.min_tokens}')


STARVED = ('all_tokens', 'rtn')


def data_free(spec: LinearSpec) -> LinearSpec:
  """The data-free version of ``spec``: RTN on its grid, magnitude pruning at its sparsity."""
  return dataclasses.replace(
      spec, quant='rtn' if spec.quant != 'none' else 'none', act_order=False, static_groups=False,
      awq_clip=False, prune='magnitude' if spec.prune != 'none' else 'none', asymmetric=False)


def validate_rules(params: Params, rules: Sequence[Rule]) -> list[dict[str, LinearSpec]]:
  """Checks every rule against the layer it selects (before any work); returns the specs per block."""
  specs_per_block = []
  for i in range(len(params['layers'])):
    block = tree.block_shapes(params['layers'], i)
    specs = {}
    for lin in llama.block_linear_names(block):
      spec = match(rules, f'layers/{i}/{lin}/kernel')
      if spec is not None and not spec.is_noop:
        spec.check_shape(tuple(tree.get_linear(block, lin).shape), f'layers/{i}/{lin}')
        if spec.quant == 'awq' and 'experts' in block['mlp'] and lin.startswith('mlp/'):
          raise ValueError(f'layers/{i}/{lin}: AWQ on a mixture of experts is not supported (its '
                           'scales fold into the norm every expert and the router read); use GPTQ '
                           'or RTN for the MLP')
        specs[lin] = spec
    specs_per_block.append(specs)
  head_spec = match(rules, 'lm_head/kernel')
  if head_spec is not None and 'lm_head' in params:
    head_spec.check_shape(tuple(params['lm_head']['kernel'].shape), 'lm_head')
  return specs_per_block


# Bump when a change of this module changes the numbers a resumed run would produce.
CODE_VERSION = 4


def _run_fingerprint(params, cfg, calib, rules, options) -> str:
  """Names a compression run: the whole input model, the tokens, the recipe and every option that
  changes numbers (batch size included: it changes the statistics' rounding)."""
  settings = (f'pipeline v{CODE_VERSION} ' + repr([(r.pattern, r.spec) for r in rules])
              + json.dumps(options, sort_keys=True, default=str))
  return checkpoint.run_fingerprint(cfg, calib, settings, [params])


def compress_model(params: Params, cfg: ModelConfig, calib_tokens: np.ndarray, rules: Sequence[Rule],
                   *, dense_inputs: bool = False, true_sequential: bool = False,
                   batch_size: int = 8, dtype=jnp.float32, checkpoint_dir: str | None = None,
                   recovery: LinearRecovery | None = None, aux_tokens: np.ndarray | None = None,
                   propagate_adapters: bool = False,
                   precomputed_stats: Sequence[dict[str, calibration.LinearStats]] | None = None,
                   precomputed_aux_stats: Sequence[dict[str, calibration.LinearStats]] | None = None,
                   progress: bool = True, stop_after: int | None = None,
                   checkpoint_every_s: float = 60.0,
                   given: Params | None = None,
                   moe: MoeCalibration = MoeCalibration(),
                   host_blocks: bool = False) -> tuple[Params, list[LayerReport]]:
  """Compresses every linear that a rule selects, block by block.

  Args:
    params: the dense model's params (not modified).
    cfg: its config.
    calib_tokens: ``[N, T]`` calibration token windows.
    rules: the recipe (first match wins; unmatched linears stay dense).
    dense_inputs: collect statistics from dense activations instead of the compressed model's
      (not with an asymmetric spec: that one reads both).
    true_sequential: re-collect statistics after each stage of a block (q/k/v, o, gate/up, down).
    batch_size: sequences per calibration step (on the CPU fewer:
      :func:`compress.calibration.step_size`).
    dtype: compute dtype of the calibration passes.
    checkpoint_dir: checkpoint finished blocks here and resume from it.
    checkpoint_every_s: write the checkpoint when this many seconds have passed since the last
      one (and after the last block); 0 writes after every block. An interruption repeats at
      most this much work.
    recovery: optional :class:`~compress.matrix.LinearRecovery` adding a correction to each
      compressed leaf right after it is compressed (e.g. ``recover.compensate.Compensator``).
    aux_tokens: optional ``[N2, T2]`` separate calibration set whose statistics are handed to
      ``recovery`` (e.g. task data for EoRA's eigenspace).
    propagate_adapters: pass the next block's inputs through the compensated block. Default False:
      the inputs come from the compressed block without its adapters, so the compressed weights are
      exactly those of the same run without compensation (and ``models.tree.strip_adapters`` of the result is
      that run's result), and the adapters are computed from the compression pass's statistics.
    precomputed_stats: per-block statistics from :func:`compress.calibration.dense_statistics` (implies dense-input
      calibration; no forward pass runs). Lets several compressions share one calibration pass.
    precomputed_aux_stats: the same for the recovery set (``aux_tokens`` is then not needed).
    progress: show a progress bar.
    stop_after: stop after this many blocks (for tests of resumption).
    given: compressed leaves made elsewhere (a param tree of the same model whose linears are
      ``CompressedLinear``, e.g. an imported GPTQ or compressed-tensors checkpoint): those linears
      take the given leaf instead of being compressed, and ``rules`` must select nothing;
      statistics, reports and ``recovery`` run on them as on our own.
    moe: how a mixture's experts are calibrated (:class:`MoeCalibration`); every expert's report
      carries the tokens the router sent it.
    host_blocks: move each finished block to host memory (NumPy arrays) as soon as it is done,
      so that the devices hold one block at a time. ``params['layers']`` may then be a
      :class:`models.loading.LazyLayers`, each block read from disk when its turn comes: the
      memory-bounded mode (``--stream``).

  Returns:
    ``(compressed params, per-layer report)``.
  """
  calib_tokens = np.asarray(calib_tokens, np.int32)
  specs_per_block = validate_rules(params, rules)
  if given is not None:
    if any(specs_per_block) or match(rules, 'lm_head/kernel') is not None:
      raise ValueError('given compressed leaves replace compression: pass no rules with them')
    specs_per_block = _given_specs(params, given)
  head_spec = match(rules, 'lm_head/kernel')
  if head_spec is not None and head_spec.quant in ('awq',):
    raise ValueError('AWQ on the LM head is not supported')
  # Blocks with an asymmetric (GPTAQ) spec read the dense stream too; so does an asymmetric head.
  asym_blocks = [i for i, specs in enumerate(specs_per_block)
                 if any(s.asymmetric for s in specs.values())]
  head_asym = head_spec is not None and head_spec.asymmetric and 'lm_head' in params
  if (asym_blocks or head_asym) and (dense_inputs or precomputed_stats is not None):
    raise ValueError('asymmetric calibration (GPTAQ) fits the compressed model\'s inputs to the '
                     'dense outputs: with dense-input or precomputed statistics both are the dense '
                     'inputs and it would change nothing; use propagated inputs')
  if any(s.prune == 'wanda++' for specs in specs_per_block for s in specs.values()):
    if precomputed_stats is not None:
      raise ValueError('wanda++ needs each block\'s calibration inputs for its regional gradients: '
                       'not with precomputed statistics')
  if head_spec is not None and head_spec.prune == 'wanda++':
    raise ValueError('wanda++ scores a decoder block\'s linears by the gradient of the block\'s '
                     'output: the LM head is not in a block; prune it with wanda')
  # The dense stream is carried up to the last block (or the head) that reads it.
  dense_until = cfg.num_layers if head_asym else (max(asym_blocks) if asym_blocks else -1)

  options = dict(dense_inputs=dense_inputs, true_sequential=true_sequential, dtype=jnp.dtype(dtype).name,
                 batch_size=batch_size, precomputed=precomputed_stats is not None,
                 propagate_adapters=propagate_adapters,
                 compensate=None if recovery is None else recovery.fingerprint,
                 aux=None if aux_tokens is None else hashlib.sha256(np.asarray(aux_tokens).tobytes()).hexdigest(),
                 given=None if given is None else checkpoint.tree_digest(given),
                 moe=dataclasses.astuple(moe) if cfg.num_experts else None)
  fingerprint = (_run_fingerprint(params, cfg, calib_tokens, rules, options) if checkpoint_dir
                 else '')

  pre = precomputed_stats is not None
  if pre:
    if true_sequential:
      raise ValueError('precomputed (dense-input) statistics cannot be used with true_sequential')
    if head_spec is not None and not head_spec.is_noop:
      raise ValueError('compressing the LM head needs propagated inputs, not precomputed statistics')
    dense_inputs = True
  x = None if pre else sharding.activations(
      llama.embed(params, jnp.asarray(calib_tokens), cfg, dtype))
  x_dense = x if dense_inputs or dense_until >= 0 else None
  x_aux = None if aux_tokens is None or precomputed_aux_stats is not None else llama.embed(
      params, jnp.asarray(aux_tokens), cfg, dtype)

  def get_stats(i, block, src, keys, diagonal=False, cross_keys=(), abs_sum=False):
    """Statistics of ``keys`` of ``block`` on ``src``; ``cross_keys`` also get the cross term
    with the dense stream (the dense block ``i`` on ``x_dense``); ``abs_sum``: also AWQ's
    ``sum |x|``."""
    if pre:
      return {k: precomputed_stats[i][k] for k in keys}
    return calibration.collect_stats(block, src, cfg.layer(i), keys, batch_size, routed=moe.routed,
                                     diagonal=diagonal, cross_keys=cross_keys,
                                     dense_block=params['layers'][i] if cross_keys else None,
                                     dense_xs=x_dense if cross_keys else None, abs_sum=abs_sum)

  def wandapp_gradients(i, block, src, stage_specs):
    """Wanda++'s regional gradients of the dense block on the same inputs (none needed: {})."""
    lins = [l for l, s in stage_specs.items() if s.prune == 'wanda++']
    return regional.regional_gradients(block, src, cfg.layer(i), lins, batch_size) if lins else {}

  def cross_keys_of(stage_specs):
    return sorted({llama.input_key(l) for l, s in stage_specs.items() if s.asymmetric})

  def experts(i, block, src, stats, stage_specs):
    """Finds the starved experts of block ``i`` and applies ``moe.starved`` to them."""
    notes = {}
    starved = {}
    for lin in stage_specs:
      key = llama.input_key(lin)
      e = llama.expert_of(key)
      if e is None:
        continue
      n = int(stats[key].num_tokens)
      if not moe.routed:  # every expert saw every token of the block: none is starved
        notes[lin] = {'expert': e, 'tokens': n}
        continue
      notes[lin] = {'expert': e, 'routed_tokens': n}
      if n < moe.min_tokens:
        notes[lin]['starved'] = moe.starved
        starved.setdefault(key, []).append(lin)
    if not starved:
      return stats, stage_specs, notes
    logging.warning('layers/%d: experts %s received fewer than %d calibration tokens (%s); %s',
                    i, sorted({llama.expert_of(k) for k in starved}), moe.min_tokens,
                    ', '.join(f'{k}: {int(stats[k].num_tokens)}' for k in sorted(starved)),
                    'calibrated on every token' if moe.starved == 'all_tokens' else 'compressed '
                    'without data (RTN / magnitude)')
    if moe.starved == 'rtn':
      stage_specs = {l: data_free(s) if any(l in v for v in starved.values()) else s
                     for l, s in stage_specs.items()}
    elif pre:
      raise ValueError('precomputed statistics cannot re-calibrate starved experts on all tokens: '
                       'use moe starved=rtn or collect statistics in the run')
    else:
      cross = [k for k in starved if stats[k].cross is not None]
      again = calibration.collect_stats(block, src, cfg.layer(i), sorted(starved), batch_size,
                                        routed=False, diagonal=stats[next(iter(starved))].diagonal,
                                        cross_keys=cross,
                                        dense_block=params['layers'][i] if cross else None,
                                        dense_xs=x_dense if cross else None,
                                        abs_sum=stats[next(iter(starved))].act_abs_sum is not None)
      stats = dict(stats, **again)
    return stats, stage_specs, notes
  n_blocks = len(params['layers'])
  layers: list[Any] = [None] * n_blocks  # the finished blocks (the others are read when used)
  reports: list[LayerReport] = []
  sweep = checkpoint.ResumableSweep(checkpoint_dir, fingerprint, cfg.num_layers, desc='compress',
                                    unit='block', every_s=checkpoint_every_s,
                                    stop_after=stop_after, progress=progress)
  start, state, meta = sweep.resume()
  if state is not None:
    for j in range(start):
      layers[j] = tree.to_host(sweep.load_block(j)) if host_blocks else sweep.load_block(j)
    x = None if state.get('x') is None else state['x'].astype(dtype)
    x_dense = None if state.get('x_dense') is None else state['x_dense'].astype(dtype)
    x_aux = None if state.get('x_aux') is None else state['x_aux'].astype(dtype)
    reports = [LayerReport(**r) for r in meta['reports']]

  pending = 0.0  # wall time of blocks without a compressed linear, given to the next report
  for i in sweep.steps(start):
    t_block = time.time()
    first_report = len(reports)
    block = params['layers'][i]
    specs = specs_per_block[i]
    src = x_dense if dense_inputs else x
    needed = sorted({llama.input_key(l) for l in specs})
    aux_stats = None
    if recovery is not None and precomputed_aux_stats is not None and specs:
      aux_stats = {k: precomputed_aux_stats[i][k] for k in needed}
    elif recovery is not None and x_aux is not None and specs:
      aux_stats = calibration.collect_stats(block, x_aux, cfg.layer(i), needed, batch_size,
                                            abs_sum=False)
    new_block = block
    if not specs:
      pass
    elif any(s.quant == 'awq' for s in specs.values()):
      stats = get_stats(i, block, src, needed, cross_keys=cross_keys_of(specs), abs_sum=True)
      for k, st in stats.items():
        calibration.check_finite(st, f'layers/{i}/{k}')
      new_block, rep = awq_lib.awq_block(block, stats, specs, cfg.layer(i), f'layers/{i}', recovery,
                                         aux_stats)
      rest = {l: s for l, s in specs.items() if s.quant != 'awq'}
      stats, rest, notes = experts(i, block, src, stats, rest)
      grads = wandapp_gradients(i, block, src, rest)
      new_block, rep2 = _compress_linears(new_block, block, rest, stats, i, recovery, aux_stats,
                                          notes=notes, grads=grads)
      reports += rep + rep2
    else:
      stages = (llama.sequential_stages(cfg) if true_sequential
                else (llama.block_linear_names(block),))
      for stage in stages:
        stage_specs = {l: specs[l] for l in stage if l in specs}
        if not stage_specs:
          continue
        keys = sorted({llama.input_key(l) for l in stage_specs})
        stats_block = new_block if (true_sequential and not dense_inputs) else block
        # Wanda, magnitude and RTN read only diag(H): no X^T X product then (the reports'
        # rel_error is then weighted by diag(H) alone, marked in their extra).
        diagonal = recovery is None and not any(map(needs_full_hessian, stage_specs.values()))
        stats = get_stats(i, stats_block, src, keys, diagonal, cross_keys_of(stage_specs))
        stats, stage_specs, notes = experts(i, stats_block, src, stats, stage_specs)
        for k, st in stats.items():
          calibration.check_finite(st, f'layers/{i}/{k}')
        # Wanda++: the regional gradients of the dense block on the same inputs.
        grads = wandapp_gradients(i, block, src, stage_specs)
        new_block, rep = _compress_linears(new_block, block, stage_specs, stats, i, recovery,
                                           aux_stats, None if given is None else given['layers'][i],
                                           notes, grads)
        reports += rep
    layers[i] = tree.to_host(new_block) if host_blocks else new_block
    # A recovery that re-compresses the weights themselves (SRR) must propagate its adapters.
    keep = propagate_adapters or (recovery is not None and recovery.changes_weights)
    prop_block = new_block if keep else tree.strip_adapters(new_block)
    if not pre:
      x = calibration.run_block(prop_block, x, cfg.layer(i), batch_size)
    if dense_inputs and not pre:
      x_dense = calibration.run_block(block, x_dense, cfg.layer(i), batch_size)
    elif x_dense is not None and not dense_inputs:  # the dense stream of asymmetric calibration
      x_dense = (calibration.run_block(block, x_dense, cfg.layer(i), batch_size)
                 if i < dense_until else None)
    if x_aux is not None:
      x_aux = calibration.run_block(prop_block, x_aux, cfg.layer(i), batch_size)
    block_reports = reports[first_report:]
    pending += time.time() - t_block
    for r in block_reports:
      r.wall_seconds = pending / len(block_reports)
    if block_reports:
      pending = 0.0
    if progress:
      errs = [r.rel_error for r in reports if r.name.startswith(f'layers/{i}/')]
      sweep.bar.set_postfix(err=f'{np.mean(errs):.4f}' if errs else '-',
                            sec=f'{time.time() - t_block:.1f}')
    if sweep.done(i, layers, [i], {'x': x, 'x_dense': x_dense, 'x_aux': x_aux},
                  {'reports': [dataclasses.asdict(r) for r in reports]}):
      break

  out = dict(params)
  out['layers'] = [params['layers'][j] if b is None else b for j, b in enumerate(layers)]
  if head_spec is not None and not head_spec.is_noop and 'lm_head' in params and (
      stop_after is None or stop_after >= cfg.num_layers):
    hx = llama.final_norm(params, x, cfg)
    st = calibration.update_stats(
        calibration.init_stats(cfg.hidden_size, cross=head_asym), hx,
        dense=llama.final_norm(params, x_dense, cfg) if head_asym else None)
    w = params['lm_head']['kernel']
    t0 = time.time()
    leaf, info = compress_matrix(w, st, head_spec, 'lm_head')
    out['lm_head'] = {'kernel': leaf}
    rel_error, sparse, _ = measure(w, leaf, st.hessian)
    reports.append(LayerReport(name='lm_head', method=head_spec.describe(),
                               rel_error=rel_error, sparsity=sparse, bits=head_spec.bits,
                               seconds=time.time() - t0, extra=info,
                               wall_seconds=time.time() - t0))
  if pending and reports:
    reports[-1].wall_seconds += pending
  return out, reports


def _given_specs(params: Params, given: Params) -> list[dict[str, LinearSpec]]:
  """The specs of the given compressed leaves per block (dense ones are left as they are)."""
  if len(given['layers']) != len(params['layers']):
    raise ValueError(f'the given model has {len(given["layers"])} blocks, this one '
                     f'{len(params["layers"])}')
  out = []
  for i, gblock in enumerate(given['layers']):
    block = tree.block_shapes(params['layers'], i)
    specs = {}
    for lin in llama.block_linear_names(gblock):
      leaf = tree.get_linear(gblock, lin)
      if isinstance(leaf, formats.CompressedLinear):
        if tuple(leaf.shape) != tuple(tree.get_linear(block, lin).shape):
          raise ValueError(f'given layers/{i}/{lin} is {tuple(leaf.shape)}, this model\'s '
                           f'{tuple(tree.get_linear(block, lin).shape)}')
        specs[lin] = spec_of_leaf(leaf)
    out.append(specs)
  if not any(out):
    raise ValueError('the given model has no compressed linears')
  return out


def _groups(specs: dict[str, LinearSpec], fuse: bool) -> list[list[str]]:
  """The linears of ``specs`` in runs solved as one matrix: those that read the same input with
  the same spec (q/k/v, gate/up), whose output units are independent given their shared ``H``
  (every one-matrix method here: GPTQ and RTN per output unit, Wanda, magnitude and SparseGPT
  choose each unit's mask on its own). In first-appearance order; one each without ``fuse``."""
  groups: dict[Any, list[str]] = {}
  for lin, spec in specs.items():
    groups.setdefault((llama.input_key(lin), spec) if fuse else lin, []).append(lin)
  return list(groups.values())


def _expert_batches(groups: list[list[str]], specs: dict[str, LinearSpec]) -> list[list[list[str]]]:
  """The groups of :func:`_groups` that are the same linears of different experts with one spec
  (``experts/0/down_proj``, ``experts/1/down_proj``, ...): each such run is solved as one stack."""
  batches: dict[Any, list[list[str]]] = {}
  for n, group in enumerate(groups):
    if all(llama.expert_of(llama.input_key(lin)) is not None for lin in group):
      key = (tuple(re.sub(r'experts/\d+/', 'experts/*/', lin) for lin in group), specs[group[0]])
    else:
      key = n
    batches.setdefault(key, []).append(group)
  return [b for b in batches.values() if len(b) > 1]


def _solve_experts(batch: list[list[str]], dense_block, specs, stats, i, grads
                   ) -> dict[tuple[str, ...], tuple[list[Any], dict[str, Any], float]]:
  """The groups of ``batch`` (one per expert, equal shapes) solved as one stack split along the
  expert axis over the devices (:func:`compress.matrix.compress_matrices`). Returns, per group,
  its leaves (one per linear), its info and its share of the wall time."""
  spec = specs[batch[0][0]]
  ws = jnp.stack([jnp.concatenate([jnp.asarray(tree.get_linear(dense_block, lin), jnp.float32)
                                   for lin in group], axis=1) for group in batch])
  st = jax.tree.map(lambda *xs: jnp.stack(xs),
                    *[stats[llama.input_key(group[0])] for group in batch])
  g = None
  if grads and batch[0][0] in grads:
    g = jnp.stack([jnp.concatenate([grads[lin] for lin in group], axis=1) for group in batch])
  ws, st, g = sharding.stacked((ws, st, g))
  t0 = time.time()
  leaves, infos = compress_matrices(ws, st, spec, [f'layers/{i}/{"+".join(grp)}' for grp in batch],
                                    g)
  jax.block_until_ready(leaves)
  secs = (time.time() - t0) / len(batch)
  out = {}
  for group, leaf, info in zip(batch, leaves, infos):
    sizes = [tree.get_linear(dense_block, lin).shape[1] for lin in group]
    parts = [leaf] if len(group) == 1 else formats.split_columns(leaf, sizes)
    out[tuple(group)] = (parts, dict(info, experts_solved_together=len(batch)), secs)
  return out


def _compress_linears(new_block, dense_block, specs, stats, i, recovery, aux_stats,
                      given_block=None, notes=None, grads=None):
  """Compresses (and recovers) the linears ``specs`` of block ``i`` from their dense weights, or
  takes their leaves from ``given_block``. Linears with one input and one spec are solved as one
  matrix (their columns side by side: one factorization of ``H`` and one column sweep instead of
  several) and split again; the same linears of the experts of a mixture are solved as one stack,
  in parallel over the devices; each keeps its own report."""
  reports = []
  groups = _groups(specs, fuse=given_block is None)
  solved = {}
  if given_block is None:
    for batch in _expert_batches(groups, specs):
      solved.update(_solve_experts(batch, dense_block, specs, stats, i, grads))
  for group in groups:
    spec = specs[group[0]]
    st = sharding.replicate(stats[llama.input_key(group[0])])
    # The output columns are independent given H: they are split over the model axis.
    ws = [sharding.columns(jnp.asarray(tree.get_linear(dense_block, lin), jnp.float32))
          for lin in group]
    t0, secs_stacked = time.time(), 0.0
    if given_block is not None:
      leaves = [tree.strip_adapter(tree.get_linear(given_block, group[0]))]
      info = {'given': True}
    elif tuple(group) in solved:  # an expert solved in its stack: its share of the stack's time
      leaves, info, secs_stacked = solved[tuple(group)]
    else:
      w = ws[0] if len(ws) == 1 else sharding.columns(jnp.concatenate(ws, axis=1))
      grad = None
      if grads and group[0] in grads:  # Wanda++, side by side like the weights
        grad = jnp.concatenate([grads[lin] for lin in group], axis=1)
      leaf, info = compress_matrix(w, st, spec, f'layers/{i}/{"+".join(group)}', grad)
      leaves = [leaf] if len(ws) == 1 else formats.split_columns(leaf, [x.shape[1] for x in ws])
    jax.block_until_ready(leaves)
    secs = time.time() - t0 + secs_stacked
    total = sum(x.shape[1] for x in ws)
    for lin, w, leaf in zip(group, ws, leaves):
      name = f'layers/{i}/{lin}'
      rel_error, sparse, _ = measure(w, leaf, st.hessian, st.diagonal)
      method = spec.describe() if given_block is None else f'given ({spec.describe()})'
      extra = dict(info)
      if len(group) > 1:
        extra['solved_with'] = [other for other in group if other != lin]
      if notes and lin in notes:
        extra.update(notes[lin])
      if st.diagonal:
        extra['rel_error'] = 'diagonal H'
      rep = LayerReport(name=name, method=method,
                        rel_error=rel_error, sparsity=sparse, bits=spec.bits,
                        seconds=secs * w.shape[1] / total, extra=extra)
      if recovery is not None:
        aux = None if aux_stats is None else aux_stats[llama.input_key(lin)]
        leaf = recover_linear(rep, recovery, w, leaf, st, aux, spec, st.hessian)
      new_block = tree.set_linear(new_block, lin, leaf)
      reports.append(rep)
  return new_block, reports


def summarize(reports: Sequence[LayerReport]) -> dict[str, Any]:
  """Aggregate numbers of a per-layer report. The seconds add up over interruptions (they are
  saved with the report): ``compress_seconds`` is the blocks' wall time, of which
  ``numerics_seconds`` the one-matrix numerics, ``recover_seconds`` the recovery (e.g. EoRA) and
  ``calib_forward_seconds`` the rest (statistics and propagation passes)."""
  if not reports:
    return {}
  wall = float(np.sum([r.wall_seconds for r in reports]))
  numerics = float(np.sum([r.seconds for r in reports]))
  recover = float(np.sum([r.extra.get('recover_seconds', 0.0) for r in reports]))
  experts = {}  # a mixture's experts: the calibration tokens each received, per block
  for r in reports:
    if 'expert' in r.extra and r.name.endswith('/up_proj'):
      block = r.name.split('/')[1]
      experts.setdefault(block, {})[r.extra['expert']] = r.extra.get(
          'routed_tokens', r.extra.get('tokens'))
  moe = {}
  if experts:
    moe = {'expert_tokens': {b: [t[e] for e in sorted(t)] for b, t in experts.items()},
           'starved_experts': sorted({r.name.rsplit('/', 1)[0] for r in reports
                                      if r.extra.get('starved')})}
  return {
      **moe,
      'layers': len(reports),
      'mean_rel_error': float(np.mean([r.rel_error for r in reports])),
      'max_rel_error': float(np.max([r.rel_error for r in reports])),
      'mean_sparsity': float(np.mean([r.sparsity for r in reports])),
      'compress_seconds': wall,
      'numerics_seconds': numerics,
      'recover_seconds': recover,
      'calib_forward_seconds': max(0.0, wall - numerics - recover),
  }
