r"""The compression table on SmolLM2: pruning and quantization methods side by side.

  python -m experiments.compress_table --out_dir=results/compress_table

Expect ~1.5-2 h on 2 CPU cores for all 14 methods with 64 x 512 calibration tokens and 2 x 40 x 512
evaluation tokens (``--methods`` picks a subset; finished methods are cached under
``OUT_DIR/models`` and skipped on a rerun). Calibration: python-docs train; evaluation: python-docs
test and shakespeare test. Columns: perplexity on both, KL to the dense model and top-1 agreement
(python-docs), factual-probe accuracy, and seconds split into calibration forward passes and
numerics; the plain jitted forward over the same calibration tokens is timed too (the floor of the
forward passes).

Published reference points (Llama-2-7B, WikiText-2, seqlen 4096 for Wanda's table): dense 5.12,
magnitude 50% 14.89, Wanda 50% 6.42, SparseGPT 50% 6.51; 2:4: magnitude 54.4, Wanda 11.02,
SparseGPT 10.17 (Sun et al. 2023, Table 3). A 135M model is far more fragile than a 7B one, so
expect much larger relative degradation here; the ordering is what carries over. Note that the
released SmolLM2 weights are Q4_1 (4-bit, group 32, asymmetric), so 4-bit RTN at group 64 is not
lossless but close, and 3-bit/2-bit are where methods separate. Groups are 64 where papers use 128:
SmolLM2's hidden size 576 is not a multiple of 128.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time
from typing import Any, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from compress import pipeline
from experiments import common
from experiments.compress_lib import CompressConfig, build_rules, build_spec
from models import checkpoint
from models import evaluate as eval_lib
from models import llama, loading

METHODS: dict[str, dict[str, Any]] = {
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


def slug(name: str) -> str:
  return ''.join(ch if ch.isalnum() else '_' for ch in name).strip('_')


def compress_cached(loaded: loading.LoadedModel, calib: np.ndarray, c: CompressConfig,
                    cache_dir: pathlib.Path, *, compensate=None, aux_tokens=None, stats=None,
                    aux_stats=None) -> tuple[Any, dict[str, Any]]:
  """Runs the pipeline once for ``c`` (or loads its saved result) and returns (params, timing).

  ``compensate``/``aux_tokens``: the pipeline's compensator and its separate recovery calibration
  tokens (:func:`compress.pipeline.compress_model`).

  ``stats``/``aux_stats``: shared dense-input statistics (:func:`compress.pipeline.dense_statistics`),
  or zero-argument callables computing them, called only on a cache miss; None runs the default
  propagated-input calibration."""
  if (cache_dir / 'structure.json').exists():
    _, params, meta = checkpoint.load_model(cache_dir)
    return params, meta.get('timing', {})
  stats = stats() if callable(stats) else stats
  aux_stats = aux_stats() if callable(aux_stats) else aux_stats
  spec = build_spec(c)
  rules = build_rules(c, spec)
  t0 = time.time()
  params, reports = pipeline.compress_model(loaded.params, loaded.config, calib, rules,
                                            batch_size=c.batch_size, compensate=compensate,
                                            aux_tokens=aux_tokens, precomputed_stats=stats, precomputed_aux_stats=aux_stats,
                                            checkpoint_dir=str(cache_dir) + '.partial')
  total = time.time() - t0
  numerics = float(sum(r.seconds for r in reports))
  recover = float(sum(r.extra.get('recover_seconds', 0.0) for r in reports))
  timing = {'compress_seconds': total, 'numerics_seconds': numerics, 'recover_seconds': recover,
            'calib_forward_seconds': total - numerics - recover,
            **pipeline.summarize(reports)}
  checkpoint.save_model(cache_dir, params, loaded.config, {'timing': timing, 'method': spec.describe()})
  shutil.rmtree(str(cache_dir) + '.partial', ignore_errors=True)  # the finished run's resume state
  return params, timing


def plain_forward_seconds(loaded: loading.LoadedModel, calib: np.ndarray, batch_size: int) -> float:
  """Wall time of a plain jitted forward (logits) over the calibration tokens."""
  cfg = loaded.config
  fwd = jax.jit(lambda p, t: llama.forward(p, t, cfg))
  fwd(loaded.params, jnp.asarray(calib[:batch_size])).block_until_ready()
  t0 = time.time()
  for i in range(0, len(calib), batch_size):
    fwd(loaded.params, jnp.asarray(calib[i:i + batch_size])).block_until_ready()
  return time.time() - t0


def evaluate_models(loaded, models: dict[str, Any], tokenizer, eval_data: Sequence[str],
                    eval_windows: int, eval_seqlen: int,
                    other_windows: int | None = None, probes: bool = True
                    ) -> dict[str, dict[str, Any]]:
  """Perplexity/KL/top-1 on each corpus and probe accuracy for every model (dense computed once).

  ``eval_windows`` windows of the first corpus, ``other_windows`` (default the same) of the others;
  ``probes=False`` skips the probes (``probe_acc`` is then None).
  """
  cfg = loaded.config
  out: dict[str, dict[str, Any]] = {name: {} for name in ['dense', *models]}
  for idx, ds in enumerate(eval_data):
    n = eval_windows if idx == 0 or other_windows is None else other_windows
    windows = common.eval_windows_for(tokenizer, ds, eval_seqlen, n)
    res = eval_lib.compare_many(loaded.params, models, cfg, windows, desc=f'eval {ds}')
    out['dense'][f'ppl {ds}'] = res['__ref__']['ppl']
    for name in models:
      out[name][f'ppl {ds}'] = res[name]['ppl']
      out[name][f'kl {ds}'] = res[name]['kl']
      out[name][f'top1 {ds}'] = res[name]['top1']
  items = common.probe_items(None) if probes else []
  for name, params in [('dense', loaded.params), *models.items()]:
    if not items:
      out[name]['probe_acc'] = None
      continue
    out[name]['probe_acc'] = eval_lib.score_multiple_choice(params, cfg, tokenizer, items,
                                                            progress=False)['acc']
  return out


def run(*, methods: Sequence[str], out_dir: str, model: str = 'smollm2-135m', calib_samples: int = 64,
        calib_seqlen: int = 512, eval_data: Sequence[str] = ('python-docs', 'shakespeare'),
        eval_windows: int = 40, eval_seqlen: int = 512, other_windows: int | None = None,
        shared_stats: bool = True) -> list[dict[str, Any]]:
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f'unknown methods {unknown}; known: {list(METHODS)}')
  out = pathlib.Path(out_dir)
  loaded = loading.load_model(model)
  tokenizer = loaded.tokenizer()
  configs = {m: CompressConfig(model=model, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                               **METHODS[m]) for m in methods}
  for c in configs.values():
    build_spec(c)  # every bad value fails before any work
  calib = common.calibration_for(tokenizer, 'python-docs', calib_samples, calib_seqlen, 0)
  timing_path = out / 'plain_forward.json'
  if timing_path.exists():
    plain = json.loads(timing_path.read_text())['seconds']
  else:
    plain = plain_forward_seconds(loaded, calib, 8)
    out.mkdir(parents=True, exist_ok=True)
    timing_path.write_text(json.dumps({'seconds': plain}))
  stats = None
  if shared_stats:
    t0 = time.time()
    stats = pipeline.dense_statistics(loaded.params, loaded.config, calib)
    stats_seconds = time.time() - t0
  models, timings = {}, {}
  for m in tqdm(methods, desc='methods'):
    cache = out / 'models' / (slug(m) + ('' if shared_stats else '_propagated'))
    models[m], timings[m] = compress_cached(loaded, calib, configs[m], cache, stats=stats)
    if shared_stats:
      timings[m] = dict(timings[m], calib_forward_seconds=stats_seconds,
                        compress_seconds=stats_seconds + timings[m]['numerics_seconds'])
  if eval_windows:
    metrics = evaluate_models(loaded, models, tokenizer, eval_data, eval_windows, eval_seqlen,
                              other_windows)
  else:  # timing only
    metrics = {name: {} for name in ['dense', *methods]}
  rows = [{'method': 'dense', **metrics['dense']}]
  for m in methods:
    t = timings[m]
    rows.append({'method': m, **metrics[m], 'seconds': t['compress_seconds'],
                 'calib_forward_s': t['calib_forward_seconds'], 'numerics_s': t['numerics_seconds'],
                 'mean_rel_error': t.get('mean_rel_error')})
  for r in rows:
    r['plain_forward_s'] = plain
    r['calibration'] = 'dense inputs, shared' if shared_stats else 'propagated'
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so modules import side-effect free)."""
  flags.DEFINE_list('methods', list(METHODS), 'Methods (keys of METHODS) to run.')
  flags.DEFINE_integer('calib_samples', 64, 'Calibration sequences.')
  flags.DEFINE_integer('calib_seqlen', 512, 'Calibration sequence length.')
  flags.DEFINE_list('eval_data', ['python-docs', 'shakespeare'], 'Evaluation corpora.')
  flags.DEFINE_integer('eval_windows', 40, 'Windows of the first corpus.')
  flags.DEFINE_integer('other_windows', None, 'Windows of the other corpora (default: eval_windows).')
  flags.DEFINE_integer('eval_seqlen', 512, 'Window length.')
  flags.DEFINE_string('out_dir', 'results/compress_table', 'Output directory.')
  flags.DEFINE_bool('shared_stats', True, 'Calibrate every method on the dense model\'s inputs '
                    'from one shared pass (fast); False: each method propagates its own inputs.')


def main(argv):
  del argv
  common.quiet_logs()
  rows = run(methods=FLAGS.methods, out_dir=FLAGS.out_dir, calib_samples=FLAGS.calib_samples,
             calib_seqlen=FLAGS.calib_seqlen, eval_data=FLAGS.eval_data,
             eval_windows=FLAGS.eval_windows, eval_seqlen=FLAGS.eval_seqlen,
             other_windows=FLAGS.other_windows, shared_stats=FLAGS.shared_stats)
  ds = FLAGS.eval_data
  cols = (['method'] + [f'ppl {d}' for d in ds] + [f'kl {ds[0]}', f'top1 {ds[0]}', 'probe_acc',
                                                     'seconds', 'calib_forward_s', 'numerics_s'])
  common.write_results(FLAGS.out_dir, {'model': 'smollm2-135m', 'calib_data': 'python-docs train',
                                        'calib_tokens': FLAGS.calib_samples * FLAGS.calib_seqlen},
                       rows=rows, columns=cols, flags=common.flag_values(flags.FLAGS),
                       title='Compression of SmolLM2-135M')
  print(common.markdown_table(rows, cols))


if __name__ == '__main__':
  define_flags()
  app.run(main)
