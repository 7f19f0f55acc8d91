"""Tests for models/data.py: sources, document-level splits, tokenization, windows, MC items.

Fast tests use a byte-level fake tokenizer and synthetic text; `slow` tests use the real cached
corpora and SmolLM2's tokenizer.
"""

import json
import sys
import types

import numpy as np
import pytest

from models import data


class ByteTokenizer:
  """Byte-level fake tokenizer with the Hugging Face call convention; optional BOS/EOS."""

  def __init__(self, bos=None, eos=None, name='bytes'):
    self.bos, self.eos, self.name_or_path, self.calls = bos, eos, name, 0

  def encode(self, text, add_special_tokens):
    ids = list(text.encode('utf-8'))
    if add_special_tokens:
      ids = ([self.bos] if self.bos is not None else []) + ids + (
          [self.eos] if self.eos is not None else [])
    return ids

  def __call__(self, text, add_special_tokens=True):
    self.calls += 1
    if isinstance(text, list):
      return {'input_ids': [self.encode(t, add_special_tokens) for t in text]}
    return {'input_ids': self.encode(text, add_special_tokens)}


class PrefixSpaceTokenizer(ByteTokenizer):
  """SentencePiece-like: each call starts with a dummy-prefix token, so chunking changes ids."""

  def encode(self, text, add_special_tokens):
    return [1000] + super().encode(text, add_special_tokens)


PARAGRAPHS = '\n\n'.join(f'Paragraph {i} says something about topic {i % 7}.' for i in range(200))


# ----------------------------------------------------------------------------------------------
# Splits.


def test_split_of_is_stable_and_roughly_proportional():
  names = [f'doc_{i}.txt' for i in range(2000)]
  splits = [data.split_of(n, 15) for n in names]
  assert splits == [data.split_of(n, 15) for n in names]
  assert set(splits) == {'train', 'test'}
  assert 0.10 < splits.count('test') / len(names) < 0.20
  # Stable across Python processes (no salted hash()): a pinned bucket.
  assert data.split_of('tutorial/classes.rst.txt', 15) == 'train'
  assert data.split_of('howto/regex.rst.txt', 15) == 'test'


def test_join_split_is_disjoint_and_complete():
  docs = {f'd{i:02d}.txt': f'DOC{i:02d} body' for i in range(40)}
  train, test = data.join_split(docs, 'train', 30), data.join_split(docs, 'test', 30)
  train_ids = {t.split()[0] for t in train.split('\n\n')}
  test_ids = {t.split()[0] for t in test.split('\n\n')}
  assert train_ids and test_ids and not train_ids & test_ids
  assert train_ids | test_ids == {f'DOC{i:02d}' for i in range(40)}
  assert train.split('\n\n') == sorted(train.split('\n\n'))  # Sorted document order.
  with pytest.raises(ValueError, match='split'):
    data.join_split(docs, 'validation', 30)
  with pytest.raises(ValueError, match='empty'):
    data.join_split(docs, 'test', 0)


# ----------------------------------------------------------------------------------------------
# Sources.


RST = """\
.. _tut-example:

*******************
An Example Document
*******************

:Author: Someone

This is **prose** about :func:`range` and :class:`~collections.OrderedDict`, with ``literal``
text and a `link <https://example.org>`_ and a reference [#]_.  For example::

   >>> SECRET_CODE_LINE = 1

.. note::

   HIDDEN directive body.

   Still HIDDEN.

+--------+--------+
| TABLEX | cell   |
+--------+--------+

=====  =====
SIMPX  table
=====  =====

* first item
  continues here
* second item

::

   INDENTED_LITERAL

   Indented block quote HIDDEN too.

Last paragraph ends here ::

    CODE_AFTER
"""


def test_rst_prose_drops_code_directives_tables():
  prose = data.rst_prose(RST)
  paragraphs = prose.split('\n\n')
  assert paragraphs[0] == 'An Example Document'
  assert paragraphs[1] == ('This is prose about range and OrderedDict, with literal text and a '
                           'link and a reference. For example:')
  assert paragraphs[2] == '* first item continues here\n* second item'
  assert paragraphs[3] == 'Last paragraph ends here'
  assert len(paragraphs) == 4
  for hidden in ('SECRET', 'HIDDEN', 'TABLEX', 'SIMPX', 'INDENTED', 'CODE_AFTER', 'Author', '..',
                 '::', '**', '`'):
    assert hidden not in prose


def test_strip_gutenberg():
  text = ('Header junk\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nTo be, or not to be.\n'
          '*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nLicense junk\n')
  assert data.strip_gutenberg(text) == 'To be, or not to be.'
  assert data.strip_gutenberg('Plain text.\n') == 'Plain text.'


def test_load_text_local_file(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_text('Hello\n\nworld, café.\n', encoding='utf-8')
  assert data.load_text(str(path), 'train') == 'Hello\n\nworld, café.\n'
  assert data.load_text(path, 'test') == 'Hello\n\nworld, café.\n'


def test_load_text_errors(tmp_path):
  missing = str(tmp_path / 'missing.txt')
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    data.load_text(missing, 'test')
  with pytest.raises(FileNotFoundError, match='notes.txt'):
    data.load_text('notes.txt', 'test')
  with pytest.raises(FileNotFoundError, match='some/dir/corpus'):
    data.load_text('some/dir/corpus', 'test')
  with pytest.raises(ValueError, match="'bogus'.*python-docs.*shakespeare.*wikitext2.*c4"):
    data.load_text('bogus', 'test')
  with pytest.raises(ValueError, match='split'):
    data.load_text('python-docs', 'dev')


def test_wikitext2_without_datasets_says_how_to_pass_a_file(monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)  # `import datasets` raises ImportError.
  for name in ('wikitext2', 'c4'):
    with pytest.raises(data.DataUnavailableError, match='datasets.*--eval_data=/path/to/file.txt'):
      data.load_text(name, 'test')


def test_hub_corpora_offline_and_wiring(monkeypatch):
  calls = []

  def offline(*args, **kwargs):
    raise ConnectionError('no route to huggingface.co')

  monkeypatch.setitem(sys.modules, 'datasets', types.SimpleNamespace(load_dataset=offline))
  with pytest.raises(data.DataUnavailableError, match='(?s)no route.*--eval_data'):
    data.load_text('wikitext2', 'train')

  def fake(path, name=None, split=None, data_files=None):
    calls.append((path, name, split, data_files))
    return {'text': ['a', 'b', 'c']}

  monkeypatch.setitem(sys.modules, 'datasets', types.SimpleNamespace(load_dataset=fake))
  assert data.load_text('wikitext2', 'train') == 'a b c'  # As GPTQ's datautils joins them.
  assert data.load_text('wikitext2', 'test') == 'a\n\nb\n\nc'
  assert calls[-1] == ('wikitext', 'wikitext-2-raw-v1', 'test', None)


# ----------------------------------------------------------------------------------------------
# Tokenization.


def test_tokenize_chunked_equals_whole():
  tokenizer = ByteTokenizer()
  tokens = data.tokenize(tokenizer, PARAGRAPHS, chunk_chars=300)
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, np.frombuffer(PARAGRAPHS.encode(), np.uint8))
  assert len(data._chunks(PARAGRAPHS, 300)) > 10  # Chunking did happen.
  assert ''.join(data._chunks(PARAGRAPHS, 300)) == PARAGRAPHS


def test_tokenize_adds_default_specials_once():
  tokens = data.tokenize(ByteTokenizer(bos=300, eos=301), PARAGRAPHS, chunk_chars=300)
  assert tokens[0] == 300 and tokens[-1] == 301
  assert np.sum(tokens == 300) == 1 and np.sum(tokens == 301) == 1
  np.testing.assert_array_equal(tokens[1:-1], np.frombuffer(PARAGRAPHS.encode(), np.uint8))


def test_tokenize_falls_back_when_chunking_changes_ids():
  tokenizer = PrefixSpaceTokenizer()
  tokens = data.tokenize(tokenizer, PARAGRAPHS, chunk_chars=300)
  np.testing.assert_array_equal(tokens, tokenizer.encode(PARAGRAPHS, False))
  assert np.sum(tokens == 1000) == 1


def test_load_tokens_caches_and_sees_file_changes(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_text('first version')
  tokenizer = ByteTokenizer(name='cache-test')
  a = data.load_tokens(tokenizer, path, 'test')
  calls = tokenizer.calls
  assert data.load_tokens(tokenizer, str(path), 'test') is a
  assert tokenizer.calls == calls
  assert not a.flags.writeable
  path.write_text('second, longer version')
  b = data.load_tokens(tokenizer, path, 'test')
  assert len(b) == len('second, longer version')


# ----------------------------------------------------------------------------------------------
# Windows.


def test_calibration_batch_deterministic_random_windows():
  tokens = np.arange(1000, dtype=np.int64)
  a = data.calibration_batch(tokens, 16, 64, seed=0)
  assert a.shape == (16, 64) and a.dtype == np.int32
  np.testing.assert_array_equal(a, data.calibration_batch(tokens, 16, 64, seed=0))
  assert not np.array_equal(a, data.calibration_batch(tokens, 16, 64, seed=1))
  # Each row is a contiguous window of the stream, inside it.
  np.testing.assert_array_equal(a - a[:, :1], np.broadcast_to(np.arange(64), a.shape))
  assert a.min() >= 0 and a[:, -1].max() <= 1000 - 2
  assert len(np.unique(a[:, 0])) > 8  # Offsets are random, not a fixed stride.


def test_calibration_batch_too_short():
  with pytest.raises(ValueError, match='65 tokens.*has 64'):
    data.calibration_batch(np.arange(64), 2, 64, seed=0)
  out = data.calibration_batch(np.arange(65), 3, 64, seed=0)  # Exactly seqlen + 1: offset 0 only.
  np.testing.assert_array_equal(out, np.tile(np.arange(64), (3, 1)))


def test_eval_windows():
  tokens = np.arange(1000)
  w = data.eval_windows(tokens, 100, 3)
  assert w.dtype == np.int32
  np.testing.assert_array_equal(w, np.arange(300).reshape(3, 100))
  for all_windows in (None, 0, -1):
    np.testing.assert_array_equal(data.eval_windows(tokens, 128, all_windows),
                                  np.arange(896).reshape(7, 128))
  with pytest.raises(ValueError, match='11 windows of 100 tokens need 1100 tokens.*has 1000'):
    data.eval_windows(tokens, 100, 11)
  with pytest.raises(ValueError, match='one window'):
    data.eval_windows(np.arange(10), 100)


# ----------------------------------------------------------------------------------------------
# Multiple-choice items.


def _write_jsonl(path, lines):
  path.write_text('\n'.join(l if isinstance(l, str) else json.dumps(l) for l in lines) + '\n')
  return path


def test_load_mc_jsonl_valid(tmp_path):
  path = _write_jsonl(tmp_path / 'ok.jsonl', [
      {'context': 'Two plus two is', 'choices': [' four', ' five'], 'gold': 0, 'category': 'math'},
      '',
      {'context': 'The sky is', 'choices': [' green', ' blue', ' red'], 'gold': 1}])
  items = data.load_mc_jsonl(path)
  assert items == [data.MCItem('Two plus two is', (' four', ' five'), 0),
                   data.MCItem('The sky is', (' green', ' blue', ' red'), 1)]


@pytest.mark.parametrize('bad, message', [
    ({'context': 'c', 'choices': [' a', ' b'], 'gold': 2}, 'gold'),
    ({'context': 'c', 'choices': [' a', ' b'], 'gold': -1}, 'gold'),
    ({'context': 'c', 'choices': [' a', ' b'], 'gold': True}, 'gold'),
    ({'context': 'c', 'choices': [' a'], 'gold': 0}, 'at least 2'),
    ({'context': 'c', 'choices': [' a', ' a'], 'gold': 0}, 'duplicates'),
    ({'context': '', 'choices': [' a', ' b'], 'gold': 0}, 'context'),
    ({'choices': [' a', ' b'], 'gold': 0}, 'missing keys'),
    ('{"context": "c", "choices": [', 'invalid JSON'),
    ('[1, 2]', 'JSON object'),
])
def test_load_mc_jsonl_errors_name_the_line(tmp_path, bad, message):
  good = {'context': 'c', 'choices': [' a', ' b'], 'gold': 0}
  path = _write_jsonl(tmp_path / 'bad.jsonl', [good, good, bad])
  with pytest.raises(ValueError, match=rf'bad\.jsonl:3: .*{message}'):
    data.load_mc_jsonl(path)


def test_load_mc_jsonl_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    data.load_mc_jsonl(tmp_path / 'nope.jsonl')


def test_shipped_probes():
  path = data.probes_path()
  assert path.is_file()
  items = data.load_mc_jsonl(path)
  assert len(items) >= 150
  assert len({item.context for item in items}) == len(items)
  golds = [item.gold for item in items]
  assert len(set(golds)) == 4 and max(np.bincount(golds)) < 0.4 * len(items)
  for item in items:
    assert len(item.choices) == 4
    assert all(c.startswith(' ') and not c.startswith('  ') for c in item.choices), item
    assert not item.context.endswith(' '), item


# ----------------------------------------------------------------------------------------------
# Real corpora and tokenizer (slow: need the cached assets).


@pytest.fixture(scope='session')
def smollm2_tokenizer():
  transformers = pytest.importorskip('transformers')
  from models import assets  # pylint: disable=g-import-not-at-top
  gguf = assets.smollm2_gguf()
  return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.mark.slow
@pytest.mark.parametrize('name, min_test_chars', [('python-docs', 100_000),
                                                   ('shakespeare', 300_000)])
def test_real_corpus_splits(name, min_test_chars):
  documents = data.load_documents(name)
  train, test = data.load_text(name, 'train'), data.load_text(name, 'test')
  assert data.load_text(name, 'test') == test  # Deterministic (and cached).
  test_docs = {n for n in documents if data.split_of(n, data.TEST_PERCENT[name]) == 'test'}
  assert 0 < len(test_docs) < len(documents) / 4
  for doc_name, text in documents.items():
    probe = text.strip('\n')[:2000]
    in_test, in_train = probe in test, probe in train
    expected = (True, False) if doc_name in test_docs else (False, True)
    assert (in_test, in_train) == expected, doc_name
  assert len(test) >= min_test_chars and len(train) > 3 * len(test)


@pytest.mark.slow
def test_real_corpus_tokens(smollm2_tokenizer):
  tokenizer = smollm2_tokenizer
  tokens = data.load_tokens(tokenizer, 'python-docs', 'test')
  assert len(tokens) >= 40 * 512 + 1  # Enough for 40 evaluation windows of 512 tokens.
  text = data.load_text('python-docs', 'test')
  whole = tokenizer(text, add_special_tokens=False)['input_ids']
  np.testing.assert_array_equal(data.tokenize(tokenizer, text, chunk_chars=2000), whole)
  assert tokenizer.decode(tokens[:200]) == text[:len(tokenizer.decode(tokens[:200]))]
  assert data.eval_windows(tokens, 512, 40).shape == (40, 512)
