"""Local reconstruction windows (Free Lunch) and the shared training machinery on the tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from kernels import QuantSpec, formats
from models import checkpoint, llama, tree
from recover import reconstruct as rec
from recover import train
from tests.utils import tiny_model


@pytest.fixture(scope='module')
def tiny():
  return tiny_model(calib_shape=(8, 16))


def _compress(tiny, spec):
  cfg, params, calib = tiny
  out, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False)
  return out


WANDA50 = rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('0.5'))
WANDA24 = rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('2:4'))
RTN3 = rules_lib.LinearSpec(quant='rtn', qspec=QuantSpec(bits=3, group_size=32))
FAST = train.OptimConfig(lr=3e-3, warmup=0.1)


def _kl(params_ref, params, cfg, tokens):
  lr = jax.nn.log_softmax(llama.forward(params_ref, jnp.asarray(tokens), cfg))
  lp = jax.nn.log_softmax(llama.forward(params, jnp.asarray(tokens), cfg))
  return float(jnp.mean(jnp.sum(jnp.exp(lr) * (lr - lp), -1)))


def _pruned_zero(params_before, params_after):
  for b0, b1 in zip(params_before['layers'], params_after['layers']):
    for lin in llama.LINEAR_NAMES:
      l0, l1 = tree.get_linear(b0, lin), tree.get_linear(b1, lin)
      m = train.sparsity_mask(l0)
      w1 = formats.to_dense(l1)
      assert type(l1.weight) is type(l0.weight)
      assert bool(jnp.all(w1[~m] == 0)), lin


def test_windows_partition_the_model():
  for window, n in [('matrix', 14), ('submodule', 4), ('block', 2), ('blocks:2', 1)]:
    ws = rec.make_windows(2, window)
    assert len(ws) == n
  ws = rec.make_windows(3, 'blocks:2')
  assert [w.blocks for w in ws] == [(0, 1), (2,)]
  for bad in ('rows', 'blocks:0', 'blocks:x'):
    with pytest.raises(ValueError, match='window'):
      rec.parse_window(bad)


def test_bad_config_is_a_clear_error():
  with pytest.raises(ValueError, match='loss'):
    rec.ReconConfig(loss='l1')
  with pytest.raises(ValueError, match='recon_inputs'):
    rec.ReconConfig(inputs='teacher')
  with pytest.raises(ValueError, match='learning rate'):
    train.OptimConfig(lr=0.0)
  with pytest.raises(ValueError, match='epochs'):
    rec.ReconConfig(epochs=0)


@pytest.mark.parametrize('window', ['submodule', 'block', 'blocks:2'])
def test_reconstruction_lowers_loss_and_keeps_pruned_zero(tiny, window):
  cfg, params, calib = tiny
  pruned = _compress(tiny, WANDA50)
  config = rec.ReconConfig(window=window, epochs=4, optim=FAST)
  out, reports = rec.reconstruct(pruned, params, cfg, calib, config, progress=False)
  assert len(reports) == len(rec.make_windows(cfg.num_layers, window))
  for r in reports:
    assert r.loss_after < r.loss_before, r
  _pruned_zero(pruned, out)
  assert _kl(params, out, cfg, calib) < _kl(params, pruned, cfg, calib)


def test_24_pattern_and_quantized_scales(tiny):
  cfg, params, calib = tiny
  for spec, mode in [(WANDA24, 'scales'), (RTN3, 'scales'), (RTN3, 'ste'), (RTN3, 'lora')]:
    comp = _compress(tiny, spec)
    config = rec.ReconConfig(window='block', epochs=4, optim=FAST, quant_mode=mode)
    out, reports = rec.reconstruct(comp, params, cfg, calib, config, progress=False)
    assert all(r.loss_after < r.loss_before for r in reports), (spec.describe(), mode)
    leaf0 = tree.get_linear(comp['layers'][0], 'mlp/up_proj')
    leaf1 = tree.get_linear(out['layers'][0], 'mlp/up_proj')
    assert type(leaf1.weight) is type(leaf0.weight)
    if spec is RTN3:
      q0, q1 = leaf0.weight, leaf1.weight
      if mode == 'scales':   # integers untouched, scales trained
        np.testing.assert_array_equal(q0.qweight, q1.qweight)
        assert not np.allclose(q0.scales, q1.scales)
      elif mode == 'ste':    # same grid, new integers
        np.testing.assert_array_equal(q0.scales, q1.scales)
        assert not np.array_equal(q0.qweight, q1.qweight)
      else:                  # QLoRA-style adapter on the frozen quantized weight
        np.testing.assert_array_equal(q0.qweight, q1.qweight)
        assert leaf1.adapter is not None and leaf1.adapter.rank == 16
    else:
      _pruned_zero(comp, out)


def test_peft_lora_merges_into_pruned_weights(tiny):
  cfg, params, calib = tiny
  pruned = _compress(tiny, WANDA50)
  config = rec.ReconConfig(window='block', epochs=4, optim=FAST, peft=True, lora_rank=4)
  out, reports = rec.reconstruct(pruned, params, cfg, calib, config, progress=False)
  assert all(r.loss_after < r.loss_before for r in reports)
  _pruned_zero(pruned, out)
  leaf = tree.get_linear(out['layers'][0], 'self_attn/q_proj')
  assert leaf.adapter is None  # merged
  # Trainable parameters: rank-4 factors of the 7 linears of a block, far fewer than the weights.
  dims = [(cfg.hidden_size, cfg.num_heads * cfg.head_dim)]
  assert reports[0].trainable_params < sum(
      np.prod(tree.get_linear(params['layers'][0], l).shape) for l in llama.LINEAR_NAMES) / 4
  del dims


def test_matrix_window_reaches_masked_least_squares(tiny):
  """One linear (down_proj of the last block, so nothing after it changes its inputs): with
  enough steps the trained weight matches the closed-form masked least-squares solution."""
  cfg, params, calib = tiny
  pruned = _compress(tiny, WANDA50)
  window = rec.Window(0, linear=(1, 'mlp/down_proj'))
  # Inputs: the pruned model's down_in at block 1; targets: the dense model's down_proj output.
  x_hat = llama.embed(pruned, jnp.asarray(calib), cfg)
  x_hat = llama.block_apply(pruned['layers'][0], x_hat, cfg)
  _, ins = llama.block_apply(pruned['layers'][1], x_hat, cfg, return_inputs=True)
  x_d = llama.block_apply(params['layers'][0], llama.embed(params, jnp.asarray(calib), cfg), cfg)
  _, ins_d = llama.block_apply(params['layers'][1], x_d, cfg, return_inputs=True)
  w_dense = tree.get_linear(params['layers'][1], 'mlp/down_proj')
  xs, ys = ins['down_in'], ins_d['down_in'] @ w_dense
  config = rec.ReconConfig(window='matrix', epochs=1500, batch_size=8,
                           optim=train.OptimConfig(lr=1e-2, warmup=0.05))
  new, rep, _ = rec.reconstruct_window(cfg, window, {1: pruned['layers'][1]}, xs, ys, config)
  leaf0 = tree.get_linear(pruned['layers'][1], 'mlp/down_proj')
  w_fit = formats.to_dense(tree.get_linear(new[1], 'mlp/down_proj'))
  mask = np.asarray(train.sparsity_mask(leaf0))
  x = np.asarray(xs.reshape(-1, xs.shape[-1]), np.float64)
  y = np.asarray(ys.reshape(-1, ys.shape[-1]), np.float64)
  w_ls = np.zeros(mask.shape)
  for j in range(mask.shape[1]):
    keep = mask[:, j]
    w_ls[keep, j] = np.linalg.lstsq(x[:, keep], y[:, j], rcond=None)[0]
  loss_ls = np.mean((x @ w_ls - y) ** 2)
  loss_fit = np.mean((x @ np.asarray(w_fit, np.float64) - y) ** 2)
  loss_0 = np.mean((x @ np.asarray(formats.to_dense(leaf0), np.float64) - y) ** 2)
  assert loss_fit <= loss_ls * 1.02 + 1e-9 * loss_0, (loss_fit, loss_ls, loss_0)
  assert loss_ls < 0.5 * loss_0
  assert np.all(np.asarray(w_fit)[~mask] == 0)


def test_matrix_windows_run_in_order(tiny):
  cfg, params, calib = tiny
  pruned = _compress(tiny, WANDA50)
  out, reports = rec.reconstruct(pruned, params, cfg, calib,
                                 rec.ReconConfig(window='matrix', epochs=2, optim=FAST),
                                 progress=False)
  assert [r.name for r in reports[:7]] == [f'layers/0/{l}' for s in llama.SEQUENTIAL_STAGES
                                           for l in s]
  assert all(r.loss_after <= r.loss_before for r in reports)
  _pruned_zero(pruned, out)


@pytest.mark.parametrize('inputs', ['propagated', 'dense'])
def test_resume_equals_uninterrupted(tiny, tmp_path, inputs):
  cfg, params, calib = tiny
  pruned = _compress(tiny, WANDA50)
  config = rec.ReconConfig(window='submodule', epochs=2, optim=FAST, inputs=inputs)
  full, rep_full = rec.reconstruct(pruned, params, cfg, calib, config, progress=False)
  ck = tmp_path / 'ck'
  rec.reconstruct(pruned, params, cfg, calib, config, checkpoint_dir=str(ck), progress=False,
                  stop_after=1)
  resumed, rep_res = rec.reconstruct(pruned, params, cfg, calib, config, checkpoint_dir=str(ck),
                                     progress=False)
  assert [r.loss_after for r in rep_res] == pytest.approx([r.loss_after for r in rep_full])
  for a, b in zip(jax.tree.leaves(full['layers']), jax.tree.leaves(resumed['layers'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A checkpoint of another run is refused.
  other = dataclasses.replace(config, epochs=1)
  with pytest.raises(checkpoint.CheckpointError, match='different run'):
    rec.reconstruct(pruned, params, cfg, calib, other, checkpoint_dir=str(ck), progress=False)


def test_batch_order_and_schedule():
  order = train.batch_order(10, 2, 2, seed=0)
  assert order.shape == (10, 2)
  assert sorted(order[:5].ravel()) == list(range(10))  # each epoch sees every sample once
  np.testing.assert_array_equal(order, train.batch_order(10, 2, 2, seed=0))
  sched = train.schedule(train.OptimConfig(lr=1.0, warmup=0.1), 100)
  assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
  assert float(sched(55)) == pytest.approx(0.5) and float(sched(100)) == pytest.approx(0.0)
  with pytest.raises(ValueError, match='batch size'):
    train.batch_order(4, 8, 1, seed=0)


def test_ste_gradient_is_identity_inside_the_grid():
  w = jax.random.normal(jax.random.key(0), (64, 8))
  q = formats.QuantizedWeight  # noqa: F841 (type used below through rtn)
  from compress import quantize  # pylint: disable=g-import-not-at-top
  qw = quantize.rtn(w, QuantSpec(bits=3, group_size=32))
  deq = formats.dequantize(qw)
  # Points inside the grid's range get gradient 1; points far outside get 0.
  probe = jnp.concatenate([deq[:32] + 0.1 * qw.scales[0], deq[32:] * 0 + 1e3], axis=0)
  g = jax.grad(lambda x: jnp.sum(train.fake_quantize(x, qw) * 3.0))(probe)
  np.testing.assert_allclose(g[:32], 3.0)
  np.testing.assert_allclose(g[32:], 0.0)
  np.testing.assert_allclose(train.fake_quantize(deq, qw), deq, atol=1e-6)
  np.testing.assert_array_equal(train.requantize(deq, qw).qweight, qw.qweight)
