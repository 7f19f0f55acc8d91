r"""One rank budget for the whole model with SRR: uniform rank against a model-wide allotment of
each linear's preserved rank k and total rank, at equal adapter parameters (SmolLM2).

  python -m experiments.srr_global --out_dir=results/srr_global

Expect ~10 min per row on 2 CPU cores run single-threaded (rows resume from
``OUT_DIR/runs/<row>``). Every row is one run of the compression CLI's library
(``experiments.compress_lib.run``): GPTQ 3-bit g64 calibrated on python-docs train (64 x 512,
inputs propagated through the compressed blocks), then compensation at rank ``--rank`` (64) per
linear, or the same adapter parameters allotted model-wide (``--rank_budget=global``, candidates up
to rank 4 x 64; the layers' errors weighed as they are, or ``relative`` to each layer's dense output
energy: ``--budget_weighting``):

* ``eora uniform`` / ``eora global``: EoRA, whose global budget allots ranks only.
* ``srr uniform``: SRR with the k of least output error per linear (``--srr_k=-1``, candidates
  ``{0, energy rule, r/4, r/2, 3r/4, r}``).
* ``srr global``: the same candidates for every linear, each computed at rank 256; the budget picks
  one k and one rank per linear (:func:`recover.budget.srr_global_budget`).
* ``... relative``: the global rows with ``--budget_weighting=relative``.

Evaluation: perplexity and KL to the dense model on python-docs test (in domain) and shakespeare
test (out of domain), 24 x 512 windows each, and the factual probes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

from absl import app, flags

from experiments import common
from experiments import compress_lib
from experiments import config

FLAGS = flags.FLAGS
ROWS = {
    'eora uniform': dict(recover='eora'),
    'eora global': dict(recover='eora', rank_budget='global'),
    'srr uniform': dict(recover='srr', srr_k=-1),
    'srr global': dict(recover='srr', srr_k=-1, rank_budget='global'),
    'eora global relative': dict(recover='eora', rank_budget='global',
                                 budget_weighting='relative'),
    'srr global relative': dict(recover='srr', srr_k=-1, rank_budget='global',
                                budget_weighting='relative'),
}


def _row(name: str, res: dict[str, Any], domains: Sequence[str]) -> dict[str, Any]:
  row: dict[str, Any] = {'recovery': name}
  for d in domains:
    row[f'ppl {d}'] = res['per_dataset'][d]['ppl_recovered']
  for d in domains:
    row[f'kl {d}'] = res['per_dataset'][d]['kl_recovered']
  row['probe_acc'] = res.get('probe_acc_recovered')
  rb = res.get('rank_budget') or {}
  # float adapters are counted at 16 bits in adapter_bytes
  row['adapter_params'] = rb.get('used_params', res['adapter_bytes'] // 2)
  row['rank_min'], row['rank_max'] = rb.get('rank_min'), rb.get('rank_max')
  row['k_mean'] = rb.get('preserved_mean')
  row['seconds'] = res['compress_seconds'] + res.get('recover_seconds', 0.0)
  return {k: v for k, v in row.items() if v is not None}


def run(*, out_dir: str, rows: Sequence[str] = tuple(ROWS), rank: int = 64,
        model: str = 'smollm2-135m', quant: str = 'gptq', bits: int = 3, group_size: int = 64,
        calib_samples: int = 64, calib_seqlen: int = 512,
        eval_data: Sequence[str] = ('python-docs', 'shakespeare'), eval_windows: int = 24,
        eval_seqlen: int = 512, probes: str | None = None, batch_size: int = 8) -> dict[str, Any]:
  out = pathlib.Path(out_dir)
  base = config.CompressConfig(
      model=model, quant=quant, bits=bits, group_size=group_size, calib_data=eval_data[0],
      calib_samples=calib_samples, calib_seqlen=calib_seqlen, eval_data=tuple(eval_data),
      eval_windows=eval_windows, eval_seqlen=eval_seqlen, probes=probes, batch_size=batch_size,
      rank=rank)
  table, per_row = [], {}
  first = None
  for name in rows:
    c = dataclasses.replace(base, **ROWS[name])
    run_dir = out / 'runs' / name.replace(' ', '_')
    done = run_dir / 'row.json'  # a finished row is read back, not run again
    settings = json.loads(json.dumps(dataclasses.asdict(c)))
    if done.exists() and json.loads(done.read_text())['config'] == settings:
      res = json.loads(done.read_text())['results']
    else:
      res = compress_lib.run(c, out_dir=str(run_dir))
      tmp = done.with_suffix('.tmp')  # a finished row only: never a half-written file
      tmp.write_text(json.dumps({'config': settings, 'results': res}))
      tmp.replace(done)
    if first is None:
      first = res
      ref: dict[str, Any] = {'recovery': f'{quant} w{bits}g{group_size}, no adapter'}
      for d in eval_data:
        ref[f'ppl {d}'] = res['per_dataset'][d]['ppl_compressed']
      for d in eval_data:
        ref[f'kl {d}'] = res['per_dataset'][d]['kl_compressed']
      dense = {'recovery': 'dense', **{f'ppl {d}': res['per_dataset'][d]['ppl_dense']
                                       for d in eval_data}}
      table += [dense, ref]
    table.append(_row(name, res, eval_data))
    per_row[name] = {k: res[k] for k in ('rank_budget', 'compress_seconds', 'recover_seconds',
                                         'adapter_share') if k in res}
    common.write_results(out, {'model': model, 'rank': rank, 'rows_run': list(per_row),
                               'per_row': per_row}, rows=table,
                         title=f'SRR and EoRA: uniform rank {rank} vs one model-wide budget '
                               f'({quant} w{bits}g{group_size}, {model})')
  return {'rows': table, 'per_row': per_row}


def define_flags() -> None:
  flags.DEFINE_string('out_dir', 'results/srr_global', 'Output directory.')
  flags.DEFINE_list('rows', list(ROWS), f'Rows, of {list(ROWS)}.')
  flags.DEFINE_integer('rank', 64, 'Uniform rank (the budget is its adapter size).')
  flags.DEFINE_integer('eval_windows', 24, 'Evaluation windows per corpus.')


def main(argv):
  del argv
  common.quiet_logs()
  unknown = sorted(set(FLAGS.rows) - set(ROWS))
  if unknown:
    raise app.UsageError(f'unknown rows {unknown}; choose from {list(ROWS)}')
  res = run(out_dir=FLAGS.out_dir, rows=FLAGS.rows, rank=FLAGS.rank,
            eval_windows=FLAGS.eval_windows)
  print(common.markdown_table(res['rows']))


if __name__ == '__main__':
  define_flags()
  app.run(main)
