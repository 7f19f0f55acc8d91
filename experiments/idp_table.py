r"""IDP (inference-time dynamic prompting) vs LoRA on a compressed SmolLM2: accuracy, added
parameters and added latency.

  python -m experiments.idp_table --out_dir=results/idp
  python -m experiments.idp_table --model=tiny-llama --steps=4 --train_windows=4 --eval_windows=2 \
      --calib_samples=4 --calib_seqlen=64 --train_seqlen=64 --eval_seqlen=64 \
      --out_dir=/tmp/idp_smoke                         # smoke test, ~2 min

Expect ~1.5 h on 2 CPU cores with the defaults: GPTQ w3g64 on 64 x 512 python-docs tokens (~5 min,
cached under ``OUT_DIR/models``; ``--models_dir=results/compress_table/models`` reuses the
compression table's), then 2 prompts x 100 steps (batch 2 x 256 tokens), the single-prompt and
LoRA baselines with as many steps in all (200), evaluation (2 x 20 windows of 512, 247 probes,
each under 4 models) and the latency rounds.

Rows: dense, compressed, + one prompt (no routing: the "naive prompt" IDP improves on), + IDP
pool, + LoRA (through ``recover.finetune`` when it is there; otherwise the rows say why they are
missing). Prompts are trained per group of training windows: one per corpus by default
(python-docs train, shakespeare train), or ``--grouping=kmeans`` with ``--num_prompts`` clusters
of the pooled windows' routing features. Routing reads the final-norm'd hidden states of the
compressed model without a prompt (``--route_layer`` picks an earlier layer, cheaper): for
perplexity each test window is routed from itself, for the factual-recall probes each item from
its context. Columns: ppl on python-docs and shakespeare test, probe accuracy, added parameters,
and the jitted forward time of one batch (``--latency_batch`` x ``--eval_seqlen``) against the
compressed model in the same run (IDP's includes its routing pass); ``routing`` in results.json
gives, per test corpus, the share of windows routed to each prompt.

Paper (Hoang et al. 2024, "Do Compressed LLMs Forget Knowledge?", LLaMA-7B and OPT-6.7B under
GPTQ / SparseGPT compression): IDP improves accuracy by 1.24% on average over nine tasks across
knowledge domains, recovering about as much as LoRA with ~21x fewer added parameters and ~60% less
added latency. SmolLM2-135M is far smaller and its 3-bit compression far more damaging, so expect
smaller relative gains from a few prompt tokens; the parameter ratio carries over directly (a
pool of P x L x D prompt entries against a LoRA's per-layer rank-r factors).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from compress import calibration
from experiments import common
from experiments.compress_lib import compress_cached, compressions
from models import llama, loading
from recover import finetune as finetune_lib
from recover import prompting
from recover import train as train_lib

GROUPINGS = ('corpora', 'kmeans')
FLAGS = flags.FLAGS


def _lora(params, cfg, tokens: np.ndarray, *, steps: int, lr: float, rank: int, batch_size: int,
          seed: int) -> tuple[Any, str]:
  """LoRA (zero init) on the compressed model: ``(params, its config as text)``."""
  config = finetune_lib.FinetuneConfig('lora', steps, lr=lr, batch_size=batch_size, lora_rank=rank,
                                       seed=seed)
  out, _ = finetune_lib.finetune(params, cfg, tokens, config, progress=False)
  return out, repr(config)


def _latencies(fns: dict[str, Any], args: dict[str, tuple], reps: int) -> dict[str, float]:
  """Median wall time of each jitted call; the calls are interleaved round by round so that load
  from other processes hits every method alike."""
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))  # compile
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def run(*, out_dir: str, model: str = 'smollm2-135m', compression: str = 'gptq w3g64',
        models_dir: str | None = None, calib_samples: int = 64, calib_seqlen: int = 512,
        train_data: Sequence[str] = ('python-docs', 'shakespeare'), grouping: str = 'corpora',
        num_prompts: int | None = None, train_windows: int = 64, train_seqlen: int = 256,
        prompt_len: int = 8, steps: int = 100, batch_size: int = 2, lr: float = 1e-3,
        route_layer: int | None = None, single_prompt: bool = True, lora: bool = True,
        lora_rank: int = 16, lora_lr: float = 1e-4,
        eval_data: Sequence[str] = ('python-docs', 'shakespeare'), eval_windows: int = 20,
        eval_seqlen: int = 512, probes: str | None = None, latency_batch: int = 4,
        latency_reps: int = 5, seed: int = 0) -> dict[str, Any]:
  if grouping not in GROUPINGS:
    raise ValueError(f'--grouping={grouping!r}; choose from {GROUPINGS}')
  n_prompts = len(train_data) if grouping == 'corpora' else (num_prompts or len(train_data))
  if grouping == 'corpora' and num_prompts not in (None, len(train_data)):
    raise ValueError(f'--num_prompts={num_prompts}: with --grouping=corpora there is one prompt '
                     f'per training corpus ({len(train_data)})')
  idp_config = prompting.IDPConfig(num_prompts=n_prompts, prompt_len=prompt_len, steps=steps,
                                   batch_size=batch_size, lr=lr, seed=seed, route_layer=route_layer)
  c = compressions([compression], model=model, calib_samples=calib_samples,
                   calib_seqlen=calib_seqlen)[compression]  # bad values fail before any work
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  loaded = loading.load_model(model)
  cfg, tok = loaded.config, loaded.tokenizer()
  results: dict[str, Any] = {'model': model, 'compression': compression,
                             'calib': f'python-docs train {calib_samples}x{calib_seqlen}',
                             'idp_config': dataclasses.asdict(idp_config), 'grouping': grouping}

  # Compress (cached).
  calib = common.calibration_for(tok, 'python-docs', calib_samples, calib_seqlen, 0)
  cache = pathlib.Path(models_dir) if models_dir else out / 'models'
  compressed, timing = compress_cached(
      loaded, calib, c, cache / common.slug(compression),
      stats=lambda: calibration.dense_statistics(loaded.params, cfg, calib))  # only on a cache miss
  results['compress_numerics_seconds'] = timing.get('numerics_seconds')

  # Training windows: one group per corpus, or k-means groups of the pooled windows.
  corpus_windows = [common.calibration_for(tok, d, train_windows, train_seqlen, seed + 1 + i)
                    for i, d in enumerate(train_data)]
  pooled = np.concatenate(corpus_windows)
  if grouping == 'corpora':
    groups = corpus_windows
  else:
    groups = prompting.cluster_groups(compressed, cfg, pooled, n_prompts, seed, layer=route_layer)
  results['group_sizes'] = [len(g) for g in groups]

  pool, info = prompting.train_pool(compressed, cfg, groups, idp_config)
  results['idp_train'] = {k: info[k] for k in ('loss_first', 'loss_last', 'seconds')}
  variants: dict[str, dict[str, Any]] = {'idp pool': {'pool': pool, 'seconds': info['seconds']}}
  if single_prompt:
    one = dataclasses.replace(idp_config, num_prompts=1, steps=steps * n_prompts)
    single, sinfo = prompting.train_pool(compressed, cfg, [pooled], one)
    results['single_train'] = {k: sinfo[k] for k in ('loss_first', 'loss_last', 'seconds')}
    variants['one prompt'] = {'pool': single, 'seconds': sinfo['seconds']}
  lora_params, lora_note, lora_seconds = None, 'LoRA not requested (--nolora)', None
  if lora:
    t0 = time.time()
    lora_params, lora_note = _lora(compressed, cfg, pooled, steps=steps * n_prompts, lr=lora_lr,
                                   rank=lora_rank, batch_size=batch_size, seed=seed)
    lora_seconds = time.time() - t0
  results['lora'] = lora_note
  if lora_params is None:
    print(f'note: {lora_note}')

  # Evaluation: perplexity per test corpus, probes; IDP routes each window / item context.
  items = common.probe_items(probes)
  windows = common.windows_by_corpus(tok, eval_data, eval_windows, eval_seqlen)
  models = {'compressed': compressed, **{name: compressed for name in variants}}
  if lora_params is not None:
    models['lora'] = lora_params
  metrics = common.evaluate_models(loaded, models, windows, items=items,
                                   pools={name: v['pool'] for name, v in variants.items()})
  rows = {name: {'method': name, **{k: v for k, v in m.items() if k.startswith(('ppl', 'probe'))}}
          for name, m in metrics.items()}
  # How the pool routes the test windows of each corpus and the probe contexts.
  idp_pool = variants['idp pool']['pool']
  share = lambda idx: np.bincount(idx, minlength=n_prompts) / len(idx)  # noqa: E731
  routing = {ds: share(prompting.route_inputs(compressed, cfg, idp_pool, win))
             for ds, win in windows.items()}
  results['routing'] = {ds: r.tolist() for ds, r in routing.items()}
  if grouping == 'corpora':
    hits = [routing[d][train_data.index(d)] for d in eval_data if d in train_data]
    results['route_acc'] = float(np.mean(hits)) if hits else None
  if items:
    ctx_tokens, ctx_mask = prompting.context_tokens(tok, items)
    results['probe_routing'] = share(prompting.route_inputs(
        compressed, cfg, idp_pool, ctx_tokens, mask=ctx_mask)).tolist()
  first_windows = windows[eval_data[0]]

  # Added parameters and latency (one batch of the first corpus's test windows).
  base_count = train_lib.count_params(compressed)
  rows['dense']['added_params'] = rows['compressed']['added_params'] = 0
  for name, v in variants.items():
    rows[name]['added_params'] = prompting.added_parameters(v['pool'])
    rows[name]['train_s'] = v['seconds']
  if lora_params is not None:
    rows['lora']['added_params'] = train_lib.count_params(lora_params) - base_count
    rows['lora']['train_s'] = lora_seconds
  batch = jnp.asarray(np.resize(first_windows, (latency_batch, eval_seqlen)))
  plain = jax.jit(lambda p, t: llama.forward(p, t, cfg))
  pooled_fwd = jax.jit(lambda p, pl, t: prompting.forward_with_pool(p, cfg, pl, t))
  fns = {'compressed': plain, **{name: pooled_fwd for name in variants}}
  args = {'compressed': (compressed, batch), **{n: (compressed, v['pool'], batch)
                                               for n, v in variants.items()}}
  if lora_params is not None:
    fns['lora'], args['lora'] = plain, (lora_params, batch)
  lat = _latencies(fns, args, latency_reps)
  for name, seconds in lat.items():
    rows[name]['latency_s'] = seconds
    rows[name]['latency_x'] = seconds / lat['compressed']
  if lora_params is not None:
    idp_added = lat['idp pool'] - lat['compressed']
    lora_added = lat['lora'] - lat['compressed']
    results['idp_vs_lora'] = {
        'params_ratio': rows['lora']['added_params'] / rows['idp pool']['added_params'],
        'added_latency_ratio': idp_added / lora_added if lora_added > 0 else None}
  results['latency_batch'] = f'{latency_batch} x {eval_seqlen} tokens, median of {latency_reps}'
  results['table'] = list(rows.values())
  return results


def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so modules import side-effect free)."""
  flags.DEFINE_string('model', 'smollm2-135m', 'Model name (smollm2-135m, tiny-llama) or path.')
  flags.DEFINE_string('compression', 'gptq w3g64', 'Compression (a key of compress_lib.COMPRESSIONS).')
  flags.DEFINE_string('models_dir', None, 'Cache of compressed models (default OUT_DIR/models).')
  flags.DEFINE_integer('calib_samples', 64, 'Calibration sequences (python-docs train).')
  flags.DEFINE_integer('calib_seqlen', 512, 'Calibration sequence length.')
  flags.DEFINE_list('train_data', ['python-docs', 'shakespeare'], 'Prompt training corpora.')
  flags.DEFINE_enum('grouping', 'corpora', GROUPINGS, 'One prompt per corpus, or k-means groups.')
  flags.DEFINE_integer('num_prompts', None, 'Prompts with --grouping=kmeans (default: #corpora).')
  flags.DEFINE_integer('train_windows', 64, 'Training windows per corpus.')
  flags.DEFINE_integer('train_seqlen', 256, 'Training window length.')
  flags.DEFINE_integer('prompt_len', 8, 'Soft-prompt tokens per prompt.')
  flags.DEFINE_integer('steps', 100, 'AdamW steps per prompt (the baselines get steps x prompts).')
  flags.DEFINE_integer('batch_size', 2, 'Training batch size.')
  flags.DEFINE_float('lr', 1e-3, 'Prompt learning rate.')
  flags.DEFINE_integer('route_layer', None, 'Routing feature layer (default: final norm).')
  flags.DEFINE_bool('single_prompt', True, 'Also train one prompt on all windows (no routing).')
  flags.DEFINE_bool('lora', True, 'Also fine-tune LoRA through recover.finetune, if present.')
  flags.DEFINE_integer('lora_rank', 16, 'LoRA rank.')
  flags.DEFINE_float('lora_lr', 1e-4, 'LoRA learning rate.')
  flags.DEFINE_list('eval_data', ['python-docs', 'shakespeare'], 'Evaluation corpora (test).')
  flags.DEFINE_integer('eval_windows', 20, 'Test windows per corpus.')
  flags.DEFINE_integer('eval_seqlen', 512, 'Test window length.')
  flags.DEFINE_string('probes', None, "Multiple-choice jsonl (default: shipped probes; 'none').")
  flags.DEFINE_integer('latency_batch', 4, 'Windows per timed forward batch.')
  flags.DEFINE_integer('latency_reps', 5, 'Timed repetitions (median).')
  flags.DEFINE_integer('seed', 0, 'Seed of training windows, prompts and batches.')
  flags.DEFINE_string('out_dir', 'results/idp', 'Output directory.')


def main(argv):
  del argv
  common.quiet_logs()
  res = run(out_dir=FLAGS.out_dir, model=FLAGS.model, compression=FLAGS.compression,
            models_dir=FLAGS.models_dir, calib_samples=FLAGS.calib_samples,
            calib_seqlen=FLAGS.calib_seqlen, train_data=FLAGS.train_data, grouping=FLAGS.grouping,
            num_prompts=FLAGS.num_prompts, train_windows=FLAGS.train_windows,
            train_seqlen=FLAGS.train_seqlen, prompt_len=FLAGS.prompt_len, steps=FLAGS.steps,
            batch_size=FLAGS.batch_size, lr=FLAGS.lr, route_layer=FLAGS.route_layer,
            single_prompt=FLAGS.single_prompt, lora=FLAGS.lora, lora_rank=FLAGS.lora_rank,
            lora_lr=FLAGS.lora_lr, eval_data=FLAGS.eval_data, eval_windows=FLAGS.eval_windows,
            eval_seqlen=FLAGS.eval_seqlen, probes=FLAGS.probes, latency_batch=FLAGS.latency_batch,
            latency_reps=FLAGS.latency_reps, seed=FLAGS.seed)
  cols = (['method', 'added_params'] + [f'ppl {d}' for d in FLAGS.eval_data] +
          ['probe_acc', 'latency_s', 'latency_x', 'train_s'])
  table = res.pop('table')
  common.write_results(FLAGS.out_dir, res, rows=table, columns=cols,
                       flags=common.flag_values(FLAGS),
                       title=f'IDP vs LoRA on {FLAGS.model}, {FLAGS.compression}')
  print(common.markdown_table(table, cols))
  print(f"LoRA: {res['lora']}")
  print(f"routing (share of test windows per prompt): {res['routing']}")


if __name__ == '__main__':
  define_flags()
  app.run(main)
