"""SparseGPT: one-shot pruning with OBS weight updates, optionally joint with quantization.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(2023), https://arxiv.org/abs/2301.00774. Reference implementation followed: IST-DASLab/sparsegpt
``sparsegpt.py`` (``SparseGPT.fasterprune``), with GPTQ's per-group quantizer refresh
(IST-DASLab/gptq ``gptq.py fasterquant``) for the joint mode.

The algorithm, in the paper's orientation (``W: [rows = out, columns = in]``):

1. Dead inputs (``H_ii == 0``) get ``H_ii = 1`` and their weights are zeroed.
2. ``H += percdamp * mean(diag(H)) * I``; ``Hinv`` = the upper Cholesky factor of ``H^-1``.
3. Columns are processed in blocks of ``block_size``. Inside a block column ``i`` is replaced by
   ``q`` (0 where pruned, else the weight, quantized in joint mode), the error ``err = (w - q) / d``
   with ``d = Hinv[i, i]`` is propagated to the block's later columns through row ``i`` of ``Hinv``,
   and after the block to all later columns with ``Err1 @ Hinv[block, later]``.
4. Mask selection is adaptive, on the error-updated weights, with score ``w^2 / d^2``:

   * unstructured: once per block, for the whole block;
   * N:M: every ``m`` columns, keeping the ``n`` largest scores of those ``m`` (the reference prunes
     the ``m - n`` smallest; note its ``prunen`` counts *pruned* weights, ours counts *kept* ones).

Deviations from the reference:

* The reference picks the unstructured block mask with one threshold over the whole block (all rows
  together). Here the selection is per output unit (row), so that every output unit has exactly the
  same sparsity: in block ``[i1, i2)`` each row prunes its ``int(i2 * s) - int(i1 * s)`` lowest
  scores (the set a stable sort selects). The per-block counts telescope, so every output unit has
  exactly ``int(in * s)`` pruned weights for any ``in`` and ``block_size``; when
  ``block_size * s`` is an integer every block prunes the same ``block_size * s`` per row.
* ``Hinv`` comes from GPTQ's :func:`compress.gptq.damped_inverse_cholesky` (one Cholesky of
  the index-reversed ``H``): the same matrix as the reference's
  ``cholesky(cholesky_inverse(cholesky(H)), upper=True)`` (uniqueness of the Cholesky factor) at
  about half the cost. If the factorization fails, ``percdamp`` is raised x10 and the
  factorization retried, as GPTQ does, and a warning says so.

Joint quantization (the reference's ``--wbits``): the kept weights are quantized as they are
processed (pruned ones stay exact zeros, which are on every grid). The quantization parameters of a
group are computed when its first column is reached, as GPTQ's ``fasterquant`` does (for N:M before
that column's mask choice), from the group's current weights with the pruned entries chosen so far
set to zero, which only drops pruned weights from the range. GPTQ reads
``W[:, i1 + i:i1 + i + groupsize]``, where the current block's columns are still as they were at the
block start; here they include the block's updates so far (the same whenever ``block_size`` divides
``group_size``). With ``group_size=-1`` one set per output unit is computed at column 0 (the
SparseGPT reference computes it on the whole unpruned ``W``; here block 0's pruned entries are
zero).

Asymmetric calibration (GPTAQ's update, see :mod:`compress.gptq`), given ``cross`` ``= sum_t
(x_dense_t - x_t)^T x_t`` and ``alpha``: when column ``i`` (current value ``w_i``) is replaced by
``q`` (0 or kept, quantized in joint mode), its share of the asymmetry, ``w_i (x_dense_i - x_i)``,
is regressed on the later columns' inputs and added to them, whatever ``q`` is: every feedback step
subtracts ``err Hinv[i, :] - w_i P[i, :]`` with GPTAQ's ``P``. The mask score stays
``w^2 / Hinv_ii^2`` on the (now asymmetrically updated) weights: that term is the only part of the
asymmetric objective that depends on the choice for column ``i`` once GPTAQ's approximation (it
drops the share of ``x_dense_i - x_i`` along ``x_i``'s own direction, which only the choice of
``q`` could absorb) is made, exactly as GPTQ's rounding stays round-to-nearest under GPTAQ.

Implementation: blocks run in a ``lax.fori_loop`` (compile time independent of the input size),
inside a block the columns run in sub-blocks of 16 (see ``_process_columns``), and everything is
vectorised over output units. Results agree with a float64 line-by-line port of the reference (with
the choices above) to float32 rounding; see ``tests/compress/test_sparsegpt.py``.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from compress import quantize
from compress.calibration import check_weight_hessian
from compress.gptq import DEFAULT_ALPHA, asymmetric_update, check_cross, damped_inverse_cholesky
from compress.prune import PruneSpec, lowest_k_mask
from kernels.formats import QuantizedWeight, QuantSpec

# pylint: disable=invalid-name  (paper names: W, H, Hinv, Q1, Err1 as in the reference)

_CHUNK = 16  # columns per sub-block of the error feedback (fewer passes over the block)


def inverse_hessian_factor(hessian: jax.Array,
                           percdamp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """The reference's ``Hinv`` and the dead-input mask.

  Args:
    hessian: ``[in, in]`` ``X^T X`` (any positive multiple).
    percdamp: dampening as a fraction of ``mean(diag(H))``.

  Returns:
    ``(Hinv [in, in] float32 upper triangular, dead bool [in])``.
  """
  H = jnp.asarray(hessian, jnp.float32)
  n = H.shape[0]
  diag = jnp.diagonal(H)
  dead = diag == 0
  H = H.at[jnp.arange(n), jnp.arange(n)].set(jnp.where(dead, 1.0, diag))
  U, damp, retries, ok = damped_inverse_cholesky(H, percdamp)
  # Told on the host only when a retry happened (a callback, not a cond: under vmap a cond
  # runs both branches).
  jax.debug.callback(_tell_retries, retries, damp, ok)
  return U, dead


def _tell_retries(retries, damp, ok) -> None:
  if int(retries):
    logging.warning('sparsegpt: Cholesky failed; damp raised %d time(s) to %g x mean(diag(H))%s',
                    int(retries), float(damp), '' if bool(ok) else ', and still failed')


def _check_args(w, hessian, spec: PruneSpec, block_size: int, quant: QuantSpec | None,
                cross=None, alpha: float = DEFAULT_ALPHA):
  n_in = check_weight_hessian(w, hessian, 'sparsegpt')
  if cross is not None:
    check_cross(cross, n_in, alpha, 'sparsegpt')
  if not isinstance(spec, PruneSpec):
    raise ValueError(f'spec must be a PruneSpec, got {type(spec).__name__}.')
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f'block_size must be a positive int, got {block_size!r}.')
  spec.check_shape(n_in)
  if spec.is_nm and block_size % spec.m:
    raise ValueError(f'block_size={block_size} must be a multiple of m={spec.m} for '
                     f'{spec.pattern} sparsity.')
  if quant is not None:
    if quant.is_ragged(n_in):
      # The joint sweep fits a grid per group start inside its column segments, which assume
      # whole groups; GPTQ alone (compress/gptq.py) takes a shorter last group.
      raise ValueError(f'group_size={quant.group_size} does not divide the input dimension '
                       f'{n_in}: SparseGPT\'s joint prune + quantize sweep needs whole groups.')
    if spec.is_nm and quant.group_size != -1 and quant.group_size % spec.m:
      raise ValueError(f'quantization group_size={quant.group_size} must be a multiple of '
                       f'm={spec.m} for {spec.pattern} sparsity.')


def _fasterprune(w, hessian, spec: PruneSpec, block_size: int, percdamp: float,
                 quant: QuantSpec | None, cross=None, alpha: float = DEFAULT_ALPHA):
  """The reference's ``fasterprune`` in paper orientation.

  Blocks run in a ``lax.fori_loop`` (compile time does not grow with the input dimension). For
  that the columns are padded to a multiple of the block size with zero weights and an identity
  ``Hinv`` block (padded columns carry no error and never count as pruned), and the update after a
  block, ``W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]``, is applied to all columns: ``Hinv`` is upper
  triangular, so columns left of the block are untouched, and the block's own columns are final
  already (kept in ``Q``). With ``cross`` (GPTAQ) every update also adds ``w_i P[i, :]`` for
  each finished column ``i`` (``A`` holds those ``w_i``).

  Returns:
    ``(Q [rows, cols] float32, pruned bool [rows, cols], scales, zeros)``; scales/zeros are
    ``[groups, rows]`` in joint mode, else None.
  """
  w = jnp.asarray(w)
  hessian = jnp.asarray(hessian)
  cross = None if cross is None else jnp.asarray(cross, jnp.float32)
  _check_args(w, hessian, spec, block_size, quant, cross, alpha)
  Hinv, dead = inverse_hessian_factor(hessian, percdamp)
  W = jnp.where(dead[None, :], 0.0, w.astype(jnp.float32).T)  # [rows, cols]
  P = None
  if cross is not None:
    P = asymmetric_update(jnp.where(dead[None, :], 0.0, cross), Hinv, alpha)
  rows, columns = W.shape
  B = min(block_size, columns)
  num_blocks = -(-columns // B)
  padded = num_blocks * B
  W = jnp.pad(W, ((0, 0), (0, padded - columns)))
  Hinv = jnp.pad(Hinv, ((0, padded - columns), (0, padded - columns)))
  Hinv = Hinv + jnp.diag((jnp.arange(padded) >= columns).astype(jnp.float32))
  if P is not None:
    P = jnp.pad(P, ((0, padded - columns), (0, padded - columns)))
  valid = jnp.arange(padded) < columns

  if spec.is_nm:
    block_k = None
  else:  # pruned per row in each block; the counts telescope to int(columns * sparsity)
    block_k = jnp.asarray([int(min(i1 + B, columns) * spec.sparsity) - int(i1 * spec.sparsity)
                           for i1 in range(0, columns, B)], jnp.int32)

  # Quantization groups start at multiples of group_len; blocks are cut into segments of `seg`
  # columns so that every group start is a segment start.
  if quant is None:
    group_len, num_groups, seg = None, 0, B
  else:
    group_len = quant.group_len(columns)
    num_groups = quant.num_groups(columns)
    seg = math.gcd(B, group_len)

  def group_params(c, W, W1, pruned1, i1, current):
    """Quantization params of the group starting at column c (if one does), else ``current``."""

    def fresh(_):
      # Group columns inside this block: error-updated, pruned entries zeroed; later columns: W.
      own = jnp.pad(jnp.where(pruned1, 0.0, W1), ((0, 0), (0, group_len)))  # [rows, B + len]
      in_block = jax.lax.dynamic_slice_in_dim(own, c - i1, group_len, axis=1)
      later = jax.lax.dynamic_slice_in_dim(W, c, group_len, axis=1)
      column = c + jnp.arange(group_len)
      group_w = jnp.where(column[None, :] < i1 + B, in_block, later)  # [rows, group_len]
      return quantize.compute_qparams(group_w, quant, axis=1)

    return jax.lax.cond((c % group_len == 0) & (c < columns), fresh, lambda _: current, None)

  def block(b, state):
    W, Q, pruned, scales, zeros, scale, zero = state
    i1 = b * B
    W1 = jax.lax.dynamic_slice_in_dim(W, i1, B, axis=1)  # [rows, B]
    Hinv1 = jax.lax.dynamic_slice(Hinv, (i1, i1), (B, B))
    P1 = None if P is None else jax.lax.dynamic_slice(P, (i1, i1), (B, B))
    d = jnp.diagonal(Hinv1)  # [B]
    if spec.is_nm:
      pruned1 = jnp.zeros((rows, B), jnp.bool_)
    else:
      tmp = W1 ** 2 / d[None, :] ** 2
      tmp = jnp.where(jax.lax.dynamic_slice_in_dim(valid, i1, B)[None, :], tmp, jnp.inf)
      pruned1 = lowest_k_mask(tmp, block_k[b], axis=1)
    Q1 = jnp.zeros_like(W1)
    Err1 = jnp.zeros_like(W1)
    A1 = [] if P is None else [jnp.zeros_like(W1)]  # GPTAQ: each column's w before its choice

    def segment(t, seg_state):
      W1, Q1, Err1, pruned1, scales, zeros, scale, zero, *A1 = seg_state
      start = t * seg
      if quant is not None:
        c = i1 + start
        scale, zero = group_params(c, W, W1, pruned1, i1, (scale, zero))
        g = jnp.minimum(c // group_len, num_groups - 1)  # rewrites the current group's params
        scales = jax.lax.dynamic_update_index_in_dim(scales, scale, g, axis=0)
        zeros = jax.lax.dynamic_update_index_in_dim(zeros, zero, g, axis=0)
      W1, Q1, Err1, pruned1, *A1 = _process_columns(
          (W1, Q1, Err1, pruned1, *A1), start, seg, Hinv1, spec, quant, scale, zero, P1)
      return (W1, Q1, Err1, pruned1, scales, zeros, scale, zero, *A1)

    seg_state = (W1, Q1, Err1, pruned1, scales, zeros, scale, zero, *A1)
    _, Q1, Err1, pruned1, scales, zeros, scale, zero, *A1 = jax.lax.fori_loop(
        0, B // seg, segment, seg_state)
    if P is None:
      W = W - Err1 @ jax.lax.dynamic_slice_in_dim(Hinv, i1, B, axis=0)
    else:
      W = W - Err1 @ jax.lax.dynamic_slice_in_dim(Hinv, i1, B, axis=0)
      W = W + A1[0] @ jax.lax.dynamic_slice_in_dim(P, i1, B, axis=0)
    Q = jax.lax.dynamic_update_slice_in_dim(Q, Q1, i1, axis=1)
    pruned = jax.lax.dynamic_update_slice_in_dim(pruned, pruned1, i1, axis=1)
    return W, Q, pruned, scales, zeros, scale, zero

  qshape = (max(num_groups, 1), rows)
  state = (W, jnp.zeros_like(W), jnp.zeros((rows, padded), jnp.bool_),
           jnp.zeros(qshape, jnp.float32), jnp.zeros(qshape, jnp.float32),
           jnp.ones((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
  _, Q, pruned, scales, zeros, _, _ = jax.lax.fori_loop(0, num_blocks, block, state)
  Q, pruned = Q[:, :columns], pruned[:, :columns]
  if quant is None:
    return Q, pruned, None, None
  return Q, pruned, scales, zeros


def _chunk_len(spec: PruneSpec) -> int:
  """Columns per sub-block: about ``_CHUNK``, a multiple of ``m`` for N:M."""
  if spec.is_nm:
    return spec.m * max(1, _CHUNK // spec.m)
  return _CHUNK


def _process_columns(state, start, length: int, Hinv1, spec: PruneSpec,
                     quant: QuantSpec | None, scale, zero, P1=None):
  """Columns ``[start, start + length)`` of a block: mask (N:M), quantize, error feedback.

  ``state`` is ``(W1, Q1, Err1, pruned1)``, each ``[rows, block]``, plus ``A1`` (each column's
  weight before its choice) with GPTAQ's ``P1`` (the block's ``[block, block]`` part of ``P``);
  ``start`` may be traced, ``length`` is static; ``scale``/``zero`` ``[rows]`` are the current
  group's quantization params.

  The columns run in sub-blocks of ``_chunk_len(spec)``: inside a sub-block the error of each column
  goes to the sub-block's later columns at once (the reference's ``W1[:, i:] -= ...``), and to the
  rest of the block when the sub-block ends (one matmul, as the reference does between blocks).
  The result is the reference's up to float rounding; it only moves fewer bytes per column.
  """
  S = min(_chunk_len(spec), length)  # both multiples of m for N:M
  step = spec.m if spec.is_nm else 1

  def chunk(c0, size, state):
    W1, Q1, Err1, pruned1, *A1 = state
    Wc = jax.lax.dynamic_slice_in_dim(W1, c0, size, axis=1)  # [rows, size]
    Pc = jax.lax.dynamic_slice_in_dim(pruned1, c0, size, axis=1)
    Hc = jax.lax.dynamic_slice(Hinv1, (c0, c0), (size, size))  # upper triangular
    Gc = None if P1 is None else jax.lax.dynamic_slice(P1, (c0, c0), (size, size))
    dc = jnp.diagonal(Hc)

    def columns(t, cs):
      Wc, Qc, Ec, Pc, *Ac = cs
      j0 = t * step
      if spec.is_nm:
        tmp = (jax.lax.dynamic_slice_in_dim(Wc, j0, spec.m, axis=1) ** 2
               / jax.lax.dynamic_slice_in_dim(dc, j0, spec.m)[None, :] ** 2)  # [rows, m]
        group = lowest_k_mask(tmp, spec.m - spec.n, axis=1)
        Pc = jax.lax.dynamic_update_slice_in_dim(Pc, group, j0, axis=1)
      for k in range(step):
        j = j0 + k
        w = jax.lax.dynamic_index_in_dim(Wc, j, axis=1, keepdims=False)  # [rows]
        p = jax.lax.dynamic_index_in_dim(Pc, j, axis=1, keepdims=False)
        q = jnp.where(p, 0.0, w)
        if quant is not None:
          q = quantize.fake_quantize(q, scale, zero, quant.bits)
        err = (w - q) / dc[j]
        # Hc is upper triangular: only columns j.. change, as the reference's W1[:, i:].
        if Gc is None:
          Wc = Wc - err[:, None] * Hc[j][None, :]
        else:  # GPTAQ (Gc strictly upper triangular)
          Wc = Wc - err[:, None] * Hc[j][None, :]
          Wc = Wc + w[:, None] * Gc[j][None, :]
          Ac = [jax.lax.dynamic_update_index_in_dim(Ac[0], w, j, axis=1)]
        Qc = jax.lax.dynamic_update_index_in_dim(Qc, q, j, axis=1)
        Ec = jax.lax.dynamic_update_index_in_dim(Ec, err, j, axis=1)
      return (Wc, Qc, Ec, Pc, *Ac)

    zeros_c = jnp.zeros_like(Wc)
    init = (Wc, zeros_c, zeros_c, Pc) + (() if P1 is None else (zeros_c,))
    _, Qc, Errc, Pc, *Ac = jax.lax.fori_loop(0, size // step, columns, init)
    # Hinv1 rows of this sub-block are zero left of c0; columns inside it are finished already.
    if P1 is None:
      W1 = W1 - Errc @ jax.lax.dynamic_slice_in_dim(Hinv1, c0, size, axis=0)
    else:
      W1 = W1 - Errc @ jax.lax.dynamic_slice_in_dim(Hinv1, c0, size, axis=0)
      W1 = W1 + Ac[0] @ jax.lax.dynamic_slice_in_dim(P1, c0, size, axis=0)
      A1 = [jax.lax.dynamic_update_slice_in_dim(A1[0], Ac[0], c0, axis=1)]
    Q1 = jax.lax.dynamic_update_slice_in_dim(Q1, Qc, c0, axis=1)
    Err1 = jax.lax.dynamic_update_slice_in_dim(Err1, Errc, c0, axis=1)
    pruned1 = jax.lax.dynamic_update_slice_in_dim(pruned1, Pc, c0, axis=1)
    return (W1, Q1, Err1, pruned1, *A1)

  full, rest = divmod(length, S)
  if full == 1:
    state = chunk(start, S, state)
  else:
    state = jax.lax.fori_loop(0, full, lambda t, st: chunk(start + t * S, S, st), state)
  if rest:  # a multiple of m for N:M (length and S both are)
    state = chunk(start + full * S, rest, state)
  return state


def sparsegpt(w: jax.Array, hessian: jax.Array, spec: PruneSpec, *, block_size: int = 128,
              percdamp: float = 0.01, quant: QuantSpec | None = None,
              cross: jax.Array | None = None,
              alpha: float = DEFAULT_ALPHA) -> tuple[jax.Array, jax.Array]:
  """SparseGPT pruning (optionally joint with quantization) of one linear weight.

  Jittable with ``spec``, ``block_size`` and ``quant`` static, e.g.
  ``jax.jit(functools.partial(sparsegpt, spec=spec, block_size=128))(w, h)``.

  Args:
    w: ``[in, out]`` weight (Flax layout).
    hessian: ``[in, in]`` ``X^T X`` accumulated in float32 (any positive multiple).
    spec: sparsity pattern. Unstructured: every output unit keeps exactly
      ``in - int(in * sparsity)`` weights. N:M: needs ``block_size % m == 0``.
    block_size: input columns per lazy-update block (reference: 128).
    percdamp: dampening as a fraction of ``mean(diag(H))`` (reference: 0.01).
    quant: if set, the kept weights are quantized in the same pass (SparseGPT + GPTQ) and the
      returned weight lies on that grid; :func:`sparsegpt_quant` returns it packed.
    cross: optional ``[in, in]`` ``sum_t (x_dense_t - x_t)^T x_t`` (``LinearStats.cross``):
      GPTAQ's asymmetric update (the module docstring).
    alpha: GPTAQ's weight of the asymmetric term.

  Returns:
    ``(w_pruned [in, out] float32 with exact zeros where pruned, mask bool [in, out])``;
    mask True = kept.
  """
  Q, pruned, _, _ = _fasterprune(w, hessian, spec, block_size, percdamp, quant, cross, alpha)
  return Q.T, ~pruned.T


def sparsegpt_quant(w: jax.Array, hessian: jax.Array, spec: PruneSpec, quant: QuantSpec, *,
                    block_size: int = 128, percdamp: float = 0.01,
                    cross: jax.Array | None = None,
                    alpha: float = DEFAULT_ALPHA) -> tuple[QuantizedWeight, jax.Array]:
  """Joint SparseGPT + quantization, packed.

  Args:
    w: ``[in, out]`` weight.
    hessian: ``[in, in]`` ``X^T X``.
    spec: sparsity pattern (see :func:`sparsegpt`).
    quant: quantization grid; its group size must divide ``in`` (and be a multiple of ``m`` for
      N:M).
    block_size: input columns per block.
    percdamp: dampening fraction.
    cross: optional GPTAQ cross term (see :func:`sparsegpt`).
    alpha: GPTAQ's weight of the asymmetric term.

  Returns:
    ``(QuantizedWeight [in, out], mask bool [in, out])``; pruned entries dequantize to exact zeros.
  """
  Q, pruned, scales, zeros = _fasterprune(w, hessian, spec, block_size, percdamp, quant, cross,
                                          alpha)
  return quantize.pack_weight(Q.T, scales, zeros, quant), ~pruned.T
