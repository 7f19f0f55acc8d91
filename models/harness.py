"""Our models in EleutherAI's lm-evaluation-harness (``lm_eval``), scored by our own JAX forward.

:class:`CompressRecoverLM` is an ``lm_eval`` model registered under the name ``compress-recover``.
It loads anything :func:`models.loading.load_model` accepts (a registry name such as
``smollm2-135m``, a Hugging Face directory, a ``.gguf`` file, or a directory written by
``experiments.compress --save``) and runs the forward of :mod:`models.llama` on the params exactly
as loaded: compressed leaves (:class:`kernels.CompressedLinear`) and their low-rank adapters go
through :func:`kernels.linear`, nothing is dequantized into a dense tree first. The tokenizer is
the model's own (``LoadedModel.tokenizer()``).

Requests are handled the way lm-eval's ``hf`` model (``lm_eval.models.huggingface.HFLM``, as of
lm-eval 0.4.13) handles them, so that both give the same numbers on the same weights (before
0.4.10 ``hf`` encoded without the tokenizer's special tokens by default: ``add_bos_token=False``
reproduces that):

* ``loglikelihood``: context/continuation encoding from ``TemplateLM`` (trailing whitespace of
  the context moves to the continuation; the pair is encoded whole and split at the context's
  length; an empty context becomes the prefix token), the input is
  ``(context + continuation)[-(max_length + 1):][:-1]``, i.e. the context is cut from the left,
  and the result is ``(sum log p(continuation | context), is_greedy)``. Requests are sorted by
  length, right-padded to a few bucket lengths (powers of two, capped at ``max_length``) in
  batches of ``batch_size`` rows, so the scorer compiles once per (rows, length) bucket; the LM
  head runs only on the continuation's positions.
* ``loglikelihood_rolling``: the disjoint windows of ``max_length`` tokens of
  ``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window`` (context length 1, the
  prefix token before the first window), scored as above and summed per document.
* ``generate_until``: greedy decoding with our KV cache (:func:`models.llama.forward_with_cache`),
  prompts of different lengths batched together (right-padded; each row writes its cache at its
  own position), the context cut from the left to ``max_length - max_gen_toks`` tokens. The
  caches are :func:`models.llama.generate`'s: full length on global layers, a ring buffer of the
  window on sliding-window layers (Mistral, Gemma 2/3), into which each row writes only its own
  real tokens. Decoding stops at ``max_gen_toks`` or once every row has produced the
  end-of-text token or one of the ``until`` strings; the text is cut at the first stop string
  (lm-eval's ``postprocess_generated_text``). Sampling (``do_sample=True``) is not
  implemented: such requests are decoded greedily, with a warning.

The prefix token (for an empty context and before the first rolling window) is, as in ``hf``,
the tokenizer's BOS token, else its EOS token; for a tokenizer with neither (the byte tokenizer of
``tiny-llama``) the config's BOS/EOS ids, else 0.

Registration and the command line: ``lm_eval`` 0.4.13 finds models only in its own registry,
which it fills from a fixed table (``lm_eval/models/__init__.py: MODEL_MAPPING``) and from
``@register_model`` decorators in modules that have been imported; it reads no Python entry
points (its registry would hold one, but nothing puts any there), so a ``pyproject.toml`` entry
point would not reach it. Importing this module registers ``compress-recover`` (after importing
``lm_eval.models``, so the built-in names stay available), which is enough for
``lm_eval.simple_evaluate`` in the
same process, but the ``lm_eval`` / ``lm-eval`` console command never imports it. The supported
command line is therefore ``python -m experiments.lm_eval --model=... --tasks=...``; from
Python::

  import lm_eval
  import models.harness  # registers 'compress-recover'
  out = lm_eval.simple_evaluate(model='compress-recover',
                                model_args={'model': 'smollm2-135m', 'batch_size': 8},
                                tasks=['hellaswag'])

On a mesh (the active :class:`models.sharding.Placement` when the model is made, e.g.
``experiments.lm_eval --mesh=data:8``) the params are replicated on every device once, and every
scoring and prompt batch is split along the data axis (:func:`models.sharding.batch`; a batch
whose row count the axis does not divide runs whole on every device).

``max_length`` defaults to the model's ``max_position_embeddings`` capped at 2048 (``hf`` uses
the uncapped value); pass ``max_length=`` to both to compare longer contexts.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import lm_eval.models  # pylint: disable=unused-import  (fills the registry with the built-in names)
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api import registry
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from kernels import formats
from models import llama
from models import loading
from models import losses
from models import sharding
from models.config import ModelConfig

MODEL_NAME = 'compress-recover'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
DEFAULT_MAX_LENGTH = 2048  # cap of the default max_length (the model's max_position_embeddings)
MIN_BUCKET = 16  # shortest padded length (tokens) of a scoring or prompt batch
DECODE_CHUNK = 32  # decoding steps per compiled call between checks for stop strings

_log = logging.getLogger(__name__)


def bucket_length(n: int, cap: int | None = None, minimum: int = MIN_BUCKET) -> int:
  """The padded length of a sequence of ``n`` tokens: the next power of two ``>= minimum``,
  capped at ``cap`` (when ``n <= cap``)."""
  b = minimum
  while b < n:
    b *= 2
  return b if cap is None else min(b, max(cap, n))


def _rows_for(n: int, batch_size: int) -> int:
  """Rows of a batch of ``n`` requests: ``batch_size``, or the next power of two below it when
  there are fewer requests (one shape per count class, not per count)."""
  return min(batch_size, bucket_length(n, minimum=1))


@functools.partial(jax.jit, static_argnames=('cfg', 'dtype_name'))
def score_continuations(params, tokens: jax.Array, index: jax.Array, targets: jax.Array,
                        mask: jax.Array, *, cfg: ModelConfig,
                        dtype_name: str = 'float32') -> tuple[jax.Array, jax.Array]:
  """Summed log-likelihood and greediness of continuations.

  Args:
    params: the model's params (compressed leaves as they are).
    tokens: ``[B, T]`` right-padded inputs.
    index: ``[B, K]`` the input positions whose next-token distributions score the
      continuation (padded entries: any valid position, masked out).
    targets: ``[B, K]`` the continuation tokens predicted at ``index``.
    mask: ``[B, K]`` bool, True for real continuation tokens.
    cfg: model config.
    dtype_name: compute dtype of the activations.

  Returns:
    ``(logprob [B], is_greedy [B])``: the sum of ``log p(target)`` over the masked positions
    (float32 log-softmax) and whether every target is the argmax of its distribution.
  """
  x = llama.hidden(params, tokens, cfg, dtype=jnp.dtype(dtype_name))
  x = jnp.take_along_axis(x, index[..., None], axis=1)
  logp = losses.log_probs(llama.head(params, x, cfg))
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(mask, tok, 0.0), axis=-1)
  greedy = jnp.all((jnp.argmax(logp, axis=-1) == targets) | ~mask, axis=-1)
  return total, greedy


@functools.partial(jax.jit, static_argnames=('cfg', 'cache_len', 'dtype_name'))
def _prefill(params, tokens: jax.Array, lengths: jax.Array, *, cfg: ModelConfig, cache_len: int,
             dtype_name: str):
  """Runs right-padded prompts ``[B, P]`` (row ``b``: ``lengths[b]`` real tokens) into a fresh
  cache, :func:`models.llama.generate`'s: ``cache_len`` slots on global layers, a ring buffer of
  the window on sliding-window layers, each row's ring holding its own last real tokens (the
  padding is not cached). Returns ``(greedy next token [B], cache)`` (the token after each row's
  last real one)."""
  dtype = jnp.dtype(dtype_name)
  cache = llama.init_cache(cfg, tokens.shape[0], cache_len, dtype, window=True)
  x, new = llama.hidden_with_cache(params, tokens, cfg, cache, 0, dtype=dtype, lengths=lengths)
  last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
  logits = llama.head(params, last, cfg)[:, 0]
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), new


@functools.partial(jax.jit, static_argnames=('cfg', 'steps', 'dtype_name'))
def _decode(params, tok: jax.Array, cache, index: jax.Array, *, cfg: ModelConfig, steps: int,
            dtype_name: str):
  """``steps`` greedy steps. Row ``b`` feeds ``tok[b]`` at cache position ``index[b]``; returns
  ``(tokens [B, steps], last token, cache, index + steps)``."""
  dtype = jnp.dtype(dtype_name)

  def one_row(t, row_cache, i):
    row_cache = [{k: v[None] for k, v in c.items()} for c in row_cache]
    logits, row_cache = llama.forward_with_cache(params, t[None, None], cfg, row_cache, i,
                                                 dtype=dtype)
    return logits[0, -1], [{k: v[0] for k, v in c.items()} for c in row_cache]

  def step(carry, _):
    t, c, i = carry
    logits, c = jax.vmap(one_row)(t, c, i)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (nxt, c, i + 1), nxt

  (tok, cache, index), out = jax.lax.scan(step, (tok, cache, index), None, length=steps)
  return out.T, tok, cache, index


def greedy_generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, *, dtype=jnp.float32, rows: int | None = None,
                    done: Callable[[list[int]], bool] | None = None,
                    chunk: int = DECODE_CHUNK) -> list[list[int]]:
  """Greedy continuations of prompts of different lengths, batched, with the KV cache.

  Prompts are right-padded to a bucket length; row ``b`` continues at its own position, so its
  tokens are those of :func:`models.llama.generate` on that prompt alone. The caches are
  ``generate``'s (:func:`models.llama.init_cache` with ``window=True``): a sliding-window layer
  keeps a ring buffer of its window, whatever the prompt and generation lengths.

  Args:
    params: the model's params.
    cfg: model config.
    prompts: token lists (each non-empty).
    max_new_tokens: tokens to generate per prompt.
    dtype: compute dtype.
    rows: batch rows (default ``len(prompts)``); extra rows are padding.
    done: ``done(tokens so far)`` True once a row may stop; decoding ends early when every row
      is done (checked every ``chunk`` steps).
    chunk: decoding steps per compiled call.

  Returns:
    ``len(prompts)`` lists of at most ``max_new_tokens`` tokens (exactly that many unless
    stopped early by ``done``).
  """
  n = len(prompts)
  if n == 0 or max_new_tokens <= 0:
    return [[] for _ in prompts]
  if any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  rows = max(rows or n, n)
  width = bucket_length(max(len(p) for p in prompts))
  chunk = max(1, min(chunk, max_new_tokens - 1))
  steps_total = -(-(max_new_tokens - 1) // chunk) * chunk
  tokens = np.zeros((rows, width), np.int32)
  lengths = np.ones((rows,), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, :len(p)] = p
    lengths[r] = len(p)
  name = jnp.dtype(dtype).name
  lengths = sharding.batch(lengths)
  tok, cache = _prefill(params, sharding.batch(tokens), lengths, cfg=cfg,
                        cache_len=width + steps_total, dtype_name=name)
  out = [[int(t)] for t in np.asarray(tok)[:n]]
  index = lengths
  while len(out[0]) < max_new_tokens and not (done and all(done(o) for o in out)):
    new, tok, cache, index = _decode(params, tok, cache, index, cfg=cfg, steps=chunk,
                                     dtype_name=name)
    new = np.asarray(new)
    for r in range(n):
      out[r].extend(int(t) for t in new[r])
  return [o[:max_new_tokens] for o in out]


def generation_settings(gen_kwargs: dict[str, Any], default_max_gen_toks: int,
                        eos_text: str | None) -> tuple[list[str], int, bool]:
  """``(stop strings, tokens to generate, sampling requested)`` of a request's generation
  arguments, as lm-eval reads them: ``until`` (a string or a list) plus the end-of-text token's
  text; ``max_gen_toks`` or its aliases ``max_new_tokens``, ``max_tokens``,
  ``max_completion_tokens`` (in that priority); sampling when ``do_sample`` is true or, without
  ``do_sample``, when ``temperature > 0``."""
  until = gen_kwargs.get('until')
  if until is None:
    until = []
  elif isinstance(until, str):
    until = [until]
  elif isinstance(until, (list, tuple)):
    until = list(until)
  else:
    raise ValueError(f"expected 'until' to be a string or a list of strings, got {until!r}")
  if eos_text and eos_text not in until:
    until.append(eos_text)
  max_gen = default_max_gen_toks
  for key in ('max_gen_toks', 'max_new_tokens', 'max_tokens', 'max_completion_tokens'):
    if gen_kwargs.get(key) is not None:
      max_gen = int(gen_kwargs[key])
      break
  do_sample = gen_kwargs.get('do_sample')
  sampling = bool(do_sample) if do_sample is not None else float(
      gen_kwargs.get('temperature', 0.0) or 0.0) > 0.0
  return until, max_gen, sampling


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """``text`` up to the first occurrence of each non-empty stop string, applied in turn (lm-eval's
  ``postprocess_generated_text``)."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


def _as_int(name: str, value: Any, minimum: int = 1) -> int:
  try:
    v = int(value)
  except (TypeError, ValueError):
    raise ValueError(f'{name}={value!r} is not an integer') from None
  if v < minimum or v != float(value):
    raise ValueError(f'{name}={value!r} must be an integer >= {minimum}')
  return v


def _as_bool(name: str, value: Any) -> bool | None:
  if value is None or isinstance(value, bool):
    return value
  if str(value).lower() in ('true', '1', 'yes'):
    return True
  if str(value).lower() in ('false', '0', 'no'):
    return False
  raise ValueError(f'{name}={value!r} is not a boolean')


@registry.register_model(MODEL_NAME)
class CompressRecoverLM(TemplateLM):
  """An lm-eval model that scores with our JAX forward (see the module docstring).

  Args (``--model_args`` / ``model_args``):
    model: what :func:`models.loading.load_model` accepts, or a :class:`LoadedModel` (e.g. params
      compressed in this process).
    batch_size: requests per forward pass (``'auto'`` is taken as the default, 8).
    max_length: longest input in tokens (default: ``max_position_embeddings``, at most 2048).
    dtype: ``'float32'`` or ``'bfloat16'`` (weights and activations; log-softmax in float32).
    max_gen_toks: default number of tokens ``generate_until`` produces.
    add_bos_token: as ``hf``'s: force (True) or suppress (False) the tokenizer's special tokens
      when encoding; None keeps the tokenizer's default.
    prefix_token_id: the token an empty context (and the first rolling window) starts from.
    device, max_batch_size: passed by lm-eval to every model; ignored (JAX picks the device).
  """

  def __init__(self, model: str | loading.LoadedModel | None = None, batch_size: int | str = 8,
               max_length: int | str | None = None, dtype: str = 'float32',
               max_gen_toks: int | str = 256, add_bos_token: bool | str | None = None,
               prefix_token_id: int | str | None = None, device: str | None = None,
               max_batch_size: int | None = None) -> None:
    super().__init__()
    del device, max_batch_size
    if model is None:
      raise ValueError(f'the {MODEL_NAME} model needs model=NAME_OR_PATH in its model_args')
    if str(dtype) not in DTYPES:
      raise ValueError(f'dtype={dtype!r} is not one of {sorted(DTYPES)}')
    self._dtype_name = str(dtype)
    if isinstance(batch_size, str) and batch_size.startswith('auto'):
      batch_size = 8
    self._batch_size = _as_int('batch_size', batch_size)
    self._max_gen_toks = _as_int('max_gen_toks', max_gen_toks)
    if isinstance(model, loading.LoadedModel):
      loaded = model
      if self._dtype_name != 'float32':
        loaded = loading.LoadedModel(loaded.config,
                                     llama.cast_params(loaded.params, DTYPES[self._dtype_name]),
                                     loaded.source, loaded.tokenizer_fn)
    else:
      loaded = loading.load_model(str(model), dtype=DTYPES[self._dtype_name])
    self.loaded = loaded
    # A registry name stands for itself (its files live in a machine-specific cache).
    self.model_name = model if isinstance(model, str) else loaded.source
    self.config: ModelConfig = loaded.config
    self.params = sharding.replicate(loaded.params)  # on the active mesh, once
    self.tokenizer = loaded.tokenizer()
    if max_length is None:
      self._max_length = min(self.config.max_position_embeddings, DEFAULT_MAX_LENGTH)
    else:
      self._max_length = _as_int('max_length', max_length, minimum=2)
    self.add_bos_token = _as_bool('add_bos_token', add_bos_token)
    self._custom_prefix = None if prefix_token_id is None else _as_int(
        'prefix_token_id', prefix_token_id, minimum=0)
    self.batch_sizes: dict[int, int] = {}
    self._warned_sampling = False

  # ------------------------------------------------------------------ properties

  @property
  def eot_token_id(self) -> int | None:
    eos = getattr(self.tokenizer, 'eos_token_id', None)
    return eos if eos is not None else self.config.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    if self._custom_prefix is not None:
      return self._custom_prefix
    for tid in (getattr(self.tokenizer, 'bos_token_id', None),
                getattr(self.tokenizer, 'eos_token_id', None), self.config.bos_token_id,
                self.config.eos_token_id):
      if tid is not None:
        return int(tid)
    return 0

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def dtype(self):
    return DTYPES[self._dtype_name]

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, 'name_or_path', self.loaded.source)).replace('/', '__')

  def get_model_info(self) -> dict[str, Any]:
    """What lm-eval records under ``config`` in its results."""
    leaves = [leaf for block in self.params['layers'] for sub in ('self_attn', 'mlp')
              for lin in block[sub].values() for leaf in [lin['kernel']]]
    source = self.model_name if self.model_name in loading.REGISTRY else self.loaded.source
    return {'model_source': source, 'model_dtype': self._dtype_name,
            'max_length': self.max_length,
            'compressed_linears': sum(isinstance(x, formats.CompressedLinear) for x in leaves),
            'linears': len(leaves), 'model_num_parameters': self.config.num_params}

  # ------------------------------------------------------------------ tokenization

  @functools.cached_property
  def _prefix_text(self) -> str:
    return self.tokenizer.decode([self.prefix_token_id])

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """``hf``'s encoding: special tokens as ``add_special_tokens`` (else ``add_bos_token``,
    else the tokenizer's default), none when the text already starts with the prefix token."""
    del kwargs
    special = {}
    if add_special_tokens is not None:
      special = {'add_special_tokens': add_special_tokens}
    elif self.add_bos_token is not None:
      special = {'add_special_tokens': self.add_bos_token}
    if add_special_tokens is None and self._prefix_text and string.startswith(self._prefix_text):
      special['add_special_tokens'] = False
    ids = list(self.tokenizer.encode(string, **special))
    if left_truncate_len:
      ids = ids[-left_truncate_len:]
    return ids

  def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    if not hasattr(self.tokenizer, 'apply_chat_template'):
      return super().apply_chat_template(chat_history, add_generation_prompt)
    return self.tokenizer.apply_chat_template(
        chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
        continue_final_message=not add_generation_prompt)

  # ------------------------------------------------------------------ scoring

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """``(logprob, is_greedy)`` of ``(key, context tokens, continuation tokens)`` requests, in
    their order; a result with a non-None key goes to the request cache like ``hf``'s."""
    del kwargs
    n_max = self.max_length
    items = []  # (request index, input tokens, number of continuation tokens, continuation)
    for i, (_, ctx, cont) in enumerate(requests):
      if not cont:
        items.append((i, [], 0, []))
        continue
      if len(cont) > n_max:
        raise ValueError(f'a continuation of {len(cont)} tokens is longer than '
                         f'max_length={n_max}')
      items.append((i, (list(ctx) + list(cont))[-(n_max + 1):][:-1], len(cont), list(cont)))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    todo = sorted((it for it in items if it[2]), key=lambda it: (-len(it[1]), tuple(it[1])))
    rows = _rows_for(len(todo), self.batch_size)
    name = self._dtype_name
    bar = tqdm(total=len(todo), desc='loglikelihood', disable=disable_tqdm or len(todo) < 2)
    for start in range(0, len(todo), rows):
      chunk = todo[start:start + rows]
      width = bucket_length(max(len(it[1]) for it in chunk), n_max)
      k = bucket_length(max(it[2] for it in chunk), width)
      tokens = np.zeros((rows, width), np.int32)
      index = np.zeros((rows, k), np.int32)
      targets = np.zeros((rows, k), np.int32)
      mask = np.zeros((rows, k), bool)
      for r, (_, inp, n_cont, cont) in enumerate(chunk):
        tokens[r, :len(inp)] = inp
        first = len(inp) - n_cont  # position whose next-token distribution predicts cont[0]
        index[r, :n_cont] = np.arange(first, len(inp))
        index[r, n_cont:] = first
        targets[r, :n_cont] = cont
        mask[r, :n_cont] = True
      arrays = [sharding.batch(a) for a in (tokens, index, targets, mask)]  # split along data
      total, greedy = score_continuations(self.params, *arrays, cfg=self.config, dtype_name=name)
      total, greedy = np.asarray(total, np.float64), np.asarray(greedy)
      for r, it in enumerate(chunk):
        results[it[0]] = (float(total[r]), bool(greedy[r]))
      bar.update(len(chunk))
    bar.close()
    for (key, _, _), answer in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, answer)
    return results

  def rolling_windows(self, string: str) -> list[tuple[list[int], list[int]]]:
    """The disjoint ``(context, continuation)`` token windows ``hf`` scores for ``string``."""
    return [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
        max_seq_len=self.max_length, context_len=1)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of each whole text over disjoint windows of ``max_length`` tokens."""
    windows, owner = [], []
    for r, (string,) in enumerate(req.args for req in requests):
      for ctx, cont in self.rolling_windows(string):
        windows.append((None, ctx, cont))
        owner.append(r)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for r, (logprob, _) in zip(owner, scores):
      totals[r] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', (req.args[0],), total)
    return totals

  # ------------------------------------------------------------------ generation

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations, cut at the first ``until`` string (see the module docstring)."""
    results: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      key = json.dumps(req.args[1], sort_keys=True, default=str)
      groups.setdefault(key, []).append(i)
    eot = self.eot_token_id
    eos_text = None if eot is None else self.tok_decode([eot], skip_special_tokens=False)
    bar = tqdm(total=len(requests), desc='generate_until',
               disable=disable_tqdm or len(requests) < 2)
    for members in groups.values():
      gen_kwargs = requests[members[0]].args[1]
      if not isinstance(gen_kwargs, dict):
        raise ValueError(f'expected a dict of generation arguments, got {gen_kwargs!r}')
      until, max_gen, sampling = generation_settings(gen_kwargs, self.max_gen_toks, eos_text)
      if sampling and not self._warned_sampling:
        _log.warning('%s decodes greedily; do_sample=True is ignored', MODEL_NAME)
        self._warned_sampling = True
      max_ctx = self.max_length - max_gen
      if max_ctx <= 0:
        raise ValueError(f'max_gen_toks={max_gen} leaves no room for a context within '
                         f'max_length={self.max_length}')
      encoded = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx)
                 or [self.prefix_token_id] for i in members}  # an empty context: the prefix
      order = sorted(members, key=lambda i: (-len(encoded[i]), requests[i].args[0]))
      done = functools.partial(self._stopped, until=tuple(until))
      rows = _rows_for(len(order), self.batch_size)
      for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        outs = greedy_generate(self.params, self.config, [encoded[i] for i in chunk], max_gen,
                               dtype=self.dtype, rows=rows, done=done)
        for i, toks in zip(chunk, outs):
          text = cut_at_stop(self._generated_text(toks), until)
          results[i] = text
          self.cache_hook.add_partial('generate_until', requests[i].args, text)
        bar.update(len(chunk))
    bar.close()
    return [r if r is not None else '' for r in results]

  def _generated_text(self, tokens: list[int]) -> str:
    """The text of generated tokens up to the first end-of-text token."""
    eot = self.eot_token_id
    if eot is not None and eot in tokens:
      tokens = tokens[:tokens.index(eot)]
    return self.tok_decode(tokens)

  def _stopped(self, tokens: list[int], until: tuple[str, ...]) -> bool:
    """Whether a row may stop: it produced the end-of-text token or a stop string."""
    eot = self.eot_token_id
    return (eot is not None and eot in tokens) or any(
        u and u in self._generated_text(tokens) for u in until)
