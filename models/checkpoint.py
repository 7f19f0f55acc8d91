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
import pathlib
import shutil
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
    return jnp.asarray(arr)
  if t in _LEAF_CLASSES:
    fields = {k: _decode(v, arrays, f'{where}/{k}') for k, v in spec['fields'].items()}
    return _LEAF_CLASSES[t](**fields, **spec['static'])
  raise CheckpointError(f'checkpoint is corrupt: unknown node type {t!r} at {where}')


def save_tree(path: str | pathlib.Path, tree: Any, metadata: dict[str, Any] | None = None) -> None:
  """Saves ``tree`` (nested dicts/lists of arrays and compressed leaves) plus JSON ``metadata``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).absolute()
  tmp = path.with_name(path.name + '.tmp')
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  arrays: dict[str, Any] = {}
  structure = _encode(tree, '', arrays)
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
  h.update(np.ascontiguousarray(np.asarray(tokens)).tobytes())
  h.update(settings.encode())
  for a in arrays:
    h.update(np.asarray(a, np.float32).tobytes())
  return h.hexdigest()[:16]
