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
import time
from typing import Any, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from compress import calibration
from experiments import common
from experiments.compress_lib import COMPRESSIONS, compress_cached, compressions
from models import llama, loading


def plain_forward_seconds(loaded: loading.LoadedModel, calib: np.ndarray, batch_size: int) -> float:
  """Wall time of a plain jitted forward (logits) over the calibration tokens."""
  cfg = loaded.config
  fwd = jax.jit(lambda p, t: llama.forward(p, t, cfg))
  fwd(loaded.params, jnp.asarray(calib[:batch_size])).block_until_ready()
  t0 = time.time()
  for i in range(0, len(calib), batch_size):
    fwd(loaded.params, jnp.asarray(calib[i:i + batch_size])).block_until_ready()
  return time.time() - t0


def run(*, methods: Sequence[str], out_dir: str, model: str = 'smollm2-135m', calib_samples: int = 64,
        calib_seqlen: int = 512, eval_data: Sequence[str] = ('python-docs', 'shakespeare'),
        eval_windows: int = 40, eval_seqlen: int = 512, other_windows: int | None = None,
        shared_stats: bool = True) -> list[dict[str, Any]]:
  configs = compressions(methods, model=model, calib_samples=calib_samples,
                         calib_seqlen=calib_seqlen)  # every bad value fails before any work
  out = pathlib.Path(out_dir)
  loaded = loading.load_model(model)
  tokenizer = loaded.tokenizer()
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
    stats = calibration.dense_statistics(loaded.params, loaded.config, calib)
    stats_seconds = time.time() - t0
  models, timings = {}, {}
  for m in tqdm(methods, desc='methods'):
    cache = out / 'models' / (common.slug(m) + ('' if shared_stats else '_propagated'))
    models[m], timings[m] = compress_cached(loaded, calib, configs[m], cache, stats=stats)
    if shared_stats:
      timings[m] = dict(timings[m], calib_forward_seconds=stats_seconds,
                        compress_seconds=stats_seconds + timings[m]['numerics_seconds'])
  if eval_windows:
    metrics = common.evaluate_models(
        loaded, models, common.windows_by_corpus(tokenizer, eval_data, eval_windows, eval_seqlen,
                                                 other_windows), items=common.probe_items(None))
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
  flags.DEFINE_list('methods', list(COMPRESSIONS), 'Rows (keys of compress_lib.COMPRESSIONS) to run.')
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
