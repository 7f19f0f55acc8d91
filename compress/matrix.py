"""One matrix at a time: compress a ``[in, out]`` weight by its spec, measure the result, and the
protocol through which recovery adds a correction right after.

:func:`compress_matrix` is the dispatch from a :class:`~compress.rules.LinearSpec` to the
one-matrix numerics (Wanda, SparseGPT, magnitude pruning; RTN, GPTQ; both), each jitted once per
set of static arguments (:func:`jitted`), so a second matrix of the same shape compiles nothing.
AWQ is not here: its scale search needs the whole block (:func:`compress.awq.awq_block`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from compress import calibration
from compress import gptq as gptq_lib
from compress import prune as prune_lib
from compress import quantize
from compress import sparsegpt as sparsegpt_lib
from compress.rules import LinearSpec
from kernels import formats


class LinearRecovery(Protocol):
  """What compression calls right after each linear is compressed (e.g. EoRA, see
  :class:`recover.compensate.Compensator`): returns the leaf with a correction added.

  ``w`` is the dense ``[in, out]`` target, ``stats`` the compression pass's statistics of its
  input, ``aux_stats`` those of a separate recovery set (or None). ``changes_weights``: the result
  also replaces the compressed weight (SRR), so the next block's inputs must come from it.
  ``fingerprint``: a string naming the settings (part of a resumable run's identity).
  """
  changes_weights: bool
  fingerprint: str

  def __call__(self, name: str, w: jax.Array, leaf: Any, stats: calibration.LinearStats,
               aux_stats: calibration.LinearStats | None, spec: LinearSpec) -> Any:
    ...


@dataclasses.dataclass
class LayerReport:
  """One row of the per-layer report."""
  name: str
  method: str
  rel_error: float           # ||X W - X W_hat|| / ||X W|| on the calibration inputs
  sparsity: float            # fraction of exact zeros in the effective weight
  bits: float                # weight bits (16 = float)
  seconds: float             # numerics time of this layer
  rel_error_recovered: float | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Wall time of the layer's block (statistics, numerics, recovery, propagation) split evenly
  # over its linears: summed over a run, the compression's wall time across interruptions.
  wall_seconds: float = 0.0


@functools.lru_cache(maxsize=None)
def _jit_cached(fn, statics: tuple):
  return jax.jit(functools.partial(fn, **dict(statics)))


def jitted(fn, **statics):
  """``jax.jit(partial(fn, **statics))``, built once per ``(fn, statics)`` (statics hashable)."""
  return _jit_cached(fn, tuple(sorted(statics.items())))


def needs_full_hessian(spec: LinearSpec) -> bool:
  """Whether ``spec`` reads more of ``H`` than its diagonal (GPTQ, SparseGPT, AWQ); Wanda,
  magnitude pruning and RTN read at most ``diag(H)``."""
  return spec.quant in ('gptq', 'awq') or spec.prune == 'sparsegpt'


def _check(w_shape: tuple[int, ...], stats: calibration.LinearStats | None, spec: LinearSpec,
           name: str, grad_shape: tuple[int, ...] | None) -> None:
  """What :func:`compress_matrix` refuses before any work (one ``[in, out]`` matrix)."""
  spec.check_shape(tuple(w_shape), name)
  if stats is not None and needs_full_hessian(spec):
    calibration.require_full(stats, f'{name}: {spec.describe()}')
  if spec.asymmetric and (stats is None or stats.cross is None):
    raise ValueError(f'{name}: {spec.describe()} needs the cross term of the dense and the '
                     'compressed inputs (LinearStats.cross), which only a run that propagates '
                     'both streams collects')
  if spec.prune == 'wanda++' and (grad_shape is None or tuple(grad_shape) != tuple(w_shape)):
    raise ValueError(f'{name}: wanda++ needs the regional gradient of the weight '
                     f'{tuple(w_shape)} (compress.regional.regional_gradients)')


def _numerics(w: jax.Array, h: jax.Array | None, cross: jax.Array | None,
              grad: jax.Array | None, spec: LinearSpec) -> tuple[Any, Any, Any]:
  """The one-matrix numerics of ``spec`` on checked inputs, a pure function of arrays (so
  :func:`compress_matrices` maps it over a stack of matrices): ``(weight, mask, info)`` with the
  pruned float weight or the :class:`~kernels.formats.QuantizedWeight`, the mask (None when
  nothing is pruned) and GPTQ's factorization info (None for the other methods).
  :func:`_leaf` makes the param-tree leaf of them."""
  w = jnp.asarray(w, jnp.float32)
  asym_statics, asym_args = {}, {}
  if spec.asymmetric:
    asym_statics, asym_args = {'alpha': spec.asymmetric_alpha}, {'cross': cross}
  mask = None
  w_work = w
  sp = spec.sparsity
  if spec.prune == 'sparsegpt':
    if spec.quant == 'gptq':
      qw, mask = jitted(sparsegpt_lib.sparsegpt_quant, spec=sp, quant=spec.qspec,
                        block_size=spec.block_size, percdamp=spec.damp,
                        **asym_statics)(w, h, **asym_args)
      return qw, mask, None
    w_work, mask = jitted(sparsegpt_lib.sparsegpt, spec=sp, block_size=spec.block_size,
                          percdamp=spec.damp, **asym_statics)(w, h, **asym_args)
  elif spec.prune == 'wanda':
    w_work, mask = jitted(prune_lib.wanda, spec=sp)(w, h)
  elif spec.prune == 'wanda++':
    w_work, mask = jitted(prune_lib.wandapp, spec=sp, alpha=spec.wandapp_alpha)(
        w, h, jnp.asarray(grad, jnp.float32))
  elif spec.prune == 'magnitude':
    w_work, mask = jitted(prune_lib.magnitude, spec=sp)(w)

  if spec.quant == 'none':
    return w_work, mask, None
  if spec.quant == 'rtn':
    return jitted(quantize.rtn, spec=spec.qspec)(w_work), mask, None
  if spec.quant == 'gptq':
    qw, ginfo = jitted(gptq_lib.gptq, spec=spec.qspec, block_size=spec.block_size, damp=spec.damp,
                       act_order=spec.act_order, static_groups=spec.static_groups,
                       **asym_statics)(w_work, h, mask=mask, **asym_args)
    return qw, mask, ginfo
  raise ValueError(f'{spec.quant} is applied per block, not per matrix')


def _leaf(weight, mask, spec: LinearSpec) -> formats.CompressedLinear:
  """The param-tree leaf of :func:`_numerics`' result (2:4 patterns packed)."""
  if spec.quant == 'none':
    return prune_lib.make_sparse_leaf(weight, mask, spec.sparsity)
  return _finish(weight, mask, spec)


def compress_matrix(w: jax.Array, stats: calibration.LinearStats | None, spec: LinearSpec,
                    name: str = '', grad: jax.Array | None = None
                    ) -> tuple[formats.CompressedLinear, dict[str, Any]]:
  """Compresses one ``[in, out]`` weight by ``spec`` (AWQ excepted: it needs the block).

  Returns the leaf and a dict of method details (e.g. GPTQ damping retries). An asymmetric spec
  (GPTAQ) reads ``stats.cross`` in its one GPTQ or SparseGPT sweep (SparseGPT + GPTQ is one joint
  sweep; a Wanda or magnitude mask goes into GPTQ's sweep). ``grad``: Wanda++'s regional
  gradient ``[in, out]`` (:func:`compress.regional.regional_gradients`), which it needs.
  """
  _check(w.shape, stats, spec, name, None if grad is None else grad.shape)
  weight, mask, ginfo = _numerics(w, None if stats is None else stats.hessian,
                                  None if stats is None else stats.cross, grad, spec)
  leaf = _leaf(weight, mask, spec)
  info: dict[str, Any] = {}
  if ginfo is not None:
    gptq_lib.report(ginfo, name)
    info['gptq_damp_retries'] = int(ginfo.retries)
  return leaf, info


def compress_matrices(ws: jax.Array, stats: calibration.LinearStats | None, spec: LinearSpec,
                      names: list[str], grads: jax.Array | None = None
                      ) -> tuple[list[formats.CompressedLinear], list[dict[str, Any]]]:
  """:func:`compress_matrix` on a stack of ``E`` independent problems at once (the experts of a
  mixture): ``ws [E, in, out]``, ``stats`` whose arrays have a leading ``E`` axis (each its own
  ``H``), ``names`` one per problem, ``grads [E, in, out]`` for Wanda++. The numerics run as one
  program mapped over ``E`` (``jax.vmap``), so a stack split along ``E`` over the devices
  (:func:`models.sharding.stacked`) is solved on all of them at once. Returns one leaf and one
  info dict per problem, as :func:`compress_matrix` gives them."""
  if len(names) != ws.shape[0]:
    raise ValueError(f'{ws.shape[0]} matrices but {len(names)} names')
  for name in names:
    _check(ws.shape[1:], stats, spec, name, None if grads is None else grads.shape[1:])
  fn = jitted(_stacked_numerics, spec=spec)
  weights, masks, ginfos = fn(ws, None if stats is None else stats.hessian,
                              None if stats is None else stats.cross, grads)
  out_leaves, infos = [], []
  for e, name in enumerate(names):
    take = lambda tree, e=e: jax.tree.map(lambda x: x[e], tree)  # noqa: E731  expert e's part
    out_leaves.append(_leaf(take(weights), take(masks), spec))
    info: dict[str, Any] = {}
    if ginfos is not None:
      ginfo = take(ginfos)
      gptq_lib.report(ginfo, name)
      info['gptq_damp_retries'] = int(ginfo.retries)
    infos.append(info)
  return out_leaves, infos


def _stacked_numerics(ws, hs, crosses, grads, *, spec: LinearSpec):
  return jax.vmap(functools.partial(_numerics, spec=spec))(ws, hs, crosses, grads)


def spec_of_leaf(leaf: formats.CompressedLinear) -> LinearSpec:
  """The spec that describes a compressed leaf made elsewhere (e.g. imported from a GPTQ or
  compressed-tensors checkpoint): its pattern and grid. The methods are stand-ins (``magnitude``
  for a pattern, ``rtn``, or ``gptq`` for act-order): what a recovery that re-compresses (SRR)
  uses on that grid."""
  w = leaf.weight
  prune, sparsity, q = 'none', None, None
  if isinstance(w, formats.Sparse24Weight):
    prune, sparsity = 'magnitude', prune_lib.PruneSpec(n=2, m=4)
    if isinstance(w.values, formats.QuantizedWeight):
      v = w.values
      q = dataclasses.replace(v.spec, group_size=-1 if v.group_size == -1 else 2 * v.group_size)
  elif isinstance(w, formats.QuantizedWeight):
    q = w.spec
  if leaf.mask is not None:
    prune = 'magnitude'
    kept = float(np.mean(np.asarray(leaf.mask)))
    sparsity = prune_lib.PruneSpec(sparsity=round(1.0 - kept, 4))
  act_order = isinstance(w, formats.QuantizedWeight) and w.g_idx is not None
  quant = 'none' if q is None else ('gptq' if act_order else 'rtn')
  return LinearSpec(prune=prune, sparsity=sparsity, quant=quant, qspec=q, act_order=act_order)


def abstract_leaf(spec: LinearSpec | None, shape: tuple[int, int], rank: int = 0) -> Any:
  """The leaf :func:`compress_matrix` (or AWQ), then a rank-``rank`` recovery, would give an
  ``[in, out]`` weight under ``spec``, with ``jax.ShapeDtypeStruct`` for every array: no work.

  What checks of a run's later stages (an export format's, say) need before any compression.
  A dense weight (``spec`` None or a no-op) is one ``ShapeDtypeStruct``.
  """
  sds = jax.ShapeDtypeStruct
  n_in, n_out = shape
  if spec is None or spec.is_noop:
    return sds(shape, jnp.float32)

  def quantized(rows: int, qspec: formats.QuantSpec, act_order: bool) -> formats.QuantizedWeight:
    groups = qspec.num_groups(rows)
    return formats.QuantizedWeight(
        qweight=sds((-(-rows // 32) * qspec.bits, n_out), jnp.int32),
        scales=sds((groups, n_out), jnp.float32), zeros=sds((groups, n_out), jnp.uint8),
        g_idx=sds((rows,), jnp.int32) if act_order else None, bits=qspec.bits,
        group_size=qspec.group_size, in_features=rows, symmetric=qspec.symmetric)

  sp = spec.sparsity
  is24 = spec.prune != 'none' and sp.is_nm and (sp.n, sp.m) == (2, 4)
  dynamic_order = spec.act_order and not spec.static_groups
  indices = sds((n_in // 2, n_out), jnp.uint8)
  mask = None
  if spec.quant == 'none':
    if is24:
      weight = formats.Sparse24Weight(values=sds((n_in // 2, n_out), jnp.float32), indices=indices)
    else:
      weight, mask = sds(shape, jnp.float32), sds(shape, jnp.bool_)
  else:
    weight = quantized(n_in, spec.qspec, dynamic_order)
    if is24 and not dynamic_order:
      half = dataclasses.replace(spec.qspec, group_size=(
          -1 if spec.qspec.group_size == -1 else spec.qspec.group_size // 2))
      weight = formats.Sparse24Weight(values=quantized(n_in // 2, half, False), indices=indices)
    elif spec.prune != 'none':
      mask = sds(shape, jnp.bool_)
  adapter = (formats.LowRank(a=sds((n_in, rank), jnp.float32), b=sds((rank, n_out), jnp.float32))
             if rank else None)
  return formats.CompressedLinear(weight=weight, mask=mask, adapter=adapter)


def _finish(qw: formats.QuantizedWeight, mask, spec: LinearSpec) -> formats.CompressedLinear:
  if mask is None:
    return formats.CompressedLinear(weight=qw)
  sp = spec.sparsity
  if sp.is_nm and (sp.n, sp.m) == (2, 4) and qw.g_idx is None:
    return formats.CompressedLinear(weight=formats.sparse24_from_quantized(qw, mask))
  return formats.CompressedLinear(weight=qw, mask=mask)


def _output_energy(w, h):
  return calibration.output_error(w, jnp.zeros_like(w), h)  # ||X W||^2


def _error_terms(w, w_hat, h):
  return _output_energy(w, h), calibration.output_error(w, w_hat, h)


def _diagonal_error_terms(w, w_hat, h):
  d = jnp.diagonal(h)[:, None]
  w = jnp.asarray(w, jnp.float32)
  return jnp.sum(d * w * w), jnp.sum(d * jnp.square(w - jnp.asarray(w_hat, jnp.float32)))


def relative_error(w, w_hat, h, diagonal: bool = False) -> float:
  """``||X W - X W_hat|| / ||X W||`` from ``H = X^T X``; ``diagonal``: from ``diag(H)`` alone
  (the input channels' correlations ignored)."""
  terms = jitted(_diagonal_error_terms if diagonal else _error_terms)(w, w_hat, h)
  return _ratio(*jax.device_get(terms))


def _ratio(base, err) -> float:
  base, err = float(base), float(err)
  return float(np.sqrt(err / base)) if base > 0 else 0.0


def _measure(w, leaf, h, *, diagonal: bool, adapter: bool):
  w_hat = formats.effective_weight(leaf) if adapter else formats.to_dense(leaf)
  base, err = (_diagonal_error_terms if diagonal else _error_terms)(w, w_hat, h)
  return base, err, jnp.sum(w_hat == 0)


def measure(w, leaf, h, diagonal: bool = False,
            adapter: bool = False) -> tuple[float, float, float]:
  """``(relative error, sparsity, ||X W||^2)`` of a weight leaf against the dense ``w``, in one
  program and one transfer (a report's numbers): the error as :func:`relative_error` gives it
  for the leaf's dense weight (with its adapter's ``a @ b`` when ``adapter``), the fraction of
  exact zeros in that weight, and the dense output energy (the error's first term)."""
  fn = jitted(_measure, diagonal=diagonal, adapter=adapter)
  base, err, zeros = jax.device_get(fn(w, leaf, h))
  return _ratio(base, err), float(zeros) / float(np.prod(w.shape)), float(base)


def recover_linear(rep: LayerReport, recovery: LinearRecovery, w, leaf, stats, aux_stats,
                   spec: LinearSpec, h) -> Any:
  """Runs ``recovery`` on one compressed linear and records its time and error in ``rep``;
  ``h`` is the Hessian the error is measured against."""
  calibration.require_full(stats, f'{rep.name}: recovery')
  t1 = time.time()
  leaf = recovery(rep.name, w, leaf, stats, aux_stats, spec)
  rep.extra['recover_seconds'] = time.time() - t1
  rep.rel_error_recovered, _, base = measure(w, leaf, h, adapter=True)
  # The dense output energy ||X W||^2 / n on the recovery's statistics (a model-wide rank budget
  # weighs the layers' errors relative to it).
  st = stats if aux_stats is None else aux_stats
  if st.hessian is not h:  # else the error's own first term is it
    base = jax.device_get(jitted(_output_energy)(w, st.hessian))
  rep.extra['output_energy'] = float(base) / max(int(st.num_tokens), 1)
  return leaf
