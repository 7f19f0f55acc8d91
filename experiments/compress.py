r"""Compress a model (prune and/or quantize), optionally recover, and evaluate against the dense model.

  python -m experiments.compress --model=smollm2-135m --prune=wanda --sparsity=2:4 \
      --calib_data=python-docs --calib_samples=64 --calib_seqlen=512 \
      --eval_data=python-docs,shakespeare --eval_windows=40 --out_dir=results/wanda24

  python -m experiments.compress --quant=gptq --bits=3 --group_size=64 \
      --recover=eora --rank=64 --out_dir=results/gptq3_eora64

Expect a few minutes on 2 CPU cores for SmolLM2-135M (64 x 512 calibration tokens). Evaluates the
dense and the compressed (and recovered) model on the same windows and writes ``results.json``
(``ppl_dense``, ``ppl_compressed``, ``kl_compressed``, ``top1_compressed``, ``probe_acc_*``,
``compress_seconds``, ``*_recovered`` with ``--recover``, the per-layer report, all flags) and
``table.md``. Finished blocks are checkpointed under ``OUT_DIR/checkpoint``: rerunning the same
command after an interruption resumes there. ``--save`` writes an orbax checkpoint of the result,
which ``python -m experiments.evaluate --model=SAVE_DIR`` reads.

The flags are checked before anything is loaded (``config.validate``: the model's config,
the text files, the output paths, the rules, group sizes and ranks against the layer widths, flags
that would do nothing): every problem is printed as one ``error: --flag...`` line on stderr and
the command exits with status 2. ``--group_size`` defaults to 128, or to the largest of 128/64/32
that divides every linear's input width (64 on SmolLM2-135M, whose hidden size is 576).

Several processes (hosts) run as one with ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` on each, or with the settings a SLURM step or a multi-host TPU slice provides
(``--distributed=auto``, the default; see ``models.distributed``): the mesh spans the devices of
all of them, every process computes the same result, and process 0 alone writes ``results.json``,
the tables and the exports (checkpoints are written by all of them together).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Sequence

from absl import app, flags

from experiments import common
from experiments.compress_lib import RESULT_COLUMNS, run
from experiments.config import CompressConfig, distributed_settings, resolve, validate
from models import checkpoint
from models import data as data_lib
from models import distributed
from models import export as export_lib
from models import loading


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags (only when run as a script, so modules import side-effect free):
  one per ``CompressConfig`` field (declared there, with its help) plus the output options."""
  common.define_flags_from(CompressConfig, flag_values=flag_values)
  flags.DEFINE_string('save', None, 'Write an orbax checkpoint of the compressed model here '
                      '(experiments.evaluate --model=SAVE reads it).', flag_values=flag_values)
  flags.DEFINE_string('out_dir', None, 'Output directory.', flag_values=flag_values)
  flags.DEFINE_bool('restart', False, 'Ignore an existing pipeline checkpoint in OUT_DIR.',
                    flag_values=flag_values)
  flags.DEFINE_bool('plan', False, 'Print the per-device and per-host peak memory of this run '
                    'from the model\'s config alone (no weight is read), write OUT_DIR/plan.json, '
                    'and exit: 0 when it fits, 2 when not (with the flags that would shrink it).',
                    flag_values=flag_values)
  flags.DEFINE_integer('plan_devices', None, 'With --plan: plan for this many devices '
                       '(default: this machine\'s).', flag_values=flag_values)
  flags.DEFINE_float('device_memory_gb', None, 'With --plan: memory of one device in GB '
                     '(default: what the device reports, if it does).', flag_values=flag_values)


def check_flags(flag_values: flags.FlagValues = FLAGS) -> tuple[CompressConfig | None, list[str]]:
  """``(config, problems)`` of the parsed flags: every problem :func:`validate` finds (a flag given
  on the command line that has no effect included), one line each naming the flag. Starts
  ``jax.distributed`` first when the flags or the environment ask for several processes (before
  the checks, which count the devices of all processes)."""
  problems = [] if flag_values.out_dir else ['--out_dir is required (where results.json goes)']
  try:
    c = common.from_flags(CompressConfig, flag_values)
  except ValueError as e:
    return None, problems + [str(e)]
  settings = distributed_settings(c)
  if not distributed.settings_problems(settings):  # else validate names them
    try:
      distributed.initialize(settings)
    except distributed.DistributedError as e:
      return c, problems + [str(e)]
  given = {f.name for f in dataclasses.fields(CompressConfig) if flag_values[f.name].present}
  return c, problems + validate(c, out_dir=flag_values.out_dir, save=flag_values.save, given=given,
                                n_devices=flag_values.plan_devices if flag_values.plan else None)


def main(argv: Sequence[str]):
  del argv
  common.quiet_logs()
  c, problems = check_flags()
  if problems:  # every problem, one line each, and no help dump (which app.UsageError prints)
    print('\n'.join(f'error: {line}' for line in problems), file=sys.stderr)
    return 2
  if FLAGS.plan:
    return show_plan(c)
  writer = distributed.is_writer()  # with several processes, process 0 alone writes
  # An earlier run's results are not left as if this run had produced them: they move aside
  # now, and this run's results are written as soon as they are measured.
  previous = common.move_aside(pathlib.Path(FLAGS.out_dir) / 'results.json') if writer else None
  if previous:
    print(f'moved the previous results to {previous}')

  def write(results):
    cols = [k for k in RESULT_COLUMNS if k in results]
    if writer:
      common.write_results(FLAGS.out_dir, results, rows=[results], columns=cols,
                           flags=common.flag_values(flags.FLAGS),
                           title=f'{results["method"]} on {c.model}')
    return cols

  try:
    results = run(c, out_dir=FLAGS.out_dir, save=FLAGS.save, restart=FLAGS.restart,
                  on_results=write)
  except (data_lib.DataError, data_lib.DataUnavailableError) as e:  # found loading the data,
    print(f'error: {e}', file=sys.stderr)  # before any compression: one line, no traceback
    return 2
  except (checkpoint.CheckpointError, export_lib.ExportError) as e:  # e.g. the state of another
    print(f'error: {e}', file=sys.stderr)  # run; results measured so far are already written
    return 1
  cols = write(results)
  if writer:
    print(common.markdown_table([results], cols))
    print(f'wrote {FLAGS.out_dir}/results.json')


def show_plan(c: CompressConfig) -> int:
  """``--plan``: prints the plan, writes ``OUT_DIR/plan.json``; 0 when it fits, else 2."""
  from experiments import plan as plan_lib  # pylint: disable=g-import-not-at-top
  cfg = loading.load_config(c.model)
  limit = (FLAGS.device_memory_gb * plan_lib.GB if FLAGS.device_memory_gb
           else plan_lib.device_memory())
  p = plan_lib.plan(resolve(c, cfg), cfg, FLAGS.plan_devices, limit)
  if distributed.is_writer():
    print(plan_lib.format_plan(p))
    out = pathlib.Path(FLAGS.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common.write_atomic(out / 'plan.json', json.dumps(p, indent=1) + '\n')
  return 0 if p['fits'] else 2


if __name__ == '__main__':
  define_flags()
  app.run(main)
