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
largest term for 2:4 + int4: packed 2-bit indices (0.125 bytes/element) would allow ~5x.

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
from kernels import reference
from kernels.pallas_common import BlockSizes

__all__ = ['BlockSizes', 'DISPATCH_MAX_M', 'check_supported', 'linear', 'sparse24_matmul']

# Above this many activation rows the default dispatch uses the jnp reference (see lowbit_pallas).
DISPATCH_MAX_M = 1024

_ACT_DTYPES = (jnp.bfloat16, jnp.float16)
_VALUE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _split(w) -> tuple[formats.Sparse24Weight, formats.LowRank | None]:
  if isinstance(w, formats.CompressedLinear):
    if w.mask is not None:
      raise NotImplementedError('pallas_sparse24: a CompressedLinear with an unstructured mask is '
                                'left to the reference implementation.')
    if not isinstance(w.weight, formats.Sparse24Weight):
      raise NotImplementedError(f'pallas_sparse24: weight is a {type(w.weight).__name__}, not a '
                                'Sparse24Weight.')
    return w.weight, w.adapter
  if isinstance(w, formats.Sparse24Weight):
    return w, None
  raise NotImplementedError(
      f'pallas_sparse24 handles Sparse24Weight leaves, got {type(w).__name__}.')


def _sub_tile(s: formats.Sparse24Weight, block: BlockSizes) -> int:
  """Dense input rows per dot: a multiple of 4, whole packed words, inside one value group."""
  k = s.shape[0]
  vals = s.values
  unit = pc.MIN_DOT
  if isinstance(vals, formats.QuantizedWeight):
    unit = max(unit, 2 * pc.min_unpack_rows(vals.bits))
  cap = max(unit, min(block.block_k, pc.next_pow2(k)))
  if isinstance(vals, formats.QuantizedWeight) and vals.group_size != -1:
    sub = min(cap, 2 * pc.largest_pow2_divisor(vals.group_size))
    if sub < unit:
      raise NotImplementedError(
          f'2:4 values quantized to {vals.bits} bits with group_size={vals.group_size}: a group '
          f'must hold a multiple of {unit // 2} compressed rows for this kernel.')
    return sub
  return cap


def check_supported(x, w, block: BlockSizes | None = None) -> BlockSizes:
  """Raises ``NotImplementedError`` if the kernel cannot run ``linear(x, w)``; works on shapes only.

  Supported: a :class:`Sparse24Weight` (or a :class:`CompressedLinear` holding one, without a mask,
  with an optional float :class:`LowRank` adapter) whose values are bf16/f16/f32 or a
  contiguous-group :class:`QuantizedWeight` (2/3/4/8 bits, no ``g_idx``, groups of a multiple of 8
  compressed rows, 16 for 2 bits, 32 for 3 bits); bf16/f16 activations; ``in`` a multiple of 4; any
  M and N.

  Args:
    x: activations or ``jax.ShapeDtypeStruct`` ``[..., in]``.
    w: the weight leaf (arrays or ``ShapeDtypeStruct`` leaves).
    block: tile sizes; default :meth:`BlockSizes.for_shape`.

  Returns:
    The tile sizes the kernel will use.
  """
  s, adapter = _split(w)
  if x.dtype not in _ACT_DTYPES:
    raise NotImplementedError(f'pallas_sparse24 needs bf16 or f16 activations, got {x.dtype}.')
  k, n = s.shape
  if len(x.shape) < 1 or x.shape[-1] != k:
    raise ValueError(f'activations [..., {x.shape[-1] if x.shape else None}] do not match a 2:4 '
                     f'weight with {k} input rows.')
  if s.indices.shape != (k // 2, n):
    raise ValueError(f'indices {s.indices.shape} do not match values for a [{k}, {n}] weight.')
  if k % 4:
    raise NotImplementedError(f'pallas_sparse24 needs in % 4 == 0, got in={k}.')
  if isinstance(s.values, formats.QuantizedWeight):
    if s.values.g_idx is not None:
      raise NotImplementedError('pallas_sparse24: act-order (g_idx) values are not supported.')
  elif s.values.dtype not in _VALUE_DTYPES:
    raise NotImplementedError(f'pallas_sparse24: values of dtype {s.values.dtype}.')
  if adapter is not None:
    if (isinstance(adapter.a, formats.QuantizedWeight)
        or isinstance(adapter.b, formats.QuantizedWeight)):
      raise NotImplementedError('pallas_sparse24 fuses float LowRank adapters only.')
    if adapter.a.shape[0] != k or adapter.b.shape[-1] != n:
      raise ValueError(f'adapter a {adapter.a.shape} / b {adapter.b.shape} does not match the '
                       f'weight {(k, n)}.')
  m = 1
  for d in x.shape[:-1]:
    m *= d
  if m == 0 or n == 0:
    raise NotImplementedError('pallas_sparse24: empty product.')
  if block is None:
    block = BlockSizes.for_shape(m, n, k)
  _sub_tile(s, block)
  return block


def _kernel(*refs, m: int, n: int, k: int, bits: int | None, glen: int, num_groups: int,
            packed_rows: int, bk: int, sub: int, steps: int, splits: int, rank: int, gemv: bool,
            bm: int, bn: int, dtype):
  quant = bits is not None
  x_ref, v_ref, *rest = refs
  s_ref, z_ref = (rest.pop(0), rest.pop(0)) if quant else (None, None)
  i_ref = rest.pop(0)
  xa_ref, b_ref = (rest.pop(0), rest.pop(0)) if rank else (None, None)
  (o_ref,) = rest
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
        gi = jnp.minimum(pc.div(c0, glen), num_groups - 1)
        scale = pc.load_row(s_ref, gi, tile.col_ok).astype(jnp.float32)  # [1, bn]
        z = pc.load_row(z_ref, gi, tile.col_ok).astype(jnp.int32)
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

  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
  if rank:
    epilogue = functools.partial(pc.adapter_epilogue, xa_ref=xa_ref, b_ref=b_ref, tile=tile,
                                 rank=rank, gemv=gemv, dtype=dtype)
    if splits == 1:
      acc = epilogue(acc)
    else:
      acc = jax.lax.cond(split_id == 0, epilogue, lambda a: a, acc)
  pc.store(o_ref, acc, tile)


@functools.partial(jax.jit, static_argnames=('block', 'interpret'))
def sparse24_matmul(x: jax.Array, w: formats.Sparse24Weight,
                    adapter: formats.LowRank | None = None, *, block: BlockSizes | None = None,
                    interpret: bool = False) -> jax.Array:
  """``x @ W (+ (x @ adapter.a) @ adapter.b)`` for a 2:4 weight, with the Pallas kernel.

  Args:
    x: ``[..., in]`` bf16 or f16 activations.
    w: the 2:4 weight ``[in, out]`` (float or quantized values, uint8 indices).
    adapter: optional float low-rank pair ``a [in, r]``, ``b [r, out]``, fused as an epilogue.
    block: tile sizes (static); default :meth:`BlockSizes.for_shape`.
    interpret: run the kernel in Pallas interpret mode (CPU tests).

  Returns:
    ``[..., out]`` in ``x.dtype``.
  """
  leaf = w if adapter is None else formats.CompressedLinear(weight=w, adapter=adapter)
  block = check_supported(x, leaf, block)
  x2, lead = pc.flatten_rows(x)
  m, k = x2.shape
  n = w.shape[1]
  dtype = x.dtype
  sub = _sub_tile(w, block)
  bk, steps, splits = pc.k_plan(k, block.block_k, sub, block.split_k)
  bm, bn = block.block_m, block.block_n
  grid = (pl.cdiv(n, bn), pl.cdiv(m, bm), splits)
  vals = w.values
  quant = isinstance(vals, formats.QuantizedWeight)
  idx = w.indices.reshape(k // 4, 2, n)  # free view: the two kept positions of each group

  operands, specs = [x2], [pl.BlockSpec((bm, k), lambda i, j, s: (j, 0))]
  if quant:
    q = pc.packed_view(vals.qweight, vals.bits)
    groups = vals.scales.shape[0]
    operands += [q, vals.scales, vals.zeros]
    specs += [
        (pl.BlockSpec((q.shape[0], 3, bn), lambda i, j, s: (0, 0, i)) if vals.bits == 3 else
         pl.BlockSpec((q.shape[0], bn), lambda i, j, s: (0, i))),
        pl.BlockSpec((groups, bn), lambda i, j, s: (0, i)),
        pl.BlockSpec((groups, bn), lambda i, j, s: (0, i)),
    ]
    bits, packed_rows = vals.bits, q.shape[0]
    glen = k // 2 if vals.group_size == -1 else vals.group_size
  else:
    groups, bits, glen, packed_rows = 1, None, k // 2, k // 4
    operands.append(vals.reshape(k // 4, 2, n))
    specs.append(pl.BlockSpec((k // 4, 2, bn), lambda i, j, s: (0, 0, i)))
  operands.append(idx)
  specs.append(pl.BlockSpec((k // 4, 2, bn), lambda i, j, s: (0, 0, i)))
  rank = 0
  if adapter is not None:
    rank = adapter.a.shape[1]
    xa = jnp.dot(x2, adapter.a.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    operands += [xa, adapter.b]
    specs += [pl.BlockSpec((bm, rank), lambda i, j, s: (j, 0)),
              pl.BlockSpec((rank, bn), lambda i, j, s: (0, i))]
  if splits == 1:
    out_shape = jax.ShapeDtypeStruct((m, n), dtype)
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (j, i))
  else:
    out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
    out_spec = pl.BlockSpec((pl.squeezed, bm, bn), lambda i, j, s: (s, j, i))

  kernel = functools.partial(
      _kernel, m=m, n=n, k=k, bits=bits, glen=glen, num_groups=groups, packed_rows=packed_rows,
      bk=bk, sub=sub, steps=steps, splits=splits, rank=rank, gemv=block.gemv, bm=bm, bn=bn,
      dtype=dtype)
  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=specs, out_specs=out_spec,
      compiler_params=pc.compiler_params(block), interpret=interpret,
      name='sparse24_matmul' if not quant else f'sparse24_w{bits}_matmul')(*operands)
  if splits > 1:
    out = out.sum(axis=0).astype(dtype)
  return out.reshape(*lead, n)


def linear(x: jax.Array, w, *, block: BlockSizes | None = None,
           interpret: bool = False) -> jax.Array:
  """``kernels.linear`` for a :class:`Sparse24Weight` leaf or a :class:`CompressedLinear` holding
  one (float adapters fused; a quantized adapter runs through the reference, outside the kernel)."""
  s, adapter = _split(w)
  if adapter is not None and (isinstance(adapter.a, formats.QuantizedWeight)
                              or isinstance(adapter.b, formats.QuantizedWeight)):
    y = sparse24_matmul(x, s, block=block, interpret=interpret)
    return y + reference.linear(reference.linear(x, adapter.a), adapter.b)
  return sparse24_matmul(x, s, adapter, block=block, interpret=interpret)
