r"""One self-contained HTML page for a run or a sweep, to open in a browser.

  python -m experiments.report results/gptq3_eora64      # writes results/gptq3_eora64/report.html
  python -m experiments.report results/eora results/srr --out=tables.html

For each DIR (an output directory of ``experiments.compress``, or a table directory under
``results/`` such as ``results/eora``) the page shows its title, the scalar fields of its
``results.json`` flattened into one table (nested keys joined with ``.``: the method, perplexities
per corpus, sizes, times, whatever the run recorded; the bookkeeping sections ``flags``,
``config`` and ``environment`` folded away below it, lists of records counted, not repeated),
every markdown file (``*.md``) in it rendered to HTML (tables, headings, lists, paragraphs) and
every PNG plot embedded as a base64 data URI, so the page is one file that can be mailed or
archived. Subdirectories that hold a ``results.json`` (the runs of a sweep) get a section each,
one level deep. The page is written to ``DIR/report.html`` for one DIR, else to
``./report.html`` (``--out`` chooses). A DIR that does not exist or holds nothing to report is
one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import math
import pathlib
import re
import sys
from typing import Any, Iterable, Sequence

from absl import app, flags

REPORT_NAME = 'report.html'
RESULTS_NAME = 'results.json'
# results.json sections of settings and provenance rather than results: shown folded.
BOOKKEEPING = ('flags', 'config', 'environment')
# A list of scalars longer than this is summarized instead of listed.
MAX_LIST_ITEMS = 16


class ReportError(ValueError):
  """A DIR that cannot be reported (missing, or holding nothing to report)."""


# --------------------------------------------------------------------------- results.json


def _format_value(value: Any) -> str:
  """A scalar as a table cell: floats to 4 significant digits (scientific when large or small)."""
  if isinstance(value, bool) or value is None:
    return json.dumps(value)
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
      return f'{value:.4e}'
    return f'{value:.4g}' if abs(value) < 10 else f'{value:.2f}'
  return str(value)


def flatten(record: Any, prefix: str = '') -> list[tuple[str, str]]:
  """``(dotted key, cell text)`` for every scalar of a decoded JSON value: nested objects are
  walked (keys joined with ``.``), a list of scalars is listed (up to `MAX_LIST_ITEMS`, else
  counted) and a list holding objects or lists is counted."""
  if isinstance(record, dict):
    rows = []
    for key, value in record.items():
      rows += flatten(value, f'{prefix}.{key}' if prefix else str(key))
    return rows
  if isinstance(record, list):
    if all(not isinstance(v, (dict, list)) for v in record) and len(record) <= MAX_LIST_ITEMS:
      return [(prefix, ', '.join(_format_value(v) for v in record) or '[]')]
    kind = 'records' if record and all(isinstance(v, dict) for v in record) else 'items'
    return [(prefix, f'[{len(record)} {kind}]')]
  return [(prefix, _format_value(record))]


def _key_value_table(rows: Sequence[tuple[str, str]]) -> str:
  body = ''.join(f'<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>' for k, v in rows)
  return f'<table class="kv"><tbody>{body}</tbody></table>\n'


def results_html(results: Any) -> str:
  """The key figures of a decoded ``results.json``: its scalars in one table, the bookkeeping
  sections (`BOOKKEEPING`) each folded in a ``<details>`` below."""
  if not isinstance(results, dict):
    return _key_value_table(flatten(results, 'value'))
  main = {k: v for k, v in results.items() if k not in BOOKKEEPING}
  parts = [_key_value_table(flatten(main))] if main else []
  for section in BOOKKEEPING:
    if section in results:
      rows = flatten(results[section])
      parts.append(f'<details><summary>{html.escape(section)} ({len(rows)} fields)</summary>'
                   f'{_key_value_table(rows)}</details>\n')
  return ''.join(parts)


# --------------------------------------------------------------------------- markdown

_TABLE_SEPARATOR = re.compile(r'^\s*:?-+:?\s*$')
_HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
_LIST_ITEM = re.compile(r'^(\s*)([-*+]|\d+[.)])\s+(.*)$')
_FENCE = re.compile(r'^\s*(```|~~~)')
_CODE_SPAN = re.compile(r'(`+)(.+?)\1')
_STRONG = re.compile(r'\*\*(.+?)\*\*')
_EMPHASIS = re.compile(r'(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])')


def inline_html(text: str) -> str:
  """Escapes ``text`` for HTML and renders code spans, ``**strong**`` and ``*emphasis*``."""
  out, start = [], 0
  for match in _CODE_SPAN.finditer(text):
    out.append(_emphasis(html.escape(text[start:match.start()])))
    out.append(f'<code>{html.escape(match.group(2).strip())}</code>')
    start = match.end()
  out.append(_emphasis(html.escape(text[start:])))
  return ''.join(out)


def _emphasis(escaped: str) -> str:
  return _EMPHASIS.sub(r'<em>\1</em>', _STRONG.sub(r'<strong>\1</strong>', escaped))


def split_row(line: str) -> list[str]:
  """The cells of a markdown table row (``| a | b |``; ``\\|`` is a literal bar)."""
  line = line.strip()
  if line.startswith('|'):
    line = line[1:]
  if line.endswith('|') and not line.endswith('\\|'):
    line = line[:-1]
  return [cell.strip().replace('\\|', '|') for cell in re.split(r'(?<!\\)\|', line)]


def table_html(lines: Sequence[str]) -> str:
  """A markdown table (its ``|`` lines) as an HTML table: the row above a ``|---|`` separator
  is the header (``:--``, ``:-:``, ``--:`` align its column), rows are padded to the header's
  width."""
  rows = [split_row(line) for line in lines]
  head, align = None, []
  if len(rows) >= 2 and rows[1] and all(_TABLE_SEPARATOR.match(c) for c in rows[1]):
    head, rows = rows[0], rows[2:]
    for cell in split_row(lines[1]):
      left, right = cell.startswith(':'), cell.endswith(':')
      align.append('center' if left and right else 'right' if right else 'left' if left else '')
  width = max([len(head or [])] + [len(r) for r in rows])

  def cells(row: list[str], tag: str) -> str:
    row = row + [''] * (width - len(row))
    out = []
    for i, cell in enumerate(row):
      style = f' style="text-align:{align[i]}"' if i < len(align) and align[i] else ''
      out.append(f'<{tag}{style}>{inline_html(cell)}</{tag}>')
    return '<tr>' + ''.join(out) + '</tr>'

  thead = f'<thead>{cells(head, "th")}</thead>' if head is not None else ''
  tbody = ''.join(cells(r, 'td') for r in rows)
  return f'<table>{thead}<tbody>{tbody}</tbody></table>\n'


def list_html(lines: Sequence[str]) -> str:
  """A markdown list as HTML: an item indented more than the one above opens a list inside it,
  and a line that is not an item continues the deepest item indented less than it."""

  def new_list(indent: int, marker: str) -> dict[str, Any]:
    return {'indent': indent, 'ordered': marker[0].isdigit(), 'items': []}

  first = _LIST_ITEM.match(lines[0])
  stack = [new_list(len(first.group(1)), first.group(2))]  # the open lists, outermost first
  for line in lines:
    if not line.strip():
      continue
    item = _LIST_ITEM.match(line)
    indent = len(line) - len(line.lstrip())
    if item:
      while len(stack) > 1 and indent < stack[-1]['indent']:
        stack.pop()
      if indent > stack[-1]['indent'] and stack[-1]['items']:
        sub = new_list(indent, item.group(2))
        stack[-1]['items'][-1].append(sub)
        stack.append(sub)
      stack[-1]['items'].append([item.group(3)])
      continue
    while len(stack) > 1 and indent <= stack[-1]['indent']:
      stack.pop()
    parts = stack[-1]['items'][-1]
    if isinstance(parts[-1], str):
      parts[-1] += ' ' + line.strip()
    else:
      parts.append(line.strip())

  def render(lst: dict[str, Any]) -> str:
    tag = 'ol' if lst['ordered'] else 'ul'
    items = ''.join('<li>' + ''.join(inline_html(p) if isinstance(p, str) else render(p)
                                     for p in parts) + '</li>' for parts in lst['items'])
    return f'<{tag}>{items}</{tag}>'

  return render(stack[0]) + '\n'


def markdown_html(text: str, heading_offset: int = 2) -> str:
  """A small markdown-to-HTML converter for the files the experiments write: ``#`` headings
  (shifted down by ``heading_offset`` levels, at most ``<h6>``), pipe tables, fenced code,
  ``-``/``*``/``1.`` lists (indented lines continue an item) and paragraphs; inline code spans,
  ``**strong**`` and ``*emphasis*``. All text is HTML-escaped."""
  lines = text.splitlines()
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    if not line.strip():
      i += 1
    elif _FENCE.match(line):
      fence = _FENCE.match(line).group(1)
      j = i + 1
      while j < len(lines) and not lines[j].strip().startswith(fence):
        j += 1
      out.append(f'<pre><code>{html.escape(chr(10).join(lines[i + 1:j]))}</code></pre>\n')
      i = j + 1
    elif (heading := _HEADING.match(line)):
      level = min(6, len(heading.group(1)) + heading_offset)
      out.append(f'<h{level}>{inline_html(heading.group(2))}</h{level}>\n')
      i += 1
    elif line.lstrip().startswith('|'):
      j = i
      while j < len(lines) and lines[j].lstrip().startswith('|'):
        j += 1
      out.append(table_html(lines[i:j]))
      i = j
    elif _LIST_ITEM.match(line):
      j = i
      while j < len(lines) and lines[j].strip():
        j += 1
        while j < len(lines) and not lines[j].strip() and j + 1 < len(lines) and (
            _LIST_ITEM.match(lines[j + 1]) or lines[j + 1][:1].isspace()):
          j += 1  # a blank line inside the list
      out.append(list_html(lines[i:j]))
      i = j
    else:
      j = i
      while (j < len(lines) and lines[j].strip() and not _HEADING.match(lines[j])
             and not lines[j].lstrip().startswith('|') and not _FENCE.match(lines[j])
             and not (j > i and _LIST_ITEM.match(lines[j]))):
        j += 1
      out.append(f'<p>{inline_html(" ".join(l.strip() for l in lines[i:j]))}</p>\n')
      i = j
  return ''.join(out)


# --------------------------------------------------------------------------- directories


@dataclasses.dataclass
class Section:
  """What one directory contributes to the page."""
  path: pathlib.Path
  results: Any = None
  results_error: str | None = None
  markdown: list[pathlib.Path] = dataclasses.field(default_factory=list)
  plots: list[pathlib.Path] = dataclasses.field(default_factory=list)

  @property
  def empty(self) -> bool:
    return (self.results is None and self.results_error is None and not self.markdown
            and not self.plots)


def _read_section(directory: pathlib.Path) -> Section:
  section = Section(directory)
  results_path = directory / RESULTS_NAME
  if results_path.is_file():
    try:
      section.results = json.loads(results_path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      section.results_error = f'{results_path.name} could not be read: {e}'
  section.markdown = sorted(p for p in directory.glob('*.md') if p.is_file())
  section.plots = sorted(p for p in directory.glob('*.png') if p.is_file())
  return section


def collect(directory: str | pathlib.Path) -> tuple[Section, list[Section]]:
  """``(the directory's own section, one per subdirectory that holds a results.json)``, the
  subdirectories (the runs of a sweep) in name order; the own section may be empty.

  Raises:
    ReportError: the directory does not exist, or neither it nor a subdirectory holds anything
      to report (a ``results.json``, ``*.md``, ``*.png``).
  """
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise ReportError(f'{directory}: ' + ('not a directory' if root.exists() else
                                          'no such directory'))
  runs = [_read_section(sub) for sub in sorted(root.iterdir())
          if sub.is_dir() and (sub / RESULTS_NAME).is_file()]
  own = _read_section(root)
  if own.empty and not runs:
    raise ReportError(f'{directory} holds nothing to report: no {RESULTS_NAME}, *.md or *.png, '
                      f'and no subdirectory with a {RESULTS_NAME}')
  return own, runs


def _title(section: Section) -> str:
  """The directory's name, with what its results say it is (method and model) or the first
  heading of its markdown."""
  name = section.path.resolve().name or str(section.path)
  results = section.results if isinstance(section.results, dict) else {}
  what = ' on '.join(str(results[k]) for k in ('method', 'model') if results.get(k))
  if not what:  # table.md (the main table of a script) first
    for path in sorted(section.markdown, key=lambda p: p.name != 'table.md'):
      heading = next((m.group(2) for line in path.read_text(encoding='utf-8',
                                                            errors='replace').splitlines()
                      if (m := _HEADING.match(line))), None)
      if heading:
        what = heading
        break
  return f'{name}: {what}' if what else name


def _png_html(path: pathlib.Path) -> str:
  data = base64.b64encode(path.read_bytes()).decode('ascii')
  return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'
          f'<figcaption>{html.escape(path.name)}</figcaption></figure>\n')


def section_html(section: Section, level: int, children: Sequence[Section] = ()) -> str:
  """One directory's part of the page, under an ``<h{level}>`` title, with its ``children``
  (subdirectories) one level down."""
  parts = [f'<section><h{level}>{html.escape(_title(section))}</h{level}>\n',
           f'<p class="path">{html.escape(str(section.path))}</p>\n']
  if section.results_error:
    parts.append(f'<p class="error">{html.escape(section.results_error)}</p>\n')
  elif section.results is not None:
    parts.append(f'<h{level + 1}>{RESULTS_NAME}</h{level + 1}>\n{results_html(section.results)}')
  for path in section.markdown:
    text = path.read_text(encoding='utf-8', errors='replace')
    parts.append(f'<div class="md"><h{level + 1}>{html.escape(path.name)}</h{level + 1}>\n'
                 f'{markdown_html(text, heading_offset=level + 1)}</div>\n')
  for path in section.plots:
    parts.append(_png_html(path))
  parts += [section_html(child, level + 1) for child in children]
  parts.append('</section>\n')
  return ''.join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
thead th { background: #f0f0f0; }
table.kv th { background: #f7f7f7; font-weight: normal; font-family: monospace; }
code, pre { font-family: ui-monospace, monospace; background: #f5f5f5; }
pre { padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; }
figcaption, .path { color: #666; font-size: 0.85em; }
.error { color: #a00; }
section { border-top: 2px solid #ddd; margin-top: 1.5em; }
section section { border-top: 1px dashed #ddd; margin-left: 1em; }
details { margin: 0.4em 0; }
"""


def report_html(directories: Iterable[str | pathlib.Path]) -> str:
  """The page for ``directories`` (:func:`collect` each; raises ReportError for the first that
  cannot be reported)."""
  directories = list(directories)
  collected = [collect(d) for d in directories]  # every directory checked before any rendering
  names = ', '.join(str(d) for d in directories)
  body = [section_html(own, 2, runs) for own, runs in collected]
  stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<title>Report: {html.escape(names)}</title><style>{_STYLE}</style></head><body>\n'
          f'<h1>Report: {html.escape(names)}</h1>\n<p class="path">written {stamp} by '
          'python -m experiments.report</p>\n' + ''.join(body) + '</body></html>\n')


def default_out(directories: Sequence[str | pathlib.Path]) -> pathlib.Path:
  """``DIR/report.html`` for one directory, else ``./report.html``."""
  if len(directories) == 1:
    return pathlib.Path(directories[0]) / REPORT_NAME
  return pathlib.Path(REPORT_NAME)


def write_report(directories: Sequence[str | pathlib.Path],
                 out: str | pathlib.Path | None = None) -> pathlib.Path:
  """Writes the page for ``directories`` to ``out`` (default :func:`default_out`); returns its
  path. Raises ReportError (nothing written) for a directory that cannot be reported."""
  if not directories:
    raise ReportError('name at least one directory: python -m experiments.report DIR... '
                      '[--out=report.html]')
  page = report_html(directories)
  path = pathlib.Path(out) if out else default_out(directories)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(page, encoding='utf-8')
  return path


# --------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  flags.DEFINE_string('out', None, 'Where to write the page (default: DIR/report.html for one '
                      'DIR, else ./report.html).', flag_values=flag_values)


def main(argv: Sequence[str]) -> int | None:
  try:
    path = write_report(argv[1:], FLAGS.out)
  except (ReportError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {path}')
  return None


if __name__ == '__main__':
  define_flags()
  app.run(main)
