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


# ---------------------------------------------------------------------------------------------
# Several curves per linear (SRR's preserved rank).


def _random_curves(rng, n_layers=3, max_rank=4):
  curves, costs = {}, {}
  for i in range(n_layers):
    opts = []
    for k in (0, 1, 2):
      g = np.sort(rng.exponential(size=max_rank - k))[::-1]
      opts.append(budget.Curve(k, float(g.sum() + rng.exponential() * (3 - k)), g))
    curves[f'l{i}'], costs[f'l{i}'] = opts, int(rng.integers(2, 6))
  return curves, costs


def _objective(curves, choice):
  return sum(curves[n][j].base - curves[n][j].gains[:r - curves[n][j].min_rank].sum()
             for n, (j, r) in choice.items())


def _brute_force(curves, costs, budget_params):
  names = list(curves)
  per = [[(j, r) for j, cv in enumerate(curves[n])
          for r in range(cv.min_rank, cv.min_rank + len(cv.gains) + 1)] for n in names]
  best = None
  for combo in itertools.product(*per):
    if sum(r * costs[n] for n, (_, r) in zip(names, combo)) <= budget_params:
      val = _objective(curves, dict(zip(names, combo)))
      best = val if best is None else min(best, val)
  return best


def test_allocate_curves_is_optimal_at_the_prices_breakpoints():
  """For a budget that some price spends exactly, the relaxation's choice is the optimum of the
  multiple-choice problem (brute force). For other budgets it fits, is never worse than a start it
  is given, and is close to the optimum (the local moves are a heuristic: measured here)."""
  rng = np.random.default_rng(0)
  gaps = []
  for trial in range(12):
    curves, costs = _random_curves(rng)
    mu = float(rng.exponential(0.3))
    spent = sum(budget._best_choice(cvs, costs[n], 1.0, mu)[1] * costs[n]
                for n, cvs in curves.items())
    choice = budget.allocate_curves(curves, costs, spent)
    assert sum(r * costs[n] for n, (_, r) in choice.items()) <= spent
    assert _objective(curves, choice) == pytest.approx(_brute_force(curves, costs, spent))
    for b in (5, 17, 40):
      start = {n: (0, 0) for n in curves}
      start[next(iter(curves))] = (0, b // costs[next(iter(curves))] if b < 4 * costs[
          next(iter(curves))] else 4)
      choice = budget.allocate_curves(curves, costs, b, starts=[start])
      assert sum(r * costs[n] for n, (_, r) in choice.items()) <= b
      assert _objective(curves, choice) <= _objective(curves, start) + 1e-12
      best = _brute_force(curves, costs, b)
      gaps.append((_objective(curves, choice) - best) / abs(best))
  assert min(gaps) >= -1e-9 and np.mean(gaps) < 0.02, gaps


def test_allocate_curves_with_one_curve_is_the_greedy_ranks():
  rng = np.random.default_rng(1)
  gains = {f'l{i}': np.sort(rng.exponential(size=6))[::-1] for i in range(4)}
  costs = {n: int(rng.integers(1, 5)) for n in gains}
  curves = {n: [budget.Curve(0, float(g.sum()), g)] for n, g in gains.items()}
  for b in (0, 7, 20, 60):
    got = budget.allocate_curves(curves, costs, b)
    ranks = budget.allocate_ranks(gains, costs, b)
    assert sum(gains[n][:r].sum() for n, (_, r) in got.items()) == pytest.approx(
        sum(gains[n][:r].sum() for n, r in ranks.items()))


def test_allocate_curves_takes_a_preserved_split_when_it_pays():
  flat = np.full(4, 1.0)
  curves = {'a': [budget.Curve(0, 10.0, flat), budget.Curve(2, 1.0, np.array([0.2, 0.1]))],
            'b': [budget.Curve(0, 4.0, 0.9 * flat)]}
  assert budget.allocate_curves(curves, {'a': 1, 'b': 1}, 4) == {'a': (1, 2), 'b': (0, 2)}
  assert budget.allocate_curves(curves, {'a': 1, 'b': 1}, 1) == {'a': (0, 1), 'b': (0, 0)}
  with pytest.raises(ValueError, match='non-increasing'):
    budget.allocate_curves({'a': [budget.Curve(0, 1.0, np.array([1.0, 2.0]))]}, {'a': 1}, 1)
  with pytest.raises(ValueError, match='smallest preserved'):
    budget.allocate_curves({'a': [budget.Curve(2, 1.0, flat)]}, {'a': 1}, 1)


def test_srr_global_budget_assembles_the_chosen_splits(tmp_path):
  """Inside the pipeline the compensator stores every linear's candidates and returns the uniform
  searched choice; the global budget then spends the uniform size, picks k and rank per linear,
  and every leaf is exactly its stored candidate cut to that rank."""
  cfg = config_lib.tiny_config(num_layers=2)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  spec = rules_lib.LinearSpec(quant='rtn', qspec=QuantSpec(bits=2, group_size=32))
  store = budget.CandidateStore(tmp_path / 'store')
  comp = compensate.Compensator('srr', 16, budget_rank=4, candidate_store=store)
  assert comp.fingerprint.endswith('-u4')
  out, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False,
                                   recovery=comp)
  assert all(leaf.adapter.rank == 4 for leaf in budget.adapters(out).values())
  recs = store.curves()
  assert len(recs) == 14 and all(r['ks'][0] == 0 and r['ks'][-1] == 4 for r in recs.values())
  new, alloc = budget.srr_global_budget(out, store, 4)
  size = lambda p: sum(a.a.size + a.b.size for a in tree.adapters(p).values())
  assert size(new) == alloc.used_params <= alloc.budget_params == size(out)
  assert len(set(alloc.ranks.values())) > 1
  for path, leaf in budget.adapters(new).items():
    name = path[:-len('/kernel')]
    j = recs[name]['ks'].index(alloc.preserved[path])
    cand = store.candidate(name, j)
    r = alloc.ranks[path]
    np.testing.assert_array_equal(np.asarray(leaf.weight.qweight),
                                  np.asarray(cand.compressed.weight.qweight))
    np.testing.assert_array_equal(np.asarray(leaf.adapter.b), np.asarray(cand.adapter.b[:r]))
    assert leaf.adapter.preserved == min(cand.k, r)
  # the weighted error the budget leaves is no more than the uniform searched choice's
  def total(choice_of):
    return sum(r['curves'][choice_of(n, r)[0]].base - r['curves'][choice_of(n, r)[0]].gains[
        :choice_of(n, r)[1] - r['curves'][choice_of(n, r)[0]].min_rank].sum()
               for n, r in recs.items())
  uniform = lambda n, r: min(((j, 4) for j in range(len(r['ks']))),
                             key=lambda c: r['curves'][c[0]].base
                             - r['curves'][c[0]].gains[:4 - r['ks'][c[0]]].sum())
  chosen = lambda n, r: (r['ks'].index(alloc.preserved[n + '/kernel']), alloc.ranks[n + '/kernel'])
  assert total(chosen) <= total(uniform) * (1 + 1e-9)
  with pytest.raises(ValueError, match='does not match'):
    budget.srr_global_budget(out, budget.CandidateStore(tmp_path / 'empty'), 4)
  with pytest.raises(ValueError, match='needs method srr'):
    compensate.Compensator('eora', 16, budget_rank=4)
