r"""EoRA paper tables on SmolLM2: none / ZeroQuant-V2 (SVD) / EoRA, rank sweep, adapter bits, and the
calibration domain of the eigenspace.

  python -m experiments.eora_tables --out_dir=results/eora
  python -m experiments.eora_tables --sections=tables --rank=64 --out_dir=results/eora

Expect ~1.5 h on 2 CPU cores for all sections (``--sections`` picks some; the compensated models
are cached under ``OUT_DIR/models``). Sections:

* ``tables`` (EoRA Tables 1-3): rows SparseGPT 2:4, Wanda 2:4, GPTQ w3g64, SparseGPT 2:4 + GPTQ
  w4g64; columns none / SVD / EoRA at ``--rank``; ppl on python-docs and shakespeare test, KL and
  top-1 to the dense model, probe accuracy.
* ``rank_sweep`` (EoRA Fig. 3): ranks 8..256, SVD vs EoRA, one PNG per compression. One
  compensation pass at the largest rank serves every rank: SVD and EoRA factors are ordered by
  singular value, so truncating them gives exactly the lower-rank results.
* ``adapter_bits`` (EoRA Fig. 4): 16/4/3-bit adapters at two ranks: accuracy and size overhead
  (perplexity and KL; probe accuracy too with ``--probes_in_sweeps``; the rank sweep never scores
  probes).
* ``calib_domain``: the eigenspace from python-docs (in-domain for python-docs) vs shakespeare.

Paper (Llama-3-8B, rank 128, EoRA Tables 1-3): ARC-C with SparseGPT 2:4 goes 37.4 -> 41.9 (SVD)
-> 48.5 (EoRA); GPTQ 3-bit 31.1 -> 33.1 -> 40.6; WikiText-2 ppl GPTQ 3-bit 15.6 -> 12.4 (SVD)
-> 11.1 (EoRA). Fig. 3: EoRA beats SVD at every rank, the gap largest at small ranks. Fig. 4: 4-bit
adapters lose almost nothing (-0.43 ARC-C at rank 512), 3-bit a little more.
Calibration: python-docs train, 64 x 512 (EoRA's paper uses 64-256 task sequences).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Sequence

from absl import app, flags

from compress import calibration
from experiments import common
from experiments.compress_lib import compensated, compressions
from models import tree
from models import loading
from recover import compensate

ROWS = ('sparsegpt 2:4', 'wanda 2:4', 'gptq w3g64', 'sparsegpt 2:4 + gptq w4g64')
SECTIONS = ('tables', 'rank_sweep', 'adapter_bits', 'calib_domain')
FLAGS = flags.FLAGS


def _plot_bits(path: pathlib.Path, bits_rows: Sequence[dict[str, Any]], ds: str) -> None:
  """Adapter-bits plot (EoRA Fig. 4 analogue): one panel per compression, perplexity against the
  adapters' share of the model size, one line per rank through its 3/4/16-bit points."""
  panels, labels = {}, {}
  for r in bits_rows:
    rank, bits = r['adapter'].split()
    pts = panels.setdefault(r['compression'], {}).setdefault(f'rank {rank[1:]}', ([], [], []))
    pts[0].append(100 * r['adapter_share'])
    pts[1].append(r[f'ppl {ds}'])
    pts[2].append(f'{bits[1:]}-bit')
  for comp, series in panels.items():
    for name, (xs, ys, texts) in series.items():
      order = sorted(range(len(xs)), key=lambda i: xs[i])
      series[name] = ([xs[i] for i in order], [ys[i] for i in order])
      labels.setdefault(comp, {})[name] = [texts[i] for i in order]
  common.line_plot(path, panels, xlabel='adapters, % of model bytes', ylabel=f'perplexity ({ds})',
                   point_labels=labels, suptitle='EoRA adapters quantized to 16 / 4 / 3 bits',
                   panel_size=(4.2, 3.5))


def run(*, sections: Sequence[str], out_dir: str, rows: Sequence[str], rank: int = 64,
        ranks: Sequence[int] = (8, 16, 32, 64, 128, 256), sweep_rows: Sequence[str] | None = None,
        bits_ranks: Sequence[int] = (16, 64), model: str = 'smollm2-135m', calib_samples: int = 64,
        calib_seqlen: int = 512, eval_data: Sequence[str] = ('python-docs', 'shakespeare'),
        eval_windows: int = 40, other_windows: int | None = None, sweep_windows: int = 16,
        eval_seqlen: int = 512, shared_stats: bool = True,
        probes_in_sweeps: bool = False,
        save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
  """Runs ``sections``; ``save(results)`` is called after each finished section (so a later
  failure loses nothing already measured)."""
  for s in sections:
    if s not in SECTIONS:
      raise ValueError(f'unknown section {s!r}; choose from {SECTIONS}')
  configs = compressions(rows, model=model, calib_samples=calib_samples, calib_seqlen=calib_seqlen)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  loaded = loading.load_model(model)
  tok = loaded.tokenizer()
  calib = common.calibration_for(tok, 'python-docs', calib_samples, calib_seqlen, 0)
  results: dict[str, Any] = {'model': model, 'calib': f'python-docs train {calib_samples}x{calib_seqlen}'}

  def evaluate(models, data=eval_data, n=eval_windows, other=other_windows, probes=True):
    windows = common.windows_by_corpus(tok, data, n, eval_seqlen, other)
    return common.evaluate_models(loaded, models, windows,
                                  items=common.probe_items(None) if probes else [])

  # One compensation pass at the largest rank of any section serves every section (truncation
  # is exact), so the sections can run in separate invocations on one cache.
  max_rank = max([rank, *ranks, *bits_ranks])
  stats = (functools.cache(lambda: calibration.dense_statistics(loaded.params, loaded.config, calib))
           if shared_stats else None)
  tag = '' if shared_stats else '_propagated'
  comp = {r: compensated(loaded, calib, configs[r], max_rank,
                         out / 'models' / f'{common.slug(r)}_eora{max_rank}{tag}', stats=stats)
          for r in rows}
  results['calibration'] = 'dense inputs, shared' if shared_stats else 'propagated'

  if 'tables' in sections:
    models = {}
    for r in rows:
      eora = compensate.truncate_adapters(comp[r], rank)
      base = tree.strip_adapters(eora)
      models[f'{r} | none'] = base
      models[f'{r} | svd'] = compensate.with_svd_adapters(loaded.params, base, rank)
      models[f'{r} | eora'] = eora
    metrics = evaluate(models)
    table = [{'compression': 'dense', 'recovery': '-', **metrics['dense']}]
    for name in models:
      c, rec = name.split(' | ')
      table.append({'compression': c, 'recovery': rec, **metrics[name]})
    results['tables'] = table
    cols = ['compression', 'recovery'] + [f'ppl {d}' for d in eval_data] + [
        f'kl {eval_data[0]}', f'top1 {eval_data[0]}', 'probe_acc']
    (out / 'tables.md').write_text(f'# EoRA Tables 1-3 analogue, rank {rank}\n\n' +
                                   common.markdown_table(table, cols))
    if save:
      save(results)

  if 'rank_sweep' in sections:
    sweep = []
    for r in (sweep_rows or rows):
      base = tree.strip_adapters(comp[r])
      svd = compensate.with_svd_adapters(loaded.params, base, max(ranks))  # one SVD per linear
      models = {}
      for k in ranks:
        models[f'eora r{k}'] = compensate.truncate_adapters(comp[r], k)
        models[f'svd r{k}'] = compensate.truncate_adapters(svd, k)
      models['none'] = base
      m = evaluate(models, eval_data[:1], sweep_windows, probes=False)
      ds = eval_data[0]
      for k in ranks:
        sweep.append({'compression': r, 'rank': k, 'ppl svd': m[f'svd r{k}'][f'ppl {ds}'],
                      'ppl eora': m[f'eora r{k}'][f'ppl {ds}'], 'kl svd': m[f'svd r{k}'][f'kl {ds}'],
                      'kl eora': m[f'eora r{k}'][f'kl {ds}'], 'ppl none': m['none'][f'ppl {ds}'],
                      'ppl dense': m['dense'][f'ppl {ds}']})
      rows_r = [s for s in sweep if s['compression'] == r]
      common.line_plot(
          out / f'rank_sweep_{common.slug(r)}.png',
          {f'{r}: SmolLM2, {ds} test': {
              name: (list(ranks), [s[f'ppl {key}'] for s in rows_r])
              for name, key in (('SVD', 'svd'), ('EoRA', 'eora'), ('none', 'none'),
                                ('dense', 'dense'))}},
          xlabel='adapter rank', ylabel='perplexity', xscale=('log', 2))
    results['rank_sweep'] = sweep
    (out / 'rank_sweep.md').write_text('# Rank sweep (EoRA Fig. 3 analogue)\n\n' +
                                       common.markdown_table(sweep))
    if save:
      save(results)

  if 'adapter_bits' in sections:
    bits_rows = []
    for r in rows:
      models = {}
      for k in bits_ranks:
        trunc = compensate.truncate_adapters(comp[r], k)
        for b in (16, 4, 3):
          models[f'r{k} b{b}'] = trunc if b == 16 else compensate.quantize_adapters(trunc, b)
      m = evaluate(models, eval_data[:1], sweep_windows, probes=probes_in_sweeps)
      ds = eval_data[0]
      for name, p in models.items():
        share = compensate.adapter_share(p)
        bits_rows.append({'compression': r, 'adapter': name, f'ppl {ds}': m[name][f'ppl {ds}'],
                          f'kl {ds}': m[name][f'kl {ds}'], 'adapter_share': share['adapter_share'],
                          **({'probe_acc': m[name]['probe_acc']} if probes_in_sweeps else {})})
    results['adapter_bits'] = bits_rows
    (out / 'adapter_bits.md').write_text('# Adapter quantization (EoRA Fig. 4 analogue)\n\n' +
                                         common.markdown_table(bits_rows))
    _plot_bits(out / 'adapter_bits.png', bits_rows, eval_data[0])
    if save:
      save(results)

  if 'calib_domain' in sections:
    r = rows[min(2, len(rows) - 1)]
    aux = common.calibration_for(tok, 'shakespeare', calib_samples, calib_seqlen, 1)
    aux_stats = ((lambda: calibration.dense_statistics(loaded.params, loaded.config, aux))
                 if shared_stats else None)
    ood = compensated(loaded, calib, configs[r], rank,
                      out / 'models' / f'{common.slug(r)}_eora{rank}_shakespeare{tag}', aux=aux, stats=stats,
                      aux_stats=aux_stats)
    models = {'none': tree.strip_adapters(ood),
              'eora eigenspace python-docs': compensate.truncate_adapters(comp[r], rank),
              'eora eigenspace shakespeare': ood}
    m = evaluate(models)
    dom = [{'compression': r, 'recovery': k, **v} for k, v in m.items()]
    results['calib_domain'] = dom
    (out / 'calib_domain.md').write_text(f'# EoRA eigenspace calibration domain, {r}, rank {rank}\n\n'
                                         + common.markdown_table(dom))
    if save:
      save(results)
  return results


def define_flags() -> None:
  flags.DEFINE_list('sections', list(SECTIONS), f'Sections to run: {SECTIONS}.')
  flags.DEFINE_list('rows', list(ROWS), 'Compressions (keys of compress_lib.COMPRESSIONS).')
  flags.DEFINE_integer('rank', 64, 'Rank of the tables section.')
  flags.DEFINE_list('ranks', ['8', '16', '32', '64', '128', '256'], 'Ranks of the sweep.')
  flags.DEFINE_list('sweep_rows', ['gptq w3g64', 'sparsegpt 2:4'], 'Compressions of the sweep.')
  flags.DEFINE_list('bits_ranks', ['16', '64'], 'Ranks of the adapter-bits section.')
  flags.DEFINE_integer('calib_samples', 32, 'Calibration sequences.')
  flags.DEFINE_integer('eval_windows', 40, 'Windows per corpus (tables, calib_domain).')
  flags.DEFINE_integer('other_windows', None, 'Windows of the second corpus (default eval_windows).')
  flags.DEFINE_integer('sweep_windows', 16, 'Windows (rank_sweep, adapter_bits; python-docs only).')
  flags.DEFINE_bool('shared_stats', True, 'Dense-input statistics shared by all compressions.')
  flags.DEFINE_bool('probes_in_sweeps', False, 'Also score the probes in the adapter-bits section.')
  flags.DEFINE_string('out_dir', 'results/eora', 'Output directory.')


def main(argv):
  del argv
  common.quiet_logs()

  def save(res: dict[str, Any]) -> None:
    common.write_sections(FLAGS.out_dir, res, SECTIONS, flags=common.flag_values(FLAGS),
                          title='EoRA on SmolLM2-135M')

  run(sections=FLAGS.sections, out_dir=FLAGS.out_dir, rows=FLAGS.rows, rank=FLAGS.rank,
      ranks=[int(r) for r in FLAGS.ranks], sweep_rows=FLAGS.sweep_rows,
      bits_ranks=[int(r) for r in FLAGS.bits_ranks], calib_samples=FLAGS.calib_samples,
      eval_windows=FLAGS.eval_windows, other_windows=FLAGS.other_windows,
      sweep_windows=FLAGS.sweep_windows, shared_stats=FLAGS.shared_stats,
      probes_in_sweeps=FLAGS.probes_in_sweeps, save=save)
  common.print_sections(FLAGS.out_dir, SECTIONS)


if __name__ == '__main__':
  define_flags()
  app.run(main)
