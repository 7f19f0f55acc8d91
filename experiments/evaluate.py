r"""Evaluate a model: perplexity on evaluation windows and factual-recall probe accuracy.

  python -m experiments.evaluate --model=smollm2-135m --eval_data=python-docs \
      --eval_seqlen=512 --eval_windows=40 --out_dir=results/eval_smollm2

Expect ~1-2 min on 2 CPU cores for SmolLM2-135M (40 x 512 tokens and 160 probes). Writes
``results.json`` (model, eval_data, eval_seqlen, eval_tokens, ppl, probe_acc, ...) and ``table.md``.
``--eval_data`` takes a comma list of corpora (``python-docs``, ``shakespeare``, ``wikitext2``,
``c4``) or text-file paths; ``ppl`` is the first one's, ``per_dataset`` holds all.

``--mesh`` (as ``experiments.compress``'s: ``data:N,model:M``, default every device on ``data``)
splits each batch of windows along the mesh's data axis (``models.sharding``); the parameters
are replicated on every device. ``--batch_size`` must be a multiple of the data axis's size (a
last batch of fewer windows runs whole on every device: the same numbers). ``results.json``
records the mesh. On a host with 8 GPUs:

  python -m experiments.evaluate --model=results/gptq4/saved --mesh=data:8 --batch_size=32 \
      --eval_windows=256 --out_dir=results/eval_gptq4

A bad ``--mesh`` (an unknown axis, more devices than there are, a data axis that does not divide
``--batch_size``) is reported before the model loads, in one ``error: --mesh=...`` line (exit 2).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

from absl import app, flags

from experiments import common
from models import evaluate as eval_lib
from models import loading
from models import sharding


def placement_for(mesh: str | None, batch_size: int) -> sharding.Placement:
  """The placement of ``--mesh`` (:meth:`models.sharding.Placement.create`), or ValueError with
  one line naming the flag: a mesh :func:`models.sharding.parse_mesh` rejects, or a data axis that
  does not divide ``batch_size`` (its batches would run whole on every device). Loads nothing."""
  placement = sharding.Placement.create(mesh)
  if batch_size % placement.data_size:
    raise ValueError(f'--mesh={mesh or "auto"}: --batch_size={batch_size} is not a multiple of the '
                     f'data axis ({placement.data_size} devices): its batches would run whole on '
                     'every device; pass a multiple')
  return placement


def run(*, model: str, eval_data: Sequence[str], eval_seqlen: int, eval_windows: int,
        batch_size: int = 8, dtype: str = 'float32', probes: str | None = None,
        mesh: str | None = None) -> dict[str, Any]:
  """All the logic; reads no flags (tests call it with the tiny model). ``mesh``: ``--mesh``
  (checked by :func:`placement_for` before the model loads; ValueError when bad)."""
  t0 = time.time()
  placement = placement_for(mesh, batch_size)
  dt = common.parse_dtype(dtype)
  loaded = loading.load_model(model, dtype=dt)
  tokenizer = loaded.tokenizer()
  with sharding.use(placement):
    params = sharding.replicate(loaded.params)  # once, not moved again with every batch
    per_dataset = {}
    for source in eval_data:
      windows = common.eval_windows_for(tokenizer, source, eval_seqlen, eval_windows)
      per_dataset[source] = eval_lib.perplexity(params, loaded.config, windows,
                                                batch_size=batch_size, dtype=dt,
                                                desc=f'ppl {source}')
    first = per_dataset[eval_data[0]]
    source = model if model in loading.REGISTRY else loaded.source  # no cache paths in results
    out = {'model': model, 'model_source': source, 'eval_data': eval_data[0],
           'eval_seqlen': eval_seqlen, 'eval_tokens': first['eval_tokens'], 'ppl': first['ppl'],
           'per_dataset': per_dataset, 'dtype': dtype, 'mesh': placement.describe()}
    items = common.probe_items(probes)
    if items:
      mc = eval_lib.score_multiple_choice(params, loaded.config, tokenizer, items, dtype=dt,
                                          desc='probes')
      out.update(probe_acc=mc['acc'], probe_acc_norm=mc['acc_norm'], probe_items=mc['n'])
  out['seconds'] = time.time() - t0
  return out


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so modules import side-effect free)."""
  flags.DEFINE_string('model', 'smollm2-135m', 'Model name, checkpoint directory or .gguf file.')
  flags.DEFINE_string('eval_data', 'python-docs', 'Comma list of corpora or text files.')
  flags.DEFINE_integer('eval_seqlen', 512, 'Tokens per evaluation window.')
  flags.DEFINE_integer('eval_windows', 40, 'Number of windows (-1: all).')
  flags.DEFINE_integer('batch_size', 8, 'Windows per forward pass.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
  flags.DEFINE_string('probes', None, "Multiple-choice JSONL (default: the shipped factual "
                                "probes; 'none' to skip).")
  flags.DEFINE_string('mesh', None, 'Device mesh data:N,model:M over all devices (default: every '
                      'device on data): each batch of windows is split along data.')
  flags.DEFINE_string('out_dir', None, 'Directory for results.json and table.md.')


def main(argv):
  del argv
  common.quiet_logs()
  if not FLAGS.out_dir:
    raise app.UsageError('--out_dir is required')
  try:
    placement_for(FLAGS.mesh, FLAGS.batch_size)  # before the model loads: one line, exit 2
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  results = run(model=FLAGS.model, eval_data=common.split_list(FLAGS.eval_data),
                eval_seqlen=FLAGS.eval_seqlen, eval_windows=FLAGS.eval_windows,
                batch_size=FLAGS.batch_size, dtype=FLAGS.dtype, probes=FLAGS.probes,
                mesh=FLAGS.mesh)
  rows = [{'model': results['model'], 'eval_data': name, 'eval_seqlen': results['eval_seqlen'],
           'eval_tokens': r['eval_tokens'], 'ppl': r['ppl'],
           'probe_acc': results.get('probe_acc', '')} for name, r in results['per_dataset'].items()]
  common.write_results(FLAGS.out_dir, results, rows=rows,
                       flags=common.flag_values(flags.FLAGS), title=f'Evaluation of {FLAGS.model}')
  print(common.markdown_table(rows))
  print(f'wrote {FLAGS.out_dir}/results.json')


if __name__ == '__main__':
  define_flags()
  app.run(main)
