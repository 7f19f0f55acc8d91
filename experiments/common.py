"""Shared plumbing of the experiment scripts: loading, results files, tables, plots."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import types
import typing
from typing import Any, Callable, Mapping, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import kernels
from models import checkpoint
from models import data as data_lib
from models import distributed
from models import evaluate as eval_lib

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
  table = markdown_table(rows if rows is not None else [results], columns)
  write_atomic(out / 'results.json', json.dumps(to_jsonable(payload), indent=2) + '\n')
  write_atomic(out / 'table.md', (f'# {title}\n\n' if title else '') + table)
  return out


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename: a reader sees the old
  content or the new, never a part (and a full disk leaves the old file as it was)."""
  tmp = path.with_name(path.name + '.tmp')
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def move_aside(path: pathlib.Path) -> pathlib.Path | None:
  """Renames an existing ``path`` (``results.json``) to ``NAME.previous.EXT`` (replacing an older
  one) so it is not mistaken for the output of the run that starts now; returns the new path."""
  if not path.exists():
    return None
  aside = path.with_name(f'{path.stem}.previous{path.suffix}')
  path.replace(aside)
  return aside


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


def write_sections(out_dir: str | os.PathLike, results: Mapping[str, Any],
                   sections: Sequence[str], *, flags: Mapping[str, Any], title: str) -> None:
  """``write_results`` for a script of several sections: the sections of an earlier run that
  this one did not recompute are kept, and the table is the first section present."""
  res = keep_other_sections(out_dir, results, sections)
  rows = next((res[s] for s in sections if s in res), [])
  write_results(out_dir, res, rows=rows, flags=flags, title=title)


def print_sections(out_dir: str | os.PathLike, sections: Sequence[str]) -> None:
  """Prints the markdown table ``OUT_DIR/SECTION.md`` of every section that has one."""
  for sec in sections:
    p = pathlib.Path(out_dir) / f'{sec}.md'
    if p.exists():
      print(p.read_text())


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


def tokenizer_vocab_size(tokenizer) -> int | None:
  """The number of ids ``tokenizer`` knows (``len`` of a Hugging Face tokenizer, added tokens
  included), or None when it does not say."""
  try:
    return int(len(tokenizer))
  except TypeError:
    size = getattr(tokenizer, 'vocab_size', None)
    return int(size) if isinstance(size, (int, np.integer)) else None


def eval_windows_for(tokenizer, source: str, seqlen: int, n_windows: int, *,
                     vocab_size: int | None = None) -> np.ndarray:
  """Evaluation windows ``[n, seqlen]``: the first ``n_windows`` (-1, 0 or None: all) windows of
  the test split of a named corpus or a text file (``.txt``, ``.jsonl``, ``.parquet``), or the
  first ``n_windows`` rows of a ``.npy`` of token windows, as they are. The ids of a ``.npy`` are
  checked against ``vocab_size`` (default: the tokenizer's, when it says)."""
  if data_lib.is_windows_file(source):
    rows = None if n_windows in (None, 0, -1) else n_windows
    return data_lib.load_windows(source, seqlen, rows,
                                 vocab_size=vocab_size or tokenizer_vocab_size(tokenizer))
  tokens = data_lib.tokenize(tokenizer, data_lib.load_text(source, 'test'))
  return data_lib.eval_windows(tokens, seqlen, n_windows)


def calibration_for(tokenizer, source: str, n_samples: int, seqlen: int, seed: int, *,
                    vocab_size: int | None = None) -> np.ndarray:
  """Calibration batch ``[n, seqlen]``: windows at random offsets (``seed``) of the train split of
  a named corpus or a text file (``.txt``, ``.jsonl``, ``.parquet``), or the first ``n_samples``
  rows of a ``.npy`` of token windows, as they are (``seed`` does not apply). The ids of a
  ``.npy`` are checked against ``vocab_size`` (default: the tokenizer's, when it says)."""
  if data_lib.is_windows_file(source):
    return data_lib.load_windows(source, seqlen, n_samples,
                                 vocab_size=vocab_size or tokenizer_vocab_size(tokenizer))
  tokens = data_lib.tokenize(tokenizer, data_lib.load_text(source, 'train'))
  return data_lib.calibration_batch(tokens, n_samples, seqlen, seed)


def windows_sha256(windows) -> str:
  """The sha256 of a windows array as int32, shape included (:func:`checkpoint.tree_digest`):
  equal windows give equal hashes, so two runs can be checked to have used the same tokens."""
  return checkpoint.tree_digest(np.asarray(windows, dtype=np.int32))


def probe_items(path: str | None):
  """Multiple-choice items: the shipped factual-recall probes by default, ``'none'`` for none."""
  if path == 'none':
    return []
  return data_lib.load_mc_jsonl(path or data_lib.probes_path())


def split_list(value: str | Sequence[str]) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(',') if v.strip()]
  return list(value)


def flag_field(default, help: str, choices: Sequence[str] | None = None):
  """A dataclass field that ``define_flags_from`` turns into a flag: its default, help text and,
  for a string, the allowed values (an enum flag)."""
  metadata = {'help': help} if choices is None else {'help': help, 'choices': tuple(choices)}
  return dataclasses.field(default=default, metadata=metadata)


_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           bool: flags.DEFINE_bool}


def _flag_type(tp) -> tuple[type, bool]:
  """``(X, is_tuple)`` of a field typed ``X``, ``X | None`` or ``tuple[X, ...]``."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
  if typing.get_origin(tp) is tuple:
    return typing.get_args(tp)[0], True
  return tp, False


def define_flags_from(cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per field of the dataclass ``cls``, named after the field, with its
  default and the help (and choices) of its ``flag_field``. A ``str``/``int``/``float``/``bool``
  field (or ``X | None``, default None) gets that kind of flag, a field with choices an enum flag
  and a ``tuple[X, ...]`` field a comma-list flag. ``from_flags`` builds ``cls`` back. Example::

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
      bits: int = flag_field(4, 'Weight bits.')
      srr_k: int | None = flag_field(None, 'Preserved rank (default: energy rule).')
      dtype: str = flag_field('float32', 'Compute dtype.', choices=('float32', 'bfloat16'))
      eval_data: tuple[str, ...] = flag_field(('python-docs',), 'Corpora.')

    define_flags_from(Config)      # --bits=3 --srr_k=-1 --dtype=bfloat16 --eval_data=a,b
    ...                            # app.run parses the command line
    c = from_flags(Config)         # Config(bits=3, srr_k=-1, dtype='bfloat16',
                                   #        eval_data=('a', 'b'))
  """
  flags.disclaim_key_flags()  # the flags belong to the caller's module (its --help lists them)
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    help_, choices = f.metadata.get('help'), f.metadata.get('choices')
    if not help_:
      raise ValueError(f'{cls.__name__}.{f.name} has no help text: declare it with flag_field')
    tp, is_tuple = _flag_type(hints[f.name])
    if is_tuple:
      flags.DEFINE_list(f.name, [str(v) for v in f.default], help_, flag_values=flag_values)
    elif choices:
      flags.DEFINE_enum(f.name, f.default, choices, help_, flag_values=flag_values)
    else:
      _DEFINE[tp](f.name, f.default, help_, flag_values=flag_values)


def from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS):
  """The dataclass ``cls`` from the parsed flags of ``define_flags_from(cls)`` (comma lists become
  tuples of the field's element type; raises ValueError on an element that does not convert)."""
  hints = typing.get_type_hints(cls)
  kw = {}
  for f in dataclasses.fields(cls):
    value = getattr(flag_values, f.name)
    tp, is_tuple = _flag_type(hints[f.name])
    if is_tuple:
      try:
        value = tuple(tp(v) for v in split_list(value) if str(v).strip())
      except ValueError as e:
        raise ValueError(f'--{f.name}={",".join(map(str, value))}: {e}') from e
    kw[f.name] = value
  return cls(**kw)


# --------------------------------------------------------------------------- cached models


def slug(name: str) -> str:
  """A file-name-safe form of a row name (``'gptq w3g64'`` -> ``'gptq_w3g64'``)."""
  return ''.join(ch if ch.isalnum() else '_' for ch in name).strip('_')


def cache_key(*parts: Any) -> str:
  """A short hash of what determines a cached result: settings (by ``repr``) and arrays (by
  value, dtype and shape)."""
  h = hashlib.sha256()
  for p in parts:
    is_array = isinstance(p, (np.ndarray, jax.Array))
    h.update(f'{checkpoint.tree_digest(p) if is_array else repr(p)}\n'.encode())
  return h.hexdigest()[:16]


def cached_model(cache_dir: str | os.PathLike, loaded,
                 compute: Callable[[], tuple[Any, Mapping[str, Any]]], *,
                 key: str) -> tuple[Any, dict[str, Any]]:
  """``compute() -> (params, info)`` once: the result is saved under ``cache_dir`` (an orbax
  model checkpoint of a model of ``loaded.config``, read only then, with ``info`` as its
  metadata) and loaded from there on later calls. ``key`` (:func:`cache_key` of the settings and
  inputs) names the result: a cached model of another key is refused with a one-line error, never
  reported as this one. A resumable computation keeps its partial state in
  ``CACHE_DIR.partial``, which is removed once the result is saved."""
  cache = pathlib.Path(cache_dir)
  if (cache / 'structure.json').exists():
    _, params, meta = checkpoint.load_model(cache)
    if meta.get('cache_key') != key:
      raise checkpoint.CheckpointError(
          f'the cached model in {cache} was computed with other settings or inputs; remove it '
          'or use another output directory')
    return params, {k: v for k, v in meta.items() if k not in ('config', 'cache_key')}
  params, info = compute()
  info = to_jsonable(dict(info))
  checkpoint.save_model(cache, params, loaded.config, {**info, 'cache_key': key})
  shutil.rmtree(partial_dir(cache), ignore_errors=True)
  return params, info


def partial_dir(cache_dir: str | os.PathLike) -> str:
  """Where :func:`cached_model`'s computation keeps its resumable state."""
  return str(cache_dir) + '.partial'


# --------------------------------------------------------------------------- evaluation


def windows_by_corpus(tokenizer, eval_data: Sequence[str], eval_windows: int, eval_seqlen: int,
                      other_windows: int | None = None) -> dict[str, np.ndarray]:
  """Test windows of every corpus: ``eval_windows`` of the first, ``other_windows`` (default the
  same) of the others."""
  return {ds: eval_windows_for(tokenizer, ds, eval_seqlen,
                               eval_windows if i == 0 or other_windows is None else other_windows)
          for i, ds in enumerate(eval_data)}


def evaluate_models(loaded, models: Mapping[str, Any], windows: Mapping[str, np.ndarray], *,
                    items: Sequence[Any] = (), pools: Mapping[str, Any] | None = None,
                    dtype=jnp.float32, batch_size: int = 4, progress: bool = True,
                    dense_probes: bool = True,
                    blockwise: bool = False) -> dict[str, dict[str, Any]]:
  """Every model against the dense one (``loaded.params``, computed once per batch) on every
  corpus, and on the multiple-choice ``items``.

  Returns ``{'dense': row, name: row, ...}`` with ``'ppl DS'``, ``'kl DS'``, ``'top1 DS'`` per
  corpus (the dense row: perplexity and ``'eval_tokens DS'``) and ``'probe_acc'`` (None without
  items). A model with a prompt pool in ``pools`` (IDP) is evaluated with each window's and each
  item's routed prompt; it gets perplexity and probe accuracy only. ``dense_probes=False`` leaves
  the dense model's probe accuracy out (e.g. when it was measured before). ``blockwise``: one
  block of one model on the devices at a time (:func:`models.evaluate.compare_blockwise`; the
  dense model's blocks may still be on disk); no prompt pools or items then.
  """
  from recover import prompting  # pylint: disable=g-import-not-at-top
  if blockwise and (pools or items):
    raise ValueError('block-by-block evaluation scores perplexity only (no prompt pools, no items)')
  cfg, tokenizer = loaded.config, loaded.tokenizer()
  pools = dict(pools or {})
  plain = {n: p for n, p in models.items() if n not in pools}
  out: dict[str, dict[str, Any]] = {name: {} for name in ['dense', *models]}
  for ds, win in windows.items():
    res = _compare_spread(loaded.params, plain, cfg, win, blockwise=blockwise,
                          batch_size=batch_size, dtype=dtype, progress=progress,
                          desc=f'eval {ds}')
    out['dense'][f'ppl {ds}'] = res['__ref__']['ppl']
    out['dense'][f'eval_tokens {ds}'] = res['__ref__']['eval_tokens']
    for name in plain:
      out[name].update({f'{k} {ds}': res[name][k] for k in ('ppl', 'kl', 'top1')})
    for name, pool in pools.items():
      pre = prompting.routed_prefixes(models[name], cfg, pool, win, dtype=dtype)
      out[name][f'ppl {ds}'] = eval_lib.perplexity(models[name], cfg, win, batch_size=batch_size,
                                                   dtype=dtype, prefixes=pre, progress=progress,
                                                   desc=f'eval {name} {ds}')['ppl']
  if items:
    ctx = prompting.context_tokens(tokenizer, items) if pools else None
  for name, params in [('dense', loaded.params), *models.items()]:
    if not items or (name == 'dense' and not dense_probes):
      out[name]['probe_acc'] = None
      continue
    pre = None
    if name in pools:
      pre = prompting.routed_prefixes(params, cfg, pools[name], ctx[0], mask=ctx[1], dtype=dtype)
    if pre is not None or distributed.process_count() == 1:
      out[name]['probe_acc'] = eval_lib.score_multiple_choice(
          params, cfg, tokenizer, items, dtype=dtype, prefixes=pre, progress=False)['acc']
    else:  # each process scores its share of the items
      share = list(items)[distributed.process_share(len(items))]
      mc = eval_lib.score_multiple_choice(params, cfg, tokenizer, share, dtype=dtype,
                                          progress=False) if share else {'acc': 0.0}
      correct = distributed.sum_over_processes([mc['acc'] * len(share)])[0]
      out[name]['probe_acc'] = float(correct / max(1, len(items)))
  return out


def _compare_spread(params_ref, models, cfg, windows, *, blockwise: bool, **kwargs):
  """:func:`models.evaluate.compare_many` (or ``compare_blockwise``) of ``windows``; with several
  processes each evaluates its share of the windows on its own devices and the sums are combined
  (the result of one process up to the order of float64 sums)."""
  compare = eval_lib.compare_blockwise if blockwise else eval_lib.compare_many
  if distributed.process_count() == 1:
    return compare(params_ref, models, cfg, windows, **kwargs)
  share = np.asarray(windows)[distributed.process_share(len(windows))]
  res = compare(params_ref, models, cfg, share, **kwargs) if len(share) else None
  names = list(models)
  sums = np.zeros((1 + 3 * len(names),), np.float64)
  count = 0
  if res is not None:
    count = res['__ref__']['eval_tokens']
    sums[0] = np.log(res['__ref__']['ppl']) * count
    for j, name in enumerate(names):
      r = res[name]
      sums[1 + 3 * j:4 + 3 * j] = (np.log(r['ppl']) * count, r['kl'] * count, r['top1'] * count)
  total = distributed.sum_over_processes(np.append(sums, count))
  sums, count = total[:-1], int(round(total[-1]))
  out = {'__ref__': {'ppl': float(np.exp(sums[0] / count)), 'eval_tokens': count}}
  for j, name in enumerate(names):
    nll, kl, top1 = sums[1 + 3 * j:4 + 3 * j] / count
    out[name] = {'ppl': float(np.exp(nll)), 'kl': float(kl), 'top1': float(top1),
                 'eval_tokens': count}
  return out


# --------------------------------------------------------------------------- plots


def line_plot(path: str | os.PathLike, panels: Mapping[str, Mapping[str, tuple[Sequence, Sequence]]],
              *, xlabel: str, ylabel: str, xscale: str | tuple[str, int] | None = None,
              hlines: Mapping[str, Mapping[str, float]] | None = None,
              point_labels: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
              suptitle: str | None = None, panel_size: tuple[float, float] = (5.0, 3.5)) -> None:
  """One PNG of line charts: ``panels[title][series] = (xs, ys)``, one panel per title side by
  side. ``xscale``: ``'log'`` or ``('log', base)``; ``hlines[title][name]``: dashed reference
  levels; ``point_labels[title][series]``: a text beside each point."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]),
                           squeeze=False)
  for ax, (title, series) in zip(axes[0], panels.items()):
    for name, (xs, ys) in series.items():
      ax.plot(xs, ys, marker='o' if len(xs) < 40 else None, label=name)
      for x, y, text in zip(xs, ys, (point_labels or {}).get(title, {}).get(name, ())):
        ax.annotate(text, (x, y), textcoords='offset points', xytext=(4, 4), fontsize=7)
    for name, y in (hlines or {}).get(title, {}).items():
      ax.axhline(y, linestyle='--', linewidth=1, color='gray')
      ax.text(ax.get_xlim()[0], y, f' {name}', va='bottom', fontsize=8, color='gray')
    if xscale is not None:
      kind, base = (xscale, None) if isinstance(xscale, str) else xscale
      ax.set_xscale(kind, **({'base': base} if base else {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9 if len(panels) > 1 else None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if suptitle:
    fig.suptitle(suptitle)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
