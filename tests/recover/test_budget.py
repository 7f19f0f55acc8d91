"""Tests for recover/budget.py: the model-wide rank budget."""

import itertools

import jax
import numpy as np
import pytest

from compress import calibration
from compress import pipeline
from compress import rules as rules_lib
from kernels import QuantSpec
from kernels import formats
from models import config as config_lib
from models import llama
from models import tree
from recover import budget
from recover import compensate


def test_greedy_is_the_optimum_with_equal_costs():
  """Equal costs per rank: greedy by marginal gain is the exact optimum (brute force)."""
  rng = np.random.default_rng(0)
  gains = {f'l{i}': np.sort(rng.exponential(size=5))[::-1] for i in range(3)}
  costs = {n: 10 for n in gains}
  for budget_params in (0, 30, 70, 150):
    ranks = budget.allocate_ranks(gains, costs, budget_params)
    got = sum(gains[n][:k].sum() for n, k in ranks.items())
    best = max(sum(gains[n][:k].sum() for n, k in zip(gains, combo))
               for combo in itertools.product(range(6), repeat=3)
               if 10 * sum(combo) <= budget_params)
    assert got == pytest.approx(best) and sum(ranks.values()) * 10 <= budget_params


def test_costs_and_weights_steer_the_allocation():
  gains = {'cheap': np.array([1.0, 1.0]), 'dear': np.array([1.5, 1.5])}
  # the dear layer's gain per parameter is lower: the cheap one is filled first
  assert budget.allocate_ranks(gains, {'cheap': 1, 'dear': 2}, 2) == {'cheap': 2, 'dear': 0}
  assert budget.allocate_ranks(gains, {'cheap': 1, 'dear': 2}, 2,
                               weights={'dear': 10.0}) == {'cheap': 0, 'dear': 1}
  with pytest.raises(ValueError, match='same linears'):
    budget.allocate_ranks(gains, {'cheap': 1}, 2)


@pytest.fixture(scope='module')
def compensated():
  cfg = config_lib.tiny_config(num_layers=2)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  spec = rules_lib.LinearSpec(quant='rtn', qspec=QuantSpec(bits=2, group_size=32))
  base, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False)
  stats = calibration.dense_statistics(params, cfg, calib, progress=False)
  big = compensate.compensate_tree(params, base, stats, compensate.Compensator('eora', 16))
  return cfg, params, base, stats, big


def test_eora_gains_are_the_exact_error_reductions(compensated):
  _, params, base, stats, big = compensated
  path = 'layers/1/mlp/down_proj/kernel'
  gains = budget.eora_gains(big)[path]
  w = np.asarray(tree.get_linear(params['layers'][1], 'mlp/down_proj'), np.float64)
  leaf = tree.linear_leaves(big)[path]
  st = stats[1][llama.input_key('mlp/down_proj')]
  delta = w - np.asarray(formats.to_dense(tree.strip_adapter(leaf)), np.float64)
  errs = []
  for k in range(6):
    e = delta - np.asarray(leaf.adapter.a[:, :k], np.float64) @ np.asarray(leaf.adapter.b[:k],
                                                                          np.float64)
    errs.append(np.sum(e * (np.asarray(st.hessian, np.float64) @ e)) / int(st.num_tokens))
  np.testing.assert_allclose(-np.diff(errs), gains[:5], rtol=1e-3)
  assert np.all(np.diff(gains) <= 1e-12)


@pytest.mark.parametrize('weighting', budget.WEIGHTINGS)
def test_global_budget_spends_the_uniform_size(compensated, weighting):
  _, params, _, stats, big = compensated
  energies = budget.output_energies(params, stats)
  out, alloc = budget.global_budget(big, 4, weighting=weighting, energies=energies)
  uniform = compensate.truncate_adapters(big, 4)
  size = lambda p: sum(a.a.size + a.b.size for a in tree.adapters(p).values())
  assert size(out) == alloc.used_params <= alloc.budget_params == size(uniform)
  assert alloc.used_params > 0.9 * alloc.budget_params
  ranks = alloc.ranks
  assert len(set(ranks.values())) > 1  # not uniform
  for path, k in ranks.items():
    leaf = tree.linear_leaves(out)[path]
    assert (leaf.adapter is None) if k == 0 else leaf.adapter.a.shape[1] == k
  # total weighted error removed is at least uniform's (the greedy optimum of the same budget)
  gains = budget.eora_gains(big)
  wts = {n: 1.0 / energies[n] for n in gains} if weighting == 'relative' else {n: 1.0 for n in gains}
  got = sum(wts[n] * gains[n][:k].sum() for n, k in ranks.items())
  uni = sum(wts[n] * gains[n][:4].sum() for n in gains)
  assert got >= uni * (1 - 1e-9)


def test_budget_refusals(compensated):
  _, params, base, stats, big = compensated
  with pytest.raises(ValueError, match='no adapters'):
    budget.global_budget(base, 4, weighting='absolute')
  with pytest.raises(ValueError, match='needs the dense output energy'):
    budget.global_budget(big, 4, weighting='relative')
  with pytest.raises(ValueError, match='weighting'):
    budget.global_budget(big, 4, weighting='loss')
  with pytest.raises(ValueError, match='quantized'):
    budget.global_budget(compensate.quantize_adapters(big, 4, 8), 4, weighting='absolute')
  with pytest.raises(ValueError, match='has 16'):
    budget.apply_ranks(big, {'layers/0/mlp/up_proj/kernel': 17})


def test_compensate_tree_equals_the_pipeline_on_dense_statistics(compensated):
  cfg, params, base, stats, big = compensated
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  spec = rules_lib.LinearSpec(quant='rtn', qspec=QuantSpec(bits=2, group_size=32))
  inside, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False,
                                      precomputed_stats=stats,
                                      recovery=compensate.Compensator('eora', 16))
  for path, ad in tree.adapters(inside).items():
    other = tree.adapters(big)[path]
    np.testing.assert_allclose(np.asarray(ad.a @ ad.b), np.asarray(other.a @ other.b), atol=1e-5)


def test_compensator_shrink_options():
  with pytest.raises(ValueError, match='EoRA only'):
    compensate.Compensator('svd', 8, shrink=0.1)
  with pytest.raises(ValueError, match='shrink'):
    compensate.Compensator('eora', 8, shrink=-1.0)
  # the default keeps the fingerprint of earlier runs (their cached models stay valid)
  assert compensate.Compensator('eora', 8).fingerprint == 'eora-r8-b16-g64-kNone-exact'
  assert compensate.Compensator('eora', 8, shrink=0.1).fingerprint.endswith('-s0.1')
