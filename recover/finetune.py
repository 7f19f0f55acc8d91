"""Training-based recovery of a whole compressed model on the language-modelling loss.

Three methods (recover/METHODS.md §2.3-2.5), all one jitted optax loop over the model's seven
block linears (:func:`models.llama.linear_names` of every ``params['layers'][i]``); embeddings,
norms and the LM head stay frozen:

* ``'lora'``: QLoRA-style adapters ``y += x a b`` on the frozen compressed base of every linear
  (dense linears get one too). The adapter starts as

  - ``'zero'``: ``a`` random, ``b = 0`` (QLoRA): the model starts exactly at the base model;
  - ``'loftq'``: LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659), the base re-compressed
    together with a rank-r SVD of its error by alternation (:func:`recover.loftq.loftq`); needs
    the dense model;
  - ``'eora'`` / ``'srr'``: the adapter the model already carries (compressed with the EoRA or SRR
    compensator at the same rank); ``'srr'`` scales the gradient of SRR's preserved leading
    components by ``srr_grad_scale``.

* ``'qat'``: post-quantization training with a straight-through estimator: every linear stored as a
  :class:`~kernels.formats.QuantizedWeight` trains a float latent weight that is rounded onto the
  leaf's fixed grid in the forward pass and re-quantized (same scales and zero points) at the end.
* ``'global'``: masked full fine-tuning: float (dense or pruned) linears train their weights with
  the sparsity pattern applied in the forward pass (pruned weights stay exactly zero); quantized
  ones train with the straight-through estimator as in ``'qat'``; 2:4-packed quantized values stay
  frozen.

The loss is the mean next-token cross-entropy, or with ``distill=True`` the mean over positions of
``KL(dense || model)`` of the next-token distributions. The trainable split of each leaf, the AdamW
schedule and the ``lax.scan`` loop come from :mod:`recover.train`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kernels import formats
from kernels.formats import CompressedLinear, QuantizedWeight, Sparse24Weight
from models import checkpoint
from models import llama
from models import losses
from models import sharding
from models import tree
from models.config import ModelConfig
from recover import train
from recover.loftq import loftq, quant_spec

Params = dict[str, Any]

METHODS = ('lora', 'qat', 'global')
LORA_INITS = ('zero', 'loftq', 'eora', 'srr')
DEFAULT_LR = {'lora': 1e-4, 'qat': 1e-5, 'global': 1e-5}


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
  return (isinstance(x, (int, float, np.integer, np.floating))
          and not isinstance(x, (bool, np.bool_)))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """What :func:`finetune` trains and how (hashable).

  Attributes:
    method: 'lora', 'qat' or 'global'.
    steps: optimizer steps (> 0); every step sees ``batch_size`` sequences.
    batch_size: sequences per step.
    lr: peak AdamW learning rate; None = the method's default (:data:`DEFAULT_LR`: lora 1e-4,
      qat 1e-5, global 1e-5). After construction it holds the value in use.
    warmup: fraction of the steps with linear warmup (then linear decay to 0).
    weight_decay: AdamW weight decay.
    lora_rank: adapter rank (clipped per layer to ``min(in, out)``).
    lora_alpha: LoRA scale numerator of a zero-initialised adapter (``alpha / r`` is folded into
      ``a``); a given initial adapter (LoftQ, EoRA, SRR) is used as is.
    lora_init: 'zero', 'loftq', 'eora' or 'srr'.
    loftq_iters: LoftQ alternations.
    srr_grad_scale: gradient scale of SRR's preserved adapter components (``lora_init='srr'``).
    distill: train on ``KL(dense || model)`` instead of the cross-entropy (needs the dense params).
    seed: seed of the batch order and of zero-initialised adapters.
  """
  method: str
  steps: int
  batch_size: int = 2
  lr: float | None = None
  warmup: float = 0.1
  weight_decay: float = 0.0
  lora_rank: int = 16
  lora_alpha: float = 32.0
  lora_init: str = 'zero'
  loftq_iters: int = 5
  srr_grad_scale: float = 0.1
  distill: bool = False
  seed: int = 0

  def __post_init__(self):
    def bad(field, value, want):
      raise ValueError(f'FinetuneConfig.{field}={value!r}: {want}')
    if self.method not in METHODS:
      bad('method', self.method, f'choose one of {METHODS}')
    for field in ('steps', 'batch_size', 'lora_rank', 'loftq_iters'):
      value = getattr(self, field)
      if not _is_int(value) or value <= 0:
        bad(field, value, 'must be a positive int')
    if self.lr is None:
      object.__setattr__(self, 'lr', DEFAULT_LR[self.method])
    elif not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
      bad('lr', self.lr, 'must be a positive finite number (or None for the method default)')
    if not _is_number(self.warmup) or not 0 <= self.warmup < 1:
      bad('warmup', self.warmup, 'must be a fraction in [0, 1)')
    if not _is_number(self.weight_decay) or not math.isfinite(self.weight_decay) or (
        self.weight_decay < 0):
      bad('weight_decay', self.weight_decay, 'must be a finite number >= 0')
    if not _is_number(self.lora_alpha) or not math.isfinite(self.lora_alpha) or (
        self.lora_alpha <= 0):
      bad('lora_alpha', self.lora_alpha, 'must be a positive finite number')
    if self.lora_init not in LORA_INITS:
      bad('lora_init', self.lora_init, f'choose one of {LORA_INITS}')
    if not _is_number(self.srr_grad_scale) or not 0 <= self.srr_grad_scale <= 1:
      bad('srr_grad_scale', self.srr_grad_scale, 'must be in [0, 1]')
    if not isinstance(self.distill, (bool, np.bool_)):
      bad('distill', self.distill, 'must be a bool')
    if not _is_int(self.seed):
      bad('seed', self.seed, 'must be an int')

  @property
  def optim(self) -> train.OptimConfig:
    return train.OptimConfig(lr=float(self.lr), warmup=float(self.warmup),
                             weight_decay=float(self.weight_decay))


# --------------------------------------------------------------------------- plans


def _lora_plan(cfg: FinetuneConfig) -> train.LeafPlan:
  scale = cfg.srr_grad_scale if cfg.lora_init == 'srr' else 1.0
  return train.LeafPlan('lora', lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                        preserved_grad_scale=float(scale))


def _examples(paths: list[str]) -> str:
  return ', '.join(paths[:3]) + (f' and {len(paths) - 3} more' if len(paths) > 3 else '')


def _check_dense(params: Params, dense_params: Params, why: str) -> None:
  if dense_params is None:
    raise ValueError(f'{why} needs dense_params (the uncompressed model)')
  if len(dense_params.get('layers', ())) != len(params['layers']):
    raise ValueError(f'dense_params has {len(dense_params.get("layers", ()))} layers, the model '
                     f'{len(params["layers"])}')


def _check_carried(leaves: dict[str, Any], paths: list[str], cfg: FinetuneConfig,
                   why: str) -> None:
  """Raises unless every linear in ``paths`` carries a float adapter of rank ``cfg.lora_rank``
  (capped by its shape): what trains from the adapters a model carries."""
  missing = [p for p in paths
             if not isinstance(leaves[p], CompressedLinear) or leaves[p].adapter is None]
  if missing:
    raise ValueError(f'{why} trains the adapters the model carries, but {len(missing)} linears '
                     f'have none ({_examples(missing)})')
  wrong = [f'{p} (rank {leaves[p].adapter.rank})' for p in paths
           if leaves[p].adapter.rank != min(cfg.lora_rank, *leaves[p].shape)]
  if wrong:
    raise ValueError(f'lora_rank={cfg.lora_rank} but some adapters have another rank: '
                     f'{_examples(wrong)}')


def prepare(params: Params, cfg: FinetuneConfig, *, dense_params: Params | None = None,
            from_initial: bool = False) -> tuple[dict[str, Any], dict[str, train.LeafPlan]]:
  """The linears training starts from and how each is trained.

  Returns ``(leaves, plans)``: ``leaves`` maps every block linear's path to its initial leaf (for
  LoRA: without adapter for a zero init, with the LoftQ base and adapter, or as given for EoRA/SRR);
  ``plans`` maps the trained paths to their :class:`~recover.train.LeafPlan` (linears without a
  plan stay frozen). ``from_initial=True`` says that ``params`` is already
  :func:`initial_model`'s result for ``cfg`` (e.g. a LoftQ start computed once and reused): LoRA
  then trains the adapters every linear carries, as they are. Raises ValueError when the model does
  not fit the configuration.
  """
  leaves = tree.linear_leaves(params)
  plans: dict[str, train.LeafPlan] = {}
  if cfg.method == 'lora':
    plan = _lora_plan(cfg)
    compressed = [p for p, l in leaves.items() if isinstance(l, CompressedLinear)]
    if from_initial:
      _check_carried(leaves, list(leaves), cfg,
                     f'from_initial=True (the model as initial_model(lora_init={cfg.lora_init!r}) '
                     'returns it)')
    elif cfg.lora_init == 'zero':
      srr = [p for p in compressed
             if leaves[p].adapter is not None and leaves[p].adapter.preserved > 0]
      if srr:
        raise ValueError(f"lora_init='zero' would drop SRR adapters that hold preserved weight "
                         f"directions ({_examples(srr)}); use lora_init='srr'")
      leaves = {p: tree.strip_adapter(l) for p, l in leaves.items()}
    elif cfg.lora_init in ('eora', 'srr'):
      _check_carried(leaves, compressed, cfg,
                     f'lora_init={cfg.lora_init!r} (compress with the {cfg.lora_init} compensator '
                     f'at rank {cfg.lora_rank} first)')
      if cfg.lora_init == 'srr' and compressed and not any(
          leaves[p].adapter.preserved > 0 for p in compressed):
        warnings.warn("lora_init='srr' but no adapter has preserved components (not an SRR "
                      'model, or k = 0 everywhere): srr_grad_scale has no effect', UserWarning,
                      stacklevel=2)
    else:  # loftq
      _check_dense(params, dense_params, "lora_init='loftq'")
      dense = tree.linear_leaves(dense_params)
      new = {}
      for p, l in leaves.items():
        if isinstance(l, CompressedLinear) and (quant_spec(l) is not None
                                                or train.sparsity_mask(l) is not None):
          base, adapter, _ = loftq(formats.to_dense(dense[p]), l, min(cfg.lora_rank, *l.shape),
                                   cfg.loftq_iters)
          new[p] = dataclasses.replace(base, adapter=adapter)
        else:
          new[p] = tree.strip_adapter(l)
      leaves = new
    plans = {p: plan for p in leaves}
  elif cfg.method == 'qat':
    plans = {p: train.LeafPlan('ste') for p, l in leaves.items()
             if isinstance(l, CompressedLinear) and isinstance(l.weight, QuantizedWeight)}
  else:  # global
    for p, l in leaves.items():
      w = l.weight if isinstance(l, CompressedLinear) else l
      if isinstance(w, QuantizedWeight):
        plans[p] = train.LeafPlan('ste')
      elif isinstance(w, Sparse24Weight) and isinstance(w.values, QuantizedWeight):
        continue  # 2:4-packed quantized values: no float weight to train, stays frozen
      else:
        plans[p] = train.LeafPlan('weights')
  if not plans:
    what = {'qat': 'no linear is stored as a QuantizedWeight',
            'global': 'no linear has a float or quantized (non-2:4) weight',
            'lora': 'the model has no block linears'}[cfg.method]
    raise ValueError(f'method={cfg.method!r} has nothing to train: {what}')
  return leaves, plans


def initial_model(params: Params, cfg: FinetuneConfig, *, dense_params: Params | None = None
                  ) -> Params:
  """The model training starts from (step 0), in the result's leaf formats (e.g. the LoftQ
  initialisation before any training; a zero-initialised LoRA carries a zero-product adapter)."""
  leaves, plans = prepare(params, cfg, dense_params=dense_params)
  split = train.split_leaves(leaves, plans, jax.random.key(cfg.seed))
  return tree.replace_leaves(params, {**leaves, **train.final_leaves(split, split.trainable)})


# --------------------------------------------------------------------------- losses and data


def step_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """``[steps, batch_size]`` sample indices: seeded permutations of the ``n`` samples, epoch after
  epoch, exactly ``steps`` rows."""
  if not 0 < batch_size <= n:
    raise ValueError(f'FinetuneConfig.batch_size={batch_size} must be in [1, {n}] (the number of '
                     'token sequences)')
  order = train.batch_order(n, batch_size, steps / (n // batch_size), seed)
  if order.shape[0] != steps:
    raise AssertionError(f'batch order has {order.shape[0]} steps, expected {steps}')
  return order


def _check_tokens(tokens, config: ModelConfig) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f'tokens must be [N, T] with T >= 2, got shape {tokens.shape}')
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'tokens must be integers, got dtype {tokens.dtype}')
  if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
    raise ValueError(f'tokens must lie in [0, {config.vocab_size}) (the vocabulary), got '
                     f'[{tokens.min()}, {tokens.max()}]')
  return tokens.astype(np.int32)


# --------------------------------------------------------------------------- the driver


# Bump when a change of this module changes the numbers a resumed run would produce.
CODE_VERSION = 1


def finetune(params: Params, cfg: ModelConfig, tokens, config: FinetuneConfig, *,
             dense_params: Params | None = None, from_initial: bool = False,
             progress: bool = True, dtype=jnp.float32, checkpoint_dir: str | None = None,
             chunk_steps: int | None = None, checkpoint_every_s: float = 60.0,
             stop_after: int | None = None) -> tuple[Params, dict[str, Any]]:
  """Fine-tunes a (compressed) model by ``config`` on ``tokens``.

  Args:
    params: the model (compressed leaves in ``params['layers']``; not modified).
    config: what to train (:class:`FinetuneConfig`).
    tokens: ``[N, T]`` int token sequences; each step draws ``config.batch_size`` of them.
    cfg: the model config.
    dense_params: the uncompressed model (needed for LoftQ init and distillation).
    from_initial: ``params`` is :func:`initial_model`'s result for ``config`` (see
      :func:`prepare`); LoRA trains the adapters it carries, and LoftQ needs no dense model then.
    progress: show a progress bar (one tick per step, with the loss).
    dtype: compute dtype of the forward pass.
    checkpoint_dir: save the trainable arrays and the optimizer state here after chunks of
      ``chunk_steps`` steps (at most every ``checkpoint_every_s`` seconds, and at the end) and
      resume from it; a resumed run equals the uninterrupted one bit for bit.
    chunk_steps: steps per compiled chunk (default: all steps in one). The chunking is part of
      the run's identity: a run resumes only with the same value.
    stop_after: stop after the chunk that reaches this many steps (for tests of resumption).

  Returns:
    ``(params, info)``: the trained model in the original leaf formats (LoRA: float adapters on the
    compressed leaves; QAT: re-packed QuantizedWeight on the same grid; global: pruned weights
    exactly zero), and ``info`` with ``method``, ``lora_init``, ``steps``, ``train_seconds``
    (excluding compilation), ``compile_seconds``, ``tokens_seen``, ``trainable_params``,
    ``train_compute`` (tokens seen x trainable parameters),
    ``peak_memory_bytes``, ``param_sharding`` and ``device_share`` (the placement's rule, and the
    largest fraction of a trained array or Adam moment one device held: 1/N when fully sharded
    over N devices), ``loss_first``, ``loss_last`` and ``losses`` (one per step).
  """
  if not isinstance(config, FinetuneConfig):
    raise ValueError(f'config must be a FinetuneConfig, got {type(config).__name__}')
  tokens = _check_tokens(tokens, cfg)
  if config.distill:
    _check_dense(params, dense_params, 'FinetuneConfig.distill=True')
  order = step_order(tokens.shape[0], config.batch_size, config.steps, config.seed)
  leaves, plans = prepare(params, config, dense_params=dense_params, from_initial=from_initial)
  split = train.split_leaves(leaves, plans, jax.random.key(config.seed))
  static = split.static_key
  frozen = {'leaves': split.frozen, 'rest': tree.replace_leaves(params, {p: None for p in plans}),
            'dense': dense_params if config.distill else None}

  bars = []  # the progress bar, opened once compilation is done

  def tick(loss):
    if bars:
      bars[0].update(1)
      bars[0].set_postfix(loss=f'{float(loss):.4f}')

  def loss_fn(trainable, frz, batch):
    model = tree.replace_leaves(frz['rest'], train.forward_leaves(static, trainable, frz['leaves']))
    logits = llama.forward(model, batch, cfg, dtype=dtype)
    if config.distill:
      ref = jax.lax.stop_gradient(llama.forward(frz['dense'], batch, cfg, dtype=dtype))
      loss = losses.kl_loss(ref, logits)
    else:
      loss = losses.lm_loss(logits, batch)
    if progress:
      jax.debug.callback(tick, loss)
    return loss

  opt = train.optimizer(config.optim, config.steps)
  run = jax.jit(train.train_steps(loss_fn, opt))
  chunk = config.steps if chunk_steps is None else int(chunk_steps)
  if chunk <= 0:
    raise ValueError(f'chunk_steps must be positive, got {chunk_steps}')
  bounds = [(s, min(s + chunk, config.steps)) for s in range(0, config.steps, chunk)]
  data, order = jnp.asarray(tokens), jnp.asarray(order)
  carry = (split.trainable, opt.init(split.trainable))
  opt_def = jax.tree.structure(carry[1])
  fingerprint = checkpoint.run_fingerprint(
      cfg, tokens, f'finetune v{CODE_VERSION} {config!r} from_initial={from_initial} '
      f'dtype={jnp.dtype(dtype).name} chunk={chunk}',
      [params, dense_params if (config.distill or config.lora_init == 'loftq') else None]
  ) if checkpoint_dir else ''
  stop_chunk = None if stop_after is None else next(
      (n + 1 for n, (_, hi) in enumerate(bounds) if hi >= stop_after), len(bounds))
  sweep = checkpoint.ResumableSweep(checkpoint_dir, fingerprint, len(bounds), desc='finetune',
                                    unit='chunk', what='fine-tuning checkpoint',
                                    every_s=checkpoint_every_s, stop_after=stop_chunk,
                                    progress=False)
  start, state, meta = sweep.resume()
  step_losses: list[float] = []
  train_seconds = compile_seconds = 0.0
  if state is not None:
    carry = (state['trainable'], jax.tree.unflatten(opt_def, state['opt_state']))
    step_losses = list(meta['losses'])
    train_seconds, compile_seconds = meta['train_seconds'], meta['compile_seconds']
  carry, frozen = sharding.shard_params((carry, frozen))  # replicated, or fsdp: split
  compiled = {}
  bars.append(tqdm(total=config.steps, initial=bounds[start][0] if start < len(bounds) else
                   config.steps, desc=f'finetune {config.method}', unit='step',
                   disable=not progress))
  for n in sweep.steps(start):
    lo, hi = bounds[n]
    args = (carry, frozen, data, order[lo:hi])
    if hi - lo not in compiled:
      t0 = time.time()
      compiled[hi - lo] = run.lower(*args).compile()
      compile_seconds += time.time() - t0
    t0 = time.time()
    carry, chunk_losses = compiled[hi - lo](*args)
    step_losses += [float(v) for v in np.asarray(jax.block_until_ready(chunk_losses), np.float64)]
    jax.effects_barrier()  # every progress callback has run
    train_seconds += time.time() - t0
    if sweep.done(n, [], [], {'trainable': carry[0], 'opt_state': jax.tree.leaves(carry[1])},
                  {'losses': step_losses, 'train_seconds': train_seconds,
                   'compile_seconds': compile_seconds}):
      break
  bars[0].close()
  share = sharding.device_share(carry)  # of the trained arrays and Adam moments, per device
  trainable = carry[0]
  step_losses = np.asarray(step_losses, np.float64)

  out = tree.replace_leaves(params, {**leaves, **train.final_leaves(split, trainable)})
  info = {
      'method': config.method,
      'lora_init': config.lora_init if config.method == 'lora' else None,
      'distill': config.distill,
      'steps': config.steps,
      'batch_size': config.batch_size,
      'seqlen': int(tokens.shape[1]),
      'lr': float(config.lr),
      'train_seconds': train_seconds,
      'compile_seconds': compile_seconds,
      'tokens_seen': int(config.steps * config.batch_size * tokens.shape[1]),
      'trainable_params': train.count_params(split.trainable),
      'train_compute': float(config.steps * config.batch_size * tokens.shape[1])
                       * train.count_params(split.trainable),
      'trained_linears': len(plans),
      'peak_memory_bytes': train.peak_memory_bytes(),
      'param_sharding': sharding.active().params,
      'device_share': share,
      'loss_first': float(step_losses[0]),
      'loss_last': float(step_losses[-1]),
      'losses': [float(v) for v in step_losses],
  }
  return out, info
