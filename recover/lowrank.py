"""Training-free low-rank compensation of a compressed linear layer: SVD, EoRA, ACT-S, SRR.

Every function returns a :class:`kernels.formats.LowRank` ``(a [in, r], b [r, out])`` such that the
compensated weight is ``W_hat + a @ b`` (Flax layout, ``y = x @ W_hat + (x @ a) @ b``). The
compression error is ``dW = W - W_hat`` ``[in, out]``; calibration statistics enter as the Hessian
``H = X^T X`` ``[in, in]`` of the layer's inputs ``X [n_tokens, in]``.

Methods:

* :func:`svd_compensate`: ZeroQuant-V2 / LoRC (Yao et al. 2023, https://arxiv.org/abs/2303.08302),
  the truncated SVD of ``dW``; no calibration data.
* :func:`eora`: EoRA (Liu et al. 2024, https://arxiv.org/abs/2410.21271). Minimises
  ``||X (dW - A B)||_F``: with ``H / n = Q L Q^T`` and ``P = Q sqrt(L)`` (so ``H / n = P P^T``),
  the optimum is ``A B = P^-T [P^T dW]_r`` where ``[.]_r`` is the rank-r truncated SVD (Eckart-Young
  in the whitened space). Follows GPTQModel's ``eora`` (eigendecomposition in float64, the SVD of
  the projected error, mapping back through ``P^-T``, ``sqrt(S)`` split over both factors), except
  that small eigenvalues are treated as zero (a truncated pseudo-inverse) instead of being clamped
  to the smallest positive one, so a rank-deficient ``H`` gives no NaN and no blow-up.
* :func:`act_scaled_svd`: the ACT-S / diagonal-scaling ablation, ``diag(sqrt(diag(H) / n))``
  instead of the full eigenspace.
* :func:`srr`: preserve-then-quantize (Cho et al. 2026, https://arxiv.org/abs/2602.02001). The top
  ``k`` singular directions of the activation-scaled weight ``S W`` stay in the low-rank path, only
  the residual is quantized, and the remaining ``r - k`` ranks run EoRA on the residual's
  quantization error. :func:`srr_search_k` tries several ``k``; :func:`srr_candidates` keeps
  several ``k`` at a larger rank with their error curves, for a model-wide budget.
* :func:`quantize_adapter`: group-wise RTN of the adapter factors (EoRA's adapter quantization).

Numerics: the eigendecomposition, the SVDs and the mappings run in float64 with JAX's 64-bit mode
enabled *locally* (``jax.enable_x64`` as a context manager, never globally), on the default device,
so a GPU does the float64 ``eigh`` of a ``[14336, 14336]`` Hessian. Results are returned as float32
arrays. The functions decide the clamping and emit warnings on the host, so they are not jittable;
they are called once per layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress import quantize as quantize_lib
from kernels.formats import LowRank, QuantizedWeight, QuantSpec

# Eigenvalues of H below this fraction of the largest one are treated as zero. H is accumulated in
# float32, which leaves rounding noise of about 1e-7 x lambda_max in its eigenvalues (measured:
# 3e-8 .. 1e-7 for in = 64 .. 1024 with fewer tokens than inputs), so the exact zeros of a
# rank-deficient H show up at that size. 1e-6 sits above that noise; a direction below it carries
# at most 1e-6 of the largest direction's energy, so dropping it costs at most that share of
# the loss.
DEFAULT_REL_EIG_THRESHOLD = 1e-6

QuantizeFn = Callable[[jax.Array], tuple[Any, jax.Array]]


@contextlib.contextmanager
def _x64():
  """Enables float64 in JAX inside the block only."""
  if hasattr(jax, 'enable_x64'):
    with jax.enable_x64(True):
      yield
  else:  # older JAX
    from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
    with enable_x64():
      yield


def _f64(x) -> jax.Array:
  """float64 copy of ``x`` (call inside :func:`_x64`)."""
  return jnp.asarray(x).astype(jnp.float64)


def _check_matrix(x, name: str, what: str) -> tuple[int, int]:
  shape = tuple(np.shape(x))
  if len(shape) != 2:
    raise ValueError(f'{_label(name)}: {what} must be a matrix [in, out], got shape {shape}.')
  return shape


def _label(name: str) -> str:
  return f'layer {name!r}' if name else 'layer'


def _check_hessian(hessian, in_features: int | None, name: str) -> int:
  shape = tuple(np.shape(hessian))
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f'{_label(name)}: hessian must be square [in, in], got shape {shape}.')
  if in_features is not None and shape[0] != in_features:
    raise ValueError(f'{_label(name)}: hessian is {shape} but the weight has {in_features} input '
                     'features.')
  return shape[0]


def _check_rank(rank: int, shape: tuple[int, int], name: str) -> int:
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool):
    raise ValueError(f'{_label(name)}: rank must be an int, got {rank!r}.')
  rank = int(rank)
  if rank < 0 or rank > min(shape):
    raise ValueError(f'{_label(name)}: rank must be in [0, min(in, out)] = [0, {min(shape)}], '
                     f'got {rank}.')
  return rank


def _check_num_tokens(num_tokens) -> float:
  if num_tokens is None:
    return 1.0
  if num_tokens <= 0:
    raise ValueError(f'num_tokens must be positive, got {num_tokens}.')
  return float(num_tokens)


def _svd_factors(m: jax.Array) -> tuple[jax.Array, jax.Array]:
  """All factors ``(U sqrt(S), sqrt(S) V^T)`` of ``m [p, q]``, by decreasing singular value.

  The rank is applied by slicing the results last, so eager execution compiles the (shape-keyed)
  ops once per matrix shape, not once per rank.
  """
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  root = jnp.sqrt(s)
  return u * root[None, :], root[:, None] * vt


def _lowrank(a, b, rank: int, dtype) -> LowRank:
  """Casts the full factors, then keeps the first ``rank`` columns of ``a`` / rows of ``b``."""
  a = jnp.asarray(a).astype(dtype)
  b = jnp.asarray(b).astype(dtype)
  return LowRank(a=a[:, :rank], b=b[:rank])


# ----------------------------------------------------------------------------------------------
# Plain SVD (ZeroQuant-V2 / LoRC).


def svd_compensate(delta_w: jax.Array, rank: int, *, dtype=jnp.float32) -> LowRank:
  """Truncated SVD of the compression error (ZeroQuant-V2's LoRC): no calibration data.

  ``dW ~ U_r S_r V_r^T``, ``a = U_r sqrt(S_r)``, ``b = sqrt(S_r) V_r^T``; minimises
  ``||dW - a b||_F`` over rank-r products.

  Args:
    delta_w: ``W - W_hat`` ``[in, out]``.
    rank: r in ``[0, min(in, out)]``.
    dtype: dtype of the returned factors.

  Returns:
    ``LowRank(a [in, r], b [r, out])``.
  """
  shape = _check_matrix(delta_w, '', 'delta_w')
  rank = _check_rank(rank, shape, '')
  with _x64():
    a, b = _svd_factors(_f64(delta_w))
    return _lowrank(a, b, rank, dtype)


# ----------------------------------------------------------------------------------------------
# EoRA.


@dataclasses.dataclass(frozen=True)
class EigenBasis:
  """The eigenspace of one Hessian, shared by the layers that read the same input (q/k/v, up/gate).

  ``H / n = Q diag(l) Q^T``; eigenvalues at or below ``rel_eig_threshold * max(l)`` are treated as
  zero: ``sqrt_l`` and ``inv_sqrt_l`` are 0 there, so ``P = Q diag(sqrt_l)`` and its truncated
  pseudo-inverse ``P^+T = Q diag(inv_sqrt_l)``.

  Attributes:
    q: float64 ``[in, in]`` orthonormal eigenvectors (columns), eigenvalues ascending.
    sqrt_l: float64 ``[in]`` ``sqrt(l)``, 0 for clamped eigenvalues.
    inv_sqrt_l: float64 ``[in]`` ``1 / sqrt(l)``, 0 for clamped eigenvalues.
    num_clamped: how many eigenvalues were treated as zero.
    lam: float64 ``[in]`` the eigenvalues of ``H / n`` before any shrinkage (so that
      :func:`shrunk_basis` needs no new eigendecomposition).
    rel_eig_threshold: the threshold the basis was made with.

  The arrays are float64 device arrays made under a local x64 block; pass the basis to this
  module's functions rather than computing with its fields directly (outside an x64 block JAX
  truncates new results to float32).
  """
  q: jax.Array
  sqrt_l: jax.Array
  inv_sqrt_l: jax.Array
  num_clamped: int
  lam: jax.Array | None = None
  rel_eig_threshold: float = DEFAULT_REL_EIG_THRESHOLD

  @property
  def in_features(self) -> int:
    return self.q.shape[0]


def _basis(q, lam, rel_eig_threshold: float, shrink: float) -> EigenBasis:
  """The basis of eigenvectors ``q`` and eigenvalues ``lam`` shrunk by ``shrink`` (inside
  :func:`_x64`)."""
  shrunk = shrink_eigenvalues(lam, shrink) if shrink else lam
  keep = (shrunk > rel_eig_threshold * jnp.max(shrunk)) & (shrunk > 0)
  sqrt_l = jnp.where(keep, jnp.sqrt(jnp.where(keep, shrunk, 1.0)), 0.0)
  inv_sqrt_l = jnp.where(keep, 1.0 / jnp.where(keep, sqrt_l, 1.0), 0.0)
  return EigenBasis(q=q, sqrt_l=sqrt_l, inv_sqrt_l=inv_sqrt_l, num_clamped=int(jnp.sum(~keep)),
                    lam=lam, rel_eig_threshold=rel_eig_threshold)


def shrunk_basis(basis: EigenBasis, shrink: float) -> EigenBasis:
  """``basis`` (of ``H``) turned into that of ``H + shrink * tr(H) / d * I``: the same
  eigenvectors, no new eigendecomposition."""
  check_shrink(shrink)
  if basis.lam is None:
    raise ValueError('this EigenBasis carries no eigenvalues; make it with eigen_basis')
  with _x64():
    return _basis(basis.q, basis.lam, basis.rel_eig_threshold, shrink)


def eigen_basis(hessian: jax.Array, *, num_tokens: int | None = None,
                rel_eig_threshold: float = DEFAULT_REL_EIG_THRESHOLD,
                name: str = '', shrink: float = 0.0) -> EigenBasis:
  """Eigendecomposes ``H`` in float64 (locally enabled x64) for :func:`eora_from_basis` and SRR.

  Warns (``UserWarning`` naming the layer) when some eigenvalues are treated as zero: ``H`` is
  rank-deficient: too few calibration tokens, or inputs confined to fewer directions.

  Args:
    hessian: ``X^T X`` ``[in, in]`` (float32 accumulation is fine).
    num_tokens: n; ``H`` is divided by it. Scaling does not change any argmin; it only makes the
      eigenvalues per-token.
    rel_eig_threshold: eigenvalues ``<= rel_eig_threshold * max eigenvalue`` (and negative ones from
      rounding) are treated as zero. See ``DEFAULT_REL_EIG_THRESHOLD``.
    name: layer name for warnings and errors.
    shrink: the robust variant's ``lambda`` (:func:`shrink_eigenvalues`): the basis of
      ``H + lambda * tr(H) / d * I``. 0 is EoRA's own ``H``.

  Returns:
    An :class:`EigenBasis` (float64 device arrays).
  """
  _check_hessian(hessian, None, name)
  scale = _check_num_tokens(num_tokens)
  if not rel_eig_threshold >= 0:
    raise ValueError(f'rel_eig_threshold must be >= 0, got {rel_eig_threshold}.')
  check_shrink(shrink)
  with _x64():
    h = _f64(hessian)
    h = 0.5 * (h + h.T) / scale
    lam, q = jnp.linalg.eigh(h)
    basis = _basis(q, lam, rel_eig_threshold, shrink)
  num_clamped = basis.num_clamped
  if num_clamped:
    n_in = int(np.shape(hessian)[0])
    if num_tokens is not None and float(num_tokens) < n_in:
      hint = (f'The calibration data ({int(num_tokens)} tokens) is too little for a full-rank H: '
              'use more calibration tokens than input features.')
    else:
      hint = ('The inputs span (nearly) fewer directions than features, as with a few dominant '
              'activation channels; more varied calibration data can fill them.')
    warnings.warn(
        f'{_label(name)}: {num_clamped} of {n_in} Hessian eigenvalues are <= '
        f'{rel_eig_threshold:g} x the largest; they are treated as zero (truncated '
        f'pseudo-inverse), so the correction ignores those input directions. {hint}',
        UserWarning, stacklevel=3)
  return basis


def check_shrink(shrink) -> float:
  if not (isinstance(shrink, (int, float)) and math.isfinite(shrink) and shrink >= 0):
    raise ValueError(f'shrink (the covariance shrinkage lambda) must be a finite number >= 0, '
                     f'got {shrink!r}.')
  return float(shrink)


def shrink_eigenvalues(lam: jax.Array, shrink: float) -> jax.Array:
  """The eigenvalues of ``H + shrink * tr(H) / d * I`` from those of ``H`` (the eigenvectors are
  the same): each moves up by ``shrink`` times their mean. Negative rounding noise counts as 0.

  The robust EoRA variant: EoRA weighs each input direction by its calibration energy, so a
  direction the calibration domain never excites gets no correction at all; another domain may
  excite it. Shrinking the covariance toward the identity gives every direction a floor of
  ``shrink`` times the mean energy: ``shrink = 0`` is EoRA, ``shrink -> inf`` plain SVD of the
  error (the whitening becomes a multiple of the identity). Call inside :func:`_x64` for float64.
  """
  lam = jnp.maximum(lam, 0.0)
  return lam + shrink * jnp.mean(lam)


def choose_shrink(delta_w: jax.Array, basis: EigenBasis, hessian_val: jax.Array, rank: int,
                  grid: Sequence[float], name: str = '') -> tuple[float, list[float]]:
  """Robust EoRA's ``lambda`` for one layer, chosen on held-out data: for each value of ``grid``,
  the rank-``rank`` adapter fitted in ``basis`` (the eigenspace of the fitting half's ``H``)
  shrunk by it, scored by its output error on the held-out half, ``tr(E^T H_val E)`` with
  ``E = dW - A B``. Returns ``(the best value, the errors in grid order)``; ties go to the smaller
  value."""
  shape = _check_matrix(delta_w, name, 'delta_w')
  _check_hessian(hessian_val, shape[0], name)
  rank = _check_rank(rank, shape, name)
  if not grid:
    raise ValueError('choose_shrink needs at least one candidate value')
  errors = []
  with _x64():
    d = _f64(delta_w)
    h = _f64(hessian_val)
    for lam in grid:
      a, b = _eora_factors(d, shrunk_basis(basis, lam))
      e = d - a[:, :rank] @ b[:rank]
      errors.append(float(jnp.sum(e * (h @ e))))
  best = min(range(len(grid)), key=lambda k: (errors[k], grid[k]))
  return float(grid[best]), errors


def _eora_factors(delta_w64: jax.Array, basis: EigenBasis):
  """All float64 EoRA factors ``a [in, m]``, ``b [m, out]``, best first (inside :func:`_x64`)."""
  projected = basis.sqrt_l[:, None] * (basis.q.T @ delta_w64)  # P^T dW  [in, out]
  a_w, b = _svd_factors(projected)                           # whitened factors
  a = basis.q @ (basis.inv_sqrt_l[:, None] * a_w)             # P^+T: back to input space
  return a, b


def eora_from_basis(delta_w: jax.Array, basis: EigenBasis, rank: int, name: str = '', *,
                    dtype=jnp.float32) -> LowRank:
  """EoRA with a precomputed :class:`EigenBasis` (see :func:`eora`).

  ``a = Q diag(inv_sqrt_l) U_r sqrt(S_r)``, ``b = sqrt(S_r) V_r^T`` where
  ``U S V^T = diag(sqrt_l) Q^T dW`` is the error projected into the eigenspace.

  Args:
    delta_w: ``W - W_hat`` ``[in, out]``.
    basis: from :func:`eigen_basis` of the Hessian of this layer's input.
    rank: r in ``[0, min(in, out)]``.
    name: layer name for errors.
    dtype: dtype of the returned factors.

  Returns:
    ``LowRank(a [in, r], b [r, out])``.
  """
  shape = _check_matrix(delta_w, name, 'delta_w')
  if shape[0] != basis.in_features:
    raise ValueError(f'{_label(name)}: delta_w has {shape[0]} input features but the eigenbasis '
                     f'has {basis.in_features}.')
  rank = _check_rank(rank, shape, name)
  with _x64():
    a, b = _eora_factors(_f64(delta_w), basis)
    return _lowrank(a, b, rank, dtype)


def eora(delta_w: jax.Array, hessian: jax.Array, rank: int, *, num_tokens: int | None = None,
         rel_eig_threshold: float = DEFAULT_REL_EIG_THRESHOLD, name: str = '',
         dtype=jnp.float32, shrink: float = 0.0) -> LowRank:
  """EoRA: the rank-r ``A B`` minimising ``||X (dW - A B)||_F``.

  ``H / n = Q L Q^T``, ``P = Q sqrt(L)``; ``A B = P^-T [P^T dW]_r``. Eigenvalues below
  ``rel_eig_threshold * max`` are treated as zero (truncated pseudo-inverse) with a warning naming
  the layer; the result stays optimal on the calibration tokens and never contains NaN.

  Args:
    delta_w: ``W - W_hat`` ``[in, out]``.
    hessian: ``X^T X`` ``[in, in]``.
    rank: r in ``[0, min(in, out)]``.
    num_tokens: n (optional; does not change the result beyond rounding).
    rel_eig_threshold: see :func:`eigen_basis`.
    name: layer name for warnings and errors.
    dtype: dtype of the returned factors.
    shrink: robust EoRA's ``lambda``: minimise ``||X (dW - A B)||^2 + lambda tr(H)/d ||dW - A B||^2``
      instead (:func:`shrink_eigenvalues`).

  Returns:
    ``LowRank(a [in, r], b [r, out])``.
  """
  shape = _check_matrix(delta_w, name, 'delta_w')
  _check_hessian(hessian, shape[0], name)
  _check_rank(rank, shape, name)
  basis = eigen_basis(hessian, num_tokens=num_tokens, rel_eig_threshold=rel_eig_threshold,
                      name=name, shrink=shrink)
  return eora_from_basis(delta_w, basis, rank, name, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# ACT-S (diagonal scaling ablation).


def _diag_scale(hessian64: jax.Array, scale: float, rel_eig_threshold: float):
  """``d = sqrt(diag(H) / n)`` and its guarded inverse (0 where ``d^2 <= rel * max d^2``)."""
  d2 = jnp.diag(hessian64) / scale
  keep = (d2 > rel_eig_threshold * jnp.max(d2)) & (d2 > 0)
  d = jnp.where(keep, jnp.sqrt(jnp.where(keep, d2, 1.0)), 0.0)
  inv_d = jnp.where(keep, 1.0 / jnp.where(keep, d, 1.0), 0.0)
  return d, inv_d


def act_scaled_svd(delta_w: jax.Array, hessian: jax.Array, rank: int, *,
                   num_tokens: int | None = None,
                   rel_eig_threshold: float = DEFAULT_REL_EIG_THRESHOLD, name: str = '',
                   dtype=jnp.float32) -> LowRank:
  """ACT-S: SVD of the error with its input rows scaled by ``d = sqrt(diag(H) / n)``.

  ``U S V^T = diag(d) dW``, ``a = diag(1/d) U_r sqrt(S_r)``, ``b = sqrt(S_r) V_r^T``. Input features
  with ``d^2 <= rel_eig_threshold * max d^2`` (never active) get ``1/d = 0``. Exact for a diagonal
  ``H``; otherwise between plain SVD and EoRA.

  Args:
    delta_w: ``W - W_hat`` ``[in, out]``.
    hessian: ``X^T X`` ``[in, in]`` (only its diagonal is read).
    rank: r in ``[0, min(in, out)]``.
    num_tokens: n (optional).
    rel_eig_threshold: relative floor on ``d^2``.
    name: layer name for errors.
    dtype: dtype of the returned factors.

  Returns:
    ``LowRank(a [in, r], b [r, out])``.
  """
  shape = _check_matrix(delta_w, name, 'delta_w')
  _check_hessian(hessian, shape[0], name)
  rank = _check_rank(rank, shape, name)
  scale = _check_num_tokens(num_tokens)
  with _x64():
    d, inv_d = _diag_scale(_f64(hessian), scale, rel_eig_threshold)
    a, b = _svd_factors(d[:, None] * _f64(delta_w))
    return _lowrank(inv_d[:, None] * a, b, rank, dtype)


# ----------------------------------------------------------------------------------------------
# Output error.


def weighted_error(delta_w: jax.Array, hessian: jax.Array, *,
                   num_tokens: int | None = None) -> float:
  """``||X dW||_F = sqrt(tr(dW^T H dW))`` in float64 (divided by ``sqrt(n)`` if ``num_tokens``)."""
  shape = _check_matrix(delta_w, '', 'delta_w')
  _check_hessian(hessian, shape[0], '')
  scale = _check_num_tokens(num_tokens)
  with _x64():
    d = _f64(delta_w)
    val = float(jnp.sum(d * (_f64(hessian) @ d))) / scale
  return math.sqrt(max(val, 0.0))


# ----------------------------------------------------------------------------------------------
# SRR: preserve-then-quantize.


def energy_rule_k(sigma: np.ndarray, rank: int) -> int:
  """SRR's reference rule ``k = floor(r * sum(sigma[:r]^2) / sum(sigma^2))`` (0 if all zero)."""
  s2 = np.asarray(sigma, np.float64) ** 2
  total = float(s2.sum())
  if total <= 0:
    return 0
  return int(math.floor(rank * float(s2[:rank].sum()) / total))


@dataclasses.dataclass(frozen=True)
class _SrrState:
  """What SRR shares across values of k: the eigenbasis and the factors of the SVD of ``S W``."""
  w64: jax.Array       # [in, out] float64
  a_p: jax.Array       # [in, m] S^+ U sqrt(Sigma): preserved directions in the input space
  b_p: jax.Array       # [m, out] sqrt(Sigma) V^T
  sigma: jax.Array     # [m]
  basis: EigenBasis


def _srr_prepare(w, hessian, basis: EigenBasis, scaling: str, scale: float,
                 rel_eig_threshold: float) -> _SrrState:
  with _x64():
    w64 = _f64(w)
    if scaling == 'exact':
      # S = Q diag(sqrt_l) Q^T = H^1/2 (clamped), S^+ = Q diag(inv_sqrt_l) Q^T.
      sw = basis.q @ (basis.sqrt_l[:, None] * (basis.q.T @ w64))
      u, sigma, vt = jnp.linalg.svd(sw, full_matrices=False)
      s_inv_u = basis.q @ (basis.inv_sqrt_l[:, None] * (basis.q.T @ u))
    elif scaling == 'diag':
      d, inv_d = _diag_scale(_f64(hessian), scale, rel_eig_threshold)
      u, sigma, vt = jnp.linalg.svd(d[:, None] * w64, full_matrices=False)
      s_inv_u = inv_d[:, None] * u
    else:
      raise ValueError(f"scaling must be 'exact' or 'diag', got {scaling!r}.")
    root = jnp.sqrt(sigma)
    a_p, b_p = s_inv_u * root[None, :], root[:, None] * vt
  return _SrrState(w64=w64, a_p=a_p, b_p=b_p, sigma=sigma, basis=basis)


def _srr_for_k(state: _SrrState, k: int, rank: int, quantize_fn: QuantizeFn, name: str,
               dtype):
  """Preserve k directions, quantize the residual, EoRA of rank r - k on its error.

  Ops keep fixed shapes across k (a mask instead of ``[:k]``, a gather of r columns instead of a
  concatenation of k and r - k), so a sweep over k compiles them once.
  """
  with _x64():
    m = state.b_p.shape[0]
    keep = (jnp.arange(m) < k)[:, None]
    residual = (state.w64 - state.a_p @ jnp.where(keep, state.b_p, 0.0))  # W - L_k
    residual = residual.astype(jnp.float32)  # [in, out]
  # The quantizer runs outside the x64 block, as its caller would run it.
  compressed, residual_hat = quantize_fn(residual)
  if tuple(np.shape(residual_hat)) != tuple(residual.shape):
    raise ValueError(f'{_label(name)}: quantize_fn returned a dense array of shape '
                     f'{np.shape(residual_hat)}, expected {tuple(residual.shape)}.')
  with _x64():
    a_e, b_e = _eora_factors(_f64(residual) - _f64(residual_hat), state.basis)
    # Columns 0..k-1 from the preserved factors, then 0..r-k-1 from EoRA's.
    idx = jnp.asarray(np.concatenate([np.arange(k), rank + np.arange(rank - k)]), jnp.int32)
    a = jnp.take(jnp.concatenate([state.a_p[:, :rank], a_e[:, :rank]], axis=1), idx, axis=1)
    b = jnp.take(jnp.concatenate([state.b_p[:rank], b_e[:rank]], axis=0), idx, axis=0)
    adapter = _lowrank(a, b, rank, dtype)
    total = _f64(residual_hat) + a @ b
    # Each EoRA component removes s_i^2 of the per-token output error, s_i = ||b_i||^2.
    s2 = np.asarray(jnp.sum(b_e * b_e, axis=1) ** 2)
  return compressed, adapter, total, s2


def _srr_setup(w, hessian, rank, num_tokens, rel_eig_threshold, name, basis):
  shape = _check_matrix(w, name, 'w')
  _check_hessian(hessian, shape[0], name)
  rank = _check_rank(rank, shape, name)
  scale = _check_num_tokens(num_tokens)
  if basis is None:
    basis = eigen_basis(hessian, num_tokens=num_tokens, rel_eig_threshold=rel_eig_threshold,
                        name=name)
  elif basis.in_features != shape[0]:
    raise ValueError(f'{_label(name)}: w has {shape[0]} input features but the eigenbasis has '
                     f'{basis.in_features}.')
  return rank, scale, basis


def srr(w: jax.Array, hessian: jax.Array, rank: int, quantize_fn: QuantizeFn, *,
        k: int | None = None, k_rule: str = 'energy', scaling: str = 'exact',
        num_tokens: int | None = None,
        rel_eig_threshold: float = DEFAULT_REL_EIG_THRESHOLD, name: str = '',
        basis: EigenBasis | None = None,
        dtype=jnp.float32) -> tuple[Any, LowRank, dict[str, Any]]:
  """SRR, preserve-then-quantize, with a total rank budget r.

  1. ``U Sigma V^T = S W`` with ``S = H^1/2`` (``'exact'``: ``Q sqrt(L) Q^T`` from the clamped
     eigenbasis) or ``diag(sqrt(diag(H)))`` (``'diag'``), scaling the input axis of ``W [in, out]``.
  2. Preserve ``L_k = S^+ U_k Sigma_k V_k^T`` (``S^+`` the pseudo-inverse under clamping).
  3. Quantize the residual ``R = W - L_k``: ``compressed, R_hat = quantize_fn(R)``.
  4. EoRA of rank ``r - k`` on ``R - R_hat``.
  The adapter concatenates ``[L_k factors, EoRA factors]`` along the rank axis: its first ``k``
  columns of ``a`` / rows of ``b`` are the preserved directions. With ``k = 0`` this is exactly
  "quantize W, then EoRA".

  Args:
    w: the dense weight ``[in, out]``.
    hessian: ``X^T X`` ``[in, in]``.
    rank: total adapter rank r in ``[0, min(in, out)]``.
    quantize_fn: ``R [in, out] float32 -> (compressed leaf, dense dequantized [in, out])``, e.g. RTN
      or GPTQ with its Hessian bound.
    k: preserved directions in ``[0, r]``; None applies ``k_rule``.
    k_rule: ``'energy'``: ``k = floor(r * sum(sigma[:r]^2) / sum(sigma^2))`` over the singular
      values of ``S W`` (the reference rule).
    scaling: ``'exact'`` or ``'diag'``.
    num_tokens: n (optional).
    rel_eig_threshold: see :func:`eigen_basis`.
    name: layer name for warnings and errors.
    basis: a precomputed :func:`eigen_basis` of ``hessian`` (computed if None).
    dtype: dtype of the returned factors.

  Returns:
    ``(compressed residual, LowRank(a [in, r], b [r, out]), info)``; info has ``k``, ``rank``,
    ``energy`` (``sum(sigma[:r]^2) / sum(sigma^2)``), ``scaling``, ``num_clamped``.
  """
  rank, scale, basis = _srr_setup(w, hessian, rank, num_tokens, rel_eig_threshold, name, basis)
  state = _srr_prepare(w, hessian, basis, scaling, scale, rel_eig_threshold)
  sigma = np.asarray(state.sigma)
  if k is None:
    if k_rule != 'energy':
      raise ValueError(f"{_label(name)}: k_rule must be 'energy', got {k_rule!r}.")
    k = energy_rule_k(sigma, rank)
  k = _check_k(k, rank, name)
  compressed, adapter, _, _ = _srr_for_k(state, k, rank, quantize_fn, name, dtype)
  adapter = dataclasses.replace(adapter, preserved=k)
  info = {'k': k, 'rank': rank, 'energy': _energy(sigma, rank), 'scaling': scaling,
          'num_clamped': basis.num_clamped}
  return compressed, adapter, info


def _check_k(k, rank: int, name: str) -> int:
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= int(k) <= rank:
    raise ValueError(f'{_label(name)}: k must be an int in [0, rank={rank}], got {k!r}.')
  return int(k)


def _energy(sigma: np.ndarray, rank: int) -> float:
  s2 = np.asarray(sigma, np.float64) ** 2
  total = float(s2.sum())
  return float(s2[:rank].sum()) / total if total > 0 else 0.0


def srr_search_k(w: jax.Array, hessian: jax.Array, rank: int, quantize_fn: QuantizeFn, *,
                 ks: Sequence[int] | None = None, scaling: str = 'exact',
                 num_tokens: int | None = None,
                 rel_eig_threshold: float = DEFAULT_REL_EIG_THRESHOLD, name: str = '',
                 basis: EigenBasis | None = None,
                 dtype=jnp.float32) -> tuple[Any, LowRank, dict[str, Any]]:
  """SRR with the k among ``ks`` that minimises ``||X (W - (R_hat + a b))||_F`` (from ``H``).

  The eigenbasis and the SVD of ``S W`` are computed once; ``quantize_fn`` runs once per k.

  Args:
    w, hessian, rank, quantize_fn, scaling, num_tokens, rel_eig_threshold, name, basis, dtype: as
      in :func:`srr`.
    ks: candidate k values in ``[0, r]``; default ``{0, energy rule, r/4, r/2, 3r/4, r}``.

  Returns:
    ``(compressed residual, LowRank, info)`` for the best k; info as in :func:`srr` plus
    ``errors``: ``{k: ||X (W - W_hat_total)||_F}`` for every candidate (ties go to the smaller k).
  """
  rank, scale, basis = _srr_setup(w, hessian, rank, num_tokens, rel_eig_threshold, name, basis)
  state = _srr_prepare(w, hessian, basis, scaling, scale, rel_eig_threshold)
  sigma = np.asarray(state.sigma)
  ks = _candidate_ks(ks, sigma, rank, rank, name)
  best, errors = None, {}
  for k in ks:
    compressed, adapter, total, _ = _srr_for_k(state, k, rank, quantize_fn, name, dtype)
    with _x64():
      err = weighted_error(state.w64 - total, hessian, num_tokens=num_tokens)
    errors[k] = err
    if best is None or err < best[0]:
      best = (err, k, compressed, adapter)
  _, k, compressed, adapter = best
  adapter = dataclasses.replace(adapter, preserved=k)
  info = {'k': k, 'rank': rank, 'energy': _energy(sigma, rank), 'scaling': scaling,
          'num_clamped': basis.num_clamped, 'errors': errors}
  return compressed, adapter, info


def _candidate_ks(ks, sigma, rank: int, max_rank: int, name: str) -> list[int]:
  """The candidate preserved ranks, sorted: ``ks`` or, by default, ``{0, the energy rule, r/4, r/2,
  3r/4, r}`` for the rank ``r``; each checked against ``max_rank``."""
  if ks is None:
    ks = {0, energy_rule_k(sigma, rank), rank // 4, rank // 2, (3 * rank) // 4, rank}
  ks = sorted({_check_k(k, max_rank, name) for k in ks})
  if not ks:
    raise ValueError(f'{_label(name)}: ks is empty.')
  return ks


@dataclasses.dataclass(frozen=True)
class SrrCandidate:
  """One SRR split of a layer (``k`` preserved directions), computed at a largest rank so that a
  model-wide budget can pick its rank later: for any total rank ``k <= r <= adapter.rank`` the
  result is the residual leaf with the first ``r`` components of ``adapter`` (EoRA's factors are
  ordered, so the cut is exactly SRR at rank ``r`` with this ``k``).

  Attributes:
    k: preserved directions (the adapter's first ``k`` components).
    compressed: the quantized residual ``W - L_k``.
    adapter: ``LowRank`` at the largest rank, ``preserved = k``.
    base_error: the per-token squared output error ``||X (W - R_hat - L_k)||^2 / n`` in the
      whitened space (directions the clamped eigenbasis ignores are not counted): the error at
      rank ``k``.
    gains: ``[adapter.rank - k]``: how much each further (EoRA) component lowers that error,
      non-increasing.
  """
  k: int
  compressed: Any
  adapter: LowRank
  base_error: float
  gains: np.ndarray

  def error(self, rank: int) -> float:
    """The per-token squared output error at total rank ``rank`` (``k <= rank <= adapter.rank``)."""
    if not self.k <= rank <= self.k + len(self.gains):
      raise ValueError(f'rank {rank} is outside [{self.k}, {self.k + len(self.gains)}] for '
                       f'k={self.k}')
    return float(self.base_error - np.sum(self.gains[:rank - self.k]))


def srr_candidates(w: jax.Array, hessian: jax.Array, max_rank: int, quantize_fn: QuantizeFn, *,
                   rank: int | None = None, ks: Sequence[int] | None = None,
                   scaling: str = 'exact', num_tokens: int | None = None,
                   rel_eig_threshold: float = DEFAULT_REL_EIG_THRESHOLD, name: str = '',
                   basis: EigenBasis | None = None,
                   dtype=jnp.float32) -> list[SrrCandidate]:
  """SRR for several preserved ranks ``k`` at once, each at rank ``max_rank`` with its error curve:
  what a model-wide budget (:mod:`recover.budget`) needs to choose ``k`` and the rank of every
  layer together. The eigenbasis and the SVD of ``S W`` are computed once; ``quantize_fn`` runs
  once per ``k``.

  Args:
    w, hessian, quantize_fn, scaling, num_tokens, rel_eig_threshold, name, basis, dtype: as in
      :func:`srr`.
    max_rank: the largest total rank any choice may take (clipped to ``min(in, out)``).
    rank: the rank the default ``ks`` are relative to (default ``max_rank``).
    ks: candidate ``k`` in ``[0, max_rank]``; default as in :func:`srr_search_k` for ``rank``.

  Returns:
    One :class:`SrrCandidate` per ``k``, by increasing ``k``.
  """
  max_rank = min(max_rank, *_check_matrix(w, name, 'w'))
  max_rank, scale, basis = _srr_setup(w, hessian, max_rank, num_tokens, rel_eig_threshold, name,
                                      basis)
  state = _srr_prepare(w, hessian, basis, scaling, scale, rel_eig_threshold)
  sigma = np.asarray(state.sigma)
  rank = max_rank if rank is None else min(_check_rank(rank, tuple(w.shape), name), max_rank)
  out = []
  for k in _candidate_ks(ks, sigma, rank, max_rank, name):
    compressed, adapter, _, s2 = _srr_for_k(state, k, max_rank, quantize_fn, name, dtype)
    s2 = np.asarray(s2, np.float64)
    out.append(SrrCandidate(k=k, compressed=compressed,
                            adapter=dataclasses.replace(adapter, preserved=k),
                            base_error=float(s2.sum()), gains=s2[:max_rank - k]))
  return out


# ----------------------------------------------------------------------------------------------
# Adapter quantization.


def _adapter_spec(n_in: int, bits: int, group_size: int, symmetric: bool) -> QuantSpec:
  """Groups of ``group_size`` along the input axis, or one group per output unit (-1) if
  ``group_size`` does not divide ``n_in``."""
  if group_size != -1 and n_in % group_size:
    group_size = -1
  return QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)


def quantize_adapter(lowrank: LowRank, bits: int, group_size: int = 128, *,
                     symmetric: bool = False) -> LowRank:
  """Group-wise RTN of both adapter factors (EoRA's 4/3-bit adapters).

  ``a [in, r]`` is grouped along ``in`` and ``b [r, out]`` along ``r``, each the input axis of its
  factor. A factor whose input length is not divisible by ``group_size`` (typically ``b`` with a
  rank below the group size) uses ``group_size = -1``: one group per output unit. The result
  works with ``kernels.reference.linear`` and ``formats.to_dense``.

  Args:
    lowrank: float factors.
    bits: 2, 3, 4 or 8.
    group_size: rows per group, or -1.
    symmetric: symmetric grid.

  Returns:
    ``LowRank`` whose ``a`` and ``b`` are :class:`QuantizedWeight`; a rank-0 adapter is returned
    unchanged.
  """
  if isinstance(lowrank.a, QuantizedWeight) or isinstance(lowrank.b, QuantizedWeight):
    raise ValueError('quantize_adapter: the adapter is already quantized.')
  a = jnp.asarray(lowrank.a, jnp.float32)
  b = jnp.asarray(lowrank.b, jnp.float32)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(f'quantize_adapter: expected a [in, r] and b [r, out], got {a.shape} and '
                     f'{b.shape}.')
  if a.shape[1] == 0:
    return lowrank
  qa = quantize_lib.rtn(a, _adapter_spec(a.shape[0], bits, group_size, symmetric))
  qb = quantize_lib.rtn(b, _adapter_spec(b.shape[0], bits, group_size, symmetric))
  return LowRank(a=qa, b=qb, preserved=lowrank.preserved)
