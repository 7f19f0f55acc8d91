"""Evaluation as a model operation: perplexity, divergence from a reference model, multiple choice.

* Perplexity: ``exp(mean NLL)`` over every predicted token of the evaluation windows (each window of
  ``seqlen`` tokens predicts its last ``seqlen - 1`` tokens, as the GPTQ/Wanda evaluation does).
  Log-softmax in float32 whatever the compute dtype.
* Against a reference model (the dense one): mean token-level ``KL(P_ref || P)`` of the next-token
  distributions and top-1 agreement (how often both models' argmax tokens match).
* Multiple choice (lm-eval-harness style): each choice is scored by the summed log-likelihood of
  its tokens after the context (``acc``) and by that sum divided by the choice's length in
  characters (``acc_norm``, lm-eval's byte/char normalisation). Continuation tokens are
  ``tok(context + choice)[len(tok(context)):]``, as lm-eval splits them.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from models import distributed
from models import llama
from models import losses
from models import sharding
from models.config import ModelConfig


def _log_probs(params, tokens, cfg: ModelConfig, dtype, prefix=None):
  return losses.log_probs(llama.forward(params, tokens, cfg, dtype=dtype, prefix=prefix))


def token_nll(params, tokens: jax.Array, cfg: ModelConfig, dtype=jnp.float32,
              prefix: jax.Array | None = None) -> jax.Array:
  """Negative log-likelihood of ``tokens[:, 1:]`` given their prefix: ``[B, T - 1]`` float32.

  ``prefix``: optional soft-prompt embeddings ``[B or 1, L, D]`` before the tokens
  (:func:`models.llama.forward`)."""
  return losses.nll_of(_log_probs(params, tokens, cfg, dtype, prefix)[:, :-1], tokens)


def compare_window_stats(params_ref, params, tokens: jax.Array, cfg: ModelConfig, dtype=jnp.float32):
  """Per-token NLL of both models, ``KL(P_ref || P)`` and top-1 agreement on ``tokens [B, T]``.

  Returns a dict of ``[B, T - 1]`` arrays (next-token predictions at positions 0..T-2).
  """
  lr = _log_probs(params_ref, tokens, cfg, dtype)[:, :-1]
  return {'nll_ref': losses.nll_of(lr, tokens), **_stats_vs_ref(params, tokens, lr, cfg, dtype)}


def continuation_logprob(params, tokens: jax.Array, weight: jax.Array, cfg: ModelConfig,
                         dtype=jnp.float32, prefix: jax.Array | None = None) -> jax.Array:
  """Per-row sum of ``log p(tokens[:, t+1] | tokens[:, :t+1]) * weight[:, t]``: ``[B]``."""
  return -jnp.sum(token_nll(params, tokens, cfg, dtype, prefix) * weight, axis=-1)


@functools.lru_cache(maxsize=None)
def _jitted(fn_name: str, cfg: ModelConfig, dtype_name: str):
  fn = {'nll': token_nll, 'compare': compare_window_stats, 'cont': continuation_logprob,
        'ref': _ref_logp, 'vs_ref': _stats_vs_ref}[fn_name]
  return jax.jit(functools.partial(fn, cfg=cfg, dtype=jnp.dtype(dtype_name)))


def _batches(windows: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
  for i in range(0, len(windows), batch_size):
    yield windows[i:i + batch_size]


def perplexity(params, cfg: ModelConfig, windows: np.ndarray, *, batch_size: int = 8,
               dtype=jnp.float32, progress: bool = True, desc: str = 'perplexity',
               prefixes: Any = None) -> dict[str, Any]:
  """Perplexity over evaluation windows ``[N, T]``.

  ``prefixes``: optional per-window soft-prompt embeddings ``[N, L, D]`` placed before each
  window (e.g. the prompts a prompt pool routes each window to); the window's tokens are scored
  as without them.

  Returns:
    ``{'ppl', 'nll', 'eval_tokens' (predicted tokens), 'seconds'}``.
  """
  windows = np.asarray(windows, np.int32)
  if prefixes is not None:
    prefixes = np.asarray(prefixes, np.float32)
    if len(prefixes) != len(windows):
      raise ValueError(f'prefixes has {len(prefixes)} rows for {len(windows)} windows')
  fn = _jitted('nll', cfg, jnp.dtype(dtype).name)
  total, count, t0 = 0.0, 0, time.time()
  for i, batch in enumerate(tqdm(list(_batches(windows, batch_size)), desc=desc,
                                 disable=not progress)):
    if prefixes is None:
      nll = fn(params, sharding.batch(batch))
    else:
      pre = jnp.asarray(prefixes[i * batch_size:i * batch_size + len(batch)])
      nll = fn(params, sharding.batch(batch), prefix=pre)
    nll = np.asarray(nll, np.float64)
    total += nll.sum()
    count += nll.size
  mean = total / count
  return {'ppl': float(np.exp(mean)), 'nll': float(mean), 'eval_tokens': int(count),
          'seconds': time.time() - t0}


def compare(params_ref, params, cfg: ModelConfig, windows: np.ndarray, *, batch_size: int = 4,
            dtype=jnp.float32, progress: bool = True, desc: str = 'compare') -> dict[str, Any]:
  """Perplexity of both models plus mean KL(P_ref || P) and top-1 agreement over ``windows``."""
  windows = np.asarray(windows, np.int32)
  fn = _jitted('compare', cfg, jnp.dtype(dtype).name)
  sums = {'nll_ref': 0.0, 'nll': 0.0, 'kl': 0.0, 'top1': 0.0}
  count, t0 = 0, time.time()
  for batch in tqdm(list(_batches(windows, batch_size)), desc=desc, disable=not progress):
    out = fn(params_ref, params, sharding.batch(batch))
    for k in sums:
      sums[k] += float(np.asarray(out[k], np.float64).sum())
    count += out['nll'].size
  m = {k: v / count for k, v in sums.items()}
  return {'ppl_ref': float(np.exp(m['nll_ref'])), 'ppl': float(np.exp(m['nll'])), 'kl': m['kl'],
          'top1': m['top1'], 'eval_tokens': int(count), 'seconds': time.time() - t0}


def _stats_vs_ref(params, tokens: jax.Array, ref_logp: jax.Array, cfg: ModelConfig,
                  dtype=jnp.float32):
  """Per-token NLL, ``KL(P_ref || P)`` and top-1 agreement of ``params`` given the reference's
  log-probabilities ``ref_logp [B, T - 1, V]``."""
  return _scores(_log_probs(params, tokens, cfg, dtype)[:, :-1], tokens, ref_logp)


def _scores(lp, tokens, ref_logp):
  """NLL of ``tokens`` under the log-probabilities ``lp [B, T - 1, V]``, ``KL(P_ref || P)`` and
  top-1 agreement with ``ref_logp``."""
  return {'nll': losses.nll_of(lp, tokens), 'kl': losses.kl_divergence(ref_logp, lp),
          'top1': losses.top1_agreement(ref_logp, lp)}


def _ref_logp(params, tokens, cfg: ModelConfig, dtype=jnp.float32):
  return _log_probs(params, tokens, cfg, dtype)[:, :-1]


def compare_many(params_ref, models: dict[str, Any], cfg: ModelConfig, windows: np.ndarray, *,
                 batch_size: int = 4, dtype=jnp.float32, progress: bool = True,
                 desc: str = 'compare') -> dict[str, dict[str, Any]]:
  """:func:`compare` for several models against one reference, computing the reference once per
  batch. Returns ``{name: {'ppl', 'kl', 'top1', 'eval_tokens'}}`` plus ``'__ref__'``'s ppl."""
  windows = np.asarray(windows, np.int32)
  ref_fn = _jitted('ref', cfg, jnp.dtype(dtype).name)
  vs_fn = _jitted('vs_ref', cfg, jnp.dtype(dtype).name)
  sums = {name: {'nll': 0.0, 'kl': 0.0, 'top1': 0.0} for name in models}
  ref_nll, count = 0.0, 0
  for batch in tqdm(list(_batches(windows, batch_size)), desc=desc, disable=not progress):
    tokens = jnp.asarray(batch)
    lr = ref_fn(params_ref, tokens)
    ref_nll += float(losses.nll_of(lr, tokens).sum())
    count += lr.shape[0] * lr.shape[1]
    for name, params in models.items():
      out = vs_fn(params, tokens, lr)
      for k in sums[name]:
        sums[name][k] += float(np.asarray(out[k], np.float64).sum())
  result = {'__ref__': {'ppl': float(np.exp(ref_nll / count)), 'eval_tokens': count}}
  for name, s in sums.items():
    result[name] = {'ppl': float(np.exp(s['nll'] / count)), 'kl': s['kl'] / count,
                    'top1': s['top1'] / count, 'eval_tokens': count}
  return result


def _on_device(tree: Any) -> Any:
  """``tree`` (a block or the top-level params) whole on every device of the active placement;
  host (NumPy) leaves are transferred once here, not once per batch."""
  return jax.tree.map(jnp.asarray, sharding.replicate(tree))


def _top(params) -> dict[str, Any]:
  """The params outside the blocks: embeddings, final norm, LM head."""
  return {k: v for k, v in params.items() if k != 'layers'}


def _embed_step(top, tokens, cfg: ModelConfig, dtype):
  return llama.embed(top, tokens, cfg, dtype)


def _block_step(block, x, cfg: ModelConfig):
  return llama.block_apply(block, x, cfg)


def _ref_head_step(top, x, tokens, cfg: ModelConfig):
  """The reference's head on its last hidden states: (log-probs ``[B, T - 1, V]``, NLL)."""
  lr = losses.log_probs(llama.head(top, x, cfg))[:, :-1]
  return lr, losses.nll_of(lr, tokens)


def _vs_ref_head_step(top, x, tokens, ref_logp, cfg: ModelConfig):
  """:func:`_stats_vs_ref` from a model's last hidden states instead of its tokens."""
  return _scores(losses.log_probs(llama.head(top, x, cfg))[:, :-1], tokens, ref_logp)


@functools.lru_cache(maxsize=None)
def _blockwise_jitted(fn_name: str, cfg: ModelConfig, dtype_name: str):
  if fn_name == 'embed':
    return jax.jit(functools.partial(_embed_step, cfg=cfg, dtype=jnp.dtype(dtype_name)))
  fn = {'block': _block_step, 'ref_head': _ref_head_step, 'vs_ref_head': _vs_ref_head_step}[fn_name]
  return jax.jit(functools.partial(fn, cfg=cfg))


def _last_hidden(params, cfg: ModelConfig, windows: np.ndarray, batch_size: int, dtype,
                 bar) -> np.ndarray:
  """The last block's output ``[N, T, D]`` (host memory) of one model on ``windows``, one block
  on the device at a time: block ``i`` is read once (``params['layers'][i]``), placed, run on
  every batch of hidden states and dropped before block ``i + 1`` is read."""
  dtype_name = jnp.dtype(dtype).name
  embed_fn = _blockwise_jitted('embed', cfg, dtype_name)
  top = _on_device({'embed_tokens': params['embed_tokens']})
  x = np.concatenate([distributed.gather(embed_fn(top, sharding.batch(b)))
                      for b in _batches(windows, batch_size)], axis=0)
  del top
  layers = params['layers']
  for i in range(cfg.num_layers):
    layer_cfg = cfg.layer(i)
    block = _on_device(layers[i])
    fn = _blockwise_jitted('block', layer_cfg, dtype_name)
    x = np.concatenate([distributed.gather(fn(block, sharding.batch(b)))
                        for b in _batches(x, batch_size)], axis=0)
    del block
    bar.update(1)
  return x


def compare_blockwise(params_ref, models: dict[str, Any], cfg: ModelConfig, windows: np.ndarray, *,
                      batch_size: int = 4, dtype=jnp.float32, progress: bool = True,
                      desc: str = 'compare') -> dict[str, dict[str, Any]]:
  """:func:`compare_many` computed block by block, for models too large for the device.

  Returns exactly what :func:`compare_many` returns: ``{'__ref__': {'ppl', 'eval_tokens'},
  name: {'ppl', 'kl', 'top1', 'eval_tokens'}}``.

  Each model in turn (the reference first) embeds every window, then runs the hidden states of all
  windows through block 0, then block 1, ..., ``batch_size`` windows per jitted call; the hidden
  states stay in host memory (NumPy) between blocks. ``params['layers']`` may be any sequence of
  blocks, e.g. a lazy one whose ``__getitem__(i)`` reads block ``i`` from disk (NumPy leaves are
  fine): block ``i`` of each model is read exactly once (``layers[i]``, for ``i`` in
  ``range(cfg.num_layers)``; never iterated or measured), placed on the active placement
  (:func:`models.sharding.replicate`; batches with :func:`models.sharding.batch`), used for every
  batch and dropped before the next block is read. Per-layer settings run with ``cfg.layer(i)``.
  Once every model's last hidden states are known, each batch goes through the final norm and LM
  head of the reference (:func:`models.llama.head`, soft-capping included) and of each model,
  and NLL, ``KL(P_ref || P)`` and top-1 agreement accumulate as in :func:`compare_many`.

  Memory bound:

  * device: ONE transformer block of ONE model plus one batch's activations (``[batch_size, T, D]``
    in and out of the block); in the last phase, the top-level params (embeddings, final norm, LM
    head: ordinary arrays, placed once per model) plus one batch's logits/log-probabilities
    ``[batch_size, T, V]`` for the reference and the model being scored.
  * host: the hidden states of all windows, ``[N, T, D]`` in ``dtype``, per model (the reference
    and every entry of ``models``), plus whatever one block the layers sequence materialises.

  ``progress``: one tqdm step per block per model (``cfg.num_layers * (1 + len(models))`` steps).
  """
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or not len(windows):
    raise ValueError(f'windows must be a non-empty [N, T] array of tokens, got shape {windows.shape}')
  dtype_name = jnp.dtype(dtype).name
  with tqdm(total=cfg.num_layers * (1 + len(models)), desc=desc, disable=not progress) as bar:
    bar.set_postfix_str('__ref__')
    ref_hidden = _last_hidden(params_ref, cfg, windows, batch_size, dtype, bar)
    hidden = {}
    for name, params in models.items():
      bar.set_postfix_str(name)
      hidden[name] = _last_hidden(params, cfg, windows, batch_size, dtype, bar)
  ref_fn = _blockwise_jitted('ref_head', cfg, dtype_name)
  vs_fn = _blockwise_jitted('vs_ref_head', cfg, dtype_name)
  ref_top = _on_device(_top(params_ref))
  tops = {name: _on_device(_top(params)) for name, params in models.items()}
  sums = {name: {'nll': 0.0, 'kl': 0.0, 'top1': 0.0} for name in models}
  ref_nll, count = 0.0, 0
  for start in range(0, len(windows), batch_size):
    rows = slice(start, start + batch_size)
    tokens = sharding.batch(windows[rows])
    lr, nll_ref = ref_fn(ref_top, sharding.batch(ref_hidden[rows]), tokens)
    ref_nll += float(np.asarray(distributed.gather(nll_ref), np.float64).sum())
    count += lr.shape[0] * lr.shape[1]
    for name in models:
      out = vs_fn(tops[name], sharding.batch(hidden[name][rows]), tokens, lr)
      for k in sums[name]:
        sums[name][k] += float(np.asarray(distributed.gather(out[k]), np.float64).sum())
    del lr
  result = {'__ref__': {'ppl': float(np.exp(ref_nll / count)), 'eval_tokens': count}}
  for name, s in sums.items():
    result[name] = {'ppl': float(np.exp(s['nll'] / count)), 'kl': s['kl'] / count,
                    'top1': s['top1'] / count, 'eval_tokens': count}
  return result


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text)['input_ids'])


def score_multiple_choice(params, cfg: ModelConfig, tokenizer, items: Sequence[Any], *,
                          batch_size: int = 32, dtype=jnp.float32, progress: bool = True,
                          desc: str = 'multiple choice', prefixes: Any = None) -> dict[str, Any]:
  """Scores multiple-choice items (objects with ``context``, ``choices``, ``gold``).

  ``prefixes``: optional per-item soft-prompt embeddings ``[len(items), L, D]`` (e.g. the prompt
  a prompt pool routes each item's context to); every choice of item ``i`` is scored with
  ``prefixes[i]`` before its context.

  Returns:
    ``{'acc', 'acc_norm', 'n', 'predictions'}`` where ``predictions`` holds each item's argmax
    under the summed log-likelihood.
  """
  if prefixes is not None:
    prefixes = np.asarray(prefixes, np.float32)
    if len(prefixes) != len(items):
      raise ValueError(f'prefixes has {len(prefixes)} rows for {len(items)} items')
  requests = []  # (item index, choice index, full tokens, number of continuation tokens)
  for i, item in enumerate(items):
    ctx = _encode(tokenizer, item.context)
    for j, choice in enumerate(item.choices):
      whole = _encode(tokenizer, item.context + choice)
      n_cont = len(whole) - len(ctx)
      if whole[:len(ctx)] != ctx or n_cont <= 0:
        # The tokenizer merged across the boundary: score the choice's own tokens after the context.
        cont = _encode(tokenizer, choice)
        whole, n_cont = ctx + cont, len(cont)
      requests.append((i, j, whole, n_cont))
  fn = _jitted('cont', cfg, jnp.dtype(dtype).name)
  scores = np.zeros(len(requests))
  order = sorted(range(len(requests)), key=lambda r: len(requests[r][2]))
  chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
  longest = max((len(req[2]) for req in requests), default=1)
  width = max(8, 1 << (longest - 1).bit_length())  # one padded width: one compile per model
  for chunk in tqdm(chunks, desc=desc, disable=not progress):
    batch = np.zeros((batch_size, width), np.int32)
    weight = np.zeros((batch_size, width - 1), np.float32)  # 1 where position t predicts a choice token
    for row, r in enumerate(chunk):
      toks, n_cont = requests[r][2], requests[r][3]
      batch[row, :len(toks)] = toks
      weight[row, len(toks) - n_cont - 1:len(toks) - 1] = 1.0
    if prefixes is None:
      sums = fn(params, sharding.batch(batch), sharding.batch(weight))
    else:
      pre = np.zeros((batch_size,) + tuple(prefixes.shape[1:]), np.float32)
      for row, r in enumerate(chunk):
        pre[row] = prefixes[requests[r][0]]
      sums = fn(params, sharding.batch(batch), sharding.batch(weight), prefix=sharding.batch(pre))
    sums = np.asarray(sums)
    for row, r in enumerate(chunk):
      scores[r] = sums[row]
  correct = correct_norm = 0
  predictions = []
  k = 0
  for item in items:
    n = len(item.choices)
    s = scores[k:k + n]
    k += n
    lengths = np.array([max(1, len(c)) for c in item.choices], np.float64)
    pred = int(np.argmax(s))
    predictions.append(pred)
    correct += pred == item.gold
    correct_norm += int(np.argmax(s / lengths)) == item.gold
  n_items = max(1, len(items))
  return {'acc': correct / n_items, 'acc_norm': correct_norm / n_items, 'n': len(items),
          'predictions': predictions}
