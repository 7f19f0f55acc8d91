"""Pruning masks: magnitude and Wanda scores, unstructured and N:M patterns, and the sparse leaf.

Wanda: Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models"
(2023), https://arxiv.org/abs/2306.11695. Reference implementation followed: locuslab/wanda
``lib/prune.py`` (``prune_wanda``): the score of weight ``(i, j)`` is ``|W_ij| * ||X_:,i||_2``;
scores are compared within each output unit; unstructured pruning removes the first
``int(in * sparsity)`` entries of a stable ascending sort of each output unit's scores (an exact
count, not a threshold), and N:M removes the ``m - n`` lowest scores in every group of ``m``
consecutive input weights.

Layout: weights are Flax ``[in, out]`` (``y = x @ W``), so an output unit is a *column* here (a row
in the papers' ``[out, in]``). Masks are bool ``[in, out]`` with True = kept.

Wanda++ (Yang et al. 2025, https://arxiv.org/abs/2503.04992): the regional gradient score
``(alpha * G_ij + ||X_:,i||_2) * |W_ij|`` (:func:`wandapp_scores`, ``G`` from
:mod:`compress.regional`), selected exactly as Wanda's; see ``compress/METHODS.md`` §2.3a.

Magnitude pruning uses the same per-output-unit selection with score ``|W|`` (the Wanda repository's
magnitude baseline instead thresholds the whole matrix at once; per output unit is the convention of
this library, so every method prunes exactly the same number of weights from every output unit).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from compress.calibration import check_weight_hessian
from kernels.formats import (
    CompressedLinear, QuantizedWeight, sparse24_compress)


_DEFAULT_SPARSITY = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneSpec:
  """Sparsity pattern. Hashable, so it can be a static argument.

  Attributes:
    sparsity: fraction of the weights of every output unit to prune, in (0, 1) (unstructured
      pattern). For N:M it is derived, ``1 - n / m``; passing another value with N:M raises.
    n: weights kept in every group of ``m`` consecutive input weights of one output unit (N:M
      pattern, e.g. 2:4 or 4:8); 0 for unstructured.
    m: the N:M group length; 0 for unstructured.
  """
  sparsity: float = _DEFAULT_SPARSITY
  n: int = 0
  m: int = 0

  def __post_init__(self):
    for name in ('n', 'm'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'PruneSpec.{name} must be an int, got {value!r}.')
    if self.m < 0 or self.n < 0:
      raise ValueError(f'PruneSpec n and m must be non-negative, got n={self.n}, m={self.m}.')
    if self.m == 0:
      if self.n != 0:
        raise ValueError(f'PruneSpec n={self.n} given without m: an N:M pattern needs both (e.g. '
                         'n=2, m=4).')
      if not 0.0 < float(self.sparsity) < 1.0:
        raise ValueError(f'PruneSpec sparsity must lie in (0, 1), got {self.sparsity!r}.')
      object.__setattr__(self, 'sparsity', float(self.sparsity))
      return
    if not 0 < self.n < self.m:
      raise ValueError(f'N:M pattern {self.n}:{self.m} needs 0 < n < m (n weights kept out of '
                       f'every m), got n={self.n}, m={self.m}.')
    derived = 1.0 - self.n / self.m
    if self.sparsity != _DEFAULT_SPARSITY and abs(self.sparsity - derived) > 1e-12:
      raise ValueError(f'PruneSpec sparsity={self.sparsity!r} conflicts with the {self.n}:{self.m} '
                       f'pattern, which prunes {derived:g}; leave sparsity unset for N:M.')
    object.__setattr__(self, 'sparsity', derived)

  @property
  def is_nm(self) -> bool:
    """True for an N:M pattern, False for unstructured."""
    return self.m > 0

  @property
  def pattern(self) -> str:
    """``'n:m'`` for N:M, else the sparsity (``'0.5'``); ``PruneSpec.parse`` reads it back."""
    return f'{self.n}:{self.m}' if self.is_nm else repr(self.sparsity)

  @classmethod
  def parse(cls, text: str) -> 'PruneSpec':
    """Reads ``'0.5'`` (unstructured sparsity) or ``'2:4'`` / ``'4:8'`` (N:M, n kept of every m)."""
    s = str(text).strip()
    if ':' in s:
      match = re.fullmatch(r'(\d+):(\d+)', s)
      if match is None:
        raise ValueError(f'cannot parse pruning pattern {text!r}: N:M must be two non-negative '
                         "integers such as '2:4'.")
      return cls(n=int(match.group(1)), m=int(match.group(2)))
    try:
      sparsity = float(s)
    except ValueError:
      raise ValueError(f"cannot parse pruning pattern {text!r}: expected a sparsity such as '0.5' "
                       "or an N:M pattern such as '2:4'.") from None
    return cls(sparsity=sparsity)

  def num_pruned(self, in_features: int) -> int:
    """Weights pruned per output unit for an input dimension ``in_features``."""
    if self.is_nm:
      return (in_features // self.m) * (self.m - self.n)
    return int(in_features * self.sparsity)

  def check_shape(self, in_features: int) -> None:
    """Raises ValueError if the pattern does not fit an input dimension ``in_features``."""
    if self.is_nm and in_features % self.m:
      raise ValueError(f'{self.pattern} sparsity needs the input dimension to be a multiple of '
                       f'{self.m}, got {in_features}.')


def _ordered_key(scores: jax.Array) -> jax.Array:
  """uint32 keys with the order of the float32 ``scores`` (-0.0 and +0.0 equal)."""
  scores = scores.astype(jnp.float32)
  scores = jnp.where(scores == 0, 0.0, scores)  # -0.0 -> +0.0 (XLA folds `x + 0.0` away)
  bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
  bits = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)  # negatives: reverse their order
  return jax.lax.bitcast_convert_type(bits, jnp.uint32) ^ jnp.uint32(0x80000000)


_PAIRWISE_MAX = 16  # up to this many entries, rank by all pairwise comparisons


def lowest_k_mask(scores: jax.Array, k: int, axis: int) -> jax.Array:
  """True at the ``k`` lowest entries along ``axis`` (on ties, the lower index first).

  Selects exactly the entries ``argsort(scores, axis, stable=True)[:k]`` (the Wanda reference's
  sort-based selection: an exact count, never a threshold's count), without sorting: XLA's CPU sort
  is about 10x slower than finding the k-th smallest key by bisection over the float bit pattern
  (32 counting passes) and then breaking ties at it by position. Short axes (N:M groups) use
  pairwise ranks instead.

  Args:
    scores: float array.
    k: number of entries to select, ``0 <= k <= scores.shape[axis]`` (an int, or a traced
      integer scalar).
    axis: the axis to select along.

  Returns:
    bool array of the shape of ``scores``; exactly ``k`` True entries along ``axis``.
  """
  size = scores.shape[axis]
  if isinstance(k, int):
    if not 0 <= k <= size:
      raise ValueError(f'cannot select {k} of {size} entries.')
    if k == 0:
      return jnp.zeros(scores.shape, jnp.bool_)
    if k == size:
      return jnp.ones(scores.shape, jnp.bool_)
  key = jnp.moveaxis(_ordered_key(scores), axis, -1)  # [..., size]
  if size <= _PAIRWISE_MAX:
    pos = jnp.arange(size)
    before = (key[..., None, :] < key[..., :, None]) | (
        (key[..., None, :] == key[..., :, None]) & (pos[None, :] < pos[:, None]))  # [..., i, j]
    selected = jnp.sum(before, axis=-1) < k  # rank of entry i in the stable order
    return jnp.moveaxis(selected, -1, axis)

  def bisect(_, bounds):  # invariant: the k-th smallest key lies in [lo, hi]
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(key <= mid[..., None], axis=-1) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo = jnp.zeros(key.shape[:-1], jnp.uint32)
  hi = jnp.full(key.shape[:-1], 0xFFFFFFFF, jnp.uint32)
  kth, _ = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
  kth = kth[..., None]
  below = key < kth
  tie = key == kth
  room = k - jnp.sum(below, axis=-1, keepdims=True)  # how many of the ties fit, by position
  selected = below | (tie & (jnp.cumsum(tie, axis=-1) <= room))
  return jnp.moveaxis(selected, -1, axis)


def mask_from_scores(scores: jax.Array, spec: PruneSpec) -> jax.Array:
  """Keep-mask from importance scores, compared within each output unit.

  Unstructured: each output unit (column) loses exactly ``int(in * sparsity)`` weights, the lowest
  scores (stable sort, as the Wanda reference). N:M: in every group of ``m`` consecutive input
  weights of each output unit the ``m - n`` lowest scores are pruned.

  Args:
    scores: float ``[in, out]``; higher = more important.
    spec: the sparsity pattern.

  Returns:
    bool ``[in, out]``, True = kept.
  """
  scores = jnp.asarray(scores, jnp.float32)
  n_in, n_out = scores.shape
  spec.check_shape(n_in)
  if spec.is_nm:
    grouped = scores.reshape(n_in // spec.m, spec.m, n_out)  # [in / m, m, out]
    pruned = lowest_k_mask(grouped, spec.m - spec.n, axis=1).reshape(n_in, n_out)
  else:
    pruned = lowest_k_mask(scores, spec.num_pruned(n_in), axis=0)
  return ~pruned


def magnitude_mask(w: jax.Array, spec: PruneSpec) -> jax.Array:
  """Magnitude pruning mask: score ``|W|``. ``w [in, out]`` -> bool ``[in, out]`` (True = kept)."""
  return mask_from_scores(jnp.abs(jnp.asarray(w, jnp.float32)), spec)


def wanda_scores(w: jax.Array, hessian: jax.Array) -> jax.Array:
  """Wanda scores ``|W_ij| * sqrt(H_ii) = |W_ij| * ||X_:,i||``. w ``[in, out]``, H ``[in, in]``."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(jnp.asarray(hessian, jnp.float32)), 0.0))  # [in]
  return jnp.abs(jnp.asarray(w, jnp.float32)) * norms[:, None]


def wanda_mask(w: jax.Array, hessian: jax.Array, spec: PruneSpec) -> jax.Array:
  """Wanda pruning mask.

  Args:
    w: ``[in, out]`` weight.
    hessian: ``[in, in]`` ``X^T X`` (any positive multiple; only the diagonal is used).
    spec: the sparsity pattern.

  Returns:
    bool ``[in, out]``, True = kept.
  """
  check_weight_hessian(w, hessian, 'wanda')
  return mask_from_scores(wanda_scores(w, hessian), spec)


# Wanda++ (Yang et al. 2025, https://arxiv.org/abs/2503.04992): the scale of the regional-gradient
# term. 100 is the paper's default and that of the reproduction it links (TTTTTTris/wandaplus
# ``main.py --rgs_scaling``); see compress/METHODS.md §2.3a.
WANDAPP_ALPHA = 100.0


def wandapp_scores(w: jax.Array, hessian: jax.Array, grad: jax.Array,
                   alpha: float = WANDAPP_ALPHA) -> jax.Array:
  """Wanda++ regional gradient scores ``S_ij = (alpha * G_ij + ||X_:,i||_2) * |W_ij|``.

  Computed as Wanda's score plus the gradient term, ``wanda_scores(w, H) + (alpha * G) * |W|`` (the
  same sum; with ``alpha = 0`` exactly Wanda's scores). ``||X_:,i||_2 = sqrt(H_ii)`` is the norm
  over every calibration token, as in Wanda; ``G`` is the regional gradient magnitude of
  :func:`compress.regional.regional_gradients`.

  Args:
    w: ``[in, out]`` weight.
    hessian: ``[in, in]`` the sum ``X^T X`` of the calibration inputs (only the diagonal is read;
      unlike Wanda, the score depends on its scale relative to ``G``).
    grad: ``[in, out]`` regional gradient magnitudes ``G`` (non-negative).
    alpha: weight of the gradient term.

  Returns:
    float32 ``[in, out]``; higher = more important.
  """
  w = jnp.asarray(w, jnp.float32)
  grad = jnp.asarray(grad, jnp.float32)
  return wanda_scores(w, hessian) + (alpha * grad) * jnp.abs(w)


def wandapp_mask(w: jax.Array, hessian: jax.Array, grad: jax.Array, spec: PruneSpec,
                 alpha: float = WANDAPP_ALPHA) -> jax.Array:
  """Wanda++ pruning mask: :func:`wandapp_scores` selected per output unit like Wanda's.

  Args:
    w: ``[in, out]`` weight.
    hessian: ``[in, in]`` ``X^T X`` (a sum over the calibration tokens; only the diagonal is used).
    grad: ``[in, out]`` regional gradient magnitudes.
    spec: the sparsity pattern.
    alpha: weight of the gradient term (``0``: Wanda's mask).

  Returns:
    bool ``[in, out]``, True = kept.
  """
  check_weight_hessian(w, hessian, 'wanda++')
  if tuple(grad.shape) != tuple(w.shape):
    raise ValueError(f'wanda++: gradient shape {tuple(grad.shape)} does not match weight shape '
                     f'{tuple(w.shape)}.')
  if isinstance(alpha, int | float) and not alpha >= 0:
    raise ValueError(f'wanda++: alpha must be non-negative, got {alpha!r}.')
  return mask_from_scores(wandapp_scores(w, hessian, grad, alpha), spec)


def apply_mask(w: jax.Array, mask: jax.Array) -> jax.Array:
  """``w`` with pruned entries set to exact zeros (dtype kept)."""
  w = jnp.asarray(w)
  return jnp.where(mask, w, jnp.zeros((), w.dtype))


def magnitude(w: jax.Array, spec: PruneSpec) -> tuple[jax.Array, jax.Array]:
  """Magnitude pruning. Returns ``(w_pruned [in, out], mask bool [in, out])``."""
  mask = magnitude_mask(w, spec)
  return apply_mask(w, mask), mask


def wanda(w: jax.Array, hessian: jax.Array, spec: PruneSpec) -> tuple[jax.Array, jax.Array]:
  """Wanda pruning (no weight update). Returns ``(w_pruned [in, out], mask bool [in, out])``."""
  mask = wanda_mask(w, hessian, spec)
  return apply_mask(w, mask), mask


def wandapp(w: jax.Array, hessian: jax.Array, grad: jax.Array, spec: PruneSpec,
            alpha: float = WANDAPP_ALPHA) -> tuple[jax.Array, jax.Array]:
  """Wanda++ pruning with the regional gradient score alone (no regional optimization, no weight
  update). Returns ``(w_pruned [in, out], mask bool [in, out])``."""
  mask = wandapp_mask(w, hessian, grad, spec, alpha)
  return apply_mask(w, mask), mask


def make_sparse_leaf(w_pruned, mask: jax.Array, spec: PruneSpec) -> CompressedLinear:
  """The param-tree leaf of a pruned weight.

  2:4 float weights are stored compressed (:class:`~kernels.formats.Sparse24Weight`, the kept values
  plus their positions, no mask); every other pattern keeps the dense weight with exact zeros plus
  the mask. A :class:`~kernels.formats.QuantizedWeight` (e.g. from joint SparseGPT + quantization)
  is kept as is, with the mask.

  Args:
    w_pruned: ``[in, out]`` float array or QuantizedWeight; pruned entries are zeroed here anyway.
    mask: bool ``[in, out]``, True = kept.
    spec: the pattern the mask follows.

  Returns:
    A :class:`~kernels.formats.CompressedLinear`.
  """
  if tuple(mask.shape) != tuple(w_pruned.shape):
    raise ValueError(f'mask shape {tuple(mask.shape)} does not match weight shape '
                     f'{tuple(w_pruned.shape)}.')
  mask = jnp.asarray(mask, jnp.bool_)
  if isinstance(w_pruned, QuantizedWeight):
    return CompressedLinear(weight=w_pruned, mask=mask)
  w_pruned = apply_mask(jnp.asarray(w_pruned), mask)
  if spec.is_nm and (spec.n, spec.m) == (2, 4):
    return CompressedLinear(weight=sparse24_compress(w_pruned))
  return CompressedLinear(weight=w_pruned, mask=mask)
