"""Tests for Wanda++ regional gradient scores: compress/regional.py and the Wanda++ masks of
compress/prune.py."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import calibration
from compress import prune
from compress import regional
from compress.prune import PruneSpec
from kernels import formats
from models import config as config_lib
from models import llama
from models import tree
from tests.compress.test_prune import _hessian, _rng, _weight
from tests.utils import tiny_model


def _grad(n_in=64, n_out=24, seed=3):
  return _rng(seed).uniform(0.05, 1.0, (n_in, n_out)).astype(np.float32)


def _assert_nm(mask, n, m):
  mask = np.asarray(mask)
  kept = mask.reshape(mask.shape[0] // m, m, mask.shape[1]).sum(axis=1)
  assert (kept == n).all(), np.unique(kept)


def _tiny_block():
  cfg, params, calib = tiny_model()
  xs = llama.embed(params, jnp.asarray(calib), cfg)  # [8, 32, 64], the first block's inputs
  return cfg, params, params['layers'][0], xs


def _with_kernels(block, kernels):
  for lin, kernel in kernels.items():
    block = tree.set_linear(block, lin, kernel)
  return block


def _loop_gradients(block, xs, cfg, linears):
  """RMS over samples of per-sample gradients of ||block(x_n)||_2, one jax.grad call per sample."""
  kernels = {lin: tree.get_linear(block, lin) for lin in linears}

  def loss(k, x):
    return jnp.linalg.norm(llama.block_apply(_with_kernels(block, k), x[None], cfg))

  grad = jax.jit(jax.grad(loss))
  sq = {lin: np.zeros(kernels[lin].shape, np.float64) for lin in linears}
  for n in range(xs.shape[0]):
    g = grad(kernels, xs[n])
    for lin in linears:
      sq[lin] += np.square(np.asarray(g[lin], np.float64))
  return {lin: np.sqrt(sq[lin] / xs.shape[0]) for lin in linears}


def _assert_close_to(got, expected, rtol=1e-5):
  """Every entry within ``rtol`` of the largest entry of ``expected``."""
  got, expected = np.asarray(got), np.asarray(expected)
  assert got.shape == expected.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=0, atol=rtol * np.abs(expected).max())


# ------------------------------------------------------------------------------ gradients


def test_regional_gradients_equal_per_sample_loops():
  cfg, _, block, xs = _tiny_block()
  xs = xs[:2]
  linears = llama.block_linear_names(block)
  got = regional.regional_gradients(block, xs, cfg, linears, batch_size=2)
  expected = _loop_gradients(block, xs, cfg, linears)
  assert set(got) == set(linears)
  for lin in linears:
    assert float(np.abs(expected[lin]).max()) > 0
    _assert_close_to(got[lin], expected[lin])


@pytest.mark.parametrize('lin', ['self_attn/q_proj', 'mlp/down_proj'])
def test_regional_gradient_matches_finite_difference(lin):
  """One sample: G is |dL/dW| of L = ||block(x)||_2; checked on the weight of largest gradient."""
  cfg, _, block, xs = _tiny_block()
  x = xs[:1]
  g = np.asarray(regional.regional_gradients(block, x, cfg, [lin], batch_size=1)[lin])
  i, j = np.unravel_index(np.argmax(g), g.shape)
  w = tree.get_linear(block, lin)
  eps = 3e-3

  def loss(delta):
    b = tree.set_linear(block, lin, w.at[i, j].add(delta))
    return float(jnp.linalg.norm(llama.block_apply(b, x, cfg)))

  fd = (loss(eps) - loss(-eps)) / (2 * eps)
  assert g[i, j] > 0.1
  np.testing.assert_allclose(abs(fd), g[i, j], rtol=1e-2)


def test_batching_does_not_change_gradients():
  """Whole batches (one scan), a remainder batch, and host-memory inputs (batch by batch) agree."""
  cfg, _, block, xs = _tiny_block()
  xs = xs[:5]
  linears = ('self_attn/v_proj', 'mlp/up_proj')
  ref = regional.regional_gradients(block, xs, cfg, linears, batch_size=5)
  for batch_size, inputs in ((2, xs), (1, xs), (2, np.asarray(xs))):
    got = regional.regional_gradients(block, inputs, cfg, linears, batch_size=batch_size)
    for lin in linears:
      _assert_close_to(got[lin], ref[lin])


def test_bfloat16_block_is_differentiated_in_float32():
  cfg, _, block, xs = _tiny_block()
  xs = xs[:2]
  linears = ('self_attn/o_proj', 'mlp/gate_proj')
  low = llama.cast_params(block, jnp.bfloat16)
  got = regional.regional_gradients(low, xs.astype(jnp.bfloat16), cfg, linears, batch_size=2)
  up = llama.cast_params(low, jnp.float32)
  ref = regional.regional_gradients(up, xs.astype(jnp.bfloat16).astype(jnp.float32), cfg,
                                    linears, batch_size=2)
  for lin in linears:
    assert got[lin].dtype == jnp.float32
    _assert_close_to(got[lin], ref[lin], rtol=1e-6)


def test_mixture_of_experts_gradients():
  """Experts, router included, match the per-sample loop; an expert that gets no token has a zero
  gradient (a zero router sends every token to experts 0 and 1: top-k breaks ties by index)."""
  cfg = config_lib.tiny_config(num_layers=1, num_experts=4, num_experts_per_tok=2,
                               expert_intermediate_size=32)
  block = llama.init_params(cfg, jax.random.key(0), scale=0.1)['layers'][0]
  xs = jax.random.normal(jax.random.key(3), (3, 16, cfg.hidden_size))
  linears = llama.block_linear_names(block)
  assert 'mlp/experts/3/down_proj' in linears and 'mlp/gate' in linears
  got = regional.regional_gradients(block, xs, cfg, linears, batch_size=2)
  expected = _loop_gradients(block, xs, cfg, linears)
  for lin in linears:
    _assert_close_to(got[lin], expected[lin])

  router = tree.get_linear(block, 'mlp/gate')
  starved = tree.set_linear(block, 'mlp/gate', jnp.zeros_like(router))
  got = regional.regional_gradients(starved, xs, cfg, linears, batch_size=2)
  for e in range(4):
    for m in ('gate_proj', 'up_proj', 'down_proj'):
      g = np.asarray(got[f'mlp/experts/{e}/{m}'])
      if e < 2:
        assert g.max() > 0, (e, m)
      else:
        assert (g == 0).all(), (e, m)


def test_regional_gradients_reject_bad_arguments():
  cfg, _, block, xs = _tiny_block()
  with pytest.raises(ValueError, match="'mlp/nope' is not a linear"):
    regional.regional_gradients(block, xs, cfg, ['mlp/nope'], batch_size=4)
  with pytest.raises(ValueError, match='at least one calibration sample'):
    regional.regional_gradients(block, xs[:0], cfg, ['mlp/up_proj'], batch_size=4)
  w = tree.get_linear(block, 'mlp/up_proj')
  leaf = formats.CompressedLinear(weight=w, mask=jnp.ones(w.shape, bool))
  compressed = tree.set_linear(block, 'mlp/up_proj', leaf)
  with pytest.raises(ValueError, match='not a dense float array'):
    regional.regional_gradients(compressed, xs, cfg, ['mlp/up_proj'], batch_size=4)
  # another, already compressed linear of the block is fine
  got = regional.regional_gradients(compressed, xs[:2], cfg, ['mlp/down_proj'], batch_size=2)
  assert np.isfinite(np.asarray(got['mlp/down_proj'])).all()
  assert regional.regional_gradients(block, xs, cfg, [], batch_size=4) == {}


# --------------------------------------------------------------------------------- scores


def test_wandapp_scores_formula():
  w, h, g = _weight(), _hessian(), _grad()
  alpha = 7.0
  expected = (alpha * g + np.sqrt(np.diag(h))[:, None]) * np.abs(w)
  np.testing.assert_allclose(prune.wandapp_scores(w, h, g, alpha), expected, rtol=1e-6)
  assert prune.WANDAPP_ALPHA == 100.0
  np.testing.assert_allclose(prune.wandapp_scores(w, h, g),
                             prune.wandapp_scores(w, h, g, 100.0), rtol=0)


@pytest.mark.parametrize('pattern', ['0.5', '0.7', '2:4', '4:8'])
def test_alpha_zero_is_wanda(pattern):
  w, h, g = _weight(), _hessian(), _grad()
  spec = PruneSpec.parse(pattern)
  np.testing.assert_array_equal(prune.wandapp_mask(w, h, g, spec, alpha=0.0),
                                prune.wanda_mask(w, h, spec))


@pytest.mark.parametrize('pattern', ['0.5', '0.7', '2:4', '4:8'])
def test_huge_alpha_is_gradient_times_magnitude(pattern):
  """With ``alpha = 2^k`` so large that Wanda's term is below half an ulp of the gradient term,
  the mask is exactly that of ``G * |W|`` (a power of two scales without rounding)."""
  w, h, g = _weight(), _hessian(), _grad()
  spec = PruneSpec.parse(pattern)
  wanda = np.abs(w) * np.sqrt(np.diag(h))[:, None]
  ratio = wanda.max() / (g * np.abs(w)).min()
  alpha = 2.0 ** math.ceil(math.log2(ratio) + 26)
  assert alpha * float((g * np.abs(w)).max()) < 1e30  # far from overflow
  expected = prune.mask_from_scores(g * np.abs(w), spec)
  np.testing.assert_array_equal(prune.wandapp_mask(w, h, g, spec, alpha=alpha), expected)
  # guards the two tests above: the gradient term changes the mask
  assert (np.asarray(expected) != np.asarray(prune.wanda_mask(w, h, spec))).any()


@pytest.mark.parametrize('pattern', ['0.5', '2:4'])
def test_wandapp_mask_pattern(pattern):
  n_in = 64
  w, h, g = _weight(n_in), _hessian(n_in), _grad(n_in)
  spec = PruneSpec.parse(pattern)
  mask = np.asarray(jax.jit(prune.wandapp_mask, static_argnums=3)(w, h, g, spec))
  assert mask.dtype == np.bool_ and mask.shape == w.shape
  assert ((~mask).sum(axis=0) == n_in // 2).all()  # exactly half of every output unit
  if spec.is_nm:
    _assert_nm(mask, 2, 4)
  # every kept score >= every pruned score within each selection set
  scores = np.asarray(prune.wandapp_scores(w, h, g))
  group = spec.m if spec.is_nm else n_in
  s = scores.reshape(n_in // group, group, -1)
  k = mask.reshape(n_in // group, group, -1)
  assert (np.where(k, s, np.inf).min(axis=1) >= np.where(~k, s, -np.inf).max(axis=1)).all()


def test_wandapp_returns_pruned_weight_and_checks_shapes():
  w, h, g = _weight(), _hessian(), _grad()
  spec = PruneSpec.parse('2:4')
  w_p, mask = prune.wandapp(w, h, g, spec)
  np.testing.assert_array_equal(w_p, np.where(mask, w, 0))
  with pytest.raises(ValueError, match='gradient shape'):
    prune.wandapp_mask(w, h, g[:, :8], spec)
  with pytest.raises(ValueError, match='hessian shape'):
    prune.wandapp_mask(w, h[:32, :32], g, spec)
  with pytest.raises(ValueError, match='alpha must be non-negative'):
    prune.wandapp_mask(w, h, g, spec, alpha=-1.0)


# ------------------------------------------------------------------------ block output error


def _block_error(block, pruned, xs, cfg):
  apply = jax.jit(functools.partial(llama.block_apply, cfg=cfg))
  y = apply(block, xs)
  return float(jnp.linalg.norm(apply(pruned, xs) - y) / jnp.linalg.norm(y))


@pytest.mark.parametrize('pattern', ['0.5', '2:4'])
def test_block_output_error_wanda_vs_wandapp(pattern):
  """Prunes every linear of the tiny model's first block (statistics and gradients of the dense
  block on random calibration tokens) and measures the block's relative output error on them.

  Asserted: finite errors; alpha = 0 reproduces Wanda; at the default alpha the gradient term
  changes the masks; both are far better than random masks of the same pattern. Which of Wanda and
  Wanda++ is better on this random-weight model is reported, not asserted."""
  cfg, _, block, xs = _tiny_block()
  spec = PruneSpec.parse(pattern)
  linears = llama.block_linear_names(block)
  stats = calibration.collect_stats(block, xs, cfg, sorted({llama.input_key(l) for l in linears}),
                                    batch_size=4)
  grads = regional.regional_gradients(block, xs, cfg, linears, batch_size=4)
  rng = _rng(5)
  wanda_mask = jax.jit(prune.wanda_mask, static_argnums=2)
  wandapp_mask = jax.jit(prune.wandapp_mask, static_argnums=(3, 4))
  random_mask = jax.jit(prune.mask_from_scores, static_argnums=1)

  def pruned_block(masks):
    out = block
    for lin in linears:
      out = tree.set_linear(out, lin, prune.apply_mask(tree.get_linear(block, lin), masks[lin]))
    return out

  def masks_of(method):
    out = {}
    for lin in linears:
      w = tree.get_linear(block, lin)
      h = stats[llama.input_key(lin)].hessian
      if method == 'wanda':
        out[lin] = wanda_mask(w, h, spec)
      elif method == 'random':
        out[lin] = random_mask(rng.random(w.shape).astype(np.float32), spec)
      else:
        out[lin] = wandapp_mask(w, h, grads[lin], spec, method)
    return out

  masks = {m: masks_of(m) for m in ('wanda', 0.0, prune.WANDAPP_ALPHA, 'random')}
  errors = {m: _block_error(block, pruned_block(v), xs, cfg) for m, v in masks.items()}
  print(f'\n{pattern}: relative block output error: Wanda {errors["wanda"]:.4f}, '
        f'Wanda++ (alpha={prune.WANDAPP_ALPHA:g}) {errors[prune.WANDAPP_ALPHA]:.4f}, '
        f'random mask {errors["random"]:.4f}')
  assert all(np.isfinite(e) and e > 0 for e in errors.values()), errors
  assert errors[0.0] == errors['wanda']
  changed = sum(int(np.sum(np.asarray(masks['wanda'][lin])
                           != np.asarray(masks[prune.WANDAPP_ALPHA][lin]))) for lin in linears)
  assert changed > 0
  for method in ('wanda', prune.WANDAPP_ALPHA):
    assert errors[method] < 0.85 * errors['random'], errors


# ---------------------------------------------------------------------------------------------
# In the pipeline.


def _pipeline_model():
  cfg = config_lib.tiny_config(num_layers=2)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  return cfg, params, calib


def _masks(params):
  from compress import matrix  # pylint: disable=g-import-not-at-top
  return {p: np.asarray(formats.effective_weight(leaf)) != 0
          for p, leaf in tree.linear_leaves(params).items()}


def test_pipeline_wandapp_masks_and_alpha_zero_is_wanda():
  from compress import pipeline, rules  # pylint: disable=g-import-not-at-top
  cfg, params, calib = _pipeline_model()
  spec = lambda **kw: rules.LinearSpec(sparsity=PruneSpec(n=2, m=4), **kw)
  run = lambda s: pipeline.compress_model(params, cfg, calib, rules.uniform(s), progress=False)
  pp, reports = run(spec(prune='wanda++'))
  wanda, _ = run(spec(prune='wanda'))
  zero, _ = run(spec(prune='wanda++', wandapp_alpha=0.0))
  m_pp, m_wanda, m_zero = _masks(pp), _masks(wanda), _masks(zero)
  for path, mask in m_pp.items():
    _assert_nm(mask, 2, 4)
    np.testing.assert_array_equal(m_zero[path], m_wanda[path])
  assert any((m_pp[p] != m_wanda[p]).any() for p in m_pp)  # the gradient term changes masks
  assert all(r.method == 'wanda++ 2:4' for r in reports)


def test_pipeline_wandapp_refusals():
  from compress import pipeline, rules  # pylint: disable=g-import-not-at-top
  cfg, params, calib = _pipeline_model()
  s = rules.LinearSpec(prune='wanda++', sparsity=PruneSpec(n=2, m=4))
  stats = calibration.dense_statistics(params, cfg, calib, progress=False)
  with pytest.raises(ValueError, match='not with precomputed statistics'):
    pipeline.compress_model(params, cfg, calib, rules.uniform(s), precomputed_stats=stats,
                            progress=False)
  with pytest.raises(ValueError, match='LM head is not in a block'):
    pipeline.compress_model(params, cfg, calib, [rules.Rule('lm_head/kernel', s)], progress=False)
  with pytest.raises(ValueError, match='wandapp_alpha'):
    rules.LinearSpec(prune='wanda++', sparsity=PruneSpec(n=2, m=4), wandapp_alpha=-1.0)
