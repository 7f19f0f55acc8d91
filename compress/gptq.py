"""GPTQ: one-shot weight quantization with second-order error feedback.

Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, https://arxiv.org/abs/2210.17323.
Reference implementation followed: IST-DASLab/gptq ``gptq.py GPTQ.fasterquant`` (with the quantizer
of its ``quant.py``, here :mod:`compress.quantize`). Same naming as the reference inside
(``W [out, in]``, columns = input features, ``Hinv``, ``W1``, ``Q1``, ``Err1``); the public
functions take and return Flax-layout ``[in, out]`` weights and transpose at the boundary.

The algorithm, as in the reference:

1. Dead inputs (``H_ii == 0``) get ``H_ii = 1`` and their weights are zeroed.
2. act-order: columns are permuted by decreasing ``diag(H)``.
3. ``H += damp * mean(diag(H)) * I``; ``Hinv`` = upper Cholesky factor of ``H^-1`` (computed with
   one Cholesky factorization, see :func:`damped_inverse_cholesky`). If the factorization fails
   (NaN), ``damp`` is multiplied by 10 (0 becomes the reference default 0.01) and it is retried, up
   to ``max_damp_retries`` times; :class:`GPTQInfo` records the retries and the final ``damp``.
4. Lazy batches of ``block_size`` columns: inside a batch every column is quantized in turn and its
   error ``(w - q) / Hinv_ii`` is propagated to the batch's remaining columns through row ``i`` of
   ``Hinv``; the batch's accumulated error is then applied to all later columns at once.
5. Groups (``group_size != -1``): the grid of a group is computed when its first column is reached,
   from the weights as they stand at the start of the current lazy batch (the reference reads
   ``W``, not the batch copy ``W1``; the two agree when ``group_size`` is a multiple of
   ``block_size``). With act-order, groups are consecutive in the *permuted* order and ``g_idx``
   maps each input row (original order) to its group. ``static_groups`` computes all grids up
   front from the (dead-zeroed) original weights with groups consecutive in the original order, so
   act-order then needs no ``g_idx``. With ``group_size == -1`` the single grid per output unit is
   computed from ``W`` before dead inputs are zeroed, as the reference does. A ``group_size`` that
   does not divide ``in`` leaves a shorter last group (``ceil(in / group_size)`` groups, column
   ``i`` in group ``i // group_size``) whose grid is fitted to its own columns only, as the
   reference's slice ``W[:, i:i + groupsize]`` is at the end of the matrix.
6. ``loss`` is the reference's printed error ``sum((w - q)^2 / Hinv_ii^2) / 2``, which equals
   ``trace(D (H + damp I) D^T) / 2`` for the final error ``D``: it is in the units of the given
   ``H`` (the reference accumulates ``H = 2 X^T X / n``).

Asymmetric calibration (GPTAQ: Li, Yin, Lee, Xiao, Panda, "GPTAQ: Efficient Finetuning-Free
Quantization for Asymmetric Calibration", ICML 2025, https://arxiv.org/abs/2504.02692; reference
code Intelligent-Computing-Lab-Yale/GPTAQ ``gptaq_utils.py GPTAQ.fasterquant``), given ``cross``
``= sum_t (x_dense_t - x_t)^T x_t`` (``[in, in]``, the statistics' ``LinearStats.cross``) and
``alpha``: the target is the dense layer's output on the dense inputs, ``X W``, reached from the
compressed inputs ``X~`` (those ``H`` describes). When column ``i`` (current value ``w_i``) is
quantized, its share of the asymmetry, ``w_i (x_dense_i - x_i)``, is regressed on the inputs of the
columns not yet quantized and added to them:
``alpha * w_i * cross[i, i+1:] @ inv(H[i+1:, i+1:])`` (damped ``H``, processing order). All rows
of these regressions come from the Cholesky factor at once:
``P = alpha * triu(cross @ Hinv^T, 1) @ Hinv`` (the inverse of a trailing block of ``H`` is
``Hinv[k:, k:]^T Hinv[k:, k:]``), and the sweep subtracts ``err_i Hinv[i, :] - w_i P[i, :]``
instead of ``err_i Hinv[i, :]``. The lazy batch update uses the same ``w_i`` (the reference uses
the batch's quantized values there, which makes its result depend on ``block_size``; here the
result is the column-by-column update whatever the batch size). With act-order ``cross`` is
permuted like ``H`` (both of its indices are input channels). ``cross = 0`` gives GPTQ exactly.

``mask`` (bool ``[in, out]``, True = kept) is SparseGPT's joint prune + quantize sweep: a weight
outside the mask gets the grid's zero point as its code (it dequantizes to exactly 0) and its current value,
zero if the weight was already pruned, is compensated through the error feedback like any
quantization error. Group grids are fitted to the kept weights.

Everything is traceable: the driver jits one matrix with the statics bound, e.g.
``jax.jit(functools.partial(gptq, spec=spec, block_size=128, act_order=True))(w, h)``. The lazy
batches are a ``lax.fori_loop`` (the columns are zero-padded to whole batches) and the columns
inside a batch a nested ``lax.fori_loop`` whose body is vectorised over output units, so compile
time does not grow with ``in_features``. GPTQ treats output units independently given ``H``, so
layers that share an input (q/k/v, gate/up) can be quantized in one call on their weights
concatenated along the output axis, sharing one factorization of ``H``.
"""

from __future__ import annotations

import functools
import logging

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from compress.calibration import check_weight_hessian
from compress.quantize import compute_qparams, group_qparams, quantize_codes
from kernels.formats import QuantizedWeight, QuantSpec

_HIGHEST = jax.lax.Precision.HIGHEST
# GPTAQ's weight of the asymmetric term: the reference code's default.
DEFAULT_ALPHA = 0.25


@flax.struct.dataclass
class GPTQInfo:
  """Diagnostics of one GPTQ call (all scalar arrays, so it can leave a ``jit``).

  Attributes:
    loss: float32, the reference's ``sum((w - q)^2 / Hinv_ii^2) / 2``.
    damp: float32, the relative damping finally used (fraction of ``mean(diag(H))``).
    retries: int32, how many times the damping was raised because a Cholesky factorization failed.
    ok: bool, False if the factorization still failed after ``max_damp_retries`` (the returned
      weight is then meaningless).
  """
  loss: jax.Array
  damp: jax.Array
  retries: jax.Array
  ok: jax.Array


def damped_inverse_cholesky(
    hessian: jax.Array, damp: float = 0.01,
    max_retries: int = 5) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Upper Cholesky factor of ``(H + damp * mean(diag(H)) I)^-1``, raising ``damp`` on failure.

  The reference computes ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``. The same factor
  (Cholesky factors are unique) comes from one factorization of the index-reversed matrix: with
  ``J`` the reversal permutation and ``J H J = L L^T``, ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and
  ``J L^-1 J`` is upper triangular with a positive diagonal. If the factorization fails (NaN, or a
  non-positive pivot), ``damp`` is multiplied by 10 (a zero ``damp`` becomes 0.01) up to
  ``max_retries`` times. Shared by GPTQ and SparseGPT.

  Args:
    hessian: symmetric ``[n, n]`` (dead inputs already fixed by the caller).
    damp: relative dampening, a fraction of ``mean(diag(H))``.
    max_retries: how many times the damping may be raised.

  Returns:
    ``(Hinv [n, n] upper triangular, final damp, retries (int32), ok (bool))``.
  """
  H = jnp.asarray(hessian, jnp.float32)
  n = H.shape[0]
  eye = jnp.eye(n, dtype=jnp.float32)
  # mean |diag| equals the reference's mean(diag) for any PSD H and keeps the damping positive for
  # an invalid (indefinite) input.
  mean_diag = jnp.mean(jnp.abs(jnp.diag(H)))
  H_rev = H[::-1, ::-1]

  def attempt(pd):
    # LAPACK's (cuSOLVER's) factorization reads one triangle; H is symmetric. A failed one is NaN.
    # (On 2 CPU cores, jax 0.10, it took 0.35x the time of a blocked factorization in a
    # fori_loop at n = 1536; a blocked triangular inverse saved less than its compile time.)
    L = jax.lax.linalg.cholesky(H_rev + (pd * mean_diag) * eye, symmetrize_input=False)
    return jax.lax.linalg.triangular_solve(L, eye, left_side=True, lower=True)[::-1, ::-1]

  def good(U):
    return jnp.all(jnp.isfinite(U)) & jnp.all(jnp.diag(U) > 0)

  def cond(carry):
    U, _, tries = carry
    return (~good(U)) & (tries <= max_retries)

  def body(carry):
    _, pd, tries = carry
    pd = jnp.where(tries == 0, pd, jnp.where(pd > 0, pd * 10.0, 0.01))
    return attempt(pd), pd, tries + 1

  # One traced attempt inside the loop (tries = 0 is the first factorization, not a retry).
  init = (jnp.full((n, n), jnp.nan, jnp.float32), jnp.asarray(damp, jnp.float32),
          jnp.zeros((), jnp.int32))
  U, pd, tries = jax.lax.while_loop(cond, body, init)
  return U, pd, tries - 1, good(U)


def asymmetric_update(cross: jax.Array, Hinv: jax.Array, alpha: float) -> jax.Array:
  """GPTAQ's ``P = alpha * triu(cross @ Hinv^T, 1) @ Hinv`` ``[n, n]`` (strictly upper
  triangular): row ``i`` holds ``alpha * cross[i, i+1:] @ inv(H[i+1:, i+1:])`` for the upper
  Cholesky factor ``Hinv`` of ``H^-1`` (processing order). Shared by GPTQ and SparseGPT."""
  C = jnp.asarray(cross, jnp.float32)
  T = jnp.triu(jnp.matmul(C, Hinv.T, precision=_HIGHEST), 1)
  return jnp.asarray(alpha, jnp.float32) * jnp.matmul(T, Hinv, precision=_HIGHEST)


def check_cross(cross, n_in: int, alpha, method: str) -> None:
  """Raises ValueError unless ``cross`` is ``[n_in, n_in]`` and ``alpha`` a non-negative number
  (a traced scalar is taken as it is)."""
  if tuple(cross.shape) != (n_in, n_in):
    raise ValueError(f'{method}: cross term of shape {tuple(cross.shape)} does not match a weight '
                     f'with {n_in} inputs (expected ({n_in}, {n_in})).')
  if isinstance(alpha, jax.Array) and alpha.ndim == 0:
    return
  if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha >= 0):
    raise ValueError(f'{method}: alpha must be a finite number >= 0, got {alpha!r}.')


def _check_args(w, hessian, spec, block_size, mask, max_damp_retries, cross=None,
                alpha=DEFAULT_ALPHA):
  if not isinstance(spec, QuantSpec):
    raise ValueError(f'spec must be a QuantSpec, got {type(spec).__name__}.')
  n_in = check_weight_hessian(w, hessian, 'gptq')
  if cross is not None:
    check_cross(cross, n_in, alpha, 'gptq')
  if mask is not None and mask.shape != w.shape:
    raise ValueError(f'gptq: mask of shape {mask.shape} does not match the weight {w.shape}.')
  if block_size <= 0:
    raise ValueError(f'block_size must be positive, got {block_size}.')
  if max_damp_retries < 0:
    raise ValueError(f'max_damp_retries must be >= 0, got {max_damp_retries}.')


def _gptq_core(w, hessian, spec, block_size, damp, act_order, static_groups, mask,
               max_damp_retries, cross=None, alpha=DEFAULT_ALPHA):
  """Returns ``(codes [in, out] int32, scales [G, out], zeros [G, out], g_idx | None, info)``."""
  w = jnp.asarray(w)
  hessian = jnp.asarray(hessian)
  cross = None if cross is None else jnp.asarray(cross, jnp.float32)
  _check_args(w, hessian, spec, block_size, mask, max_damp_retries, cross, alpha)
  n_in, n_out = w.shape
  columns = n_in
  grouped = spec.group_size != -1
  groupsize = spec.group_len(n_in)
  n_groups = spec.num_groups(n_in)
  static_groups = static_groups and grouped  # the reference ignores it without groups

  W = jnp.asarray(w, jnp.float32).T  # [out, in]
  H = jnp.asarray(hessian, jnp.float32)  # [in, in]
  M = None if mask is None else jnp.asarray(mask, bool).T  # [out, in]

  def kept(Wg, Mg):  # grids are fitted to the kept weights only
    return Wg if Mg is None else jnp.where(Mg, Wg, 0.0)

  if not grouped:
    # [out]; from W before dead inputs are zeroed, as the reference does.
    scale, zero = compute_qparams(kept(W, M), spec, axis=1)
    scales, zeros = scale[None], zero[None]  # [1, out]

  dead = jnp.diag(H) == 0  # [in]
  H = H + jnp.diag(dead.astype(jnp.float32))  # H[dead, dead] = 1
  W = jnp.where(dead[None, :], 0.0, W)
  C = None if cross is None else jnp.where(dead[None, :], 0.0, cross)  # as the reference does

  if static_groups:
    # The reference's find_params(W[:, i:i + groupsize]) for i in range(0, columns, groupsize):
    # consecutive slices of the original order, the last one shorter when groupsize does not
    # divide the columns.
    scales, zeros = group_qparams(kept(W, M).T, spec)  # [G, out]
  elif grouped:
    scales = jnp.zeros((n_groups, n_out), jnp.float32)
    zeros = jnp.zeros((n_groups, n_out), jnp.float32)

  perm = invperm = None
  if act_order:
    perm = jnp.argsort(-jnp.diag(H), stable=True)  # decreasing diag(H)
    invperm = jnp.argsort(perm)
    W = W[:, perm]
    H = H[perm][:, perm]
    if C is not None:
      C = C[perm][:, perm]
    if M is not None:
      M = M[:, perm]

  # Group of each column in processing order.
  if not grouped:
    gcol = jnp.zeros((columns,), jnp.int32)
  elif static_groups and act_order:
    gcol = (perm // groupsize).astype(jnp.int32)
  else:
    gcol = jnp.asarray(np.arange(columns) // groupsize, jnp.int32)

  Hinv, percdamp, retries, ok = damped_inverse_cholesky(H, damp, max_damp_retries)
  P = None if C is None else asymmetric_update(C, Hinv, alpha)  # [in, in], processing order

  # Pad the columns to whole lazy batches so that one fori_loop body serves every batch. A padded
  # column has weight 0, Hinv = identity (no coupling to real columns) and a dummy grid (index
  # n_groups: scale 1, zero 0), so it quantizes to 0 with zero error and changes nothing. The
  # padding also covers whole groups, so that the slice of a shorter last group is never
  # clamped; its grid reads only its real columns (see block()).
  blocksize = min(block_size, columns)
  n_blocks = -(-columns // blocksize)
  padded = max(n_blocks * blocksize, n_groups * groupsize if grouped else 0)
  pad = padded - columns
  W = jnp.pad(W, ((0, 0), (0, pad)))
  Hinv = jnp.pad(Hinv, ((0, pad), (0, pad))) + jnp.diag(
      jnp.asarray(np.arange(padded) >= columns, jnp.float32))
  gcol = jnp.pad(gcol, (0, pad), constant_values=n_groups)
  if P is not None:
    P = jnp.pad(P, ((0, pad), (0, pad)))  # padded columns take and give no asymmetric term
  if M is not None:
    M = jnp.pad(M, ((0, 0), (0, pad)), constant_values=True)
  scales = jnp.concatenate([scales, jnp.ones((1, n_out), jnp.float32)])  # [G + 1, out]
  zeros = jnp.concatenate([zeros, jnp.zeros((1, n_out), jnp.float32)])
  # At most this many groups start inside one lazy batch.
  groups_per_block = -(-blocksize // groupsize)

  def column(i, carry, Hinv1, g1, M1, P1, scales, zeros):
    # GPTAQ carries A1 too: each column's weight just before it was quantized.
    W1, Q1, Err1, loss, *A1 = carry
    w = jax.lax.dynamic_index_in_dim(W1, i, axis=1, keepdims=False)  # [out]
    h_row = jax.lax.dynamic_index_in_dim(Hinv1, i, axis=0, keepdims=False)  # [blocksize]
    d = h_row[i]
    g = g1[i]
    scale, zero = scales[g], zeros[g]  # [out]
    code = quantize_codes(w, scale, zero, spec.bits)
    if M1 is not None:
      code = jnp.where(jax.lax.dynamic_index_in_dim(M1, i, axis=1, keepdims=False), code, zero)
    q = (code - zero) * scale
    err1 = (w - q) / d
    loss = loss + jnp.sum(err1 * err1)
    # Hinv1[i, :i] == 0, so updating the whole batch equals the reference's W1[:, i:] update.
    if P1 is None:
      W1 = W1 - err1[:, None] * h_row[None, :]
    else:  # GPTAQ: w's asymmetric share goes to the later columns too (P1[i, :i + 1] == 0)
      p_row = jax.lax.dynamic_index_in_dim(P1, i, axis=0, keepdims=False)  # [blocksize]
      W1 = W1 - err1[:, None] * h_row[None, :]
      W1 = W1 + w[:, None] * p_row[None, :]
      A1 = [jax.lax.dynamic_update_index_in_dim(A1[0], w, i, axis=1)]
    Q1 = jax.lax.dynamic_update_index_in_dim(Q1, code, i, axis=1)
    Err1 = jax.lax.dynamic_update_index_in_dim(Err1, err1, i, axis=1)
    return (W1, Q1, Err1, loss, *A1)

  def block(b, carry):
    W, Q, scales, zeros, loss = carry
    i1 = b * blocksize
    i2 = jnp.minimum(i1 + blocksize, columns)
    if grouped and not static_groups:
      # Grids of the groups that start inside this batch, from W as it stands at the batch start
      # (the reference's find_params(W[:, (i1 + i):(i1 + i + groupsize)])).
      g0 = (i1 + groupsize - 1) // groupsize
      for k in range(groups_per_block):
        g = g0 + k
        start = g * groupsize
        valid = start < i2
        Wg = jax.lax.dynamic_slice_in_dim(W, start, groupsize, axis=1)  # [out, groupsize]
        Mg = None if M is None else jax.lax.dynamic_slice_in_dim(M, start, groupsize, axis=1)
        Wg = kept(Wg, Mg)
        if n_groups * groupsize > columns:
          # The shorter last group: its grid comes from its own columns. The slice's columns
          # past the last real one repeat the group's first column (always real), which leaves
          # any min/max grid unchanged.
          real = (start + jnp.arange(groupsize)) < columns
          Wg = jnp.where(real[None, :], Wg, Wg[:, :1])
        scale, zero = compute_qparams(Wg, spec, axis=1)
        g_safe = jnp.where(valid, g, n_groups)  # invalid: rewrite the dummy grid unchanged
        scales = scales.at[g_safe].set(jnp.where(valid, scale, scales[g_safe]))
        zeros = zeros.at[g_safe].set(jnp.where(valid, zero, zeros[g_safe]))

    W1 = jax.lax.dynamic_slice_in_dim(W, i1, blocksize, axis=1)  # [out, blocksize]
    Hrows = jax.lax.dynamic_slice_in_dim(Hinv, i1, blocksize, axis=0)  # [blocksize, padded]
    Hinv1 = jax.lax.dynamic_slice_in_dim(Hrows, i1, blocksize, axis=1)  # [blocksize, blocksize]
    g1 = jax.lax.dynamic_slice_in_dim(gcol, i1, blocksize)
    M1 = None if M is None else jax.lax.dynamic_slice_in_dim(M, i1, blocksize, axis=1)
    Prows = P1 = None
    if P is not None:
      Prows = jax.lax.dynamic_slice_in_dim(P, i1, blocksize, axis=0)  # [blocksize, padded]
      P1 = jax.lax.dynamic_slice_in_dim(Prows, i1, blocksize, axis=1)
    body = functools.partial(column, Hinv1=Hinv1, g1=g1, M1=M1, P1=P1, scales=scales, zeros=zeros)
    init = (W1, jnp.zeros_like(W1), jnp.zeros_like(W1), loss)
    if P is not None:
      init += (jnp.zeros_like(W1),)
    _, Q1, Err1, loss, *A1 = jax.lax.fori_loop(0, blocksize, body, init)
    Q = jax.lax.dynamic_update_slice_in_dim(Q, Q1, i1, axis=1)
    # The reference's W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]. Hrows is zero left of the batch; the
    # batch's own columns of W also change here, but they are never read again.
    if P is None:
      W = W - jnp.matmul(Err1, Hrows, precision=_HIGHEST)
    else:  # Prows is zero left of and on the diagonal, like Hrows
      W = W - jnp.matmul(Err1, Hrows, precision=_HIGHEST)
      W = W + jnp.matmul(A1[0], Prows, precision=_HIGHEST)
    return W, Q, scales, zeros, loss

  init = (W, jnp.zeros_like(W), scales, zeros, jnp.zeros((), jnp.float32))
  if n_blocks == 1:
    _, Q, scales, zeros, loss = block(0, init)
  else:
    _, Q, scales, zeros, loss = jax.lax.fori_loop(0, n_blocks, block, init)
  Q = Q[:, :columns]  # [out, in] codes, processing order
  scales, zeros = scales[:n_groups], zeros[:n_groups]
  g_idx = None
  if act_order:
    Q = Q[:, invperm]
    if grouped and not static_groups:
      g_idx = gcol[:columns][invperm]
  codes = Q.T.astype(jnp.int32)  # [in, out]
  info = GPTQInfo(loss=loss / 2, damp=percdamp, retries=retries, ok=ok)
  return codes, scales, zeros, g_idx, info


def report(info: GPTQInfo, name: str = '') -> None:
  """Eagerly: raise on a failed factorization and log damping retries. No-op under a trace."""
  try:
    ok = bool(info.ok)
    retries = int(info.retries)
  except jax.errors.ConcretizationTypeError:
    return  # traced: the caller reads info.ok / info.retries
  if not ok:
    raise ValueError(
        f'gptq{" " + name if name else ""}: the Cholesky factorization of the damped Hessian failed after {retries} damping '
        f'retries (final damp {float(info.damp):g} x mean(diag(H))); the Hessian is not positive '
        'semi-definite or holds NaN/Inf.')
  if retries:
    logging.warning('gptq %s: Cholesky failed; damp raised %d time(s) to %g x mean(diag(H)).', name,
                    retries, float(info.damp))


def _dequantize_codes(codes, scales, zeros, g):
  """Same arithmetic as ``kernels.formats.dequantize``, so both give bit-identical results."""
  return (codes.astype(jnp.float32) - zeros[g].astype(jnp.float32)) * scales[g].astype(jnp.float32)


def gptq(w: jax.Array, hessian: jax.Array, spec: QuantSpec, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
         mask: jax.Array | None = None, max_damp_retries: int = 5,
         cross: jax.Array | None = None,
         alpha: float = DEFAULT_ALPHA) -> tuple[QuantizedWeight, GPTQInfo]:
  """Quantizes ``w`` with GPTQ.

  Args:
    w: weight ``[in, out]`` (Flax layout).
    hessian: ``X^T X`` ``[in, in]`` of the layer's calibration inputs (any positive scale).
    spec: quantization grid (bits, group size along the input axis, symmetric).
    block_size: lazy-batch size (the reference's ``blocksize``).
    damp: relative dampening (the reference's ``percdamp``).
    act_order: process input rows by decreasing ``diag(H)`` (the reference's ``actorder``).
    static_groups: compute all group grids from the original weights before any update.
    mask: optional bool ``[in, out]``, True = kept; the rest quantize to exactly zero.
    max_damp_retries: how many times to raise ``damp`` x10 when a Cholesky factorization fails.
    cross: optional ``[in, in]`` ``sum_t (x_dense_t - x_t)^T x_t`` (``LinearStats.cross``): GPTAQ,
      the asymmetric target ``X W`` from the inputs ``X~`` that ``hessian`` describes.
    alpha: GPTAQ's weight of the asymmetric term (the reference's default 0.25; 0 is GPTQ).

  Returns:
    ``(QuantizedWeight, GPTQInfo)``. ``g_idx`` is set only for act-order with dynamic groups (the
    only case where groups are not consecutive input rows). Eagerly, a factorization that still
    fails raises ValueError; under ``jit`` check ``info.ok``.
  """
  codes, scales, zeros, g_idx, info = _gptq_core(w, hessian, spec, block_size, damp, act_order,
                                                 static_groups, mask, max_damp_retries, cross,
                                                 alpha)
  report(info)
  qw = QuantizedWeight.from_ints(codes, scales, zeros, spec, g_idx=g_idx)
  return qw, info


def gptq_dense(w: jax.Array, hessian: jax.Array, spec: QuantSpec, *, block_size: int = 128,
               damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
               mask: jax.Array | None = None, max_damp_retries: int = 5,
               cross: jax.Array | None = None,
               alpha: float = DEFAULT_ALPHA) -> tuple[jax.Array, GPTQInfo]:
  """Like :func:`gptq` but returns the dequantized float32 weight ``[in, out]`` without packing.

  The result equals ``dequantize(gptq(...)[0])`` exactly.
  """
  codes, scales, zeros, g_idx, info = _gptq_core(w, hessian, spec, block_size, damp, act_order,
                                                 static_groups, mask, max_damp_retries, cross,
                                                 alpha)
  report(info)
  n_in = codes.shape[0]
  g = g_idx if g_idx is not None else jnp.asarray(np.arange(n_in) // spec.group_len(n_in))
  return _dequantize_codes(codes, scales, zeros, g), info
