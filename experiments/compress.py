r"""Compress a model (prune and/or quantize), optionally recover, and evaluate against the dense model.

  python -m experiments.compress --model=smollm2-135m --prune=wanda --sparsity=2:4 \
      --calib_data=python-docs --calib_samples=64 --calib_seqlen=512 \
      --eval_data=python-docs,shakespeare --eval_windows=40 --out_dir=results/wanda24

  python -m experiments.compress --quant=gptq --bits=3 --group_size=128 \
      --recover=eora --rank=64 --out_dir=results/gptq3_eora64

Expect a few minutes on 2 CPU cores for SmolLM2-135M (64 x 512 calibration tokens). Evaluates the
dense and the compressed (and recovered) model on the same windows and writes ``results.json``
(``ppl_dense``, ``ppl_compressed``, ``kl_compressed``, ``top1_compressed``, ``probe_acc_*``,
``compress_seconds``, ``*_recovered`` with ``--recover``, the per-layer report, all flags) and
``table.md``. Finished blocks are checkpointed under ``OUT_DIR/checkpoint``: rerunning the same
command after an interruption resumes there. ``--save`` writes an orbax checkpoint of the result.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from experiments import common
from experiments.compress_lib import CompressConfig, RESULT_COLUMNS, build_spec, run


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so modules import side-effect free):
  one per ``CompressConfig`` field (declared there, with its help) plus the output options."""
  common.define_flags_from(CompressConfig)
  flags.DEFINE_string('save', None, 'Write an orbax checkpoint of the compressed model here.')
  flags.DEFINE_string('out_dir', None, 'Output directory.')
  flags.DEFINE_bool('restart', False, 'Ignore an existing pipeline checkpoint in OUT_DIR.')


def main(argv: Sequence[str]):
  del argv
  common.quiet_logs()
  if not FLAGS.out_dir:
    raise app.UsageError('--out_dir is required')
  try:
    c = common.from_flags(CompressConfig)
    build_spec(c)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  results = run(c, out_dir=FLAGS.out_dir, save=FLAGS.save, restart=FLAGS.restart)
  cols = [k for k in RESULT_COLUMNS if k in results]
  common.write_results(FLAGS.out_dir, results, rows=[results], columns=cols,
                       flags=common.flag_values(flags.FLAGS), title=f'{results["method"]} on {c.model}')
  print(common.markdown_table([results], cols))
  print(f'wrote {FLAGS.out_dir}/results.json')


if __name__ == '__main__':
  define_flags()
  app.run(main)
