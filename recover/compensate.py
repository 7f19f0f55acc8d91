"""Training-free compensation inside the compression pipeline.

:class:`Compensator` is the :class:`~compress.matrix.LinearRecovery` that
:func:`compress.pipeline.compress_model` calls right after each linear is compressed: it adds a
low-rank adapter (SVD, EoRA, ACT-S) to the compressed leaf, or, for SRR, re-compresses the layer
with its top directions preserved. The
eigenspace comes from the compression pass's statistics, or from a separate recovery calibration
set when the pipeline is given one (EoRA uses task data for it). Eigendecompositions are shared by
the linears that read the same input (q/k/v; gate/up).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compress.calibration import LinearStats
from compress.matrix import compress_matrix
from compress.rules import LinearSpec
from kernels import formats
from models import llama
from models import tree
from recover import lowrank

METHODS = ('none', 'svd', 'eora', 'actsvd', 'srr')
ADAPTER_BITS = (16, 8, 4, 3, 2)


@dataclasses.dataclass
class Compensator:
  """The :class:`~compress.matrix.LinearRecovery` of training-free compensation: called as
  ``(name, w, leaf, stats, aux_stats, spec) -> leaf`` by ``compress_model``.

  Attributes:
    method: 'svd', 'eora', 'actsvd' or 'srr'.
    rank: adapter rank (clipped per layer to ``min(in, out)``).
    adapter_bits: 16 keeps the factors in float; 2/3/4/8 quantizes them group-wise (RTN).
    adapter_group_size: group size of the adapter quantization.
    srr_k: SRR's preserved rank: None = the energy rule, an int = fixed, -1 = search.
    srr_scaling: 'exact' (``H^1/2``) or 'diag'.
    basis_cache: a dict shared by compensations of the same statistics (e.g. a sweep of
      ``shrink`` or of compressions calibrated on one set): one eigendecomposition per input for
      all of them (unbounded: the caller owns its memory). None keeps a small private cache.
    shrink: robust EoRA's covariance shrinkage ``lambda``: the eigenspace of
      ``H + lambda * tr(H) / d * I`` (0: EoRA's own; large: plain SVD). See
      :func:`recover.lowrank.shrink_eigenvalues`.
    budget_rank: SRR under a model-wide budget (:func:`recover.budget.srr_global_budget`): the
      uniform rank the budget equals. Every linear's candidates (``k`` fixed by ``srr_k``, or the
      search set for that rank) are computed at ``rank`` and written to ``candidate_store``; the
      returned leaf, which the pipeline propagates, is the candidate of least output error at
      ``budget_rank`` (uniform SRR with the searched ``k``). 0: no budget.
    candidate_store: a :class:`recover.budget.CandidateStore` (with ``budget_rank``).
  """
  method: str
  rank: int
  adapter_bits: int = 16
  adapter_group_size: int = 64
  srr_k: int | None = None
  srr_scaling: str = 'exact'
  shrink: float = 0.0
  budget_rank: int = 0
  basis_cache: dict[Any, lowrank.EigenBasis] | None = dataclasses.field(default=None, repr=False)
  candidate_store: Any = dataclasses.field(default=None, repr=False)
  _bases: dict[str, lowrank.EigenBasis] = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    if self.method not in METHODS or self.method == 'none':
      raise ValueError(f'unknown recovery method {self.method!r}; choose one of {METHODS[1:]}')
    if self.rank <= 0:
      raise ValueError(f'rank must be positive, got {self.rank}')
    if self.adapter_bits not in ADAPTER_BITS:
      raise ValueError(f'adapter_bits={self.adapter_bits} is not supported; choose one of {ADAPTER_BITS}')
    lowrank.check_shrink(self.shrink)
    if self.shrink and self.method != 'eora':
      raise ValueError(f'covariance shrinkage (shrink={self.shrink}) applies to EoRA only, not '
                       f'{self.method!r}')
    if self.budget_rank and (self.method != 'srr' or not 0 < self.budget_rank <= self.rank):
      raise ValueError(f'budget_rank={self.budget_rank} needs method srr and 0 < budget_rank <= '
                       f'rank={self.rank}')
    if self.budget_rank and self.srr_k not in (None, -1) and self.srr_k > self.budget_rank:
      raise ValueError(f'srr_k={self.srr_k} exceeds budget_rank={self.budget_rank}')

  @property
  def changes_weights(self) -> bool:
    """SRR quantizes a residual, so the compressed leaf is only meaningful with its adapter."""
    return self.method == 'srr'

  @property
  def fingerprint(self) -> str:
    return (f'{self.method}-r{self.rank}-b{self.adapter_bits}-g{self.adapter_group_size}'
            f'-k{self.srr_k}-{self.srr_scaling}' + (f'-s{self.shrink:g}' if self.shrink else '')
            + (f'-u{self.budget_rank}' if self.budget_rank else ''))

  def _basis(self, name: str, stats: LinearStats) -> lowrank.EigenBasis:
    parts = name.split('/')  # layers/I/<linear>: linears that share an input share a basis
    try:
      shared = llama.input_key('/'.join(parts[2:]))
    except ValueError:  # not a block linear (the LM head)
      shared = name
    key = f'{"/".join(parts[:2])}/{shared}/{id(stats.hessian)}'
    if self.basis_cache is not None:  # shared by several compensations of the same statistics
      if key not in self.basis_cache:
        self.basis_cache[key] = lowrank.eigen_basis(stats.hessian, name=name,
                                                    num_tokens=int(stats.num_tokens))
      raw = self.basis_cache[key]
      return lowrank.shrunk_basis(raw, self.shrink) if self.shrink else raw
    if key not in self._bases:
      if len(self._bases) > 8:
        self._bases.clear()
      self._bases[key] = lowrank.eigen_basis(stats.hessian, num_tokens=int(stats.num_tokens),
                                             name=name, shrink=self.shrink)
    return self._bases[key]

  def __call__(self, name: str, w: jnp.ndarray, leaf, stats: LinearStats,
               aux_stats: LinearStats | None, spec: LinearSpec):
    st = aux_stats if aux_stats is not None else stats
    rank = min(self.rank, *w.shape)
    if self.method == 'srr':
      qspec = dataclasses.replace(spec, quant='rtn') if spec.quant == 'awq' else spec

      def quantize_fn(residual):
        new_leaf, _ = compress_matrix(residual, stats, qspec, name)
        return new_leaf, formats.to_dense(new_leaf)

      basis = self._basis(name, st)
      if self.budget_rank:
        return self._srr_candidates(name, w, st, quantize_fn, basis, rank)
      if self.srr_k == -1:
        new_leaf, adapter, _ = lowrank.srr_search_k(w, st.hessian, rank, quantize_fn,
                                                    scaling=self.srr_scaling, name=name, basis=basis)
      else:
        new_leaf, adapter, _ = lowrank.srr(w, st.hessian, rank, quantize_fn, k=self.srr_k,
                                           scaling=self.srr_scaling, name=name, basis=basis)
      leaf = new_leaf
    else:
      delta = jnp.asarray(w, jnp.float32) - formats.to_dense(leaf)
      if self.method == 'svd':
        adapter = lowrank.svd_compensate(delta, rank)
      elif self.method == 'eora':
        adapter = lowrank.eora_from_basis(delta, self._basis(name, st), rank, name)
      else:
        adapter = lowrank.act_scaled_svd(delta, st.hessian, rank, num_tokens=int(st.num_tokens),
                                         name=name)
    if self.adapter_bits != 16:
      adapter = lowrank.quantize_adapter(adapter, self.adapter_bits, self.adapter_group_size)
    return formats.with_adapter(leaf, adapter)

  def _srr_candidates(self, name, w, st: LinearStats, quantize_fn, basis, rank):
    """SRR under a model-wide budget: stores every candidate split, returns the uniform choice."""
    if self.candidate_store is None:
      raise ValueError('SRR with a model-wide budget needs a candidate_store')
    if self.adapter_bits != 16:
      raise ValueError('SRR with a model-wide budget allots float adapters; quantize them after')
    uniform = min(self.budget_rank, rank)
    ks = None if self.srr_k in (None, -1) else [self.srr_k]
    cands = lowrank.srr_candidates(w, st.hessian, rank, quantize_fn, rank=uniform, ks=ks,
                                   scaling=self.srr_scaling, num_tokens=int(st.num_tokens),
                                   name=name, basis=basis)
    energy = lowrank.weighted_error(w, st.hessian, num_tokens=int(st.num_tokens)) ** 2
    self.candidate_store.put(name, cands, energy, int(w.shape[0] + w.shape[1]))
    best = min((c for c in cands if c.k <= uniform), key=lambda c: (c.error(uniform), c.k))
    return formats.with_adapter(best.compressed, best.adapter.first(uniform))


def compensate_tree(dense: Any, compressed: Any, stats: Any, comp: Compensator) -> Any:
  """Applies ``comp`` to every compressed block linear of ``compressed`` after the fact, from
  per-block statistics ``stats[i][input_key]`` (e.g. :func:`compress.calibration.dense_statistics`
  of the calibration set: then equal to compensating inside a dense-input pipeline run). Lets
  several compensations share one compression (sweeps of rank, shrinkage, method)."""
  if comp.method == 'srr':
    raise ValueError('SRR re-quantizes the weights: run it inside the compression pipeline')
  leaves = {}
  for path, leaf in tree.linear_leaves(compressed).items():
    if not isinstance(leaf, formats.CompressedLinear):
      continue
    i, lin = tree.split_path(path)
    w = jnp.asarray(tree.get_linear(dense['layers'][i], lin), jnp.float32)
    name = path[:-len('/kernel')]
    leaves[path] = comp(name, w, tree.strip_adapter(leaf), stats[i][llama.input_key(lin)], None,
                        None)
  return tree.replace_leaves(compressed, leaves)


def adapter_share(params: Any) -> dict[str, float]:
  """Bytes of the adapters vs the whole model (weights at their stored precision, floats at 16 bits)."""
  total = adapters = 0

  def visit(x):
    nonlocal total, adapters
    total += formats.weight_nbytes(x)
    if isinstance(x, formats.CompressedLinear) and x.adapter is not None:
      adapters += formats.weight_nbytes(x.adapter.a) + formats.weight_nbytes(x.adapter.b)

  jax.tree.map(visit, params, is_leaf=formats.is_weight_leaf)
  return {'adapter_bytes': adapters, 'model_bytes': total,
          'adapter_share': adapters / total if total else 0.0}


def adapter_params(params: Any) -> int:
  """Parameters of every adapter of the tree, ``rank * (in + out)`` each (float or quantized)."""
  return sum(ad.rank * (ad.a.shape[0] + ad.b.shape[1]) for ad in tree.adapters(params).values())


def with_svd_adapters(dense: Any, compressed: Any, rank: int) -> Any:
  """ZeroQuant-V2 / LoRC: every compressed leaf gets the rank-``rank`` SVD of its error (no data)."""
  def add(leaf, w):
    r = min(rank, *leaf.shape)
    delta = jnp.asarray(w, jnp.float32) - formats.to_dense(leaf)
    return dataclasses.replace(leaf, adapter=lowrank.svd_compensate(delta, r))
  return tree.map_compressed(add, compressed, dense)


def truncate_adapters(params: Any, rank: int) -> Any:
  """Keeps the first ``rank`` components of every float adapter.

  SVD and EoRA adapters are ordered by singular value, so the truncation of a rank-R result is
  exactly the rank-``rank`` result (Eckart-Young): one compensation pass serves a whole rank sweep.
  """
  def cut(leaf):
    if leaf.adapter is None:
      return leaf
    return dataclasses.replace(leaf, adapter=leaf.adapter.first(min(rank, leaf.adapter.rank)))
  return tree.map_compressed(cut, params)


def quantize_adapters(params: Any, bits: int, group_size: int = 64) -> Any:
  """Quantizes every adapter of the tree to ``bits`` (group-wise RTN)."""
  def q(leaf):
    if leaf.adapter is None or bits == 16:
      return leaf
    return dataclasses.replace(leaf, adapter=lowrank.quantize_adapter(leaf.adapter, bits, group_size))
  return tree.map_compressed(q, params)
