"""2:4 semi-structured sparse matmul in Pallas (bf16/f16 values, or low-bit values: 2:4 + int4).

``y = x @ W (+ (x @ a) @ b)`` for a :class:`kernels.formats.Sparse24Weight`: in every group of 4
input rows two values per output column are kept (Mishra et al., 2021, "Accelerating Sparse Deep
Neural Networks", https://arxiv.org/abs/2104.08378); ``values [in/2, out]`` holds them (dense, or a
:class:`QuantizedWeight` over the compressed rows: the 2:4 + int4 format of Sparse-Marlin,
Frantar et al., 2024, https://arxiv.org/abs/2408.11743) and ``indices [in/2, out]`` (uint8) their
positions 0..3 inside the group. The kernel reads only the compressed values and the indices.

Sparse tensor cores (``mma.sp``) are not reachable from Pallas/Triton, so the kernel trades compute
for bytes:

* Decode (M <= 4, elementwise GEMV): per activation row, the two kept values of each group multiply
  ``x`` gathered at ``4 g + index`` (a gather from the L1-resident activation block) and are
  reduced over K. Half the multiply-adds of the dense product and no dense tile.
* Otherwise: each ``[sub, block_n]`` dense tile is rebuilt in registers by comparing the two indices
  of each group with 0..3 and selecting the value (zeros elsewhere), then one MMA.
* Quantized values: the even and odd compressed rows (the first/second kept value of a group) are
  unpacked separately with shift tables (:mod:`kernels.pallas_common`), ``q - zero`` stays an exact
  small integer through the MMA and the group's scale multiplies the partial product; a K step never
  crosses a quantization group.

Memory traffic per weight element at M = 1 (what bounds the speedup over bf16, 2 bytes/element):
bf16 values 0.5 x 2 + uint8 indices 0.5 x 1 = 1.5 bytes (1.33x); int4 values 0.25 + indices 0.5 =
0.75 bytes (+ scales), i.e. at most ~2.6x. The uint8 index storage fixed by ``formats.py`` is the
largest term for 2:4 + int4: packed 2-bit indices (0.125 bytes/element) would allow ~5x. They need
no change to the stored format (exports, training and the ct/2:4 converters read the uint8
indices): a serving layout in :mod:`kernels.layouts`, as for act-order, would pack the two indices
of each group of 4 into one nibble, 8 groups (32 input rows) per int32 word along the input axis,
and this kernel would unpack a ``[sub / 32, bn]`` word tile with the shift tables it uses for
4-bit codes (``sub`` >= 32), taking ``idx_e = nibble & 3`` and ``idx_o = nibble >> 2``.

What could not be measured: no GPU was available when this was written; the kernel is verified in
interpret mode on the CPU only and its tiles (:class:`BlockSizes`) are not swept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels import formats
from kernels import pallas_common as pc
from kernels.pallas_common import BlockSizes

__all__ = ['BlockSizes', 'DISPATCH_MAX_M', 'check_supported', 'linear', 'sparse24_matmul']

# Above this many activation rows the default dispatch uses the jnp reference (see lowbit_pallas).
DISPATCH_MAX_M = 1024

_NAME = 'pallas_sparse24'
_VALUE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _check_weight(s: formats.Sparse24Weight) -> None:
  k, n = s.shape
  if s.indices.shape != (k // 2, n):
    raise ValueError(f'indices {s.indices.shape} do not match values for a [{k}, {n}] weight.')
  if k % 4:
    raise NotImplementedError(f'pallas_sparse24 needs in % 4 == 0, got in={k}.')
  if isinstance(s.values, formats.QuantizedWeight):
    if s.values.g_idx is not None:
      raise NotImplementedError('pallas_sparse24: act-order (g_idx) values are not supported.')
  elif s.values.dtype not in _VALUE_DTYPES:
    raise NotImplementedError(f'pallas_sparse24: values of dtype {s.values.dtype}.')


def _sub_tile(s: formats.Sparse24Weight, block: BlockSizes) -> int:
  """Dense input rows per dot: a multiple of 4, whole packed words, inside one value group."""
  vals = s.values
  if not isinstance(vals, formats.QuantizedWeight):
    return pc.sub_tile(s.shape[0], block.block_k, pc.MIN_DOT)
  unit = max(pc.MIN_DOT, 2 * pc.min_unpack_rows(vals.bits))
  group_rows = None if vals.group_size == -1 else 2 * vals.group_size
  return pc.sub_tile(
      s.shape[0], block.block_k, unit, group_rows,
      f'2:4 values quantized to {vals.bits} bits with group_size={vals.group_size}: a group '
      f'must hold a multiple of {unit // 2} compressed rows for this kernel.')


def check_supported(x, w, block: BlockSizes | None = None) -> BlockSizes:
  """Raises ``NotImplementedError`` if the kernel cannot run ``linear(x, w)``; works on shapes only.

  Supported: a :class:`Sparse24Weight` (or a :class:`CompressedLinear` holding one, without a mask,
  with an optional float :class:`LowRank` adapter) whose values are bf16/f16/f32 or a
  contiguous-group :class:`QuantizedWeight` (2/3/4/8 bits, no ``g_idx``, groups of a multiple of 8
  compressed rows, 16 for 2 bits, 32 for 3 bits); bf16/f16 activations; ``in`` a multiple of 4; any
  M and N.

  Arguments and result: see :func:`kernels.pallas_common.check_supported`.
  """
  return pc.check_supported(x, w, block, leaf_type=formats.Sparse24Weight, name=_NAME,
                            weight_desc=lambda k: f'a 2:4 weight with {k} input rows',
                            sub_tile_fn=_sub_tile, check_weight=_check_weight)


def _kernel(*refs, m: int, n: int, k: int, bits: int | None, glen: int, num_groups: int,
            packed_rows: int, bk: int, sub: int, steps: int, splits: int, rank: int, gemv: bool,
            bm: int, bn: int, dtype):
  quant = bits is not None
  x_ref, v_ref, *rest = refs
  s_ref, z_ref = (rest.pop(0), rest.pop(0)) if quant else (None, None)
  i_ref = rest.pop(0)
  tile = pc.make_tile(m, n, bm, bn)
  split_id = pl.program_id(2)
  ng = sub // 4  # groups of 4 input rows per sub-tile
  n_quads = k // 4

  def step(t, acc):
    base = (split_id * steps + t) * bk
    for u in range(bk // sub):
      k0 = base + u * sub
      g0 = pc.div(k0, 4)
      idx_e = pc.load_plane(i_ref, g0, ng, 0, n_quads, tile.col_ok).astype(jnp.int32)  # [ng, bn]
      idx_o = pc.load_plane(i_ref, g0, ng, 1, n_quads, tile.col_ok).astype(jnp.int32)
      scale = None
      if quant:
        c0 = pc.div(k0, 2)  # first compressed row
        scale, z = pc.group_scale_zero(s_ref, z_ref, c0, glen, num_groups, tile.col_ok)  # [1, bn]
        v_e = pc.unpack_tile(v_ref, c0, sub // 2, bits, packed_rows, tile.col_ok, parity=0) - z
        v_o = pc.unpack_tile(v_ref, c0, sub // 2, bits, packed_rows, tile.col_ok, parity=1) - z
      else:
        v_e = pc.load_plane(v_ref, g0, ng, 0, n_quads, tile.col_ok)
        v_o = pc.load_plane(v_ref, g0, ng, 1, n_quads, tile.col_ok)
      if gemv:
        q_ok = ((g0 + pc.iota(ng)) < n_quads)[:, None] & tile.col_ok[None, :]
        col_e = k0 + 4 * pc.iota(ng, (ng, bn), 0) + idx_e
        col_o = k0 + 4 * pc.iota(ng, (ng, bn), 0) + idx_o
        fe, fo = v_e.astype(jnp.float32), v_o.astype(jnp.float32)
        for i in range(bm):
          ok = q_ok & (tile.row0 + i < m)
          row = jnp.full((ng, bn), i, jnp.int32)
          x_e = plt.load(x_ref.at[row, col_e], mask=ok, other=0).astype(jnp.float32)
          x_o = plt.load(x_ref.at[row, col_o], mask=ok, other=0).astype(jnp.float32)
          part = jnp.sum(x_e * fe + x_o * fo, axis=0)[None, :]  # [1, bn]
          if scale is not None:
            part = part * scale
          acc = acc + jnp.where(pc.iota(bm, (bm, 1), 0) == i, part, 0.0)
      else:
        pos = pc.iota(4, (1, 4, 1), 1)
        dense = jnp.where(idx_e[:, None, :] == pos, v_e[:, None, :],
                          jnp.where(idx_o[:, None, :] == pos, v_o[:, None, :], 0))
        dense = dense.reshape(sub, bn)  # row 4 g + p
        acc = pc.accumulate(acc, x_ref, tile, k0, sub, k, dense, gemv=False, dtype=dtype,
                            scale=scale)
    return acc

  pc.reduce_and_store(step, tile, rest, steps=steps, splits=splits, rank=rank, gemv=gemv,
                      dtype=dtype)


@functools.partial(jax.jit, static_argnames=('block', 'interpret'))
def sparse24_matmul(x: jax.Array, w: formats.Sparse24Weight,
                    adapter: formats.LowRank | None = None, *, block: BlockSizes | None = None,
                    interpret: bool = False) -> jax.Array:
  """Returns ``x @ W (+ (x @ adapter.a) @ adapter.b)`` ``[..., out]`` in ``x.dtype``, W 2:4 sparse.

  Args:
    x: ``[..., in]`` bf16 or f16 activations.
    w: the 2:4 weight ``[in, out]`` (float or quantized values, uint8 indices).
    adapter, block, interpret: see "Entry points" in :mod:`kernels.pallas_common`.
  """
  p = pc.plan(x, w, adapter, block, check_supported, _sub_tile)
  k, n, bn = p.k, p.n, p.bn
  vals = w.values
  if isinstance(vals, formats.QuantizedWeight):
    operands, specs, params = pc.quantized_operands(vals, bn)
    name = f'sparse24_w{vals.bits}_matmul'
  else:
    operands = [vals.reshape(k // 4, 2, n)]
    specs = [pc.column_spec(k // 4, bn, 2)]
    params = dict(bits=None, glen=k // 2, num_groups=1, packed_rows=k // 4)
    name = 'sparse24_matmul'
  operands.append(w.indices.reshape(k // 4, 2, n))  # free view: the kept positions of each group
  specs.append(pc.column_spec(k // 4, bn, 2))
  return pc.launch(_kernel, p, operands, specs, adapter, name=name, interpret=interpret, **params)


def linear(x: jax.Array, w, *, block: BlockSizes | None = None,
           interpret: bool = False) -> jax.Array:
  """``kernels.linear`` for a :class:`Sparse24Weight` leaf or a :class:`CompressedLinear` holding
  one (float adapters fused; a quantized adapter runs through the reference, outside the kernel)."""
  s, adapter = pc.split_leaf(w, formats.Sparse24Weight, _NAME)
  return pc.linear_with_adapter(sparse24_matmul, x, s, adapter, block=block, interpret=interpret)
