"""The compress-recover-evaluate job as a function (no flags): what ``experiments.compress`` runs
and what the table scripts call with their own settings."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
from typing import Any

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import common
from kernels import QuantSpec
from models import checkpoint
from models import evaluate as eval_lib
from models import loading
from recover import compensate as compensate_lib
from recover import prompting
from recover import reconstruct as reconstruct_lib
from recover import train as train_lib

FINETUNE_METHODS = ('none', 'lora', 'qat', 'global', 'idp')
LORA_INITS = ('zero', 'loftq', 'eora', 'srr')


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressConfig:
  """Everything ``run`` needs (the flags, validated)."""
  model: str = 'smollm2-135m'
  prune: str = 'none'
  sparsity: str = '0.5'
  quant: str = 'none'
  bits: int = 4
  group_size: int = 128
  act_order: bool = False
  static_groups: bool = False
  sym: bool = False
  awq_clip: bool = False
  true_sequential: bool = False
  dense_inputs: bool = False
  rules: tuple[str, ...] = ()
  auto_bits: float | None = None
  auto_candidates: tuple[int, ...] = (2, 3, 4)
  include_head: bool = False
  calib_data: str = 'python-docs'
  calib_samples: int = 64
  calib_seqlen: int = 512
  seed: int = 0
  eval_data: tuple[str, ...] = ('python-docs',)
  eval_seqlen: int = 512
  eval_windows: int = 40
  probes: str | None = None
  dtype: str = 'float32'
  batch_size: int = 8
  recover: str = 'none'
  rank: int = 64
  adapter_bits: int = 16
  srr_k: int | None = None
  recover_data: str | None = None
  recover_samples: int = 64
  reconstruct: str = 'none'
  recon_samples: int = 128
  recon_epochs: float = 1.0
  recon_lr: float = 1e-5
  recon_batch: int = 2
  recon_inputs: str = 'propagated'
  recon_loss: str = 'mse'
  recon_quant_mode: str = 'scales'
  recon_peft: bool = False
  finetune: str = 'none'
  ft_steps: int = 100
  ft_samples: int = 128
  ft_lr: float | None = None
  ft_distill: bool = False
  lora_rank: int = 16
  lora_init: str = 'zero'
  idp_prompts: int = 2


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
    per_window = c.recon_batch * c.calib_seqlen
    info['train_seconds'] += time.time() - t0
    info['tokens_seen'] += int(sum(r.steps for r in reps) * per_window)
    info['train_compute'] += float(sum(r.steps * per_window * r.trainable_params for r in reps))
    info['trainable_params'] = max(r.trainable_params for r in reps)
    info['reconstruct'] = reconstruct_lib.summarize(reps)
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
    seen = int(idp.num_prompts * idp.steps * idp.batch_size * tokens.shape[1])
    info['tokens_seen'] += seen
    info['trainable_params'] = prompting.added_parameters(pool)
    info['train_compute'] += float(seen) * info['trainable_params']
    info['idp'] = {k: v for k, v in pinfo.items() if k != 'losses'}
    info['pool'] = pool
  elif c.finetune != 'none':
    from recover import finetune as finetune_lib  # pylint: disable=g-import-not-at-top
    tokens = common.calibration_for(tokenizer, c.calib_data, c.ft_samples, c.calib_seqlen, c.seed + 2)
    t0 = time.time()
    params, ft = finetune_lib.run_cli(c.finetune, params, cfg, tokens, dense_params=dense,
                                      steps=c.ft_steps, lr=c.ft_lr, lora_rank=c.lora_rank,
                                      lora_init=c.lora_init, distill=c.ft_distill, seed=c.seed,
                                      progress=progress)
    info['train_seconds'] += time.time() - t0
    info['tokens_seen'] += int(ft['tokens_seen'])
    info['train_compute'] += float(ft['tokens_seen']) * float(ft['trainable_params'])
    info['trainable_params'] = max(info.get('trainable_params', 0), int(ft['trainable_params']))
    info['finetune'] = ft
  info['peak_memory_bytes'] = train_lib.peak_memory_bytes()
  return params, info


def evaluate_pair(params_ref, params, cfg, windows: dict[str, Any], tokenizer, items, *,
                  dtype, batch_size: int, tag: str, pool: Any = None) -> dict[str, Any]:
  """KL/top-1/perplexity of ``params`` against ``params_ref`` on every corpus, plus probes.

  With a prompt ``pool`` (IDP) every window and probe item gets its routed prompt; only
  perplexity and probe accuracy are measured then (KL/top-1 are None)."""
  out: dict[str, Any] = {'per_dataset': {}}
  if pool is not None:
    for name, win in windows.items():
      pre = prompting.routed_prefixes(params, cfg, pool, win, dtype=dtype)
      r = eval_lib.perplexity(params, cfg, win, batch_size=max(1, batch_size // 2), dtype=dtype,
                              desc=f'eval {tag} {name}', prefixes=pre)
      out['per_dataset'][name] = {'ppl': r['ppl'], 'kl': None, 'top1': None}
    if items:
      toks, mask = prompting.context_tokens(tokenizer, items)
      pre = prompting.routed_prefixes(params, cfg, pool, toks, mask=mask, dtype=dtype)
      out['probes'] = eval_lib.score_multiple_choice(params, cfg, tokenizer, items, dtype=dtype,
                                                     desc=f'probes {tag}', prefixes=pre)
    return out
  for name, win in windows.items():
    r = eval_lib.compare(params_ref, params, cfg, win, batch_size=max(1, batch_size // 2),
                         dtype=dtype, desc=f'eval {tag} {name}')
    out['per_dataset'][name] = r
  if items:
    out['probes'] = eval_lib.score_multiple_choice(params, cfg, tokenizer, items, dtype=dtype,
                                                   desc=f'probes {tag}')
  return out


def run(c: CompressConfig, *, out_dir: str | None = None, save: str | None = None,
        restart: bool = False, loaded: loading.LoadedModel | None = None,
        dense_eval: dict[str, Any] | None = None) -> dict[str, Any]:
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
    rules = pipeline.auto_bits_rules(params, cfg, calib, spec, budget=c.auto_bits,
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
      batch_size=c.batch_size, dtype=dt, checkpoint_dir=ckpt_dir, compensate=compensator,
      aux_tokens=aux)
  compress_seconds = time.time() - t0
  numerics = sum(r.seconds for r in reports)
  recover_seconds = sum(r.extra.get('recover_seconds', 0.0) for r in reports)

  items = common.probe_items(c.probes)
  results: dict[str, Any] = {'model': c.model, 'method': spec.describe(),
                             'calib_data': c.calib_data, 'calib_tokens': int(calib.size),
                             'eval_data': c.eval_data[0], 'eval_seqlen': c.eval_seqlen}
  if dense_eval is None:
    dense_eval = {'probes': eval_lib.score_multiple_choice(params, cfg, tokenizer, items, dtype=dt,
                                                           desc='probes dense') if items else None}
  base = None
  if compensator is not None and compensator.changes_weights:
    # SRR re-quantizes a residual: the compression alone is a separate run without compensation.
    base, _ = pipeline.compress_model(
        params, cfg, calib, rules, dense_inputs=c.dense_inputs, true_sequential=c.true_sequential,
        batch_size=c.batch_size, dtype=dt)
  elif compensator is not None:
    # The compression alone: the same leaves without their adapters (the pipeline propagates
    # activations without adapters, so these are exactly the uncompensated run's weights).
    base = pipeline.strip_adapters(compressed)
  ev_c = evaluate_pair(params, base if base is not None else compressed, cfg, windows, tokenizer,
                       items, dtype=dt, batch_size=c.batch_size, tag='compressed')
  first = c.eval_data[0]
  results.update(
      ppl_dense=ev_c['per_dataset'][first]['ppl_ref'],
      ppl_compressed=ev_c['per_dataset'][first]['ppl'],
      kl_compressed=ev_c['per_dataset'][first]['kl'],
      top1_compressed=ev_c['per_dataset'][first]['top1'],
      eval_tokens=ev_c['per_dataset'][first]['eval_tokens'])
  if items:
    results.update(probe_acc_dense=dense_eval['probes']['acc'],
                   probe_acc_compressed=ev_c['probes']['acc'])
  per_dataset = {n: {'ppl_dense': r['ppl_ref'], 'ppl_compressed': r['ppl'], 'kl_compressed': r['kl'],
                     'top1_compressed': r['top1']} for n, r in ev_c['per_dataset'].items()}
  recovered = compressed if compensator is not None else None
  if c.reconstruct != 'none' or c.finetune != 'none':
    recovered, train_info = train_recovery(c, params, compressed, cfg, tokenizer, out_dir)
    pool = train_info.pop('pool', None)
    results.update(train_info)
  else:
    pool = None
  if recovered is not None:
    ev_r = evaluate_pair(params, recovered, cfg, windows, tokenizer, items, dtype=dt,
                         batch_size=c.batch_size, tag='recovered', pool=pool)
    results.update(ppl_recovered=ev_r['per_dataset'][first]['ppl'],
                   kl_recovered=ev_r['per_dataset'][first]['kl'],
                   top1_recovered=ev_r['per_dataset'][first]['top1'],
                   recover_seconds=recover_seconds)
    if items:
      results['probe_acc_recovered'] = ev_r['probes']['acc']
    for n, r in ev_r['per_dataset'].items():
      per_dataset[n].update(ppl_recovered=r['ppl'], kl_recovered=r['kl'], top1_recovered=r['top1'])
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




RESULT_COLUMNS = ('method', 'ppl_dense', 'ppl_compressed', 'kl_compressed', 'top1_compressed',
                  'probe_acc_dense', 'probe_acc_compressed', 'ppl_recovered', 'kl_recovered',
                  'top1_recovered', 'probe_acc_recovered', 'compress_seconds', 'train_seconds')
