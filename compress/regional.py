"""Regional gradients of a decoder block: the gradient term of the Wanda++ pruning score.

Wanda++: Yang, Zhen, Ganesh, Galstyan, Huybrechts, Mueller, Kuebler, Swaminathan, Mouchtaris,
Bodapati, Susanj, Zhang, FitzGerald, Kumar, "Wanda++: Pruning Large Language Models via Regional
Gradients" (2025), https://arxiv.org/abs/2503.04992, the regional gradient score (RGS).
The authors' code is not public; the paper links a community reproduction, TTTTTTris/wandaplus
(``lib/wandaplus_wrapper.py``, ``WeightWandaPlusPruner.pruning``), whose aggregation is followed.

The "region" is one decoder block ``f``. For every calibration sample ``X_n`` (one sequence
``[T, D]`` of the block's input hidden states) the regional loss is the L2 (Frobenius) norm of the
block's output, ``L(X_n) = ||f(X_n)||_2`` (not squared), and its gradient ``g_n`` with respect to
each linear's kernel comes from one backward pass through this block only (no full-model backward).
The per-sample gradients are aggregated as their root mean square,

    G = sqrt((1 / N) * sum_n g_n ** 2)        (elementwise, [in, out] per linear),

which :func:`compress.prune.wandapp_scores` combines with Wanda's score.

Computation: the block runs in float32 (parameters and activations cast up, matmuls at float32
precision), per-sample gradients come from ``vmap`` of ``grad`` over the sequences of a batch, and
only their sum of squares is carried from batch to batch (one float32 ``[in, out]`` per linear; the
per-sample gradients of one batch, ``batch_size`` of them, exist only inside that batch's step). As
in :mod:`compress.calibration`, the whole batches run as one jitted ``lax.scan``.

Mixtures of experts: ``models.llama.block_apply`` runs every expert on every token, weighted by the
router (zero outside a token's top-k), so an expert's gradient sums over the tokens routed to it and
is exactly zero for an expert that received none.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress import calibration
from models import llama
from models import sharding
from models import tree
from models.config import ModelConfig

Params = dict[str, Any]


def _l2_norm(y: jax.Array) -> jax.Array:
  """``||y||_2`` over every entry, float32, with gradient 0 (not NaN) at ``y = 0``."""
  sq = jnp.sum(jnp.square(y.astype(jnp.float32)))
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def sample_loss(kernels: dict[str, jax.Array], block: Params, x: jax.Array,
                cfg: ModelConfig) -> jax.Array:
  """The regional loss ``||f(x)||_2`` of one sample ``x [T, D]``, with the kernels of the linears
  named in ``kernels`` replaced by its values (the variables of the gradient)."""
  for lin, kernel in kernels.items():
    block = tree.set_linear(block, lin, kernel)
  return _l2_norm(llama.block_apply(block, x[None], cfg))


def _grad_step(block: Params, x: jax.Array, sums: dict[str, jax.Array], cfg: ModelConfig,
               linears: tuple[str, ...]) -> dict[str, jax.Array]:
  """``sums`` plus the squares of the per-sample gradients of the batch ``x [B, T, D]``."""
  x = x.astype(jnp.float32)
  kernels = {lin: tree.get_linear(block, lin) for lin in linears}
  per_sample = jax.vmap(jax.grad(sample_loss), in_axes=(None, None, 0, None))
  grads = per_sample(kernels, block, x, cfg)  # {lin: [B, in, out]}
  return {lin: sums[lin] + jnp.sum(jnp.square(grads[lin]), axis=0) for lin in linears}


@functools.lru_cache(maxsize=None)
def _grad_fn(cfg: ModelConfig, linears: tuple[str, ...], scan: bool):
  """Jitted ``(block, x, sums) -> sums`` over one batch ``x [B, T, D]``, or with ``scan`` over
  batches ``x [K, B, T, D]`` in one program."""
  step = functools.partial(_grad_step, cfg=cfg, linears=linears)
  if not scan:
    return jax.jit(step, donate_argnums=(2,))

  def fn(block, xs, sums):
    return jax.lax.scan(lambda s, x: (step(block, sharding.constrain_batch(x), s), None),
                        sums, xs)[0]
  return jax.jit(fn, donate_argnums=(2,))


def _check_linears(block: Params, linears: tuple[str, ...]) -> None:
  """Raises ValueError unless every name is a linear of ``block`` with a plain float kernel."""
  known = llama.block_linear_names(block)
  for lin in linears:
    if lin not in known:
      raise ValueError(f'regional_gradients: {lin!r} is not a linear of this block; its linears '
                       f'are {known}.')
    leaf = tree.get_linear(block, lin)
    if not isinstance(leaf, jax.Array | np.ndarray) or not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(f'regional_gradients: the kernel of {lin!r} is a {type(leaf).__name__}, not '
                       'a dense float array: gradients are taken with respect to dense weights, '
                       'before the linear is compressed.')


def regional_gradients(block: Params, xs: np.ndarray | jax.Array, cfg: ModelConfig,
                       linears: Sequence[str], batch_size: int) -> dict[str, jax.Array]:
  """Wanda++ regional gradient magnitudes of the named linears of one decoder block.

  Args:
    block: the block's params (``params['layers'][i]``); the named linears must hold dense float
      kernels (any other linear may be compressed already). Cast to float32 for the computation.
    xs: ``[N, T, D]`` the block's input hidden states on the calibration set, one sample per row
      (any float dtype; a NumPy array in host memory runs batch by batch).
    cfg: the config resolved for this block (``cfg.layer(i)``).
    linears: names of the block's linears (``'self_attn/q_proj'``, ``'mlp/experts/3/up_proj'``;
      see :func:`models.llama.block_linear_names`).
    batch_size: samples per batch; the per-sample gradients of one batch are held at once.

  Returns:
    ``{linear: G}`` with ``G = sqrt(mean_n g_n ** 2)`` float32 ``[in, out]``, ``g_n`` the gradient
    of ``||block(xs[n])||_2`` with respect to that linear's kernel.
  """
  linears = tuple(dict.fromkeys(linears))
  n = int(xs.shape[0])
  if n == 0:
    raise ValueError('regional_gradients needs at least one calibration sample, got none.')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if not linears:
    return {}
  _check_linears(block, linears)
  block = llama.cast_params(block, jnp.float32)
  sums = {lin: jnp.zeros(tree.get_linear(block, lin).shape, jnp.float32) for lin in linears}
  whole, rest = calibration.split_batches(xs, batch_size)
  with jax.default_matmul_precision('float32'):
    if whole is not None:
      sums = _grad_fn(cfg, linears, True)(block, whole, sums)
    if rest is not None:
      fn = _grad_fn(cfg, linears, False)
      for i in range(0, rest.shape[0], batch_size):
        sums = fn(block, sharding.batch(rest[i:i + batch_size]), sums)
  return {lin: jnp.sqrt(sums[lin] / n) for lin in linears}
