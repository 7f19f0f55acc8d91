"""Tests for models/checkpoint.py.

Properties: ``save_tree``/``load_tree`` restore a tree of dicts, lists, tuples, None, arrays of
several dtypes and every compressed leaf type bit-exactly (types, static fields, dtypes, values),
with its JSON metadata; saving replaces an existing checkpoint and leaves no temporary directory;
``save_model``/``load_model`` restore the config (including tuple fields); ``run_fingerprint`` is
stable and changes with each input; every documented corruption is a :class:`CheckpointError`
naming the problem.
"""

import dataclasses
import hashlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import quantize
from kernels import formats
from kernels.formats import CompressedLinear, LowRank, QuantizedWeight, QuantSpec
from models import checkpoint
from models import config as config_lib
from models.checkpoint import CheckpointError


def _tree():
  """A param-like tree holding every leaf type and several dtypes."""
  k = iter(jax.random.split(jax.random.key(0), 16))
  w = jax.random.normal(next(k), (64, 8))
  q = quantize.rtn(w, QuantSpec(bits=3, group_size=32))
  q_act = dataclasses.replace(quantize.rtn(w, QuantSpec(bits=4, group_size=16, symmetric=True)),
                              g_idx=jnp.asarray(np.random.default_rng(0).permutation(64) // 16,
                                                jnp.int32))
  w24 = jnp.where(jnp.tile(jnp.array([True, False, True, False]), 16)[:, None], w, 0.0)
  mask = jax.random.uniform(next(k), (64, 8)) < 0.5
  adapter = LowRank(a=jax.random.normal(next(k), (64, 2)), b=jax.random.normal(next(k), (2, 8)),
                    preserved=1)
  return {
      'embed_tokens': {'embedding': jax.random.normal(next(k), (10, 8)).astype(jnp.bfloat16)},
      'layers': [
          {'q': {'kernel': CompressedLinear(weight=q)},
           'k': {'kernel': CompressedLinear(weight=q_act, mask=mask, adapter=adapter)},
           'v': {'kernel': CompressedLinear(weight=formats.sparse24_compress(w24))},
           'o': {'kernel': CompressedLinear(weight=formats.sparse24_from_quantized(
               q, jnp.tile(jnp.array([False, True, True, False]), 16)[:, None] &
               jnp.ones((64, 8), bool)))},
           'bias': None},
          {'dense': {'kernel': w}, 'lowrank': LowRank(a=q, b=jnp.ones((8, 3), jnp.float16))},
      ],
      'pair': (jnp.arange(5, dtype=jnp.int32), jnp.array([1, 2, 255], jnp.uint8)),
      'flags': np.array([True, False, True]),
      'scalar': jnp.float32(3.5),
  }


def _assert_same(a, b):
  """Same tree structure (types and static fields included), dtypes and bits."""
  sa = jax.tree.structure(a, is_leaf=lambda x: x is None)
  sb = jax.tree.structure(b, is_leaf=lambda x: x is None)
  assert sa == sb, (sa, sb)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()  # bit-exact (also for bfloat16 and NaN payloads)


def test_tree_roundtrip_is_bit_exact(tmp_path):
  tree = _tree()
  meta = {'fingerprint': 'abc', 'next_block': 3, 'reports': [{'name': 'x', 'err': 0.25}],
          'none': None, 'nested': {'list': [1, 2.5, 'three']}}
  checkpoint.save_tree(tmp_path / 'ck', tree, meta)
  back, meta_back = checkpoint.load_tree(tmp_path / 'ck')
  assert meta_back == meta
  _assert_same(tree, back)
  # Leaf types and static fields survive.
  k = back['layers'][0]['k']['kernel']
  assert isinstance(k, CompressedLinear) and isinstance(k.weight, QuantizedWeight)
  assert (k.weight.bits, k.weight.group_size, k.weight.symmetric, k.weight.in_features) == (
      4, 16, True, 64)
  assert k.adapter.preserved == 1 and k.mask.dtype == jnp.bool_
  assert back['layers'][0]['bias'] is None
  assert isinstance(back['layers'], list) and isinstance(back['pair'], tuple)
  assert back['embed_tokens']['embedding'].dtype == jnp.bfloat16
  # Effective weights are identical.
  for lin in ('q', 'k', 'v', 'o'):
    np.testing.assert_array_equal(
        np.asarray(formats.effective_weight(back['layers'][0][lin]['kernel'])),
        np.asarray(formats.effective_weight(tree['layers'][0][lin]['kernel'])))
  # Written atomically: no temporary directory left behind; a structure file beside the arrays.
  assert not (tmp_path / 'ck.tmp').exists()
  assert (tmp_path / 'ck' / 'structure.json').exists()


def test_save_replaces_existing_checkpoint(tmp_path):
  checkpoint.save_tree(tmp_path / 'ck', {'a': jnp.ones(3), 'b': jnp.zeros(2)}, {'v': 1})
  checkpoint.save_tree(tmp_path / 'ck', {'c': jnp.full(4, 2.0)}, {'v': 2})
  back, meta = checkpoint.load_tree(tmp_path / 'ck')
  assert set(back) == {'c'} and meta == {'v': 2}
  np.testing.assert_array_equal(np.asarray(back['c']), 2.0)
  # A stale temporary directory from an interrupted save is cleared.
  (tmp_path / 'ck.tmp').mkdir()
  (tmp_path / 'ck.tmp' / 'junk').write_text('x')
  checkpoint.save_tree(tmp_path / 'ck', {'d': jnp.ones(1)})
  assert not (tmp_path / 'ck.tmp').exists()
  assert set(checkpoint.load_tree(tmp_path / 'ck')[0]) == {'d'}


def test_tree_without_arrays(tmp_path):
  checkpoint.save_tree(tmp_path / 'ck', {'x': None, 'y': [None, {}]})
  assert not (tmp_path / 'ck' / 'arrays').exists()
  back, meta = checkpoint.load_tree(tmp_path / 'ck')
  assert back == {'x': None, 'y': [None, {}]} and meta == {}


def test_unsupported_node_is_a_type_error(tmp_path):
  with pytest.raises(TypeError, match='cannot checkpoint a str at /a/b'):
    checkpoint.save_tree(tmp_path / 'ck', {'a': {'b': 'text'}})


def test_save_and_load_model(tmp_path):
  cfg = config_lib.tiny_config(num_layers=1, rope_llama3=(8.0, 1.0, 4.0, 64), eos_token_id=2)
  params = {'layers': [{'w': {'kernel': CompressedLinear(
      weight=quantize.rtn(jnp.ones((32, 4)), QuantSpec(bits=2, group_size=32)))}}]}
  checkpoint.save_model(tmp_path / 'm', params, cfg, {'timing': {'seconds': 1.5}})
  cfg2, back, meta = checkpoint.load_model(tmp_path / 'm')
  assert cfg2 == cfg and hash(cfg2) == hash(cfg)
  assert isinstance(cfg2.rope_llama3, tuple)
  assert meta['timing'] == {'seconds': 1.5} and meta['config']['num_layers'] == 1
  _assert_same(params, back)
  # Without extra metadata.
  checkpoint.save_model(tmp_path / 'm2', params, config_lib.tiny_config())
  assert checkpoint.load_model(tmp_path / 'm2')[0] == config_lib.tiny_config()


# --------------------------------------------------------------------------- errors


def _saved(tmp_path):
  path = tmp_path / 'ck'
  checkpoint.save_tree(path, {'a': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(2)}, {'m': 1})
  return path


def _reseal(path, text=None):
  """Rewrites the checksums of checkpoint ``path`` to match its files (and ``structure.json`` to
  ``text`` if given), as a writer with a bug would: the checks behind the checksums still apply."""
  f = path / 'structure.json'
  if text is None:
    doc = json.loads(f.read_text())
    doc['files'] = {}
    for p in sorted(path.rglob('*')):
      rel = p.relative_to(path).as_posix()
      if p.is_file() and rel not in ('structure.json', 'structure.json.sha256'):
        doc['files'][rel] = {'sha256': hashlib.sha256(p.read_bytes()).hexdigest(),
                             'bytes': p.stat().st_size}
    text = json.dumps(doc)
  f.write_text(text)
  (path / 'structure.json.sha256').write_text(
      f'{hashlib.sha256(f.read_bytes()).hexdigest()}  structure.json\n')


def _edit_structure(path, fn):
  f = path / 'structure.json'
  doc = json.loads(f.read_text())
  fn(doc)
  _reseal(path, json.dumps(doc))


def test_error_not_a_checkpoint(tmp_path):
  (tmp_path / 'empty').mkdir()
  for p in (tmp_path / 'empty', tmp_path / 'missing'):
    with pytest.raises(CheckpointError, match='is not a checkpoint'):
      checkpoint.load_tree(p)
    with pytest.raises(CheckpointError, match='is not a checkpoint'):
      checkpoint.load_metadata(p)
  assert issubclass(CheckpointError, ValueError)


def test_error_invalid_json(tmp_path):
  path = _saved(tmp_path)
  _reseal(path, '{not json')
  with pytest.raises(CheckpointError, match='structure.json is not valid JSON'):
    checkpoint.load_tree(path)


def test_error_format_version(tmp_path):
  path = _saved(tmp_path)
  _edit_structure(path, lambda d: d.update(format_version=checkpoint.FORMAT_VERSION + 1))
  v = checkpoint.FORMAT_VERSION
  with pytest.raises(CheckpointError,
                     match=f'format version {v + 1}, this library reads version {v}'):
    checkpoint.load_tree(path)


@pytest.mark.parametrize('edit,message', [
    (lambda d: d['structure']['items']['b'].update(key='nope'), 'array nope is missing'),
    (lambda d: d['structure']['items']['a'].update(shape=[3, 2]),
     r'array a has shape \[2, 3\], the structure says \[3, 2\]'),
    (lambda d: d['structure']['items']['a'].update(t='Mystery'), "unknown node type 'Mystery' at /a"),
], ids=['missing_array', 'shape_mismatch', 'unknown_node_type'])
def test_error_structure_does_not_match(tmp_path, edit, message):
  path = _saved(tmp_path)
  _edit_structure(path, edit)
  with pytest.raises(CheckpointError, match=message):
    checkpoint.load_tree(path)


def test_error_unreadable_arrays(tmp_path):
  path = _saved(tmp_path)
  shutil.rmtree(path / 'arrays')
  (path / 'arrays').mkdir()
  _reseal(path)
  with pytest.raises(CheckpointError, match='cannot restore its arrays'):
    checkpoint.load_tree(path)


# --------------------------------------------------------------------------- fingerprint


def test_run_fingerprint_stable_and_sensitive():
  cfg = config_lib.tiny_config()
  tokens = np.arange(32, dtype=np.int32).reshape(4, 8)
  arrays = [np.ones((2, 3), np.float32), np.arange(4, dtype=np.float32)]
  fp = checkpoint.run_fingerprint(cfg, tokens, 'settings', arrays)
  assert len(fp) == 16 and int(fp, 16) >= 0  # 16 hex digits
  # Stable: equal inputs (fresh copies, jax arrays, lists) give the same fingerprint.
  assert checkpoint.run_fingerprint(config_lib.tiny_config(), tokens.copy(), 'settings',
                                    [a.copy() for a in arrays]) == fp
  assert checkpoint.run_fingerprint(cfg, jnp.asarray(tokens), 'settings',
                                    [jnp.asarray(a) for a in arrays]) == fp
  assert checkpoint.run_fingerprint(cfg, tokens, 'settings', tuple(arrays)) == fp
  # Sensitive to every input.
  other_tokens = tokens.copy()
  other_tokens[3, 7] += 1
  other_arrays = [arrays[0], arrays[1] + np.float32(1e-3)]
  changed = [
      checkpoint.run_fingerprint(config_lib.tiny_config(rope_theta=20000.0), tokens, 'settings',
                                 arrays),
      checkpoint.run_fingerprint(config_lib.tiny_config(num_layers=3), tokens, 'settings', arrays),
      checkpoint.run_fingerprint(cfg, other_tokens, 'settings', arrays),
      checkpoint.run_fingerprint(cfg, tokens, 'settings2', arrays),
      checkpoint.run_fingerprint(cfg, tokens, 'settings', other_arrays),
      checkpoint.run_fingerprint(cfg, tokens, 'settings', arrays[:1]),
      checkpoint.run_fingerprint(cfg, tokens, 'settings'),
  ]
  assert fp not in changed
  assert len(set(changed)) == len(changed)


def test_run_fingerprint_depends_on_token_shape():
  cfg = config_lib.tiny_config()
  tokens = np.arange(32, dtype=np.int32)
  assert checkpoint.run_fingerprint(cfg, tokens.reshape(4, 8), 's') != (
      checkpoint.run_fingerprint(cfg, tokens.reshape(8, 4), 's'))


def test_64_bit_arrays_roundtrip(tmp_path):
  tree = {'i': np.array([2 ** 40], np.int64), 'f': np.array([1 / 3], np.float64)}
  checkpoint.save_tree(tmp_path / 'ck', tree)
  back, _ = checkpoint.load_tree(tmp_path / 'ck')
  assert np.asarray(back['i']).dtype == np.int64 and int(back['i'][0]) == 2 ** 40
  assert np.asarray(back['f']).dtype == np.float64


def test_keys_with_dots_that_would_collide_are_refused(tmp_path):
  tree = {'a.b': jnp.ones(3), 'a': {'b': jnp.zeros(3)}}
  with pytest.raises(checkpoint.CheckpointError, match='contains a dot'):
    checkpoint.save_tree(tmp_path / 'ck', tree)
  assert not (tmp_path / 'ck').exists()
