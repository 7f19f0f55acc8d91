"""Tests for recover/prompting.py (IDP) and the soft-prompt ``prefix`` of the forward pass, on the
tiny random Llama."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as config_lib
from models import data as data_lib
from models import evaluate as eval_lib
from models import llama, loading, losses
from recover import prompting

CFG = config_lib.tiny_config()


@pytest.fixture(scope='module')
def params():
  return llama.init_params(CFG, jax.random.key(0))


def _tokens(seed, n, t, lo, hi):
  return np.random.default_rng(seed).integers(lo, hi, (n, t)).astype(np.int32)


_forward = jax.jit(functools.partial(llama.forward, cfg=CFG))


def test_forward_prefix_none_and_empty_match_plain(params):
  tokens = jnp.asarray(_tokens(0, 2, 12, 0, CFG.vocab_size))

  @jax.jit
  def plain(params, tokens):  # the forward pass as it reads without a prefix
    x = llama.embed(params, tokens, CFG)
    for block in params['layers']:
      x = llama.block_apply(block, x, CFG)
    return llama.head(params, x, CFG)

  expected = plain(params, tokens)
  np.testing.assert_array_equal(np.asarray(_forward(params, tokens)), np.asarray(expected))
  empty = jnp.zeros((1, 0, CFG.hidden_size), jnp.float32)
  np.testing.assert_array_equal(np.asarray(_forward(params, tokens, prefix=empty)),
                                np.asarray(expected))


def test_prefix_of_token_embeddings_equals_prepended_tokens(params):
  tokens = jnp.asarray(_tokens(1, 2, 10, 0, CFG.vocab_size))
  pre_tokens = jnp.asarray(_tokens(2, 2, 5, 0, CFG.vocab_size))
  prefix = llama.embed(params, pre_tokens, CFG)  # [B, L, D]: one prefix per row
  got = _forward(params, tokens, prefix=prefix)
  whole = _forward(params, jnp.concatenate([pre_tokens, tokens], axis=1))[:, 5:]
  assert got.shape == (2, 10, CFG.vocab_size)
  np.testing.assert_allclose(np.asarray(got), np.asarray(whole), atol=1e-5, rtol=1e-5)
  # A [1, L, D] prefix is shared by every row.
  shared = _forward(params, tokens, prefix=prefix[:1])
  row0 = _forward(params, jnp.concatenate([pre_tokens[:1], tokens[:1]], axis=1))[:, 5:]
  np.testing.assert_allclose(np.asarray(shared[:1]), np.asarray(row0), atol=1e-5, rtol=1e-5)


def test_evaluate_prefixes(params):
  windows = _tokens(3, 3, 9, 0, CFG.vocab_size)
  plain = eval_lib.perplexity(params, CFG, windows, batch_size=2, progress=False)
  empty = eval_lib.perplexity(params, CFG, windows, batch_size=2, progress=False,
                              prefixes=np.zeros((3, 0, CFG.hidden_size), np.float32))
  np.testing.assert_allclose(empty['nll'], plain['nll'], rtol=1e-6)
  pre_tokens = _tokens(4, 3, 4, 0, CFG.vocab_size)
  prefixes = np.asarray(llama.embed(params, jnp.asarray(pre_tokens), CFG))
  got = eval_lib.perplexity(params, CFG, windows, batch_size=2, progress=False, prefixes=prefixes)
  nll = eval_lib.token_nll(params, jnp.asarray(np.concatenate([pre_tokens, windows], 1)), CFG)
  np.testing.assert_allclose(got['nll'], float(np.asarray(nll)[:, 4:].mean()), rtol=1e-5)
  with pytest.raises(ValueError, match='prefixes'):
    eval_lib.perplexity(params, CFG, windows, progress=False, prefixes=prefixes[:2])


def test_multiple_choice_prefixes(params):
  tok = loading.ByteTokenizer()
  rng = np.random.default_rng(0)
  words = ['mat', 'sky', 'dog', 'tree', 'blue', 'three', 'x', 'red']
  items = [data_lib.MCItem(context=f'Item {i} is', gold=0,
                           choices=tuple(' ' + w for w in rng.choice(words, 4, replace=False)))
           for i in range(8)]
  pre_tokens = rng.integers(65, 90, (8, 3)).astype(np.int32)
  score = functools.partial(eval_lib.score_multiple_choice, cfg=CFG, tokenizer=tok, batch_size=8,
                            progress=False)
  model = llama.init_params(CFG, jax.random.key(0), scale=0.1)  # prefixes move its predictions
  plain = score(model, items=items)
  empty = score(model, items=items, prefixes=np.zeros((8, 0, CFG.hidden_size), np.float32))
  assert empty['predictions'] == plain['predictions']
  # Item i scored after prefixes[i] = item i scored after those prefix tokens.
  prefixed = [data_lib.MCItem(context=bytes(pre_tokens[i].tolist()).decode() + it.context,
                              choices=it.choices, gold=it.gold) for i, it in enumerate(items)]
  want = score(model, items=prefixed)
  got = score(model, items=items, prefixes=llama.embed(model, jnp.asarray(pre_tokens), CFG))
  assert got['predictions'] == want['predictions']
  assert got['predictions'] != plain['predictions']  # (the check above is not vacuous)
  swapped = score(model, items=items, prefixes=llama.embed(model, jnp.asarray(pre_tokens[::-1]), CFG))
  assert swapped['predictions'] != got['predictions']  # each item gets its own prefix
  with pytest.raises(ValueError, match='prefixes'):
    score(model, items=items, prefixes=np.zeros((3, 1, CFG.hidden_size), np.float32))


def test_routing_picks_matching_prompt(params):
  # Two clearly different token distributions (a random model has no shared structure between
  # token embeddings, so each draws from a few tokens of its own).
  low = _tokens(5, 16, 16, 0, 4)
  high = _tokens(6, 16, 16, 200, 204)
  keys = [prompting.input_keys(params, CFG, g, batch_size=8).mean(0) for g in (low, high)]
  keys = np.stack([k / np.linalg.norm(k) for k in keys])
  prompts = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, CFG.hidden_size)), jnp.float32)
  pool = prompting.PromptPool(prompts=prompts, keys=jnp.asarray(keys))
  feats = prompting.input_keys(params, CFG, low[:2])
  np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)
  test_low = _tokens(7, 6, 16, 0, 4)
  test_high = _tokens(8, 6, 16, 200, 204)
  idx = prompting.route_inputs(params, CFG, pool, np.concatenate([test_low, test_high]),
                               batch_size=4)
  np.testing.assert_array_equal(idx, [0] * 6 + [1] * 6)
  # forward_with_pool = the forward with each row's routed prompt prepended.
  mixed = jnp.asarray(np.stack([test_high[0], test_low[0]]))
  got = jax.jit(functools.partial(prompting.forward_with_pool, cfg=CFG))(params, pool=pool,
                                                                         tokens=mixed)
  want = _forward(params, mixed, prefix=prompts[jnp.asarray([1, 0])])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  # Right padding under a mask routes like the unpadded input.
  padded = np.concatenate([test_high[:1, :10], np.zeros((1, 6), np.int32)], 1)
  mask = np.arange(16)[None] < 10
  f_pad = prompting.input_keys(params, CFG, padded, mask=mask, batch_size=1)
  f_cut = prompting.input_keys(params, CFG, test_high[:1, :10], batch_size=1)
  np.testing.assert_allclose(f_pad, f_cut, atol=1e-5)
  # An intermediate routing layer works too (0: token embeddings).
  f0 = prompting.input_keys(params, CFG, test_low, layer=0, batch_size=6)
  assert f0.shape == (6, CFG.hidden_size)
  with pytest.raises(ValueError, match='layer'):
    prompting.input_key(params, CFG, jnp.asarray(test_low), layer=CFG.num_layers + 1)


def test_training_lowers_group_loss_and_leaves_params_untouched():
  # Larger random weights than the fixture's: logits with enough range for a prompt to matter.
  params = llama.init_params(CFG, jax.random.key(0), scale=0.1)
  before_params = jax.tree.map(np.array, params)
  # Structured groups: a periodic pattern over a few tokens (a prompt can steer the next-token
  # distribution towards them).
  rng = np.random.default_rng(9)
  group_a = (rng.integers(0, 8, (8, 1)) + np.arange(24)[None] % 8 + 10).astype(np.int32)
  group_b = rng.integers(200, 216, (8, 24)).astype(np.int32)
  config = prompting.IDPConfig(num_prompts=2, prompt_len=4, steps=40, batch_size=4, lr=3e-2,
                               seed=0)
  pool, info = prompting.train_pool(params, CFG, [group_a, group_b], config)
  assert pool.prompts.shape == (2, 4, CFG.hidden_size) and pool.prompts.dtype == jnp.float32
  assert pool.keys.shape == (2, CFG.hidden_size)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(pool.keys), axis=-1), 1.0, rtol=1e-5)
  assert info['losses'].shape == (2, 40)
  assert prompting.added_parameters(pool) == 2 * 4 * CFG.hidden_size + 2 * CFG.hidden_size
  init = prompting.init_prompts(params, CFG, 2, 4, 0)
  loss = jax.jit(lambda params, tokens, prefix: losses.lm_loss(
      llama.forward(params, tokens, CFG, prefix=prefix), tokens))
  for p, g in enumerate([group_a, group_b]):
    l0 = float(loss(params, jnp.asarray(g), init[p][None]))
    l1 = float(loss(params, jnp.asarray(g), pool.prompts[p][None]))
    assert l1 < l0 - 0.3, (p, l0, l1)
  # Each training group routes to its own prompt.
  idx = prompting.route_inputs(params, CFG, pool, np.concatenate([group_a, group_b]))
  np.testing.assert_array_equal(idx, [0] * 8 + [1] * 8)
  # The model is frozen: every param leaf is bit-identical after training.
  jax.tree.map(np.testing.assert_array_equal, before_params, jax.tree.map(np.array, params))


def test_kmeans_recovers_two_separated_clusters():
  rng = np.random.default_rng(0)
  a = rng.normal(0.0, 0.1, (20, 5)) + 3.0
  b = rng.normal(0.0, 0.1, (15, 5)) - 3.0
  x = np.concatenate([a, b])[rng.permutation(35)]
  truth = (x[:, 0] > 0).astype(int)
  labels = prompting.cluster(x, 2, seed=1)
  assert set(labels.tolist()) == {0, 1}
  assert np.array_equal(labels, truth) or np.array_equal(labels, 1 - truth)
  with pytest.raises(ValueError, match='num_clusters'):
    prompting.cluster(x, 36, seed=0)


@pytest.mark.parametrize('field,value', [('num_prompts', 0), ('prompt_len', 0), ('steps', 0),
                                         ('batch_size', 0), ('lr', 0.0), ('warmup', 1.0),
                                         ('route_layer', -1)])
def test_bad_config_names_field(field, value):
  with pytest.raises(ValueError, match=field):
    prompting.IDPConfig(**{field: value})


def test_group_count_must_match_num_prompts(params):
  with pytest.raises(ValueError, match='num_prompts'):
    prompting.train_pool(params, CFG, [_tokens(0, 2, 8, 0, 10)], prompting.IDPConfig(num_prompts=2))
