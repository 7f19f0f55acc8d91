r"""EoRA that keeps its gain out of domain, and one rank budget for the whole model (SmolLM2).

  python -m experiments.eora_robust --sections=shrink --out_dir=results/eora_robust
  python -m experiments.eora_robust --sections=budget --shrink=0.1 --out_dir=results/eora_robust

Expect ~40 min (``shrink``) and ~15 min (``budget``) on 2 CPU cores; the compressed models are
cached under ``OUT_DIR/models``. Calibration: python-docs train, 64 x 512, dense-input statistics
(the EoRA tables' setting), split into two halves for the held-out choice. Evaluation: python-docs
test (in domain) and shakespeare test (out of domain).

* ``shrink``: robust EoRA, the eigenspace of ``H + lambda * tr(H) / d * I``, for each ``lambda`` of
  ``--lambdas`` on every row, beside plain SVD (``lambda -> inf``) and EoRA (``lambda = 0``), and
  ``auto``: ``lambda`` chosen per layer on the held-out half of the calibration data
  (:func:`recover.lowrank.choose_shrink`; fitted on one half, scored on the other, the chosen
  value then fitted on all). Goal: in-domain perplexity within 2% of EoRA's, out of domain never
  worse than SVD's. One PNG per row: perplexity against ``lambda`` in both domains.
* ``budget``: uniform rank ``--rank`` against one model-wide budget of the same adapter parameters
  (:mod:`recover.budget`; EoRA at ``--shrink``, computed at ``--max_rank`` and cut), weighting the
  layers' errors ``absolute`` or ``relative``: perplexity and KL in and out of domain, probes.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, Sequence

from absl import app, flags
import numpy as np

from compress import calibration
from experiments import common
from experiments.compress_lib import compress_cached, compressions
from kernels import formats
from models import llama, loading, tree
from recover import budget as budget_lib
from recover import compensate, lowrank

ROWS = ('sparsegpt 2:4', 'wanda 2:4', 'gptq w3g64', 'sparsegpt 2:4 + gptq w4g64')
SECTIONS = ('shrink', 'budget')
LAMBDAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
AUTO_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
FLAGS = flags.FLAGS


def merged_stats(a, b):
  """Per-block statistics of the union of two calibration halves."""
  return [None if x is None else {k: calibration.merge_stats(x[k], y[k]) for k in x}
          for x, y in zip(a, b)]


def heldout_eora(dense, compressed, fit, val, full, rank: int, grid: Sequence[float]
                 ) -> tuple[Any, dict[str, float]]:
  """EoRA with ``lambda`` chosen per linear on held-out statistics: fitted on ``fit``, scored on
  ``val``, the chosen value refitted on ``full`` (per-block statistics). Returns the model and
  the chosen values."""
  leaves, chosen = {}, {}
  bases: dict[tuple[int, str], Any] = {}
  for path, leaf in tree.linear_leaves(compressed).items():
    i, lin = tree.split_path(path)
    key = llama.input_key(lin)
    if (i, key) not in bases:
      name = f'layers/{i}/{key}'
      bases = {(i, key): (lowrank.eigen_basis(fit[i][key].hessian, name=name,
                                              num_tokens=int(fit[i][key].num_tokens)),
                          lowrank.eigen_basis(full[i][key].hessian, name=name,
                                              num_tokens=int(full[i][key].num_tokens)))}
    b_fit, b_full = bases[(i, key)]
    w = np.asarray(tree.get_linear(dense['layers'][i], lin), np.float32)
    leaf = tree.strip_adapter(leaf)
    delta = w - np.asarray(formats.to_dense(leaf), np.float32)
    r = min(rank, *delta.shape)
    lam, _ = lowrank.choose_shrink(delta, b_fit, val[i][key].hessian, r, grid, path)
    chosen[path] = lam
    adapter = lowrank.eora_from_basis(delta, lowrank.shrunk_basis(b_full, lam), r, path)
    leaves[path] = dataclasses.replace(leaf, adapter=adapter)
  return tree.replace_leaves(compressed, leaves), chosen


def _plot_shrink(path: pathlib.Path, rows: Sequence[dict[str, Any]], row: str,
                 eval_data: Sequence[str]) -> None:
  pts = [r for r in rows if r['compression'] == row and r['recovery'].startswith('eora lambda=')]
  lams = [r['lambda'] for r in pts]
  ref = {r['recovery']: r for r in rows if r['compression'] == row}
  panels, hlines = {}, {}
  for ds in eval_data:
    # log axis: lambda = 0 (EoRA) is drawn at a tenth of the smallest positive value
    xs = [x if x > 0 else min(v for v in lams if v > 0) / 10 for x in lams]
    title = f'{row}: {ds} ({"in" if ds == eval_data[0] else "out of"} domain)'
    panels[title] = {'robust EoRA': (xs, [r[f'ppl {ds}'] for r in pts])}
    hlines[title] = {'SVD': ref['svd'][f'ppl {ds}'], 'none': ref['none'][f'ppl {ds}']} if (
        'none' in ref) else {'SVD': ref['svd'][f'ppl {ds}']}
    if 'auto' in ref:
      hlines[title]['auto (held-out)'] = ref['auto'][f'ppl {ds}']
  common.line_plot(path, panels, xlabel='lambda (lambda = 0 drawn at the left end)',
                   ylabel='perplexity', xscale='log', hlines=hlines,
                   suptitle='EoRA with H + lambda tr(H)/d I, calibrated on python-docs')


def run(*, sections: Sequence[str], out_dir: str, rows: Sequence[str] = ROWS, rank: int = 64,
        lambdas: Sequence[float] = LAMBDAS, auto_grid: Sequence[float] = AUTO_GRID,
        shrink: float = 0.0, max_rank: int = 256, model: str = 'smollm2-135m',
        calib_samples: int = 64, calib_seqlen: int = 512,
        eval_data: Sequence[str] = ('python-docs', 'shakespeare'), eval_windows: int = 24,
        eval_seqlen: int = 512, probes: bool = True,
        save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
  for s in sections:
    if s not in SECTIONS:
      raise ValueError(f'unknown section {s!r}; choose from {SECTIONS}')
  if calib_samples < 2:
    raise ValueError('--calib_samples must be at least 2 (two halves for the held-out choice)')
  for lam in [*lambdas, *auto_grid, shrink]:
    lowrank.check_shrink(lam)
  configs = compressions(rows, model=model, calib_samples=calib_samples, calib_seqlen=calib_seqlen)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  loaded = loading.load_model(model)
  tok = loaded.tokenizer()
  calib = common.calibration_for(tok, eval_data[0], calib_samples, calib_seqlen, 0)
  half = calib_samples // 2
  results: dict[str, Any] = {'model': model, 'rank': rank,
                             'calib': f'{eval_data[0]} train {calib_samples}x{calib_seqlen}, '
                                      'dense-input statistics'}

  @functools.cache
  def halves():
    t0 = time.time()
    a = calibration.dense_statistics(loaded.params, loaded.config, calib[:half])
    b = calibration.dense_statistics(loaded.params, loaded.config, calib[half:])
    results['statistics_seconds'] = time.time() - t0
    return a, b, merged_stats(a, b)

  base = {r: tree.strip_adapters(compress_cached(
      loaded, calib, configs[r], out / 'models' / common.slug(r),
      stats=lambda: halves()[2])[0]) for r in rows}
  windows = common.windows_by_corpus(tok, eval_data, eval_windows, eval_seqlen)
  items = common.probe_items(None) if probes else []

  if 'shrink' in sections:
    fit, val, full = halves()
    table = []
    cache: dict[Any, Any] = {}  # one eigendecomposition per input for every row and lambda
    for r in rows:
      models = {'none': base[r],
                'svd': compensate.with_svd_adapters(loaded.params, base[r], rank)}
      seconds = {}
      for lam in lambdas:
        t0 = time.time()
        models[f'eora lambda={lam:g}'] = compensate.compensate_tree(
            loaded.params, base[r], full,
            compensate.Compensator('eora', rank, shrink=lam, basis_cache=cache))
        seconds[f'eora lambda={lam:g}'] = time.time() - t0
      chosen = None
      if auto_grid:  # an empty grid skips the held-out choice
        t0 = time.time()
        models['auto'], chosen = heldout_eora(loaded.params, base[r], fit, val, full, rank,
                                              auto_grid)
        seconds['auto'] = time.time() - t0
      m = common.evaluate_models(loaded, models, windows)
      for name in models:
        row = {'compression': r, 'recovery': name, **{k: v for k, v in m[name].items()
                                                      if not k.startswith('top1')}}
        if name.startswith('eora lambda='):
          row['lambda'] = float(name.split('=')[1])
        if name in seconds:
          row['compensate_s'] = seconds[name]
        if name == 'auto':
          vals = np.array(list(chosen.values()))
          row['lambda'] = float(np.median(vals))
          row['auto_lambda_counts'] = {f'{g:g}': int(np.sum(vals == g)) for g in auto_grid}
        table.append(row)
      dense_row = {'compression': 'dense', 'recovery': '-', **m['dense']}
      if not any(t['compression'] == 'dense' for t in table):
        table.insert(0, dense_row)
      _plot_shrink(out / f'shrink_{common.slug(r)}.png', table, r, eval_data)
      results['shrink'] = table
      results['shrink_goal'] = _goal(table, rows, eval_data)
      _write(out, 'shrink', table, eval_data, rank, results['shrink_goal'])
      if save:
        save(results)

  if 'budget' in sections:
    _, _, full = halves()
    energies = budget_lib.output_energies(loaded.params, full)
    table = []
    cache = {}
    for r in rows:
      t0 = time.time()
      big = compensate.compensate_tree(loaded.params, base[r], full,
                                       compensate.Compensator('eora', max_rank, shrink=shrink,
                                                              basis_cache=cache))
      comp_s = time.time() - t0
      models = {f'uniform r{rank}': compensate.truncate_adapters(big, rank)}
      alloc = {}
      for weighting in budget_lib.WEIGHTINGS:
        models[f'global {weighting}'], alloc[weighting] = budget_lib.global_budget(
            big, rank, weighting=weighting, energies=energies)
      m = common.evaluate_models(loaded, models, windows, items=items)
      if not table:
        table.append({'compression': 'dense', 'recovery': '-', **m['dense']})
      for name, p in models.items():
        share = compensate.adapter_share(p)
        row = {'compression': r, 'recovery': name, **m[name],
               'adapter_params': compensate.adapter_params(p),
               'adapter_share': share['adapter_share'], 'compensate_s': comp_s}
        weighting = name.split()[-1]
        if weighting in alloc:
          s = alloc[weighting].summary()
          row.update(rank_min=s['rank_min'], rank_max=s['rank_max'],
                     ranks_by_linear=_ranks_by_linear(s['ranks']))
          results.setdefault('budget_ranks', {})[f'{r} | {weighting}'] = s['ranks']
        table.append(row)
      results['budget'] = table
      cols = ['compression', 'recovery'] + [f'ppl {d}' for d in eval_data] + [
          f'kl {d}' for d in eval_data] + ['probe_acc', 'adapter_params', 'rank_min', 'rank_max']
      (out / 'budget.md').write_text(
          f'# One rank budget: uniform rank {rank} vs a model-wide allocation of the same adapter '
          f'parameters (EoRA, lambda={shrink:g}, computed at rank {max_rank})\n\n'
          + common.markdown_table(table, cols))
      _plot_ranks(out / 'budget_ranks.png', results['budget_ranks'])
      if save:
        save(results)
  return results


def _ranks_by_linear(ranks: dict[str, int]) -> dict[str, float]:
  """Mean allotted rank per kind of linear (q_proj, ..., down_proj)."""
  by: dict[str, list[int]] = {}
  for path, k in ranks.items():
    by.setdefault(path.split('/')[-2], []).append(k)
  return {lin: float(np.mean(v)) for lin, v in sorted(by.items())}


def _plot_ranks(path: pathlib.Path, allocations: dict[str, dict[str, int]]) -> None:
  """Allotted rank against the block index, one line per kind of linear, one panel per run."""
  panels = {}
  for name, ranks in allocations.items():
    series: dict[str, tuple[list, list]] = {}
    for p, k in ranks.items():
      i, lin = tree.split_path(p)
      xs, ys = series.setdefault(lin.split('/')[-1], ([], []))
      xs.append(i)
      ys.append(k)
    panels[name] = series
  common.line_plot(path, panels, xlabel='block', ylabel='allotted rank',
                   suptitle='Model-wide rank budget (EoRA gains)', panel_size=(4.2, 3.2))


def _goal(table, rows, eval_data) -> list[dict[str, Any]]:
  """Per row and shrinkage, whether it meets the goal: in domain within 2% of EoRA, out of
  domain no worse than SVD."""
  ind, ood = (f'ppl {d}' for d in eval_data[:2])
  out = []
  for r in rows:
    by = {t['recovery']: t for t in table if t['compression'] == r}
    if 'eora lambda=0' not in by:
      continue
    for name, t in by.items():
      if not (name.startswith('eora') or name == 'auto'):
        continue
      out.append({'compression': r, 'recovery': name,
                  'in_domain_vs_eora': t[ind] / by['eora lambda=0'][ind] - 1,
                  'out_of_domain_vs_svd': t[ood] / by['svd'][ood] - 1,
                  'meets_goal': bool(t[ind] <= 1.02 * by['eora lambda=0'][ind]
                                     and t[ood] <= by['svd'][ood])})
  return out


def _write(out: pathlib.Path, name: str, table, eval_data, rank: int, goal) -> None:
  cols = ['compression', 'recovery'] + [f'ppl {d}' for d in eval_data] + [
      f'kl {d}' for d in eval_data] + ['compensate_s']
  goal_cols = ['compression', 'recovery', 'in_domain_vs_eora', 'out_of_domain_vs_svd', 'meets_goal']
  (out / f'{name}.md').write_text(
      f'# Robust EoRA: H + lambda tr(H)/d I, rank {rank}, calibrated on {eval_data[0]}\n\n'
      + common.markdown_table(table, cols) + '\n\n## Goal: in domain within 2% of EoRA, out of '
      'domain no worse than SVD\n\n' + common.markdown_table(goal, goal_cols))


def define_flags() -> None:
  flags.DEFINE_list('sections', list(SECTIONS), f'Sections to run: {SECTIONS}.')
  flags.DEFINE_list('rows', list(ROWS), 'Compressions (keys of compress_lib.COMPRESSIONS).')
  flags.DEFINE_integer('rank', 64, 'Adapter rank (the budget section: the uniform rank whose size '
                       'is the budget).')
  flags.DEFINE_list('lambdas', [f'{x:g}' for x in LAMBDAS], 'Shrinkage values of the sweep.')
  flags.DEFINE_list('auto_grid', [f'{x:g}' for x in AUTO_GRID],
                    'Candidates of the per-layer held-out choice (empty: no held-out choice).')
  flags.DEFINE_float('shrink', 0.0, 'Shrinkage of the EoRA adapters of the budget section.')
  flags.DEFINE_integer('max_rank', 256, 'Rank the budget section computes before cutting.')
  flags.DEFINE_integer('calib_samples', 64, 'Calibration sequences (two halves).')
  flags.DEFINE_integer('eval_windows', 24, 'Evaluation windows per corpus.')
  flags.DEFINE_bool('probes', True, 'Score the factual probes in the budget section.')
  flags.DEFINE_string('out_dir', 'results/eora_robust', 'Output directory.')


def main(argv):
  del argv
  common.quiet_logs()

  def save(res: dict[str, Any]) -> None:
    common.write_sections(FLAGS.out_dir, res, SECTIONS, flags=common.flag_values(FLAGS),
                          title='Robust EoRA and a model-wide rank budget on SmolLM2-135M')

  run(sections=FLAGS.sections, out_dir=FLAGS.out_dir, rows=FLAGS.rows, rank=FLAGS.rank,
      lambdas=[float(x) for x in FLAGS.lambdas], auto_grid=[float(x) for x in FLAGS.auto_grid],
      shrink=FLAGS.shrink, max_rank=FLAGS.max_rank, calib_samples=FLAGS.calib_samples,
      eval_windows=FLAGS.eval_windows, probes=FLAGS.probes, save=save)
  common.print_sections(FLAGS.out_dir, SECTIONS)


if __name__ == '__main__':
  define_flags()
  app.run(main)
