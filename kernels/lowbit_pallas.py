"""W{2,3,4,8}A16: group-wise dequantize-and-multiply in Pallas, with a fused low-rank epilogue.

``y = x @ dequantize(W) (+ (x @ a) @ b)`` for a :class:`kernels.formats.QuantizedWeight` in GPTQ's
packing (GPTQ: Frantar et al., 2022, https://arxiv.org/abs/2210.17323). The loop structure follows
the GPTQ Triton kernel of AutoGPTQ (``auto_gptq/nn_modules/triton_utils/kernels.py``: dequantize
inside the K loop, one scale/zero row per group, ``g_idx`` gathered per input row); the decode-path
goals follow Marlin (Frantar et al., 2024, https://arxiv.org/abs/2408.11743): at small M the packed
weight is essentially all of the memory traffic, so it must be read exactly once, in wide coalesced
rows, with enough independent loads in flight to keep HBM busy.

Terminology: M activation rows (tokens), K input features, N output features; ``[M, K] @ [K, N]``.

Design:

* Each program owns an output tile ``[block_m, block_n]`` and walks K. Packed int32 words are
  loaded once and unpacked in registers with shifts and masks (:mod:`kernels.pallas_common`).
* Contiguous groups: a K step is cut into sub-tiles that never cross a group, so the MMA runs on the
  exact small integers ``q - zero`` (exact in bf16/f16) and the group's scale multiplies the
  ``[block_m, block_n]`` partial product once, not every weight element.
* Act-order ``g_idx``: scales and zeros are gathered per input row (one ``[sub, block_n]`` gather
  from the small ``[groups, N]`` arrays, which stay in L1/L2) and the weight is dequantized per
  element before the dot. No repacking is needed and the result is exact w.r.t. the format.
* Decode (M <= 16): split-K (partial sums added outside) so that a narrow N still gives ~2
  programs per SM; for M <= 4 an elementwise multiply-reduce replaces the MMA (no 16-row padding).
  Prefill (M > 16): ordinary 2-D output tiling with MMA.
* Adapter: ``x @ a`` (``[M, r]``, one small XLA dot that reads ``a`` once) is computed before the
  kernel; ``(x @ a) @ b`` is added to each output tile in the kernel's epilogue, so ``b`` is read
  once per tile and no ``[M, N]`` intermediate goes through memory.

What could not be measured: no GPU was available when this was written. The kernels are verified in
interpret mode on the CPU only (and lowered to Triton IR for CUDA, which the CPU can do); the tile
defaults (:class:`BlockSizes`), the split-K heuristic, the elementwise-GEMV choice at M <= 4 and
:data:`DISPATCH_MAX_M` are reasoned, not swept, and whether Triton keeps the unpack in registers
without spilling is unverified.
``experiments/bench_kernels.py`` measures all of it on a GPU.
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

__all__ = ['BlockSizes', 'DISPATCH_MAX_M', 'check_supported', 'linear', 'lowbit_matmul']

# Above this many activation rows the default dispatch hands the product to the jnp reference
# (dequantize once, then a cuBLAS GEMM), which wins once the dequantization is amortized over enough
# rows. Not measured: a guess from the roofline, to be set from bench_kernels results.
DISPATCH_MAX_M = 1024

_ACT_DTYPES = (jnp.bfloat16, jnp.float16)


def _group_len(w: formats.QuantizedWeight) -> int:
  return w.in_features if w.group_size == -1 else w.group_size


def _sub_tile(w: formats.QuantizedWeight, block: BlockSizes) -> int:
  """Input rows per dot: inside one group (contiguous groups), a whole number of packed words."""
  unit = max(pc.MIN_DOT, pc.min_unpack_rows(w.bits))
  cap = max(unit, min(block.block_k, pc.next_pow2(w.in_features)))
  if w.g_idx is not None or w.group_size == -1:
    return cap
  sub = min(cap, pc.largest_pow2_divisor(_group_len(w)))
  if sub < unit:
    raise NotImplementedError(
        f'group_size={w.group_size} with {w.bits}-bit codes: a group must hold a multiple of '
        f'{unit} input rows for this kernel.')
  return sub


def _split(w) -> tuple[formats.QuantizedWeight, formats.LowRank | None]:
  if isinstance(w, formats.CompressedLinear):
    if w.mask is not None:
      raise NotImplementedError('pallas_lowbit: a CompressedLinear with an unstructured mask is '
                                'left to the reference implementation.')
    if not isinstance(w.weight, formats.QuantizedWeight):
      raise NotImplementedError(f'pallas_lowbit: weight is a {type(w.weight).__name__}, not a '
                                'QuantizedWeight.')
    return w.weight, w.adapter
  if isinstance(w, formats.QuantizedWeight):
    return w, None
  raise NotImplementedError(
      f'pallas_lowbit handles QuantizedWeight leaves, got {type(w).__name__}.')


def check_supported(x, w, block: BlockSizes | None = None) -> BlockSizes:
  """Raises ``NotImplementedError`` if the kernel cannot run ``linear(x, w)``; works on shapes only.

  Supported: a :class:`QuantizedWeight` (or a :class:`CompressedLinear` holding one, without a
  mask, with an optional float :class:`LowRank` adapter) of 2, 3, 4 or 8 bits; bf16/f16
  activations ``[..., in]``; contiguous groups whose length holds a multiple of 16 input rows (32
  for 3-bit) or one group per column (``group_size=-1``); act-order ``g_idx`` (scales and zeros
  gathered per row); any M, N and K (edges are masked).

  Args:
    x: activations or ``jax.ShapeDtypeStruct`` ``[..., in]``.
    w: the weight leaf (arrays or ``ShapeDtypeStruct`` leaves).
    block: tile sizes; default :meth:`BlockSizes.for_shape`.

  Returns:
    The tile sizes the kernel will use.
  """
  q, adapter = _split(w)
  if x.dtype not in _ACT_DTYPES:
    raise NotImplementedError(f'pallas_lowbit needs bf16 or f16 activations, got {x.dtype}.')
  if len(x.shape) < 1 or x.shape[-1] != q.in_features:
    raise ValueError(f'activations [..., {x.shape[-1] if x.shape else None}] do not match a weight '
                     f'with in_features={q.in_features}.')
  if adapter is not None:
    if (isinstance(adapter.a, formats.QuantizedWeight)
        or isinstance(adapter.b, formats.QuantizedWeight)):
      raise NotImplementedError('pallas_lowbit fuses float LowRank adapters only.')
    if adapter.a.shape[0] != q.in_features or adapter.b.shape[-1] != q.shape[1]:
      raise ValueError(f'adapter a {adapter.a.shape} / b {adapter.b.shape} does not match the '
                       f'weight {q.shape}.')
  m = 1
  for d in x.shape[:-1]:
    m *= d
  if m == 0 or q.shape[1] == 0:
    raise NotImplementedError('pallas_lowbit: empty product.')
  if block is None:
    block = BlockSizes.for_shape(m, q.shape[1], q.in_features)
  _sub_tile(q, block)
  return block


def _kernel(*refs, m: int, n: int, k: int, bits: int, glen: int, num_groups: int, act_order: bool,
            packed_rows: int, bk: int, sub: int, steps: int, splits: int, rank: int, gemv: bool,
            bm: int, bn: int, dtype):
  x_ref, q_ref, s_ref, z_ref, *rest = refs
  g_ref = rest.pop(0) if act_order else None
  xa_ref, b_ref = (rest.pop(0), rest.pop(0)) if rank else (None, None)
  (o_ref,) = rest
  tile = pc.make_tile(m, n, bm, bn)
  split_id = pl.program_id(2)

  def step(t, acc):
    base = (split_id * steps + t) * bk
    for u in range(bk // sub):  # unrolled: independent loads of the sub-tiles overlap
      k0 = base + u * sub
      codes = pc.unpack_tile(q_ref, k0, sub, bits, packed_rows, tile.col_ok)  # [sub, bn] int32
      if act_order:
        k_ok = (k0 + pc.iota(sub)) < k
        g = plt.load(g_ref.at[pl.ds(k0, sub)], mask=k_ok, other=0)
        idx = (g[:, None] + 0 * pc.iota(bn, (1, bn), 1), pc.iota(bn, (sub, bn), 1))
        ok = k_ok[:, None] & tile.col_ok[None, :]
        s = plt.load(s_ref.at[idx], mask=ok, other=0).astype(jnp.float32)
        z = plt.load(z_ref.at[idx], mask=ok, other=0).astype(jnp.int32)
        w = (codes - z).astype(jnp.float32) * s
        acc = pc.accumulate(acc, x_ref, tile, k0, sub, k, w, gemv=gemv, dtype=dtype)
      else:
        gi = jnp.minimum(pc.div(k0, glen), num_groups - 1)
        s = pc.load_row(s_ref, gi, tile.col_ok).astype(jnp.float32)  # [1, bn]
        z = pc.load_row(z_ref, gi, tile.col_ok).astype(jnp.int32)
        acc = pc.accumulate(acc, x_ref, tile, k0, sub, k, codes - z, gemv=gemv, dtype=dtype,
                            scale=s)
    return acc

  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
  if rank:
    epilogue = functools.partial(pc.adapter_epilogue, xa_ref=xa_ref, b_ref=b_ref, tile=tile,
                                 rank=rank, gemv=gemv, dtype=dtype)
    if splits == 1:
      acc = epilogue(acc)
    else:  # the adapter term is added once, by the first K split
      acc = jax.lax.cond(split_id == 0, epilogue, lambda a: a, acc)
  pc.store(o_ref, acc, tile)


@functools.partial(jax.jit, static_argnames=('block', 'interpret'))
def lowbit_matmul(x: jax.Array, w: formats.QuantizedWeight, adapter: formats.LowRank | None = None,
                  *, block: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
  """``x @ dequantize(w) (+ (x @ adapter.a) @ adapter.b)`` with the Pallas kernel.

  Args:
    x: ``[..., in]`` bf16 or f16 activations.
    w: the quantized weight ``[in, out]``.
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
  act_order = w.g_idx is not None
  q = pc.packed_view(w.qweight, w.bits)
  groups = w.scales.shape[0]

  operands = [x2, q, w.scales, w.zeros]
  specs = [
      pl.BlockSpec((bm, k), lambda i, j, s: (j, 0)),
      (pl.BlockSpec((q.shape[0], 3, bn), lambda i, j, s: (0, 0, i)) if w.bits == 3 else
       pl.BlockSpec((q.shape[0], bn), lambda i, j, s: (0, i))),
      pl.BlockSpec((groups, bn), lambda i, j, s: (0, i)),
      pl.BlockSpec((groups, bn), lambda i, j, s: (0, i)),
  ]
  if act_order:
    operands.append(w.g_idx.astype(jnp.int32))
    specs.append(pl.BlockSpec((k,), lambda i, j, s: (0,)))
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
      _kernel, m=m, n=n, k=k, bits=w.bits, glen=_group_len(w), num_groups=groups,
      act_order=act_order, packed_rows=q.shape[0], bk=bk, sub=sub, steps=steps, splits=splits,
      rank=rank, gemv=block.gemv, bm=bm, bn=bn, dtype=dtype)
  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=specs, out_specs=out_spec,
      compiler_params=pc.compiler_params(block), interpret=interpret,
      name=f'lowbit_w{w.bits}_matmul')(*operands)
  if splits > 1:
    out = out.sum(axis=0).astype(dtype)
  return out.reshape(*lead, n)


def linear(x: jax.Array, w, *, block: BlockSizes | None = None,
           interpret: bool = False) -> jax.Array:
  """``kernels.linear`` for a :class:`QuantizedWeight` leaf or a :class:`CompressedLinear` holding
  one (float adapters fused; a quantized adapter runs through the reference, outside the kernel)."""
  q, adapter = _split(w)
  if adapter is not None and (isinstance(adapter.a, formats.QuantizedWeight)
                              or isinstance(adapter.b, formats.QuantizedWeight)):
    y = lowbit_matmul(x, q, block=block, interpret=interpret)
    return y + reference.linear(reference.linear(x, adapter.a), adapter.b)
  return lowbit_matmul(x, q, adapter, block=block, interpret=interpret)
