"""Shared plumbing of the experiment scripts: loading, results files, tables, plots."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from models import data as data_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def quiet_logs() -> None:
  """Keeps absl/orbax INFO chatter out of the progress bars and tables."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)


def parse_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f'unknown dtype {name!r}; choose one of {sorted(DTYPES)}')
  return DTYPES[name]


def git_sha() -> str | None:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def environment() -> dict[str, Any]:
  return {
      'jax_version': jax.__version__,
      'devices': [str(d) for d in jax.devices()],
      'git_sha': git_sha(),
      'linear_implementation': kernels.last_implementation(),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def to_jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, float) and not np.isfinite(x):
    return str(x)
  return x


def _fmt(v) -> str:
  if isinstance(v, float):
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
      return f'{v:.3e}'
    return f'{v:.4g}' if abs(v) < 10 else f'{v:.2f}'
  return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  """A GitHub markdown table of ``rows`` (missing cells left blank)."""
  if not rows:
    return ''
  if columns is None:
    columns = []
    for r in rows:
      columns += [k for k in r if k not in columns and not isinstance(r[k], (dict, list))]
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append('| ' + ' | '.join(_fmt(r.get(c, '')) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def write_results(out_dir: str | os.PathLike, results: Mapping[str, Any], *,
                  rows: Sequence[Mapping[str, Any]] | None = None,
                  columns: Sequence[str] | None = None, flags: Mapping[str, Any] | None = None,
                  title: str = '') -> pathlib.Path:
  """Writes ``results.json`` (results + flags + environment) and ``table.md``; process 0 only."""
  out = pathlib.Path(out_dir)
  if jax.process_index() != 0:
    return out
  out.mkdir(parents=True, exist_ok=True)
  payload = dict(results)
  if rows is not None:
    payload['rows'] = list(rows)
  if flags is not None:
    payload['flags'] = dict(flags)
  payload['environment'] = environment()
  tmp = out / 'results.json.tmp'
  tmp.write_text(json.dumps(to_jsonable(payload), indent=2) + '\n')
  tmp.replace(out / 'results.json')
  table = markdown_table(rows if rows is not None else [results], columns)
  (out / 'table.md').write_text((f'# {title}\n\n' if title else '') + table)
  return out


def keep_other_sections(out_dir: str | os.PathLike, results: Mapping[str, Any],
                        sections: Sequence[str]) -> dict[str, Any]:
  """``results`` plus the sections of an earlier ``results.json`` in ``out_dir`` that this run
  did not recompute (so a table script can run its sections in separate invocations)."""
  merged = dict(results)
  path = pathlib.Path(out_dir) / 'results.json'
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError:
      return merged
    for sec in sections:
      if sec not in merged and sec in old:
        merged[sec] = old[sec]
  return merged


def flag_values(flag_values_obj, names: Sequence[str] | None = None) -> dict[str, Any]:
  """The script's own flags (absl's FLAGS also holds absl's internal ones)."""
  d = flag_values_obj.flag_values_dict()
  skip = {'logtostderr', 'alsologtostderr', 'log_dir', 'v', 'verbosity', 'stderrthreshold',
          'showprefixforinfo', 'run_with_pdb', 'pdb_post_mortem', 'pdb', 'run_with_profiling',
          'profile_file', 'use_cprofile_for_profiling', 'only_check_args', 'only_check_flags',
          'logger_levels',
          'helpshort', 'helpfull', 'help', 'helpxml', '?', 'test_srcdir', 'test_tmpdir',
          'test_random_seed', 'test_randomize_ordering_seed', 'xml_output_file'}
  if names is not None:
    return {k: d[k] for k in names if k in d}
  return {k: v for k, v in d.items() if k not in skip and not k.startswith(('jax_', 'xla_'))}


def eval_windows_for(tokenizer, source: str, seqlen: int, n_windows: int) -> np.ndarray:
  """Evaluation windows ``[n, seqlen]`` from the test split of a named corpus or a file."""
  tokens = data_lib.tokenize(tokenizer, data_lib.load_text(source, 'test'))
  return data_lib.eval_windows(tokens, seqlen, n_windows)


def calibration_for(tokenizer, source: str, n_samples: int, seqlen: int, seed: int) -> np.ndarray:
  """Calibration batch ``[n, seqlen]`` from the train split of a named corpus or a file."""
  tokens = data_lib.tokenize(tokenizer, data_lib.load_text(source, 'train'))
  return data_lib.calibration_batch(tokens, n_samples, seqlen, seed)


def probe_items(path: str | None):
  """Multiple-choice items: the shipped factual-recall probes by default, ``'none'`` for none."""
  if path == 'none':
    return []
  return data_lib.load_mc_jsonl(path or data_lib.probes_path())


def split_list(value: str | Sequence[str]) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(',') if v.strip()]
  return list(value)

