"""The compress-recover-evaluate job as a function (no flags): what ``experiments.compress`` runs
and what the table scripts call with their own settings (its configuration and the check before
any work are in :mod:`experiments.config`), plus the cached compressions of the table rows."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable

import jax

from compress import allocate, pipeline
from experiments import common
from experiments.config import CompressConfig, build_rules, build_spec, recon_config, resolve
from experiments.config import adapters_trained, validate
from experiments.config import compensator as compensator_of
from models import checkpoint
from models import distributed
from models import export as export_lib
from models import loading
from models import sharding
from models import tree
from recover import budget as budget_lib
from recover import compensate as compensate_lib
from recover import prompting
from recover import reconstruct as reconstruct_lib
from recover import train as train_lib

def _add_compute(info: dict[str, Any], tokens_seen: int, train_compute: float,
                 trainable_params: int) -> None:
  """Adds one training stage's tokens and compute to ``info`` (trainable params: the largest)."""
  info['tokens_seen'] += int(tokens_seen)
  info['train_compute'] += float(train_compute)
  info['trainable_params'] = max(info.get('trainable_params', 0), int(trainable_params))


# The stages' resumable state under OUT_DIR; --restart clears all of them.
STAGE_DIRS = {'compress': 'checkpoint', 'recon': 'recon_checkpoint', 'ft': 'ft_checkpoint',
              'srr': 'srr_candidates'}
FT_CHUNK_STEPS = 10  # fine-tuning steps per compiled (and checkpointable) chunk


def _stage_dir(out_dir: str | None, stage: str) -> str | None:
  return str(pathlib.Path(out_dir) / STAGE_DIRS[stage]) if out_dir else None


def train_recovery(c: CompressConfig, dense, start, cfg, tokenizer, out_dir: str | None,
                   progress: bool = True) -> tuple[Any, dict[str, Any]]:
  """Local reconstruction and/or fine-tuning of a compressed model; ``(params, info)`` with the
  train seconds, tokens seen, trainable parameters, compute (sum of tokens x trainable params)
  and peak memory."""
  info: dict[str, Any] = {'train_seconds': 0.0, 'tokens_seen': 0, 'train_compute': 0.0}
  params = start
  if c.reconstruct != 'none':
    tokens = common.calibration_for(tokenizer, c.calib_data, c.recon_samples, c.calib_seqlen, c.seed)
    params, reps = reconstruct_lib.reconstruct(
        params, dense, cfg, tokens, recon_config(c), checkpoint_dir=_stage_dir(out_dir, 'recon'),
        checkpoint_every_s=c.checkpoint_every_s, progress=progress)
    summary = reconstruct_lib.summarize(reps, tokens_per_step=c.recon_batch * c.calib_seqlen)
    info['train_seconds'] += summary['train_seconds']  # summed over interruptions
    _add_compute(info, summary['tokens_seen'], summary['train_compute'],
                 summary['trainable_params_max_window'])
    info['reconstruct'] = summary
    info['windows'] = [dataclasses.asdict(r) for r in reps]
  if c.finetune == 'idp':
    # A pool of soft prompts, one per k-means group of the training windows; no weight changes.
    tokens = common.calibration_for(tokenizer, c.calib_data, c.ft_samples, c.calib_seqlen, c.seed + 2)
    idp = prompting.IDPConfig(num_prompts=c.idp_prompts, steps=c.ft_steps, seed=c.seed,
                              **({'lr': c.ft_lr} if c.ft_lr else {}))
    t0 = time.time()
    groups = prompting.cluster_groups(params, cfg, tokens, idp.num_prompts, c.seed)
    pool, pinfo = prompting.train_pool(params, cfg, groups, idp)
    info['train_seconds'] += time.time() - t0
    _add_compute(info, pinfo['tokens_seen'], pinfo['train_compute'], pinfo['added_parameters'])
    info['idp'] = {k: v for k, v in pinfo.items() if k != 'losses'}
    info['pool'] = pool
  elif c.finetune != 'none':
    from recover import finetune as finetune_lib  # pylint: disable=g-import-not-at-top
    tokens = common.calibration_for(tokenizer, c.calib_data, c.ft_samples, c.calib_seqlen, c.seed + 2)
    ft_config = finetune_lib.FinetuneConfig(c.finetune, c.ft_steps, lr=c.ft_lr,
                                            lora_rank=c.lora_rank, lora_init=c.lora_init,
                                            distill=c.ft_distill, seed=c.seed)
    params, ft = finetune_lib.finetune(
        params, cfg, tokens, ft_config, dense_params=dense, progress=progress,
        checkpoint_dir=_stage_dir(out_dir, 'ft'), chunk_steps=FT_CHUNK_STEPS,
        checkpoint_every_s=c.checkpoint_every_s)
    info['train_seconds'] += ft['train_seconds']  # summed over interruptions
    _add_compute(info, ft['tokens_seen'], ft['train_compute'], ft['trainable_params'])
    info['finetune'] = ft
  info['peak_memory_bytes'] = train_lib.peak_memory_bytes()
  return params, info


def moe_calibration(c: CompressConfig) -> pipeline.MoeCalibration:
  """The experts' calibration settings of the flags (they matter only for a mixture of experts)."""
  return pipeline.MoeCalibration(routed=c.moe_calibration == 'routed',
                                 min_tokens=c.moe_min_tokens, starved=c.moe_starved)


def run(c: CompressConfig, **kwargs) -> dict[str, Any]:
  """:func:`run_on_mesh` on the placement ``--mesh`` and ``--offload`` name."""
  try:
    placement = sharding.Placement.create(c.mesh, c.offload, c.param_sharding)
  except ValueError:  # the checks of run_on_mesh report it, with every other problem
    placement = sharding.active()
  with sharding.use(placement):
    return run_on_mesh(c, **kwargs)


def run_on_mesh(c: CompressConfig, *, out_dir: str | None = None, save: str | None = None,
                restart: bool = False, loaded: loading.LoadedModel | None = None,
                on_results: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
  """Compress, recover and evaluate; returns the results dict (``results.json``'s content).

  Raises ValueError listing every problem :func:`validate` finds, before any work. Every stage
  resumes from its checkpoint under ``out_dir`` (``restart`` clears them all first).
  ``on_results(results)`` is called with what is measured so far before each step that can still
  fail (training, saving; ``results['complete']`` says whether it is the final result), so an
  evaluation is never lost.

  With several processes (``jax.distributed`` started, :mod:`models.distributed`) every process
  calls this with the same arguments and gets the same result: the compression runs on the mesh
  of all their devices (each process feeds its own rows of every calibration batch); evaluation
  is split over the processes (each scores its share of the windows and probes on its own
  devices, the sums are combined); reconstruction and fine-tuning run data-parallel on the mesh
  of all processes (every batch split along its data axis, the gradients all-reduced across
  processes); the sensitivity search of ``--auto_bits`` runs on the devices of each process,
  repeated in every process;
  checkpoints are written by all of them together, the export by process 0 alone, and
  ``on_results`` is called in every process (write from :func:`models.distributed.is_writer`)."""
  problems = validate(c, out_dir=out_dir, save=save, model_config=loaded and loaded.config)
  if problems:
    raise ValueError('invalid configuration, nothing was run:\n' + '\n'.join(problems))
  c = resolve(c, loaded.config if loaded else loading.load_config(c.model))
  spec = build_spec(c)
  dt = common.parse_dtype(c.dtype)
  loaded = loaded or loading.load_model(c.model, dtype=dt, lazy=c.stream)
  cfg, params = loaded.config, loaded.params
  tokenizer = loaded.tokenizer()
  rules = build_rules(c, spec)
  pipeline.validate_rules(params, rules)
  placement = sharding.active()
  # Stages that fetch per-sequence results to the host run on this process's devices alone.
  local = distributed.local_placement(placement)
  several = placement.spans_processes

  # A .npy of windows is used as it is: its ids are checked against the model's vocabulary here.
  windows = {name: common.eval_windows_for(tokenizer, name, c.eval_seqlen, c.eval_windows,
                                           vocab_size=cfg.vocab_size)
             for name in c.eval_data}
  calib = common.calibration_for(tokenizer, c.calib_data, c.calib_samples, c.calib_seqlen, c.seed,
                                 vocab_size=cfg.vocab_size)
  aux = None
  compensator = compensator_of(c)
  if compensator is not None:
    if c.recover_data:
      aux = common.calibration_for(tokenizer, c.recover_data, c.recover_samples, c.calib_seqlen,
                                   c.seed + 1, vocab_size=cfg.vocab_size)
  if c.auto_bits is not None:
    # The user's --rules win over the allocation, which spends the budget on the other linears.
    user, rest = rules[:len(c.rules)], rules[len(c.rules):]
    with sharding.use(local):
      rules = user + allocate.auto_bits_rules(params, cfg, calib, spec, budget=c.auto_bits,
                                              candidates=c.auto_candidates,
                                              batch_size=c.batch_size, dtype=dt, keep=user) + rest

  if out_dir and restart:
    if distributed.is_writer():
      for stage in STAGE_DIRS:
        shutil.rmtree(_stage_dir(out_dir, stage), ignore_errors=True)
    distributed.barrier(f'restart {out_dir}')
  scratch = None
  if compensator is not None and compensator.budget_rank:
    # SRR's candidates under a global budget: kept beside the compression checkpoint (so a resumed
    # run has those of the blocks done), one directory per process.
    if out_dir:
      where = pathlib.Path(_stage_dir(out_dir, 'srr')) / f'p{jax.process_index()}'
      if not (pathlib.Path(_stage_dir(out_dir, 'compress')) / 'state').exists():
        shutil.rmtree(where, ignore_errors=True)  # a fresh compression: no other run's candidates
    else:
      scratch = tempfile.TemporaryDirectory()
      where = scratch.name
    compensator = dataclasses.replace(compensator,
                                      candidate_store=budget_lib.CandidateStore(where))
  given = None
  if c.compressed is not None:  # compressed elsewhere: its leaves, our recovery and evaluation
    given, rules = loading.load_model(c.compressed, dtype=dt).params, []
  compressed, reports = pipeline.compress_model(
      params, cfg, calib, rules, dense_inputs=c.dense_inputs, true_sequential=c.true_sequential,
      batch_size=c.batch_size, dtype=dt, checkpoint_dir=_stage_dir(out_dir, 'compress'),
      recovery=compensator, aux_tokens=aux, checkpoint_every_s=c.checkpoint_every_s, given=given,
      moe=moe_calibration(c), host_blocks=c.stream)
  if several:  # from here on, every process holds the whole result
    compressed = distributed.to_local(compressed)
  summary = pipeline.summarize(reports)  # its seconds add up over interruptions

  # --stream scores perplexity block by block; the shipped probes (a whole-model forward) are off.
  items = [] if c.stream and c.probes is None else common.probe_items(c.probes)
  method = spec.describe() if given is None else ', '.join(sorted({r.method for r in reports}))
  results: dict[str, Any] = {'model': c.model, 'method': method,
                             'calib_data': c.calib_data, 'calib_tokens': int(calib.size),
                             # Which tokens exactly: equal hashes, equal windows (int32, shape).
                             'calibration_sha256': common.windows_sha256(calib),
                             'eval_sha256': {ds: common.windows_sha256(w)
                                             for ds, w in windows.items()},
                             'eval_data': c.eval_data[0], 'eval_seqlen': c.eval_seqlen,
                             'mesh': placement.describe(),
                             'offload': placement.offload}
  if several:
    n = distributed.process_count()
    results['processes'] = n
    # Evaluation: each process scores its share of the windows (and probes); sums combined.
    n_win = len(windows[c.eval_data[0]])
    results['eval_windows_per_process'] = [
        len(range(n_win)[distributed.process_share(n_win, count=n, index=i)]) for i in range(n)]
  if c.rank_budget == 'global' and c.recover == 'srr':  # k and rank of every linear, model-wide
    compressed, alloc = budget_lib.srr_global_budget(compressed, compensator.candidate_store,
                                                     c.rank, weighting=c.budget_weighting)
    results['rank_budget'] = alloc.summary()
    if scratch is not None:
      scratch.cleanup()
  elif c.rank_budget == 'global':  # EoRA at --budget_max_rank, cut to one model-wide budget
    energies = {f'{r.name}/kernel': r.extra['output_energy'] for r in reports
                if 'output_energy' in r.extra}
    compressed, alloc = budget_lib.global_budget(compressed, c.rank, weighting=c.budget_weighting,
                                                 energies=energies)
    results['rank_budget'] = alloc.summary()
  if compensator is not None and compensator.adapter_bits != c.adapter_bits and not (
      adapters_trained(c)):  # quantized after the budget cut them (after training: later)
    compressed = compensate_lib.quantize_adapters(compressed, c.adapter_bits,
                                                  compensator.adapter_group_size)
  base = None
  if compensator is not None and compensator.changes_weights:
    # SRR re-quantizes a residual: the compression alone is a separate run without compensation.
    base, _ = pipeline.compress_model(
        params, cfg, calib, rules, dense_inputs=c.dense_inputs, true_sequential=c.true_sequential,
        batch_size=c.batch_size, dtype=dt, given=given, moe=moe_calibration(c),
        host_blocks=c.stream)
    base = distributed.to_local(base) if several else base
  elif compensator is not None:
    # The compression alone: the same leaves without their adapters (the pipeline propagates
    # activations without adapters, so these are exactly the uncompensated run's weights).
    base = tree.strip_adapters(compressed)
  with sharding.use(local):
    return _evaluate_and_recover(c, loaded, compressed, base, reports, summary, results, windows,
                                 items, method, tokenizer, out_dir=out_dir, save=save,
                                 on_results=on_results, train_placement=placement)


def _evaluate_and_recover(c: CompressConfig, loaded: loading.LoadedModel, compressed, base,
                          reports, summary, results, windows, items, method, tokenizer, *,
                          out_dir: str | None, save: str | None,
                          on_results: Callable[[dict[str, Any]], None] | None,
                          train_placement: sharding.Placement) -> dict[str, Any]:
  """The rest of :func:`run_on_mesh` after the compression, on the active placement (this
  process's devices when the run spans several): evaluation, training, export, save. Training
  runs on ``train_placement`` (the mesh of every process: data-parallel across them) and its
  result comes back to this process's devices."""
  cfg, params = loaded.config, loaded.params
  dt = common.parse_dtype(c.dtype)
  report = lambda: dict(results, per_dataset=per_dataset, summary=summary,  # noqa: E731
                        layers=[dataclasses.asdict(r) for r in reports],
                        config=dataclasses.asdict(c),
                        **{k: summary.get(k, 0.0) for k in ('compress_seconds', 'numerics_seconds',
                                                            'calib_forward_seconds')})
  compensated = c.recover != 'none'
  evaluate = functools.partial(common.evaluate_models, loaded, windows=windows, items=items,
                               dtype=dt, batch_size=max(1, c.batch_size // 2),
                               blockwise=c.stream)
  ev = evaluate({'compressed': base if base is not None else compressed})
  first = c.eval_data[0]
  results.update(ppl_dense=ev['dense'][f'ppl {first}'],
                 ppl_compressed=ev['compressed'][f'ppl {first}'],
                 kl_compressed=ev['compressed'][f'kl {first}'],
                 top1_compressed=ev['compressed'][f'top1 {first}'],
                 eval_tokens=ev['dense'][f'eval_tokens {first}'])
  if items:
    results.update(probe_acc_dense=ev['dense']['probe_acc'],
                   probe_acc_compressed=ev['compressed']['probe_acc'])
  per_dataset = {ds: {'ppl_dense': ev['dense'][f'ppl {ds}'],
                      **{f'{k}_compressed': ev['compressed'][f'{k} {ds}']
                         for k in ('ppl', 'kl', 'top1')}} for ds in c.eval_data}
  recovered = compressed if compensated else None
  pool = None
  if on_results is not None:
    on_results(dict(report(), complete=False))
  if c.reconstruct != 'none' or c.finetune != 'none':
    with sharding.use(train_placement):
      recovered, train_info = train_recovery(c, params, compressed, cfg, tokenizer, out_dir)
    train_info['train_mesh'] = train_placement.describe()
    train_info['param_sharding'] = train_placement.params
    train_info['train_processes'] = (1 if train_placement.mesh is None else
                                     len({d.process_index for d in train_placement.mesh.devices.flat}))
    if train_placement.spans_processes:  # every process holds the whole trained model
      recovered = distributed.to_local(recovered)
      if train_info.get('pool') is not None:
        train_info['pool'] = distributed.to_local(train_info['pool'])
    pool = train_info.pop('pool', None)
    results.update(train_info)
    if adapters_trained(c) and c.adapter_bits != 16:  # the last step of a composed recipe
      recovered = compensate_lib.quantize_adapters(recovered, c.adapter_bits,
                                                   compensate_lib.Compensator.adapter_group_size)
  if recovered is not None:
    ev = evaluate({'recovered': recovered}, pools=None if pool is None else {'recovered': pool},
                  dense_probes=False)['recovered']
    results.update(ppl_recovered=ev[f'ppl {first}'], kl_recovered=ev.get(f'kl {first}'),
                   top1_recovered=ev.get(f'top1 {first}'),
                   recover_seconds=summary.get('recover_seconds', 0.0))
    if items:
      results['probe_acc_recovered'] = ev['probe_acc']
    for ds in c.eval_data:
      per_dataset[ds].update({f'{k}_recovered': ev.get(f'{k} {ds}') for k in ('ppl', 'kl', 'top1')})
    results.update(compensate_lib.adapter_share(recovered))
  results = dict(report(), complete=True)
  if c.export != 'none' and out_dir:
    if on_results is not None:
      on_results(results)
    path = pathlib.Path(out_dir) / f'export_{c.export}'
    if distributed.is_writer():
      path = export_lib.save(path, c.export, recovered if recovered is not None else compressed,
                             cfg, tokenizer=tokenizer, peft_base=c.peft_base, overwrite=True)
    results['exported_to'] = str(path)
  if save:
    if on_results is not None:
      on_results(results)  # the evaluation is on disk before the save, which can still fail
    checkpoint.save_model(save, recovered if recovered is not None else compressed, cfg,
                          {'method': method, 'model': c.model})
    if pool is not None:
      checkpoint.save_tree(f'{save}_prompt_pool', {'prompts': pool.prompts, 'keys': pool.keys},
                           {'route_layer': pool.route_layer})
      results['prompt_pool_saved_to'] = f'{save}_prompt_pool'
    results['saved_to'] = save
  return results


# --------------------------------------------------------------------------- table rows, cached

# The compressions of the paper tables, by row name (the table scripts pick their rows from here).
COMPRESSIONS: dict[str, dict[str, Any]] = {
    'magnitude 50%': dict(prune='magnitude', sparsity='0.5'),
    'wanda 50%': dict(prune='wanda', sparsity='0.5'),
    'sparsegpt 50%': dict(prune='sparsegpt', sparsity='0.5'),
    'magnitude 2:4': dict(prune='magnitude', sparsity='2:4'),
    'wanda 2:4': dict(prune='wanda', sparsity='2:4'),
    'sparsegpt 2:4': dict(prune='sparsegpt', sparsity='2:4'),
    'rtn w4g64': dict(quant='rtn', bits=4, group_size=64),
    'gptq w4g64': dict(quant='gptq', bits=4, group_size=64),
    'rtn w3g64': dict(quant='rtn', bits=3, group_size=64),
    'gptq w3g64': dict(quant='gptq', bits=3, group_size=64),
    'rtn w2g64': dict(quant='rtn', bits=2, group_size=64),
    'gptq w2g64': dict(quant='gptq', bits=2, group_size=64),
    'sparsegpt 2:4 + gptq w4g64': dict(prune='sparsegpt', sparsity='2:4', quant='gptq', bits=4,
                                        group_size=64),
    'awq w3g64': dict(quant='awq', bits=3, group_size=64),
    # Modern baselines (propagated inputs only: their statistics need the compressed model's).
    'wanda++ 2:4': dict(prune='wanda++', sparsity='2:4'),
    'gptaq w3g64': dict(quant='gptq', bits=3, group_size=64, asymmetric=True),
    'sparsegpt 2:4 asymmetric': dict(prune='sparsegpt', sparsity='2:4', asymmetric=True),
}


def compressions(names, **overrides) -> dict[str, CompressConfig]:
  """The configs of the rows ``names`` of :data:`COMPRESSIONS` (with ``overrides``, e.g. the
  calibration size); an unknown row raises ValueError naming the known ones, and every config is
  validated (:func:`build_spec`) before any work."""
  unknown = [n for n in names if n not in COMPRESSIONS]
  if unknown:
    raise ValueError(f'unknown compressions {unknown}; known: {list(COMPRESSIONS)}')
  configs = {n: CompressConfig(**COMPRESSIONS[n], **overrides) for n in names}
  for c in configs.values():
    build_spec(c)
  return configs


def compress_cached(loaded: loading.LoadedModel, calib, c: CompressConfig, cache_dir, *,
                    recovery=None, aux_tokens=None, stats=None, aux_stats=None
                    ) -> tuple[Any, dict[str, Any]]:
  """Runs the pipeline once for ``c`` (or loads its saved result) and returns (params, timing).

  ``recovery``/``aux_tokens``: the pipeline's recovery (e.g. an EoRA ``Compensator``) and its
  separate calibration tokens (:func:`compress.pipeline.compress_model`).
  ``stats``/``aux_stats``: shared dense-input statistics
  (:func:`compress.calibration.dense_statistics`), or zero-argument callables computing them,
  called only on a cache miss; None runs the default propagated-input calibration."""
  def compute():
    st = stats() if callable(stats) else stats
    aux_st = aux_stats() if callable(aux_stats) else aux_stats
    spec = build_spec(c)
    params, reports = pipeline.compress_model(
        loaded.params, loaded.config, calib, build_rules(c, spec), batch_size=c.batch_size,
        recovery=recovery, aux_tokens=aux_tokens, precomputed_stats=st,
        precomputed_aux_stats=aux_st, checkpoint_dir=common.partial_dir(cache_dir))
    # compress_seconds, numerics_seconds, recover_seconds, calib_forward_seconds, ...
    return params, {'timing': pipeline.summarize(reports), 'method': spec.describe()}
  key = compress_key(c, recovery, calib, aux_tokens, shared_stats=stats is not None,
                     shared_aux_stats=aux_stats is not None)
  params, meta = common.cached_model(cache_dir, loaded, compute, key=key)
  return params, meta.get('timing', {})


def changed_settings(c: CompressConfig) -> dict[str, Any]:
  """The settings of ``c`` that differ from their defaults, by name (what a cache key hashes, so
  that a setting added later, at its default, keeps earlier keys valid)."""
  return {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
          if getattr(c, f.name) != CompressConfig.__dataclass_fields__[f.name].default}


def compress_key(c: CompressConfig, recovery, calib, aux_tokens=None, *, shared_stats: bool,
                 shared_aux_stats: bool = False) -> str:
  """The :func:`common.cache_key` of a :func:`compress_cached` result (the pipeline's code
  version included: a model cached before a change of its numbers is made again, never reused)."""
  return common.cache_key('compress', pipeline.CODE_VERSION, changed_settings(c),
                          getattr(recovery, 'fingerprint', None), calib,
                          aux_tokens, shared_stats, shared_aux_stats)


def compensated(loaded: loading.LoadedModel, calib, c: CompressConfig, rank: int, cache_dir, *,
                aux=None, stats=None, aux_stats=None) -> Any:
  """The compressed model of ``c`` with EoRA adapters at ``rank`` (cached;
  :func:`compress_cached`)."""
  return compress_cached(loaded, calib, c, cache_dir,
                         recovery=compensate_lib.Compensator(method='eora', rank=rank),
                         aux_tokens=aux, stats=stats, aux_stats=aux_stats)[0]


RESULT_COLUMNS = ('method', 'ppl_dense', 'ppl_compressed', 'kl_compressed', 'top1_compressed',
                  'probe_acc_dense', 'probe_acc_compressed', 'ppl_recovered', 'kl_recovered',
                  'top1_recovered', 'probe_acc_recovered', 'compress_seconds', 'train_seconds')
