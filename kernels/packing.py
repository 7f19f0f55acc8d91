"""Packing of b-bit integers into int32 words: the only file that knows the bit order.

The layout is the one GPTQ checkpoints (AutoGPTQ / GPTQModel / Marlin converters) use, so that a
packed weight exports without repacking:

* Values are packed along one axis (``axis=0`` for ``qweight`` [in, out] -> [in * b / 32, out];
  the last axis for ``qzeros`` [groups, out] -> [groups, out * b / 32]).
* Every run of 32 consecutive values forms a little-endian bit stream of ``b`` words: value ``k``
  of the run occupies bits ``b*k .. b*k + b - 1`` of the stream, bit ``o`` of the stream is bit
  ``o % 32`` of word ``o // 32``. For b in {2, 4, 8} no value straddles a word (word ``i // (32/b)``,
  shift ``b * (i % (32/b))``, exactly GPTQ's); for b = 3 values 10 and 21 of each run straddle two
  words, which is GPTQ's 3-bit layout (32 values in 3 words).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f'bits={bits} is not supported; choose one of {SUPPORTED_BITS}.')


def _plan(bits: int):
  """For each of the 32 values of a run: (word, shift, spill) where spill bits go to word + 1."""
  plan = []
  for k in range(32):
    off = bits * k
    word, shift = divmod(off, 32)
    spill = max(0, shift + bits - 32)
    plan.append((word, shift, spill))
  return plan


def pack(q: jax.Array, bits: int, axis: int = 0) -> jax.Array:
  """Packs integers in [0, 2^bits) along ``axis`` into int32 words.

  Args:
    q: integer array; ``q.shape[axis]`` must be a multiple of 32.
    bits: 2, 3, 4 or 8.
    axis: the axis to pack along.

  Returns:
    int32 array with ``q.shape[axis] * bits // 32`` entries along ``axis``.
  """
  check_bits(bits)
  if not isinstance(q, jax.core.Tracer):
    lo, hi = (int(v) for v in (jnp.min(q), jnp.max(q))) if np.size(q) else (0, 0)
    if lo < 0 or hi >= 1 << bits:
      raise ValueError(f'cannot pack values in [{lo}, {hi}] into {bits} bits: codes must lie in '
                       f'[0, {(1 << bits) - 1}].')
  q = jnp.moveaxis(jnp.asarray(q), axis, 0)
  n = q.shape[0]
  if n % 32:
    raise ValueError(f'cannot pack {n} values along axis {axis}: the length must be a multiple of 32.')
  # Under jit the range cannot be checked: out-of-range codes are cut to their low bits so they
  # never spill into their neighbours.
  runs = q.astype(jnp.uint32).reshape((n // 32, 32) + q.shape[1:]) & jnp.uint32((1 << bits) - 1)
  words = [jnp.zeros((n // 32,) + q.shape[1:], jnp.uint32) for _ in range(bits)]
  for k, (word, shift, spill) in enumerate(_plan(bits)):
    v = runs[:, k]
    words[word] = words[word] | (v << shift)
    if spill:
      words[word + 1] = words[word + 1] | (v >> (bits - spill))
  out = jnp.stack(words, axis=1).reshape((n * bits // 32,) + q.shape[1:])
  out = jax.lax.bitcast_convert_type(out, jnp.int32)
  return jnp.moveaxis(out, 0, axis)


def unpack(packed: jax.Array, bits: int, axis: int = 0) -> jax.Array:
  """Inverse of :func:`pack`: returns int32 values in [0, 2^bits) along ``axis``."""
  check_bits(bits)
  p = jnp.moveaxis(jnp.asarray(packed), axis, 0)
  m = p.shape[0]
  if m % bits:
    raise ValueError(f'a packed {bits}-bit axis must hold a multiple of {bits} words, got {m}.')
  p = jax.lax.bitcast_convert_type(p, jnp.uint32).reshape((m // bits, bits) + p.shape[1:])
  mask = jnp.uint32((1 << bits) - 1)
  vals = []
  for word, shift, spill in _plan(bits):
    v = p[:, word] >> shift
    if spill:
      v = v | (p[:, word + 1] << (bits - spill))
    vals.append(v & mask)
  out = jnp.stack(vals, axis=1).reshape((m // bits * 32,) + p.shape[2:]).astype(jnp.int32)
  return jnp.moveaxis(out, 0, axis)


def pack_np(q: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
  """NumPy convenience wrapper of :func:`pack` (used by exporters)."""
  return np.asarray(pack(jnp.asarray(q), bits, axis))
