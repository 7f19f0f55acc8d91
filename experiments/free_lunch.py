r"""Free Lunch tables on SmolLM2: pruning criterion x block reconstruction, the window ablation, and
reconstruction against global retraining (quality against compute).

  python -m experiments.free_lunch --out_dir=results/free_lunch
  python -m experiments.free_lunch --sections=windows --window_row='wanda 50%' --out_dir=results/free_lunch

Expect ~1.5 h on 2 CPU cores with the defaults (16 x 512 reconstruction sequences, lr 3e-4; each
block-window run of the 30 blocks takes ~4 min, a matrix-window run ~10 min, a global step ~10 s).
Compressed models are cached under ``--models_dir`` (shared with ``experiments.compress_table``)
and reconstructed ones under ``OUT_DIR/models``. Sections:

* ``criteria``: magnitude / Wanda / SparseGPT at 50% and 2:4, without and with block
  reconstruction: ppl on python-docs and shakespeare test, KL and top-1 to the dense model, probe
  accuracy, reconstruction seconds.
* ``windows``: one compression reconstructed with matrix / submodule / block / blocks:2 / blocks:4
  windows: ppl, seconds, trainable parameters per window and the compiled training loop's memory.
* ``global``: the same compression with masked full fine-tuning (language-modelling loss) at
  several step budgets against block reconstruction: ppl against compute (tokens x trainable
  parameters) and against wall time, as a plot.

Paper (Wagner et al. 2025, Llama/OPT, 50% and 2:4, 128 C4 x 2048 tokens, lr 1e-5, one epoch): any
window containing a nonlinear submodule gives about the same final perplexity, matrix-wise windows
are clearly worse; with reconstruction Wanda catches up with SparseGPT (e.g. Llama-2-7B 2:4: Wanda
~11 -> ~8.3, SparseGPT ~10.8 -> ~8.3 WikiText ppl); reconstruction matches global retraining at more
than 10x less compute. Our budget is smaller (16 x 512 tokens per window), hence the larger lr.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Sequence

from absl import app, flags
import numpy as np

from compress import calibration
from experiments import common
from experiments.compress_lib import COMPRESSIONS, compress_cached, compressions
from models import loading
from recover import reconstruct as rec
from recover import train

# The pruning rows of the compression table (same settings, same cached models).
ROWS = tuple(k for k, v in COMPRESSIONS.items() if 'prune' in v and 'quant' not in v)
SECTIONS = ('criteria', 'windows', 'global')
WINDOWS = ('matrix', 'submodule', 'block', 'blocks:2', 'blocks:4')
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Setup:
  loaded: Any
  tokenizer: Any
  calib: np.ndarray
  recon_tokens: np.ndarray
  models_dir: pathlib.Path
  out: pathlib.Path
  stats: Any = None

  def compressed(self, row: str):
    """The compressed model of ``row`` (cached; shared dense-input statistics)."""
    if self.stats is None:  # computed once, on the first cache miss
      self.stats = functools.cache(lambda: calibration.dense_statistics(
          self.loaded.params, self.loaded.config, self.calib))
    c = compressions([row], calib_samples=len(self.calib), calib_seqlen=self.calib.shape[1])[row]
    return compress_cached(self.loaded, self.calib, c, self.models_dir / common.slug(row),
                           stats=self.stats)[0]


def reconstructed(s: Setup, row: str, config: rec.ReconConfig) -> tuple[Any, dict[str, Any]]:
  """``row`` reconstructed with ``config`` (cached with its report; resumable)."""
  cache = s.out / 'models' / f'{common.slug(row)}_recon_{common.slug(config.window)}'

  def compute():
    params, reports = rec.reconstruct(s.compressed(row), s.loaded.params, s.loaded.config,
                                      s.recon_tokens, config,
                                      checkpoint_dir=common.partial_dir(cache), measure_memory=True)
    summary = rec.summarize(reports, tokens_per_step=config.batch_size * s.recon_tokens.shape[1])
    return params, {'recon': {**summary, 'window': config.window}}
  params, meta = common.cached_model(cache, s.loaded, compute,
                                     key=common.cache_key('reconstruct', row, config, s.calib,
                                                         s.recon_tokens))
  return params, meta['recon']


def global_retrained(s: Setup, row: str, steps: int, lr: float, seed: int) -> tuple[Any, dict]:
  """Masked full fine-tuning of ``row`` for ``steps`` steps (cached)."""
  from recover import finetune  # pylint: disable=g-import-not-at-top
  cache = s.out / 'models' / f'{common.slug(row)}_global_{steps}'

  def compute():
    params, info = finetune.finetune(
        s.compressed(row), s.loaded.config, s.recon_tokens,
        finetune.FinetuneConfig(method='global', steps=steps, lr=lr, seed=seed),
        dense_params=s.loaded.params)
    return params, {'global': {k: v for k, v in info.items() if k != 'losses'}}
  params, meta = common.cached_model(
      cache, s.loaded, compute, key=common.cache_key('global', row, steps, lr, seed, s.calib,
                                           s.recon_tokens))
  return params, meta['global']


def run(*, sections: Sequence[str], out_dir: str, rows: Sequence[str] = tuple(ROWS),
        window_row: str = 'wanda 50%', windows: Sequence[str] = WINDOWS,
        global_steps: Sequence[int] = (8, 32, 96), global_lr: float = 3e-5,
        model: str = 'smollm2-135m', calib_samples: int = 32, calib_seqlen: int = 512,
        recon_samples: int = 16, recon_lr: float = 3e-4, recon_epochs: float = 1.0,
        eval_data: Sequence[str] = ('python-docs', 'shakespeare'), eval_windows: int = 10,
        other_windows: int | None = 5, eval_seqlen: int = 512, models_dir: str | None = None,
        seed: int = 0) -> dict[str, Any]:
  for sec in sections:
    if sec not in SECTIONS:
      raise ValueError(f'unknown section {sec!r}; choose from {SECTIONS}')
  for r in [*rows, window_row]:
    if r not in ROWS:
      raise ValueError(f'unknown row {r!r}; choose from {list(ROWS)}')
  compressions([*rows, window_row])  # every bad value fails before any work
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  loaded = loading.load_model(model)
  tok = loaded.tokenizer()
  s = Setup(loaded, tok, common.calibration_for(tok, 'python-docs', calib_samples, calib_seqlen, seed),
            common.calibration_for(tok, 'python-docs', recon_samples, calib_seqlen, seed),
            pathlib.Path(models_dir) if models_dir else out / 'models', out)
  base_config = rec.ReconConfig(window='block', epochs=recon_epochs,
                                optim=train.OptimConfig(lr=recon_lr), seed=seed)
  results: dict[str, Any] = {
      'model': model, 'calib': f'python-docs train {calib_samples}x{calib_seqlen} (dense stats)',
      'recon': f'python-docs train {recon_samples}x{calib_seqlen}, lr {recon_lr}, '
               f'{recon_epochs} epoch(s), batch {base_config.batch_size}'}

  def evaluate(models, data=eval_data, probes=True):
    windows = common.windows_by_corpus(tok, data, eval_windows, eval_seqlen, other_windows)
    return common.evaluate_models(loaded, models, windows,
                                  items=common.probe_items(None) if probes else [])

  ds = eval_data[0]

  if 'criteria' in sections:
    models, infos = {}, {}
    for r in rows:
      models[f'{r} | none'] = s.compressed(r)
      models[f'{r} | block'], infos[r] = reconstructed(s, r, base_config)
    m = evaluate(models)
    table = [{'compression': 'dense', 'reconstruction': '-', **m['dense']}]
    for name, v in m.items():
      if name == 'dense':
        continue
      r, how = name.split(' | ')
      extra = {'train_s': infos[r]['train_seconds']} if how == 'block' else {}
      table.append({'compression': r, 'reconstruction': how, **v, **extra})
    results['criteria'] = table
    cols = ['compression', 'reconstruction'] + [f'ppl {d}' for d in eval_data] + [
        f'kl {ds}', f'top1 {ds}', 'probe_acc', 'train_s']
    (out / 'criteria.md').write_text('# Criterion x block reconstruction\n\n' +
                                     common.markdown_table(table, cols))

  if 'windows' in sections:
    models, infos = {'none': s.compressed(window_row)}, {}
    for w in windows:
      models[w], infos[w] = reconstructed(s, window_row, dataclasses.replace(base_config, window=w))
    m = evaluate(models, eval_data[:1])
    table = []
    for name, v in m.items():
      i = infos.get(name, {})
      table.append({'window': name, f'ppl {ds}': v[f'ppl {ds}'], f'kl {ds}': v.get(f'kl {ds}'),
                    'probe_acc': v['probe_acc'], 'windows': i.get('windows'),
                    'train_s': i.get('train_seconds'),
                    'trainable_per_window': i.get('trainable_params_max_window'),
                    'loop_MiB': (i['peak_loop_bytes'] / 2 ** 20) if i.get('peak_loop_bytes') else None,
                    'loss_before': i.get('mean_loss_before'), 'loss_after': i.get('mean_loss_after')})
    results['windows'] = table
    (out / 'windows.md').write_text(f'# Window ablation, {window_row}\n\n' +
                                    common.markdown_table(table))

  if 'global' in sections:
    models = {'none': s.compressed(window_row)}
    models['block recon'], block_info = reconstructed(s, window_row, base_config)
    g_infos = {}
    for n in global_steps:
      models[f'global {n}'], g_infos[n] = global_retrained(s, window_row, n, global_lr, seed)
    m = evaluate(models, eval_data[:1], probes=False)  # the table has no probe column
    table = [{'method': 'dense', f'ppl {ds}': m['dense'][f'ppl {ds}']},
             {'method': 'none', f'ppl {ds}': m['none'][f'ppl {ds}'], f'kl {ds}': m['none'][f'kl {ds}']}]
    table.append({'method': 'block reconstruction', f'ppl {ds}': m['block recon'][f'ppl {ds}'],
                  f'kl {ds}': m['block recon'][f'kl {ds}'], 'tokens_seen': block_info['tokens_seen'],
                  'train_compute': block_info['train_compute'],
                  'train_s': block_info['train_seconds']})
    for n in global_steps:
      g = g_infos[n]
      table.append({'method': f'global retraining, {n} steps', f'ppl {ds}': m[f'global {n}'][f'ppl {ds}'],
                    f'kl {ds}': m[f'global {n}'][f'kl {ds}'], 'tokens_seen': g['tokens_seen'],
                    'train_compute': g['train_compute'], 'train_s': g['train_seconds']})
    results['global'] = table
    (out / 'global.md').write_text(f'# Reconstruction vs global retraining, {window_row}\n\n' +
                                   common.markdown_table(table))
    gl = [r for r in table if r['method'].startswith('global')]
    hl = {'dense': m['dense'][f'ppl {ds}'], 'no recovery': m['none'][f'ppl {ds}']}
    for key, label, fname in (('train_compute', 'compute (tokens x trainable params)', 'global_compute.png'),
                              ('train_s', 'wall time (s, 2 CPU cores)', 'global_time.png')):
      common.line_plot(
          out / fname, {f'{window_row}: reconstruction vs global retraining': {
              'global retraining': ([r[key] for r in gl], [r[f'ppl {ds}'] for r in gl]),
              'block reconstruction': ([table[2][key]], [table[2][f'ppl {ds}']])}},
          xlabel=label, ylabel='perplexity (python-docs test)', xscale='log',
          hlines={f'{window_row}: reconstruction vs global retraining': hl},
          panel_size=(5.5, 3.8))
  return results


def define_flags() -> None:
  flags.DEFINE_list('sections', list(SECTIONS), f'Sections to run: {SECTIONS}.')
  flags.DEFINE_list('rows', list(ROWS), 'Compressions of the criteria section.')
  flags.DEFINE_string('window_row', 'wanda 50%', 'Compression of the windows and global sections.')
  flags.DEFINE_list('windows', list(WINDOWS), 'Windows of the ablation.')
  flags.DEFINE_list('global_steps', ['8', '32', '96'], 'Step budgets of global retraining.')
  flags.DEFINE_float('global_lr', 3e-5, 'Global retraining learning rate.')
  flags.DEFINE_integer('calib_samples', 32, 'Compression calibration sequences.')
  flags.DEFINE_integer('recon_samples', 16, 'Reconstruction sequences (batch 2, one epoch).')
  flags.DEFINE_float('recon_lr', 3e-4, 'Reconstruction learning rate.')
  flags.DEFINE_float('recon_epochs', 1.0, 'Reconstruction epochs per window.')
  flags.DEFINE_integer('eval_windows', 10, 'python-docs test windows.')
  flags.DEFINE_integer('other_windows', 5, 'shakespeare test windows.')
  flags.DEFINE_string('models_dir', 'results/compress_table/models',
                      'Cache of compressed models (shared with experiments.compress_table).')
  flags.DEFINE_string('out_dir', 'results/free_lunch', 'Output directory.')


def main(argv):
  del argv
  common.quiet_logs()
  res = run(sections=FLAGS.sections, out_dir=FLAGS.out_dir, rows=FLAGS.rows,
            window_row=FLAGS.window_row, windows=FLAGS.windows,
            global_steps=[int(n) for n in FLAGS.global_steps], global_lr=FLAGS.global_lr,
            calib_samples=FLAGS.calib_samples, recon_samples=FLAGS.recon_samples,
            recon_lr=FLAGS.recon_lr, recon_epochs=FLAGS.recon_epochs,
            eval_windows=FLAGS.eval_windows, other_windows=FLAGS.other_windows,
            models_dir=FLAGS.models_dir)
  common.write_sections(FLAGS.out_dir, res, SECTIONS, flags=common.flag_values(FLAGS),
                        title='Free Lunch reconstruction on SmolLM2-135M')
  common.print_sections(FLAGS.out_dir, SECTIONS)


if __name__ == '__main__':
  define_flags()
  app.run(main)
