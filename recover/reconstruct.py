"""Local reconstruction ("A Free Lunch in LLM Compression", Wagner et al. 2025).

After compression, every *window* of the model is trained, in order, so that its output on the
calibration inputs matches the dense model's output for the same window:

* ``matrix``: one linear at a time (in the true-sequential order q/k/v, o, gate/up, down of each
  block); target ``X_dense W_dense``, input the linear's input in the reconstructed model.
* ``submodule``: the attention half and the MLP half of each block separately (each with its
  residual: ``x + attn(norm(x))``, ``x + mlp(norm(x))``).
* ``block``: one decoder block; ``blocks:K``: K consecutive blocks.

Inputs of window i come from the already reconstructed windows before it (``inputs='propagated'``)
or from the dense model (``'dense'``); targets always come from the dense model. The loss is the
MSE (or ``1 - cos``) of the window's output. Each window is one jitted optax loop (``lax.scan``
over AdamW steps with linear warmup and decay; defaults: one epoch, batch 2, lr 3e-4 (the paper's
1e-5 closes a third of the gap to dense at the main command's settings, 3e-4 two thirds:
``results/recon_defaults``),
10% warmup, no weight decay). Only the trainable split of each linear (see :mod:`recover.train`) is
differentiated: float weights with their mask or 2:4 pattern re-applied in the forward pass (pruned
weights stay exactly zero), the scales of quantized weights (or a straight-through latent weight,
or a LoRA), or, with ``peft``, a LoRA (r 16, alpha 32) on every linear of the window, merged
into float weights at the end. With ``train='adapters'`` only the low-rank adapters train (the
leaf's own, e.g. EoRA's, or a zero-product LoRA where it has none) and stay adapters: the
compressed weights are fixed. Norms and embeddings stay as they are.

A progress bar steps once per window with its loss before and after; finished windows (the
reconstructed blocks and the hidden states) are checkpointed at most every ``checkpoint_every_s``
seconds and after the last window, and a rerun resumes after the last saved window with
identical results.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels import api as kernels_api
from models import checkpoint
from models import llama
from models import losses
from models import sharding
from models import tree
from models.config import ModelConfig
from recover import train

Params = dict[str, Any]
INPUTS = ('propagated', 'dense')
QUANT_MODES = ('scales', 'ste', 'lora')
# What a window trains: 'all' its compressed linears (as the paper), 'adapters' only the low-rank
# adapters (the compressed weights fixed; composed recipes: compression -> EoRA -> reconstruction
# of the adapters -> adapter quantization).
TRAIN = ('all', 'adapters')


def parse_window(window: str) -> int:
  """Number of residual halves (attn/mlp units) per window; 0 for ``'matrix'``."""
  if window == 'matrix':
    return 0
  if window == 'submodule':
    return 1
  if window == 'block':
    return 2
  if window.startswith('blocks:'):
    try:
      k = int(window.split(':', 1)[1])
    except ValueError:
      k = 0
    if k >= 1:
      return 2 * k
  raise ValueError(f'unknown reconstruction window {window!r}; choose matrix, submodule, block or '
                   'blocks:K with K >= 1')


@dataclasses.dataclass(frozen=True)
class ReconConfig:
  """Settings of :func:`reconstruct`: the Free Lunch paper's, except the learning rate (3e-4, not
  1e-5; measured in ``results/recon_defaults``)."""
  window: str = 'block'
  epochs: float = 1.0
  batch_size: int = 2
  optim: train.OptimConfig = train.OptimConfig(lr=3e-4, warmup=0.1, weight_decay=0.0)
  loss: str = 'mse'
  inputs: str = 'propagated'
  quant_mode: str = 'scales'
  peft: bool = False
  lora_rank: int = 16
  lora_alpha: float = 32.0
  seed: int = 0
  eval_batch: int = 8
  train: str = 'all'

  def __post_init__(self):
    parse_window(self.window)
    if self.train not in TRAIN:
      raise ValueError(f'--recon_train={self.train!r}: choose from {TRAIN}')
    if self.train == 'adapters' and self.peft:
      raise ValueError("--recon_train=adapters trains the adapters already; --recon_peft (a LoRA "
                       'merged into the weights) contradicts it')
    if self.loss not in losses.OUTPUT_LOSSES:
      raise ValueError(f'unknown reconstruction loss {self.loss!r}; choose from '
                       f'{tuple(losses.OUTPUT_LOSSES)}')
    if self.inputs not in INPUTS:
      raise ValueError(f'--recon_inputs={self.inputs!r}: choose from {INPUTS}')
    if self.quant_mode not in QUANT_MODES:
      raise ValueError(f'unknown quantized-weight training mode {self.quant_mode!r}; choose from '
                       f'{QUANT_MODES}')
    if not self.epochs > 0:
      raise ValueError(f'reconstruction epochs must be positive, got {self.epochs}')
    if self.batch_size < 1 or self.eval_batch < 1:
      raise ValueError('reconstruction batch sizes must be positive')
    if self.lora_rank < 1:
      raise ValueError(f'LoRA rank must be positive, got {self.lora_rank}')


@dataclasses.dataclass(frozen=True)
class Window:
  """One reconstruction window: blocks it touches, its units ``(block, 'attn'|'mlp')`` in order,
  or a single linear (``linear`` set, ``units`` empty)."""
  index: int
  units: tuple[tuple[int, str], ...] = ()
  linear: tuple[int, str] | None = None
  last_of_block: bool = False  # a linear window that is its block's last stage

  @property
  def blocks(self) -> tuple[int, ...]:
    if self.linear is not None:
      return (self.linear[0],)
    return tuple(sorted({b for b, _ in self.units}))

  @property
  def name(self) -> str:
    if self.linear is not None:
      return f'layers/{self.linear[0]}/{self.linear[1]}'
    first, last = self.units[0], self.units[-1]
    if first == last:
      return f'layers/{first[0]}/{first[1]}'
    return f'layers/{first[0]}/{first[1]}..layers/{last[0]}/{last[1]}'

  @property
  def ends_block(self) -> bool:
    """Whether the hidden states advance after this window."""
    if self.linear is not None:
      return self.last_of_block
    return True


def make_windows(num_layers: int, window: str,
                 stages: Sequence[Sequence[str]] = llama.SEQUENTIAL_STAGES) -> list[Window]:
  """The windows of a model with ``num_layers`` blocks, in training order (``stages``: a block's
  linears in true-sequential stages, :func:`models.llama.sequential_stages`)."""
  size = parse_window(window)
  if size == 0:
    order = [lin for stage in stages for lin in stage]
    return [Window(i * len(order) + j, linear=(i, lin), last_of_block=j == len(order) - 1)
            for i in range(num_layers) for j, lin in enumerate(order)]
  units = [(i, u) for i in range(num_layers) for u in llama.SUBMODULES]
  return [Window(n, units=tuple(units[s:s + size]))
          for n, s in enumerate(range(0, len(units), size))]


@dataclasses.dataclass
class WindowReport:
  name: str
  loss_before: float
  loss_after: float
  steps: int
  trainable_params: int
  seconds: float
  loop_bytes: int | None = None   # compiled training loop: arguments + temporaries + outputs


# --------------------------------------------------------------------------- plans and jitted fns


def _plan(leaf, config: ReconConfig) -> train.LeafPlan:
  if config.train == 'adapters':
    # The leaf's own adapter (EoRA, SVD, ...) or, where it has none, a zero-product LoRA of
    # lora_rank; kept as an adapter, never merged: the compressed weight stays as it is.
    return train.LeafPlan('lora', config.lora_rank, config.lora_alpha, merge=False)
  quantized = train.default_mode(leaf) == 'scales'
  if config.peft or (quantized and config.quant_mode == 'lora'):
    return train.LeafPlan('lora', config.lora_rank, config.lora_alpha, merge=not quantized)
  if quantized:
    return train.LeafPlan(config.quant_mode)
  return train.LeafPlan('weights')


def _window_leaves(window: Window, local: Params) -> dict[str, Any]:
  """``{path: leaf}`` of the trainable linears of the window's blocks ``local`` (a model of those
  blocks alone, ``{'layers': [...]}``), so windows of the same shape share one compiled loop."""
  if window.linear is not None:
    return {tree.linear_path(0, window.linear[1]): tree.get_linear(local['layers'][0],
                                                                   window.linear[1])}
  first = window.blocks[0]
  return {tree.linear_path(b - first, lin): tree.get_linear(local['layers'][b - first], lin)
          for b, u in window.units
          for lin in llama.submodule_linears(local['layers'][b - first], u)}


def _local_units(window: Window) -> tuple[tuple[int, str], ...]:
  """``(position of the block in the window, unit)`` in order; a matrix window's unit is
  ``'linear:<name>'``."""
  if window.linear is not None:
    return ((0, 'linear:' + window.linear[1]),)
  first = window.blocks[0]
  return tuple((b - first, u) for b, u in window.units)


def _apply_fn(cfg: ModelConfig, units: tuple, static_key: tuple):
  """``(trainable, frozen, x) -> y``: the window's forward pass with its trainable leaves."""
  def apply(trainable, frozen, x):
    leaves = train.forward_leaves(static_key, trainable, frozen['split'])
    if units[0][1].startswith('linear:'):
      (path, leaf), = leaves.items()
      return kernels_api.linear(x, leaf)
    blocks = tree.replace_leaves(frozen['local'], leaves)['layers']
    for b, u in units:
      x = llama.submodule_apply(blocks[b], x, cfg.layer(b), u)
    return x
  return apply


@functools.lru_cache(maxsize=64)
def _jitted(cfg: ModelConfig, units: tuple, static_key: tuple, optim: train.OptimConfig,
            steps: int, loss_name: str):
  apply = _apply_fn(cfg, units, static_key)
  loss = losses.OUTPUT_LOSSES[loss_name]

  def loss_fn(trainable, frozen, batch):
    return loss(apply(trainable, frozen, batch['x']), batch['y'])
  run = train.train_loop(loss_fn, train.optimizer(optim, steps))
  return jax.jit(run), jax.jit(apply)


def _batched(fn, xs, batch: int) -> jax.Array:
  return jnp.concatenate([fn(xs[i:i + batch]) for i in range(0, xs.shape[0], batch)], axis=0)


def _mean_loss(apply, trainable, frozen, xs, ys, batch: int, loss_name: str):
  """Mean window loss over all samples and the window's outputs."""
  ys_hat = _batched(lambda x: apply(trainable, frozen, x), xs, batch)
  return float(losses.OUTPUT_LOSSES[loss_name](ys_hat, ys)), ys_hat


# --------------------------------------------------------------------------- one window


def _loop_bytes(run, *args) -> int | None:
  """Memory of the compiled training loop as XLA reports it (None where unsupported)."""
  try:
    m = run.lower(*args).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def reconstruct_window(cfg: ModelConfig, window: Window, blocks: dict[int, Params],
                       xs: jax.Array, ys: jax.Array, config: ReconConfig, *,
                       measure_memory: bool = False
                       ) -> tuple[dict[int, Params], WindowReport, jax.Array]:
  """Trains one window on inputs ``xs`` and dense targets ``ys`` (``[N, T, D]``, or the linear's
  input/output features for a matrix window). ``measure_memory``: also report the compiled loop's
  memory (one extra compilation per window shape).

  Returns the window's new blocks, its report, and its output on ``xs`` after training.
  """
  t0 = time.time()
  first = window.blocks[0]
  local = {'layers': [blocks[b] for b in window.blocks]}
  leaves = _window_leaves(window, local)
  plans = {p: _plan(leaf, config) for p, leaf in leaves.items()}
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), window.index)
  split = train.split_leaves(leaves, plans, key)
  order = train.batch_order(xs.shape[0], config.batch_size, config.epochs,
                            config.seed * 100003 + window.index)
  units = _local_units(window)
  run, apply = _jitted(cfg, units, split.static_key, config.optim, len(order), config.loss)
  # Replicated, or split over the devices (fsdp): the window's weights and its trainable arrays.
  trainable, frozen = sharding.shard_params((split.trainable, {'split': split.frozen,
                                                               'local': local}))
  before, _ = _mean_loss(apply, trainable, frozen, xs, ys, config.eval_batch, config.loss)
  args = (trainable, frozen, {'x': xs, 'y': ys}, jnp.asarray(order))
  loop_bytes = _loop_bytes(run, *args) if measure_memory else None
  trained, _ = run(*args)
  after, out = _mean_loss(apply, trained, frozen, xs, ys, config.eval_batch, config.loss)
  trained_local = tree.replace_leaves(local, train.final_leaves(split, trained))['layers']
  new_blocks = dict(blocks)
  for k, block in enumerate(trained_local):
    new_blocks[first + k] = block
  report = WindowReport(name=window.name, loss_before=before, loss_after=after, steps=len(order),
                        trainable_params=train.count_params(split.trainable),
                        seconds=time.time() - t0, loop_bytes=loop_bytes)
  return new_blocks, report, out


# --------------------------------------------------------------------------- the model


@functools.lru_cache(maxsize=None)
def _block_fn(cfg: ModelConfig):
  return jax.jit(lambda block, x: llama.block_apply(block, x, cfg, return_inputs=True))


@functools.lru_cache(maxsize=None)
def _units_fn(cfgs: tuple[ModelConfig, ...], units: tuple[str, ...]):
  """The submodules ``units`` in a row, each block with its own (per-layer) config."""
  def fn(blocks, x):
    for block, c, u in zip(blocks, cfgs, units):
      x = llama.submodule_apply(block, x, c, u)
    return x
  return jax.jit(fn)


def _block_inputs(cfg, block, xs, batch: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  fn = _block_fn(cfg)
  outs, ins = [], []
  for i in range(0, xs.shape[0], batch):
    y, inputs = fn(block, xs[i:i + batch])
    outs.append(y)
    ins.append(inputs)
  return (jnp.concatenate(outs), {k: jnp.concatenate([d[k] for d in ins]) for k in ins[0]})


def _run_units(cfg, layers, units, xs, batch: int) -> jax.Array:
  fn = _units_fn(tuple(cfg.layer(b) for b, _ in units), tuple(u for _, u in units))
  blocks = [layers[b] for b, _ in units]
  return _batched(lambda x: fn(blocks, x), xs, batch)


# Bump when a change of this module changes the numbers a resumed run would produce.
CODE_VERSION = 2


def _fingerprint(params, dense_params, cfg, tokens, config: ReconConfig) -> str:
  """Names a reconstruction run: both whole models, the tokens and every setting."""
  return checkpoint.run_fingerprint(cfg, tokens, f'reconstruct v{CODE_VERSION} {config!r}',
                                    [params, dense_params])


def reconstruct(params: Params, dense_params: Params, cfg: ModelConfig, tokens: np.ndarray,
                config: ReconConfig = ReconConfig(), *, checkpoint_dir: str | None = None,
                progress: bool = True, stop_after: int | None = None,
                measure_memory: bool = False, checkpoint_every_s: float = 60.0
                ) -> tuple[Params, list[WindowReport]]:
  """Reconstructs every window of a compressed model against the dense model.

  Args:
    params: the compressed model (not modified).
    dense_params: the dense model it was compressed from (the targets).
    cfg: model config.
    tokens: ``[N, T]`` calibration token windows.
    config: window, schedule, loss, inputs and what to train.
    checkpoint_dir: checkpoint finished windows here and resume from it.
    checkpoint_every_s: write the checkpoint when this many seconds have passed since the last
      one (and after the last window); 0 writes after every window.
    progress: show a progress bar.
    stop_after: stop after this many windows (for tests of resumption).
    measure_memory: report each window's compiled training-loop memory (``loop_bytes``).

  Returns:
    ``(reconstructed params, one report per window)``.
  """
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or tokens.shape[0] < config.batch_size:
    raise ValueError(f'reconstruction needs [N, T] tokens with N >= batch size {config.batch_size}, '
                     f'got shape {tokens.shape}')
  windows = make_windows(cfg.num_layers, config.window, llama.sequential_stages(cfg))
  fingerprint = _fingerprint(params, dense_params, cfg, tokens, config) if checkpoint_dir else ''
  layers = list(params['layers'])
  dense_layers = list(dense_params['layers'])
  x_hat = llama.embed(params, jnp.asarray(tokens), cfg)
  x_dense = llama.embed(dense_params, jnp.asarray(tokens), cfg)
  reports: list[WindowReport] = []
  sweep = checkpoint.ResumableSweep(checkpoint_dir, fingerprint, len(windows),
                                    desc=f'reconstruct ({config.window})', unit='window',
                                    what='reconstruction checkpoint', every_s=checkpoint_every_s,
                                    stop_after=stop_after, progress=progress)
  start, state, meta = sweep.resume()
  if state is not None:
    for b in sorted({b for w in windows[:start] for b in w.blocks}):
      layers[b] = sweep.load_block(b)
    x_hat, x_dense = state['x_hat'], state['x_dense']
    reports = [WindowReport(**r) for r in meta['reports']]

  batch = config.eval_batch
  stage_inputs: dict[str, Any] = {}
  for n in sweep.steps(start):
    window = windows[n]
    if window.linear is not None:
      b, lin = window.linear
      key = llama.input_key(lin)
      # Inputs of this stage from the block as reconstructed so far; dense targets.
      if config.inputs == 'dense':
        xs = _block_inputs(cfg.layer(b), dense_layers[b], x_dense, batch)[1][key]
      else:
        xs = _block_inputs(cfg.layer(b), layers[b], x_hat, batch)[1][key]
      if 'dense' not in stage_inputs or stage_inputs['block'] != b:
        stage_inputs = {'block': b,
                        'dense': _block_inputs(cfg.layer(b), dense_layers[b], x_dense, batch)[1]}
      w_dense = tree.get_linear(dense_layers[b], lin)
      ys = _batched(lambda x: kernels_api.linear(x, w_dense), stage_inputs['dense'][key], batch)
      new, rep, _ = reconstruct_window(cfg, window, {b: layers[b]}, xs, ys, config,
                                       measure_memory=measure_memory)
      layers[b] = new[b]
      if window.ends_block:
        x_hat = _run_units(cfg, layers, [(b, 'attn'), (b, 'mlp')],
                           x_dense if config.inputs == 'dense' else x_hat, batch)
        x_dense = _run_units(cfg, dense_layers, [(b, 'attn'), (b, 'mlp')], x_dense, batch)
        stage_inputs = {}
    else:
      ys = _run_units(cfg, dense_layers, window.units, x_dense, batch)
      xs = x_dense if config.inputs == 'dense' else x_hat
      new, rep, out = reconstruct_window(cfg, window, {b: layers[b] for b in window.blocks}, xs, ys,
                                         config, measure_memory=measure_memory)
      for b in window.blocks:
        layers[b] = new[b]
      x_hat, x_dense = out, ys
    reports.append(rep)
    if progress:
      sweep.bar.set_postfix(loss=f'{rep.loss_before:.3g}->{rep.loss_after:.3g}',
                            sec=f'{rep.seconds:.1f}')
    if sweep.done(window.index, layers, window.blocks, {'x_hat': x_hat, 'x_dense': x_dense},
                  {'reports': [dataclasses.asdict(r) for r in reports]}):
      break
  out = dict(params)
  out['layers'] = layers
  return out, reports


def summarize(reports: Sequence[WindowReport], tokens_per_step: int | None = None
              ) -> dict[str, Any]:
  """Aggregate numbers of a reconstruction run; with ``tokens_per_step`` (batch x sequence
  length) also ``tokens_seen`` and ``train_compute`` (the sum over windows of tokens seen x
  trainable parameters)."""
  if not reports:
    return {}
  compute = {}
  if tokens_per_step is not None:
    compute = {'tokens_seen': int(sum(r.steps for r in reports) * tokens_per_step),
               'train_compute': float(sum(r.steps * tokens_per_step * r.trainable_params
                                          for r in reports))}
  return {**compute,
      'windows': len(reports),
      'mean_loss_before': float(np.mean([r.loss_before for r in reports])),
      'mean_loss_after': float(np.mean([r.loss_after for r in reports])),
      'steps': int(sum(r.steps for r in reports)),
      'trainable_params_max_window': int(max(r.trainable_params for r in reports)),
      'train_seconds': float(sum(r.seconds for r in reports)),
      'peak_loop_bytes': max((r.loop_bytes or 0) for r in reports) or None,
  }
