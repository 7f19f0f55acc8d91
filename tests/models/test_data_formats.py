"""Data sources beyond the corpora and plain text: ``.jsonl`` and ``.parquet`` documents,
pre-tokenized ``.npy`` windows, hub corpora offline, and the hashes of the windows a run used.

Everything here is fast: a byte-level fake tokenizer, the tiny model's config, and a run of
``experiments.compress_lib.run`` whose compression and evaluation are stubbed out (the wiring of
the windows into the run and its results is what is tested).
"""

import dataclasses
import json
import pathlib
import socket
import subprocess
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments import common
from experiments import compress_lib
from experiments import config
from experiments.config import CompressConfig
from models import config as config_lib
from models import data

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCUMENTS = ['First document.\nIt has two lines.', 'Zweites Dokument: café, naïve.',
             '  Third, with leading spaces and a trailing newline\n',
             ' '.join(f'word{i}' for i in range(400))]


class ByteTokenizer:
  """Byte-level fake tokenizer with the Hugging Face call convention (vocabulary of 256)."""

  name_or_path = 'bytes-formats'

  def __call__(self, text, add_special_tokens=True):
    del add_special_tokens
    if isinstance(text, list):
      return {'input_ids': [list(t.encode('utf-8')) for t in text]}
    return {'input_ids': list(text.encode('utf-8'))}

  def __len__(self):
    return 256


def _write_jsonl(path, records, blank_lines=False):
  lines = [json.dumps(r) for r in records]
  if blank_lines:
    lines = [lines[0], '', *lines[1:], '   ']
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


def _write_parquet(path, columns):
  pq.write_table(pa.table(columns), path)
  return path


@pytest.fixture
def sources(tmp_path):
  """The same documents as a .txt (joined with DOC_SEPARATOR), a .jsonl and a .parquet."""
  txt = tmp_path / 'docs.txt'
  txt.write_text(data.DOC_SEPARATOR.join(DOCUMENTS), encoding='utf-8')
  jsonl = _write_jsonl(tmp_path / 'docs.jsonl', [{'text': d, 'id': i}
                                                 for i, d in enumerate(DOCUMENTS)],
                       blank_lines=True)
  parquet = _write_parquet(tmp_path / 'docs.parquet',
                           {'id': list(range(len(DOCUMENTS))), 'text': DOCUMENTS})
  return {'txt': str(txt), 'jsonl': str(jsonl), 'parquet': str(parquet)}


# ----------------------------------------------------------------------------------------------
# .jsonl and .parquet documents.


def test_jsonl_and_parquet_give_the_tokens_of_the_txt(sources):
  tok = ByteTokenizer()
  for split in data.SPLITS:  # the whole file for either split, as a .txt
    text = data.load_text(sources['txt'], split)
    assert data.load_text(sources['jsonl'], split) == text
    assert data.load_text(sources['parquet'], split) == text
  tokens = data.tokenize(tok, data.load_text(sources['txt'], 'train'))
  for kind in ('jsonl', 'parquet'):
    np.testing.assert_array_equal(data.load_tokens(tok, sources[kind], 'test'), tokens)
    np.testing.assert_array_equal(
        common.calibration_for(tok, sources[kind], 5, 64, seed=3),
        common.calibration_for(tok, sources['txt'], 5, 64, seed=3))
    np.testing.assert_array_equal(common.eval_windows_for(tok, sources[kind], 64, 4),
                                  common.eval_windows_for(tok, sources['txt'], 64, 4))


@pytest.mark.parametrize('lines,message', [
    (['{"text": "fine"}', '{"body": "no text here"}'],
     r'bad\.jsonl:2: no "text" field \(keys: body\)'),
    (['{"text": "fine"}', '{"text": 3}'], r'bad\.jsonl:2: "text" must be a string, got int'),
    (['{"text": "fine"}', '{"text": "cut'], r'bad\.jsonl:2: invalid JSON'),
    (['["text", "a list"]'], r'bad\.jsonl:1: expected a JSON object with a "text" field, got list'),
    (['', '  '], r'bad\.jsonl holds no JSON lines'),
])
def test_jsonl_errors_name_the_file_line_and_problem(tmp_path, lines, message):
  path = tmp_path / 'bad.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=message):
    data.load_text(path, 'train')


@pytest.mark.parametrize('columns,message', [
    ({'body': ['a', 'b']}, r'bad\.parquet has no "text" column \(columns: body\)'),
    ({'text': [1, 2]}, r'bad\.parquet: the "text" column holds int64, not strings'),
    ({'text': ['a', None]}, r'bad\.parquet: 1 rows of the "text" column are null'),
    ({'text': pa.array([], pa.string())}, r'bad\.parquet holds no rows'),
])
def test_parquet_errors_name_the_file_and_problem(tmp_path, columns, message):
  path = _write_parquet(tmp_path / 'bad.parquet', columns)
  with pytest.raises(ValueError, match=message):
    data.load_text(path, 'test')


def test_parquet_unreadable_or_without_pyarrow(tmp_path, monkeypatch):
  path = tmp_path / 'not.parquet'
  path.write_text('plain text, not parquet')
  with pytest.raises(ValueError, match=r'not\.parquet is not a readable Parquet file'):
    data.load_text(path, 'train')
  good = _write_parquet(tmp_path / 'good.parquet', {'text': ['a']})
  monkeypatch.setitem(sys.modules, 'pyarrow', None)  # `import pyarrow` raises ImportError
  monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)
  with pytest.raises(data.DataUnavailableError, match=r'good\.parquet needs the `pyarrow`'):
    data.load_text(good, 'train')


def test_missing_files_of_every_kind(tmp_path):
  for name in ('gone.jsonl', 'gone.parquet', 'gone.npy'):
    with pytest.raises(FileNotFoundError, match=name):
      data.load_text(name, 'train')
  with pytest.raises(FileNotFoundError, match='gone.npy'):
    common.calibration_for(ByteTokenizer(), str(tmp_path / 'gone.npy'), 2, 8, seed=0)


# ----------------------------------------------------------------------------------------------
# Pre-tokenized .npy windows.


def _npy(tmp_path, array, name='windows.npy') -> str:
  path = tmp_path / name
  np.save(path, array)
  return str(path)


def test_npy_windows_are_used_verbatim(tmp_path):
  rng = np.random.default_rng(0)
  windows = rng.integers(0, 256, size=(6, 16)).astype(np.int64)
  path = _npy(tmp_path, windows)
  tok = ByteTokenizer()
  for seed in (0, 7):  # no sampling: the seed does not apply
    calib = common.calibration_for(tok, path, 4, 16, seed)
    assert calib.dtype == np.int32 and calib.shape == (4, 16)
    np.testing.assert_array_equal(calib, windows[:4])
  np.testing.assert_array_equal(common.eval_windows_for(tok, path, 16, 3), windows[:3])
  np.testing.assert_array_equal(common.eval_windows_for(tok, path, 16, -1), windows)
  np.testing.assert_array_equal(data.load_windows(path, 16), windows)
  assert data.is_windows_file(path) and not data.is_windows_file('corpus.txt')
  with pytest.raises(ValueError, match=r'windows\.npy holds token windows \(\.npy\), not text'):
    data.load_text(path, 'train')


@pytest.mark.parametrize('array,rows,vocab,message', [
    (np.zeros(32, np.int32), 2, None,
     r'holds an array of shape \(32,\) \(1-D\); token windows are 2-D'),
    (np.zeros((2, 4, 4), np.int32), 2, None, r'holds an array of shape \(2, 4, 4\) \(3-D\)'),
    (np.zeros((4, 12), np.int32), 2, None, r'holds windows of 12 tokens, but seqlen=16'),
    (np.zeros((3, 16), np.int32), 5, None, r'holds 3 windows, fewer than rows=5'),
    (np.zeros((0, 16), np.int32), None, None, r'holds no windows \(0 rows\)'),
    (np.zeros((4, 16), np.float32), 2, None, r'holds float32 values; token windows hold integer'),
    (np.zeros((4, 16), bool), 2, None, r'holds bool values'),
    (np.full((4, 16), 300, np.int32), 2, 256,
     r'holds 64 ids outside the vocabulary of 256 ids, \[0, 256\): e\.g\. 300 at row 0'),
    (np.where(np.eye(3, 16, 2, dtype=bool), -1, 5), 2, None,
     r'holds 3 ids outside the non-negative int32 range: e\.g\. -1 at row 0, position 2'),
])
def test_npy_bad_windows_name_the_file_and_problem(tmp_path, array, rows, vocab, message):
  path = _npy(tmp_path, array, 'bad.npy')
  with pytest.raises(ValueError, match=r'bad\.npy ' + message):
    data.load_windows(path, 16, rows, vocab_size=vocab)


def test_npy_checks_through_the_experiment_helpers(tmp_path):
  tok = ByteTokenizer()  # its vocabulary (256) is the default bound
  path = _npy(tmp_path, np.full((4, 16), 256, np.int32), 'oov.npy')
  with pytest.raises(ValueError, match=r'oov\.npy holds 64 ids outside the vocabulary of 256'):
    common.calibration_for(tok, path, 2, 16, seed=0)
  with pytest.raises(ValueError, match=r'oov\.npy holds 64 ids outside the vocabulary of 512'):
    common.eval_windows_for(tok, _npy(tmp_path, np.full((4, 16), 600), 'oov.npy'), 16, 2,
                            vocab_size=512)
  path = _npy(tmp_path, np.zeros((4, 16), np.int32), 'short.npy')
  with pytest.raises(ValueError, match=r'short\.npy holds 4 windows, fewer than rows=8'):
    common.calibration_for(tok, path, 8, 16, seed=0)
  with pytest.raises(ValueError, match=r'short\.npy holds windows of 16 tokens, but seqlen=32'):
    common.eval_windows_for(tok, path, 32, 2)
  garbage = tmp_path / 'garbage.npy'
  garbage.write_bytes(b'not an array at all')
  with pytest.raises(ValueError, match=r'garbage\.npy is not a readable \.npy array'):
    common.eval_windows_for(tok, str(garbage), 16, 2)


# ----------------------------------------------------------------------------------------------
# Validation before any work.


def _problems(**kw) -> list[str]:
  base = dict(model='tiny-llama', quant='rtn', calib_samples=4, calib_seqlen=16, eval_seqlen=16,
              eval_windows=2, probes='none', group_size=32)
  base.update(kw)
  return config.validate(CompressConfig(**base), model_config=config_lib.tiny_config(), given=())


def test_validation_checks_npy_headers(tmp_path):
  good = _npy(tmp_path, np.zeros((8, 16), np.int16), 'good.npy')
  assert _problems(calib_data=good, eval_data=(good,)) == []
  assert _problems(calib_data=good, eval_data=(good,), eval_windows=-1) == []
  cases = [
      (dict(calib_data=good, calib_seqlen=32),
       f'--calib_data={good} holds windows of 16 tokens, but --calib_seqlen=32'),
      (dict(calib_data=good, calib_samples=9),
       f'--calib_data={good} holds 8 windows, fewer than --calib_samples=9'),
      (dict(calib_data=good, reconstruct='block', recon_samples=12, recon_batch=2),
       f'--calib_data={good} holds 8 windows, fewer than --recon_samples=12'),
      (dict(eval_data=('python-docs', good), eval_windows=10),
       f'--eval_data={good} holds 8 windows, fewer than --eval_windows=10'),
      (dict(eval_data=(good,), eval_seqlen=8),
       f'--eval_data={good} holds windows of 16 tokens, but --eval_seqlen=8'),
      (dict(recover='eora', rank=8, recover_data=good, recover_samples=20),
       f'--recover_data={good} holds 8 windows, fewer than --recover_samples=20'),
      (dict(calib_data=_npy(tmp_path, np.zeros(16, np.int32), 'flat.npy')),
       'flat.npy holds an array of shape (16,) (1-D); token windows are 2-D'),
      (dict(calib_data=_npy(tmp_path, np.zeros((8, 16), np.float64), 'float.npy')),
       'float.npy holds float64 values; token windows hold integer ids'),
      (dict(calib_data=str(tmp_path / 'missing.npy')), 'missing.npy: no such file'),
  ]
  for kw, expected in cases:
    problems = _problems(**kw)
    assert len(problems) == 1 and expected in problems[0], (kw, problems)


def test_validation_reads_only_the_npy_header(tmp_path, monkeypatch):
  path = _npy(tmp_path, np.zeros((8, 16), np.int32))
  loads = []
  real_load = np.load

  def spy(*args, **kwargs):
    loads.append(kwargs.get('mmap_mode'))
    return real_load(*args, **kwargs)

  monkeypatch.setattr(np, 'load', spy)
  assert _problems(calib_data=path, eval_data=(path,)) == []
  assert loads == ['r']  # once (cached across flags), memory-mapped: the data is not read


def test_validation_checks_jsonl_and_parquet(tmp_path, sources):
  assert _problems(calib_data=sources['jsonl'], eval_data=(sources['parquet'],)) == []
  bad = _write_jsonl(tmp_path / 'bad.jsonl', [{'text': 'a'}, {'content': 'b'}])
  nocol = _write_parquet(tmp_path / 'nocol.parquet', {'body': ['a']})
  short = _write_jsonl(tmp_path / 'short.jsonl', [{'text': 'tiny'}])
  problems = _problems(calib_data=str(bad), eval_data=(str(nocol), str(short)))
  assert problems == [
      f'--calib_data={bad}: {bad}:2: no "text" field (keys: content)',
      f'--eval_data={nocol}: {nocol} has no "text" column (columns: body)',
      f'--eval_data={short} is too short: 4 bytes of text, and --eval_windows x --eval_seqlen = '
      '2 x 16 needs 32 tokens (a token covers at least one byte)']


def test_npy_problem_is_reported_by_the_command_before_any_work(tmp_path):
  bad = _npy(tmp_path, np.zeros((3, 8), np.int32), 'bad.npy')
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.compress', '--model=tiny-llama', '--quant=rtn',
       f'--calib_data={bad}', '--calib_seqlen=16', f'--out_dir={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f'error: --calib_data={bad} holds windows of 8 tokens, but --calib_seqlen=16' in (
      proc.stderr.splitlines())
  assert 'Traceback' not in proc.stderr and not out.exists()


# ----------------------------------------------------------------------------------------------
# Hub corpora offline.


def test_hub_corpus_unreachable_is_one_validation_line(monkeypatch):
  monkeypatch.setattr(data, 'hub_unreachable',
                      lambda timeout_s=3.0: 'huggingface.co:443 is unreachable (no route)')
  problems = _problems(eval_data=('wikitext2', 'c4'))
  assert problems == [
      f'--eval_data={name} needs the Hugging Face hub, and huggingface.co:443 is unreachable '
      '(no route): pass a local .txt/.jsonl/.parquet file or use python-docs / shakespeare (with '
      'HF_DATASETS_OFFLINE=1, `datasets` reads a copy it cached before)'
      for name in ('wikitext2', 'c4')]
  monkeypatch.setattr(data, 'hub_unreachable', lambda timeout_s=3.0: None)
  assert _problems(eval_data=('wikitext2',)) == []


def test_hub_unreachable_probes_without_downloading(monkeypatch):
  connections = []

  def refuse(address, timeout=None):
    connections.append((address, timeout))
    raise OSError(101, 'Network is unreachable')

  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  monkeypatch.delenv('HF_DATASETS_OFFLINE', raising=False)
  monkeypatch.delenv('HF_ENDPOINT', raising=False)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  assert data.hub_unreachable(timeout_s=1.5) == (
      'huggingface.co:443 is unreachable (Network is unreachable)')
  assert connections == [(('huggingface.co', 443), 1.5)]
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')  # `datasets` then reads its cache
  assert data.hub_unreachable() is None and len(connections) == 1


def test_hub_load_error_is_one_line(monkeypatch):
  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'wikitext' on the Hub\n(LocalEntryNotFoundError)\n")

  monkeypatch.setitem(sys.modules, 'datasets', types.SimpleNamespace(load_dataset=offline))
  with pytest.raises(data.DataUnavailableError) as e:
    data.load_text('wikitext2', 'test')
  assert '\n' not in str(e.value)
  assert "Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)." in str(e.value)


# ----------------------------------------------------------------------------------------------
# Hashes of the windows a run used.


def test_windows_sha256():
  a = np.arange(32, dtype=np.int32).reshape(4, 8)
  assert common.windows_sha256(a) == common.windows_sha256(a.astype(np.int64).copy())
  assert common.windows_sha256(a) == common.windows_sha256(a.tolist())
  assert common.windows_sha256(a) != common.windows_sha256(a.reshape(8, 4))  # same bytes
  b = a.copy()
  b[3, 7] += 1
  assert common.windows_sha256(a) != common.windows_sha256(b)
  assert len(common.windows_sha256(a)) == 64


def test_run_uses_npy_windows_and_records_their_hashes(tmp_path, monkeypatch):
  """``compress_lib.run`` with its compression and evaluation stubbed out: the compression gets
  the .npy's first rows as they are, the evaluation its windows, and results.json names them."""
  rng = np.random.default_rng(1)
  calib_rows = rng.integers(0, 256, size=(5, 16))
  eval_rows = rng.integers(0, 256, size=(3, 16)).astype(np.int32)
  calib_path, eval_path = _npy(tmp_path, calib_rows, 'calib.npy'), _npy(tmp_path, eval_rows,
                                                                        'eval.npy')
  seen = {}

  def compress_model(params, cfg, calib, rules, **kwargs):
    seen['calib'] = np.asarray(calib)
    return params, []

  def evaluate_models(loaded, models, windows, **kwargs):
    seen['windows'] = dict(windows)
    row = {f'{k} {ds}': 1.0 for ds in windows for k in ('ppl', 'kl', 'top1', 'eval_tokens')}
    return {'dense': row, **{name: row for name in models}}

  monkeypatch.setattr(compress_lib.pipeline, 'compress_model', compress_model)
  monkeypatch.setattr(common, 'evaluate_models', evaluate_models)
  c = CompressConfig(model='tiny-llama', quant='rtn', group_size=32, calib_data=calib_path,
                     calib_samples=4, calib_seqlen=16, seed=5, eval_data=(eval_path, ),
                     eval_seqlen=16, eval_windows=-1, probes='none')
  res = compress_lib.run(c)
  np.testing.assert_array_equal(seen['calib'], calib_rows[:4])
  np.testing.assert_array_equal(seen['windows'][eval_path], eval_rows)
  assert res['calibration_sha256'] == common.windows_sha256(calib_rows[:4])
  assert res['eval_sha256'] == {eval_path: common.windows_sha256(eval_rows)}
  out = common.write_results(tmp_path / 'out', res, rows=[res])
  saved = json.loads((out / 'results.json').read_text())
  assert saved['calibration_sha256'] == res['calibration_sha256']
  assert saved['eval_sha256'] == res['eval_sha256']
  # The ids are checked against the model's vocabulary (256 for the tiny model) when loaded.
  oov = dataclasses.replace(c, calib_data=_npy(tmp_path, np.full((4, 16), 256), 'oov.npy'))
  with pytest.raises(ValueError, match=r'oov\.npy holds 64 ids outside the vocabulary of 256'):
    compress_lib.run(oov)
