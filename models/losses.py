"""The losses and per-token measures that evaluation and training share (float32 throughout).

Next-token quantities take ``logits [B, T, V]`` and ``tokens [B, T]`` and score the ``T - 1``
predictions of ``tokens[:, 1:]``; distribution comparisons take log-probabilities of the same shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def log_probs(logits: jax.Array) -> jax.Array:
  """Float32 log-softmax over the vocabulary."""
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def nll_of(logp: jax.Array, tokens: jax.Array) -> jax.Array:
  """Per-token NLL ``[B, T - 1]`` of ``tokens[:, 1:]`` given the predictions' log-probabilities
  ``logp [B, T - 1, V]`` (positions ``0..T-2``)."""
  return -jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]


def next_token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood ``[B, T - 1]`` of ``tokens[:, 1:]`` under ``logits[:, :-1]``."""
  return nll_of(log_probs(logits[:, :-1]), tokens)


def lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy."""
  return jnp.mean(next_token_nll(logits, tokens))


def kl_divergence(ref_logp: jax.Array, logp: jax.Array) -> jax.Array:
  """``KL(P_ref || P)`` per position from log-probabilities (last axis the vocabulary)."""
  return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)


def kl_loss(ref_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Mean over positions of ``KL(softmax(ref) || softmax(logits))``."""
  return jnp.mean(kl_divergence(log_probs(ref_logits), log_probs(logits)))


def top1_agreement(ref_logp: jax.Array, logp: jax.Array) -> jax.Array:
  """Per position, 1.0 where both distributions put their maximum on the same token."""
  return (jnp.argmax(ref_logp, -1) == jnp.argmax(logp, -1)).astype(jnp.float32)


def mse(y: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over every element (float32)."""
  d = y.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(d * d)


def cosine_loss(y: jax.Array, target: jax.Array) -> jax.Array:
  """Mean over tokens of ``1 - cos(y, target)`` along the feature axis."""
  y = y.astype(jnp.float32)
  t = target.astype(jnp.float32)
  num = jnp.sum(y * t, -1)
  den = jnp.linalg.norm(y, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-8
  return jnp.mean(1.0 - num / den)


# Output-matching losses of local reconstruction, by name.
OUTPUT_LOSSES = {'mse': mse, 'cosine': cosine_loss}
