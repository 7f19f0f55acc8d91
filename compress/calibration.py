"""Calibration statistics of one linear layer: the Hessian ``H = X^T X`` and activation magnitudes.

Every post-training method here reads the same statistics, so the model is run over the calibration
set once and the result is cached:

* GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) and SparseGPT use ``H``; the
  reference implementation (IST-DASLab/gptq ``gptq.py GPTQ.add_batch``) keeps the running mean
  ``2 X^T X / n``. GPTQ's result does not depend on the scale of ``H`` (damping is relative to
  ``mean(diag(H))``), so the sum is stored and :func:`mean_hessian` divides when a method wants it.
* Wanda uses ``sqrt(diag(H))``, the L2 norm of each input feature over all tokens.
* AWQ (Lin et al. 2024, https://arxiv.org/abs/2306.00978) uses ``mean |x|`` per input channel
  (llm-awq ``auto_scale.py get_act_scale``) and, in this library, ``H`` to evaluate its output error
  exactly: for ``y = x W`` and a replacement ``W_hat``,
  ``sum_tokens ||x (W - W_hat)||^2 = trace(D^T H D)`` with ``D = W - W_hat`` (:func:`output_error`).

Shapes: ``x [..., in]`` (any leading axes are tokens), ``H [in, in]``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class LinearStats:
  """Sufficient statistics of the inputs ``X [n, in]`` of one linear layer.

  Invariants: ``hessian == X^T X`` (a sum, not divided by ``n``), ``num_tokens == n``,
  ``act_abs_sum == sum_t |X[t]|``. ``diag(hessian)`` is the per-channel sum of squares.

  Attributes:
    hessian: float32 ``[in, in]``.
    num_tokens: int32 scalar.
    act_abs_sum: float32 ``[in]``.
  """
  hessian: jax.Array
  num_tokens: jax.Array
  act_abs_sum: jax.Array

  @property
  def in_features(self) -> int:
    return self.hessian.shape[-1]


def init_stats(in_features: int) -> LinearStats:
  """Empty statistics for a layer with ``in_features`` inputs."""
  if in_features <= 0:
    raise ValueError(f'in_features must be positive, got {in_features}.')
  return LinearStats(
      hessian=jnp.zeros((in_features, in_features), jnp.float32),
      num_tokens=jnp.zeros((), jnp.int32),
      act_abs_sum=jnp.zeros((in_features,), jnp.float32))


def update_stats(stats: LinearStats, x: jax.Array) -> LinearStats:
  """Adds the tokens ``x [..., in]`` (any float dtype) to ``stats``.

  ``x`` is cast to float32 before the product, which runs at ``Precision.HIGHEST`` so that a bf16
  model still accumulates a float32 Hessian.
  """
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != stats.in_features:
    raise ValueError(
        f'update_stats: inputs of shape {x.shape} do not match the statistics of a layer with '
        f'{stats.in_features} input features.')
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [n, in]
  xtx = jnp.matmul(x.T, x, precision=_HIGHEST)  # [in, in]
  return LinearStats(
      hessian=stats.hessian + xtx,
      num_tokens=stats.num_tokens + jnp.asarray(x.shape[0], jnp.int32),
      act_abs_sum=stats.act_abs_sum + jnp.sum(jnp.abs(x), axis=0))


def merge_stats(a: LinearStats, b: LinearStats) -> LinearStats:
  """Statistics of the union of two disjoint token sets (e.g. two devices or two data shards)."""
  if a.hessian.shape != b.hessian.shape:
    raise ValueError(
        f'merge_stats: cannot merge statistics of {a.in_features} and {b.in_features} input '
        'features.')
  return LinearStats(hessian=a.hessian + b.hessian, num_tokens=a.num_tokens + b.num_tokens,
                     act_abs_sum=a.act_abs_sum + b.act_abs_sum)


def mean_hessian(stats: LinearStats) -> jax.Array:
  """``X^T X / n`` ``[in, in]`` (zeros if no token was seen)."""
  n = jnp.maximum(stats.num_tokens, 1).astype(jnp.float32)
  return stats.hessian / n


def mean_abs_activation(stats: LinearStats) -> jax.Array:
  """``mean_t |x_t|`` per input channel ``[in]``: AWQ's activation scale."""
  n = jnp.maximum(stats.num_tokens, 1).astype(jnp.float32)
  return stats.act_abs_sum / n


def check_finite(stats: LinearStats, name: str) -> None:
  """Raises ValueError naming the layer if its statistics hold NaN or Inf.

  Call this on concrete statistics (outside ``jit``) before compressing the layer: a NaN in ``H``
  silently turns every GPTQ/SparseGPT update into NaN.
  """
  bad = []
  for field in ('hessian', 'act_abs_sum'):
    value = np.asarray(getattr(stats, field))
    if not np.all(np.isfinite(value)):
      bad.append(f'{field} ({int(np.sum(~np.isfinite(value)))} non-finite entries)')
  if bad:
    raise ValueError(
        f'calibration statistics of layer {name!r} contain NaN/Inf: {", ".join(bad)}. The '
        'activations reaching this layer overflowed or were NaN; check the calibration inputs and '
        'the dtype of the earlier (possibly already compressed) layers.')


def output_error(w: jax.Array, w_hat: jax.Array, hessian: jax.Array) -> jax.Array:
  """``sum_tokens ||x W - x W_hat||^2 = trace(D^T H D)`` with ``D = W - W_hat``.

  Args:
    w: reference weight ``[in, out]``.
    w_hat: replacement weight ``[in, out]``.
    hessian: ``X^T X`` ``[in, in]`` (pass ``mean_hessian`` for the per-token mean).

  Returns:
    float32 scalar.
  """
  d = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)  # [in, out]
  hd = jnp.matmul(jnp.asarray(hessian, jnp.float32), d, precision=_HIGHEST)  # [in, out]
  return jnp.sum(d * hd)
