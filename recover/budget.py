"""One rank budget for the whole model: adapter ranks allotted where they reduce the error most.

Uniform compensation gives every linear the same rank ``r``. A layer whose compression error is
concentrated in a few whitened directions needs fewer; one whose error is spread needs more.
EoRA tells the value of each rank for free: its factors are ``a = P^+T U sqrt(S)``,
``b = sqrt(S) V^T`` with ``U S V^T`` the SVD of the whitened error ``P^T dW``, so component ``i``
lowers the layer's per-token output error ``||X (dW - A B)||^2 / n`` by exactly ``s_i^2``
(Eckart-Young in the whitened space), and ``s_i = ||b_i||^2``: the row norms of ``b`` carry it.

:func:`allocate_ranks` spends a budget of adapter parameters (``rank * (in + out)`` per linear;
with one adapter precision for all linears, bytes are proportional) greedily: the next rank goes
to the linear whose next component removes the most (weighted) error per parameter. Each layer's
gains decrease with the rank and its cost per rank is constant, so the greedy choice is the
optimum of the separable problem up to the last partly affordable component (the fractional
knapsack bound).

Weights make the layers' errors comparable: ``'absolute'`` sums the per-token squared output
errors as they are; ``'relative'`` divides each layer's by its dense output energy
``||X W||^2 / n`` (the layer's relative error, the number the reports print).

The allocation truncates adapters computed at a larger rank (SVD and EoRA factors are ordered,
so the truncation is exactly the lower-rank result): compensate at ``max_rank``, allot, cut.
The chosen ranks are exported as PEFT's ``rank_pattern``.

SRR adds a choice per linear: how many of its rank components preserve the weight's own top
directions (``k``) before the residual is quantized. Each ``k`` gives a different quantized
residual and its own error curve (:class:`recover.lowrank.SrrCandidate`: the error at rank ``k``,
then EoRA's gains). :func:`allocate_curves` picks one curve and one rank per linear (a
multiple-choice knapsack) by Lagrangian relaxation: for a price ``mu`` per parameter, every linear
independently takes the curve and rank that minimise ``error + mu * parameters``; ``mu`` is
bisected to the smallest price whose choices fit the budget, and what is left is spent by local
moves (one linear changes its curve or rank, best error decrease per parameter first).
:class:`CandidateStore` keeps the candidates on disk while the pipeline runs (one file per linear,
written as each block finishes, so a resumed run still has those of the blocks done before), and
:func:`srr_global_budget` allots and assembles the model.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import pathlib
import pickle
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from kernels import formats
from models import distributed
from models import tree

WEIGHTINGS = ('absolute', 'relative')


def _float_adapter(name: str, leaf) -> formats.LowRank:
  ad = leaf.adapter
  if isinstance(ad.a, formats.QuantizedWeight) or isinstance(ad.b, formats.QuantizedWeight):
    raise ValueError(f'{name}: the adapter is quantized; allot ranks on float adapters, then '
                     'quantize them')
  return ad


def adapters(params: Any) -> dict[str, formats.CompressedLinear]:
  """The compressed block linears that carry an adapter, by full path
  (``layers/3/self_attn/q_proj/kernel``)."""
  return {p: leaf for p, leaf in tree.linear_leaves(params).items()
          if isinstance(leaf, formats.CompressedLinear) and leaf.adapter is not None}


def eora_gains(params: Any) -> dict[str, np.ndarray]:
  """Per linear, the per-token output error each adapter component removes: ``s_i^2 =
  ||b_i||^4`` (float64, decreasing). Exact for EoRA adapters (and SVD's in the plain Frobenius
  norm); the adapters must be float (not yet quantized) and untruncated by any other rule."""
  out = {}
  for name, leaf in adapters(params).items():
    b = np.asarray(_float_adapter(name, leaf).b, np.float64)  # [r, out]
    out[name] = np.sum(b * b, axis=1) ** 2
  return out


def rank_costs(params: Any) -> dict[str, int]:
  """Adapter parameters per unit of rank, ``in + out``, of every linear with an adapter."""
  return {name: int(leaf.shape[0] + leaf.shape[1]) for name, leaf in adapters(params).items()}


def allocate_ranks(gains: Mapping[str, np.ndarray], costs: Mapping[str, int], budget: float, *,
                   weights: Mapping[str, float] | None = None) -> dict[str, int]:
  """Ranks per linear within ``budget`` adapter parameters, greedily by weighted gain per parameter.

  Args:
    gains: per linear, the error each successive rank removes (non-increasing).
    costs: per linear, parameters per rank.
    budget: total adapter parameters (e.g. ``uniform_rank * sum(costs.values())``).
    weights: per-linear multipliers of the gains (default 1).

  Returns:
    ``{name: rank}`` for every linear of ``gains`` (0 where no rank was worth its cost).
  """
  if set(gains) != set(costs):
    raise ValueError('gains and costs must name the same linears')
  if not budget >= 0:
    raise ValueError(f'the rank budget must be >= 0 parameters, got {budget}')
  weights = weights or {}
  ranks = {name: 0 for name in gains}
  heap = []
  for name, g in gains.items():
    if len(g) and costs[name] > 0:
      heapq.heappush(heap, (-float(g[0]) * weights.get(name, 1.0) / costs[name], name))
  left = float(budget)
  while heap:
    _, name = heapq.heappop(heap)
    if costs[name] > left:
      continue  # this linear's next rank no longer fits; a cheaper one may
    left -= costs[name]
    ranks[name] += 1
    k = ranks[name]
    if k < len(gains[name]):
      heapq.heappush(heap, (-float(gains[name][k]) * weights.get(name, 1.0) / costs[name], name))
  return ranks


def apply_ranks(params: Any, ranks: Mapping[str, int]) -> Any:
  """Cuts every adapter to its allotted rank (0 removes it); linears not in ``ranks`` keep theirs."""
  leaves = {}
  for path, leaf in adapters(params).items():
    if path not in ranks:
      continue
    k = int(ranks[path])
    ad = _float_adapter(path, leaf)
    if not 0 <= k <= ad.rank:
      raise ValueError(f'{path}: rank {k} allotted, but the adapter has {ad.rank}')
    leaves[path] = dataclasses.replace(leaf, adapter=ad.first(k) if k else None)
  return tree.replace_leaves(params, leaves)


@dataclasses.dataclass(frozen=True)
class Allocation:
  """What :func:`global_budget` or :func:`srr_global_budget` decided: the ranks, the budget and
  what uniform rank it equals (and, for SRR, the preserved ``k`` of every linear)."""
  ranks: dict[str, int]
  budget_params: int
  used_params: int
  uniform_rank: int
  weighting: str
  preserved: dict[str, int] | None = None

  def summary(self) -> dict[str, Any]:
    r = np.array(list(self.ranks.values()))
    out = {'rank_budget': 'global', 'weighting': self.weighting,
           'uniform_rank_equivalent': self.uniform_rank, 'budget_params': self.budget_params,
           'used_params': self.used_params, 'rank_min': int(r.min()), 'rank_max': int(r.max()),
           'rank_mean': float(r.mean()), 'ranks': dict(self.ranks)}
    if self.preserved is not None:
      k = np.array(list(self.preserved.values()))
      out.update(preserved_mean=float(k.mean()), preserved_max=int(k.max()),
                 preserved=dict(self.preserved))
    return out


def _layer_weights(names, weighting: str, energies: Mapping[str, float] | None):
  """Per-linear multipliers of the errors: None (absolute) or ``1 / ||X W||^2 / n`` (relative)."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f'weighting={weighting!r}: choose from {WEIGHTINGS}')
  if weighting == 'absolute':
    return None
  if energies is None or set(energies) < set(names):
    missing = sorted(set(names) - set(energies or {}))[:3]
    raise ValueError(f'relative weighting needs the dense output energy of every linear; '
                     f'missing e.g. {missing}')
  return {n: 1.0 / max(float(energies[n]), 1e-30) for n in names}


def global_budget(params: Any, uniform_rank: int, *, weighting: str = 'relative',
                  energies: Mapping[str, float] | None = None) -> tuple[Any, Allocation]:
  """Re-allots the ranks of ``params``' EoRA adapters (computed at a rank above ``uniform_rank``)
  within the parameters that rank ``uniform_rank`` everywhere would take.

  Args:
    params: a model whose compressed linears carry float EoRA adapters at a larger rank.
    uniform_rank: the uniform rank whose adapter size is the budget.
    weighting: ``'absolute'`` or ``'relative'`` (see the module doc).
    energies: per linear, the dense output energy ``||X W||^2 / n`` (``'relative'`` needs it).

  Returns:
    ``(params with cut adapters, Allocation)``.
  """
  if uniform_rank <= 0:
    raise ValueError(f'uniform_rank must be positive, got {uniform_rank}')
  if weighting not in WEIGHTINGS:
    raise ValueError(f'weighting={weighting!r}: choose from {WEIGHTINGS}')
  gains = eora_gains(params)
  if not gains:
    raise ValueError('the model carries no adapters: a rank budget needs compensated linears')
  costs = rank_costs(params)
  budget = sum(min(uniform_rank, len(gains[n])) * costs[n] for n in gains)
  weights = _layer_weights(gains, weighting, energies)
  ranks = allocate_ranks(gains, costs, budget, weights=weights)
  used = sum(ranks[n] * costs[n] for n in ranks)
  return apply_ranks(params, ranks), Allocation(ranks, int(budget), int(used), uniform_rank,
                                                weighting)


def output_energies(dense: Any, stats: Any) -> dict[str, float]:
  """``||X W||^2 / n = tr(W^T H W) / n`` per block linear, from per-block statistics
  (``stats[i][input_key]``, e.g. :func:`compress.calibration.dense_statistics`)."""
  from models import llama  # pylint: disable=g-import-not-at-top
  out = {}
  for i, block in enumerate(dense['layers']):
    if stats[i] is None:
      continue
    for lin in llama.block_linear_names(block):
      st = stats[i][llama.input_key(lin)]
      w = np.asarray(tree.get_linear(block, lin), np.float64)
      h = np.asarray(st.hessian, np.float64)
      out[tree.linear_path(i, lin)] = float(np.sum(w * (h @ w)) / max(int(st.num_tokens), 1))
  return out



# ----------------------------------------------------------------------------------------------
# Several curves per linear (SRR's preserved rank): a multiple-choice budget.


@dataclasses.dataclass(frozen=True)
class Curve:
  """One way to compensate a linear: its first ``min_rank`` components are fixed (SRR's
  preserved directions), the error at that rank is ``base``, and each further component lowers it
  by ``gains[i]`` (non-increasing), up to rank ``min_rank + len(gains)``."""
  min_rank: int
  base: float
  gains: np.ndarray

  def error(self, rank: int) -> float:
    """The error at ``rank`` (``min_rank <= rank <= min_rank + len(gains)``)."""
    return float(self.base - np.sum(self.gains[:rank - self.min_rank]))


def uniform_choice(curves: Mapping[str, Sequence[Curve]], rank: int) -> dict[str, tuple[int, int]]:
  """Every linear at ``rank`` (or its curves' largest rank, if smaller) on the curve of least error
  there (ties: the smaller ``min_rank``): SRR's per-layer searched ``k`` at a uniform rank."""
  out = {}
  for n, cvs in curves.items():
    r = min(rank, cvs[0].min_rank + len(cvs[0].gains))
    fits = [j for j, cv in enumerate(cvs) if cv.min_rank <= r]
    out[n] = (min(fits, key=lambda j, cvs=cvs, r=r: (cvs[j].error(r), cvs[j].min_rank)), r)
  return out


def _best_choice(curves: Sequence[Curve], cost: int, weight: float, mu: float):
  """The (curve index, rank) minimising ``weight * error + mu * cost * rank`` (ties: lower rank)."""
  best = None
  for j, cv in enumerate(curves):
    g = weight * np.asarray(cv.gains, np.float64)
    n = int(np.sum(g > mu * cost))  # gains are non-increasing: the components worth mu
    value = weight * cv.base - float(g[:n].sum()) + mu * cost * (cv.min_rank + n)
    key = (value, cv.min_rank + n)
    if best is None or key < best[0]:
      best = (key, j, cv.min_rank + n)
  return best[1], best[2]


def allocate_curves(curves: Mapping[str, Sequence[Curve]], costs: Mapping[str, int],
                    budget: float, *, weights: Mapping[str, float] | None = None,
                    starts: Sequence[Mapping[str, tuple[int, int]]] = (),
                    iterations: int = 100) -> dict[str, tuple[int, int]]:
  """One curve and one rank per linear within ``budget`` parameters, minimising the weighted sum
  of the errors.

  Lagrangian relaxation first: every choice it makes is optimal for the budget it spends (a point
  of the convex hull of the multiple-choice knapsack). Then what the last price step left is spent
  by local moves: one linear at a time changes its curve and/or rank, best error decrease per added
  parameter first (moves that free parameters and lower the error go first), until no move fits
  and helps. Along one curve these moves are the greedy fill. Each of ``starts`` (e.g. the uniform
  choice) is improved the same way, and the best result is returned, so it is never worse than
  any of them.

  Args:
    curves: per linear, its candidate :class:`Curve` s (at least one).
    costs: per linear, parameters per rank.
    budget: total adapter parameters.
    weights: per-linear multipliers of the errors (default 1).
    starts: feasible choices ``{name: (curve index, rank)}`` to improve as well.
    iterations: bisection steps on the price.

  Returns:
    ``{name: (curve index, rank)}``.
  """
  if set(curves) != set(costs):
    raise ValueError('curves and costs must name the same linears')
  if not budget >= 0:
    raise ValueError(f'the rank budget must be >= 0 parameters, got {budget}')
  for name, cvs in curves.items():
    if not cvs:
      raise ValueError(f'{name}: no candidate curve')
    for cv in cvs:
      g = np.asarray(cv.gains, np.float64)
      if np.any(np.diff(g) > 1e-9 * max(float(np.max(np.abs(g), initial=0.0)), 1e-300)):
        raise ValueError(f'{name}: the gains of a curve must be non-increasing')
  weights = weights or {}
  floor = sum(min(cv.min_rank for cv in cvs) * costs[n] for n, cvs in curves.items())
  if floor > budget:
    raise ValueError(f'the budget of {budget:.0f} parameters is below the {floor} that the '
                     'smallest preserved ranks already take')

  def choose(mu):
    out = {n: _best_choice(cvs, costs[n], weights.get(n, 1.0), mu) for n, cvs in curves.items()}
    return out, sum(r * costs[n] for n, (_, r) in out.items())

  choice, used = choose(0.0)
  if used > budget:
    lo, hi = 0.0, 1.0
    choice, used = choose(hi)
    while used > budget:  # a high enough price takes every linear to its cheapest choice
      lo, hi = hi, hi * 2.0
      choice, used = choose(hi)
    for _ in range(iterations):
      mid = math.sqrt(lo * hi) if lo > 0 else hi / 2.0
      c_mid, u_mid = choose(mid)
      if u_mid <= budget:
        hi, choice, used = mid, c_mid, u_mid
      else:
        lo = mid
  # Every (curve, rank) of every linear, flat: its weighted error and rank.
  table = {}
  for n, cvs in curves.items():
    errs, ranks, index = [], [], []
    for j, cv in enumerate(cvs):
      g = np.asarray(cv.gains, np.float64)
      errs.append(cv.base - np.concatenate([[0.0], np.cumsum(g)]))
      ranks.append(cv.min_rank + np.arange(len(g) + 1))
      index.append(np.full(len(g) + 1, j))
    table[n] = (weights.get(n, 1.0) * np.concatenate(errs), np.concatenate(ranks),
                np.concatenate(index))

  def position(n, j, r):
    _, ranks, index = table[n]
    hit = np.flatnonzero((index == j) & (ranks == r))
    if not len(hit):
      raise ValueError(f'{n}: choice (curve {j}, rank {r}) is not on its curves')
    return int(hit[0])

  def improve(start):
    pos = {n: position(n, j, r) for n, (j, r) in start.items()}
    left = budget - sum(table[n][1][p] * costs[n] for n, p in pos.items())
    if left < 0:
      raise ValueError('a start choice exceeds the budget')
    while True:
      best = None
      for n, p in pos.items():
        err, ranks, _ = table[n]
        d_cost = (ranks - ranks[p]) * costs[n]
        d_err = err - err[p]
        ok = (d_cost <= left) & (d_err < -1e-15 * max(abs(float(err[p])), 1e-300))
        if not ok.any():
          continue
        free = ok & (d_cost <= 0)  # lowers the error without spending: first, largest first
        if free.any():
          q = int(np.argmin(np.where(free, d_err, np.inf)))
          key = (0, float(d_err[q]))
        else:  # else the best error decrease per added parameter
          ratio = np.where(ok, d_err / np.maximum(d_cost, 1), np.inf)
          q = int(np.argmin(ratio))
          key = (1, float(ratio[q]))
        if best is None or key < best[0]:
          best = (key, n, q)
      if best is None:
        break
      _, n, q = best
      left -= (table[n][1][q] - table[n][1][pos[n]]) * costs[n]
      pos[n] = q
    total = sum(float(table[n][0][p]) for n, p in pos.items())
    return total, {n: (int(table[n][2][p]), int(table[n][1][p])) for n, p in pos.items()}

  results = [improve(choice)] + [improve(s) for s in starts]
  return min(results, key=lambda t: t[0])[1]


def srr_curves(candidates: Sequence[Any]) -> list[Curve]:
  """The :class:`Curve` of each :class:`recover.lowrank.SrrCandidate`."""
  return [Curve(c.k, c.base_error, np.asarray(c.gains, np.float64)) for c in candidates]


def _file_stem(name: str) -> str:
  return name.replace('/', '.')


class CandidateStore:
  """SRR's candidate splits of every linear, on disk until the model-wide budget picks one each.

  ``put`` writes two files per linear: the curves (small: read for the allotment) and the
  candidates themselves (read only for the chosen one). Keys are the compensator's layer names
  (``layers/3/mlp/down_proj``). Each process of a multi-process run keeps its own directory.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)

  def _path(self, name: str, what: str) -> pathlib.Path:
    return self.directory / f'{_file_stem(name)}.{what}.pkl'

  def put(self, name: str, candidates: Sequence[Any], energy: float, cost: int) -> None:
    """Stores ``candidates`` of ``name`` with its dense output energy and parameters per rank."""
    # Whole on this host, also where the pipeline split a matrix across processes.
    host = [dataclasses.replace(c, compressed=jax.tree.map(distributed.gather, c.compressed),
                                adapter=jax.tree.map(distributed.gather, c.adapter))
            for c in candidates]
    for what, obj in (('candidates', host),
                      ('curves', {'name': name, 'curves': srr_curves(host), 'energy': float(energy),
                                  'cost': int(cost), 'ks': [c.k for c in host]})):
      tmp = self._path(name, what + '.tmp')
      with open(tmp, 'wb') as f:
        pickle.dump(obj, f)
      os.replace(tmp, self._path(name, what))  # never a half-written file under the real name

  def curves(self) -> dict[str, dict[str, Any]]:
    """``{name: {'curves', 'energy', 'cost', 'ks'}}`` of every stored linear."""
    out = {}
    for p in sorted(self.directory.glob('*.curves.pkl')):
      with open(p, 'rb') as f:
        rec = pickle.load(f)
      out[rec.pop('name')] = rec
    return out

  def candidate(self, name: str, index: int) -> Any:
    with open(self._path(name, 'candidates'), 'rb') as f:
      return pickle.load(f)[index]


def srr_global_budget(params: Any, store: CandidateStore, uniform_rank: int, *,
                      weighting: str = 'absolute') -> tuple[Any, Allocation]:
  """Re-assembles an SRR model with one model-wide budget: the adapter parameters that rank
  ``uniform_rank`` everywhere takes, allotted over every linear's preserved rank ``k`` and total
  rank by :func:`allocate_curves` on the stored candidates.

  Args:
    params: the pipeline's result (its SRR leaves are replaced).
    store: the candidates the compensator stored for every SRR linear of ``params``.
    uniform_rank: the uniform rank whose adapter size is the budget.
    weighting: ``'absolute'`` or ``'relative'`` (the stored dense output energies).

  Returns:
    ``(params with the chosen residuals and cut adapters, Allocation)``.
  """
  if uniform_rank <= 0:
    raise ValueError(f'uniform_rank must be positive, got {uniform_rank}')
  # The linears SRR compensated in this run carry adapters; only their candidates are read.
  targets = {p[:-len('/kernel')]: p for p in adapters(params)}
  recs = {n: r for n, r in store.curves().items() if n in targets}
  missing = sorted(set(targets) - set(recs))
  if missing or not recs:
    raise ValueError(f'the SRR candidate store at {store.directory} does not match the model: '
                     f'no candidates for {len(missing)} of its {len(targets)} compensated linears '
                     f'(e.g. {missing[:3]})')
  curves = {n: r['curves'] for n, r in recs.items()}
  costs = {n: r['cost'] for n, r in recs.items()}
  budget = sum(min(uniform_rank, cv[0].min_rank + len(cv[0].gains)) * costs[n]
               for n, cv in curves.items())
  weights = _layer_weights(curves, weighting, {n: r['energy'] for n, r in recs.items()})
  # The uniform choice (rank uniform_rank, the k of least error there) is one start to improve.
  choice = allocate_curves(curves, costs, budget, weights=weights,
                           starts=[uniform_choice(curves, uniform_rank)])
  new, ranks, preserved = {}, {}, {}
  for n, (j, r) in choice.items():
    cand = store.candidate(n, j)
    new[targets[n]] = formats.with_adapter(cand.compressed, cand.adapter.first(r) if r else None)
    ranks[targets[n]], preserved[targets[n]] = r, cand.k
  used = sum(ranks[targets[n]] * costs[n] for n in choice)
  return tree.replace_leaves(params, new), Allocation(ranks, int(budget), int(used), uniform_rank,
                                                      weighting, preserved=preserved)
