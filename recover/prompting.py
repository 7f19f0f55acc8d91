"""IDP, inference-time dynamic prompting (Hoang et al. 2024, "Do Compressed LLMs Forget Knowledge?
An Experimental Study with Practical Implications"): recovery without weight changes.

A :class:`PromptPool` holds ``P`` learned soft prompts (``[P, L, D]`` input embeddings) and one key
per prompt (``[P, D]``, unit norm). Per input, :func:`route` picks the prompt whose key has the
largest cosine similarity to the input's routing feature (:func:`input_key`), and
:func:`forward_with_pool` runs the frozen (compressed) model with that prompt prepended
(:func:`models.llama.forward`'s ``prefix``).

Routing feature (:func:`input_key`): the input's hidden states from the model *without* any prompt,
averaged over its (unpadded) positions and L2-normalised. By default these are the final-norm'd
hidden states (what the LM head reads; ``layer=None``), which costs one extra forward pass per
input at inference; ``layer=k`` reads the residual stream after ``k`` blocks instead (``0``: the
token embeddings, free; each position RMS-normalised without a scale before averaging, so no
position with outsized activations dominates), which costs ``k`` blocks. A pool stores the layer
its keys were built with, so inference routes with the same feature.

Training (:func:`train_pool`): one prompt per group of training windows (corpora, or the
:func:`cluster` groups of unlabeled windows); each prompt is trained alone with the LM
cross-entropy of its group's token positions (the prompt positions predict nothing), the model
frozen, AdamW through :func:`recover.train.train_loop`. Prompts start at the embeddings of random
vocabulary tokens (seeded). A prompt's key is the normalised mean of its group's normalised
routing features.

Library functions carry no ``jax.jit``; the loops here (:func:`input_keys`, :func:`train_pool`)
jit their unit of work, and callers jit :func:`forward_with_pool`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models import losses as losses_lib
from models.config import ModelConfig
from recover import train as train_lib

Params = dict[str, Any]


@flax.struct.dataclass
class PromptPool:
  """``P`` soft prompts and their routing keys.

  Invariant: ``keys`` rows have unit L2 norm and were built with :func:`input_key` at
  ``route_layer`` (None: the final-norm'd hidden states)."""
  prompts: jax.Array  # [P, L, D] float32 input embeddings
  keys: jax.Array     # [P, D] float32, unit norm
  route_layer: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_prompts(self) -> int:
    return self.prompts.shape[0]

  @property
  def prompt_len(self) -> int:
    return self.prompts.shape[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class IDPConfig:
  """How a prompt pool is trained (one prompt per group of training windows).

  Attributes:
    num_prompts: prompts in the pool (= number of groups).
    prompt_len: soft-prompt tokens per prompt.
    steps: AdamW steps per prompt.
    batch_size: windows per step (clipped to the group size).
    lr: peak learning rate (linear warmup, then linear decay to 0).
    warmup: warmup share of the steps.
    seed: initial prompts and batch order.
    route_layer: routing feature (:func:`input_key`'s ``layer``); None = final-norm'd states.
  """
  num_prompts: int = 2
  prompt_len: int = 8
  steps: int = 100
  batch_size: int = 2
  lr: float = 1e-3
  warmup: float = 0.1
  seed: int = 0
  route_layer: int | None = None

  def __post_init__(self):
    def check(ok, field, what):
      if not ok:
        raise ValueError(f'IDPConfig.{field} {what}, got {getattr(self, field)!r}')
    check(isinstance(self.num_prompts, int) and self.num_prompts >= 1, 'num_prompts',
          'must be a positive integer')
    check(isinstance(self.prompt_len, int) and self.prompt_len >= 1, 'prompt_len',
          'must be a positive integer')
    check(isinstance(self.steps, int) and self.steps >= 1, 'steps', 'must be a positive integer')
    check(isinstance(self.batch_size, int) and self.batch_size >= 1, 'batch_size',
          'must be a positive integer')
    check(isinstance(self.lr, (int, float)) and self.lr > 0, 'lr', 'must be positive')
    check(isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1, 'warmup',
          'must be in [0, 1)')
    check(isinstance(self.seed, int), 'seed', 'must be an integer')
    check(self.route_layer is None or (isinstance(self.route_layer, int) and self.route_layer >= 0),
          'route_layer', 'must be None or a non-negative integer')


# --------------------------------------------------------------------------- routing


def _normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def input_key(params: Params, cfg: ModelConfig, tokens: jax.Array, *,
              mask: jax.Array | None = None, layer: int | None = None,
              dtype=jnp.float32) -> jax.Array:
  """The routing feature of each input: ``[B, D]`` float32, unit L2 norm.

  Args:
    params: the (compressed) model, run without any prompt.
    cfg: model config.
    tokens: ``[B, T]`` int tokens.
    mask: optional ``[B, T]`` bool, True on real tokens (right padding: under causal attention the
      real positions do not see the padding, so the feature is that of the unpadded input).
    layer: None = the final-norm'd hidden states after all blocks; ``k`` = the residual stream
      after ``k`` blocks (0: token embeddings), each position RMS-normalised without a scale.
    dtype: compute dtype of the forward pass.
  """
  n_layers = len(params['layers'])
  if layer is not None and not 0 <= layer <= n_layers:
    raise ValueError(f'layer must be in [0, {n_layers}] or None, got {layer}')
  x = llama.hidden(params, tokens, cfg, dtype=dtype, num_blocks=layer)
  if layer is None:
    x = llama.final_norm(params, x, cfg)
  x = x.astype(jnp.float32)
  if layer is not None:
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps)
  if mask is None:
    h = jnp.mean(x, axis=1)
  else:
    m = mask.astype(jnp.float32)[..., None]
    h = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return _normalize(h)


def route(pool: PromptPool, feats: jax.Array) -> jax.Array:
  """Index ``[B]`` (int32) of the prompt whose key has the largest cosine similarity to each
  routing feature ``feats [B, D]``."""
  sims = _normalize(jnp.asarray(feats, jnp.float32)) @ _normalize(pool.keys).T
  return jnp.argmax(sims, axis=-1).astype(jnp.int32)


def select_prompts(params: Params, cfg: ModelConfig, pool: PromptPool, tokens: jax.Array, *,
                   mask: jax.Array | None = None, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """``(index [B], prefix [B, L, D])``: each input's routed prompt."""
  idx = route(pool, input_key(params, cfg, tokens, mask=mask, layer=pool.route_layer, dtype=dtype))
  return idx, pool.prompts[idx]


def forward_with_pool(params: Params, cfg: ModelConfig, pool: PromptPool, tokens: jax.Array, *,
                      mask: jax.Array | None = None, dtype=jnp.float32) -> jax.Array:
  """Routes each input ``tokens [B, T]`` to a prompt, prepends it and returns float32 logits
  ``[B, T, V]`` on the token positions (``mask``: as in :func:`input_key`, for routing)."""
  _, prefix = select_prompts(params, cfg, pool, tokens, mask=mask, dtype=dtype)
  return llama.forward(params, tokens, cfg, dtype=dtype, prefix=prefix)


def added_parameters(pool: PromptPool) -> int:
  """Parameters the pool adds to the model: its prompts plus its routing keys."""
  return int(pool.prompts.size + pool.keys.size)


# --------------------------------------------------------------------------- batched drivers


@functools.lru_cache(maxsize=None)
def _jitted_key(cfg: ModelConfig, layer: int | None, dtype_name: str, masked: bool):
  dtype = jnp.dtype(dtype_name)
  if masked:
    return jax.jit(lambda p, t, m: input_key(p, cfg, t, mask=m, layer=layer, dtype=dtype))
  return jax.jit(lambda p, t: input_key(p, cfg, t, layer=layer, dtype=dtype))


def input_keys(params: Params, cfg: ModelConfig, tokens: np.ndarray, *,
               mask: np.ndarray | None = None, layer: int | None = None, batch_size: int = 8,
               dtype=jnp.float32) -> np.ndarray:
  """:func:`input_key` over many inputs ``[N, T]`` in jitted batches: ``[N, D]`` float32 (the last
  batch is padded to ``batch_size`` rows, so every batch shares one compile)."""
  tokens = np.asarray(tokens, np.int32)
  n = len(tokens)
  if n == 0:
    raise ValueError('input_keys needs at least one input')
  fn = _jitted_key(cfg, layer, jnp.dtype(dtype).name, mask is not None)
  out = []
  for i in range(0, n, batch_size):
    t = tokens[i:i + batch_size]
    rows = len(t)
    pad = batch_size - rows
    t = np.pad(t, ((0, pad), (0, 0)))
    if mask is None:
      f = fn(params, jnp.asarray(t))
    else:
      m = np.pad(np.asarray(mask[i:i + batch_size], bool), ((0, pad), (0, 0)), constant_values=True)
      f = fn(params, jnp.asarray(t), jnp.asarray(m))
    out.append(np.asarray(f, np.float32)[:rows])
  return np.concatenate(out)


def route_inputs(params: Params, cfg: ModelConfig, pool: PromptPool, tokens: np.ndarray, *,
                 mask: np.ndarray | None = None, batch_size: int = 8,
                 dtype=jnp.float32) -> np.ndarray:
  """Routed prompt index ``[N]`` of many inputs ``[N, T]``; ``pool.prompts[idx]`` are the prefixes
  that ``models.evaluate.perplexity`` / ``score_multiple_choice`` take as ``prefixes``."""
  feats = input_keys(params, cfg, tokens, mask=mask, layer=pool.route_layer,
                     batch_size=batch_size, dtype=dtype)
  return np.asarray(route(pool, feats))


def routed_prefixes(params: Params, cfg: ModelConfig, pool: PromptPool, tokens: np.ndarray, *,
                    mask: np.ndarray | None = None, batch_size: int = 8,
                    dtype=jnp.float32) -> np.ndarray:
  """The routed prompt of every input, ``[N, L, D]``: the ``prefixes`` argument of
  ``models.evaluate.perplexity`` / ``score_multiple_choice``."""
  idx = route_inputs(params, cfg, pool, tokens, mask=mask, batch_size=batch_size, dtype=dtype)
  return np.asarray(pool.prompts)[idx]


def context_tokens(tokenizer, items) -> tuple[np.ndarray, np.ndarray]:
  """Each multiple-choice item's context, right-padded: ``(tokens [N, W], mask [N, W])`` (what
  routes the item)."""
  ids = [list(tokenizer(item.context)['input_ids']) for item in items]
  width = max(len(t) for t in ids)
  tokens = np.zeros((len(ids), width), np.int32)
  mask = np.zeros((len(ids), width), bool)
  for i, t in enumerate(ids):
    tokens[i, :len(t)] = t
    mask[i, :len(t)] = True
  return tokens, mask


# --------------------------------------------------------------------------- grouping


def cluster(feats: np.ndarray, num_clusters: int, seed: int, *, iters: int = 50) -> np.ndarray:
  """k-means (k-means++ init, Lloyd iterations) of ``feats [N, D]``: labels ``[N]`` int32 in
  ``[0, num_clusters)``, every cluster non-empty (an emptied cluster is re-seeded at the point
  farthest from its center)."""
  x = np.asarray(feats, np.float64)
  n = len(x)
  if not 1 <= num_clusters <= n:
    raise ValueError(f'num_clusters must be in [1, {n}] (the number of points), got {num_clusters}')
  rng = np.random.default_rng(seed)
  centers = [x[rng.integers(n)]]
  for _ in range(1, num_clusters):  # k-means++
    d2 = np.min(((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
    p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
    centers.append(x[rng.choice(n, p=p)])
  centers = np.asarray(centers)
  labels = np.full(n, -1)
  for _ in range(iters):
    d2 = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    new = np.argmin(d2, axis=1)
    for k in range(num_clusters):
      if not np.any(new == k):
        far = int(np.argmax(d2[np.arange(n), new]))
        new[far] = k
    if np.array_equal(new, labels):
      break
    labels = new
    centers = np.stack([x[labels == k].mean(0) for k in range(num_clusters)])
  return labels.astype(np.int32)


def cluster_groups(params: Params, cfg: ModelConfig, windows: np.ndarray, num_groups: int,
                   seed: int, *, layer: int | None = None, batch_size: int = 8,
                   dtype=jnp.float32) -> list[np.ndarray]:
  """Unlabeled training windows ``[N, T]`` split into ``num_groups`` by :func:`cluster` of their
  routing features: the ``token_groups`` of :func:`train_pool`."""
  feats = input_keys(params, cfg, windows, layer=layer, batch_size=batch_size, dtype=dtype)
  labels = cluster(feats, num_groups, seed)
  return [np.asarray(windows)[labels == k] for k in range(num_groups)]


# --------------------------------------------------------------------------- training


def init_prompts(params: Params, cfg: ModelConfig, num_prompts: int, prompt_len: int,
                 seed: int) -> jax.Array:
  """``[P, L, D]`` float32: embeddings of random vocabulary tokens (seeded), as the model's
  embedding layer gives them (scaled where the family scales them)."""
  ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (num_prompts, prompt_len))
  return llama.embed(params, jnp.asarray(ids), cfg, jnp.float32)


def _check_groups(token_groups: Sequence[np.ndarray], config: IDPConfig) -> list[np.ndarray]:
  if len(token_groups) != config.num_prompts:
    raise ValueError(f'IDPConfig.num_prompts={config.num_prompts} but {len(token_groups)} token '
                     'groups were given (one prompt is trained per group)')
  groups = []
  for i, g in enumerate(token_groups):
    g = np.asarray(g)
    if g.ndim != 2 or g.shape[0] < 1 or g.shape[1] < 2 or not np.issubdtype(g.dtype, np.integer):
      raise ValueError(f'token group {i} must be a non-empty int array [N, T] with T >= 2, got '
                       f'{g.dtype} {g.shape}')
    groups.append(g.astype(np.int32))
  return groups


def train_pool(params: Params, cfg: ModelConfig, token_groups: Sequence[np.ndarray],
               config: IDPConfig, *, dtype=jnp.float32,
               key_batch_size: int = 8) -> tuple[PromptPool, dict[str, Any]]:
  """Trains one soft prompt per group of windows, the model frozen; returns ``(pool, info)``.

  Args:
    params: the (compressed) model; not modified.
    cfg: model config.
    token_groups: ``config.num_prompts`` int arrays ``[N_p, T]`` (windows may differ in length
      between groups).
    config: the training settings.
    dtype: compute dtype of the forward passes (the prompts stay float32).
    key_batch_size: batch size of the routing-feature passes.

  Returns:
    The pool and ``{'losses' [P, steps] (training-batch loss per step), 'loss_first',
    'loss_last' (per prompt, mean of the first/last tenth of the steps), 'group_sizes',
    'added_parameters', 'tokens_seen', 'train_compute' (tokens seen x added parameters),
    'seconds', 'peak_memory_bytes'}``.
  """
  groups = _check_groups(token_groups, config)
  t0 = time.time()
  keys = []
  for g in groups:
    feats = input_keys(params, cfg, g, layer=config.route_layer, batch_size=key_batch_size,
                       dtype=dtype)
    keys.append(_normalize(jnp.asarray(feats.mean(0))))
  prompts0 = init_prompts(params, cfg, config.num_prompts, config.prompt_len, config.seed)

  def loss_fn(prompt, frozen, batch):
    logits = llama.forward(frozen, batch, cfg, dtype=dtype, prefix=prompt[None])
    return losses_lib.lm_loss(logits, batch)

  opt = train_lib.optimizer(train_lib.OptimConfig(lr=config.lr, warmup=config.warmup),
                            config.steps)
  run = jax.jit(train_lib.train_loop(loss_fn, opt))
  prompts, losses = [], []
  tokens_seen = 0
  for p, g in enumerate(groups):
    bs = min(config.batch_size, len(g))
    per_epoch = len(g) // bs
    order = train_lib.batch_order(len(g), bs, config.steps / per_epoch, config.seed + p)
    order = order[:config.steps]
    # Gather the batches up front: every group then shares one compile whatever its size.
    data = jnp.asarray(g[order.reshape(-1)])
    steps_idx = jnp.arange(data.shape[0], dtype=jnp.int32).reshape(order.shape)
    prompt, loss = run(prompts0[p], params, data, steps_idx)
    prompts.append(prompt)
    losses.append(np.asarray(loss, np.float32))
    tokens_seen += int(order.size * g.shape[1])
  pool = PromptPool(prompts=jnp.stack(prompts).astype(jnp.float32),
                    keys=jnp.stack(keys).astype(jnp.float32), route_layer=config.route_layer)
  tenth = max(1, config.steps // 10)
  info = {
      'losses': np.stack(losses),
      'loss_first': [float(l[:tenth].mean()) for l in losses],
      'loss_last': [float(l[-tenth:].mean()) for l in losses],
      'group_sizes': [int(len(g)) for g in groups],
      'added_parameters': added_parameters(pool),
      'tokens_seen': tokens_seen,
      'train_compute': float(tokens_seen) * added_parameters(pool),
      'seconds': time.time() - t0,
      'peak_memory_bytes': train_lib.peak_memory_bytes(),
  }
  return pool, info
