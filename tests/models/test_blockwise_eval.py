"""Block-by-block evaluation (``compare_blockwise``) against the whole-model ``compare_many``."""

import collections.abc

import jax
import numpy as np
import pytest

from models import config as config_lib
from models import evaluate as eval_lib
from models import llama


class CountingLayers(collections.abc.Sequence):
  """A lazy-looking layers sequence: counts every ``__getitem__`` and refuses to be iterated or
  measured (the evaluation must index ``range(cfg.num_layers)``). ``host``: hands out NumPy
  copies, as a reader from disk would."""

  def __init__(self, blocks, host=False):
    self._blocks = list(blocks)
    self._host = host
    self.reads = [0] * len(self._blocks)

  def __getitem__(self, i):
    self.reads[i] += 1
    block = self._blocks[i]
    return jax.device_get(block) if self._host else block

  def __len__(self):
    raise AssertionError('len() of the layers was called')

  def __iter__(self):
    raise AssertionError('the layers were iterated')


def _perturbed(params, seed):
  """Every block weight scaled by 1.1 plus a little noise."""
  leaves, treedef = jax.tree.flatten(params['layers'])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [1.1 * a + 0.02 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
  return dict(params, layers=jax.tree.unflatten(treedef, leaves))


def _assert_same(got, want):
  assert set(got) == set(want)
  for name, w in want.items():
    assert set(got[name]) == set(w)
    assert got[name]['eval_tokens'] == w['eval_tokens']
    for k in w:
      if k != 'eval_tokens':
        np.testing.assert_allclose(got[name][k], w[k], rtol=1e-5, atol=1e-7, err_msg=f'{name}/{k}')


@pytest.fixture(scope='module')
def tiny():
  cfg = config_lib.tiny_config()
  params = llama.init_params(cfg, jax.random.key(0), scale=0.3)
  windows = np.asarray(jax.random.randint(jax.random.key(1), (8, 24), 0, cfg.vocab_size))
  models = {'noisy': _perturbed(params, 5), 'scaled': _perturbed(params, 6)}
  want = eval_lib.compare_many(params, models, cfg, windows, batch_size=4, progress=False)
  return cfg, params, models, windows, want


def test_matches_compare_many(tiny):
  cfg, params, models, windows, want = tiny
  got = eval_lib.compare_blockwise(params, models, cfg, windows, batch_size=4, progress=False)
  _assert_same(got, want)
  assert got['noisy']['kl'] > 1e-4 and got['scaled']['kl'] > 1e-4
  assert got['__ref__']['eval_tokens'] == 8 * 23


def test_each_block_read_exactly_once_per_model(tiny):
  cfg, params, models, windows, want = tiny
  wrapped = {name: dict(p, layers=CountingLayers(p['layers'])) for name, p in models.items()}
  ref = dict(params, layers=CountingLayers(params['layers']))
  got = eval_lib.compare_blockwise(ref, wrapped, cfg, windows, batch_size=4, progress=False)
  _assert_same(got, want)
  for p in [ref, *wrapped.values()]:
    assert p['layers'].reads == [1] * cfg.num_layers


def test_host_numpy_blocks(tiny):
  cfg, params, models, windows, want = tiny
  host = jax.device_get(params)
  assert isinstance(host['layers'][0]['mlp']['up_proj']['kernel'], np.ndarray)
  lazy = dict(params, layers=CountingLayers(params['layers'], host=True))
  got = eval_lib.compare_blockwise(host, {'noisy': models['noisy'], 'scaled': dict(
      models['scaled'], layers=CountingLayers(models['scaled']['layers'], host=True)),
                                          'lazy_dense': lazy}, cfg, windows, batch_size=4,
                                   progress=False)
  _assert_same({k: got[k] for k in want}, want)
  assert abs(got['lazy_dense']['kl']) < 1e-6 and got['lazy_dense']['top1'] == 1.0


def test_family_config_with_per_layer_attention_and_softcap():
  cfg = config_lib.tiny_config(
      model_type='gemma3', num_layers=2, tie_word_embeddings=True, activation='gelu_tanh',
      norm_plus_one=True, post_norms=True, qk_norm=True, embed_scale=True,
      query_pre_attn_scalar=24.0, attn_softcap=20.0, final_softcap=3.0, sliding_window=6,
      layer_types=('sliding_attention', 'full_attention'),
      rope_theta=1e6, rope_local_theta=1e4)
  params = llama.init_params(cfg, jax.random.key(3), scale=0.3)
  windows = np.asarray(jax.random.randint(jax.random.key(4), (4, 20), 0, cfg.vocab_size))
  models = {'scaled': _perturbed(params, 5)}
  want = eval_lib.compare_many(params, models, cfg, windows, batch_size=2, progress=False)
  got = eval_lib.compare_blockwise(params, models, cfg, windows, batch_size=2, progress=False)
  _assert_same(got, want)


def test_empty_windows_are_refused(tiny):
  cfg, params, models, _, _ = tiny
  with pytest.raises(ValueError, match='non-empty'):
    eval_lib.compare_blockwise(params, models, cfg, np.zeros((0, 8), np.int32), progress=False)
