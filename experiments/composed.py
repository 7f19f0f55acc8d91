r"""Composed recipes on SmolLM2: compression -> EoRA -> reconstruction of the adapters -> adapter
quantization, against each step alone.

  python -m experiments.composed --out_dir=results/composed

Expect ~15 min per row on 2 CPU cores (compressed models cached under ``OUT_DIR/models``).
Calibration: python-docs train, 64 x 512, dense-input statistics (as the EoRA tables); the
reconstructions use ``--recon_samples`` sequences of the same corpus (block windows, propagated
inputs, dense targets, one epoch, batch 2). Evaluation: python-docs test (in domain), shakespeare
test (out of domain), the factual probes.

Recipes per compression (every added adapter has rank ``--rank``, so the adapter ones add the same
parameters; the reconstruction of the weights adds none):

* ``none``: the compression alone.
* ``eora``: training-free compensation; ``eora, 4-bit adapters``: then quantized.
* ``reconstruct weights``: the Free Lunch paper's block reconstruction of the compressed linears.
* ``reconstruct LoRA``: block reconstruction of zero-initialised adapters of the same rank (the
  reconstruction alone, at equal added parameters).
* ``eora -> reconstruct adapters``: the EoRA adapters as the starting point of the reconstruction
  (the compressed weights fixed); ``... -> 4-bit adapters``: the whole recipe.

Compute is tokens seen x trainable parameters summed over windows; seconds are wall time on this
machine (what else ran is in ``environment``).
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable, Sequence

from absl import app, flags

from compress import calibration
from experiments import common
from experiments.compress_lib import compress_cached, compressions
from models import loading, tree
from recover import compensate
from recover import reconstruct as reconstruct_lib
from recover import train as train_lib

ROWS = ('gptq w3g64', 'wanda 2:4')
FLAGS = flags.FLAGS


def run(*, out_dir: str, rows: Sequence[str] = ROWS, rank: int = 64, adapter_bits: int = 4,
        recon_lr: float | None = None, adapter_lr: float | None = None, recon_samples: int = 64,
        model: str = 'smollm2-135m', calib_samples: int = 64, calib_seqlen: int = 512,
        eval_data: Sequence[str] = ('python-docs', 'shakespeare'), eval_windows: int = 24,
        eval_seqlen: int = 512, probes: bool = True,
        save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
  """``recon_lr``/``adapter_lr``: learning rates of the weight and the adapter reconstructions
  (default: the library's reconstruction default)."""
  configs = compressions(rows, model=model, calib_samples=calib_samples, calib_seqlen=calib_seqlen)
  default_lr = reconstruct_lib.ReconConfig().optim.lr
  recon_lr = recon_lr or default_lr
  adapter_lr = adapter_lr or default_lr
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  loaded = loading.load_model(model)
  cfg, tok = loaded.config, loaded.tokenizer()
  calib = common.calibration_for(tok, eval_data[0], calib_samples, calib_seqlen, 0)
  recon_tokens = common.calibration_for(tok, eval_data[0], recon_samples, calib_seqlen, 0)
  stats = None

  def get_stats():
    nonlocal stats
    if stats is None:
      stats = calibration.dense_statistics(loaded.params, cfg, calib)
    return stats

  windows = common.windows_by_corpus(tok, eval_data, eval_windows, eval_seqlen)
  items = common.probe_items(None) if probes else []
  results: dict[str, Any] = {'model': model, 'rank': rank, 'adapter_bits': adapter_bits,
                             'recon_lr': recon_lr, 'adapter_lr': adapter_lr,
                             'recon_tokens': f'{eval_data[0]} train {recon_samples}x{calib_seqlen}'}
  table: list[dict[str, Any]] = []

  def recon(params, train: str, lr: float):
    config = reconstruct_lib.ReconConfig(
        window='block', optim=train_lib.OptimConfig(lr=lr), train=train,
        lora_rank=rank, lora_alpha=float(rank))
    t0 = time.time()
    new, reps = reconstruct_lib.reconstruct(params, loaded.params, cfg, recon_tokens, config)
    s = reconstruct_lib.summarize(reps, tokens_per_step=config.batch_size * calib_seqlen)
    return new, {'train_compute': s['train_compute'], 'tokens_seen': s['tokens_seen'],
                 'trainable_params': s['trainable_params_max_window'],
                 'seconds': time.time() - t0}

  for r in rows:
    base = tree.strip_adapters(compress_cached(loaded, calib, configs[r],
                                               out / 'models' / common.slug(r),
                                               stats=get_stats)[0])
    info: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {'none': base}
    t0 = time.time()
    eora = compensate.compensate_tree(loaded.params, base, get_stats(),
                                      compensate.Compensator('eora', rank))
    info['eora'] = {'seconds': time.time() - t0}
    models['eora'] = eora
    models[f'eora, {adapter_bits}-bit adapters'] = compensate.quantize_adapters(eora, adapter_bits)
    models['reconstruct weights'], info['reconstruct weights'] = recon(base, 'all', recon_lr)
    models['reconstruct LoRA'], info['reconstruct LoRA'] = recon(base, 'adapters', adapter_lr)
    both, info['eora -> reconstruct adapters'] = recon(eora, 'adapters', adapter_lr)
    info['eora -> reconstruct adapters']['seconds'] += info['eora']['seconds']
    models['eora -> reconstruct adapters'] = both
    whole = f'eora -> reconstruct adapters -> {adapter_bits}-bit adapters'
    models[whole] = compensate.quantize_adapters(both, adapter_bits)
    info[whole] = info['eora -> reconstruct adapters']
    m = common.evaluate_models(loaded, models, windows, items=items)
    if not table:
      table.append({'compression': 'dense', 'recipe': '-', **m['dense']})
    for name, p in models.items():
      share = compensate.adapter_share(p)
      table.append({'compression': r, 'recipe': name, **m[name],
                    'adapter_params': compensate.adapter_params(p),
                    'adapter_share': share['adapter_share'],
                    'train_compute': info.get(name, {}).get('train_compute', 0.0),
                    'seconds': info.get(name, {}).get('seconds', 0.0)})
    results['rows'] = table
    cols = ['compression', 'recipe'] + [f'ppl {d}' for d in eval_data] + [
        f'kl {d}' for d in eval_data] + ['probe_acc', 'adapter_params', 'adapter_share',
                                         'train_compute', 'seconds']
    (out / 'composed.md').write_text(
        f'# Composed recipes (rank {rank}, {adapter_bits}-bit adapters; reconstruction lr '
        f'{recon_lr:g} for weights, {adapter_lr:g} for adapters)\n\n'
        + common.markdown_table(table, cols))
    if save:
      save(results)
  return results


def main(argv):
  del argv
  common.quiet_logs()

  def save(res):
    common.write_results(FLAGS.out_dir, res, rows=res['rows'], flags=common.flag_values(FLAGS),
                         title='Composed recipes on SmolLM2-135M')

  run(out_dir=FLAGS.out_dir, rows=FLAGS.rows, rank=FLAGS.rank, adapter_bits=FLAGS.adapter_bits,
      recon_lr=FLAGS.recon_lr, adapter_lr=FLAGS.adapter_lr, recon_samples=FLAGS.recon_samples,
      eval_windows=FLAGS.eval_windows, probes=FLAGS.probes, save=save)
  print((pathlib.Path(FLAGS.out_dir) / 'composed.md').read_text())


if __name__ == '__main__':
  flags.DEFINE_list('rows', list(ROWS), 'Compressions (keys of compress_lib.COMPRESSIONS).')
  flags.DEFINE_integer('rank', 64, 'Adapter rank of every recipe that adds adapters.')
  flags.DEFINE_integer('adapter_bits', 4, 'Bits of the quantized adapters.')
  flags.DEFINE_float('recon_lr', None, 'Learning rate of the weight reconstruction (default: '
                     "the library's).")
  flags.DEFINE_float('adapter_lr', None, 'Learning rate of the adapter reconstructions.')
  flags.DEFINE_integer('recon_samples', 64, 'Reconstruction sequences.')
  flags.DEFINE_integer('eval_windows', 24, 'Evaluation windows per corpus.')
  flags.DEFINE_bool('probes', True, 'Score the factual probes.')
  flags.DEFINE_string('out_dir', 'results/composed', 'Output directory.')
  app.run(main)
