"""Fine-tuning of compressed models on the tiny Llama: LoRA (zero / LoftQ / EoRA / SRR init), QAT
with a straight-through estimator, masked global fine-tuning, and the LoftQ numerics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import pipeline
from compress import prune as prune_lib
from compress import quantize
from compress import rules as rules_lib
from compress.prune import PruneSpec
from kernels import formats, QuantSpec
from kernels.formats import CompressedLinear, QuantizedWeight, Sparse24Weight
from models import checkpoint, llama, losses, tree
from recover import compensate, finetune, loftq, train
from recover.finetune import FinetuneConfig
from tests.utils import tiny_model

RTN2 = rules_lib.LinearSpec(quant='rtn', qspec=QuantSpec(bits=2, group_size=32))
RANK = 8


@pytest.fixture(scope='module')
def tiny():
  cfg, params, calib = tiny_model(calib_shape=(16, 32))
  # Learnable text: arithmetic progressions over a 40-token sub-vocabulary.
  rng = np.random.default_rng(0)
  start = rng.integers(0, 40, size=(16, 1))
  step = rng.integers(1, 4, size=(16, 1))
  tokens = ((start + step * np.arange(24)[None]) % 40 + 20).astype(np.int32)
  return cfg, params, calib, tokens


@pytest.fixture(scope='module')
def models(tiny):
  """Compressed variants of the tiny model (computed once)."""
  cfg, params, calib, _ = tiny
  out = {}
  out['rtn2'], _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(RTN2),
                                           progress=False)
  for method in ('eora', 'srr'):
    comp = compensate.Compensator(method=method, rank=RANK)
    out[method], _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(RTN2),
                                             recovery=comp, progress=False)
  mixed = [
      rules_lib.Rule(r'layers/\d+/self_attn/[qkv]_proj/kernel',
                     rules_lib.LinearSpec(prune='magnitude', sparsity=PruneSpec.parse('2:4'))),
      rules_lib.Rule(r'layers/\d+/mlp/(gate|up)_proj/kernel',
                     rules_lib.LinearSpec(prune='magnitude', sparsity=PruneSpec.parse('0.5'))),
      rules_lib.Rule(r'layers/\d+/self_attn/o_proj/kernel', RTN2),
  ]  # down_proj stays dense
  out['mixed'], _ = pipeline.compress_model(params, cfg, calib, mixed, progress=False)
  return out


def _loss(params, cfg, tokens):
  tokens = jnp.asarray(tokens)
  return float(losses.lm_loss(llama.forward(params, tokens, cfg), tokens))


def _logits(params, cfg, tokens):
  return np.asarray(llama.forward(params, jnp.asarray(tokens), cfg))


# --------------------------------------------------------------------------- config


def test_default_learning_rates():
  assert FinetuneConfig('lora', 3).lr == 1e-4
  assert FinetuneConfig('qat', 3).lr == 1e-5
  assert FinetuneConfig('global', 3).lr == 1e-5
  assert FinetuneConfig('lora', 3, lr=3e-4).lr == 3e-4


@pytest.mark.parametrize('field,value', [
    ('method', 'sgd'), ('steps', 0), ('steps', 2.5), ('batch_size', 0), ('lr', -1e-4),
    ('lr', float('nan')), ('warmup', 1.0), ('weight_decay', -0.1), ('lora_rank', 0),
    ('lora_alpha', 0.0), ('lora_init', 'pissa'), ('loftq_iters', 0), ('srr_grad_scale', 1.5),
    ('distill', 'yes'), ('seed', 0.5)])
def test_bad_config_names_the_field(field, value):
  kw = {'method': 'lora', 'steps': 3, field: value}
  with pytest.raises(ValueError, match=field):
    FinetuneConfig(**kw)


def test_bad_inputs(tiny, models):
  cfg, _, _, tokens = tiny
  with pytest.raises(ValueError, match='batch_size'):
    finetune.finetune(models['rtn2'], cfg, tokens, FinetuneConfig('qat', 2, batch_size=17),
                      progress=False)
  with pytest.raises(ValueError, match=r'\[N, T\]'):
    finetune.finetune(models['rtn2'], cfg, tokens[0], FinetuneConfig('qat', 2), progress=False)
  with pytest.raises(ValueError, match='dense_params'):
    finetune.finetune(models['rtn2'], cfg, tokens, FinetuneConfig('lora', 2, distill=True),
                      progress=False)
  with pytest.raises(ValueError, match='dense_params'):
    finetune.prepare(models['rtn2'], FinetuneConfig('lora', 2, lora_init='loftq'))
  with pytest.raises(ValueError, match='nothing to train'):
    finetune.prepare(tiny[1], FinetuneConfig('qat', 2))


def test_step_order_is_exact():
  order = finetune.step_order(10, 3, 7, 0)
  assert order.shape == (7, 3)
  assert all(len(set(row)) == 3 for row in order)


# --------------------------------------------------------------------------- LoftQ


def _leaf(kind, w):
  if kind == 'quant':
    return CompressedLinear(weight=quantize.rtn(w, QuantSpec(bits=2, group_size=32)))
  mask = prune_lib.magnitude_mask(w, PruneSpec(n=2, m=4))
  if kind == '2:4':
    return prune_lib.make_sparse_leaf(jnp.where(mask, w, 0.0), mask, PruneSpec(n=2, m=4))
  q = quantize.rtn(jnp.where(mask, w, 0.0), QuantSpec(bits=3, group_size=32))
  return CompressedLinear(weight=formats.sparse24_from_quantized(q, mask))


@pytest.mark.parametrize('kind', ['quant', '2:4', '2:4+quant'])
def test_loftq_error_decreases(kind):
  w = jax.random.normal(jax.random.key(5), (64, 96))
  leaf = _leaf(kind, w)
  base, adapter, errors = loftq.loftq(w, leaf, 8, 5)
  assert len(errors) == 5
  assert all(e1 <= e0 * (1 + 1e-6) for e0, e1 in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0]
  # The base keeps the leaf's format (and 2:4 pattern) and the reported error is the leaf's.
  assert type(base.weight) is type(leaf.weight)
  if kind != 'quant':
    np.testing.assert_array_equal(train.sparsity_mask(base), train.sparsity_mask(leaf))
  else:
    assert base.weight.spec == leaf.weight.spec
  resid = w - formats.to_dense(base) - adapter.a @ adapter.b
  np.testing.assert_allclose(float(jnp.linalg.norm(resid)), errors[-1], rtol=1e-4)
  # Even the first iteration beats the compression alone (the SVD of its error).
  assert errors[0] < float(jnp.linalg.norm(w - formats.to_dense(leaf)))
  assert adapter.rank == 8


def test_loftq_rejects_dense_and_bad_rank():
  w = jnp.ones((64, 32))
  with pytest.raises(ValueError, match='quantized or pruned'):
    loftq.loftq(w, CompressedLinear(weight=w), 4, 2)
  with pytest.raises(ValueError, match='rank'):
    loftq.loftq(w, _leaf('quant', w), 33, 2)


# --------------------------------------------------------------------------- STE


def test_ste_gradient_identity_inside_grid_zero_outside():
  w = jax.random.normal(jax.random.key(2), (64, 16))
  q = quantize.rtn(w, QuantSpec(bits=3, group_size=32))
  g = q.group_index()
  s = q.scales[g]
  z = q.zeros.astype(jnp.float32)[g]
  lo, hi = (-z - 0.5) * s, (7 - z + 0.5) * s
  frac = jax.random.uniform(jax.random.key(3), w.shape, minval=-0.3, maxval=1.3)
  latent = lo + frac * (hi - lo)  # about 40% outside the grid's range, the rest inside
  inside = (latent > lo) & (latent < hi)
  assert 0 < float(jnp.mean(inside)) < 1
  ct = jax.random.normal(jax.random.key(4), w.shape)
  grad = jax.grad(lambda x: jnp.sum(train.fake_quantize(x, q) * ct))(latent)
  np.testing.assert_allclose(np.asarray(grad), np.where(inside, ct, 0.0), atol=1e-6)
  # On the grid the forward pass is the dequantized weight.
  np.testing.assert_allclose(train.fake_quantize(formats.dequantize(q), q), formats.dequantize(q),
                             atol=1e-6)


# --------------------------------------------------------------------------- QAT


def test_qat_repacks_on_the_same_grid_and_lowers_loss(tiny, models):
  cfg, _, _, tokens = tiny
  base = models['rtn2']
  ft = FinetuneConfig('qat', 30, batch_size=4, lr=1e-2, warmup=0.0)
  out, info = finetune.finetune(base, cfg, tokens, ft, progress=False)
  changed = 0
  for path, old in tree.linear_leaves(base).items():
    new = tree.linear_leaves(out)[path]
    assert isinstance(new, CompressedLinear) and isinstance(new.weight, QuantizedWeight)
    assert new.weight.spec == old.weight.spec
    np.testing.assert_array_equal(new.weight.scales, old.weight.scales)
    np.testing.assert_array_equal(new.weight.zeros, old.weight.zeros)
    changed += int(jnp.sum(new.weight.ints() != old.weight.ints()))
  assert changed > 0
  assert _loss(out, cfg, tokens) < _loss(base, cfg, tokens)
  assert info['trained_linears'] == 14 and info['method'] == 'qat' and info['lora_init'] is None
  assert len(info['losses']) == 30 and info['tokens_seen'] == 30 * 4 * 24
  # The packed integers are frozen: the trainables are the latent float weights.
  assert info['trainable_params'] == sum(int(np.prod(l.shape))
                                         for l in tree.linear_leaves(base).values())


# --------------------------------------------------------------------------- LoRA


def test_lora_zero_init_starts_at_base_and_lowers_loss(tiny, models):
  cfg, _, _, tokens = tiny
  base = models['rtn2']
  ft = FinetuneConfig('lora', 20, batch_size=4, lr=3e-3, lora_rank=4)
  start = finetune.initial_model(base, ft)
  for leaf in tree.linear_leaves(start).values():
    assert leaf.adapter is not None and not np.any(np.asarray(leaf.adapter.b))
  np.testing.assert_array_equal(_logits(start, cfg, tokens[:4]), _logits(base, cfg, tokens[:4]))
  out, info = finetune.finetune(base, cfg, tokens, ft, progress=False)
  first = finetune.step_order(len(tokens), 4, 20, 0)[0]
  np.testing.assert_allclose(info['loss_first'], _loss(base, cfg, tokens[first]), rtol=1e-5)
  assert _loss(out, cfg, tokens) < _loss(base, cfg, tokens) - 0.1
  for path, old in tree.linear_leaves(base).items():
    new = tree.linear_leaves(out)[path]
    np.testing.assert_array_equal(new.weight.qweight, old.weight.qweight)  # frozen base
    assert new.adapter.rank == 4 and not isinstance(new.adapter.a, QuantizedWeight)
  assert info['trainable_params'] == sum(4 * sum(l.shape)
                                         for l in tree.linear_leaves(base).values())


def test_lora_on_dense_linears(tiny):
  cfg, params, _, tokens = tiny
  out, info = finetune.finetune(params, cfg, tokens, FinetuneConfig('lora', 2, lora_rank=2),
                                progress=False)
  leaf = tree.linear_leaves(out)['layers/0/mlp/up_proj/kernel']
  assert isinstance(leaf, CompressedLinear) and leaf.adapter.rank == 2
  assert info['trained_linears'] == 14


def test_eora_init_needs_adapters_and_keeps_the_eora_model(tiny, models):
  cfg, _, _, tokens = tiny
  with pytest.raises(ValueError, match='have none'):
    finetune.prepare(models['rtn2'], FinetuneConfig('lora', 2, lora_init='eora', lora_rank=RANK))
  with pytest.raises(ValueError, match='lora_rank=16'):
    finetune.prepare(models['eora'], FinetuneConfig('lora', 2, lora_init='eora', lora_rank=16))
  ft = FinetuneConfig('lora', 10, batch_size=4, lr=1e-3, lora_init='eora', lora_rank=RANK)
  start = finetune.initial_model(models['eora'], ft)
  np.testing.assert_allclose(_logits(start, cfg, tokens[:4]),
                             _logits(models['eora'], cfg, tokens[:4]), rtol=1e-6, atol=1e-6)
  out, info = finetune.finetune(models['eora'], cfg, tokens, ft, progress=False)
  first = finetune.step_order(len(tokens), 4, 10, 0)[0]
  np.testing.assert_allclose(info['loss_first'], _loss(models['eora'], cfg, tokens[first]),
                             rtol=1e-5)
  assert _loss(out, cfg, tokens) < _loss(models['eora'], cfg, tokens)


def test_srr_grad_scale_zero_freezes_preserved_components(tiny, models):
  cfg, _, _, tokens = tiny
  srr = models['srr']
  ft = FinetuneConfig('lora', 5, batch_size=4, lr=1e-3, lora_init='srr', lora_rank=RANK,
                      srr_grad_scale=0.0)
  out, _ = finetune.finetune(srr, cfg, tokens, ft, progress=False)
  seen = 0
  for path, old in tree.linear_leaves(srr).items():
    new = tree.linear_leaves(out)[path]
    k = old.adapter.preserved
    assert new.adapter.preserved == k
    np.testing.assert_array_equal(new.adapter.a[:, :k], old.adapter.a[:, :k])
    np.testing.assert_array_equal(new.adapter.b[:k], old.adapter.b[:k])
    if 0 < k < RANK:
      seen += 1
      assert np.any(np.asarray(new.adapter.a[:, k:]) != np.asarray(old.adapter.a[:, k:]))
      assert np.any(np.asarray(new.adapter.b[k:]) != np.asarray(old.adapter.b[k:]))
  assert seen > 0
  with pytest.raises(ValueError, match="lora_init='srr'"):
    finetune.prepare(srr, FinetuneConfig('lora', 2, lora_rank=RANK))  # zero init would drop them


def test_loftq_init_and_distillation(tiny, models):
  cfg, params, _, tokens = tiny
  base = models['rtn2']
  ft = FinetuneConfig('lora', 4, batch_size=4, lr=1e-3, lora_init='loftq', lora_rank=RANK,
                      loftq_iters=3, distill=True)
  start = finetune.initial_model(base, ft, dense_params=params)
  dense = tree.linear_leaves(params)
  for path, leaf in tree.linear_leaves(start).items():
    w = dense[path]
    err_init = jnp.linalg.norm(w - formats.effective_weight(leaf))
    err_base = jnp.linalg.norm(w - formats.to_dense(tree.linear_leaves(base)[path]))
    assert float(err_init) < float(err_base)
    assert leaf.adapter.rank == RANK and isinstance(leaf.weight, QuantizedWeight)
  out, info = finetune.finetune(base, cfg, tokens, ft, dense_params=params, progress=False)
  assert info['distill'] and info['loss_first'] > 0
  assert np.all(np.isfinite(info['losses']))
  assert info['loss_last'] < info['loss_first']


@pytest.mark.parametrize('init', ['zero', 'loftq'])
def test_finetune_from_initial_model_equals_finetune_from_the_base(tiny, models, init):
  # A start computed once (initial_model) and trained with from_initial=True trains exactly as
  # finetune from the compressed model does, and keeps its init's name.
  cfg, params, _, tokens = tiny
  base = models['rtn2']
  ft = FinetuneConfig('lora', 3, batch_size=4, lr=1e-3, lora_init=init, lora_rank=RANK,
                      loftq_iters=2)
  start = finetune.initial_model(base, ft, dense_params=params)
  a, info_a = finetune.finetune(base, cfg, tokens, ft, dense_params=params, progress=False)
  b, info_b = finetune.finetune(start, cfg, tokens, ft, from_initial=True, progress=False)
  assert info_b['lora_init'] == init
  np.testing.assert_allclose(info_b['losses'], info_a['losses'], rtol=1e-6)
  for path, leaf in tree.linear_leaves(a).items():
    other = tree.linear_leaves(b)[path]
    np.testing.assert_array_equal(other.weight.qweight, leaf.weight.qweight)
    np.testing.assert_allclose(other.adapter.a, leaf.adapter.a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(other.adapter.b, leaf.adapter.b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='from_initial=True .* have none'):
    finetune.prepare(base, ft, from_initial=True)  # the compressed model is not a start


# --------------------------------------------------------------------------- global


def test_global_keeps_pruned_weights_zero_and_lowers_loss(tiny, models):
  cfg, _, _, tokens = tiny
  mixed = models['mixed']
  ft = FinetuneConfig('global', 20, batch_size=4, lr=3e-3)
  out, info = finetune.finetune(mixed, cfg, tokens, ft, progress=False)
  old_leaves, new_leaves = tree.linear_leaves(mixed), tree.linear_leaves(out)
  kinds = set()
  for path, old in old_leaves.items():
    new = new_leaves[path]
    assert type(new) is type(old)
    if isinstance(old, CompressedLinear):
      assert type(new.weight) is type(old.weight)
      kinds.add('2:4' if isinstance(old.weight, Sparse24Weight) else
                'quantized' if isinstance(old.weight, QuantizedWeight) else 'masked')
      mask = train.sparsity_mask(old)
      if mask is not None:
        np.testing.assert_array_equal(train.sparsity_mask(new), mask)
        dense = np.asarray(formats.to_dense(new.weight))
        assert np.all(dense[~np.asarray(mask)] == 0)
      if isinstance(old.weight, QuantizedWeight):
        np.testing.assert_array_equal(new.weight.scales, old.weight.scales)
    if not (isinstance(old, CompressedLinear) and isinstance(old.weight, QuantizedWeight)):
      assert not np.allclose(formats.to_dense(new), formats.to_dense(old))  # float weights train
  assert kinds == {'2:4', 'masked', 'quantized'}
  assert info['trained_linears'] == 14
  assert _loss(out, cfg, tokens) < _loss(mixed, cfg, tokens) - 0.1


def test_qat_keeps_the_format_and_method_default_lr(tiny, models):
  cfg, params, _, tokens = tiny
  out, info = finetune.finetune(models['rtn2'], cfg, tokens, FinetuneConfig('qat', 2),
                                dense_params=params, progress=False)
  assert info['method'] == 'qat' and info['steps'] == 2 and info['lr'] == 1e-5
  assert isinstance(tree.linear_leaves(out)['layers/1/mlp/down_proj/kernel'].weight,
                    QuantizedWeight)


def _same(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resume_equals_uninterrupted_bit_for_bit(tiny, models, tmp_path):
  cfg, params, _, tokens = tiny
  config = FinetuneConfig('lora', 6, lora_rank=4, lora_init='loftq', loftq_iters=2)
  run = lambda **kw: finetune.finetune(models['rtn2'], cfg, tokens, config, dense_params=params,
                                       progress=False, **kw)
  whole, info = run()
  chunked, info_c = run(chunk_steps=2)
  assert _same(whole, chunked) and info['losses'] == info_c['losses']
  ckpt = str(tmp_path / 'ft')
  part, _ = run(chunk_steps=2, checkpoint_dir=ckpt, checkpoint_every_s=0, stop_after=3)
  assert not _same(part, whole)  # stopped after the chunk holding step 3: 4 of 6 steps
  resumed, info_r = run(chunk_steps=2, checkpoint_dir=ckpt)
  assert _same(resumed, whole) and info_r['losses'] == info['losses']
  assert info_r['train_seconds'] > 0
  # Another run (other settings) refuses the checkpoint instead of resuming it.
  with pytest.raises(checkpoint.CheckpointError, match='different run'):
    finetune.finetune(models['rtn2'], cfg, tokens, dataclasses.replace(config, lr=1e-3),
                      dense_params=params, progress=False, chunk_steps=2, checkpoint_dir=ckpt)
