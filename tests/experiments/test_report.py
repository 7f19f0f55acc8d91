"""``python -m experiments.report``: one self-contained HTML page of runs and table directories."""

import base64
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from experiments import report

REPO = pathlib.Path(__file__).resolve().parents[2]

TABLES_MD = """\
# Sweep of <ranks> & "bits"

| method | ppl python-docs | note |
|:---|---:|:-:|
| gptq w3g64 | 56.92 | a \\| b |
| eora r64 | 24.54 | <script>alert(1)</script> |

Some *prose* with `code <x>` and **bold**.

- item one
  continued
- item two
"""


def _png(path: pathlib.Path) -> bytes:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(1, 1))
  ax.plot([0, 1], [1, 0])
  fig.savefig(path, dpi=20)
  plt.close(fig)
  return path.read_bytes()


@pytest.fixture
def run_dir(tmp_path):
  """A fake run directory: results.json, a markdown table, a PNG, a sweep run and a checkpoint."""
  run = tmp_path / 'gptq3_eora64'
  run.mkdir()
  results = {'model': 'tiny-llama', 'method': 'gptq w3g64 <eora>', 'ppl_dense': 20.8812,
             'compress_seconds': 12.5, 'calib_tokens': 32768, 'complete': True,
             'per_dataset': {'python-docs': {'ppl_compressed': 56.9234},
                             'shakespeare': {'ppl_compressed': 244.01}},
             'layers': [{'path': 'layers/0/q', 'rel_error': 0.1}] * 3,
             'eval_data': ['python-docs', 'shakespeare'],
             'flags': {'bits': 3, 'out_dir': 'results/x'}, 'environment': {'git_sha': 'abc123'}}
  (run / 'results.json').write_text(json.dumps(results))
  (run / 'tables.md').write_text(TABLES_MD)
  png = _png(run / 'curve.png')
  sweep = run / 'rank_8'
  sweep.mkdir()
  (sweep / 'results.json').write_text(json.dumps({'method': 'rank 8', 'ppl_recovered': 30.5}))
  (run / 'checkpoint').mkdir()  # no results.json: not a section
  (run / 'checkpoint' / 'notes.md').write_text('| not | shown |\n')
  return run, png


def test_report_of_a_run_directory(run_dir):
  run, png = run_dir
  path = report.write_report([str(run)])
  assert path == run / 'report.html'
  page = path.read_text()
  assert page.startswith('<!DOCTYPE html>')
  # The title and the scalars of results.json, nested keys dotted, text escaped.
  assert '<h2>gptq3_eora64: gptq w3g64 &lt;eora&gt; on tiny-llama</h2>' in page
  for key, value in [('ppl_dense', '20.88'), ('compress_seconds', '12.50'),
                     ('calib_tokens', '32768'), ('complete', 'true'),
                     ('per_dataset.python-docs.ppl_compressed', '56.92'),
                     ('per_dataset.shakespeare.ppl_compressed', '244.01'),
                     ('layers', '[3 records]'), ('eval_data', 'python-docs, shakespeare'),
                     ('bits', '3'), ('git_sha', 'abc123')]:
    assert f'<th>{key}</th><td>{value}</td>' in page, key
  assert '<summary>flags (2 fields)</summary>' in page
  # The markdown table: header, alignment, cells, escaped pipe and escaped HTML.
  assert ('<thead><tr><th style="text-align:left">method</th><th style="text-align:right">ppl '
          'python-docs</th><th style="text-align:center">note</th></tr></thead>') in page
  assert ('<td style="text-align:left">gptq w3g64</td><td style="text-align:right">56.92</td>'
          in page)
  assert '<td style="text-align:center">a | b</td>' in page
  assert '&lt;script&gt;alert(1)&lt;/script&gt;' in page and '<script>' not in page
  assert '<h4>Sweep of &lt;ranks&gt; &amp; &quot;bits&quot;</h4>' in page
  assert ('<p>Some <em>prose</em> with <code>code &lt;x&gt;</code> and <strong>bold</strong>.</p>'
          in page)
  assert '<ul><li>item one continued</li><li>item two</li></ul>' in page
  # The PNG, embedded: the page is one file.
  images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
  assert [base64.b64decode(i) for i in images] == [png]
  # The sweep's run, one level down; the checkpoint directory is not a run.
  assert '<h3>rank_8: rank 8</h3>' in page and '<th>ppl_recovered</th><td>30.50</td>' in page
  assert 'notes.md' not in page and 'not | shown' not in page


def test_markdown_tables():
  assert report.split_row('| a | b \\| c | d |') == ['a', 'b | c', 'd']
  html = report.table_html(['| x | y |', '|---|---|', '| 1 |', '| 2 | 3 | 4 |'])
  assert html == ('<table><thead><tr><th>x</th><th>y</th><th></th></tr></thead><tbody>'
                  '<tr><td>1</td><td></td><td></td></tr><tr><td>2</td><td>3</td><td>4</td></tr>'
                  '</tbody></table>\n')
  assert report.table_html(['| a | b |']) == (
      '<table><tbody><tr><td>a</td><td>b</td></tr></tbody></table>\n')  # no header row
  assert report.markdown_html('```\n<a> | b\n```\n', 2) == '<pre><code>&lt;a&gt; | b</code></pre>\n'
  assert report.markdown_html('1. one\n   - sub\n   tail\n2. two\n') == (
      '<ol><li>one<ul><li>sub</li></ul>tail</li><li>two</li></ol>\n')


def test_flatten():
  assert report.flatten({'a': {'b': 1.23456, 'c': [1, 2]}, 'd': None, 'e': [{'x': 1}],
                         'f': list(range(40)), 'g': 3e-7, 'h': float('nan')}) == [
      ('a.b', '1.235'), ('a.c', '1, 2'), ('d', 'null'), ('e', '[1 records]'),
      ('f', '[40 items]'), ('g', '3.0000e-07'), ('h', 'nan')]


def test_errors_and_defaults(tmp_path, run_dir):
  run, _ = run_dir
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(report.ReportError, match='no such directory'):
    report.collect(tmp_path / 'missing')
  with pytest.raises(report.ReportError, match=r'empty holds nothing to report: no results\.json'):
    report.collect(empty)
  with pytest.raises(report.ReportError, match='name at least one directory'):
    report.write_report([])
  assert report.default_out([run]) == run / 'report.html'
  assert report.default_out([run, empty]) == pathlib.Path('report.html')
  sweep_only = tmp_path / 'sweep'
  (sweep_only / 'a').mkdir(parents=True)
  (sweep_only / 'a' / 'results.json').write_text('{"x": 1}')
  own, runs = report.collect(sweep_only)
  assert own.empty and [r.path.name for r in runs] == ['a']


def _cli(*args, cwd=REPO):
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [str(REPO), *filter(None, [os.environ.get('PYTHONPATH')])])}
  return subprocess.run([sys.executable, '-m', 'experiments.report', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120, env=env)


def test_command_line(tmp_path, run_dir):
  run, _ = run_dir
  missing = tmp_path / 'missing'
  proc = _cli(str(run), str(missing))
  assert proc.returncode == 2 and proc.stderr == f'error: {missing}: no such directory\n'
  assert not (run / 'report.html').exists() and not (REPO / 'report.html').exists()
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'table.md').write_text('| a |\n|---|\n| 1 |\n')
  proc = _cli(str(run), str(other), cwd=tmp_path)  # two directories: ./report.html
  assert proc.returncode == 0, proc.stderr
  page = (tmp_path / 'report.html').read_text()
  assert '<h2>gptq3_eora64: ' in page and '<h2>other</h2>' in page
  proc = _cli(str(run), f'--out={tmp_path / "one.html"}')
  assert proc.returncode == 0 and (tmp_path / 'one.html').exists()


def test_report_of_a_real_results_directory(tmp_path):
  """A table directory of the repository (results/srr: two markdown files, a plot): every table
  of its markdown is on the page, header cell by header cell, and every plot is embedded."""
  directory = REPO / 'results' / 'srr'
  page = report.write_report([directory], tmp_path / 'srr.html').read_text()
  markdown = sorted(directory.glob('*.md'))
  plots = sorted(directory.glob('*.png'))
  assert markdown and plots
  tables = 0
  for path in markdown:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
      if line.startswith('|') and i + 1 < len(lines) and lines[i + 1].startswith('|---'):
        tables += 1
        head = ''.join(f'<th>{report.inline_html(c)}</th>' for c in report.split_row(line))
        assert f'<thead><tr>{head}</tr></thead>' in page, (path.name, line)
  assert page.count('<table>') == tables
  assert page.count('<img src="data:image/png;base64,') == len(plots)
  assert '<th>seconds</th>' in page  # a scalar of its results.json
