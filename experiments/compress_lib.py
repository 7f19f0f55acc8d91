"""The compress-recover-evaluate job as a function (no flags): what ``experiments.compress`` runs
and what the table scripts call with their own settings."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import shutil
import time
from typing import Any

from compress import allocate, pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import common
from kernels import QuantSpec
from models import checkpoint
from models import loading
from models import tree
from recover import compensate as compensate_lib
from recover import prompting
from recover import reconstruct as reconstruct_lib
from recover import train as train_lib

FINETUNE_METHODS = ('none', 'lora', 'qat', 'global', 'idp')
LORA_INITS = ('zero', 'loftq', 'eora', 'srr')


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressConfig:
  """Everything ``run`` needs, and the single declaration of ``experiments.compress``'s flags: each
  field is a flag of the same name, default and help (``common.define_flags_from``)."""
  model: str = common.flag_field('smollm2-135m', 'Model name, checkpoint directory or .gguf.')
  prune: str = common.flag_field('none', 'Pruning method: none|magnitude|wanda|sparsegpt.')
  sparsity: str = common.flag_field('0.5', 'Unstructured ratio in (0, 1), or N:M (2:4, 4:8).')
  quant: str = common.flag_field('none', 'Quantization method: none|rtn|gptq|awq.')
  bits: int = common.flag_field(4, 'Weight bits: 2, 3, 4 or 8.')
  group_size: int = common.flag_field(128, 'Quantization group size (-1: per output unit).')
  act_order: bool = common.flag_field(False, 'GPTQ act-order.')
  static_groups: bool = common.flag_field(False, 'GPTQ static groups.')
  sym: bool = common.flag_field(False, 'Symmetric quantization grid.')
  awq_clip: bool = common.flag_field(False, "AWQ's clipping search.")
  true_sequential: bool = common.flag_field(False, 'Re-collect statistics inside a block.')
  dense_inputs: bool = common.flag_field(False, 'Calibrate on dense activations.')
  rules: tuple[str, ...] = common.flag_field(
      (), 'Mixed precision: REGEX=BITS or REGEX=none rules, first match wins, ahead of the '
      'uniform spec.')
  auto_bits: float | None = common.flag_field(
      None, 'Allot bits per layer from measured sensitivity under this average-bits budget.')
  auto_candidates: tuple[int, ...] = common.flag_field((2, 3, 4), 'Bit widths for --auto_bits.')
  include_head: bool = common.flag_field(False, 'Also compress the LM head.')
  calib_data: str = common.flag_field('python-docs', 'Calibration corpus or file (train split).')
  calib_samples: int = common.flag_field(64, 'Calibration sequences.')
  calib_seqlen: int = common.flag_field(512, 'Calibration sequence length.')
  seed: int = common.flag_field(0, 'Seed of the calibration sampler.')
  eval_data: tuple[str, ...] = common.flag_field(
      ('python-docs',), 'Comma list of corpora or files (test split).')
  eval_seqlen: int = common.flag_field(512, 'Evaluation window length.')
  eval_windows: int = common.flag_field(40, 'Evaluation windows per corpus.')
  probes: str | None = common.flag_field(
      None, "Multiple-choice JSONL (default: shipped probes; 'none').")
  dtype: str = common.flag_field('float32', 'Compute dtype.', choices=('float32', 'bfloat16'))
  batch_size: int = common.flag_field(8, 'Sequences per calibration/evaluation step.')
  recover: str = common.flag_field('none', 'Recovery method: none|svd|eora|actsvd|srr.')
  rank: int = common.flag_field(64, 'Adapter rank.')
  adapter_bits: int = common.flag_field(16, 'Adapter bits: 16 (float), 8, 4, 3.')
  srr_k: int | None = common.flag_field(
      None, 'SRR preserved rank (default energy rule; -1 search).')
  recover_data: str | None = common.flag_field(None, 'Separate calibration set for recovery.')
  recover_samples: int = common.flag_field(64, 'Recovery calibration sequences.')
  reconstruct: str = common.flag_field(
      'none', 'Local reconstruction window: none|matrix|submodule|block|blocks:K.')
  recon_samples: int = common.flag_field(128, 'Reconstruction sequences (calibration corpus).')
  recon_epochs: float = common.flag_field(1.0, 'Epochs over the reconstruction set per window.')
  recon_lr: float = common.flag_field(1e-5, 'AdamW learning rate (10% warmup, linear decay).')
  recon_batch: int = common.flag_field(2, 'Reconstruction batch (sequences).')
  recon_inputs: str = common.flag_field('propagated', 'propagated|dense inputs of each window.')
  recon_loss: str = common.flag_field('mse', 'Reconstruction loss: mse|cosine.')
  recon_quant_mode: str = common.flag_field(
      'scales', 'What a quantized weight trains: scales|ste|lora.')
  recon_peft: bool = common.flag_field(
      False, 'Train a LoRA (r16, alpha 32) per window and merge it.')
  finetune: str = common.flag_field('none', 'Fine-tuning method: none|lora|qat|global|idp.')
  ft_steps: int = common.flag_field(100, 'Fine-tuning steps.')
  ft_samples: int = common.flag_field(128, 'Fine-tuning sequences (calibration corpus).')
  ft_lr: float | None = common.flag_field(None, 'Fine-tuning learning rate (default per method).')
  ft_distill: bool = common.flag_field(False, 'Distil from the dense model instead of the LM loss.')
  lora_rank: int = common.flag_field(16, 'LoRA rank.')
  lora_init: str = common.flag_field('zero', 'LoRA init: zero (QLoRA)|loftq|eora|srr.')
  idp_prompts: int = common.flag_field(2, 'IDP: prompts in the pool (k-means groups).')


def build_spec(c: CompressConfig) -> rules_lib.LinearSpec:
  """The uniform spec from the flags; raises ValueError naming a bad value before any work."""
  if c.prune not in rules_lib.PRUNE_METHODS:
    raise ValueError(f'--prune={c.prune!r} is not a pruning method; choose one of {rules_lib.PRUNE_METHODS}')
  if c.quant not in rules_lib.QUANT_METHODS:
    raise ValueError(f'--quant={c.quant!r} is not a quantization method; choose one of '
                     f'{rules_lib.QUANT_METHODS}')
  if c.recover not in compensate_lib.METHODS:
    raise ValueError(f'--recover={c.recover!r} is not a recovery method; choose one of '
                     f'{compensate_lib.METHODS}')
  sparsity = PruneSpec.parse(c.sparsity) if c.prune != 'none' else None
  qspec = None
  if c.quant != 'none' or c.auto_bits is not None:
    try:
      qspec = QuantSpec(bits=c.bits, group_size=c.group_size, symmetric=c.sym)
    except ValueError as e:
      raise ValueError(f'--bits/--group_size: {e}') from e
  if c.calib_samples <= 0 or c.calib_seqlen <= 1:
    raise ValueError('--calib_samples must be positive and --calib_seqlen at least 2')
  if c.recover != 'none' and c.prune == 'none' and c.quant == 'none':
    raise ValueError('--recover needs a compression (--prune or --quant)')
  if c.recover != 'none':
    compensate_lib.Compensator(method=c.recover, rank=c.rank, adapter_bits=c.adapter_bits)
  if c.reconstruct != 'none':
    recon_config(c)
    if c.recon_samples < c.recon_batch:
      raise ValueError(f'--recon_samples={c.recon_samples} is smaller than the batch {c.recon_batch}')
  if c.finetune not in FINETUNE_METHODS:
    raise ValueError(f'--finetune={c.finetune!r} is not a fine-tuning method; choose one of '
                     f'{FINETUNE_METHODS}')
  if c.finetune != 'none':
    if c.ft_steps <= 0 or c.ft_samples <= 0:
      raise ValueError('--ft_steps and --ft_samples must be positive')
    if c.lora_init not in LORA_INITS:
      raise ValueError(f'--lora_init={c.lora_init!r}; choose one of {LORA_INITS}')
    if c.finetune == 'lora' and c.lora_init in ('eora', 'srr') and (
        c.recover != c.lora_init or c.rank != c.lora_rank):
      raise ValueError(f'--lora_init={c.lora_init} starts from the {c.lora_init} adapters: pass '
                       f'--recover={c.lora_init} --rank={c.lora_rank}')
  if (c.reconstruct != 'none' or c.finetune != 'none') and c.prune == 'none' and c.quant == 'none':
    raise ValueError('--reconstruct/--finetune need a compression (--prune or --quant)')
  return rules_lib.LinearSpec(prune=c.prune, sparsity=sparsity, quant=c.quant, qspec=qspec,
                              act_order=c.act_order, static_groups=c.static_groups,
                              awq_clip=c.awq_clip)


def build_rules(c: CompressConfig, spec: rules_lib.LinearSpec) -> list[rules_lib.Rule]:
  extra = [rules_lib.parse_rule(r, spec) for r in c.rules]
  return extra + rules_lib.uniform(spec, include_head=c.include_head)


def recon_config(c: CompressConfig) -> reconstruct_lib.ReconConfig:
  """The reconstruction settings of the flags (raises ValueError naming a bad value)."""
  try:
    return reconstruct_lib.ReconConfig(
        window=c.reconstruct, epochs=c.recon_epochs, batch_size=c.recon_batch,
        optim=train_lib.OptimConfig(lr=c.recon_lr), loss=c.recon_loss, inputs=c.recon_inputs,
        quant_mode=c.recon_quant_mode, peft=c.recon_peft, seed=c.seed)
  except ValueError as e:
    raise ValueError(f'--reconstruct: {e}') from e


def _add_compute(info: dict[str, Any], tokens_seen: int, train_compute: float,
                 trainable_params: int) -> None:
  """Adds one training stage's tokens and compute to ``info`` (trainable params: the largest)."""
  info['tokens_seen'] += int(tokens_seen)
  info['train_compute'] += float(train_compute)
  info['trainable_params'] = max(info.get('trainable_params', 0), int(trainable_params))


def train_recovery(c: CompressConfig, dense, start, cfg, tokenizer, out_dir: str | None,
                   progress: bool = True) -> tuple[Any, dict[str, Any]]:
  """Local reconstruction and/or fine-tuning of a compressed model; ``(params, info)`` with the
  train seconds, tokens seen, trainable parameters, compute (sum of tokens x trainable params)
  and peak memory."""
  info: dict[str, Any] = {'train_seconds': 0.0, 'tokens_seen': 0, 'train_compute': 0.0}
  params = start
  if c.reconstruct != 'none':
    tokens = common.calibration_for(tokenizer, c.calib_data, c.recon_samples, c.calib_seqlen, c.seed)
    ckpt = str(pathlib.Path(out_dir) / 'recon_checkpoint') if out_dir else None
    t0 = time.time()
    params, reps = reconstruct_lib.reconstruct(params, dense, cfg, tokens, recon_config(c),
                                               checkpoint_dir=ckpt, progress=progress)
    info['train_seconds'] += time.time() - t0
    summary = reconstruct_lib.summarize(reps, tokens_per_step=c.recon_batch * c.calib_seqlen)
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
    t0 = time.time()
    ft_config = finetune_lib.FinetuneConfig(c.finetune, c.ft_steps, lr=c.ft_lr,
                                            lora_rank=c.lora_rank, lora_init=c.lora_init,
                                            distill=c.ft_distill, seed=c.seed)
    params, ft = finetune_lib.finetune(params, cfg, tokens, ft_config, dense_params=dense,
                                       progress=progress)
    info['train_seconds'] += time.time() - t0
    _add_compute(info, ft['tokens_seen'], ft['train_compute'], ft['trainable_params'])
    info['finetune'] = ft
  info['peak_memory_bytes'] = train_lib.peak_memory_bytes()
  return params, info


def run(c: CompressConfig, *, out_dir: str | None = None, save: str | None = None,
        restart: bool = False, loaded: loading.LoadedModel | None = None) -> dict[str, Any]:
  """Compress, recover and evaluate; returns the results dict (``results.json``'s content)."""
  spec = build_spec(c)
  dt = common.parse_dtype(c.dtype)
  loaded = loaded or loading.load_model(c.model, dtype=dt)
  cfg, params = loaded.config, loaded.params
  tokenizer = loaded.tokenizer()
  rules = build_rules(c, spec)
  pipeline.validate_rules(params, rules)

  windows = {name: common.eval_windows_for(tokenizer, name, c.eval_seqlen, c.eval_windows)
             for name in c.eval_data}
  calib = common.calibration_for(tokenizer, c.calib_data, c.calib_samples, c.calib_seqlen, c.seed)
  aux = None
  compensator = None
  if c.recover != 'none':
    compensator = compensate_lib.Compensator(method=c.recover, rank=c.rank,
                                             adapter_bits=c.adapter_bits, srr_k=c.srr_k)
    if c.recover_data:
      aux = common.calibration_for(tokenizer, c.recover_data, c.recover_samples, c.calib_seqlen,
                                   c.seed + 1)
  if c.auto_bits is not None:
    rules = allocate.auto_bits_rules(params, cfg, calib, spec, budget=c.auto_bits,
                                     candidates=c.auto_candidates, batch_size=c.batch_size,
                                     dtype=dt) + rules

  ckpt_dir = None
  if out_dir:
    ckpt_dir = pathlib.Path(out_dir) / 'checkpoint'
    if restart and ckpt_dir.exists():
      shutil.rmtree(ckpt_dir)
  t0 = time.time()
  compressed, reports = pipeline.compress_model(
      params, cfg, calib, rules, dense_inputs=c.dense_inputs, true_sequential=c.true_sequential,
      batch_size=c.batch_size, dtype=dt, checkpoint_dir=ckpt_dir, recovery=compensator,
      aux_tokens=aux)
  compress_seconds = time.time() - t0
  numerics = sum(r.seconds for r in reports)
  recover_seconds = sum(r.extra.get('recover_seconds', 0.0) for r in reports)

  items = common.probe_items(c.probes)
  results: dict[str, Any] = {'model': c.model, 'method': spec.describe(),
                             'calib_data': c.calib_data, 'calib_tokens': int(calib.size),
                             'eval_data': c.eval_data[0], 'eval_seqlen': c.eval_seqlen}
  base = None
  if compensator is not None and compensator.changes_weights:
    # SRR re-quantizes a residual: the compression alone is a separate run without compensation.
    base, _ = pipeline.compress_model(
        params, cfg, calib, rules, dense_inputs=c.dense_inputs, true_sequential=c.true_sequential,
        batch_size=c.batch_size, dtype=dt)
  elif compensator is not None:
    # The compression alone: the same leaves without their adapters (the pipeline propagates
    # activations without adapters, so these are exactly the uncompensated run's weights).
    base = tree.strip_adapters(compressed)
  evaluate = functools.partial(common.evaluate_models, loaded, windows=windows, items=items,
                               dtype=dt, batch_size=max(1, c.batch_size // 2))
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
  recovered = compressed if compensator is not None else None
  pool = None
  if c.reconstruct != 'none' or c.finetune != 'none':
    recovered, train_info = train_recovery(c, params, compressed, cfg, tokenizer, out_dir)
    pool = train_info.pop('pool', None)
    results.update(train_info)
  if recovered is not None:
    ev = evaluate({'recovered': recovered}, pools=None if pool is None else {'recovered': pool},
                  dense_probes=False)['recovered']
    results.update(ppl_recovered=ev[f'ppl {first}'], kl_recovered=ev.get(f'kl {first}'),
                   top1_recovered=ev.get(f'top1 {first}'), recover_seconds=recover_seconds)
    if items:
      results['probe_acc_recovered'] = ev['probe_acc']
    for ds in c.eval_data:
      per_dataset[ds].update({f'{k}_recovered': ev.get(f'{k} {ds}') for k in ('ppl', 'kl', 'top1')})
    results.update(compensate_lib.adapter_share(recovered))
  results.update(compress_seconds=compress_seconds, numerics_seconds=numerics,
                 calib_forward_seconds=compress_seconds - numerics - recover_seconds,
                 per_dataset=per_dataset, summary=pipeline.summarize(reports),
                 layers=[dataclasses.asdict(r) for r in reports], config=dataclasses.asdict(c))
  if save:
    checkpoint.save_model(save, recovered if recovered is not None else compressed, cfg,
                          {'method': spec.describe(), 'model': c.model})
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
    t0 = time.time()
    params, reports = pipeline.compress_model(
        loaded.params, loaded.config, calib, build_rules(c, spec), batch_size=c.batch_size,
        recovery=recovery, aux_tokens=aux_tokens, precomputed_stats=st,
        precomputed_aux_stats=aux_st, checkpoint_dir=common.partial_dir(cache_dir))
    total = time.time() - t0
    numerics = float(sum(r.seconds for r in reports))
    recover = float(sum(r.extra.get('recover_seconds', 0.0) for r in reports))
    timing = {'compress_seconds': total, 'numerics_seconds': numerics, 'recover_seconds': recover,
              'calib_forward_seconds': total - numerics - recover, **pipeline.summarize(reports)}
    return params, {'timing': timing, 'method': spec.describe()}
  params, meta = common.cached_model(cache_dir, loaded, compute)
  return params, meta.get('timing', {})


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
