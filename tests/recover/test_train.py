"""Tests for recover/train.py.

Properties: for every mode ('weights', 'scales', 'ste', 'lora') the split / forward / final
round-trip without training gives back the original leaf (same dense weight, same format, same
packed integers); masks, 2:4 indices and packed integers sit in the frozen half, the trainable
half holds float arrays only; a zero-initialised LoRA starts at a zero product; a few
``train_loop`` steps lower the loss of a tiny least-squares problem and leave pruned weights
exactly zero; ``batch_order`` is seeded and covers every sample once per epoch; the losses; the
schedule's ends.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from compress import prune, quantize
from compress.prune import PruneSpec
from kernels import formats
from kernels.formats import CompressedLinear, LowRank, QuantizedWeight, QuantSpec, Sparse24Weight
from recover import train


def _output_losses():
  """The output-matching losses by name: ``recover.train.LOSSES``, which the ongoing refactor
  moves to ``models.losses.OUTPUT_LOSSES``."""
  if hasattr(train, 'LOSSES'):
    return train.LOSSES
  from models import losses  # pylint: disable=g-import-not-at-top
  return losses.OUTPUT_LOSSES


LOSSES = _output_losses()
MSE = LOSSES['mse']

N_IN, N_OUT = 64, 16
QSPEC = QuantSpec(bits=4, group_size=32)
_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def _w(seed=0):
  return jax.random.normal(jax.random.key(seed), (N_IN, N_OUT)) * 0.1


def _leaf(kind, seed=0):
  """A weight leaf of the given kind built with the library's own compressors."""
  w = _w(seed)
  if kind == 'dense':
    return w
  if kind == 'masked':
    wp, mask = prune.magnitude(w, PruneSpec(sparsity=0.5))
    return prune.make_sparse_leaf(wp, mask, PruneSpec(sparsity=0.5))
  if kind == '2:4':
    wp, mask = prune.magnitude(w, PruneSpec.parse('2:4'))
    return prune.make_sparse_leaf(wp, mask, PruneSpec.parse('2:4'))
  if kind == 'quant':
    return CompressedLinear(weight=quantize.rtn(w, QSPEC))
  if kind == 'quant_masked':
    wp, mask = prune.magnitude(w, PruneSpec(sparsity=0.5))
    return CompressedLinear(weight=quantize.rtn(wp, QSPEC), mask=mask)
  if kind == 'quant_2:4':
    _, mask = prune.magnitude(w, PruneSpec.parse('2:4'))
    return CompressedLinear(weight=formats.sparse24_from_quantized(quantize.rtn(w, QSPEC), mask))
  if kind == 'quant_adapter':
    a = jax.random.normal(jax.random.key(seed + 100), (N_IN, 4)) * 0.1
    b = jax.random.normal(jax.random.key(seed + 101), (4, N_OUT)) * 0.1
    return CompressedLinear(weight=quantize.rtn(w, QSPEC), adapter=LowRank(a=a, b=b, preserved=2))
  raise ValueError(kind)


# Every (mode, leaf kind) pair the module supports.
SUPPORTED = [
    ('weights', 'dense'), ('weights', 'masked'), ('weights', '2:4'),
    ('scales', 'quant'), ('scales', 'quant_masked'), ('scales', 'quant_2:4'),
    ('scales', 'quant_adapter'),
    ('ste', 'quant'), ('ste', 'quant_masked'),
    ('lora', 'dense'), ('lora', 'masked'), ('lora', 'quant'), ('lora', 'quant_2:4'),
    ('lora', 'quant_adapter'),
]


def _split(leaf, mode, **plan_kw):
  return train.split_leaves({'p': leaf}, {'p': train.LeafPlan(mode, **plan_kw)}, jax.random.key(0))


def _array_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if hasattr(x, 'dtype')]


# ------------------------------------------------------------------------- split / forward / final


@pytest.mark.parametrize('mode,kind', SUPPORTED)
def test_roundtrip_without_training(mode, kind):
  leaf = _leaf(kind)
  split = _split(leaf, mode, lora_rank=4)
  fwd = train.forward_leaves(split.static_key, split.trainable, split.frozen)['p']
  final = train.final_leaves(split, split.trainable)['p']
  want = np.asarray(formats.effective_weight(leaf))
  # Forward leaf: the same effective weight (a zero-init LoRA adds a zero product).
  np.testing.assert_allclose(np.asarray(formats.effective_weight(fwd)), want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(formats.effective_weight(final)), want, atol=1e-6)
  x = jax.random.normal(jax.random.key(5), (3, N_IN))
  np.testing.assert_allclose(np.asarray(kernels.linear(x, fwd)), np.asarray(x @ want), atol=1e-5)
  # The final leaf keeps the original's format.
  if isinstance(leaf, CompressedLinear):
    assert isinstance(final, CompressedLinear)
    assert type(final.weight) is type(leaf.weight)  # pylint: disable=unidiomatic-typecheck
    if leaf.mask is not None:
      np.testing.assert_array_equal(np.asarray(final.mask), np.asarray(leaf.mask))
  elif mode == 'weights':
    assert isinstance(final, jax.Array) and final.dtype == leaf.dtype
  q0 = train._quantized(leaf)  # pylint: disable=protected-access
  if q0 is not None:
    q1 = train._quantized(final)  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(q1.qweight), np.asarray(q0.qweight))
    np.testing.assert_array_equal(np.asarray(q1.zeros), np.asarray(q0.zeros))
    np.testing.assert_array_equal(np.asarray(q1.scales), np.asarray(q0.scales))
    assert (q1.bits, q1.group_size, q1.in_features) == (q0.bits, q0.group_size, q0.in_features)
  if isinstance(leaf, CompressedLinear) and isinstance(leaf.weight, Sparse24Weight):
    np.testing.assert_array_equal(np.asarray(final.weight.indices), np.asarray(leaf.weight.indices))


@pytest.mark.parametrize('mode,kind', SUPPORTED)
def test_trainable_half_is_float_only(mode, kind):
  leaf = _leaf(kind)
  split = _split(leaf, mode, lora_rank=4)
  trainable = split.trainable['p']
  expect_keys = {'weights': {'w'}, 'scales': {'scales'}, 'ste': {'w'}, 'lora': {'a', 'b'}}[mode]
  assert set(trainable) == expect_keys
  for x in _array_leaves(trainable):
    assert jnp.issubdtype(x.dtype, jnp.floating), x.dtype
  # Everything integer or boolean (packed codes, zeros, masks, 2:4 indices) is frozen.
  frozen_leaves = _array_leaves(split.frozen['p'])
  orig_nonfloat = [x for x in _array_leaves(leaf) if not jnp.issubdtype(x.dtype, jnp.floating)]
  frozen_nonfloat = [x for x in frozen_leaves if not jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(frozen_nonfloat) >= len(orig_nonfloat)
  for x in orig_nonfloat:
    assert any(y.shape == x.shape and y.dtype == x.dtype and bool(jnp.all(y == x))
               for y in frozen_nonfloat)


def test_trainable_shapes():
  dense = _split(_leaf('dense'), 'weights').trainable['p']
  assert dense['w'].shape == (N_IN, N_OUT)
  scales = _split(_leaf('quant'), 'scales').trainable['p']
  assert scales['scales'].shape == (N_IN // 32, N_OUT) and scales['scales'].dtype == jnp.float32
  ste = _split(_leaf('quant'), 'ste').trainable['p']
  np.testing.assert_array_equal(np.asarray(ste['w']),
                                np.asarray(formats.dequantize(_leaf('quant').weight)))


def test_lora_zero_init():
  split = _split(_leaf('quant'), 'lora', lora_rank=4, lora_alpha=8.0)
  t = split.trainable['p']
  assert t['a'].shape == (N_IN, 4) and t['b'].shape == (4, N_OUT)
  assert float(jnp.max(jnp.abs(t['a']))) > 0  # a is random
  np.testing.assert_array_equal(np.asarray(t['b']), 0.0)
  np.testing.assert_array_equal(np.asarray(t['a'] @ t['b']), 0.0)
  # Kaiming-uniform bound 1/sqrt(in), times alpha / r = 2.
  assert float(jnp.max(jnp.abs(t['a']))) <= 2.0 / np.sqrt(N_IN) + 1e-7
  # The rank is capped by the matrix dimensions.
  big = _split(_leaf('dense'), 'lora', lora_rank=100).trainable['p']
  assert big['a'].shape == (N_IN, N_OUT) and big['b'].shape == (N_OUT, N_OUT)
  # Zero-init needs a key (split_leaf directly).
  with pytest.raises(ValueError, match='PRNG key'):
    train.split_leaf(_leaf('dense'), train.LeafPlan('lora'))
  # Different keys -> different a; the same key -> the same a.
  a1 = _split(_leaf('dense'), 'lora').trainable['p']['a']
  a2 = _split(_leaf('dense'), 'lora').trainable['p']['a']
  a3 = train.split_leaves({'p': _leaf('dense')}, {'p': train.LeafPlan('lora')},
                          jax.random.key(1)).trainable['p']['a']
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  assert not np.array_equal(np.asarray(a1), np.asarray(a3))


def test_lora_existing_adapter_is_the_init_and_keeps_preserved():
  leaf = _leaf('quant_adapter')
  split = _split(leaf, 'lora')
  np.testing.assert_array_equal(np.asarray(split.trainable['p']['a']), np.asarray(leaf.adapter.a))
  np.testing.assert_array_equal(np.asarray(split.trainable['p']['b']), np.asarray(leaf.adapter.b))
  assert split.frozen['p']['leaf'].adapter is None  # the adapter is trainable, not frozen
  assert split.preserved == {'p': 2}
  final = train.final_leaves(split, split.trainable)['p']
  assert final.adapter.preserved == 2


def test_lora_merge():
  leaf = _leaf('masked')
  split = _split(leaf, 'lora', lora_rank=4, merge=True)
  t = dict(split.trainable['p'])
  t['b'] = jnp.ones_like(t['b']) * 0.01  # a non-zero product to merge
  final = train.final_leaves(split, {'p': t})['p']
  assert isinstance(final, CompressedLinear) and final.adapter is None
  want = np.where(np.asarray(leaf.mask), np.asarray(leaf.weight) + np.asarray(t['a'] @ t['b']), 0)
  np.testing.assert_allclose(np.asarray(formats.to_dense(final)), want, atol=1e-6)
  # A plain array base merges back into a plain array.
  dsplit = _split(_leaf('dense'), 'lora', lora_rank=4, merge=True)
  dfinal = train.final_leaves(dsplit, dsplit.trainable)['p']
  assert isinstance(dfinal, jax.Array)
  np.testing.assert_allclose(np.asarray(dfinal), np.asarray(_leaf('dense')), atol=1e-7)
  # Merging into a quantized base is refused.
  qsplit = _split(_leaf('quant'), 'lora', merge=True)
  with pytest.raises(ValueError, match='cannot merge'):
    train.final_leaves(qsplit, qsplit.trainable)


@pytest.mark.parametrize('mode,kind,message', [
    ('weights', 'quant', "mode 'weights' needs a float weight"),
    ('weights', 'quant_2:4', "mode 'weights' needs a float weight"),
    ('scales', 'dense', "mode 'scales' needs a quantized weight"),
    ('scales', 'masked', "mode 'scales' needs a quantized weight"),
    ('ste', 'dense', "mode 'ste' needs a quantized"),
    ('ste', 'quant_2:4', "mode 'ste' needs a quantized"),
])
def test_unsupported_mode_for_leaf(mode, kind, message):
  with pytest.raises(ValueError, match=message):
    _split(_leaf(kind), mode)


def test_leaf_plan_and_default_mode():
  with pytest.raises(ValueError, match="unknown training mode 'qat'"):
    train.LeafPlan('qat')
  assert train.default_mode(_leaf('dense')) == 'weights'
  assert train.default_mode(_leaf('masked')) == 'weights'
  assert train.default_mode(_leaf('quant')) == 'scales'
  assert train.default_mode(_leaf('quant_2:4')) == 'scales'
  assert hash(train.LeafPlan('lora')) == hash(train.LeafPlan('lora'))


def test_sparsity_mask():
  assert train.sparsity_mask(_leaf('dense')) is None
  assert train.sparsity_mask(_leaf('quant')) is None
  masked = _leaf('masked')
  np.testing.assert_array_equal(np.asarray(train.sparsity_mask(masked)), np.asarray(masked.mask))
  s24 = _leaf('2:4')
  m = np.asarray(train.sparsity_mask(s24))
  assert m.shape == (N_IN, N_OUT)
  np.testing.assert_array_equal(m.reshape(N_IN // 4, 4, N_OUT).sum(1), 2)
  dense = np.asarray(formats.to_dense(s24))
  assert np.all(dense[~m] == 0)
  assert np.all(dense[m] != 0)  # the random weight has no exact zeros among kept entries


def test_split_static_key_and_count_params():
  leaves = {'b': _leaf('quant'), 'a': _leaf('dense')}
  plans = {'b': train.LeafPlan('scales'), 'a': train.LeafPlan('lora', lora_rank=2)}
  split = train.split_leaves(leaves, plans, jax.random.key(0))
  assert split.static_key == (('a', plans['a'], 0), ('b', plans['b'], 0))
  hash(split.static_key)
  assert train.count_params(split.trainable) == (N_IN * 2 + 2 * N_OUT) + (N_IN // 32) * N_OUT
  # Leaves without a plan are not split.
  only = train.split_leaves(leaves, {'a': plans['a']}, jax.random.key(0))
  assert set(only.trainable) == {'a'} and set(only.originals) == {'a'}


# --------------------------------------------------------------------------- train_loop


def _problem(w_true, seed=0, n=64):
  """Inputs and targets ``y = x @ w_true``."""
  x = jax.random.normal(jax.random.key(seed + 10), (n, N_IN))
  return {'x': x, 'y': x @ w_true}


def _target_weight(leaf, mode):
  """A target weight that ``mode`` can move ``leaf`` towards: the uncompressed weight plus a change
  for 'weights'/'ste'; the leaf with 25% larger scales for 'scales'; the leaf plus a rank-2 change
  for 'lora'."""
  if mode in ('weights', 'ste'):
    return _w() + 0.05 * jax.random.normal(jax.random.key(11), (N_IN, N_OUT))
  # pylint: disable=protected-access
  if mode == 'scales':
    q = train._quantized(leaf)
    bigger = dataclasses.replace(q, scales=q.scales * 1.25)
    return formats.effective_weight(train._with_quantized(leaf, bigger))
  u = jax.random.normal(jax.random.key(12), (N_IN, 2))
  v = jax.random.normal(jax.random.key(13), (2, N_OUT))
  return formats.effective_weight(leaf) + 0.02 * u @ v


@functools.lru_cache(maxsize=None)
def _runner(static_key, steps, lr):
  def loss_fn(trainable, frozen, batch):
    leaf = train.forward_leaves(static_key, trainable, frozen)['p']
    return MSE(kernels.linear(batch['x'], leaf), batch['y'])
  opt = train.optimizer(train.OptimConfig(lr=lr, warmup=0.0), steps)
  return jax.jit(train.train_loop(loss_fn, opt), compiler_options=_COMPILER_OPTIONS)


def _train(leaf, plan, data, steps=30, lr=1e-2, batch_size=16):
  split = train.split_leaves({'p': leaf}, {'p': plan}, jax.random.key(0))
  order = train.batch_order(data['x'].shape[0], batch_size, steps * batch_size / 64, seed=0)
  assert order.shape == (steps, batch_size)
  run = _runner(split.static_key, steps, lr)
  trainable, losses = run(split.trainable, split.frozen, data, jnp.asarray(order))
  final = train.final_leaves(split, trainable)['p']
  return split, trainable, losses, final, data


def _full_loss(leaf, data):
  return float(MSE(data['x'] @ formats.effective_weight(leaf), data['y']))


# ``ratio``: the final loss must fall below this fraction of the initial one (what 30 steps reach is
# about 0.35-0.45 for weights/ste and the merged masked LoRA, whose merge re-applies the mask to the
# change; below 0.05 for scales and the unmerged LoRA, whose targets they can represent exactly).
@pytest.mark.parametrize('mode,kind,plan_kw,ratio', [
    ('weights', 'masked', {}, 0.6),
    ('weights', '2:4', {}, 0.6),
    ('ste', 'quant_masked', {}, 0.6),
    ('scales', 'quant_2:4', {}, 0.1),
    ('lora', 'masked', dict(lora_rank=16, merge=True), 0.7),
    ('lora', 'quant', dict(lora_rank=16), 0.2),
])
def test_train_loop_lowers_loss_and_keeps_pruned_weights_zero(mode, kind, plan_kw, ratio):
  leaf = _leaf(kind)
  data = _problem(_target_weight(leaf, mode))
  lr = {'scales': 1e-3, 'lora': 2e-2}.get(mode, 1e-2)  # scales are ~0.01: smaller steps
  split, trainable, losses, final, data = _train(leaf, train.LeafPlan(mode, **plan_kw), data, lr=lr)
  assert losses.shape == (30,) and bool(jnp.all(jnp.isfinite(losses)))
  before, after = _full_loss(leaf, data), _full_loss(final, data)
  assert after < ratio * before, (before, after)
  keep = train.sparsity_mask(leaf)
  if keep is not None:
    keep = np.asarray(keep)
    dense = np.asarray(formats.effective_weight(final))
    np.testing.assert_array_equal(dense[~keep], 0.0)  # exactly zero, not small
    assert np.count_nonzero(dense[keep]) > 0.9 * keep.sum()
    np.testing.assert_array_equal(np.asarray(train.sparsity_mask(final)), keep)
    if mode in ('weights', 'ste'):
      # Pruned entries get zero gradient: the raw trainable weight did not move there.
      w0 = np.asarray(split.trainable['p']['w'])
      np.testing.assert_array_equal(np.asarray(trainable['p']['w'])[~keep], w0[~keep])
  q0 = train._quantized(leaf)  # pylint: disable=protected-access
  if mode == 'scales':
    q1 = train._quantized(final)  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(q1.qweight), np.asarray(q0.qweight))
    assert not np.array_equal(np.asarray(q1.scales), np.asarray(q0.scales))
  if mode == 'ste':
    q1 = final.weight
    assert isinstance(q1, QuantizedWeight)
    np.testing.assert_array_equal(np.asarray(q1.scales), np.asarray(q0.scales))
    np.testing.assert_array_equal(np.asarray(q1.zeros), np.asarray(q0.zeros))
    assert not np.array_equal(np.asarray(q1.qweight), np.asarray(q0.qweight))  # codes moved


def test_train_loop_least_squares_from_zero():
  """Dense weights from zero on ``y = x @ w_true``: the loss falls by orders of magnitude, and the
  per-step losses are those of the batches in ``order``."""
  data = _problem(_w(3), seed=3)
  leaf = jnp.zeros((N_IN, N_OUT))
  split = train.split_leaves({'p': leaf}, {'p': train.LeafPlan('weights')}, jax.random.key(0))
  order = train.batch_order(64, 16, 25, seed=1)
  run = _runner(split.static_key, order.shape[0], 5e-2)
  trainable, losses = run(split.trainable, split.frozen, data, jnp.asarray(order))
  losses = np.asarray(losses)
  first = float(MSE(data['x'][order[0]] @ jnp.zeros((N_IN, N_OUT)), data['y'][order[0]]))
  np.testing.assert_allclose(losses[0], first, rtol=1e-5)  # step 0 is the loss before any update
  final = train.final_leaves(split, trainable)['p']
  assert _full_loss(final, data) < 1e-2 * _full_loss(leaf, data)
  assert losses[-10:].mean() < 1e-2 * losses[:10].mean()


# --------------------------------------------------------------------------- batch order, losses


def test_batch_order_is_seeded_and_covers_every_sample_per_epoch():
  order = train.batch_order(12, 4, 3, seed=7)
  assert order.shape == (9, 4) and order.dtype == np.int32
  for e in range(3):
    np.testing.assert_array_equal(np.sort(order[3 * e:3 * e + 3].ravel()), np.arange(12))
  np.testing.assert_array_equal(order, train.batch_order(12, 4, 3, seed=7))
  assert not np.array_equal(order, train.batch_order(12, 4, 3, seed=8))
  assert not np.array_equal(order[:3], order[3:6])  # a fresh permutation every epoch


def test_batch_order_partial_batches_and_fractional_epochs():
  # 10 samples in batches of 3: 3 whole batches per epoch, 9 distinct samples, none repeated.
  order = train.batch_order(10, 3, 2, seed=0)
  assert order.shape == (6, 3)
  for e in range(2):
    epoch = order[3 * e:3 * e + 3].ravel()
    assert len(set(epoch.tolist())) == 9 and epoch.min() >= 0 and epoch.max() < 10
  # Half an epoch of 8 samples in batches of 2: 2 steps, distinct samples.
  half = train.batch_order(8, 2, 0.5, seed=0)
  assert half.shape == (2, 2) and len(set(half.ravel().tolist())) == 4
  # 1.5 epochs: 6 steps; the first 4 cover everything.
  more = train.batch_order(8, 2, 1.5, seed=0)
  assert more.shape == (6, 2)
  np.testing.assert_array_equal(np.sort(more[:4].ravel()), np.arange(8))
  # Tiny fractions still give one step.
  assert train.batch_order(8, 2, 0.01, seed=0).shape == (1, 2)


@pytest.mark.parametrize('n,batch,epochs,message', [
    (8, 0, 1, 'batch size'), (8, 9, 1, 'batch size'), (8, 2, 0, 'epochs'), (8, 2, -1, 'epochs'),
])
def test_batch_order_errors(n, batch, epochs, message):
  with pytest.raises(ValueError, match=message):
    train.batch_order(n, batch, epochs, seed=0)


def test_losses():
  assert set(LOSSES) == {'mse', 'cosine'}
  y = jax.random.normal(jax.random.key(0), (5, 8))
  t = jax.random.normal(jax.random.key(1), (5, 8))
  assert float(LOSSES['mse'](y, y)) == 0.0
  np.testing.assert_allclose(float(MSE(y, t)), np.mean((np.asarray(y) - np.asarray(t)) ** 2),
                             rtol=1e-6)
  assert MSE(y.astype(jnp.bfloat16), t.astype(jnp.bfloat16)).dtype == jnp.float32
  cos = LOSSES['cosine']
  assert abs(float(cos(y, 3.0 * y))) < 1e-6                 # parallel
  np.testing.assert_allclose(float(cos(y, -y)), 2.0, atol=1e-6)  # opposite
  e0, e1 = jnp.eye(8)[:1], jnp.eye(8)[1:2]
  np.testing.assert_allclose(float(cos(e0, e1)), 1.0, atol=1e-6)  # orthogonal
  # Mean over tokens of 1 - cos.
  yn, tn = np.asarray(y), np.asarray(t)
  ref = np.mean(1 - (yn * tn).sum(-1) / (np.linalg.norm(yn, axis=-1) * np.linalg.norm(tn, axis=-1)))
  np.testing.assert_allclose(float(cos(y, t)), ref, rtol=1e-5)
  # Scale-invariant, unlike mse.
  np.testing.assert_allclose(float(cos(2 * y, t)), float(cos(y, t)), rtol=1e-6)
  assert np.isfinite(float(cos(jnp.zeros((2, 4)), jnp.ones((2, 4)))))  # eps guards zero norms


def test_optim_config_and_schedule():
  with pytest.raises(ValueError, match='learning rate'):
    train.OptimConfig(lr=0.0)
  with pytest.raises(ValueError, match='warmup'):
    train.OptimConfig(warmup=1.0)
  sched = train.schedule(train.OptimConfig(lr=2.0, warmup=0.0), 10)
  assert float(sched(0)) == pytest.approx(2.0) and float(sched(10)) == pytest.approx(0.0)
  assert float(sched(5)) == pytest.approx(1.0)
  clipped = train.optimizer(dataclasses.replace(train.OptimConfig(lr=1.0, warmup=0.0),
                                                clip_norm=1e-3), 10)
  params = {'w': jnp.zeros(3)}
  updates, _ = clipped.update({'w': jnp.array([1e3, 0.0, 0.0])}, clipped.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates['w'])))
