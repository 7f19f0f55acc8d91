"""The README's ten-line example runs as written (on the tiny model and small sizes)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _example() -> str:
  text = README.read_text()
  section = text[text.index('## Ten lines'):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # EoRA on a tiny random model
def test_ten_line_example_runs(capsys):
  pytest.importorskip('transformers')
  code = _example()
  assert len([l for l in code.splitlines() if l.strip()]) <= 10
  small = (code.replace("'smollm2-135m'", "'tiny-llama'")
           .replace(', 64, 512, seed=0)', ', 4, 32, seed=0)')
           .replace('group_size=64', 'group_size=32')
           .replace('rank=64', 'rank=4')
           .replace(', 512, 40)', ', 32, 2)'))
  assert small != code
  exec(compile(small, str(README), 'exec'), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert 'ppl' in out and 'kl' in out
