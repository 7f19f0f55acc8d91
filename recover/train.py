"""What every training-based recovery shares: the trainable split of weight leaves, the schedule,
and one jitted optax loop (``lax.scan`` over steps).

A weight leaf (a plain ``[in, out]`` array or a :class:`~kernels.formats.CompressedLinear`) is
trained in one of four *modes*; :func:`split_leaf` returns its trainable float arrays and the
frozen rest, :func:`forward_leaf` rebuilds a leaf that ``kernels.linear`` multiplies by (and that
gradients flow through), and :func:`final_leaf` writes the result back in the leaf's own format:

* ``'weights'``: the dense float weight; an unstructured mask or 2:4 pattern is applied in the
  forward pass, so pruned weights get zero gradient and are exactly zero in the result.
* ``'scales'``: only the float scales of a quantized weight; the packed integers stay as they are.
* ``'ste'``: a float latent weight initialised at the dequantized weight, quantized in the forward
  pass on the leaf's fixed grid (scales, zero points, groups) with a clipped straight-through
  estimator; the result is re-quantized and packed (QAT).
* ``'lora'``: a low-rank adapter ``y += x a b`` on a frozen base (QLoRA); the initial adapter is
  the leaf's own (EoRA, SRR, LoftQ) or zero-product (``a`` random, ``b = 0``). ``merge`` folds it
  into a float base at the end (and re-applies the base's sparsity).

Packed integers, masks and 2:4 indices are never differentiated: they sit in the frozen half.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kernels import formats
from kernels.formats import CompressedLinear, LowRank, QuantizedWeight, Sparse24Weight
from models import sharding

MODES = ('weights', 'scales', 'ste', 'lora')


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one leaf is trained (hashable: part of the jitted loop's static key)."""
  mode: str
  lora_rank: int = 16
  lora_alpha: float = 32.0
  merge: bool = False            # lora: fold the adapter into a float base at the end
  preserved_grad_scale: float = 1.0  # lora: gradient scale on SRR's preserved directions

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'unknown training mode {self.mode!r}; choose from {MODES}')


# --------------------------------------------------------------------------- leaf helpers


def _as_compressed(leaf) -> CompressedLinear:
  return leaf if isinstance(leaf, CompressedLinear) else CompressedLinear(weight=jnp.asarray(leaf))


def _quantized(leaf) -> QuantizedWeight | None:
  """The QuantizedWeight inside a leaf (directly, or as the values of a 2:4 weight), or None."""
  w = _as_compressed(leaf).weight
  if isinstance(w, QuantizedWeight):
    return w
  if isinstance(w, Sparse24Weight) and isinstance(w.values, QuantizedWeight):
    return w.values
  return None


def _with_quantized(leaf: CompressedLinear, q: QuantizedWeight) -> CompressedLinear:
  w = leaf.weight
  if isinstance(w, Sparse24Weight):
    return dataclasses.replace(leaf, weight=dataclasses.replace(w, values=q))
  return dataclasses.replace(leaf, weight=q)


def sparsity_mask(leaf) -> jax.Array | None:
  """Bool ``[in, out]`` of the weights a leaf keeps (mask or 2:4 pattern), or None if dense."""
  c = _as_compressed(leaf)
  masks = []
  if c.mask is not None:
    masks.append(c.mask)
  if isinstance(c.weight, Sparse24Weight):
    ones = jnp.ones(c.weight.indices.shape, jnp.float32)
    masks.append(formats.sparse24_decompress(Sparse24Weight(values=ones, indices=c.weight.indices))
                 != 0)
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, masks)


def default_mode(leaf) -> str:
  """'scales' for quantized leaves, 'weights' otherwise."""
  return 'scales' if _quantized(leaf) is not None else 'weights'


def _scale_grad(x: jax.Array, scale) -> jax.Array:
  """Identity forward; gradient multiplied by ``scale`` (broadcast)."""
  return x * scale + jax.lax.stop_gradient(x * (1 - scale))


def fake_quantize(w: jax.Array, q: QuantizedWeight) -> jax.Array:
  """``w`` rounded onto ``q``'s grid (its scales, zero points and groups) with a clipped
  straight-through estimator: the gradient is the identity where ``w`` lies inside the grid's
  range (within half a step of its ends) and zero outside."""
  g = q.group_index()
  s = q.scales.astype(jnp.float32)[g]
  z = q.zeros.astype(jnp.float32)[g]
  qmax = 2 ** q.bits - 1
  lo, hi = (0 - z - 0.5) * s, (qmax - z + 0.5) * s
  wc = jnp.clip(w, jnp.minimum(lo, hi), jnp.maximum(lo, hi))
  wq = (jnp.clip(jnp.round(wc / s) + z, 0, qmax) - z) * s
  return wc + jax.lax.stop_gradient(wq - wc)


def requantize(w: jax.Array, q: QuantizedWeight) -> QuantizedWeight:
  """Rounds a float ``[in, out]`` weight onto ``q``'s grid and packs it (same scales and zeros)."""
  g = q.group_index()
  s = q.scales.astype(jnp.float32)[g]
  z = q.zeros.astype(jnp.float32)[g]
  ints = jnp.clip(jnp.round(w / s) + z, 0, 2 ** q.bits - 1).astype(jnp.int32)
  return QuantizedWeight.from_ints(ints, q.scales, q.zeros, q.spec, q.g_idx)


def _float_adapter(adapter: LowRank) -> tuple[jax.Array, jax.Array]:
  return formats.to_dense(adapter.a), formats.to_dense(adapter.b)


# --------------------------------------------------------------------------- split / rebuild


def split_leaf(leaf, plan: LeafPlan, key: jax.Array | None = None) -> tuple[dict, dict]:
  """``(trainable, frozen)`` dicts of arrays for one leaf under ``plan``."""
  c = _as_compressed(leaf)
  if plan.mode == 'weights':
    if _quantized(c) is not None:
      raise ValueError("mode 'weights' needs a float weight; quantized leaves train 'scales', "
                       "'ste' or 'lora'")
    return {'w': formats.to_dense(c.weight)}, {'leaf': c, 'mask': sparsity_mask(c)}
  if plan.mode == 'scales':
    q = _quantized(c)
    if q is None:
      raise ValueError("mode 'scales' needs a quantized weight")
    return {'scales': q.scales.astype(jnp.float32)}, {'leaf': c}
  if plan.mode == 'ste':
    q = _quantized(c)
    if q is None or not isinstance(c.weight, QuantizedWeight):
      raise ValueError("mode 'ste' needs a quantized (not 2:4-packed) weight")
    return {'w': formats.dequantize(q)}, {'leaf': c, 'mask': c.mask}
  # lora
  if c.adapter is not None:
    a, b = _float_adapter(c.adapter)
    return {'a': a, 'b': b}, {'leaf': dataclasses.replace(c, adapter=None)}
  if key is None:
    raise ValueError('a zero-initialised LoRA needs a PRNG key')
  n_in, n_out = c.shape
  r = min(plan.lora_rank, n_in, n_out)
  # Kaiming-uniform a, zero b (the LoRA / QLoRA init); the alpha / r scale is folded into a.
  bound = 1.0 / np.sqrt(n_in)
  a = jax.random.uniform(key, (n_in, r), jnp.float32, -bound, bound) * (plan.lora_alpha / r)
  return {'a': a, 'b': jnp.zeros((r, n_out), jnp.float32)}, {'leaf': c}


def forward_leaf(plan: LeafPlan, trainable: dict, frozen: dict, preserved: int = 0):
  """The leaf the forward pass multiplies by (differentiable in ``trainable``)."""
  c = frozen['leaf']
  if plan.mode in ('weights', 'ste'):
    w = trainable['w']
    if plan.mode == 'ste':
      w = fake_quantize(w, c.weight)
    if frozen['mask'] is not None:
      w = jnp.where(frozen['mask'], w, 0.0)
    return CompressedLinear(weight=w, adapter=c.adapter)
  if plan.mode == 'scales':
    q = _quantized(c)
    return _with_quantized(c, dataclasses.replace(q, scales=trainable['scales']))
  a, b = trainable['a'], trainable['b']
  if preserved and plan.preserved_grad_scale != 1.0:
    r = a.shape[1]
    scale = jnp.where(jnp.arange(r) < preserved, plan.preserved_grad_scale, 1.0)
    a = _scale_grad(a, scale[None, :])
    b = _scale_grad(b, scale[:, None])
  return dataclasses.replace(c, adapter=LowRank(a=a, b=b))


def final_leaf(plan: LeafPlan, trainable: dict, frozen: dict, original):
  """The trained leaf in the original leaf's format."""
  c = frozen['leaf']
  if plan.mode == 'weights':
    w = trainable['w']
    mask = frozen['mask']
    if mask is not None:
      w = jnp.where(mask, w, 0.0)
    if isinstance(c.weight, Sparse24Weight):
      new = dataclasses.replace(c, weight=formats.sparse24_compress(w))
    else:
      new = dataclasses.replace(c, weight=w.astype(jnp.asarray(c.weight).dtype))
    return new if isinstance(original, CompressedLinear) else new.weight
  if plan.mode == 'scales':
    return _with_quantized(c, dataclasses.replace(_quantized(c), scales=trainable['scales']))
  if plan.mode == 'ste':
    w = trainable['w']
    if c.mask is not None:
      w = jnp.where(c.mask, w, 0.0)
    return dataclasses.replace(c, weight=requantize(w, c.weight))
  preserved = original.adapter.preserved if (
      isinstance(original, CompressedLinear) and original.adapter is not None) else 0
  adapter = LowRank(a=trainable['a'], b=trainable['b'], preserved=preserved)
  if plan.merge:
    if _quantized(c) is not None:
      raise ValueError('cannot merge a LoRA into a quantized weight; keep it as an adapter')
    w = formats.to_dense(c.weight) + adapter.a @ adapter.b
    mask = sparsity_mask(c)
    if mask is not None:
      w = jnp.where(mask, w, 0.0)
    new = final_leaf(LeafPlan('weights'), {'w': w}, {'leaf': c, 'mask': mask}, c)
    return new if isinstance(original, CompressedLinear) else new.weight
  return dataclasses.replace(c, adapter=adapter)


# --------------------------------------------------------------------------- trees of leaves


@dataclasses.dataclass
class Split:
  """The trainable split of a dict ``{path: leaf}``: ``plans``/``preserved`` are static."""
  trainable: dict[str, dict]
  frozen: dict[str, dict]
  plans: dict[str, LeafPlan]
  preserved: dict[str, int]
  originals: dict[str, Any]

  @property
  def static_key(self) -> tuple:
    return tuple(sorted((k, self.plans[k], self.preserved[k]) for k in self.plans))


def split_leaves(leaves: dict[str, Any], plans: dict[str, LeafPlan], key: jax.Array) -> Split:
  """Splits every leaf that has a plan; ``leaves`` maps a path to a weight leaf."""
  trainable, frozen, preserved = {}, {}, {}
  for i, (path, plan) in enumerate(sorted(plans.items())):
    leaf = leaves[path]
    trainable[path], frozen[path] = split_leaf(leaf, plan, jax.random.fold_in(key, i))
    ad = leaf.adapter if isinstance(leaf, CompressedLinear) else None
    preserved[path] = ad.preserved if (plan.mode == 'lora' and ad is not None) else 0
  return Split(trainable, frozen, dict(plans), preserved, {p: leaves[p] for p in plans})


def forward_leaves(split_static: tuple, trainable: dict, frozen: dict) -> dict[str, Any]:
  """``{path: forward leaf}`` from a split's static key and its arrays."""
  return {path: forward_leaf(plan, trainable[path], frozen[path], preserved)
          for path, plan, preserved in split_static}


def final_leaves(split: Split, trainable: dict) -> dict[str, Any]:
  return {p: final_leaf(split.plans[p], trainable[p], split.frozen[p], split.originals[p])
          for p in split.plans}


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------- schedule and loop


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then linear decay (the Free Lunch reference defaults)."""
  lr: float = 1e-5
  warmup: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  clip_norm: float | None = None

  def __post_init__(self):
    if not self.lr > 0:
      raise ValueError(f'learning rate must be positive, got {self.lr}')
    if not 0 <= self.warmup < 1:
      raise ValueError(f'warmup fraction must be in [0, 1), got {self.warmup}')


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
  warm = int(round(cfg.warmup * steps))
  return optax.join_schedules([
      optax.linear_schedule(0.0, cfg.lr, max(warm, 1)),
      optax.linear_schedule(cfg.lr, 0.0, max(steps - warm, 1)),
  ], [warm]) if warm else optax.linear_schedule(cfg.lr, 0.0, max(steps, 1))


def optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
  opt = optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  if cfg.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt


def batch_order(n: int, batch_size: int, epochs: float, seed: int) -> np.ndarray:
  """``[steps, batch_size]`` sample indices: a fresh seeded permutation per epoch, whole batches
  (a fractional ``epochs`` runs that share of the last epoch)."""
  if batch_size <= 0 or batch_size > n:
    raise ValueError(f'batch size must be in [1, {n}] (the number of samples), got {batch_size}')
  if not epochs > 0:
    raise ValueError(f'epochs must be positive, got {epochs}')
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  steps = max(1, int(round(per_epoch * epochs)))
  rows = []
  while len(rows) < steps:
    perm = rng.permutation(n)[:per_epoch * batch_size].reshape(per_epoch, batch_size)
    rows.extend(perm)
  return np.asarray(rows[:steps], np.int32)


LossFn = Callable[[Any, Any, Any], jax.Array]  # (trainable, frozen, batch) -> scalar


def train_steps(loss_fn: LossFn, opt: optax.GradientTransformation) -> Callable:
  """``run((trainable, opt_state), frozen, data, order) -> ((trainable, opt_state), losses)``:
  the optimizer steps over batches ``data[order[s]]`` in one ``lax.scan``, from and to a carried
  optimizer state (so a long run can be cut into resumable chunks). The caller jits it (statics
  bound in ``loss_fn``); only ``trainable`` is differentiated. The batches split along the data
  axis of the active placement; the carry and ``frozen`` stay where its ``params`` rule puts them
  (the caller passes them placed by :func:`models.sharding.shard_params`, so that a fully sharded
  run never holds them whole)."""
  def run(carry, frozen, data, order):
    carry, frozen = sharding.constrain_params((carry, frozen))
    def step(carry, idx):
      params, state = carry
      batch = sharding.constrain_batch(jax.tree.map(lambda d: jnp.take(d, idx, axis=0), data))
      loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch)
      updates, state = opt.update(grads, state, params)
      # Parameters and optimizer state stay where the placement's rule puts them (fsdp: split).
      carry = sharding.constrain_params((optax.apply_updates(params, updates), state))
      return carry, loss
    return jax.lax.scan(step, carry, order)
  return run


def train_loop(loss_fn: LossFn, opt: optax.GradientTransformation) -> Callable:
  """``run(trainable, frozen, data, order) -> (trainable, losses [steps])``: :func:`train_steps`
  from a fresh optimizer state."""
  steps = train_steps(loss_fn, opt)

  def run(trainable, frozen, data, order):
    (trainable, _), losses = steps((trainable, opt.init(trainable)), frozen, data, order)
    return trainable, losses
  return run


def peak_memory_bytes() -> int | None:
  """Peak device memory if the backend reports it (GPU/TPU), else the process's peak RSS."""
  try:
    stats = jax.local_devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      return int(stats['peak_bytes_in_use'])
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    import resource  # pylint: disable=g-import-not-at-top
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
  except Exception:  # pylint: disable=broad-except
    return None
