r"""Evaluate a model on lm-evaluation-harness tasks, scored by our JAX forward.

  python -m experiments.lm_eval --model=results/gptq3_eora64/saved --tasks=arc_easy,hellaswag \
      --num_fewshot=0 --batch_size=8 --out_dir=results/lm_eval_gptq3

``--model`` takes what :func:`models.loading.load_model` accepts: a model name (``smollm2-135m``,
``tiny-llama``), a Hugging Face directory, a ``.gguf`` file or a ``--save`` directory of
``experiments.compress`` (its compressed leaves and adapters are evaluated as they are, through
:class:`models.harness.CompressRecoverLM`, lm-eval's ``compress-recover`` model). ``--tasks`` is
a comma list of lm-eval task, group or tag names, glob patterns of them, or paths of task YAML
files. ``--include_path`` adds a directory of task YAML files: with local data files
(``dataset_path: json``, ``dataset_kwargs: {data_files: ...}``) the tasks run offline; the
built-in tasks download their data sets through Hugging Face ``datasets``. When every requested
name is a task of ``--include_path``, lm-eval's ~15k built-in task configs are not indexed.

``--mesh`` (as ``experiments.compress``'s: ``data:N,model:M``, default every device on ``data``)
splits each batch of requests along the mesh's data axis (``models.sharding``; the parameters are
replicated on every device), e.g. on a host with 8 GPUs::

  python -m experiments.lm_eval --model=results/gptq4/saved --tasks=arc_easy --mesh=data:8 \
      --batch_size=32 --out_dir=results/lm_eval_gptq4

``--batch_size`` must be a multiple of the data axis's size; a batch of fewer requests (the last
one, or a task with fewer requests than ``--batch_size``) runs whole on every device, with the
same numbers. ``results.json`` records the mesh.

This is the supported command line: the ``lm_eval`` console command does not know the
``compress-recover`` model (lm-eval 0.4.13 reads no plugin entry points; see
:mod:`models.harness`). Prints the metrics as a markdown table and writes ``results.json`` (the
metrics, lm-eval's record of the run and of each task's config, the flags) and ``table.md`` to
``--out_dir``. Bad flags (an unknown task, a missing model, ...) are reported before the model
loads, one ``error: ...`` line each, exit code 2.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

from absl import app, flags

from experiments import common


class LmEvalError(ValueError):
  """Flags that cannot run; ``problems`` holds one line per problem."""

  def __init__(self, problems: Sequence[str]):
    super().__init__('; '.join(problems))
    self.problems = list(problems)


def _is_task_file(spec: str) -> bool:
  p = pathlib.Path(spec)
  return p.suffix in ('.yaml', '.yml') and p.is_file()


def task_manager_for(tasks: Sequence[str], include_path: str | None):
  """An lm-eval ``TaskManager`` that knows ``tasks``: ``--include_path`` alone when every name is
  one of its tasks (fast, no built-in configs indexed), else the built-in tasks as well."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  if include_path:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(t in local.all_subtasks or _is_task_file(t) for t in tasks):
      return local
  return TaskManager(include_path=include_path)


def resolve_tasks(manager, tasks: Sequence[str]) -> tuple[list[str], list[str]]:
  """``(names to load, unknown)``: registered names and YAML paths as they are, glob patterns
  expanded to the names they match."""
  names, unknown = [], []
  for t in tasks:
    if t in manager.all_tasks or _is_task_file(t):
      names.append(t)
    elif any(ch in t for ch in '*?[') and manager.match_tasks([t]):
      names += [m for m in manager.match_tasks([t]) if m not in names]
    else:
      unknown.append(t)
  return names, unknown


def check(*, model: str, tasks: Sequence[str], include_path: str | None = None,
          num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
          max_length: int | None = None, max_gen_toks: int = 256, dtype: str = 'float32',
          out_dir: str | None = None, mesh: str | None = None) -> tuple[Any, list[str]]:
  """Every check that needs no model weights: returns ``(task manager, task names)`` or raises
  :class:`LmEvalError` with all the problems found."""
  from models import loading  # pylint: disable=g-import-not-at-top
  problems = []
  if batch_size >= 1:
    try:
      _placement(mesh, batch_size)
    except ValueError as e:
      problems.append(str(e))
  if not model:
    problems.append('--model is required')
  else:
    try:
      loading.load_config(model)
    except (FileNotFoundError, ValueError) as e:
      problems.append(f'--model={model}: {e}')
  if not tasks:
    problems.append('--tasks is required (a comma list of lm-eval task names)')
  if include_path and not pathlib.Path(include_path).is_dir():
    problems.append(f'--include_path={include_path} is not a directory')
  if num_fewshot is not None and num_fewshot < 0:
    problems.append(f'--num_fewshot={num_fewshot} must be >= 0')
  if limit is not None and limit <= 0:
    problems.append(f'--limit={limit:g} must be positive (a count, or a fraction below 1)')
  if batch_size < 1:
    problems.append(f'--batch_size={batch_size} must be >= 1')
  if max_length is not None and max_length < 2:
    problems.append(f'--max_length={max_length} must be >= 2')
  if max_gen_toks < 1:
    problems.append(f'--max_gen_toks={max_gen_toks} must be >= 1')
  if dtype not in common.DTYPES:
    problems.append(f'--dtype={dtype!r} is not one of {sorted(common.DTYPES)}')
  if out_dir and pathlib.Path(out_dir).exists() and not pathlib.Path(out_dir).is_dir():
    problems.append(f'--out_dir={out_dir} exists and is not a directory')
  manager, names = None, []
  if tasks and not (include_path and not pathlib.Path(include_path).is_dir()):
    manager = task_manager_for(tasks, include_path)
    names, unknown = resolve_tasks(manager, tasks)
    for t in unknown:
      where = ' nor in --include_path' if include_path else ' (local tasks: --include_path=DIR)'
      problems.append(f'--tasks: unknown task {t!r}: not an lm-eval task, group or tag{where}')
  if problems:
    raise LmEvalError(problems)
  return manager, names


def _placement(mesh: str | None, batch_size: int):
  """``--mesh``'s placement; ValueError naming the flag (see :func:`experiments.evaluate.
  placement_for`)."""
  from experiments import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.placement_for(mesh, batch_size)


def metric_rows(res: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One row per (task or group, metric, filter) of ``simple_evaluate``'s results."""
  rows = []
  for section in ('results', 'groups'):
    for task, metrics in (res.get(section) or {}).items():
      if section == 'groups' and task in (res.get('results') or {}):
        continue
      for key, value in metrics.items():
        if ',' not in key or '_stderr' in key:
          continue
        metric, filt = key.split(',', 1)
        stderr = metrics.get(f'{metric}_stderr,{filt}')
        rows.append({'task': metrics.get('alias', task).strip() or task, 'metric': metric,
                     'filter': filt, 'n-shot': (res.get('n-shot') or {}).get(task, ''),
                     'value': value,
                     'stderr': stderr if isinstance(stderr, (int, float)) else ''})
  return rows


def _jsonable(x: Any) -> Any:
  from lm_eval.utils import handle_non_serializable  # pylint: disable=g-import-not-at-top
  return json.loads(json.dumps(x, default=handle_non_serializable))


def run(*, model: str, tasks: Sequence[str], include_path: str | None = None,
        num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
        max_length: int | None = None, max_gen_toks: int = 256, dtype: str = 'float32',
        bootstrap_iters: int = 100000, out_dir: str | None = None,
        flag_record: Mapping[str, Any] | None = None, mesh: str | None = None) -> dict[str, Any]:
  """All the logic; reads no flags. Checks everything (:func:`check`) before loading the model,
  evaluates, and writes ``results.json`` + ``table.md`` to ``out_dir`` when given. Returns
  ``{'rows': metric rows, 'results': lm-eval's results, ...}``."""
  settings = dict(model=model, tasks=list(tasks), include_path=include_path,
                  num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                  max_length=max_length, max_gen_toks=max_gen_toks, dtype=dtype)
  manager, names = check(**settings, out_dir=out_dir, mesh=mesh)
  settings['mesh'] = mesh
  placement = _placement(mesh, batch_size)
  import lm_eval  # pylint: disable=g-import-not-at-top
  from models import harness  # pylint: disable=g-import-not-at-top  (registers the model)
  from models import sharding  # pylint: disable=g-import-not-at-top
  if limit is not None and limit >= 1:
    limit = int(limit)
  model_args = {'model': model, 'batch_size': batch_size, 'dtype': dtype,
                'max_gen_toks': max_gen_toks}
  if max_length is not None:
    model_args['max_length'] = max_length
  t0 = time.time()
  with sharding.use(placement):  # the model replicates its params on the mesh, batches split
    res = lm_eval.simple_evaluate(model=harness.MODEL_NAME, model_args=model_args, tasks=names,
                                  num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  bootstrap_iters=bootstrap_iters, log_samples=False)
  rows = metric_rows(res)
  out = {'model': model, 'tasks': names, 'mesh': placement.describe(), 'rows': rows,
         'seconds': time.time() - t0}
  for key in ('results', 'groups', 'group_subtasks', 'n-shot', 'n-samples', 'versions',
              'higher_is_better', 'config', 'configs'):
    if key in res:
      out[key] = _jsonable(res[key])
  if out_dir:
    record = dict(flag_record) if flag_record is not None else settings
    common.write_results(out_dir, {k: v for k, v in out.items() if k != 'rows'}, rows=rows,
                         columns=['task', 'metric', 'filter', 'n-shot', 'value', 'stderr'],
                         flags=record, title=f'lm-eval: {model}')
  return out


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so modules import side-effect free)."""
  flags.DEFINE_string('model', None, 'Model name, Hugging Face directory, .gguf file or --save '
                      'directory of experiments.compress.')
  flags.DEFINE_list('tasks', [], 'Comma list of lm-eval task/group/tag names, glob patterns or '
                    'task YAML paths.')
  flags.DEFINE_string('include_path', None, 'Directory of extra task YAML files.')
  flags.DEFINE_integer('num_fewshot', None, 'Few-shot examples per prompt (default: the task\'s).')
  flags.DEFINE_float('limit', None, 'Documents per task (a fraction when below 1; for tests).')
  flags.DEFINE_integer('batch_size', 8, 'Requests per forward pass.')
  flags.DEFINE_integer('max_length', None, 'Longest input in tokens (default: the model\'s '
                       'max_position_embeddings, at most 2048).')
  flags.DEFINE_integer('max_gen_toks', 256, 'Default tokens generated per generate_until request.')
  flags.DEFINE_enum('dtype', 'float32', list(common.DTYPES), 'Compute dtype.')
  flags.DEFINE_integer('bootstrap_iters', 100000, 'Bootstrap iterations of the stderr of '
                       'metrics without a closed form (0: none).')
  flags.DEFINE_string('mesh', None, 'Device mesh data:N,model:M over all devices (default: every '
                      'device on data): each batch of requests is split along data.')
  flags.DEFINE_string('out_dir', None, 'Directory for results.json and table.md.')


def main(argv: Sequence[str]):
  del argv
  common.quiet_logs()
  try:
    out = run(model=FLAGS.model, tasks=common.split_list(FLAGS.tasks),
              include_path=FLAGS.include_path, num_fewshot=FLAGS.num_fewshot, limit=FLAGS.limit,
              batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
              max_gen_toks=FLAGS.max_gen_toks, dtype=FLAGS.dtype,
              bootstrap_iters=FLAGS.bootstrap_iters, out_dir=FLAGS.out_dir,
              flag_record=common.flag_values(FLAGS), mesh=FLAGS.mesh)
  except LmEvalError as e:
    for problem in e.problems:
      print(f'error: {problem}', file=sys.stderr)
    return 2
  print(common.markdown_table(out['rows'],
                              ['task', 'metric', 'filter', 'n-shot', 'value', 'stderr']))
  if FLAGS.out_dir:
    print(f'wrote {FLAGS.out_dir}/results.json')


if __name__ == '__main__':
  define_flags()
  app.run(main)
