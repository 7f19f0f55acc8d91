"""Orbax checkpoints of param pytrees that hold compressed leaves.

The arrays are saved with orbax as one flat dict (``path -> array``); the tree structure, including
the leaf types of :mod:`kernels.formats` and their static fields (bits, group size, ...), is saved
beside them as ``structure.json``. Restoring therefore needs no target tree, and a checkpoint whose
arrays or structure do not match is reported as corrupt, naming what is wrong.

With several processes (:mod:`models.distributed`) every process calls ``save_tree`` with the same
tree: orbax writes each array of the global mesh from the processes that hold it (and every other
array from process 0), process 0 alone prepares, checksums and swaps the directory, and barriers
keep the processes together; a checkpoint restores on any number of processes and devices.

``save_tree``/``load_tree`` write and read one directory atomically (written to ``NAME.tmp`` and
swapped into place), so an interrupted save never leaves a half-written checkpoint under the final
name and never damages the previous one. Every file carries a sha256 (``structure.json`` lists the
others, ``structure.json.sha256`` covers it), verified before anything is returned: a flipped,
truncated, missing or extra file is refused with one line naming it.

:class:`ResumableSweep` is the resumable loop over the blocks of a model that compression,
reconstruction and fine-tuning share.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import formats

_LEAF_CLASSES = {c.__name__: c for c in (formats.CompressedLinear, formats.QuantizedWeight,
                                          formats.Sparse24Weight, formats.LowRank)}
FORMAT_VERSION = 2  # 2: sha256 of every file (see save_tree); 1 (no checksums) is refused
STRUCTURE = 'structure.json'
STRUCTURE_SUM = 'structure.json.sha256'


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match what the caller expects."""


def _encode(node, path: str, arrays: dict[str, Any]):
  if node is None:
    return {'t': 'none'}
  if isinstance(node, dict):
    return {'t': 'dict', 'items': {k: _encode(v, f'{path}/{k}', arrays) for k, v in node.items()}}
  if isinstance(node, (list, tuple)):
    return {'t': 'list' if isinstance(node, list) else 'tuple',
            'items': [_encode(v, f'{path}/{i}', arrays) for i, v in enumerate(node)]}
  if type(node).__name__ in _LEAF_CLASSES and isinstance(node, tuple(_LEAF_CLASSES.values())):
    fields, static = {}, {}
    for f in dataclasses.fields(node):
      value = getattr(node, f.name)
      if f.metadata.get('pytree_node', True):
        fields[f.name] = _encode(value, f'{path}/{f.name}', arrays)
      else:
        static[f.name] = value
    return {'t': type(node).__name__, 'fields': fields, 'static': static}
  if isinstance(node, (jax.Array, np.ndarray, np.generic, int, float, bool)):
    key = path.strip('/').replace('/', '.') or 'root'
    if key in arrays:
      raise CheckpointError(f'cannot checkpoint two arrays under the name {key}: a key of the tree '
                            'contains a dot')
    arrays[key] = node if isinstance(node, jax.Array) else np.asarray(node)
    return {'t': 'array', 'key': key, 'shape': list(np.shape(node)),
            'dtype': str(np.dtype(arrays[key].dtype))}
  raise TypeError(f'cannot checkpoint a {type(node).__name__} at {path or "/"}')


def _decode(spec, arrays: dict[str, Any], where: str):
  t = spec['t']
  if t == 'none':
    return None
  if t == 'dict':
    return {k: _decode(v, arrays, f'{where}/{k}') for k, v in spec['items'].items()}
  if t in ('list', 'tuple'):
    items = [_decode(v, arrays, f'{where}/{i}') for i, v in enumerate(spec['items'])]
    return items if t == 'list' else tuple(items)
  if t == 'array':
    key = spec['key']
    if key not in arrays:
      raise CheckpointError(f'checkpoint is corrupt: array {key} is missing')
    arr = arrays[key]
    if list(np.shape(arr)) != list(spec['shape']):
      raise CheckpointError(f'checkpoint is corrupt: array {key} has shape {list(np.shape(arr))}, '
                            f'the structure says {spec["shape"]}')
    if np.dtype(spec['dtype']).itemsize == 8 and not jax.config.jax_enable_x64:
      return np.asarray(arr, spec['dtype'])  # a jax array would narrow it to 32 bits
    return jnp.asarray(arr)
  if t in _LEAF_CLASSES:
    fields = {k: _decode(v, arrays, f'{where}/{k}') for k, v in spec['fields'].items()}
    return _LEAF_CLASSES[t](**fields, **spec['static'])
  raise CheckpointError(f'checkpoint is corrupt: unknown node type {t!r} at {where}')


# --------------------------------------------------------------------------- integrity


def _hash_file(f: pathlib.Path, sync: bool = False) -> tuple[str, int]:
  """``(sha256 hex, size in bytes)`` of a file; ``sync`` also flushes it to disk (fsync)."""
  with open(f, 'rb') as fh:
    digest = hashlib.file_digest(fh, 'sha256').hexdigest()
    if sync:
      os.fsync(fh.fileno())
    return digest, os.fstat(fh.fileno()).st_size


def _data_files(root: pathlib.Path) -> list[str]:
  """Every file under ``root`` but the structure document and its checksum: sorted relative POSIX
  paths (``arrays/d/...``)."""
  out = []
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      rel = (pathlib.Path(dirpath) / name).relative_to(root).as_posix()
      if rel not in (STRUCTURE, STRUCTURE_SUM):
        out.append(rel)
  return sorted(out)


def _fsync_dir(d: pathlib.Path) -> None:
  """Makes the entries of directory ``d`` durable; a no-op where directories cannot be synced."""
  try:
    fd = os.open(d, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_file(f: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to a new file and fsyncs it; a short write or a full disk raises OSError."""
  fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  try:
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)
  finally:
    os.close(fd)


def _sum_line(digest: str) -> bytes:
  """The content of ``structure.json.sha256`` (``sha256sum -c`` reads it)."""
  return f'{digest}  {STRUCTURE}\n'.encode()


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swaps two existing directories (Linux ``renameat2(RENAME_EXCHANGE)``). False where
  the platform or file system cannot; other failures raise OSError."""
  if sys.platform != 'linux':
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
    return False
  raise OSError(err, os.strerror(err), str(a), None, str(b))


def _replace_dir(tmp: pathlib.Path, path: pathlib.Path) -> None:
  """Puts the finished ``tmp`` at ``path``. An existing ``path`` stays whole until the new one is in
  place: swapped atomically where the file system can, else renamed to ``NAME.old`` first (and
  renamed back if the second rename fails)."""
  old = path.with_name(path.name + '.old')
  if not path.exists():
    os.rename(tmp, path)
  elif _exchange(tmp, path):
    shutil.rmtree(tmp, ignore_errors=True)  # now the previous checkpoint
  else:
    if old.exists():
      shutil.rmtree(old)
    os.rename(path, old)
    try:
      os.rename(tmp, path)
    except BaseException:
      os.rename(old, path)
      raise
  _fsync_dir(path.parent)
  if old.exists():
    shutil.rmtree(old, ignore_errors=True)


def _several_processes() -> bool:
  return jax.process_count() > 1


def _barrier(name: str) -> None:
  if _several_processes():
    from models import distributed  # pylint: disable=g-import-not-at-top
    distributed.barrier(name)


def _for_orbax(arrays: dict[str, Any]) -> dict[str, Any]:
  """The arrays as orbax saves them from several processes: arrays of the global mesh as they are
  (each process writes the shards it holds), everything else (the same on every process) as NumPy,
  which orbax writes from process 0 alone."""
  if not _several_processes():
    return arrays
  return {k: v if isinstance(v, jax.Array) and not v.is_fully_addressable else np.asarray(v)
          for k, v in arrays.items()}


def save_tree(path: str | pathlib.Path, tree: Any, metadata: dict[str, Any] | None = None) -> None:
  """Saves ``tree`` (nested dicts/lists of arrays and compressed leaves) plus JSON ``metadata``.

  On-disk layout (format version 2)::

    NAME/arrays/...              orbax's files (absent when the tree holds no array)
    NAME/structure.json          {"format_version": 2, "structure": ..., "metadata": ...,
                                  "files": {"arrays/...": {"sha256": HEX, "bytes": N}, ...}}
    NAME/structure.json.sha256   "HEX  structure.json\\n" (the sha256 of structure.json's bytes)

  ``files`` lists every file under ``NAME`` but these two. Everything is written to ``NAME.tmp``,
  hashed and fsynced there, then put in place of ``NAME`` in one step: a save that fails (a full
  disk, an interrupt) leaves a previous ``NAME`` untouched and removes ``NAME.tmp``.

  With several processes every one of them calls this with the same tree and path (a file system
  they share): they write the arrays together, process 0 does the rest, and all return once the
  checkpoint is in place.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).absolute()
  arrays: dict[str, Any] = {}
  structure = _encode(tree, '', arrays)
  tmp = path.with_name(path.name + '.tmp')
  writer = jax.process_index() == 0
  if writer:
    if tmp.exists():
      shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
  _barrier(f'checkpoint {tmp} ready')
  if arrays:
    try:
      ckptr = ocp.StandardCheckpointer()
      ckptr.save(tmp / 'arrays', _for_orbax(arrays))
      ckptr.wait_until_finished()
    except BaseException:
      if writer:
        shutil.rmtree(tmp, ignore_errors=True)
      raise
  _barrier(f'checkpoint {tmp} arrays written')
  if writer:
    _finish_save(tmp, path, structure, metadata)
  _barrier(f'checkpoint {path} in place')


def _finish_save(tmp: pathlib.Path, path: pathlib.Path, structure: Any,
                 metadata: dict[str, Any] | None) -> None:
  """Checksums the files orbax wrote to ``tmp``, writes the structure document and puts ``tmp`` in
  place of ``path`` (removing ``tmp`` when anything fails)."""
  try:
    files = {}
    for rel in _data_files(tmp):
      digest, size = _hash_file(tmp / rel, sync=True)
      files[rel] = {'sha256': digest, 'bytes': size}
    for d, _, _ in os.walk(tmp):
      _fsync_dir(pathlib.Path(d))
    doc = json.dumps({'format_version': FORMAT_VERSION, 'structure': structure,
                      'metadata': metadata or {}, 'files': files}).encode()
    _write_file(tmp / STRUCTURE, doc)
    _write_file(tmp / STRUCTURE_SUM, _sum_line(hashlib.sha256(doc).hexdigest()))
    _fsync_dir(tmp)
    _replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _corrupt(path: pathlib.Path, what: str) -> CheckpointError:
  return CheckpointError(f'checkpoint {path} is corrupt: {what}')


def _read_structure(path: pathlib.Path) -> dict[str, Any]:
  """The structure document of checkpoint ``path``, after checking it against its checksum."""
  f = path / STRUCTURE
  if not f.is_file():
    old = path.with_name(path.name + '.old')
    hint = f' ({old.name} holds the one an interrupted save replaced)' if (
        old / STRUCTURE).is_file() else ''
    raise CheckpointError(f'{path} is not a checkpoint (no {STRUCTURE}){hint}')
  data = f.read_bytes()
  sum_file = path / STRUCTURE_SUM
  if sum_file.exists():
    m = re.fullmatch(rb'([0-9a-f]{64})  ' + re.escape(STRUCTURE.encode()) + rb'\n',
                     sum_file.read_bytes())
    if m is None:
      raise _corrupt(path, f'{STRUCTURE_SUM} is not the sha256 line of {STRUCTURE}')
    if hashlib.sha256(data).hexdigest() != m.group(1).decode():
      raise _corrupt(path, f'{STRUCTURE} does not match its checksum in {STRUCTURE_SUM}')
  try:
    doc = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _corrupt(path, f'{STRUCTURE} is not valid JSON') from e
  version = doc.get('format_version') if isinstance(doc, dict) else None
  if version != FORMAT_VERSION:
    hint = (' (written without checksums, before they were added): delete it and save it again'
            if version == 1 else '')
    raise CheckpointError(f'checkpoint {path} has format version {version}, this library reads '
                          f'version {FORMAT_VERSION}{hint}')
  if not sum_file.exists():
    raise _corrupt(path, f'{STRUCTURE_SUM} is missing')
  files = doc.get('files')
  if not isinstance(files, dict) or not all(
      isinstance(r, dict) and isinstance(r.get('sha256'), str) and isinstance(r.get('bytes'), int)
      and not pathlib.PurePosixPath(k).is_absolute() and '..' not in pathlib.PurePosixPath(k).parts
      for k, r in files.items()):
    raise _corrupt(path, f'{STRUCTURE} has no valid list of file checksums')
  return doc


def _verify_files(path: pathlib.Path, files: dict[str, dict[str, Any]]) -> None:
  """Checks that the files under ``path`` are exactly ``files``, each with its size and sha256."""
  present = _data_files(path)
  missing = sorted(set(files) - set(present))
  if missing:
    raise _corrupt(path, f'{missing[0]} is missing')
  extra = sorted(set(present) - set(files))
  if extra:
    raise _corrupt(path, f'{extra[0]} is not one of its files (no checksum recorded)')
  for rel in present:
    digest, size = _hash_file(path / rel)
    if size != files[rel]['bytes']:
      raise _corrupt(path, f'{rel} does not match its checksum (it has {size} bytes, '
                     f'{files[rel]["bytes"]} were written)')
    if digest != files[rel]['sha256']:
      raise _corrupt(path, f'{rel} does not match its checksum')


def _load_verified(path: pathlib.Path) -> dict[str, Any]:
  doc = _read_structure(path)
  _verify_files(path, doc['files'])
  return doc


def load_metadata(path: str | pathlib.Path) -> dict[str, Any]:
  """The structure document of a checkpoint (``doc['metadata']`` is what was saved with it), after
  verifying every file of the checkpoint like :func:`load_tree`."""
  return _load_verified(pathlib.Path(path).absolute())


def _restore_target(arrays_dir: pathlib.Path) -> dict[str, Any]:
  """Shapes and dtypes of every array orbax wrote, placed on the first local device (64-bit ones
  without x64 as NumPy arrays, which keep their width). Under a mesh (``models.sharding``), and
  with several processes, every array is restored whole into host memory (each process reads all
  of it) and becomes an uncommitted array of the default device, which goes with arrays of any
  placement."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from models import sharding  # pylint: disable=g-import-not-at-top
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  meta = ocp.StandardCheckpointer().metadata(arrays_dir).item_metadata
  host = _several_processes() or sharding.active().mesh is not None

  def target(m):
    dtype = np.dtype(m.dtype)
    if host or (dtype.itemsize == 8 and not jax.config.jax_enable_x64):
      return np.zeros(m.shape, dtype)
    return jax.ShapeDtypeStruct(tuple(m.shape), dtype, sharding=device)
  return {k: target(m) for k, m in meta.items()}


def load_tree(path: str | pathlib.Path) -> tuple[Any, dict[str, Any]]:
  """Restores ``(tree, metadata)`` written by :func:`save_tree`.

  Before anything is read, ``structure.json`` is checked against ``structure.json.sha256`` and every
  other file against the size and sha256 recorded for it; a changed, truncated, missing or
  unexpected file is a :class:`CheckpointError` naming it (its path inside the checkpoint). A
  checkpoint of format version 1 (written without checksums) is refused with an error naming its
  version: save it again.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).absolute()
  doc = _load_verified(path)
  arrays = {}
  if (path / 'arrays').exists():
    try:
      # Restored onto this process's first device whatever mesh saved them: a checkpoint written
      # on 8 devices loads on 1 (and the stages reshard it for the active mesh).
      arrays = ocp.StandardCheckpointer().restore(path / 'arrays',
                                                  _restore_target(path / 'arrays'))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'checkpoint {path} is corrupt: cannot restore its arrays ({e})') from e
  return _decode(doc['structure'], arrays, ''), doc['metadata']


def save_model(path: str | pathlib.Path, params: Any, config, extra: dict[str, Any] | None = None):
  """Saves a (compressed) model: params + its :class:`~models.config.ModelConfig`."""
  save_tree(path, params, {'config': config.to_dict(), **(extra or {})})


def load_model(path: str | pathlib.Path):
  """Loads ``(config, params, metadata)`` saved by :func:`save_model`."""
  from models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  params, meta = load_tree(path)
  cfg = dict(meta['config'])
  for k in ('rope_llama3',):
    if cfg.get(k) is not None:
      cfg[k] = tuple(cfg[k])
  return ModelConfig(**cfg), params, meta


def tree_digest(tree: Any) -> str:
  """sha256 of a pytree: its structure (with the static fields of compressed leaves), and every
  array's path, dtype, shape and bytes; a leaf with a ``digest()`` method (blocks left on disk,
  :class:`models.loading.LazyLayers`) contributes that instead of its bytes."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  h.update(str(treedef).encode())
  for path, leaf in leaves:
    if callable(getattr(leaf, 'digest', None)):  # e.g. blocks still on disk (LazyLayers)
      h.update(f'\n{jax.tree_util.keystr(path)} {leaf.digest()}\n'.encode())
      continue
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'\n{jax.tree_util.keystr(path)} {a.dtype} {a.shape}\n'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def run_fingerprint(cfg, tokens, settings: str, trees=()) -> str:
  """A short hash naming a resumable run: model config, input tokens (values and shape), its
  settings (as text) and every array of the trees it starts from (e.g. the whole input model, see
  :func:`tree_digest`). A checkpoint is resumed only by the same run."""
  h = hashlib.sha256()
  h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
  h.update(f'tokens {tree_digest(np.asarray(tokens))}\n'.encode())
  h.update(settings.encode())
  for t in trees:
    h.update(f'\ntree {tree_digest(t)}'.encode())
  return h.hexdigest()[:16]


class ResumableSweep:
  """A loop over the blocks (or windows) of a model whose finished work survives interruption.

  Compression and reconstruction both walk the model in order and carry hidden states from one step
  to the next. Every ``every_s`` seconds, after the last step and at ``stop_after``, the blocks the
  steps since the last save changed are written (``DIR/block_NNN``), then the carried ``state``
  with the step to resume at (``DIR/state``): a crash between the two only repeats those steps. A
  rerun with the same ``fingerprint`` resumes after the last saved step and gives identical
  results; a checkpoint of another run is refused.

  Usage::

    sweep = ResumableSweep(ckpt_dir, fingerprint, total=n, desc='compress', unit='block')
    start, state, meta = sweep.resume()      # (0, None, {}) for a fresh run
    for j in range(start): layers[j] = sweep.load_block(j)
    for i in sweep.steps(start):
      ...                                     # work on block i
      if sweep.done(i, layers, [i], state, {'reports': ...}):
        break
  """

  def __init__(self, directory: str | pathlib.Path | None, fingerprint: str, total: int, *,
               desc: str, unit: str, what: str = 'checkpoint', every_s: float = 60.0,
               stop_after: int | None = None, progress: bool = True):
    self.dir = pathlib.Path(directory) if directory else None
    self.fingerprint = fingerprint
    self.total = total
    self.desc, self.unit, self.what = desc, unit, what
    self.every_s = every_s
    self.stop_after = stop_after
    self.progress = progress
    self.bar = None
    self._touched: set[int] = set()
    self._last_save = time.time()

  def resume(self) -> tuple[int, Any, dict[str, Any]]:
    """``(next step, carried state, metadata)`` of a saved run, or ``(0, None, {})``."""
    if self.dir is None or not (self.dir / 'state').exists():
      return 0, None, {}
    state, meta = load_tree(self.dir / 'state')
    if meta.get('fingerprint') != self.fingerprint or 'next' not in meta:
      raise CheckpointError(
          f'{self.what} in {self.dir} was written by a different run (model, data, recipe or '
          'options differ); remove it or use another checkpoint directory')
    logging.info('resuming %s at step %d from %s', self.desc, int(meta['next']), self.dir)
    return int(meta['next']), state, meta

  def load_block(self, b: int) -> Any:
    """Block ``b`` as the saved run left it."""
    tree, meta = load_tree(self.dir / f'block_{b:03d}')
    if meta.get('fingerprint') != self.fingerprint:
      raise CheckpointError(f'{self.what} {self.dir}/block_{b:03d} belongs to another run')
    return tree

  def steps(self, start: int):
    """The remaining steps, with a progress bar (``self.bar``) counting all of them."""
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    self.bar = tqdm(range(start, self.total), desc=self.desc, unit=self.unit,
                    disable=not self.progress, initial=start, total=self.total)
    return self.bar

  def done(self, step: int, layers, blocks, state: Any, meta: dict[str, Any]) -> bool:
    """Marks ``step`` finished after it changed ``blocks`` (indices into ``layers``); saves when
    due. Returns True when the run stops here (``stop_after``)."""
    self._touched.update(blocks)
    stop = self.stop_after is not None and step + 1 >= self.stop_after
    due = time.time() - self._last_save >= self.every_s
    if self.dir is not None and _several_processes():  # every process saves, or none
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
    if self.dir is not None and (stop or step + 1 == self.total or due):
      for b in sorted(self._touched):
        save_tree(self.dir / f'block_{b:03d}', layers[b], {'fingerprint': self.fingerprint})
      save_tree(self.dir / 'state', state, {'fingerprint': self.fingerprint, 'next': step + 1,
                                            **meta})
      self._touched, self._last_save = set(), time.time()
    return stop
