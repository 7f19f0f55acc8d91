"""Per-device tuning table: which implementation (and which tiles) multiplies a compressed weight.

``kernels.linear``'s default dispatch asks :func:`choose` for every call it routes through the
built-in Pallas kernels. The answer comes from a JSON table keyed by

* the device kind (``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H100 80GB HBM3"``), or
  ``"default"`` for a device the table does not list;
* the weight format (:func:`format_key`: bits, group size, act-order, 2:4, adapter, serving
  layout), e.g. ``"w4g128"``, ``"w4g128_act"``, ``"w4g128_perm"``, ``"w4g128_lora"``,
  ``"s24_bf16"``, ``"s24_w4g128"``; a key may be an ``fnmatch`` pattern (``"w*"``), tried after
  the exact key;
* the shape bucket (:func:`shape_bucket`: ``K`` and ``N`` rounded up to powers of two, e.g.
  ``"k4096_n16384"`` for a 4096x14336 weight), or ``"*"``;
* the M bucket (:func:`m_bucket`: ``"m1"``, ``"m2-4"``, ``"m5-16"``, ``"m17-64"``, ``"m65-256"``,
  ``"m257+"``), or ``"*"``;

and maps them to an entry ``{"impl": NAME, "block": {BlockSizes fields}}`` (``block`` optional:
the kernel's own default tiles) plus whatever the benchmark measured (kept for the reader)::

  {"version": 1,
   "devices": {"NVIDIA H100 80GB HBM3": {"source": "...",
                                         "formats": {"w4g128": {"k4096_n16384": {"m1": {...}}}}},
               "default": {"formats": {"*": {"*": {"m1": {"impl": "kernel"}, ...}}}}}}

``impl`` is a registered implementation name (``"pallas_lowbit"``, ``"pallas_sparse24"``,
``"xla"``, ...) or ``"kernel"``: the format's own Pallas kernel. ``"xla"`` dequantizes the whole
matrix once into the activation dtype and calls the dense dot, which costs about one dense matmul
plus one elementwise pass over the weight at any M; the kernels dequantize inside their K loop and
win only where the weight's bytes dominate (decode).

Lookup: the device's section, then ``"default"``, then the built-in rule (:func:`builtin_choice`:
the kernel for at most :data:`SMALL_M` rows, ``"xla"`` above). Within a section the exact format
key wins over patterns, an exact bucket over ``"*"``.

Which table: :func:`set_table_path` (``None`` restores the default), else the environment variable
:data:`TABLE_ENV`, else the table shipped next to this module (:data:`SHIPPED_TABLE`; without it,
the built-in rule). ``experiments/bench_kernels.py --write_tuning=PATH`` writes a table from
measured winners (:func:`table_from_rows`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import pathlib
import re
from typing import Any, Iterable

import jax

from kernels import formats
from kernels.pallas_common import BlockSizes

TABLE_ENV = 'COMPRESS_RECOVER_KERNEL_TABLE'
SHIPPED_TABLE = pathlib.Path(__file__).with_name('tuning_table.json')
VERSION = 1
DEFAULT_DEVICE = 'default'
# The built-in rule (an unseen device, format or shape): kernels for decode-sized calls only.
SMALL_M = 16
# Upper edges of the M buckets; the last bucket is open.
M_EDGES = (1, 4, 16, 64, 256)
KERNEL = 'kernel'
_KERNEL_OF_FAMILY = {'w': 'pallas_lowbit', 's24': 'pallas_sparse24'}
_OVERRIDE: dict[str, str | None] = {}


class TuningTableError(ValueError):
  """A tuning table that cannot be read; the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class Choice:
  """What dispatch runs for one call.

  Attributes:
    impl: the implementation name (``"kernel"`` resolved to the format's kernel).
    block: tiles for a kernel, or None for its defaults.
    source: where the answer came from (``"DEVICE/FORMAT/SHAPE/M"`` of the table, or
      ``"built-in"``).
  """
  impl: str
  block: BlockSizes | None
  source: str


# ----------------------------------------------------------------------------------------------
# Keys


def format_key(w) -> str | None:
  """The table's format key of a weight leaf, or None for a leaf no kernel takes (dense, masked).

  ``w{bits}g{group}`` (``gall``: one group per column) with ``_act`` for act-order ``g_idx``;
  ``s24_{dtype}`` or ``s24_w{bits}g{group}`` for 2:4 (the group counted in dense input rows);
  ``_lora`` when a :class:`kernels.formats.LowRank` adapter is attached; ``_perm`` for a
  :class:`kernels.formats.PermutedInput` (the serving layout of act-order: its inner weight's key,
  looked up without the suffix when the table has no entry for it).
  """
  if isinstance(w, formats.PermutedInput):
    inner = format_key(w.inner)
    return None if inner is None else inner + '_perm'
  suffix = ''
  if isinstance(w, formats.CompressedLinear):
    if w.mask is not None:
      return None
    suffix = '_lora' if w.adapter is not None else ''
    w = w.weight
  if isinstance(w, formats.QuantizedWeight):
    return _quant_key(w.bits, w.group_size) + ('_act' if w.g_idx is not None else '') + suffix
  if isinstance(w, formats.Sparse24Weight):
    v = w.values
    if isinstance(v, formats.QuantizedWeight):
      base = _quant_key(v.bits, -1 if v.group_size == -1 else 2 * v.group_size)
    else:
      base = {'bfloat16': 'bf16', 'float16': 'f16', 'float32': 'f32'}.get(str(v.dtype),
                                                                           str(v.dtype))
    return 's24_' + base + suffix
  return None


def _quant_key(bits: int, group: int) -> str:
  return f'w{bits}g{"all" if group == -1 else group}'


def _pow2_at_least(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def shape_bucket(k: int, n: int) -> str:
  """``"k{K'}_n{N'}"`` with ``K'``, ``N'`` the powers of two at or above ``K`` and ``N``."""
  return f'k{_pow2_at_least(k)}_n{_pow2_at_least(n)}'


def m_bucket(m: int) -> str:
  """The bucket of ``m`` activation rows: ``m1``, ``m2-4``, ``m5-16``, ``m17-64``, ``m65-256``,
  ``m257+``."""
  lo = 1
  for hi in M_EDGES:
    if m <= hi:
      return f'm{hi}' if lo == hi else f'm{lo}-{hi}'
    lo = hi + 1
  return f'm{lo}+'


M_BUCKETS = tuple(m_bucket(e) for e in M_EDGES) + (m_bucket(M_EDGES[-1] + 1),)
_M_UPPER = dict(zip(M_BUCKETS, M_EDGES + (float('inf'),)))
_SHAPE_RE = re.compile(r'^k\d+_n\d+$')


def device_kind() -> str:
  """The kind of the first device, the table's device key."""
  d = jax.devices()[0]
  return str(getattr(d, 'device_kind', d.platform))


def kernel_for(fmt: str) -> str:
  """The Pallas kernel that serves format key ``fmt``."""
  return _KERNEL_OF_FAMILY['s24' if fmt.startswith('s24') else 'w']


# ----------------------------------------------------------------------------------------------
# Which table, loading and validation


def set_table_path(path: str | os.PathLike | None) -> None:
  """Reads the table from ``path`` from now on; ``None`` restores the default (:data:`TABLE_ENV`,
  else :data:`SHIPPED_TABLE`). The file is (re)read at the next lookup."""
  if path is None:
    _OVERRIDE.pop('path', None)
  else:
    _OVERRIDE['path'] = os.fspath(path)
  _cached_table.cache_clear()


def table_path() -> pathlib.Path | None:
  """The table the next lookup reads, or None (no file: the built-in rule)."""
  if 'path' in _OVERRIDE:
    return pathlib.Path(_OVERRIDE['path'])
  env = os.environ.get(TABLE_ENV)
  if env:
    return pathlib.Path(env)
  return SHIPPED_TABLE if SHIPPED_TABLE.exists() else None


def _fail(path, what: str):
  raise TuningTableError(f'kernel tuning table {path}: {what}')


def validate(table: Any, path: Any = '<table>') -> dict[str, Any]:
  """Checks the structure of a table; raises :class:`TuningTableError` (one line) if it is wrong."""
  if not isinstance(table, dict) or not isinstance(table.get('devices'), dict):
    _fail(path, 'expected an object with a "devices" object')
  if table.get('version', VERSION) != VERSION:
    _fail(path, f'version {table.get("version")!r}, this code reads version {VERSION}')
  for device, section in table['devices'].items():
    where = f'devices[{device!r}]'
    if not isinstance(section, dict) or not isinstance(section.get('formats', {}), dict):
      _fail(path, f'{where} must be an object with a "formats" object')
    for fmt, shapes in section.get('formats', {}).items():
      if not isinstance(shapes, dict):
        _fail(path, f'{where}.formats[{fmt!r}] must be an object keyed by shape bucket')
      for shape, ms in shapes.items():
        if shape != '*' and not _SHAPE_RE.match(shape):
          _fail(path, f'{where}.formats[{fmt!r}]: bad shape bucket {shape!r} (want "kK_nN" or "*")')
        if not isinstance(ms, dict):
          _fail(path, f'{where}.formats[{fmt!r}][{shape!r}] must be an object keyed by M bucket')
        for mb, entry in ms.items():
          at = f'{where}.formats[{fmt!r}][{shape!r}][{mb!r}]'
          if mb != '*' and mb not in M_BUCKETS:
            _fail(path, f'{at}: unknown M bucket (want one of {", ".join(M_BUCKETS)} or "*")')
          if not isinstance(entry, dict) or not isinstance(entry.get('impl'), str):
            _fail(path, f'{at} must be an object with a string "impl"')
          if entry.get('block') is not None:
            try:
              _block(entry['block'])
            except (TypeError, ValueError) as e:
              _fail(path, f'{at}.block: {str(e).splitlines()[0]}')
  return table


def _block(spec: dict[str, Any]) -> BlockSizes:
  if not isinstance(spec, dict):
    raise TypeError('expected an object of BlockSizes fields')
  return BlockSizes(**spec)


def load_table(path: str | os.PathLike) -> dict[str, Any]:
  """Reads and validates a table file; raises :class:`TuningTableError` with a one-line message."""
  try:
    text = pathlib.Path(path).read_text()
  except OSError as e:
    _fail(path, f'cannot read it ({e.strerror or e})')
  try:
    table = json.loads(text)
  except json.JSONDecodeError as e:
    _fail(path, f'invalid JSON at line {e.lineno} column {e.colno}: {e.msg}')
  return validate(table, path)


@functools.lru_cache(maxsize=1)
def _cached_table(path: str | None) -> dict[str, Any] | None:
  return None if path is None else load_table(path)


def current_table() -> dict[str, Any] | None:
  """The table the dispatch reads now (cached until :func:`set_table_path`), or None."""
  path = table_path()
  return _cached_table(None if path is None else os.fspath(path))


# ----------------------------------------------------------------------------------------------
# Lookup


def builtin_choice(fmt: str, m: int) -> Choice:
  """The rule without a table: the format's kernel for at most :data:`SMALL_M` rows, else the
  dequantize-then-dot ``"xla"`` path (never a per-row-tile dequantization at prefill sizes)."""
  return Choice(kernel_for(fmt) if m <= SMALL_M else 'xla', None, 'built-in')


def _section_entry(section: dict[str, Any], fmt: str, sb: str, mb: str):
  fmts = section.get('formats', {})
  keys = [f for f in (fmt, fmt.removesuffix('_perm')) if f in fmts]
  keys += [p for p in fmts if any(c in p for c in '*?[') and fnmatch.fnmatchcase(fmt, p)]
  for key in dict.fromkeys(keys):
    shapes = fmts[key]
    for s in (sb, '*'):
      if s in shapes:
        for mk in (mb, '*'):
          if mk in shapes[s]:
            return f'{key}/{s}/{mk}', shapes[s][mk]
  return None


def lookup(fmt: str, k: int, n: int, m: int, *, device: str | None = None,
           table: dict[str, Any] | None | str = 'current') -> Choice:
  """The choice for format key ``fmt``, weight ``[k, n]`` and ``m`` rows on ``device`` (default:
  :func:`device_kind`) in ``table`` (default: :func:`current_table`; None: the built-in rule)."""
  if table == 'current':
    table = current_table()
  if table is None:
    return builtin_choice(fmt, m)
  device = device_kind() if device is None else device
  sb, mb = shape_bucket(k, n), m_bucket(m)
  devices = table['devices']
  for name in dict.fromkeys((device, DEFAULT_DEVICE)):
    if name in devices:
      hit = _section_entry(devices[name], fmt, sb, mb)
      if hit is not None:
        where, entry = hit
        impl = entry['impl']
        impl = kernel_for(fmt) if impl == KERNEL else impl
        block = entry.get('block')
        return Choice(impl, None if block is None else _block(block), f'{name}/{where}')
  return builtin_choice(fmt, m)


def choose(x, w) -> Choice | None:
  """The dispatch choice for ``linear(x, w)``, or None for a leaf no kernel takes."""
  fmt = format_key(w)
  if fmt is None:
    return None
  k, n = w.shape
  m = 1
  for d in x.shape[:-1]:
    m *= d
  return lookup(fmt, k, n, m)


# ----------------------------------------------------------------------------------------------
# Writing a table from measurements


def block_to_dict(b: BlockSizes) -> dict[str, Any]:
  return dataclasses.asdict(b)


_BLOCK_RE = re.compile(r'^m(\d+)n(\d+)k(\d+)s(\d+)(g?)w(\d+)p(\d+)$')


def parse_block(s: str) -> BlockSizes:
  """Inverse of the benchmark's tile string ``m{bm}n{bn}k{bk}s{split}[g]w{warps}p{stages}``."""
  mt = _BLOCK_RE.match(s)
  if not mt:
    raise ValueError(f'bad tile string {s!r}')
  bm, bn, bk, split, g, warps, stages = mt.groups()
  return BlockSizes(block_m=int(bm), block_n=int(bn), block_k=int(bk), split_k=int(split),
                    gemv=bool(g), num_warps=int(warps), num_stages=int(stages))


def _candidates(row: dict[str, Any]) -> dict[str, tuple[float, str | None]]:
  """``impl -> (microseconds, tile string)`` measured in one benchmark row."""
  out: dict[str, tuple[float, str | None]] = {}
  kernel = row.get('impl')
  if kernel and row.get('time_us') is not None:
    out[kernel] = (row['time_us'], None)
  if kernel and row.get('sweep_best_us') is not None and row.get('sweep_best_block') not in (
      None, 'default') and row['sweep_best_us'] < out.get(kernel, (float('inf'),))[0]:
    out[kernel] = (row['sweep_best_us'], row['sweep_best_block'])
  if row.get('xla_us') is not None:
    out['xla'] = (row['xla_us'], None)
  return out


def table_from_rows(rows: Iterable[dict[str, Any]], device: str, *, source: str = '',
                    base: dict[str, Any] | None = None) -> dict[str, Any]:
  """A table whose ``device`` section holds the measured winners of benchmark ``rows``.

  Each row needs ``format_key``, ``K``, ``N``, ``M`` and the times it measured: ``time_us`` (the
  kernel ``impl`` with its default tiles), ``sweep_best_us``/``sweep_best_block`` (its best swept
  tiles), ``xla_us`` (dequantize then dot) and ``bf16_us``. Per (format, shape bucket, M bucket)
  the implementation with the least total time over the bucket's rows wins; with no ``xla_us``
  in a bucket the kernel wins only if it beat bf16 in every row (dequantize-then-dot is never
  faster than the bf16 dot itself), otherwise the built-in rule decides. Tiles are kept only when
  every row of the bucket chose the same swept tile. Buckets above the largest measured M take
  ``"xla"``, except those up to :data:`SMALL_M` rows when that M's winner was a kernel that beat a
  measured xla time. ``base`` (e.g.
  the table already on disk) is kept and merged: other devices' sections as they are, and in
  ``device``'s section every bucket this run did not measure (so several runs, e.g. one per
  shape, add up to one table).
  """
  buckets: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
  for r in rows:
    if r.get('format_key') is None or r.get('M') is None:
      continue
    key = (r['format_key'], shape_bucket(r['K'], r['N']), m_bucket(r['M']))
    buckets.setdefault(key, []).append(r)
  fmts: dict[str, dict[str, dict[str, Any]]] = {}
  order = lambda kv: (kv[0][0], kv[0][1], M_BUCKETS.index(kv[0][2]))
  for (fmt, sb, mb), rs in sorted(buckets.items(), key=order):
    cands = [_candidates(r) for r in rs]
    impls = set().union(*cands)
    entry: dict[str, Any]
    if not impls:
      continue
    if 'xla' in impls:
      totals = {i: sum(c[i][0] for c in cands) for i in impls if all(i in c for c in cands)}
      if not totals:
        continue
      impl = min(totals, key=totals.get)
      basis = 'fastest measured'
    else:
      kern = next(iter(impls))
      beat = all(kern in c and r.get('bf16_us') and c[kern][0] < r['bf16_us']
                 for c, r in zip(cands, rs))
      m_max = max(r['M'] for r in rs)
      impl = kern if beat else builtin_choice(fmt, m_max).impl
      basis = 'kernel beat bf16' if beat else 'built-in rule (no xla time measured)'
    entry = {'impl': impl, 'basis': basis}
    tiles = {c[impl][1] for c in cands if impl in c}
    if impl != 'xla' and len(tiles) == 1 and None not in tiles:
      entry['block'] = block_to_dict(parse_block(tiles.pop()))
    for name in ('speedup_vs_bf16', 'xla_us', 'time_us', 'bf16_us'):
      vals = [r[name] for r in rs if r.get(name) is not None]
      if vals:
        entry[name if len(vals) == 1 else f'{name}_min'] = float(f'{min(vals):.3g}')
    entry['shapes'] = sorted({f'{r["K"]}x{r["N"]}' for r in rs})
    fmts.setdefault(fmt, {}).setdefault(sb, {})[mb] = entry
  for shapes in fmts.values():  # above the largest measured M: the dense dot's regime
    for ms in shapes.values():
      top = max(ms, key=lambda b: M_BUCKETS.index(b))
      for mb in M_BUCKETS[M_BUCKETS.index(top) + 1:]:
        small = _M_UPPER[mb] <= SMALL_M
        kept = small and ms[top]['impl'] != 'xla' and 'xla_us' in ms[top]
        ms[mb] = {'impl': ms[top]['impl'] if kept else 'xla',
                  'basis': f'extrapolated from {top}', **(
                      {'block': ms[top]['block']} if kept and 'block' in ms[top] else {})}
  table = json.loads(json.dumps(base)) if base else {'version': VERSION, 'devices': {}}
  old = table['devices'].get(device, {})
  merged = old.get('formats', {})
  for fmt, shapes in fmts.items():
    for sb, ms in shapes.items():
      have = merged.setdefault(fmt, {}).setdefault(sb, {})
      for mb, entry in ms.items():
        guessed = entry.get('basis', '').startswith('extrapolated')
        if not (guessed and mb in have and not have[mb].get('basis', '').startswith('extrap')):
          have[mb] = entry
  sources = [x for x in (old.get('source'), source) if x]
  table['devices'][device] = {'source': '; '.join(dict.fromkeys(sources)), 'formats': merged}
  if DEFAULT_DEVICE not in table['devices']:
    table['devices'][DEFAULT_DEVICE] = default_section()
  return validate(table)


def default_section() -> dict[str, Any]:
  """The ``"default"`` section: the built-in rule written out (kernels up to :data:`SMALL_M`
  rows, dequantize-then-dot above)."""
  ms = {mb: {'impl': KERNEL if hi <= SMALL_M else 'xla'}
        for mb, hi in zip(M_BUCKETS, M_EDGES + (M_EDGES[-1] + 1,))}
  return {'source': 'built-in rule: Pallas kernels for decode-sized calls (M <= 16), the '
                    'dequantize-then-dense-dot path (xla) above',
          'formats': {'*': {'*': ms}}}


def dumps(table: dict[str, Any]) -> str:
  """The table as JSON text, one line per M-bucket entry."""
  def fmt(obj, depth: int) -> str:
    # depth 0: table, 1: devices, 2: a device section, 3: formats, 4: a format, 5: a shape bucket
    if not isinstance(obj, dict) or depth >= 6 or not obj:
      return json.dumps(obj)
    pad, inner = ' ' * depth, ' ' * (depth + 1)
    items = [f'{inner}{json.dumps(k)}: {fmt(v, depth + 1)}' for k, v in obj.items()]
    return '{\n' + ',\n'.join(items) + '\n' + pad + '}'
  return fmt(table, 0) + '\n'


def write_table(path: str | os.PathLike, table: dict[str, Any]) -> None:
  """Writes a validated table (atomically: a temporary file renamed)."""
  validate(table, path)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(dumps(table))
  os.replace(tmp, path)
  _cached_table.cache_clear()
