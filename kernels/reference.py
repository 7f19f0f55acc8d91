"""The jnp reference implementation of ``linear``: the ``'xla'`` implementation and the oracle.

Handles every weight form of :mod:`kernels.formats`: a dense array, a quantized weight, a 2:4
weight (dense or quantized values), an unstructured mask, a low-rank adapter, and a load-time
input permutation (:class:`kernels.formats.PermutedInput`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import formats


def linear(x: jax.Array, w) -> jax.Array:
  """``x @ W`` (+ ``(x @ a) @ b`` for an adapter). x: ``[..., in]`` -> ``[..., out]`` in x's dtype."""
  dtype = x.dtype
  if isinstance(w, formats.PermutedInput):
    return linear(jnp.take(x, w.perm, axis=-1), w.inner)
  if isinstance(w, formats.CompressedLinear):
    y = x @ formats.to_dense(w, dtype)
    if w.adapter is not None:
      a = formats.to_dense(w.adapter.a, dtype)
      b = formats.to_dense(w.adapter.b, dtype)
      y = y + (x @ a) @ b
    return y
  return x @ formats.to_dense(w, dtype)
