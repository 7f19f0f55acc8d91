"""Llama-family decoder as pure functions of a nested-dict param pytree.

One decoder serves every supported family (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3): their
differences are fields of :class:`models.config.ModelConfig` (norm flavour, extra norms, q/k norms,
soft-capping, activation, partial rotary, per-layer sliding window), not copies of this code.
Per-layer settings are resolved with ``cfg.layer(i)`` before a block runs.

Param layout (Hugging Face names, Flax kernel layout ``[in, out]``)::

  {'embed_tokens': {'embedding': [V, D]},
   'layers': [{'input_layernorm': {'scale': [D]},
               'self_attn': {'q_proj': {'kernel': [D, H*hd], 'bias'?: [H*hd]}, 'k_proj', 'v_proj',
                             'o_proj': {'kernel': [H*hd, D]}},
               'post_attention_layernorm': {'scale': [D]},
               'mlp': {'gate_proj': {'kernel': [D, F]}, 'up_proj', 'down_proj': {'kernel': [F, D]}}},
              ...],
   'norm': {'scale': [D]},
   'lm_head': {'kernel': [D, V]}}          # absent when embeddings are tied

Families add: ``self_attn/q_norm``, ``self_attn/k_norm`` (``{'scale': [hd]}``, Qwen3, Gemma 3) and
``pre_feedforward_layernorm``, ``post_feedforward_layernorm`` (Gemma, whose
``post_attention_layernorm`` is then the norm *after* attention, as in its Hugging Face names).
Norm scales are stored as the checkpoint has them (Gemma's ``w`` of ``1 + w``).

Every ``kernel`` leaf goes through :func:`kernels.linear`, so a compressed leaf
(:class:`kernels.CompressedLinear`) plugs in at the same path. Compute dtype is the dtype of the
activations (``float32`` or ``bfloat16``); norms, softmax and logits are computed in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from models.config import ModelConfig

Params = dict[str, Any]

# The input each linear reads, named so that linears sharing an input share its statistics.
LINEAR_INPUTS = {
    'self_attn/q_proj': 'attn_in',
    'self_attn/k_proj': 'attn_in',
    'self_attn/v_proj': 'attn_in',
    'self_attn/o_proj': 'o_in',
    'mlp/gate_proj': 'mlp_in',
    'mlp/up_proj': 'mlp_in',
    'mlp/down_proj': 'down_in',
}
# True-sequential order inside a block (GPTQ): each stage's inputs depend on the previous stages.
SEQUENTIAL_STAGES = (
    ('self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj'),
    ('self_attn/o_proj',),
    ('mlp/gate_proj', 'mlp/up_proj'),
    ('mlp/down_proj',),
)
LINEAR_NAMES = tuple(LINEAR_INPUTS)
ATTENTION_NAMES = LINEAR_NAMES[:4]
# A mixture's router and shared-expert gate: kept dense by the exports' quantized formats.
ROUTERS = ('mlp/gate', 'mlp/shared_expert_gate')
_MLP = ('gate_proj', 'up_proj', 'down_proj')

# Mixture-of-experts blocks (``cfg.num_experts > 0``) replace ``mlp/{gate,up,down}_proj`` by
#   mlp/gate                      the router [D, E] (dense unless a rule names it)
#   mlp/experts/{e}/{gate,up,down}_proj
#   mlp/shared_expert/{gate,up,down}_proj, mlp/shared_expert_gate [D, 1]   (Qwen2-MoE)
# Expert e's gate/up read 'expert{e}_in' (the MLP input, restricted to the tokens routed to e when
# statistics are collected) and its down_proj 'expert{e}_down_in'.


def _names(num_experts: int, shared: bool) -> tuple[str, ...]:
  if not num_experts:
    return LINEAR_NAMES
  names = ATTENTION_NAMES + ('mlp/gate',)
  names += tuple(f'mlp/experts/{e}/{m}' for e in range(num_experts) for m in _MLP)
  if shared:
    names += tuple(f'mlp/shared_expert/{m}' for m in _MLP) + ('mlp/shared_expert_gate',)
  return names


def linear_names(cfg: ModelConfig) -> tuple[str, ...]:
  """Every linear of a block of ``cfg``, in order (:data:`LINEAR_NAMES` for a dense MLP)."""
  return _names(cfg.num_experts, bool(cfg.shared_expert_size))


def block_linear_names(block: Params) -> tuple[str, ...]:
  """The linears of a block as its structure shows them (the same as :func:`linear_names`)."""
  mlp = block['mlp']
  return _names(len(mlp['experts']) if 'experts' in mlp else 0, 'shared_expert' in mlp)


def expert_of(key: str) -> int | None:
  """The expert whose routed tokens an input key stands for (``'expert3_in'`` -> 3), else None."""
  if key.startswith('expert'):
    return int(key[len('expert'):].split('_', 1)[0])
  return None


def input_key(lin: str) -> str:
  """The name of the input linear ``lin`` reads; linears that share an input share statistics."""
  if lin in LINEAR_INPUTS:
    return LINEAR_INPUTS[lin]
  parts = lin.split('/')
  if lin in ROUTERS + ('mlp/shared_expert/gate_proj', 'mlp/shared_expert/up_proj'):
    return 'mlp_in'
  if lin == 'mlp/shared_expert/down_proj':
    return 'shared_down_in'
  if len(parts) == 4 and parts[1] == 'experts':
    return f'expert{parts[2]}_{"down_in" if parts[3] == "down_proj" else "in"}'
  raise ValueError(f'{lin!r} is not a block linear')


def linear_inputs(cfg: ModelConfig) -> dict[str, str]:
  """``{linear: input key}`` of every linear of a block of ``cfg``."""
  return {lin: input_key(lin) for lin in linear_names(cfg)}


def sequential_stages(cfg: ModelConfig) -> tuple[tuple[str, ...], ...]:
  """True-sequential stages (GPTQ): each stage's inputs depend on the previous stages' outputs."""
  if not cfg.num_experts:
    return SEQUENTIAL_STAGES
  names = linear_names(cfg)
  downs = tuple(n for n in names if n.endswith('down_proj'))
  mlp_in = tuple(n for n in names if n.startswith('mlp/') and n not in downs)
  return SEQUENTIAL_STAGES[:2] + (mlp_in, downs)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
  """RMSNorm over the last axis in float32; ``plus_one`` multiplies by ``1 + scale`` (Gemma)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  s = scale.astype(jnp.float32)
  return (y * (1.0 + s if plus_one else s)).astype(x.dtype)


def norm(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The model's RMSNorm with params ``p = {'scale': ...}``."""
  return rms_norm(x, p['scale'], cfg.rms_norm_eps, cfg.norm_plus_one)


def final_norm(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The norm before the LM head: what the head's linear reads."""
  return norm(params['norm'], x, cfg)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def _activation(x: jax.Array, cfg: ModelConfig) -> jax.Array:
  if cfg.activation == 'gelu_tanh':
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.silu(x)


def _check_resolved(cfg: ModelConfig) -> None:
  if cfg.layer_types is not None:
    raise ValueError('this config has per-layer attention kinds: run block i with cfg.layer(i)')


def _dense(p: Params, x: jax.Array) -> jax.Array:
  y = kernels.linear(x, p['kernel'])
  if 'bias' in p:
    y = y + p['bias'].astype(y.dtype)
  return y


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos/sin ``[..., T, head_dim]`` (HF rotate-half convention) for integer ``positions``."""
  inv = jnp.asarray(cfg.inv_freq(), jnp.float32)
  ang = positions.astype(jnp.float32)[..., None] * inv  # [..., T, hd/2]
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: ``[B, T, heads, hd]``; cos/sin: ``[B or 1, T, rd]``: the first ``rd <= hd`` channels are
  rotated (partial rotary), the rest pass through."""
  rd = cos.shape[-1]
  half = rd // 2
  xf = x.astype(jnp.float32)
  xr, xp = xf[..., :rd], xf[..., rd:]
  rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
  out = jnp.concatenate([xr * cos[:, :, None, :] + rot * sin[:, :, None, :], xp], axis=-1)
  return out.astype(x.dtype)


def _attend(q, k, v, q_pos, k_pos, cfg: ModelConfig, k_valid=None):
  """Causal GQA attention. q ``[B,T,H,hd]``, k/v ``[B,S,KV,hd]``, positions ``[B or 1, T]``/``[.., S]``."""
  b, t, h, hd = q.shape
  kvh = k.shape[2]
  g = h // kvh
  qg = q.reshape(b, t, kvh, g, hd)
  scores = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / np.sqrt(cfg.query_pre_attn_scalar or hd))
  scores = _softcap(scores, cfg.attn_softcap)
  allowed = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
  if cfg.sliding_window:
    allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window
  if k_valid is not None:
    allowed &= k_valid[:, None, :]
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, h * hd)


def _attend_window_cache(q, k, v, cache, cache_index, positions, cfg: ModelConfig, lengths=None):
  """Attention through a ring-buffer cache of ``S <= sliding_window`` slots: slot ``j`` holds the
  latest position ``p == j (mod S)`` written so far. The new tokens attend to the cached ones and
  to each other (exactly the window's keys), then the last ``min(T, S)`` of them are written.

  ``lengths [B]`` (right-padded rows): only row ``b``'s first ``lengths[b]`` new tokens are real,
  and its last ``min(lengths[b], S)`` are written, so that its ring follows its own position
  (``cache_index + lengths[b]`` is where it continues); the padding is never cached."""
  b, t, s = k.shape[0], k.shape[1], cache['k'].shape[1]
  slots = jnp.arange(s)
  old = slots + s * jnp.floor_divide(cache_index - 1 - slots, s)  # < 0: never written
  k_pos = jnp.concatenate([old, cache_index + jnp.arange(t)])[None, :]
  valid = jnp.concatenate([old >= 0, jnp.ones((t,), bool)])[None, :]
  keys = jnp.concatenate([cache['k'].astype(q.dtype), k], axis=1)
  values = jnp.concatenate([cache['v'].astype(q.dtype), v], axis=1)
  o_in = _attend(q, keys, values, positions, k_pos, cfg, k_valid=valid)
  n = min(t, s)
  real = jnp.broadcast_to(jnp.asarray(t if lengths is None else lengths), (b,))
  col = real[:, None] - n + jnp.arange(n)  # [B, n]: columns of each row's last n real tokens
  where = jnp.where(col >= 0, (cache_index + col) % s, s)  # a column before the chunk: dropped
  col = jnp.maximum(col, 0)
  write = jax.vmap(lambda c, w, x, i: c.at[w].set(x[i].astype(c.dtype), mode='drop'))
  new = {'k': write(cache['k'], where, k, col), 'v': write(cache['v'], where, v, col)}
  return new, o_in


def attention_residual(block: Params, x: jax.Array, cfg: ModelConfig, *,
                       positions: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
                       cache_index: jax.Array | int = 0, lengths: jax.Array | None = None):
  """The attention half of a block with its residual: ``x + o_proj(attn(norm(x)))``.

  Returns ``(x_out, new_cache, attn_in, o_in)`` (``new_cache`` is None without a cache).
  ``lengths``: real new tokens per right-padded row (see :func:`block_apply`).
  """
  _check_resolved(cfg)
  b, t, _ = x.shape
  if positions is None:
    positions = (jnp.arange(t) + cache_index)[None, :]
  attn = block['self_attn']
  h = norm(block['input_layernorm'], x, cfg)
  q = _dense(attn['q_proj'], h).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = _dense(attn['k_proj'], h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = _dense(attn['v_proj'], h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = norm(attn['q_norm'], q, cfg)
    k = norm(attn['k_norm'], k, cfg)
  cos, sin = rope_tables(cfg, positions)
  q = apply_rope(q, cos, sin)
  k = apply_rope(k, cos, sin)
  new_cache = None
  if cache is not None and cfg.sliding_window and cache['k'].shape[1] <= cfg.sliding_window:
    new_cache, o_in = _attend_window_cache(q, k, v, cache, cache_index, positions, cfg, lengths)
  elif cache is not None:
    ck = jax.lax.dynamic_update_slice_in_dim(cache['k'], k.astype(cache['k'].dtype), cache_index, 1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache['v'], v.astype(cache['v'].dtype), cache_index, 1)
    new_cache = {'k': ck, 'v': cv}
    s = ck.shape[1]
    k_pos = jnp.arange(s)[None, :]
    o_in = _attend(q, ck.astype(q.dtype), cv.astype(q.dtype), positions, k_pos, cfg,
                   k_valid=k_pos < cache_index + t)
  else:
    o_in = _attend(q, k, v, positions, positions, cfg)
  out = _dense(attn['o_proj'], o_in)
  if cfg.post_norms:
    out = norm(block['post_attention_layernorm'], out, cfg)
  return x + out, new_cache, h, o_in


def _gated_mlp(p: Params, x: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """``(down_proj(act(gate_proj(x)) * up_proj(x)), down_proj's input)``."""
  d_in = _activation(_dense(p['gate_proj'], x), cfg) * _dense(p['up_proj'], x)
  return _dense(p['down_proj'], d_in), d_in


def routing(mlp: Params, m_in: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """The router's choice: ``(weights [B, T, E] float32, routed [B, T, E] bool)``; a token's weights
  are zero outside its top-k experts."""
  logits = _dense(mlp['gate'], m_in).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top, idx = jax.lax.top_k(probs, cfg.num_experts_per_tok)
  if cfg.norm_topk_prob:
    top = top / jnp.sum(top, axis=-1, keepdims=True)
  onehot = jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32)  # [B, T, k, E]
  return jnp.einsum('btk,btke->bte', top, onehot), jnp.sum(onehot, axis=-2) > 0


def _moe(mlp: Params, m_in: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """A mixture-of-experts MLP and the inputs of its linears. Every expert runs on every token and
  is weighted by the router (zero outside the top-k): exact, and simple to shard; the extra
  compute is ``E / k`` times an MLP's."""
  weights, routed = routing(mlp, m_in, cfg)
  out = jnp.zeros(m_in.shape, jnp.float32)
  inputs = {'routed': routed}
  for e, expert in enumerate(mlp['experts']):
    y, d_in = _gated_mlp(expert, m_in, cfg)
    out = out + weights[..., e:e + 1] * y.astype(jnp.float32)
    inputs[f'expert{e}_in'], inputs[f'expert{e}_down_in'] = m_in, d_in
  if 'shared_expert' in mlp:
    y, inputs['shared_down_in'] = _gated_mlp(mlp['shared_expert'], m_in, cfg)
    gate = jax.nn.sigmoid(_dense(mlp['shared_expert_gate'], m_in).astype(jnp.float32))
    out = out + gate * y.astype(jnp.float32)
  return out.astype(m_in.dtype), inputs


def mlp_residual(block: Params, x: jax.Array, cfg: ModelConfig):
  """The MLP half of a block with its residual. Returns ``(y, inputs)``: the inputs of the MLP's
  linears by key (``mlp_in``, ``down_in``; a mixture of experts adds its experts' and the
  ``routed [B, T, E]`` mask)."""
  mlp = block['mlp']
  pre = 'pre_feedforward_layernorm' if cfg.post_norms else 'post_attention_layernorm'
  m_in = norm(block[pre], x, cfg)
  if cfg.num_experts:
    out, inputs = _moe(mlp, m_in, cfg)
  else:
    out, d_in = _gated_mlp(mlp, m_in, cfg)
    inputs = {'down_in': d_in}
  if cfg.post_norms:
    out = norm(block['post_feedforward_layernorm'], out, cfg)
  return x + out, dict(inputs, mlp_in=m_in)


# The two residual halves of a block, by name (windows of local reconstruction are runs of these).
SUBMODULES = ('attn', 'mlp')


def submodule_linears(block: Params, name: str) -> tuple[str, ...]:
  """The linears of one residual half (``'attn'`` or ``'mlp'``) of a block."""
  prefix = {'attn': 'self_attn/', 'mlp': 'mlp/'}[name]
  return tuple(lin for lin in block_linear_names(block) if lin.startswith(prefix))


def submodule_apply(block: Params, x: jax.Array, cfg: ModelConfig, name: str) -> jax.Array:
  """One residual half of a block (``'attn'`` or ``'mlp'``), no cache."""
  if name == 'attn':
    return attention_residual(block, x, cfg)[0]
  if name == 'mlp':
    return mlp_residual(block, x, cfg)[0]
  raise ValueError(f'unknown submodule {name!r}; choose from {SUBMODULES}')


def block_apply(block: Params, x: jax.Array, cfg: ModelConfig, *, positions: jax.Array | None = None,
                cache: dict[str, jax.Array] | None = None, cache_index: jax.Array | int = 0,
                return_inputs: bool = False, lengths: jax.Array | None = None):
  """One decoder block.

  Args:
    block: the block's params (``params['layers'][i]``).
    x: ``[B, T, D]`` hidden states in the compute dtype.
    cfg: model config.
    positions: ``[B or 1, T]`` absolute positions; default ``cache_index + arange(T)``.
    cache: optional ``{'k': [B, S, KV, hd], 'v': ...}``; the new keys/values are written at
      ``cache_index`` and attention runs over the cache.
    cache_index: where the ``T`` new tokens start in the cache.
    return_inputs: also return the input of every linear, keyed by :func:`input_key` (and, for a
      mixture of experts, ``'routed'``: which tokens each expert received).
    lengths: optional ``[B]``: row ``b``'s first ``lengths[b]`` new tokens are real, the rest
      right padding, which a sliding-window layer's ring buffer does not keep (a full-length
      cache keeps it past the row's end, where its next tokens overwrite it).

  Returns:
    ``y [B, T, D]``; plus the updated cache if ``cache`` was given; plus the inputs dict if
    ``return_inputs``.
  """
  x, new_cache, h, o_in = attention_residual(block, x, cfg, positions=positions, cache=cache,
                                             cache_index=cache_index, lengths=lengths)
  y, mlp_inputs = mlp_residual(block, x, cfg)
  out = (y,)
  if cache is not None:
    out += (new_cache,)
  if return_inputs:
    out += (dict(mlp_inputs, attn_in=h, o_in=o_in),)
  return out[0] if len(out) == 1 else out


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig, dtype=jnp.float32) -> jax.Array:
  """Token embeddings ``[B, T, D]`` in ``dtype`` (times ``sqrt(D)`` rounded to ``dtype`` when the
  family scales them)."""
  x = jnp.take(params['embed_tokens']['embedding'], tokens, axis=0).astype(dtype)
  if cfg.embed_scale:
    x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype)
  return x


def head(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Final norm + LM head (+ soft-capping): float32 logits ``[B, T, V]``."""
  x = final_norm(params, x, cfg)
  if cfg.tie_word_embeddings or 'lm_head' not in params:
    w = params['embed_tokens']['embedding']
    logits = jnp.einsum('btd,vd->btv', x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  else:
    logits = kernels.linear(x, params['lm_head']['kernel'])
  return _softcap(logits.astype(jnp.float32), cfg.final_softcap)


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, *, dtype=jnp.float32,
            prefix: jax.Array | None = None) -> jax.Array:
  """Full causal forward pass: tokens ``[B, T]`` -> float32 logits ``[B, T, V]``.

  ``prefix``: optional soft-prompt embeddings ``[B or 1, L, D]`` placed before the token
  embeddings (positions ``0..L-1``; the tokens then sit at ``L..L+T-1``). The logits cover only
  the ``T`` token positions; a length-0 prefix is the same as none.
  """
  return head(params, hidden(params, tokens, cfg, dtype=dtype, prefix=prefix), cfg)


def hidden(params: Params, tokens: jax.Array, cfg: ModelConfig, *, dtype=jnp.float32,
           prefix: jax.Array | None = None, num_blocks: int | None = None) -> jax.Array:
  """The last block's output ``[B, T, D]`` at the token positions: :func:`forward` before its
  head (``prefix`` as there); with ``num_blocks``, the residual stream after that many blocks."""
  x = embed(params, tokens, cfg, dtype)
  n_prefix = 0
  if prefix is not None:
    n_prefix = prefix.shape[1]
    prefix = jnp.broadcast_to(prefix.astype(dtype), (x.shape[0],) + prefix.shape[1:])
    x = jnp.concatenate([prefix, x], axis=1)
  for i, block in enumerate(params['layers'][:num_blocks]):
    x = block_apply(block, x, cfg.layer(i))
  return x[:, n_prefix:]


def forward_with_cache(params: Params, tokens: jax.Array, cfg: ModelConfig, cache: list[dict],
                       cache_index, *, dtype=jnp.float32):
  """Forward over ``tokens [B, T]`` starting at ``cache_index``; returns (logits, new cache)."""
  x, new = hidden_with_cache(params, tokens, cfg, cache, cache_index, dtype=dtype)
  return head(params, x, cfg), new


def hidden_with_cache(params: Params, tokens: jax.Array, cfg: ModelConfig, cache: list[dict],
                      cache_index, *, dtype=jnp.float32, lengths: jax.Array | None = None):
  """:func:`forward_with_cache` before its head: (last block's output ``[B, T, D]``, new cache).
  ``lengths [B]``: right-padded rows' real tokens (:func:`block_apply`)."""
  x = embed(params, tokens, cfg, dtype)
  new = []
  for i, (block, c) in enumerate(zip(params['layers'], cache)):
    x, c = block_apply(block, x, cfg.layer(i), cache=c, cache_index=cache_index, lengths=lengths)
    new.append(c)
  return x, new


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, *,
               window: bool = False) -> list[dict]:
  """Zero KV caches, one per layer, of ``max_len`` slots; with ``window``, a sliding-window
  layer's cache has only ``sliding_window`` slots, used as a ring buffer (memory bounded by the
  window however long the generation)."""
  out = []
  for i in range(cfg.num_layers):
    sw = cfg.layer(i).sliding_window
    n = min(max_len, sw) if window and sw else max_len
    shape = (batch, n, cfg.num_kv_heads, cfg.head_dim)
    out.append({'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)})
  return out


def generate(params: Params, prompt: jax.Array, cfg: ModelConfig, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, key: jax.Array | None = None,
             dtype=jnp.float32) -> jax.Array:
  """Greedy (``temperature == 0``) or sampled generation with a KV cache.

  Args:
    prompt: ``[B, T0]`` int tokens (all rows the same length).
    max_new_tokens: number of tokens to generate.
    temperature, top_k: sampling controls (top_k = 0: full distribution).
    key: PRNG key for sampling.

  Returns:
    ``[B, max_new_tokens]`` generated tokens.
  """
  b, t0 = prompt.shape
  max_len = t0 + max_new_tokens
  if key is None:
    key = jax.random.key(0)
  cache = init_cache(cfg, b, max_len, dtype, window=True)
  logits, cache = forward_with_cache(params, prompt, cfg, cache, 0, dtype=dtype)

  def pick(logits_last, k):
    if temperature == 0.0:
      return jnp.argmax(logits_last, axis=-1).astype(jnp.int32)
    z = logits_last / temperature
    if top_k:
      kth = jax.lax.top_k(z, top_k)[0][..., -1:]
      z = jnp.where(z < kth, -jnp.inf, z)
    return jax.random.categorical(k, z, axis=-1).astype(jnp.int32)

  keys = jax.random.split(key, max_new_tokens)
  first = pick(logits[:, -1], keys[0])

  def step(carry, inputs):
    tok, cache = carry
    i, k = inputs
    logits, cache = forward_with_cache(params, tok[:, None], cfg, cache, t0 + i, dtype=dtype)
    nxt = pick(logits[:, -1], k)
    return (nxt, cache), nxt

  if max_new_tokens == 1:
    return first[:, None]
  (_, _), rest = jax.lax.scan(step, (first, cache), (jnp.arange(max_new_tokens - 1), keys[1:]))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """``[in, out]`` of every block linear (:func:`linear_names`) of a model of ``cfg``."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  out = {'self_attn/q_proj': (d, qd), 'self_attn/k_proj': (d, kvd), 'self_attn/v_proj': (d, kvd),
         'self_attn/o_proj': (qd, d)}
  if not cfg.num_experts:
    return dict(out, **{'mlp/gate_proj': (d, f), 'mlp/up_proj': (d, f), 'mlp/down_proj': (f, d)})
  for lin in linear_names(cfg)[4:]:
    width = cfg.shared_expert_size if '/shared_expert/' in lin else cfg.expert_intermediate_size
    if lin == 'mlp/gate':
      out[lin] = (d, cfg.num_experts)
    elif lin == 'mlp/shared_expert_gate':
      out[lin] = (d, 1)
    elif lin.endswith('down_proj'):
      out[lin] = (width, d)
    else:
      out[lin] = (d, width)
  return out


def set_node(root: Params, path: str, value: Any) -> None:
  """Puts ``value`` at ``path`` (``'mlp/experts/3/up_proj'``) inside ``root`` in place, creating
  dicts (and lists, for numeric parts such as an expert's index) on the way."""
  parts = path.split('/')
  node = root
  for part, nxt in zip(parts[:-1], parts[1:]):
    key = int(part) if isinstance(node, list) else part
    if isinstance(node, list):
      node.extend({} for _ in range(key + 1 - len(node)))
    elif key not in node:
      node[key] = [] if nxt.isdigit() else {}
    node = node[key]
  if isinstance(node, list):
    node.extend({} for _ in range(int(parts[-1]) + 1 - len(node)))
    node[int(parts[-1])] = value
  else:
    node[parts[-1]] = value


def get_node(root: Params, path: str) -> Any:
  """The value at ``path`` inside ``root`` (numeric parts index lists)."""
  node = root
  for part in path.split('/'):
    node = node[int(part)] if isinstance(node, list) else node[part]
  return node


def _has_bias(cfg: ModelConfig, lin: str) -> bool:
  if lin in ('self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj'):
    return cfg.qkv_bias
  if lin == 'self_attn/o_proj':
    return cfg.o_bias
  return cfg.mlp_bias and lin in LINEAR_NAMES


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
  """Random-initialised params (normal(0, scale) kernels, unit norms): the tiny test model."""
  d = cfg.hidden_size
  shapes = linear_shapes(cfg)
  per_layer = max(16, 2 * len(shapes))  # kernels and biases
  keys = iter(jax.random.split(key, per_layer * cfg.num_layers + 4))
  nrm = lambda shape: (scale * jax.random.normal(next(keys), shape)).astype(dtype)

  one = 0.0 if cfg.norm_plus_one else 1.0  # a unit norm
  unit = lambda n: {'scale': jnp.full((n,), one, dtype)}
  layers = []
  for _ in range(cfg.num_layers):
    block: Params = {'input_layernorm': unit(d), 'self_attn': {}, 'post_attention_layernorm': unit(d),
                     'mlp': {}}
    for lin, (i, o) in shapes.items():
      node = {'kernel': nrm((i, o))}
      if _has_bias(cfg, lin):
        node['bias'] = nrm((o,))
      set_node(block, lin, node)
    if cfg.qk_norm:
      block['self_attn'].update(q_norm=unit(cfg.head_dim), k_norm=unit(cfg.head_dim))
    if cfg.post_norms:
      block.update(pre_feedforward_layernorm=unit(d), post_feedforward_layernorm=unit(d))
    layers.append(block)
  params = {'embed_tokens': {'embedding': nrm((cfg.vocab_size, d))}, 'layers': layers,
            'norm': unit(d)}
  if not cfg.tie_word_embeddings:
    params['lm_head'] = {'kernel': nrm((d, cfg.vocab_size))}
  return params


def cast_params(params: Params, dtype) -> Params:
  """Casts float array leaves (dense weights, norms, embeddings) to ``dtype``; compressed leaves'
  integer codes stay as they are, their float fields (scales, adapters) are cast too."""
  def cast(x):
    if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(x, dtype)
    return x
  return jax.tree.map(cast, params)


def norm_names(cfg: ModelConfig) -> tuple[str, ...]:
  """Paths (inside a block) of the block's norm scales, e.g. ``'self_attn/q_norm'``."""
  names = ('input_layernorm', 'post_attention_layernorm')
  if cfg.post_norms:
    names += ('pre_feedforward_layernorm', 'post_feedforward_layernorm')
  if cfg.qk_norm:
    names += ('self_attn/q_norm', 'self_attn/k_norm')
  return names


def input_norm_names(cfg: ModelConfig) -> dict[str, str]:
  """The norm that produces each normed linear input (``'attn_in'``, ``'mlp_in'``)."""
  return {'attn_in': 'input_layernorm',
          'mlp_in': 'pre_feedforward_layernorm' if cfg.post_norms else 'post_attention_layernorm'}


def scale_norm(p: Params, factor: jax.Array, cfg: ModelConfig) -> Params:
  """Norm params whose output is ``factor`` (per feature) times this norm's (for folding a scale
  into the norm, e.g. AWQ's ``1/s``), in the stored convention (``w`` of ``1 + w`` for Gemma)."""
  s = p['scale']
  f = factor.astype(jnp.float32)
  if cfg.norm_plus_one:
    return {'scale': ((1.0 + s.astype(jnp.float32)) * f - 1.0).astype(s.dtype)}
  return {'scale': (s.astype(jnp.float32) * f).astype(s.dtype)}
