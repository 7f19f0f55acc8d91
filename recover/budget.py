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
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Mapping

import numpy as np

from kernels import formats
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
    if not 0 <= k <= ad.a.shape[1]:
      raise ValueError(f'{path}: rank {k} allotted, but the adapter has {ad.a.shape[1]}')
    leaves[path] = dataclasses.replace(leaf, adapter=None if k == 0 else formats.LowRank(
        a=ad.a[:, :k], b=ad.b[:k], preserved=min(ad.preserved, k)))
  return tree.replace_leaves(params, leaves)


@dataclasses.dataclass(frozen=True)
class Allocation:
  """What :func:`global_budget` decided: the ranks, the budget and what uniform rank it equals."""
  ranks: dict[str, int]
  budget_params: int
  used_params: int
  uniform_rank: int
  weighting: str

  def summary(self) -> dict[str, Any]:
    r = np.array(list(self.ranks.values()))
    return {'rank_budget': 'global', 'weighting': self.weighting,
            'uniform_rank_equivalent': self.uniform_rank, 'budget_params': self.budget_params,
            'used_params': self.used_params, 'rank_min': int(r.min()), 'rank_max': int(r.max()),
            'rank_mean': float(r.mean()), 'ranks': dict(self.ranks)}


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
  if weighting not in WEIGHTINGS:
    raise ValueError(f'weighting={weighting!r}: choose from {WEIGHTINGS}')
  if uniform_rank <= 0:
    raise ValueError(f'uniform_rank must be positive, got {uniform_rank}')
  gains = eora_gains(params)
  if not gains:
    raise ValueError('the model carries no adapters: a rank budget needs compensated linears')
  costs = rank_costs(params)
  budget = sum(min(uniform_rank, len(gains[n])) * costs[n] for n in gains)
  weights = None
  if weighting == 'relative':
    if energies is None or set(energies) < set(gains):
      missing = sorted(set(gains) - set(energies or {}))[:3]
      raise ValueError(f'relative weighting needs the dense output energy of every linear; '
                       f'missing e.g. {missing}')
    weights = {n: 1.0 / max(float(energies[n]), 1e-30) for n in gains}
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

