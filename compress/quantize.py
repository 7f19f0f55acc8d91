"""Uniform group-wise weight quantization: the grid shared by RTN, GPTQ, AWQ and SparseGPT.

Follows the quantizer of the GPTQ reference implementation (``quant.py``): the asymmetric range
always includes zero (``xmin = min(w.min(), 0)``, ``xmax = max(w.max(), 0)``), an all-zero group gets
the range [-1, 1], ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``; the symmetric
grid uses ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax`` and fixes ``zero = (maxq + 1) / 2``.
``q = clamp(round(w / scale) + zero, 0, maxq)``, ``w_hat = (q - zero) * scale``.

Weights are in Flax layout ``[in, out]``; groups run along the input axis. Row ``i`` is in group
``i // group_size``; when ``group_size`` does not divide ``in`` the last group is shorter and its
grid is computed from its own rows only (GPTQ's reference slices ``W[:, i:i + groupsize]``, which
is naturally shorter at the end).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.formats import QuantizedWeight, QuantSpec


def compute_qparams(w: jax.Array, spec: QuantSpec, axis: int = 0) -> tuple[jax.Array, jax.Array]:
  """Scale and (float, integer-valued) zero point of one group of rows ``w`` reduced over ``axis``."""
  maxq = 2 ** spec.bits - 1
  w = w.astype(jnp.float32)
  xmin = jnp.minimum(jnp.min(w, axis=axis), 0.0)
  xmax = jnp.maximum(jnp.max(w, axis=axis), 0.0)
  if spec.symmetric:
    xmax = jnp.maximum(jnp.abs(xmin), xmax)
    xmin = jnp.where(xmin < 0, -xmax, xmin)
  both_zero = (xmin == 0) & (xmax == 0)
  xmin = jnp.where(both_zero, -1.0, xmin)
  xmax = jnp.where(both_zero, 1.0, xmax)
  scale = (xmax - xmin) / maxq
  if spec.symmetric:
    zero = jnp.full_like(scale, (maxq + 1) / 2)
  else:
    zero = jnp.round(-xmin / scale)
  return scale, zero


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """Integer codes ``clamp(round(w / scale) + zero, 0, 2^bits - 1)`` (float dtype, integer values)."""
  return jnp.clip(jnp.round(w / scale) + zero, 0, 2 ** bits - 1)


def fake_quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """``(q - zero) * scale``: the value ``w`` takes on the grid."""
  return (quantize_codes(w, scale, zero, bits) - zero) * scale


def group_qparams(w: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """Per-group scales and zeros ``[groups, out]`` of ``w [in, out]`` with contiguous groups.

  The full groups are reduced in one reshape; a shorter last group (``group_size`` not dividing
  ``in``) gets its grid from its own rows.
  """
  n_in, n_out = w.shape
  glen = spec.group_len(n_in)
  full = n_in // glen
  w = w.astype(jnp.float32)
  parts = []
  if full:
    parts.append(compute_qparams(w[:full * glen].reshape(full, glen, n_out), spec, axis=1))
  if full * glen < n_in:
    parts.append(tuple(p[None] for p in compute_qparams(w[full * glen:], spec, axis=0)))
  if len(parts) == 1:
    return parts[0]
  return tuple(jnp.concatenate(p) for p in zip(*parts))


def pack_weight(w: jax.Array, scales: jax.Array, zeros: jax.Array, spec: QuantSpec,
                g_idx: jax.Array | None = None) -> QuantizedWeight:
  """Quantizes ``w [in, out]`` on given per-group ``scales``/``zeros`` ``[groups, out]`` and packs it.

  ``g_idx`` (act-order) maps each input row to its group; default contiguous groups.
  """
  n_in = w.shape[0]
  if g_idx is None:
    g = jnp.arange(n_in) // spec.group_len(n_in)
  else:
    g = jnp.asarray(g_idx)
  q = quantize_codes(w.astype(jnp.float32), scales[g], zeros[g], spec.bits)
  return QuantizedWeight.from_ints(q.astype(jnp.int32), scales, zeros, spec, g_idx=g_idx)


def rtn(w: jax.Array, spec: QuantSpec) -> QuantizedWeight:
  """Round-to-nearest with min/max per group. ``w [in, out]`` -> :class:`QuantizedWeight`."""
  scales, zeros = group_qparams(w, spec)
  return pack_weight(w, scales, zeros, spec)


def rtn_dense(w: jax.Array, spec: QuantSpec) -> jax.Array:
  """``dequantize(rtn(w, spec))`` without packing: the RTN-quantized weight as a float array."""
  n_in, n_out = w.shape
  scales, zeros = group_qparams(w, spec)
  g = jnp.arange(n_in) // spec.group_len(n_in)
  return fake_quantize(w.astype(jnp.float32), scales[g], zeros[g], spec.bits)
