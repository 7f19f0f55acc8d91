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
* Asymmetric calibration (GPTAQ, Li et al. 2025, https://arxiv.org/abs/2504.02692) fits the
  compressed model's inputs ``X~`` to the dense model's outputs ``X W`` and also reads the cross
  term ``(X - X~)^T X~`` (``LinearStats.cross``), from the same block run on both streams.

Shapes: ``x [..., in]`` (any leading axes are tokens), ``H [in, in]``.

:func:`collect_stats` runs one decoder block over calibration activations and accumulates the
statistics of every distinct linear input (q/k/v share one, gate/up share one);
:func:`dense_statistics` does so for every block of the dense model in one pass.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from models import llama
from models import sharding
from models.config import ModelConfig

Params = dict[str, Any]

_HIGHEST = jax.lax.Precision.HIGHEST
# X^T X is symmetric: with its columns split in p blocks only the products on and above the block
# diagonal are computed (the rest are their transposes), (p + 1) / (2 p) of the work. Measured on
# 4096 tokens (2 CPU cores, results/compress_timing): 576 features in 3 blocks take 0.83x the time
# of one product, 1536 in 2 blocks 0.77x; more blocks of these widths lose to their overhead.
GRAM_PARTS = ((256, 1), (1024, 3), (None, 2))  # (below this many features, blocks)


def _gram_parts(d: int) -> int:
  return next(p for limit, p in GRAM_PARTS if limit is None or d < limit)


def gram(x: jax.Array) -> jax.Array:
  """``x^T x`` for ``x [n, d]`` (float32 at ``Precision.HIGHEST``), exactly symmetric."""
  d = x.shape[-1]
  parts = _gram_parts(d)
  if parts <= 1:
    return jnp.matmul(x.T, x, precision=_HIGHEST)
  step = -(-d // parts)
  edges = list(range(0, d, step)) + [d]
  upper = [jnp.matmul(x[:, a:b].T, x[:, a:], precision=_HIGHEST)  # [b - a, d - a]
           for a, b in zip(edges[:-1], edges[1:])]
  rows = []
  for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
    left = [upper[j][:, a - edges[j]:b - edges[j]].T for j in range(i)]
    rows.append(jnp.concatenate(left + [upper[i]], axis=1))
  return jnp.concatenate(rows, axis=0)


@flax.struct.dataclass
class LinearStats:
  """Sufficient statistics of the inputs ``X [n, in]`` of one linear layer.

  Invariants: ``hessian == X^T X`` (a sum, not divided by ``n``), ``num_tokens == n``,
  ``act_abs_sum == sum_t |X[t]|``. ``diag(hessian)`` is the per-channel sum of squares.

  Attributes:
    hessian: float32 ``[in, in]``.
    num_tokens: int32 scalar.
    act_abs_sum: float32 ``[in]``, or None where it was not asked for (only AWQ reads it; a
      pass without it skips a reduction over every input, ~3% of a statistics pass).
    diagonal: ``hessian`` holds only the diagonal of ``X^T X`` (zeros elsewhere): all that Wanda,
      magnitude pruning and RTN read, at a fraction of the cost (no ``X^T X`` product). Methods
      that need the whole ``H`` (GPTQ, SparseGPT, AWQ, the low-rank recoveries) refuse it.
    cross: float32 ``[in, in]`` or None: ``sum_t (x_dense_t - x_t)^T x_t``, where ``x_t`` is the
      token's input in the stream these statistics describe (the compressed model's) and
      ``x_dense_t`` the same token's input in the dense model. Held only when asked for
      (:func:`init_stats` ``cross=True``); what asymmetric calibration (GPTAQ) reads. A sum like
      ``hessian``, so the two keep the same scale.
  """
  hessian: jax.Array
  num_tokens: jax.Array
  act_abs_sum: jax.Array | None
  diagonal: bool = flax.struct.field(pytree_node=False, default=False)
  cross: jax.Array | None = None

  @property
  def in_features(self) -> int:
    return self.hessian.shape[-1]


def init_stats(in_features: int, diagonal: bool = False, cross: bool = False,
               abs_sum: bool = True) -> LinearStats:
  """Empty statistics for a layer with ``in_features`` inputs (``diagonal``: of ``diag(H)``
  only; ``cross``: also the dense/compressed cross term; ``abs_sum``: also ``sum |x|``; see
  :class:`LinearStats`)."""
  if in_features <= 0:
    raise ValueError(f'in_features must be positive, got {in_features}.')
  if diagonal and cross:
    raise ValueError('the cross term is for asymmetric calibration, which needs the whole H')
  return LinearStats(
      hessian=jnp.zeros((in_features, in_features), jnp.float32),
      num_tokens=jnp.zeros((), jnp.int32),
      act_abs_sum=jnp.zeros((in_features,), jnp.float32) if abs_sum else None, diagonal=diagonal,
      cross=jnp.zeros((in_features, in_features), jnp.float32) if cross else None)


def require_full(stats: LinearStats, what: str) -> None:
  """Raises ValueError when ``stats`` holds only ``diag(H)`` and ``what`` needs all of it."""
  if stats.diagonal:
    raise ValueError(f'{what} needs the whole H = X^T X; these statistics hold only its diagonal')


def update_stats(stats: LinearStats, x: jax.Array, mask: jax.Array | None = None,
                 dense: jax.Array | None = None) -> LinearStats:
  """Adds the tokens ``x [..., in]`` (any float dtype) to ``stats``; with ``mask [...]`` (bool)
  only the tokens where it is True (e.g. those a router sent to one expert).

  ``dense`` (same shape as ``x``): the same tokens' inputs in the dense model, required exactly
  when ``stats`` holds the cross term (it then grows by ``(dense - x)^T x`` over the kept tokens).

  ``x`` is cast to float32 before the product, which runs at ``Precision.HIGHEST`` so that a bf16
  model still accumulates a float32 Hessian.
  """
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != stats.in_features:
    raise ValueError(
        f'update_stats: inputs of shape {x.shape} do not match the statistics of a layer with '
        f'{stats.in_features} input features.')
  if (dense is None) != (stats.cross is None):
    raise ValueError('update_stats: pass the dense inputs exactly when the statistics hold the '
                     f'cross term (they {"do not " if stats.cross is None else ""}hold it).')
  if dense is not None and tuple(dense.shape) != tuple(x.shape):
    raise ValueError(f'update_stats: dense inputs of shape {tuple(dense.shape)} do not match the '
                     f'inputs {tuple(x.shape)}.')
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [n, in]
  n = jnp.asarray(x.shape[0], jnp.int32)
  keep = None
  if mask is not None:
    keep = jnp.asarray(mask).reshape(-1)
    x = jnp.where(keep[:, None], x, 0.0)
    n = jnp.sum(keep, dtype=jnp.int32)
  if stats.diagonal:
    xtx = jnp.diag(jnp.sum(x * x, axis=0))  # [in, in], zeros off the diagonal
  else:
    xtx = gram(x)  # [in, in]
  cross = stats.cross
  if dense is not None:
    dx = jnp.asarray(dense).reshape(-1, x.shape[-1]).astype(jnp.float32) - x
    if keep is not None:
      dx = jnp.where(keep[:, None], dx, 0.0)
    cross = cross + jnp.matmul(dx.T, x, precision=_HIGHEST)  # [in, in]
  return LinearStats(
      hessian=stats.hessian + xtx,
      num_tokens=stats.num_tokens + n,
      act_abs_sum=(None if stats.act_abs_sum is None
                   else stats.act_abs_sum + jnp.sum(jnp.abs(x), axis=0)),
      diagonal=stats.diagonal,
      cross=cross)


def merge_stats(a: LinearStats, b: LinearStats) -> LinearStats:
  """Statistics of the union of two disjoint token sets (e.g. two devices or two data shards)."""
  if (a.hessian.shape != b.hessian.shape or a.diagonal != b.diagonal
      or (a.cross is None) != (b.cross is None)
      or (a.act_abs_sum is None) != (b.act_abs_sum is None)):
    raise ValueError(
        f'merge_stats: cannot merge statistics of {a.in_features} and {b.in_features} input '
        f'features (diagonal only: {a.diagonal}, {b.diagonal}; cross term: '
        f'{a.cross is not None}, {b.cross is not None}; sum |x|: '
        f'{a.act_abs_sum is not None}, {b.act_abs_sum is not None}).')
  return LinearStats(hessian=a.hessian + b.hessian, num_tokens=a.num_tokens + b.num_tokens,
                     act_abs_sum=(None if a.act_abs_sum is None
                                  else a.act_abs_sum + b.act_abs_sum), diagonal=a.diagonal,
                     cross=None if a.cross is None else a.cross + b.cross)


def mean_hessian(stats: LinearStats) -> jax.Array:
  """``X^T X / n`` ``[in, in]`` (zeros if no token was seen)."""
  n = jnp.maximum(stats.num_tokens, 1).astype(jnp.float32)
  return stats.hessian / n


def mean_abs_activation(stats: LinearStats) -> jax.Array:
  """``mean_t |x_t|`` per input channel ``[in]``: AWQ's activation scale."""
  if stats.act_abs_sum is None:
    raise ValueError('these statistics were collected without sum |x| (abs_sum=False): AWQ '
                     'needs it')
  n = jnp.maximum(stats.num_tokens, 1).astype(jnp.float32)
  return stats.act_abs_sum / n


def check_finite(stats: LinearStats, name: str) -> None:
  """Raises ValueError naming the layer if its statistics hold NaN or Inf.

  Call this on concrete statistics (outside ``jit``) before compressing the layer: a NaN in ``H``
  silently turns every GPTQ/SparseGPT update into NaN.
  """
  bad = []
  for field in ('hessian', 'act_abs_sum', 'cross'):
    if getattr(stats, field) is None:
      continue
    value = np.asarray(getattr(stats, field))
    if not np.all(np.isfinite(value)):
      bad.append(f'{field} ({int(np.sum(~np.isfinite(value)))} non-finite entries)')
  if bad:
    raise ValueError(
        f'calibration statistics of layer {name!r} contain NaN/Inf: {", ".join(bad)}. The '
        'activations reaching this layer overflowed or were NaN; check the calibration inputs and '
        'the dtype of the earlier (possibly already compressed) layers.')


def check_weight_hessian(w, hessian, method: str) -> int:
  """Raises ValueError unless ``w`` is ``[in, out]`` and ``hessian`` is ``[in, in]``; returns ``in``."""
  if w.ndim != 2:
    raise ValueError(f'{method} expects a 2-D weight [in, out], got shape {tuple(w.shape)}.')
  n_in = w.shape[0]
  if tuple(hessian.shape) != (n_in, n_in):
    raise ValueError(f'{method}: hessian shape {tuple(hessian.shape)} does not match a weight with '
                     f'{n_in} inputs (expected ({n_in}, {n_in})).')
  return n_in


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


# --------------------------------------------------------------------------- collecting statistics


def _stats_step(block, x, stats, cfg: ModelConfig, keys: tuple[str, ...], routed: bool,
                dense_block=None, x_dense=None):
  """``stats`` plus the statistics of the named inputs of ``block`` on the batch ``x``; an
  expert's inputs count only the tokens routed to it when ``routed``, else every token. Inputs
  whose statistics hold the cross term also read the same batch's dense stream: ``dense_block``
  (the dense block) on ``x_dense``."""
  _, inputs = llama.block_apply(block, x, cfg, return_inputs=True)
  dense_inputs = None
  if x_dense is not None:
    _, dense_inputs = llama.block_apply(dense_block, x_dense, cfg, return_inputs=True)
  out = {}
  for k in keys:
    e = llama.expert_of(k)
    mask = inputs['routed'][..., e] if routed and e is not None else None
    dense = None if stats[k].cross is None else dense_inputs[k]
    out[k] = update_stats(stats[k], inputs[k], mask, dense)
  return out


@functools.lru_cache(maxsize=None)
def _stats_fn(cfg: ModelConfig, keys: tuple[str, ...], dtype_name: str, routed: bool,
              scan: bool, two_streams: bool = False):
  """Jitted ``(block, x, stats) -> stats`` over one batch ``x [B, T, D]``, or with ``scan`` over
  batches ``x [K, B, T, D]`` in one program (one call per block: XLA reuses its buffers from batch
  to batch, where separate calls cost ~25% more on a CPU). ``two_streams``:
  ``(block, x, stats, dense_block, x_dense) -> stats``, both streams' batches in the same
  program (for the cross term)."""
  step = functools.partial(_stats_step, cfg=cfg, keys=keys, routed=routed)
  if not scan:
    return jax.jit(step, donate_argnums=(2,))

  if two_streams:
    def fn2(block, xs, stats, dense_block, xs_dense):
      def body(st, pair):
        x, xd = pair
        return step(block, sharding.constrain_batch(x), st, dense_block=dense_block,
                    x_dense=sharding.constrain_batch(xd)), None
      return jax.lax.scan(body, stats, (xs, xs_dense))[0]
    return jax.jit(fn2, donate_argnums=(2,))

  def fn(block, xs, stats):
    return jax.lax.scan(lambda st, x: (step(block, sharding.constrain_batch(x), st), None),
                        stats, xs)[0]
  return jax.jit(fn, donate_argnums=(2,))


@functools.lru_cache(maxsize=None)
def _out_fn(cfg: ModelConfig, dtype_name: str, scan: bool = False):
  """Jitted block output on one batch, or with ``scan`` on batches ``[K, B, T, D]`` (flattened
  back to ``[K * B, T, D]``) in one program."""
  if not scan:
    return jax.jit(lambda block, x: llama.block_apply(block, x, cfg))

  def fn(block, xs):
    ys = jax.lax.map(lambda x: llama.block_apply(block, sharding.constrain_batch(x), cfg), xs)
    return ys.reshape((-1,) + ys.shape[2:])
  return jax.jit(fn)


# On the CPU, XLA gives every execution of a program fresh temporaries, which the OS maps in page
# by page: a block's pass over 8 x 512 tokens per step faulted in ~270 MB (~66k pages) each time,
# ~10% of its time. Steps of at most this many tokens per device shrink that cost with the
# temporaries (SmolLM2-135M, 2 cores: 2 x 512 per step ran a block's output pass 10% and its
# statistics pass 7% faster than 8 x 512; 1 x 512 was slower again). Other backends keep their
# buffers and take ``batch_size`` sequences per step.
CPU_STEP_TOKENS = 1024


def step_size(batch_size: int, seqlen: int) -> int:
  """Sequences per step of a calibration pass: ``batch_size``, or on the CPU as many as keep a
  device's step within :data:`CPU_STEP_TOKENS` tokens (at least one per device of the data axis,
  so that a step still splits over them)."""
  if jax.default_backend() != 'cpu':
    return batch_size
  data = sharding.active().data_size
  return max(1, min(batch_size, data * max(1, CPU_STEP_TOKENS // max(seqlen, 1))))


def split_batches(xs, batch_size: int) -> tuple[Any, Any]:
  """``(whole batches [K, B, T, D] on the devices, or None; the last rows that make no whole
  batch, or None)``. Activations in host memory (``--offload=host``) give no whole batches: each
  batch moves to the devices when used."""
  n = xs.shape[0]
  if isinstance(xs, np.ndarray) or n < batch_size:
    return None, xs
  full = n - n % batch_size
  head = sharding.batches(xs if full == n else xs[:full], batch_size)
  return head, None if full == n else xs[full:]


def input_width(cfg: ModelConfig, key: str) -> int:
  """Features of the linear input ``key`` (see :func:`models.llama.input_key`)."""
  shapes = llama.linear_shapes(cfg)
  return next(shapes[lin][0] for lin in shapes if llama.input_key(lin) == key)


def collect_stats(block: Params, xs: np.ndarray | jax.Array, cfg: ModelConfig,
                  keys: Sequence[str], batch_size: int, *, routed: bool = True,
                  diagonal: bool = False, cross_keys: Sequence[str] = (),
                  dense_block: Params | None = None,
                  dense_xs: np.ndarray | jax.Array | None = None,
                  abs_sum: bool = True) -> dict[str, LinearStats]:
  """Statistics of the inputs ``keys`` (see ``llama.input_key``) of ``block`` on ``xs [N,T,D]``.

  ``routed``: a mixture's expert inputs count only the tokens the router sends to that expert
  (False: every token of the block, for experts the calibration set starves). ``diagonal``: only
  ``diag(H)`` (:class:`LinearStats`). ``cross_keys`` (a subset of ``keys``): also collect the cross
  term ``sum_t (x_dense_t - x_t)^T x_t`` of these inputs, with ``x_dense`` the inputs of
  ``dense_block`` on ``dense_xs`` (the dense stream: same tokens, same shape as ``xs``), run in the
  same jitted program as ``block`` on ``xs``. An expert's tokens are those routed to it in ``xs``.
  ``abs_sum``: also ``sum |x|`` (AWQ's; see :class:`LinearStats`).
  """
  keys = tuple(sorted(set(keys)))
  cross_keys = frozenset(cross_keys)
  if not cross_keys <= set(keys):
    raise ValueError(f'collect_stats: cross_keys {sorted(cross_keys - set(keys))} are not among '
                     f'the keys {list(keys)}')
  two = bool(cross_keys)
  if two and (dense_block is None or dense_xs is None):
    raise ValueError('collect_stats: the cross term needs the dense block and its inputs')
  if two and tuple(dense_xs.shape) != tuple(xs.shape):
    raise ValueError(f'collect_stats: dense inputs {tuple(dense_xs.shape)} do not match the '
                     f'inputs {tuple(xs.shape)}')
  stats = {k: init_stats(input_width(cfg, k), diagonal, k in cross_keys, abs_sum) for k in keys}
  dtype_name = jnp.dtype(xs.dtype).name
  batch_size = step_size(batch_size, xs.shape[1])
  whole, rest = split_batches(xs, batch_size)
  dense_whole, dense_rest = split_batches(dense_xs, batch_size) if two else (None, None)
  if two and (whole is None) != (dense_whole is None):  # one stream on the host, one on devices
    whole, rest, dense_whole, dense_rest = None, xs, None, dense_xs
  if whole is not None:
    fn = _stats_fn(cfg, keys, dtype_name, routed, True, two)
    stats = fn(block, whole, stats, dense_block, dense_whole) if two else fn(block, whole, stats)
  if rest is not None:
    fn = _stats_fn(cfg, keys, dtype_name, routed, False)
    for i in range(0, rest.shape[0], batch_size):
      if two:
        stats = fn(block, sharding.batch(rest[i:i + batch_size]), stats, dense_block=dense_block,
                   x_dense=sharding.batch(dense_rest[i:i + batch_size]))
      else:
        stats = fn(block, sharding.batch(rest[i:i + batch_size]), stats)
  return stats


def run_block(block: Params, xs, cfg: ModelConfig, batch_size: int) -> Any:
  """Block ``block``'s output on ``xs [N, T, D]``, ``batch_size`` sequences per step (on the CPU
  fewer: :func:`step_size`): a device array, or a NumPy array in host memory under
  ``--offload=host``."""
  dtype_name = jnp.dtype(xs.dtype).name
  batch_size = step_size(batch_size, xs.shape[1])
  whole, rest = split_batches(xs, batch_size)
  outs = [] if whole is None else [sharding.activations(_out_fn(cfg, dtype_name, True)(block,
                                                                                       whole))]
  if rest is not None:
    fn = _out_fn(cfg, dtype_name)
    outs += [sharding.activations(fn(block, sharding.batch(rest[i:i + batch_size])))
             for i in range(0, rest.shape[0], batch_size)]
  if len(outs) == 1:
    return outs[0]
  return np.concatenate(outs, axis=0) if isinstance(outs[0], np.ndarray) else jnp.concatenate(
      outs, axis=0)


def dense_statistics(params: Params, cfg: ModelConfig, tokens: np.ndarray, *, batch_size: int = 8,
                     dtype=jnp.float32, blocks: Sequence[int] | None = None,
                     progress: bool = True) -> list[dict[str, LinearStats] | None]:
  """Statistics of every linear input of every block on the *dense* model's activations.

  One pass over the model; the result can be handed to :func:`compress.pipeline.compress_model` as
  ``precomputed_stats`` so that several compressions calibrated on dense inputs share it.
  ``blocks`` limits which blocks get statistics (the others hold None).
  """
  keys = sorted(set(llama.linear_inputs(cfg).values()))
  wanted = set(range(cfg.num_layers)) if blocks is None else set(blocks)
  x = llama.embed(params, jnp.asarray(tokens), cfg, dtype)
  out: list[dict[str, LinearStats] | None] = [None] * cfg.num_layers
  for i in tqdm(range(max(wanted) + 1), desc='dense statistics', disable=not progress):
    block = params['layers'][i]
    if i in wanted:
      out[i] = collect_stats(block, x, cfg.layer(i), keys, batch_size)
      for k, st in out[i].items():
        check_finite(st, f'layers/{i}/{k}')
    if i < max(wanted):
      x = run_block(block, x, cfg.layer(i), batch_size)
  return out
