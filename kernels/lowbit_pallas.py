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
  ``[block_m, block_n]`` partial product once, not every weight element. A group size that does
  not divide K (a shorter last group) needs nothing more: every group starts at a multiple of
  the sub-tile, and rows past K are masked.
* Act-order ``g_idx``: the serving layout (:func:`kernels.layouts.for_serving`, once at load)
  sorts the input rows by group, so the weight has contiguous groups and takes the path above;
  the activations are permuted at run time (a :class:`kernels.formats.PermutedInput` leaf: one
  gather of ``M x K`` values, which at decode is tiny next to the weight). A stored act-order
  weight that was not re-laid out still runs, gathering scales and zeros per input row (one
  ``[sub, block_n]`` gather from the small ``[groups, N]`` arrays) and dequantizing per element
  before the dot: exact, but 0.26-0.42x bf16 on an H100 against 1.8-1.9x for contiguous groups.
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
from kernels.pallas_common import BlockSizes

__all__ = ['BlockSizes', 'DISPATCH_MAX_M', 'check_supported', 'linear', 'lowbit_matmul']

# A hard ceiling: above this many activation rows the kernel declines even when named. Below it the
# default dispatch follows the tuning table (kernels/tuning.py), which on an H100 and on unseen
# devices hands calls of more than 16 rows to the jnp reference (dequantize once, then the dense
# GEMM): the kernel dequantizes every weight tile once per row tile, 0.25-0.36x bf16 at M >= 64.
DISPATCH_MAX_M = 1024

_NAME = 'pallas_lowbit'


def _sub_tile(w: formats.QuantizedWeight, block: BlockSizes) -> int:
  """Input rows per dot: inside one group (contiguous groups), a whole number of packed words."""
  unit = max(pc.MIN_DOT, pc.min_unpack_rows(w.bits))
  contiguous = w.g_idx is None and w.group_size != -1
  return pc.sub_tile(
      w.in_features, block.block_k, unit, w.group_size if contiguous else None,
      f'group_size={w.group_size} with {w.bits}-bit codes: a group must hold a multiple of '
      f'{unit} input rows for this kernel.')


def check_supported(x, w, block: BlockSizes | None = None) -> BlockSizes:
  """Raises ``NotImplementedError`` if the kernel cannot run ``linear(x, w)``; works on shapes only.

  Supported: a :class:`QuantizedWeight` (or a :class:`CompressedLinear` holding one, without a
  mask, with an optional float :class:`LowRank` adapter) of 2, 3, 4 or 8 bits; bf16/f16
  activations ``[..., in]``; contiguous groups whose length holds a multiple of 16 input rows (32
  for 3-bit) or one group per column (``group_size=-1``); act-order ``g_idx`` (scales and zeros
  gathered per row); any M, N and K (edges are masked).

  Arguments and result: see :func:`kernels.pallas_common.check_supported`.
  """
  if isinstance(w, formats.PermutedInput):
    w = w.inner  # the activations are permuted outside the kernel
  return pc.check_supported(x, w, block, leaf_type=formats.QuantizedWeight, name=_NAME,
                            weight_desc=lambda k: f'a weight with in_features={k}',
                            sub_tile_fn=_sub_tile)


def _kernel(*refs, m: int, n: int, k: int, bits: int, glen: int, num_groups: int, act_order: bool,
            packed_rows: int, bk: int, sub: int, steps: int, splits: int, rank: int, gemv: bool,
            bm: int, bn: int, dtype):
  x_ref, q_ref, s_ref, z_ref, *rest = refs
  g_ref = rest.pop(0) if act_order else None
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
        s, z = pc.group_scale_zero(s_ref, z_ref, k0, glen, num_groups, tile.col_ok)  # [1, bn]
        acc = pc.accumulate(acc, x_ref, tile, k0, sub, k, codes - z, gemv=gemv, dtype=dtype,
                            scale=s)
    return acc

  pc.reduce_and_store(step, tile, rest, steps=steps, splits=splits, rank=rank, gemv=gemv,
                      dtype=dtype)


@functools.partial(jax.jit, static_argnames=('block', 'interpret'))
def lowbit_matmul(x: jax.Array, w: formats.QuantizedWeight, adapter: formats.LowRank | None = None,
                  *, block: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
  """Returns ``x @ dequantize(w) (+ (x @ adapter.a) @ adapter.b)`` ``[..., out]`` in ``x.dtype``.

  Args:
    x: ``[..., in]`` bf16 or f16 activations.
    w: the quantized weight ``[in, out]``.
    adapter, block, interpret: see "Entry points" in :mod:`kernels.pallas_common`.
  """
  p = pc.plan(x, w, adapter, block, check_supported, _sub_tile)
  act_order = w.g_idx is not None
  operands, specs, params = pc.quantized_operands(w, p.bn)
  if act_order:
    operands.append(w.g_idx.astype(jnp.int32))
    specs.append(pl.BlockSpec((p.k,), lambda i, j, s: (0,)))
  return pc.launch(_kernel, p, operands, specs, adapter, name=f'lowbit_w{w.bits}_matmul',
                   interpret=interpret, act_order=act_order, **params)


def linear(x: jax.Array, w, *, block: BlockSizes | None = None,
           interpret: bool = False) -> jax.Array:
  """``kernels.linear`` for a :class:`QuantizedWeight` leaf or a :class:`CompressedLinear` holding
  one (float adapters fused; a quantized adapter runs through the reference, outside the kernel),
  or a :class:`PermutedInput` of either (the activations gathered by ``perm`` first)."""
  if isinstance(w, formats.PermutedInput):
    pc.split_leaf(w.inner, formats.QuantizedWeight, _NAME)  # decline before any work
    x, w = jnp.take(x, w.perm, axis=-1), w.inner
  q, adapter = pc.split_leaf(w, formats.QuantizedWeight, _NAME)
  return pc.linear_with_adapter(lowbit_matmul, x, q, adapter, block=block, interpret=interpret)
