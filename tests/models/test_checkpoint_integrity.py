"""Integrity of the checkpoints of models/checkpoint.py (format version 2).

Properties: every file ``save_tree`` writes is covered by a checksum, so flipping any byte of any
file of a checkpoint (first, middle, last; one bit or all eight), truncating, deleting or adding a
file is a :class:`CheckpointError` of one line naming that file, from ``load_tree`` and
``load_metadata`` alike; a version-1 checkpoint is refused naming its version; a save that fails
part-way (a full disk in orbax, in ``structure.json``, in its checksum, at fsync or at the final
rename) leaves the previous checkpoint of the same name byte-identical and loadable, and nothing
that stops the next save; the same holds on a real 2 MiB tmpfs where mounting is permitted; a
checkpoint verifies on every load.
"""

import errno
import hashlib
import json
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from compress import quantize
from kernels import QuantSpec
from kernels.formats import CompressedLinear
from models import checkpoint
from models import config as config_lib
from models.checkpoint import CheckpointError

META = {'fingerprint': 'f00d', 'next': 3, 'reports': [{'name': 'q', 'err': 0.125}]}


def _tree(seed=0, n_out=16):
  k = jax.random.split(jax.random.key(seed), 3)
  q = quantize.rtn(jax.random.normal(k[0], (64, n_out)), QuantSpec(bits=4, group_size=32))
  o = quantize.rtn(jax.random.normal(k[1], (32, 8)), QuantSpec(bits=4, group_size=32))
  mask = jax.random.uniform(k[2], (32, 8)) < 0.5
  return {'layers': [{'q': {'kernel': CompressedLinear(weight=q)}},
                     {'o': {'kernel': CompressedLinear(weight=o, mask=mask)}}],
          'norm': jnp.ones(n_out, jnp.bfloat16)}


def _assert_same(a, b):
  """Same tree structure (types and static fields included), dtypes and bits."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _files(path):
  """Every file of a checkpoint directory: relative POSIX path -> bytes."""
  return {p.relative_to(path).as_posix(): p.read_bytes()
          for p in sorted(path.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def good(tmp_path_factory):
  path = tmp_path_factory.mktemp('good') / 'ck'
  checkpoint.save_tree(path, _tree(), META)
  return path


@pytest.fixture
def ck(good, tmp_path):
  """A fresh copy of a good checkpoint to damage."""
  path = tmp_path / 'ck'
  shutil.copytree(good, path)
  return path


def _assert_caught(path, rel, loaders=(checkpoint.load_tree, checkpoint.load_metadata)):
  """Every loader refuses ``path`` with one line naming file ``rel`` of it."""
  for load in loaders:
    with pytest.raises(CheckpointError) as e:
      load(path)
    msg = str(e.value)
    assert '\n' not in msg and str(path) in msg and rel in msg, (rel, msg)


def test_layout_and_checksums(good):
  files = _files(good)
  doc = json.loads(files['structure.json'])
  assert doc['format_version'] == checkpoint.FORMAT_VERSION == 2
  assert files['structure.json.sha256'] == (
      f'{hashlib.sha256(files["structure.json"]).hexdigest()}  structure.json\n'.encode())
  data = {k: v for k, v in files.items() if k not in ('structure.json', 'structure.json.sha256')}
  assert data and all(k.startswith('arrays/') for k in data)
  assert any(k.startswith('arrays/d/') or '/d/' in k for k in data)  # orbax's array data
  assert doc['files'] == {k: {'sha256': hashlib.sha256(v).hexdigest(), 'bytes': len(v)}
                          for k, v in data.items()}
  if shutil.which('sha256sum'):  # the sidecar is in sha256sum's format
    subprocess.run(['sha256sum', '--quiet', '-c', 'structure.json.sha256'], cwd=good, check=True)


def test_every_byte_flip_of_every_file_is_caught(ck):
  before = _files(ck)
  tried = caught = 0
  for rel, data in before.items():
    f = ck / rel
    for pos in sorted({0, len(data) // 2, len(data) - 1}):
      for mask in (0x01, 0xff):  # one bit; the whole byte
        bad = bytearray(data)
        bad[pos] ^= mask
        f.write_bytes(bad)
        tried += 1
        _assert_caught(ck, rel)
        caught += 1
      f.write_bytes(data)
  print(f'{tried} byte flips in {len(before)} files, {caught} caught')
  assert caught == tried == sum(len({0, len(d) // 2, len(d) - 1}) * 2 for d in before.values())
  assert len(before) >= 8
  # The copy, restored, loads again: the checks are not vacuous.
  tree, meta = checkpoint.load_tree(ck)
  _assert_same(tree, _tree())
  assert meta == META


def test_truncated_deleted_and_extra_files_are_caught(ck):
  before = _files(ck)
  tried = 0
  for rel, data in before.items():
    for size in (len(data) - 1, 0):  # truncated by one byte; emptied
      (ck / rel).write_bytes(data[:size])
      _assert_caught(ck, rel)
      tried += 1
    (ck / rel).unlink()
    _assert_caught(ck, rel)
    tried += 1
    (ck / rel).write_bytes(data)
  assert tried == 3 * len(before)
  arrays_file = next(k for k in before if k.startswith('arrays/') and '/d/' in k)
  for extra in (str(pathlib.PurePosixPath(arrays_file).parent / 'extra'), 'arrays/new.txt',
                'notes.txt'):
    (ck / extra).write_bytes(b'x')
    _assert_caught(ck, extra)
    (ck / extra).unlink()
  checkpoint.load_tree(ck)


def test_version_1_checkpoint_is_refused_naming_its_version(ck):
  doc = json.loads((ck / 'structure.json').read_text())
  del doc['files']
  doc['format_version'] = 1
  (ck / 'structure.json').write_text(json.dumps(doc))
  (ck / 'structure.json.sha256').unlink()  # as version 1 wrote it
  for load in (checkpoint.load_tree, checkpoint.load_metadata):
    with pytest.raises(CheckpointError,
                       match='has format version 1, this library reads version 2.*save it again'):
      load(ck)


def test_roundtrip_verifies_on_every_load(tmp_path):
  cfg = config_lib.tiny_config(num_layers=1)
  params = _tree()
  checkpoint.save_model(tmp_path / 'm', params, cfg, {'timing': {'seconds': 1.5}})
  files = _files(tmp_path / 'm')
  for _ in range(2):
    cfg2, back, meta = checkpoint.load_model(tmp_path / 'm')
    assert cfg2 == cfg and meta['timing'] == {'seconds': 1.5}
    _assert_same(params, back)
    assert checkpoint.load_metadata(tmp_path / 'm')['metadata'] == meta
  assert _files(tmp_path / 'm') == files  # loading writes nothing
  # A tree without arrays has only the structure and its checksum.
  checkpoint.save_tree(tmp_path / 'e', {'x': None})
  assert set(_files(tmp_path / 'e')) == {'structure.json', 'structure.json.sha256'}
  assert checkpoint.load_tree(tmp_path / 'e') == ({'x': None}, {})
  assert sorted(os.listdir(tmp_path)) == ['e', 'm']


# --------------------------------------------------------------------------- failed saves


def _fd_path(fd):
  return os.readlink(f'/proc/self/fd/{fd}')


def _enospc():
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_orbax(monkeypatch, path):
  real = ocp.StandardCheckpointer.save

  def save(self, directory, *args, **kwargs):  # writes its files, then the disk is full
    real(self, directory, *args, **kwargs)
    self.wait_until_finished()
    raise _enospc()
  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', save)


def _fail_write(name):
  def patch(monkeypatch, path):
    real = os.write

    def write(fd, data):  # half of the first write of file ``name`` lands, then the disk is full
      if _fd_path(fd).endswith(f'/ck.tmp/{name}'):
        if len(data) > 1 and not getattr(write, 'short', False):
          write.short = True
          return real(fd, memoryview(data)[:len(data) // 2])
        raise _enospc()
      return real(fd, data)
    monkeypatch.setattr(os, 'write', write)
  return patch


def _fail_fsync(monkeypatch, path):
  real = os.fsync

  def fsync(fd):  # delayed allocation: the disk turns out full when the data is flushed
    if '/ck.tmp/arrays/' in _fd_path(fd):
      raise _enospc()
    return real(fd)
  monkeypatch.setattr(os, 'fsync', fsync)


def _fail_rename(exchange):
  def patch(monkeypatch, path):
    real = os.rename

    def rename(src, dst):  # putting the new checkpoint in place fails
      if pathlib.Path(src).name == 'ck.tmp':
        raise _enospc()
      return real(src, dst)
    monkeypatch.setattr(os, 'rename', rename)
    if exchange:
      monkeypatch.setattr(checkpoint, '_exchange', lambda a, b: (_ for _ in ()).throw(_enospc()))
    else:  # a file system without an atomic swap: the old one is renamed aside, then back
      monkeypatch.setattr(checkpoint, '_exchange', lambda a, b: False)
  return patch


FAILURES = {
    'orbax': _fail_orbax,
    'structure.json': _fail_write('structure.json'),
    'structure.json.sha256': _fail_write('structure.json.sha256'),
    'fsync': _fail_fsync,
    'swap': _fail_rename(exchange=True),
    'rename-fallback': _fail_rename(exchange=False),
}


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='needs /proc/self/fd')
@pytest.mark.parametrize('where', list(FAILURES))
def test_full_disk_keeps_previous_checkpoint(tmp_path, where):
  path = tmp_path / 'ck'
  old_tree = _tree(0)
  checkpoint.save_tree(path, old_tree, META)
  old_files = _files(path)
  with pytest.MonkeyPatch.context() as mp:
    FAILURES[where](mp, path)
    with pytest.raises(OSError) as e:
      checkpoint.save_tree(path, _tree(1, n_out=24), {'v': 2})
  assert e.value.errno == errno.ENOSPC
  assert os.listdir(tmp_path) == ['ck']  # no ck.tmp, no ck.old
  assert _files(path) == old_files
  tree, meta = checkpoint.load_tree(path)
  _assert_same(tree, old_tree)
  assert meta == META
  # The next save goes through.
  checkpoint.save_tree(path, _tree(1, n_out=24), {'v': 2})
  tree, meta = checkpoint.load_tree(path)
  _assert_same(tree, _tree(1, n_out=24))
  assert meta == {'v': 2} and os.listdir(tmp_path) == ['ck']


def test_replace_without_atomic_swap(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint, '_exchange', lambda a, b: False)
  path = tmp_path / 'ck'
  checkpoint.save_tree(path, _tree(0), META)
  checkpoint.save_tree(path, _tree(1), {'v': 2})
  _assert_same(checkpoint.load_tree(path)[0], _tree(1))
  assert os.listdir(tmp_path) == ['ck']
  # A crash between its two renames leaves only NAME.old: the error says where it is.
  os.rename(path, tmp_path / 'ck.old')
  with pytest.raises(CheckpointError, match=r'is not a checkpoint .*ck\.old holds the one'):
    checkpoint.load_tree(path)
  checkpoint.save_tree(path, _tree(2), {'v': 3})  # and a later save clears it
  assert os.listdir(tmp_path) == ['ck']


def test_atomic_swap_is_used_where_available(tmp_path, monkeypatch):
  calls = []
  real = checkpoint._exchange  # pylint: disable=protected-access
  monkeypatch.setattr(checkpoint, '_exchange', lambda a, b: calls.append(real(a, b)) or calls[-1])
  checkpoint.save_tree(tmp_path / 'ck', _tree(0), META)
  checkpoint.save_tree(tmp_path / 'ck', _tree(1), {'v': 2})
  assert len(calls) == 1 and isinstance(calls[0], bool)  # only when replacing
  _assert_same(checkpoint.load_tree(tmp_path / 'ck')[0], _tree(1))
  assert os.listdir(tmp_path) == ['ck']


def test_real_full_tmpfs_keeps_previous_checkpoint(tmp_path):
  mnt = tmp_path / 'small'
  mnt.mkdir()
  try:
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mnt)],
                       capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError) as e:
    pytest.skip(f'cannot mount a tmpfs: {e}')
  if r.returncode:
    pytest.skip(f'cannot mount a tmpfs: {r.stderr.strip()}')
  try:
    path = mnt / 'ck'
    old_tree = _tree(0)
    checkpoint.save_tree(path, old_tree, META)
    old_files = _files(path)
    big = {'w': jax.random.normal(jax.random.key(1), (768, 1024))}  # 3 MiB of float32 noise
    with pytest.raises(Exception) as e:  # whatever orbax/tensorstore makes of ENOSPC
      checkpoint.save_tree(path, big, {'v': 2})
    print('full tmpfs:', type(e.value).__name__, str(e.value)[:200])
    assert sorted(os.listdir(mnt)) == ['ck']
    assert _files(path) == old_files
    tree, meta = checkpoint.load_tree(path)
    _assert_same(tree, old_tree)
    assert meta == META
    checkpoint.save_tree(path, _tree(1), {'v': 2})  # space was freed: the next save fits
    _assert_same(checkpoint.load_tree(path)[0], _tree(1))
    assert sorted(os.listdir(mnt)) == ['ck']
  finally:
    if subprocess.run(['umount', str(mnt)], capture_output=True).returncode:
      subprocess.run(['umount', '-l', str(mnt)], capture_output=True)
