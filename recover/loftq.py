"""LoftQ initialisation (Li et al. 2023, https://arxiv.org/abs/2310.08659): a compressed base and a
rank-r adapter fitted together by alternation, so that ``base + a b`` starts close to the dense
weight. The closed-form low-rank compensations (SVD, EoRA, SRR) are in :mod:`recover.lowrank`;
LoftQ is their alternating counterpart, used to start LoRA fine-tuning (``lora_init='loftq'``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from compress import quantize as quantize_lib
from kernels import formats
from kernels.formats import CompressedLinear, LowRank, QuantizedWeight, QuantSpec, Sparse24Weight
from models import tree
from recover import train


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def quant_spec(c: CompressedLinear) -> QuantSpec | None:
  """The grid of the whole ``[in, out]`` matrix of a quantized leaf (a 2:4 leaf's values use half
  groups), or None for a float weight."""
  w = c.weight
  if isinstance(w, QuantizedWeight):
    return w.spec
  if isinstance(w, Sparse24Weight) and isinstance(w.values, QuantizedWeight):
    v = w.values
    return QuantSpec(bits=v.bits, group_size=-1 if v.group_size == -1 else 2 * v.group_size,
                     symmetric=v.symmetric)
  return None


def loftq_dense(w: jax.Array, mask: jax.Array | None, spec: QuantSpec | None, rank: int,
                iters: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """LoftQ's alternation on dense arrays (jittable; ``spec``, ``rank``, ``iters`` static).

  ``A_0 B_0 = 0``; for ``t = 1..iters``: ``base_t = P(W - A_{t-1} B_{t-1})``, then
  ``A_t B_t = SVD_r(W - base_t)``, where ``P`` projects onto the leaf's format: RTN on ``spec``'s
  grid (fresh min/max scales per group) and/or the fixed sparsity ``mask``
  (``P(R) = mask * RTN(mask * R)``; ``mask * R`` alone for a float pruned weight, which is the exact
  minimiser). An iteration that does not lower ``||W - base - A B||_F`` is not taken: the previous
  base and adapter are kept, which stops the alternation there (RTN with fresh scales is not an
  exact projection, so LoftQ's plain alternation can go up). The errors are non-increasing.

  Args:
    w: the dense weight ``[in, out]``.
    mask: bool ``[in, out]`` of the kept weights, or None.
    spec: the quantization grid, or None for a float (pruned) weight.
    rank: adapter rank r.
    iters: alternations (>= 1).

  Returns:
    ``(r, a, b, errors)``: ``r`` the matrix whose projection is the final base (re-compress it
    to build the leaf), ``a [in, r]``, ``b [r, out]``, ``errors [iters]`` =
    ``||W - base_t - A_t B_t||_F`` after each iteration.
  """
  w = jnp.asarray(w, jnp.float32)

  def project(r):
    if mask is not None:
      r = jnp.where(mask, r, 0.0)
    if spec is not None:
      r = quantize_lib.rtn_dense(r, spec)
      if mask is not None:
        r = jnp.where(mask, r, 0.0)
    return r

  def svd_r(m):
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]

  base = project(w)
  a, b = svd_r(w - base)
  err = jnp.linalg.norm(w - base - a @ b)

  def step(carry, _):
    r, a, b, err = carry
    target = w - a @ b
    base = project(target)
    a_new, b_new = svd_r(w - base)
    err_new = jnp.linalg.norm(w - base - a_new @ b_new)
    take = err_new <= err
    pick = lambda new, old: jnp.where(take, new, old)
    carry = (pick(target, r), pick(a_new, a), pick(b_new, b), pick(err_new, err))
    return carry, carry[-1]

  (r, a, b, _), errs = jax.lax.scan(step, (w, a, b, err), None, length=iters - 1)
  return r, a, b, jnp.concatenate([err[None], errs])


@functools.lru_cache(maxsize=None)
def _loftq_jit(spec: QuantSpec | None, rank: int, iters: int, masked: bool):
  if masked:
    return jax.jit(lambda w, m: loftq_dense(w, m, spec, rank, iters))
  return jax.jit(lambda w, m: loftq_dense(w, None, spec, rank, iters))


def _rebuild(r: jax.Array, c: CompressedLinear, mask: jax.Array | None,
             spec: QuantSpec | None) -> CompressedLinear:
  """The leaf in ``c``'s format whose dense weight is :func:`loftq_dense`'s projection of ``r``."""
  if mask is not None:
    r = jnp.where(mask, r, 0.0)
  w = c.weight
  if spec is not None:
    q = quantize_lib.rtn(r, spec)
    if isinstance(w, Sparse24Weight):
      return CompressedLinear(weight=formats.sparse24_from_quantized(q, mask))
    return CompressedLinear(weight=q, mask=c.mask)
  if isinstance(w, Sparse24Weight):
    values_dtype = w.values.dtype
    s = formats.sparse24_compress(r)
    return CompressedLinear(weight=dataclasses.replace(s, values=s.values.astype(values_dtype)))
  return CompressedLinear(weight=r.astype(jnp.asarray(w).dtype), mask=c.mask)


def loftq(w: jax.Array, leaf, rank: int,
          iters: int) -> tuple[CompressedLinear, LowRank, list[float]]:
  """LoftQ initialisation of one compressed linear (see :func:`loftq_dense`).

  Quantized leaves are re-quantized with round-to-nearest on their own grid (bits, group size,
  symmetry; fresh scales; an act-order ``g_idx`` becomes contiguous groups), pruned leaves keep
  their sparsity pattern (mask or 2:4) and 2:4 + quantized leaves both. The leaf's own adapter is
  ignored.

  Args:
    w: the dense weight ``[in, out]`` the leaf was compressed from.
    leaf: a :class:`~kernels.formats.CompressedLinear` (quantized and/or pruned).
    rank: adapter rank in ``[1, min(in, out)]``.
    iters: alternations (>= 1).

  Returns:
    ``(base leaf in the same format, LowRank(a, b), errors)`` where ``errors[t]`` is
    ``||W - base - a b||_F`` after iteration ``t + 1`` (non-increasing).
  """
  if not isinstance(leaf, CompressedLinear):
    raise ValueError(f'LoftQ needs a compressed leaf (CompressedLinear), got {type(leaf).__name__}')
  c = tree.strip_adapter(leaf)
  w = jnp.asarray(w, jnp.float32)
  if tuple(w.shape) != tuple(c.shape):
    raise ValueError(f'LoftQ: dense weight shape {tuple(w.shape)} does not match the leaf shape '
                     f'{tuple(c.shape)}')
  if not _is_int(rank) or not 0 < rank <= min(c.shape):
    raise ValueError(f'LoftQ rank must be an int in [1, {min(c.shape)}], got {rank!r}')
  if not _is_int(iters) or iters <= 0:
    raise ValueError(f'LoftQ iters must be a positive int, got {iters!r}')
  spec = quant_spec(c)
  mask = train.sparsity_mask(c)
  if spec is None and mask is None:
    raise ValueError('LoftQ needs a quantized or pruned leaf; this one holds a dense float weight')
  r, a, b, errors = _loftq_jit(spec, int(rank), int(iters), mask is not None)(w, mask)
  base = _rebuild(r, c, mask, spec)
  return base, LowRank(a=a, b=b), [float(e) for e in np.asarray(errors)]
