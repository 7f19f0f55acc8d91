"""Orbax checkpoints of param pytrees that hold compressed leaves.

The arrays are saved with orbax as one flat dict (``path -> array``); the tree structure, including
the leaf types of :mod:`kernels.formats` and their static fields (bits, group size, ...), is saved
beside them as ``structure.json``. Restoring therefore needs no target tree, and a checkpoint whose
arrays or structure do not match is reported as corrupt, naming what is wrong.

``save_tree``/``load_tree`` write and read one directory atomically (written to ``NAME.tmp`` and
renamed), so an interrupted save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import formats

_LEAF_CLASSES = {c.__name__: c for c in (formats.CompressedLinear, formats.QuantizedWeight,
                                          formats.Sparse24Weight, formats.LowRank)}
FORMAT_VERSION = 1


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


def save_tree(path: str | pathlib.Path, tree: Any, metadata: dict[str, Any] | None = None) -> None:
  """Saves ``tree`` (nested dicts/lists of arrays and compressed leaves) plus JSON ``metadata``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).absolute()
  arrays: dict[str, Any] = {}
  structure = _encode(tree, '', arrays)
  tmp = path.with_name(path.name + '.tmp')
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  if arrays:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / 'arrays', arrays)
    ckptr.wait_until_finished()
  (tmp / 'structure.json').write_text(json.dumps(
      {'format_version': FORMAT_VERSION, 'structure': structure, 'metadata': metadata or {}}))
  if path.exists():
    shutil.rmtree(path)
  tmp.rename(path)


def load_metadata(path: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(path)
  f = path / 'structure.json'
  if not f.exists():
    raise CheckpointError(f'{path} is not a checkpoint (no structure.json)')
  try:
    doc = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f'checkpoint {path} is corrupt: structure.json is not valid JSON') from e
  if doc.get('format_version') != FORMAT_VERSION:
    raise CheckpointError(f'checkpoint {path} has format version {doc.get("format_version")}, '
                          f'this library reads version {FORMAT_VERSION}')
  return doc


def load_tree(path: str | pathlib.Path) -> tuple[Any, dict[str, Any]]:
  """Restores ``(tree, metadata)`` written by :func:`save_tree`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).absolute()
  doc = load_metadata(path)
  arrays = {}
  if (path / 'arrays').exists():
    try:
      arrays = ocp.StandardCheckpointer().restore(path / 'arrays')
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


def run_fingerprint(cfg, tokens, settings: str, arrays=()) -> str:
  """A short hash naming a resumable run: model config, input tokens, its settings (as text) and
  a few sample arrays of the params it starts from. A checkpoint is resumed only by the same run."""
  h = hashlib.sha256()
  h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
  tokens = np.ascontiguousarray(np.asarray(tokens))
  h.update(f'tokens {tokens.shape} {tokens.dtype}\n'.encode())
  h.update(tokens.tobytes())
  h.update(settings.encode())
  for a in arrays:
    a = np.asarray(a, np.float32)
    h.update(f'\narray {a.shape}\n'.encode())
    h.update(a.tobytes())
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
    if self.dir is not None and (stop or step + 1 == self.total or
                                 time.time() - self._last_save >= self.every_s):
      for b in sorted(self._touched):
        save_tree(self.dir / f'block_{b:03d}', layers[b], {'fingerprint': self.fingerprint})
      save_tree(self.dir / 'state', state, {'fingerprint': self.fingerprint, 'next': step + 1,
                                            **meta})
      self._touched, self._last_save = set(), time.time()
    return stop
