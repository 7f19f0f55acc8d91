"""Pieces shared by the Pallas matmul kernels: tile sizes, masked tile loads, in-register unpacking,
and the call plumbing (support checks, operands and ``BlockSpec``s, launch, the ``linear`` wrapper).

The kernels are written for the Pallas *Triton* lowering (``jax.experimental.pallas.triton``, the
GPU backend that ``pl.pallas_call`` uses by default in jax 0.10 and that jax 0.11 keeps, deprecated,
behind ``compiler_params=plt.CompilerParams(...)``), and run unchanged in interpret mode on the CPU,
which is how the tests check them. The conventions follow the jax ``pallas/ops/gpu`` kernels:

* A ``BlockSpec`` blocks the output axes (M rows of activations, N output features); the reduction
  axis K is never blocked by the grid but walked by a ``fori_loop`` inside the kernel, because
  Triton programs of one grid run concurrently and cannot accumulate into a shared output block.
* Nothing requires the shape to divide the tile: every load that can run past an edge is a masked
  ``plt.load(..., mask, other=0)`` and the output store is masked. (The Triton lowering does not
  mask partial blocks by itself; interpret mode pads them with NaN, so a missing mask fails the
  tests.)
* Every loaded or computed block has a power-of-two size (a Triton requirement), and every operand
  of a ``dot`` has each dimension >= 16.

Unpacking follows :mod:`kernels.packing` (GPTQ's layout): for 2, 4 and 8 bits an int32 word holds
``32 / bits`` consecutive input rows, so a tile of ``wr`` word rows expands with one broadcast shift
to ``[wr, 32 / bits, bn]`` and a reshape to ``[wr * 32 / bits, bn]``. For 3 bits a run of 32 rows
lives in 3 words and two values straddle words, so the three word planes of a run are loaded
separately (the packed array is viewed, for free, as ``[runs, 3, out]``) and each of the 32 slots
selects its word, shift and spill bits from tables built with ``iota``.

Entry points: each kernel module has ``<kernel>_matmul(x, w, adapter=None, *, block=None,
interpret=False)`` (jitted, ``block`` and ``interpret`` static) with

* ``adapter``: an optional float :class:`kernels.formats.LowRank` pair ``a [in, r]``, ``b [r, out]``
  whose term ``(x @ a) @ b`` is added in the kernel's epilogue (:func:`launch`);
* ``block``: the tile sizes (:class:`BlockSizes`), default :meth:`BlockSizes.for_shape`;
* ``interpret``: run the kernel in Pallas interpret mode (the CPU tests);

and ``linear(x, w, *, block=None, interpret=False)`` for :func:`kernels.linear`
(:func:`linear_with_adapter`); ``check_supported`` is :func:`check_supported` with the format's
checks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels import formats
from kernels import reference

# Triton's dot needs every operand dimension >= 16.
MIN_DOT = 16
# Streaming multiprocessors of an H100 SXM (132); only used to size split-K for small M.
_TARGET_SMS = 132
# The elementwise (no-MMA) GEMV path keeps one partial product per activation row in registers.
MAX_GEMV_ROWS = 4
# Activation dtypes the kernels take.
ACT_DTYPES = (jnp.bfloat16, jnp.float16)


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def largest_pow2_divisor(n: int) -> int:
  return int(n) & -int(n)


def is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def div(a, b: int):
  """``a // b`` for a non-negative traced int: truncating ``lax.div`` (no floor correction)."""
  return jax.lax.div(a, jnp.asarray(b, jnp.int32))


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tile sizes and launch parameters of the dequantize-and-multiply kernels.

  The grid is ``(cdiv(N, block_n), cdiv(M, block_m), split_k)``; each program walks its share of K
  in steps of ``block_k`` input rows (a step is split further so that one dot never crosses a
  quantization group), and split-K partial sums ``[split_k, M, N]`` (float32) are added outside.

  How the defaults (:meth:`for_shape`) were chosen: from a tile sweep on an H100
  (``results/bench_kernels_h100``, int4 g128 on the 4096x14336 Llama-3-8B linear, sweep winners
  per M). One row is the elementwise multiply-and-reduce (``gemv=True``) with 128-wide output tiles
  and 256-row K steps; 2-16 rows are a 16-row dot tile with ``block_n = 64`` and 128-row K steps
  (512-row steps overran the 227 KiB of shared memory with act-order scales and 2:4 values); both
  split K 4 ways, further when the output tiles alone give fewer than about two programs per SM.
  64 and more rows use 64-wide output tiles and 64-row K steps. Act-order weights (scales gathered
  per input row) take 32-wide output tiles at up to 16 rows, with 512-row K steps for one row (the
  sweep's winners for them: 2x and 1.3x faster than the shared tiles). Re-derive them with
  ``experiments/bench_kernels.py --sweep=FORMAT`` on another GPU.

  Attributes:
    block_m: activation rows per program (power of two; >= 16 unless ``gemv``).
    block_n: output features per program (power of two, >= 16).
    block_k: input rows per K step (power of two, >= 16).
    split_k: number of programs sharing one output tile along K (>= 1).
    gemv: elementwise multiply-reduce instead of ``dot``; needs ``block_m <= MAX_GEMV_ROWS``.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the K loop.
  """
  block_m: int = 16
  block_n: int = 64
  block_k: int = 256
  split_k: int = 1
  gemv: bool = False
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ('block_m', 'block_n', 'block_k'):
      v = getattr(self, name)
      if not is_pow2(v):
        raise ValueError(f'BlockSizes.{name} must be a power of two, got {v}.')
    if self.block_n < MIN_DOT or self.block_k < MIN_DOT:
      raise ValueError(f'BlockSizes.block_n and block_k must be >= {MIN_DOT}, got '
                       f'{self.block_n} and {self.block_k}.')
    if self.gemv and self.block_m > MAX_GEMV_ROWS:
      raise ValueError(f'the elementwise GEMV path holds at most {MAX_GEMV_ROWS} rows, got '
                       f'block_m={self.block_m}.')
    if not self.gemv and self.block_m < MIN_DOT:
      raise ValueError(f'the dot path needs block_m >= {MIN_DOT}, got {self.block_m}; '
                       'use gemv=True for fewer rows.')
    if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
      raise ValueError('split_k, num_warps and num_stages must be >= 1.')

  @classmethod
  def for_shape(cls, m: int, n: int, k: int, gathered: bool = False) -> 'BlockSizes':
    """Default tiles for an ``[m, k] @ [k, n]`` product (see the class docstring);
    ``gathered``: scales and zeros are gathered per input row (act-order ``g_idx``)."""
    if m <= 16:
      gemv = m == 1
      block_m = 1 if gemv else 16
      block_n, block_k = (128, 256) if gemv else (64, 128)
      if gathered:  # a [block_k, block_n] scale gather per step: narrower tiles
        block_n, block_k = (32, 512) if gemv else (32, 128)
      n_tiles = -(-n // block_n)
      # Split K 4 ways (more while there are fewer than ~2 programs per SM), keeping >= 2 K steps
      # per program.
      split = 1
      while (split < 16 and k >= split * 2 * 2 * block_k
             and (split < 4 or n_tiles * split < 2 * _TARGET_SMS)):
        split *= 2
      return cls(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split, gemv=gemv,
                 num_warps=4, num_stages=4)
    if m <= 64:
      return cls(block_m=next_pow2(m), block_n=64, block_k=64, num_warps=4, num_stages=3)
    if m < 128:
      return cls(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
    return cls(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3)


def compiler_params(block: BlockSizes):
  return plt.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages)


def iota(n: int, shape=None, axis: int = 0) -> jax.Array:
  """int32 ``0..n-1`` laid along ``axis`` of ``shape`` (default ``(n,)``)."""
  shape = (n,) if shape is None else shape
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


@dataclasses.dataclass(frozen=True)
class Tile:
  """Where one program sits: its rows/columns and their validity masks (traced values)."""
  row0: jax.Array      # scalar: first activation row of the tile
  m: int               # number of activation rows
  rows: jax.Array      # [bm] global activation rows
  row_ok: jax.Array    # [bm] bool
  cols: jax.Array      # [bn] global output features
  col_ok: jax.Array    # [bn] bool
  bm: int
  bn: int


def make_tile(m: int, n: int, bm: int, bn: int) -> Tile:
  row0 = pl.program_id(1) * bm
  rows = row0 + iota(bm)
  cols = pl.program_id(0) * bn + iota(bn)
  return Tile(row0=row0, m=m, rows=rows, row_ok=rows < m, cols=cols, col_ok=cols < n, bm=bm, bn=bn)


def load_rows(ref, start, size: int, limit: int, col_ok: jax.Array, other=0):
  """Rows ``[start, start + size)`` of a 2-D ref ``[*, bn]``; zero past ``limit`` or the last
  column."""
  ok = ((start + iota(size)) < limit)[:, None] & col_ok[None, :]
  return plt.load(ref.at[pl.ds(start, size), :], mask=ok, other=other)


def load_row(ref, index, col_ok: jax.Array, other=0):
  """Row ``index`` of a 2-D ref ``[*, bn]`` as ``[1, bn]``."""
  return plt.load(ref.at[pl.ds(index, 1), :], mask=col_ok[None, :], other=other)


def load_plane(ref, start, size: int, plane: int, limit: int, col_ok: jax.Array, other=0):
  """``ref[start:start+size, plane, :]`` of a 3-D ref ``[*, planes, bn]`` as ``[size, bn]``."""
  ok = ((start + iota(size)) < limit)[:, None] & col_ok[None, :]
  out = plt.load(ref.at[pl.ds(start, size), pl.ds(plane, 1), :], mask=ok[:, None, :], other=other)
  return out.reshape(size, out.shape[-1])


def load_x(x_ref, tile: Tile, k0, width: int, k: int, dtype):
  """Activation tile ``x[rows, k0:k0+width]`` ``[bm, width]``, zero outside ``[M, K]``."""
  ok = tile.row_ok[:, None] & ((k0 + iota(width)) < k)[None, :]
  return plt.load(x_ref.at[:, pl.ds(k0, width)], mask=ok, other=0).astype(dtype)


def unpack_words(q_ref, word0, wr: int, bits: int, limit: int, col_ok: jax.Array,
                 parity: int | None = None) -> jax.Array:
  """Integer codes of ``wr`` packed word rows (2/4/8 bits) ``[wr * per_word, bn]`` int32.

  Word row ``w`` holds input rows ``P*w .. P*w + P - 1`` (``P = 32 / bits``) at shifts
  ``bits * slot``. With ``parity`` in {0, 1} only the even/odd rows are returned
  (``[wr * P / 2, bn]``, row ``w * P/2 + i`` = input row ``P*w + 2*i + parity``).
  """
  per_word = 32 // bits
  words = load_rows(q_ref, word0, wr, limit, col_ok)  # [wr, bn] int32
  if parity is None:
    slots = iota(per_word, (1, per_word, 1), 1)
  else:
    slots = 2 * iota(per_word // 2, (1, per_word // 2, 1), 1) + parity
  codes = jax.lax.shift_right_logical(words[:, None, :], bits * slots) & ((1 << bits) - 1)
  return codes.reshape(wr * slots.shape[1], words.shape[-1])


def unpack_runs3(q_ref, run0, runs: int, limit: int, col_ok: jax.Array,
                 parity: int | None = None) -> jax.Array:
  """3-bit codes of ``runs`` runs of 32 rows from the ``[runs, 3, bn]`` view: ``[runs * 32, bn]``.

  Value ``j`` of a run starts at bit ``3 j`` of the run's 96-bit little-endian stream; values 10
  and 21 straddle two words. With ``parity`` only the even/odd values are returned
  (``[runs * 16, bn]``).
  """
  planes = [load_plane(q_ref, run0, runs, p, limit, col_ok) for p in range(3)]  # 3 x [runs, bn]
  nslots = 32 if parity is None else 16
  j = iota(nslots, (1, nslots, 1), 1)
  if parity is not None:
    j = 2 * j + parity
  offset = 3 * j
  word = jax.lax.shift_right_logical(offset, 5)  # offset // 32 (shifts/masks lower everywhere)
  shift = offset & 31
  spill = (shift + 3) > 32
  p0, p1, p2 = (p[:, None, :] for p in planes)
  lo = jnp.where(word == 0, p0, jnp.where(word == 1, p1, p2))
  nxt = jnp.where(word == 0, p1, p2)
  val = jax.lax.shift_right_logical(lo, shift)
  hi_shift = jnp.where(spill, 32 - shift, 0)
  val = val | jnp.where(spill, jax.lax.shift_left(nxt, hi_shift), 0)
  codes = val & 7
  return codes.reshape(runs * nslots, planes[0].shape[-1])


def unpack_tile(q_ref, start: jax.Array, size: int, bits: int, packed_rows: int,
                col_ok: jax.Array, parity: int | None = None) -> jax.Array:
  """Codes of input rows ``[start, start + size)`` of a packed weight (``start`` a multiple of the
  packing unit). Returns ``[size, bn]`` int32, or ``[size / 2, bn]`` of the even/odd rows."""
  if bits == 3:
    runs = size // 32
    return unpack_runs3(q_ref, div(start, 32), runs, packed_rows, col_ok, parity)
  per_word = 32 // bits
  wr = size // per_word
  word0 = div(start, per_word)
  if wr > 1:
    word0 = pl.multiple_of(word0, wr)
  return unpack_words(q_ref, word0, wr, bits, packed_rows, col_ok, parity)


def min_unpack_rows(bits: int) -> int:
  """Smallest tile (input rows) that :func:`unpack_tile` reads whole: one word, or one 3-bit run."""
  return 32 if bits == 3 else 32 // bits


def packed_view(qweight: jax.Array, bits: int) -> jax.Array:
  """The packed array as the kernel reads it: ``[words, out]``, or ``[runs, 3, out]`` for 3 bits
  (a free reshape: the 3 words of a run are consecutive rows)."""
  if bits == 3:
    return qweight.reshape(qweight.shape[0] // 3, 3, qweight.shape[1])
  return qweight


def accumulate(acc, x_ref, tile: Tile, k0, width: int, k: int, w, *, gemv: bool, dtype,
               scale=None):
  """``acc += x[:, k0:k0+width] @ w (* scale)``; ``w`` is ``[width, bn]`` (ints or floats).

  ``gemv``: per activation row, an elementwise multiply and a reduction over K in float32 (no MMA,
  no zero-padded rows). Otherwise one ``dot`` in the activation dtype with float32 accumulation.
  ``scale`` ``[1, bn]`` multiplies the partial product (the per-group scale, applied once per
  output tile instead of once per weight element).
  """
  if gemv:
    wf = w.astype(jnp.float32)
    for i in range(tile.bm):
      ok = ((k0 + iota(width)) < k)[None, :] & (tile.row0 + i < tile.m)
      xi = plt.load(x_ref.at[pl.ds(i, 1), pl.ds(k0, width)], mask=ok, other=0)
      part = jnp.sum(xi.astype(jnp.float32).reshape(width, 1) * wf, axis=0)[None, :]  # [1, bn]
      if scale is not None:
        part = part * scale
      acc = acc + jnp.where(iota(tile.bm, (tile.bm, 1), 0) == i, part, 0.0)
    return acc
  xk = load_x(x_ref, tile, k0, width, k, dtype)
  part = jnp.dot(xk, w.astype(dtype), preferred_element_type=jnp.float32)
  if scale is not None:
    part = part * scale
  return acc + part


def adapter_epilogue(acc, xa_ref, b_ref, tile: Tile, rank: int, *, gemv: bool, dtype):
  """``acc += xa @ b`` for the ``[bm, bn]`` output tile (``xa = x @ a [M, r]``, ``b [r, bn]``)."""
  rp = next_pow2(rank) if gemv else max(MIN_DOT, next_pow2(rank))
  r_ok = iota(rp) < rank
  bt = plt.load(b_ref.at[pl.ds(0, rp), :], mask=r_ok[:, None] & tile.col_ok[None, :], other=0)
  if gemv:
    bf = bt.astype(jnp.float32)
    for i in range(tile.bm):
      ok = r_ok[None, :] & (tile.row0 + i < tile.m)
      xi = plt.load(xa_ref.at[pl.ds(i, 1), pl.ds(0, rp)], mask=ok, other=0)
      part = jnp.sum(xi.astype(jnp.float32).reshape(rp, 1) * bf, axis=0)[None, :]
      acc = acc + jnp.where(iota(tile.bm, (tile.bm, 1), 0) == i, part, 0.0)
    return acc
  ok = tile.row_ok[:, None] & r_ok[None, :]
  xa = plt.load(xa_ref.at[:, pl.ds(0, rp)], mask=ok, other=0).astype(dtype)
  return acc + jnp.dot(xa, bt.astype(dtype), preferred_element_type=jnp.float32)


def store(o_ref, acc, tile: Tile):
  ok = tile.row_ok[:, None] & tile.col_ok[None, :]
  plt.store(o_ref, acc.astype(o_ref.dtype), mask=ok)


def group_scale_zero(s_ref, z_ref, row, glen: int, num_groups: int, col_ok: jax.Array):
  """Scale (float32) and zero point (int32), each ``[1, bn]``, of the contiguous quantization group
  (``glen`` rows) that holds row ``row`` of the quantized array."""
  gi = jnp.minimum(div(row, glen), num_groups - 1)
  scale = load_row(s_ref, gi, col_ok).astype(jnp.float32)
  zero = load_row(z_ref, gi, col_ok).astype(jnp.int32)
  return scale, zero


def reduce_and_store(step: Callable, tile: Tile, tail_refs, *, steps: int, splits: int, rank: int,
                     gemv: bool, dtype) -> None:
  """Runs this program's K loop, adds the adapter term and stores the output tile.

  Args:
    step: ``acc = step(t, acc)`` for K step ``t`` of the program, ``acc`` ``[bm, bn]`` float32.
    tile: the program's tile.
    tail_refs: the refs after the weight's: ``[xa_ref, b_ref, o_ref]`` with an adapter (``rank >
      0``), else ``[o_ref]``.
    steps, splits, rank, gemv, dtype: as passed to the kernel by :func:`launch`.
  """
  *adapter_refs, o_ref = tail_refs
  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((tile.bm, tile.bn), jnp.float32))
  if rank:
    xa_ref, b_ref = adapter_refs
    epilogue = functools.partial(adapter_epilogue, xa_ref=xa_ref, b_ref=b_ref, tile=tile,
                                 rank=rank, gemv=gemv, dtype=dtype)
    if splits == 1:
      acc = epilogue(acc)
    else:  # the adapter term is added once, by the first K split
      acc = jax.lax.cond(pl.program_id(2) == 0, epilogue, lambda a: a, acc)
  store(o_ref, acc, tile)


def k_plan(k: int, block_k: int, sub: int, split_k: int) -> tuple[int, int, int]:
  """``(bk, steps, splits)``: rows per K step, steps per program, programs along K.

  ``bk`` is ``block_k`` shrunk to the problem (never below ``sub``); ``splits`` is ``split_k``
  reduced so that no program gets an empty range.
  """
  bk = max(sub, min(block_k, next_pow2(k)))
  n_steps = -(-k // bk)
  splits = max(1, min(split_k, n_steps))
  steps = -(-n_steps // splits)
  splits = -(-n_steps // steps)
  return bk, steps, splits


def flatten_rows(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  """``[..., in]`` -> ``[M, in]`` and the leading shape."""
  lead = x.shape[:-1]
  return x.reshape(-1, x.shape[-1]), lead


def sub_tile(k: int, block_k: int, unit: int, group_rows: int | None = None,
             error: str = '') -> int:
  """Rows per dot: ``block_k`` shrunk to the problem (never below ``unit``) and, with
  ``group_rows``, to its largest power-of-two divisor, so that a dot never crosses a group.

  Raises ``NotImplementedError(error)`` if a group of ``group_rows`` rows does not hold a whole
  ``unit``.
  """
  cap = max(unit, min(block_k, next_pow2(k)))
  if group_rows is None:
    return cap
  sub = min(cap, largest_pow2_divisor(group_rows))
  if sub < unit:
    raise NotImplementedError(error)
  return sub


# ---------------------------------------------------------------------------------------------
# Call plumbing shared by the kernels' public functions.


def is_quantized_adapter(adapter: formats.LowRank) -> bool:
  return (isinstance(adapter.a, formats.QuantizedWeight)
          or isinstance(adapter.b, formats.QuantizedWeight))


def split_leaf(w, leaf_type: type, name: str):
  """``(weight, adapter)`` of a ``leaf_type`` leaf or a :class:`CompressedLinear` holding one (no
  mask); raises ``NotImplementedError`` naming the implementation ``name`` otherwise."""
  if isinstance(w, formats.CompressedLinear):
    if w.mask is not None:
      raise NotImplementedError(f'{name}: a CompressedLinear with an unstructured mask is '
                                'left to the reference implementation.')
    if not isinstance(w.weight, leaf_type):
      raise NotImplementedError(f'{name}: weight is a {type(w.weight).__name__}, not a '
                                f'{leaf_type.__name__}.')
    return w.weight, w.adapter
  if isinstance(w, leaf_type):
    return w, None
  raise NotImplementedError(
      f'{name} handles {leaf_type.__name__} leaves, got {type(w).__name__}.')


def check_supported(x, w, block: BlockSizes | None, *, leaf_type: type, name: str,
                    weight_desc: Callable[[int], str], sub_tile_fn: Callable,
                    check_weight: Callable | None = None) -> BlockSizes:
  """The support check of a kernel, from shapes and static fields only.

  Raises ``NotImplementedError`` (with ``name``) for what the kernel declines and ``ValueError``
  for inconsistent shapes.

  Args:
    x: activations or ``jax.ShapeDtypeStruct`` ``[..., in]``.
    w: the weight leaf (arrays or ``ShapeDtypeStruct`` leaves): a ``leaf_type`` or a
      :class:`CompressedLinear` holding one.
    block: tile sizes; default :meth:`BlockSizes.for_shape`.
    leaf_type: the weight type the kernel reads.
    name: the implementation's name, for the messages.
    weight_desc: ``in`` -> the weight as named when the activations do not match it.
    sub_tile_fn: ``(weight, block) -> rows per dot``; raises for groups the kernel cannot tile.
    check_weight: further checks of the weight (after the activations', before the adapter's).

  Returns:
    The tile sizes the kernel will use.
  """
  weight, adapter = split_leaf(w, leaf_type, name)
  k, n = weight.shape
  if x.dtype not in ACT_DTYPES:
    raise NotImplementedError(f'{name} needs bf16 or f16 activations, got {x.dtype}.')
  if len(x.shape) < 1 or x.shape[-1] != k:
    raise ValueError(f'activations [..., {x.shape[-1] if x.shape else None}] do not match '
                     f'{weight_desc(k)}.')
  if check_weight is not None:
    check_weight(weight)
  if adapter is not None:
    if is_quantized_adapter(adapter):
      raise NotImplementedError(f'{name} fuses float LowRank adapters only.')
    if adapter.a.shape[0] != k or adapter.b.shape[-1] != n:
      raise ValueError(f'adapter a {adapter.a.shape} / b {adapter.b.shape} does not match the '
                       f'weight {(k, n)}.')
  m = 1
  for d in x.shape[:-1]:
    m *= d
  if m == 0 or n == 0:
    raise NotImplementedError(f'{name}: empty product.')
  if block is None:
    block = BlockSizes.for_shape(m, n, k, gathered=getattr(weight, 'g_idx', None) is not None)
  sub_tile_fn(weight, block)
  return block


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static layout of one kernel call (``[M, K] @ [K, N]``).

  Attributes:
    x2: the activations flattened to ``[M, K]``.
    lead: the leading shape of the activations (``M`` rows in all).
    n: output features.
    block: the tile sizes.
    sub: input rows per dot.
    bk, steps, splits: as returned by :func:`k_plan`.
  """
  x2: jax.Array
  lead: tuple[int, ...]
  n: int
  block: BlockSizes
  sub: int
  bk: int
  steps: int
  splits: int

  @property
  def m(self) -> int:
    return self.x2.shape[0]

  @property
  def k(self) -> int:
    return self.x2.shape[1]

  @property
  def bm(self) -> int:
    return self.block.block_m

  @property
  def bn(self) -> int:
    return self.block.block_n


def plan(x: jax.Array, w, adapter: formats.LowRank | None, block: BlockSizes | None,
         check_fn: Callable, sub_tile_fn: Callable) -> Plan:
  """Checks the call and plans it: flattens ``x`` ``[..., K]``, picks the tiles and the K loop.

  Args:
    x: activations ``[..., K]``.
    w: the weight ``[K, N]`` (the kernel's leaf type).
    adapter: optional low-rank adapter.
    block: tile sizes, or None for the default.
    check_fn: the kernel's ``check_supported(x, leaf, block) -> BlockSizes``.
    sub_tile_fn: ``(w, block) -> rows per dot``.

  Returns:
    The plan.
  """
  leaf = w if adapter is None else formats.CompressedLinear(weight=w, adapter=adapter)
  block = check_fn(x, leaf, block)
  sub = sub_tile_fn(w, block)
  x2, lead = flatten_rows(x)
  bk, steps, splits = k_plan(x2.shape[1], block.block_k, sub, block.split_k)
  return Plan(x2=x2, lead=lead, n=w.shape[1], block=block, sub=sub, bk=bk, steps=steps,
              splits=splits)


def column_spec(rows: int, bn: int, planes: int | None = None) -> pl.BlockSpec:
  """All ``rows`` of a ``[rows, N]`` (or ``[rows, planes, N]``) array, the program's ``bn``
  columns."""
  if planes is None:
    return pl.BlockSpec((rows, bn), lambda i, j, s: (0, i))
  return pl.BlockSpec((rows, planes, bn), lambda i, j, s: (0, 0, i))


def quantized_operands(w: formats.QuantizedWeight, bn: int) -> tuple[list, list, dict]:
  """The packed codes (:func:`packed_view`), scales and zeros of ``w``, their ``BlockSpec``s, and
  the kernel's static parameters for them (``bits``, ``glen``, ``num_groups``, ``packed_rows``)."""
  q = packed_view(w.qweight, w.bits)
  groups = w.scales.shape[0]
  specs = [column_spec(q.shape[0], bn, 3 if w.bits == 3 else None),
           column_spec(groups, bn), column_spec(groups, bn)]
  params = dict(bits=w.bits, glen=w.spec.group_len(w.in_features), num_groups=groups,
                packed_rows=q.shape[0])
  return [q, w.scales, w.zeros], specs, params


def launch(kernel: Callable, p: Plan, operands: list, specs: list,
           adapter: formats.LowRank | None, *, name: str, interpret: bool, **params) -> jax.Array:
  """Runs ``kernel`` on the grid ``(cdiv(N, bn), cdiv(M, bm), splits)``; returns ``[..., N]``.

  The kernel's refs are ``x [bm, K]``, then ``operands`` (the weight's, with ``specs``), then, with
  an adapter, ``xa = x @ a`` ``[bm, r]`` and ``b [r, bn]``, then the output tile (float32 partial
  sums ``[splits, M, N]`` when K is split, added here). Its static keywords are ``m, n, k, bk, sub,
  steps, splits, rank, gemv, bm, bn, dtype`` and ``params``.
  """
  m, k, n, bm, bn = p.m, p.k, p.n, p.bm, p.bn
  dtype = p.x2.dtype
  operands = [p.x2, *operands]
  specs = [pl.BlockSpec((bm, k), lambda i, j, s: (j, 0)), *specs]
  rank = 0
  if adapter is not None:
    rank = adapter.a.shape[1]
    xa = jnp.dot(p.x2, adapter.a.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    operands += [xa, adapter.b]
    specs += [pl.BlockSpec((bm, rank), lambda i, j, s: (j, 0)), column_spec(rank, bn)]
  if p.splits == 1:
    out_shape = jax.ShapeDtypeStruct((m, n), dtype)
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (j, i))
  else:
    out_shape = jax.ShapeDtypeStruct((p.splits, m, n), jnp.float32)
    out_spec = pl.BlockSpec((pl.squeezed, bm, bn), lambda i, j, s: (s, j, i))
  kernel = functools.partial(
      kernel, m=m, n=n, k=k, bk=p.bk, sub=p.sub, steps=p.steps, splits=p.splits, rank=rank,
      gemv=p.block.gemv, bm=bm, bn=bn, dtype=dtype, **params)
  grid = (pl.cdiv(n, bn), pl.cdiv(m, bm), p.splits)
  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=specs, out_specs=out_spec,
      compiler_params=compiler_params(p.block), interpret=interpret, name=name)(*operands)
  if p.splits > 1:
    out = out.sum(axis=0).astype(dtype)
  return out.reshape(*p.lead, n)


def linear_with_adapter(matmul: Callable, x: jax.Array, w, adapter: formats.LowRank | None, *,
                        block: BlockSizes | None, interpret: bool) -> jax.Array:
  """``matmul(x, w, adapter)`` with a float adapter fused; a quantized adapter runs through the
  reference, outside the kernel."""
  if adapter is not None and is_quantized_adapter(adapter):
    y = matmul(x, w, block=block, interpret=interpret)
    return y + reference.linear(reference.linear(x, adapter.a), adapter.b)
  return matmul(x, w, adapter, block=block, interpret=interpret)
