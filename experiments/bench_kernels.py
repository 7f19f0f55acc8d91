r"""Kernel benchmark: low-bit and 2:4 matmuls against bf16 ``jnp.dot``, and end-to-end decode speed.

  python -m experiments.bench_kernels --out_dir=results/bench_kernels
  python -m experiments.bench_kernels --sections=kernels --shapes=4096x4096 --sweep=w4g128 --out_dir=DIR
  python -m experiments.bench_kernels --sections=kernels --write_tuning=DIR/tuning_table.json ...
  python -m experiments.bench_kernels --quick --out_dir=results/bench_quick   # CPU, interpret mode

Side by side in one run, per (format, shape, M): the Pallas kernel, the ``'xla'`` path
(dequantize the whole matrix into bf16, then the dense dot; ``--with_xla``, on by default),
tokamax's quantized matmul where tokamax and qwix import (``--with_tokamax``; skipped with the
reason otherwise), and the bf16 dot. ``dispatch_impl`` is what ``kernels.linear`` picks with the
current tuning table (:mod:`kernels.tuning`) and ``dispatch_vs_bf16`` its measured speed.
``--write_tuning=PATH`` writes a tuning table whose section for this device holds the measured
winners (kernel with its best swept tiles, or xla), keeping the other devices' sections of the
table already at PATH (or of the shipped one). ``experiments/gpu_kernels.sh`` runs the GPU tests,
the sweep that writes the table, this benchmark and the end-to-end section in one go.

Measured on 1xH100 (``results/bench_kernels_h100``): about 2 min per shape for the kernel section
(8 formats x 5 M, each a Triton compile plus timing; the 8192x28672 shape needs more), and about
1.5 min for ``--sections=e2e --e2e_models=llama3-8b-random --e2e_layers=8``; run one shape per
invocation (``--shapes``) to stay under a 10-minute limit. A point whose tiles do not compile
(e.g. over the shared-memory limit) is reported with its ``error`` and the run goes on. ``--quick``
runs tiny shapes through the kernels in Pallas interpret mode on the CPU in well under a minute
(the timings then say nothing about GPU speed; it checks the script end to end).

Anchors (targets on an H100, from the kernel issue): W4A16 >= 3.0x bf16 at M = 1 and >= 2.5x at
M = 16 on the Llama-3-8B shapes; >= 70% of the measured device-to-device copy bandwidth at M = 1;
2:4 + int4 >= 4.5x at M = 1 (the uint8 index storage of ``Sparse24Weight`` caps this near 2.6x, see
``kernels/sparse24_pallas.py``); never below 0.9x bf16 at M = 256; a fused rank-64 adapter costs
<= 15% over the kernel alone. ``results.json`` lists each target with the measured value.

Method: each timed call runs over several distinct copies of the weight (together more than
``--rotate_mb``, so the 50 MB L2 of an H100 cannot serve repeats) inside one jitted executable, is
warmed up (compile + one run), then repeated until ``--target_ms`` per trial and synchronised with
``block_until_ready``; the median of ``--trials`` trials is reported per call. Bandwidth counts the
bytes a call must move (packed weights, scales, zeros, indices, adapter, activations, output);
TFLOP/s counts the dense-equivalent ``2 M K N`` (+ the adapter). The copy bandwidth is a
``jnp.copy`` of ``--copy_mb`` MB, read + write, measured in the same run.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import time
import types
from typing import Any, Callable, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

import kernels
from compress import quantize
from experiments import common
from kernels import api, formats, layouts, lowbit_pallas, reference, sparse24_pallas, tuning
from kernels.formats import LowRank, QuantizedWeight, QuantSpec, Sparse24Weight
from kernels.pallas_common import BlockSizes
from models import assets, llama, loading
from models import config as config_lib
from models.config import ModelConfig

# Llama-3-8B (q/o, gate/up, down) and Llama-3-70B (gate/up) linears as [in, out].
LLAMA_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))
LLAMA3_8B_SHAPES = LLAMA_SHAPES[:3]
MS = (1, 4, 16, 64, 256)
# name -> kind, bits, group size (of the dense weight), act-order, adapter rank.
FORMATS: dict[str, dict[str, Any]] = {
    'w4g128': dict(kind='lowbit', bits=4, group=128),
    'w3g128': dict(kind='lowbit', bits=3, group=128),
    'w2g64': dict(kind='lowbit', bits=2, group=64),
    'w8g128': dict(kind='lowbit', bits=8, group=128),
    'w4g128_act': dict(kind='lowbit', bits=4, group=128, act_order=True),
    'w4g128_act_perm': dict(kind='lowbit', bits=4, group=128, act_order=True, serving=True),
    'w4g128_lora64': dict(kind='lowbit', bits=4, group=128, rank=64),
    's24_bf16': dict(kind='sparse24'),
    's24_w4g128': dict(kind='sparse24', bits=4, group=128),
}
QUICK_SHAPES = ((256, 192),)
QUICK_MS = (1, 17)
QUICK_FORMATS = ('w4g128', 'w4g128_lora64', 'w4g128_act_perm', 's24_w4g128')
L2_BYTES_H100 = 50 * 2 ** 20
LLAMA3_8B = ModelConfig(model_type='llama', vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                        head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                        max_position_embeddings=8192)



# ----------------------------------------------------------------------------------------------
# Timing


def time_calls(fn: Callable, x: jax.Array, weights: Sequence[Any], *, trials: int,
               target_s: float) -> tuple[float, Any]:
  """Median seconds per ``fn(x, w)`` call and the first call's output.

  All ``weights`` run in one jitted executable (back-to-back launches, no host round trips); the
  executable is warmed up (compile + one run), then repeated until ``target_s`` per trial.
  """
  many = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
  first = jax.block_until_ready(many(x, weights))  # compile + first run
  t0 = time.perf_counter()
  jax.block_until_ready(many(x, weights))
  once = max(time.perf_counter() - t0, 1e-7)
  reps = max(1, min(10_000, int(target_s / once)))
  samples = []
  for _ in range(trials):
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
      out = many(x, weights)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / (reps * len(weights)))
  return float(np.median(samples)), first[0]


def copy_bandwidth(nbytes: int, *, trials: int, target_s: float) -> dict[str, float]:
  """Device-to-device copy bandwidth (bytes read + written per second) of an ``nbytes`` array."""
  n = max(1, nbytes // 4)
  a = jax.random.bits(jax.random.key(0), (n,), jnp.uint32)
  t, _ = time_calls(lambda x, _: jnp.copy(x), a, [None], trials=trials, target_s=target_s)
  return {'copy_bytes': 4 * n, 'copy_seconds': t, 'copy_bandwidth_gbs': 2 * 4 * n / t / 1e9}


# ----------------------------------------------------------------------------------------------
# Random weights (on the device, never zeros)

_PAIRS = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], np.uint8)


def random_quantized(key, k: int, n: int, bits: int, group: int,
                     act_order: bool = False) -> QuantizedWeight:
  """Random codes (random packed words), scales and zero points ``[k, n]``."""
  kq, ks, kz, kg = jax.random.split(key, 4)
  rows = -(-k // 32) * bits
  qweight = jax.lax.bitcast_convert_type(jax.random.bits(kq, (rows, n), jnp.uint32), jnp.int32)
  spec = QuantSpec(bits=bits, group_size=group)
  groups, glen = spec.num_groups(k), spec.group_len(k)
  scales = jax.random.uniform(ks, (groups, n), jnp.float32, 0.5, 1.5) / 2 ** bits
  zeros = jax.random.randint(kz, (groups, n), 0, 2 ** bits).astype(jnp.uint8)
  g_idx = None
  if act_order:
    g_idx = jax.random.permutation(kg, jnp.arange(k, dtype=jnp.int32) // glen)
  return QuantizedWeight(qweight=qweight, scales=scales, zeros=zeros, g_idx=g_idx, bits=bits,
                         group_size=group, in_features=k, symmetric=False)


def random_sparse24(key, k: int, n: int, bits: int | None, group: int) -> Sparse24Weight:
  ki, kv = jax.random.split(key)
  pick = jax.random.randint(ki, (k // 4, n), 0, 6)
  idx = jnp.asarray(_PAIRS)[pick]  # [k/4, n, 2]
  idx = jnp.transpose(idx, (0, 2, 1)).reshape(k // 2, n)
  if bits is None:
    values = (0.02 * jax.random.normal(kv, (k // 2, n))).astype(jnp.bfloat16)
  else:
    values = random_quantized(kv, k // 2, n, bits, -1 if group == -1 else group // 2)
  return Sparse24Weight(values=values, indices=idx)


def make_leaf(key, fmt: str, k: int, n: int):
  """A random weight leaf of format ``fmt`` (see :data:`FORMATS`)."""
  spec = FORMATS[fmt]
  kw, ka, kb = jax.random.split(key, 3)
  if spec['kind'] == 'lowbit':
    w = random_quantized(kw, k, n, spec['bits'], spec['group'], spec.get('act_order', False))
  else:
    w = random_sparse24(kw, k, n, spec.get('bits'), spec.get('group', -1))
  rank = spec.get('rank', 0)
  if rank:
    adapter = LowRank(a=(0.02 * jax.random.normal(ka, (k, rank))).astype(jnp.bfloat16),
                      b=(0.02 * jax.random.normal(kb, (rank, n))).astype(jnp.bfloat16))
    w = formats.CompressedLinear(weight=w, adapter=adapter)
  if spec.get('serving'):  # the load-time layout: act-order groups made contiguous
    w = layouts.act_order_leaf(w)
  return w


def leaf_bytes(leaf) -> int:
  """Bytes of every array of a leaf (what a call must read)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(leaf)))


def _copies(nbytes: int, rotate_bytes: float, max_copies: int = 32) -> int:
  """Distinct weight copies so that together they exceed ``rotate_bytes`` (the L2 cannot serve
  repeats); capped, since each copy is one more kernel launch in the timed executable."""
  return int(min(max_copies, max(1, math.ceil(rotate_bytes / max(nbytes, 1)))))


# ----------------------------------------------------------------------------------------------
# Kernel section


def _kernel_fn(fmt: str, block: BlockSizes | None, interpret: bool) -> tuple[str, Callable]:
  if FORMATS[fmt]['kind'] == 'lowbit':
    return 'pallas_lowbit', functools.partial(lowbit_pallas.linear, block=block,
                                              interpret=interpret)
  return 'pallas_sparse24', functools.partial(sparse24_pallas.linear, block=block,
                                              interpret=interpret)


def _check_fn(fmt: str):
  return lowbit_pallas.check_supported if FORMATS[fmt]['kind'] == 'lowbit' else (
      sparse24_pallas.check_supported)


def sweep_candidates(m: int) -> list[BlockSizes]:
  """A small grid of tiles around the defaults (for ``--sweep``)."""
  out = []
  if m <= 16:
    gemv = m <= 4
    bm = max(1, 1 << (m - 1).bit_length()) if gemv else 16
    for bn in (32, 64, 128):
      for bk in (128, 256, 512):
        for split in (1, 4):
          out.append(BlockSizes(block_m=bm, block_n=bn, block_k=bk, split_k=split, gemv=gemv,
                                num_warps=4, num_stages=4))
    if gemv:
      out.append(BlockSizes(block_m=16, block_n=64, block_k=256, split_k=4, num_stages=4))
    return out
  for bm in (64, 128):
    for bn in (64, 128, 256):
      for bk in (32, 64):
        out.append(BlockSizes(block_m=min(bm, max(16, 1 << (m - 1).bit_length())), block_n=bn,
                              block_k=bk, num_warps=8 if bm * bn >= 128 * 128 else 4,
                              num_stages=3))
  return list(dict.fromkeys(out))


def _rel_err(y, x, leaf) -> float:
  with jax.default_matmul_precision('highest'):
    ref = reference.linear(x.astype(jnp.float32), leaf)
  y = y.astype(jnp.float32)
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def bench_kernels(*, shapes: Sequence[tuple[int, int]], ms: Sequence[int], fmts: Sequence[str],
                  interpret: bool, with_xla: bool, sweep: Sequence[str], trials: int,
                  target_s: float, rotate_bytes: float, copy_bw: float, seed: int,
                  with_tokamax: bool = False) -> list[dict[str, Any]]:
  """One row per (format, shape, M): kernel time, bandwidth, TFLOP/s, speedup over bf16; the
  ``'xla'`` dequantize-then-dot time (``with_xla``) and tokamax's (``with_tokamax``, where it
  imports) beside it; what the tuning table dispatches to and how fast that is."""
  rows = []
  key = jax.random.key(seed)
  tokamax_mm, tokamax_why = tokamax_matmul() if with_tokamax else (None, 'not requested')
  for k, n in shapes:
    dense_bytes = k * n * 2
    n_dense = _copies(dense_bytes, rotate_bytes)
    key, sub = jax.random.split(key)
    dense = [(0.02 * jax.random.normal(kk, (k, n))).astype(jnp.bfloat16)
             for kk in jax.random.split(sub, n_dense)]
    bf16_us = {}
    for m in ms:
      x = (jax.random.normal(jax.random.fold_in(sub, m), (m, k))).astype(jnp.bfloat16)
      bf16_us[m] = 1e6 * time_calls(jnp.dot, x, dense, trials=trials, target_s=target_s)[0]
    del dense
    for fmt in fmts:
      key, sub = jax.random.split(key)
      first = make_leaf(sub, fmt, k, n)
      nbytes = leaf_bytes(first)
      leaves = [first] + [make_leaf(kk, fmt, k, n)
                          for kk in jax.random.split(sub, _copies(nbytes, rotate_bytes))[1:]]
      for m in ms:
        x = (jax.random.normal(jax.random.fold_in(sub, m), (m, k))).astype(jnp.bfloat16)
        row: dict[str, Any] = {'format': fmt, 'shape': f'{k}x{n}', 'K': k, 'N': n, 'M': m}
        try:
          block = _check_fn(fmt)(x, first)
        except NotImplementedError as e:
          row['skipped'] = str(e)
          rows.append(row)
          continue
        impl, fn = _kernel_fn(fmt, None, interpret)
        with api.interpret_mode(interpret), api.recording() as log:
          jax.eval_shape(kernels.linear, x, first)
        choice = tuning.choose(x, first)
        row.update(impl=impl, default_impl=log[-1] if log else None, block=_block_str(block),
                   format_key=tuning.format_key(first), dispatch_impl=choice.impl,
                   dispatch_source=choice.source)
        try:
          seconds, y = time_calls(fn, x, leaves, trials=trials, target_s=target_s)
        except jax.errors.JaxRuntimeError as e:  # e.g. tiles over the shared-memory limit
          seconds, row['error'] = None, _first_line(e)
        if seconds is not None:
          io_bytes = nbytes + x.size * 2 + m * n * 2
          rank = FORMATS[fmt].get('rank', 0)
          flops = 2 * m * k * n + 2 * m * rank * (k + n)
          row.update(
              copies=len(leaves), time_us=1e6 * seconds, bytes=io_bytes,
              bandwidth_gbs=io_bytes / seconds / 1e9,
              pct_copy_bw=100.0 * io_bytes / seconds / 1e9 / copy_bw,
              tflops=flops / seconds / 1e12, bf16_us=bf16_us[m],
              speedup_vs_bf16=bf16_us[m] / (1e6 * seconds),
              rel_err=_rel_err(y, x, first))
        if with_xla:
          xla_s, _ = time_calls(reference.linear, x, leaves, trials=trials, target_s=target_s)
          row.update(xla_us=1e6 * xla_s, xla_vs_bf16=bf16_us[m] / (1e6 * xla_s))
          if seconds is not None:
            row['speedup_vs_xla'] = xla_s / seconds
        if tokamax_mm is not None:
          row.update(_time_tokamax(tokamax_mm, fmt, x, leaves, trials=trials, target_s=target_s,
                                   bf16_us=bf16_us[m]))
        elif with_tokamax:
          row['tokamax_skipped'] = tokamax_why
        if fmt in sweep:
          row.update(_sweep(fmt, x, first, leaves, m, seconds, interpret=interpret,
                            trials=trials, target_s=target_s, bf16_us=bf16_us[m]))
        _dispatch_time(row)
        logging.info('%s', row)
        rows.append(row)
      del leaves, first
  _adapter_overhead(rows)
  return rows


def _dispatch_time(row: dict[str, Any]) -> None:
  """``dispatch_us``/``dispatch_vs_bf16``: the measured time of what the table dispatches to."""
  t = row.get('xla_us') if row.get('dispatch_impl') == 'xla' else (
      row.get('time_us') if row.get('dispatch_impl') == row.get('impl') else None)
  if t is not None and row.get('bf16_us'):
    row.update(dispatch_us=t, dispatch_vs_bf16=row['bf16_us'] / t)


def tokamax_matmul() -> tuple[Any, str]:
  """``(ops, '')`` with ``ops.matmul(x, qarray) -> y`` tokamax's quantized matmul
  (``tokamax.ragged_dot`` with one group of all rows over a qwix-quantized right-hand side) and
  ``ops.quantize`` qwix's, or ``(None, reason)`` where they do not import."""
  try:
    import qwix  # pylint: disable=g-import-not-at-top
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f'not installed ({e.name})'
  if not hasattr(tokamax, 'ragged_dot') or not hasattr(qwix, 'quantize'):
    return None, 'this tokamax/qwix has no ragged_dot/quantize'

  def fn(x, q):
    return tokamax.ragged_dot(x, q, group_sizes=jnp.asarray([x.shape[0]], jnp.int32))
  return types.SimpleNamespace(matmul=fn, quantize=qwix.quantize), ''


def _time_tokamax(ops, fmt: str, x, leaves, *, trials: int, target_s: float,
                  bf16_us: float) -> dict[str, Any]:
  """Times tokamax on the benchmark's weights re-quantized by qwix (same bits, tiled by the
  group along K); any failure is reported as ``tokamax_skipped`` (first line), never raised."""
  spec = FORMATS[fmt]
  if spec['kind'] != 'lowbit' or spec.get('rank') or spec['bits'] not in (4, 8):
    return {'tokamax_skipped': 'format not comparable (int4/int8 without adapter only)'}
  try:
    qtype = jnp.int4 if spec['bits'] == 4 else jnp.int8
    qs = [ops.quantize(formats.to_dense(w, jnp.bfloat16)[None], qtype,
                           channelwise_axes=(2,), tiled_axes={1: spec['group']})
          for w in leaves]
    t, _ = time_calls(ops.matmul, x, qs, trials=trials, target_s=target_s)
  except Exception as e:  # pylint: disable=broad-except  # an optional, moving dependency
    return {'tokamax_skipped': _first_line(e) or type(e).__name__}
  return {'tokamax_us': 1e6 * t, 'tokamax_vs_bf16': bf16_us / (1e6 * t)}


def _sweep(fmt: str, x, first, leaves, m: int, default_s: float | None, *, interpret: bool,
           trials: int, target_s: float, bf16_us: float) -> dict[str, Any]:
  """Times every :func:`sweep_candidates` tile (those that compile) against the default."""
  best = (math.inf, None) if default_s is None else (default_s, 'default')
  failed = 0
  for cand in sweep_candidates(m):
    try:
      _check_fn(fmt)(x, first, cand)
    except NotImplementedError:
      continue
    _, cfn = _kernel_fn(fmt, cand, interpret)
    try:
      t, _ = time_calls(cfn, x, leaves, trials=trials, target_s=target_s)
    except jax.errors.JaxRuntimeError as e:
      logging.warning('%s %s: %s', fmt, _block_str(cand), _first_line(e))
      failed += 1
      continue
    best = min(best, (t, _block_str(cand)))
  if best[1] is None:
    return {'sweep_failed': failed}
  return {'sweep_best_us': 1e6 * best[0], 'sweep_best_block': best[1],
          'sweep_speedup_vs_bf16': bf16_us / (1e6 * best[0]), 'sweep_failed': failed}


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0][:200]


def _block_str(b: BlockSizes) -> str:
  return (f'm{b.block_m}n{b.block_n}k{b.block_k}s{b.split_k}{"g" if b.gemv else ""}'
          f'w{b.num_warps}p{b.num_stages}')


def _adapter_overhead(rows: list[dict[str, Any]]) -> None:
  base = {(r['shape'], r['M']): r['time_us'] for r in rows
          if r['format'] == 'w4g128' and 'time_us' in r}
  for r in rows:
    if r['format'] == 'w4g128_lora64' and 'time_us' in r and (r['shape'], r['M']) in base:
      r['adapter_overhead_pct'] = 100.0 * (r['time_us'] / base[(r['shape'], r['M'])] - 1.0)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The issue's anchors against the measured rows (only those the rows cover)."""
  shapes8b = {f'{k}x{n}' for k, n in LLAMA3_8B_SHAPES}

  def pick(fmt, m, key, shapes=shapes8b):
    vals = [r[key] for r in rows if r['format'] == fmt and r['M'] == m and r['shape'] in shapes
            and key in r]
    return min(vals) if vals else None

  checks = [
      ('W4A16 speedup over bf16, M=1, Llama-3-8B shapes (min)', pick('w4g128', 1,
                                                                     'speedup_vs_bf16'), 3.0),
      ('W4A16 speedup over bf16, M=16, Llama-3-8B shapes (min)', pick('w4g128', 16,
                                                                      'speedup_vs_bf16'), 2.5),
      ('W4A16 % of copy bandwidth, M=1, Llama-3-8B shapes (min)', pick('w4g128', 1,
                                                                       'pct_copy_bw'), 70.0),
      ('2:4+int4 speedup over bf16, M=1, Llama-3-8B shapes (min)', pick('s24_w4g128', 1,
                                                                        'speedup_vs_bf16'), 4.5),
  ]
  at256 = [r['speedup_vs_bf16'] for r in rows if r['M'] == 256 and 'speedup_vs_bf16' in r]
  checks.append(('kernel speedup over bf16 at M=256, any format/shape (min)',
                 min(at256) if at256 else None, 0.9))
  over = [r['adapter_overhead_pct'] for r in rows if 'adapter_overhead_pct' in r]
  out = [{'target': name, 'threshold': thr, 'measured': val,
          'met': None if val is None else bool(val >= thr)} for name, val, thr in checks]
  out.append({'target': 'rank-64 adapter overhead % over the kernel alone (max)', 'threshold': 15.0,
              'measured': max(over) if over else None,
              'met': None if not over else bool(max(over) <= 15.0)})
  return out


# ----------------------------------------------------------------------------------------------
# End-to-end decode


def group_for(in_features: int, preferred: int = 128) -> int:
  """The largest of preferred, preferred/2, ... >= 32 that divides ``in_features`` (else -1)."""
  g = preferred
  while g >= 32:
    if in_features % g == 0:
      return g
    g //= 2
  return -1


def quantize_linears(params, *, bits: int = 4, group: int = 128):
  """RTN-quantizes every block linear in place of its ``kernel`` leaf (one matrix at a time: the
  float32 copy of a single weight is the only temporary). The LM head and embeddings stay dense."""
  rtn = jax.jit(quantize.rtn, static_argnames='spec')
  layers = []
  for block in params['layers']:
    new_block = dict(block)
    for part, names in (('self_attn', ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
                        ('mlp', ('gate_proj', 'up_proj', 'down_proj'))):
      sub = dict(block[part])
      for name in names:
        lin = dict(sub[name])
        w = lin['kernel']
        spec = QuantSpec(bits=bits, group_size=group_for(w.shape[0], group))
        lin['kernel'] = formats.CompressedLinear(weight=rtn(w, spec=spec))
        sub[name] = lin
      new_block[part] = sub
    layers.append(new_block)
  return {**params, 'layers': layers}


def _model_bytes(params) -> int:
  total = 0
  for leaf in jax.tree.leaves(params, is_leaf=formats.is_weight_leaf):
    total += leaf_bytes(leaf)
  return total


def decode_tokens_per_s(params, cfg: ModelConfig, *, batch: int, prompt_len: int, new_tokens: int,
                        dtype, trials: int, seed: int = 0,
                        subtract_prefill: bool = True) -> dict[str, Any]:
  """Greedy decode tokens/s: ``batch * (n - 1) / (time(generate(n)) - time(generate(1)))``.

  ``subtract_prefill=False`` (quick runs: one compile fewer) counts the whole ``generate(n)``.
  """
  prompt = jax.random.randint(jax.random.key(seed), (batch, prompt_len), 0, cfg.vocab_size)
  gen_n = jax.jit(functools.partial(llama.generate, cfg=cfg, max_new_tokens=new_tokens,
                                    dtype=dtype))
  gen_1 = jax.jit(functools.partial(llama.generate, cfg=cfg, max_new_tokens=1, dtype=dtype))
  with api.recording() as log:
    jax.block_until_ready(gen_n(params, prompt))

  def timed(f):
    samples = []
    for _ in range(trials):
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, prompt))
      samples.append(time.perf_counter() - t0)
    return float(np.median(samples))

  t_n = timed(gen_n)
  if subtract_prefill:
    jax.block_until_ready(gen_1(params, prompt))
    t_1 = timed(gen_1)
    tokens, seconds = batch * (new_tokens - 1), max(t_n - t_1, 1e-9)
  else:
    t_1, tokens, seconds = None, batch * new_tokens, t_n
  return {'tokens_per_s': tokens / seconds, 'generate_s': t_n, 'prefill_s': t_1,
          'implementations': dict(collections.Counter(log))}


def prefill_tokens_per_s(params, cfg: ModelConfig, *, batch: int, length: int, dtype, trials: int,
                         seed: int = 0) -> dict[str, Any]:
  """Prefill throughput: ``batch * length`` tokens through the jitted forward (logits of every
  position), median of ``trials``; and the implementations its linears dispatched to."""
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, length), 0, cfg.vocab_size)
  fwd = jax.jit(functools.partial(llama.forward, cfg=cfg, dtype=dtype))
  with api.recording() as log:
    jax.block_until_ready(fwd(params, tokens))
  samples = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(params, tokens))
    samples.append(time.perf_counter() - t0)
  seconds = float(np.median(samples))
  return {'prefill_tokens_per_s': batch * length / seconds, 'prefill_forward_s': seconds,
          'prefill_implementations': dict(collections.Counter(log))}


def _load_e2e_model(name: str, seed: int, layers: int | None):
  if name == 'llama3-8b-random':
    cfg = LLAMA3_8B if layers is None else ModelConfig(
        **{**LLAMA3_8B.to_dict(), 'num_layers': layers})
    return cfg, llama.init_params(cfg, jax.random.key(seed), jnp.bfloat16)
  if name == 'tiny-llama' and layers is not None:
    cfg = config_lib.tiny_config(num_layers=layers)
    return cfg, llama.init_params(cfg, jax.random.key(seed), jnp.float32)
  loaded = loading.load_model(name, dtype=jnp.float32, seed=seed)
  return loaded.config, loaded.params


def bench_e2e(*, models: Sequence[str], batch: int, prompt_len: int, new_tokens: int, trials: int,
              seed: int, layers: int | None, subtract_prefill: bool = True,
              prefill_len: int = 0) -> list[dict[str, Any]]:
  """bf16 vs 4-bit RTN (g128 where it divides the input, else g64/g32) decode tokens/s, and with
  ``prefill_len`` > 0 prefill tokens/s of ``batch x prefill_len`` tokens, through the model code
  with the default dispatch (kernels where the tuning table picks them)."""
  rows = []
  for name in models:
    if name == 'llama3-8b-random' and jax.default_backend() == 'cpu':
      rows.append({'model': name, 'skipped': 'needs a GPU (16 GB of bf16 weights)'})
      continue
    try:
      cfg, params = _load_e2e_model(name, seed, layers)
    except (assets.AssetError, OSError) as e:  # e.g. no network on the benchmark machine
      rows.append({'model': name, 'skipped': f'could not load: {e}'})
      continue
    params = llama.cast_params(params, jnp.bfloat16)
    kw = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, dtype=jnp.bfloat16,
              trials=trials, seed=seed, subtract_prefill=subtract_prefill)
    pkw = dict(batch=batch, length=prefill_len, dtype=jnp.bfloat16, trials=trials, seed=seed)
    dense = decode_tokens_per_s(params, cfg, **kw)
    if prefill_len:
      dense.update(prefill_tokens_per_s(params, cfg, **pkw))
    dense_bytes = _model_bytes(params)
    params = llama.cast_params(quantize_linears(params), jnp.bfloat16)
    comp = decode_tokens_per_s(params, cfg, **kw)
    if prefill_len:
      comp.update(prefill_tokens_per_s(params, cfg, **pkw))
    comp_bytes = _model_bytes(params)
    del params
    for variant, r, nbytes in (('bf16', dense, dense_bytes), ('w4 rtn', comp, comp_bytes)):
      row = {'model': name, 'variant': variant, 'layers': cfg.num_layers, 'batch': batch,
             'new_tokens': new_tokens, 'tokens_per_s': r['tokens_per_s'],
             'speedup_vs_bf16': r['tokens_per_s'] / dense['tokens_per_s'],
             'weight_gb': nbytes / 1e9, 'generate_s': r['generate_s'],
             'prefill_s': r['prefill_s'], 'implementations': r['implementations']}
      if prefill_len:
        row.update(prefill_len=prefill_len, prefill_tokens_per_s=r['prefill_tokens_per_s'],
                   prefill_vs_bf16=r['prefill_tokens_per_s'] / dense['prefill_tokens_per_s'],
                   prefill_implementations=r['prefill_implementations'])
      rows.append(row)
    logging.info('%s', rows[-2:])
  return rows


# ----------------------------------------------------------------------------------------------


def write_tuning_table(path: str, rows: Sequence[dict[str, Any]], device: str) -> str:
  """Writes the tuning table of ``rows``' winners for this device kind to ``path``, keeping the
  other devices' sections of the table at ``path`` (else of the shipped table). Returns ``path``."""
  if os.path.exists(path):
    base = tuning.load_table(path)  # a malformed table is reported, never overwritten
  elif tuning.SHIPPED_TABLE.exists():
    base = tuning.load_table(tuning.SHIPPED_TABLE)
  else:
    base = None
  table = tuning.table_from_rows(rows, tuning.device_kind(),
                                 source=f'experiments/bench_kernels.py on {device}', base=base)
  tuning.write_table(path, table)
  return path


def parse_shapes(values: Sequence[str]) -> list[tuple[int, int]]:
  out = []
  for v in values:
    try:
      k, n = (int(t) for t in v.lower().split('x'))
    except ValueError:
      raise ValueError(f'bad shape {v!r}; write INxOUT, e.g. 4096x14336') from None
    out.append((k, n))
  return out


def run(*, out_dir: str | None = None, quick: bool = False,
        sections: Sequence[str] = ('kernels', 'e2e'),
        shapes: Sequence[tuple[int, int]] | None = None, ms: Sequence[int] | None = None,
        fmts: Sequence[str] | None = None, with_xla: bool = True, with_tokamax: bool = True,
        sweep: Sequence[str] = (), write_tuning: str | None = None,
        e2e_models: Sequence[str] | None = None, e2e_layers: int | None = None, batch: int = 1,
        prompt_len: int = 16, new_tokens: int = 64, prefill_len: int = 512, trials: int = 5,
        target_ms: float = 50.0, rotate_mb: float = 4 * L2_BYTES_H100 / 2 ** 20,
        copy_mb: float = 1024.0, seed: int = 0,
        flag_values: dict[str, Any] | None = None) -> dict[str, Any]:
  """All logic (reads no FLAGS). Returns the results dict (and writes it when ``out_dir``).

  ``shapes``/``ms``/``fmts``/``e2e_models`` default to the Llama shapes, :data:`MS`, every format
  and (SmolLM2, random Llama-3-8B); with ``quick`` to tiny shapes, M in (1, 17), the
  :data:`QUICK_FORMATS` and a one-layer tiny-llama, with one short timing trial and a 16-token
  prefill. Off-GPU the kernels run in interpret mode. ``write_tuning``: write the tuning table of
  this device's measured winners there (:func:`kernels.tuning.table_from_rows`).
  """
  pick = lambda given, default: default if given is None else given
  if quick:
    shapes, ms = pick(shapes, QUICK_SHAPES), pick(ms, QUICK_MS)
    fmts, e2e_models = pick(fmts, QUICK_FORMATS), pick(e2e_models, ('tiny-llama',))
    trials, target_ms, copy_mb, rotate_mb = 1, 1.0, 8.0, 0.0
    new_tokens, prompt_len = min(new_tokens, 4), min(prompt_len, 4)
    prefill_len = min(prefill_len, 16)
    e2e_layers = 1 if e2e_layers is None else e2e_layers
  else:
    shapes, ms = pick(shapes, LLAMA_SHAPES), pick(ms, MS)
    fmts = pick(fmts, tuple(FORMATS))
    e2e_models = pick(e2e_models, ('smollm2-135m', 'llama3-8b-random'))
  unknown = [f for f in fmts if f not in FORMATS]
  if unknown:
    raise ValueError(f'unknown formats {unknown}; choose from {sorted(FORMATS)}')
  bad = [s for s in sections if s not in ('kernels', 'e2e')]
  if bad:
    raise ValueError(f'unknown sections {bad}; choose kernels and/or e2e')
  on_gpu = jax.default_backend() == 'gpu'
  interpret = not on_gpu
  if not on_gpu and not quick:
    logging.warning('no GPU: kernels run in interpret mode; timings are not GPU timings')
  device = jax.devices()[0]
  results: dict[str, Any] = {
      'device': f'{device.platform}: {getattr(device, "device_kind", str(device))}',
      'interpret': interpret, 'quick': quick,
      'config': {'shapes': [f'{k}x{n}' for k, n in shapes], 'ms': list(ms), 'formats': list(fmts),
                 'e2e_models': list(e2e_models), 'sections': list(sections)}}
  bw = copy_bandwidth(int(copy_mb * 2 ** 20), trials=trials, target_s=target_ms / 1e3)
  results.update(bw)
  rows: list[dict[str, Any]] = []
  t0 = time.perf_counter()
  if 'kernels' in sections:
    rows = bench_kernels(shapes=shapes, ms=ms, fmts=fmts, interpret=interpret, with_xla=with_xla,
                         sweep=sweep, trials=trials, target_s=target_ms / 1e3,
                         rotate_bytes=rotate_mb * 2 ** 20, copy_bw=bw['copy_bandwidth_gbs'],
                         seed=seed, with_tokamax=with_tokamax)
    results['targets'] = targets(rows) if on_gpu else []
    if write_tuning:
      results['tuning_table'] = write_tuning_table(write_tuning, rows, results['device'])
  results['kernels_seconds'] = time.perf_counter() - t0
  e2e: list[dict[str, Any]] = []
  t0 = time.perf_counter()
  if 'e2e' in sections:
    e2e = bench_e2e(models=e2e_models, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                    trials=trials, seed=seed, layers=e2e_layers, subtract_prefill=not quick,
                    prefill_len=prefill_len)
  results['e2e_seconds'] = time.perf_counter() - t0
  results['e2e'] = e2e
  results['rows'] = rows
  if out_dir is not None:
    columns = ['format', 'shape', 'M', 'impl', 'block', 'time_us', 'bf16_us', 'speedup_vs_bf16',
               'xla_us', 'xla_vs_bf16', 'tokamax_us', 'tokamax_vs_bf16', 'dispatch_impl',
               'dispatch_vs_bf16', 'pct_copy_bw', 'bandwidth_gbs', 'tflops', 'rel_err',
               'adapter_overhead_pct', 'sweep_best_us', 'sweep_best_block',
               'sweep_speedup_vs_bf16', 'skipped', 'error']
    columns = [c for c in columns if any(c in r for r in rows)] or None
    title = (f'Kernel benchmark on {results["device"]} (copy bandwidth '
             f'{bw["copy_bandwidth_gbs"]:.0f} GB/s)')
    path = common.write_results(out_dir, {k: v for k, v in results.items() if k != 'rows'},
                                rows=rows, columns=columns, flags=flag_values, title=title)
    if jax.process_index() == 0:
      extra = ''
      if results.get('targets'):
        extra += '\n## Targets\n\n' + common.markdown_table(results['targets'])
      if e2e:
        extra += ('\n## End-to-end decode\n\n'
                  + common.markdown_table(e2e, ['model', 'variant', 'layers', 'batch',
                                                'tokens_per_s', 'speedup_vs_bf16', 'prefill_len',
                                                'prefill_tokens_per_s', 'prefill_vs_bf16',
                                                'weight_gb', 'skipped']))
      if results.get('tuning_table'):
        extra += f'\nTuning table written to `{results["tuning_table"]}`.\n'
      skipped = {r['tokamax_skipped'] for r in rows if 'tokamax_skipped' in r}
      if skipped:
        extra += f'\ntokamax not timed: {"; ".join(sorted(skipped))}.\n'

      with open(path / 'table.md', 'a') as f:
        f.write(extra)
  return results


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so modules import side-effect free)."""
  flags.DEFINE_string('out_dir', None, 'Directory for results.json and table.md.')
  flags.DEFINE_bool('quick', False, 'Tiny shapes, interpret mode on CPU: a smoke run.')
  flags.DEFINE_list('sections', ['kernels', 'e2e'], 'kernels and/or e2e.')
  flags.DEFINE_list('shapes', [f'{k}x{n}' for k, n in LLAMA_SHAPES],
                              'INxOUT weights (--quick: 256x192 unless given).')
  flags.DEFINE_list('ms', [str(m) for m in MS],
                          'Activation rows (tokens) per call (--quick: 1,17 unless given).')
  flags.DEFINE_list('formats', list(FORMATS), f'Weight formats: {sorted(FORMATS)} '
                               f'(--quick: {",".join(QUICK_FORMATS)} unless given).')
  flags.DEFINE_bool('with_xla', True, "Also time the 'xla' path (dequantize, then the dense "
                   'dot) on each leaf.')
  flags.DEFINE_bool('with_tokamax', True, "Also time tokamax's quantized matmul where tokamax "
                    'and qwix import.')
  flags.DEFINE_string('write_tuning', None, 'Write the tuning table of the measured winners for '
                      'this device to this JSON path (other devices kept).')
  flags.DEFINE_list('sweep', [], 'Formats for which to also try a grid of BlockSizes per point '
                   '(the best is reported as sweep_best_us / sweep_best_block).')
  flags.DEFINE_list('e2e_models', ['smollm2-135m', 'llama3-8b-random'],
                                  'Models for decode tokens/s (--quick: tiny-llama unless given).')
  flags.DEFINE_integer('e2e_layers', None, 'Override the layer count of the random '
                                     'Llama-3-8B-shaped model (memory/time).')
  flags.DEFINE_integer('batch', 1, 'Decode batch size.')
  flags.DEFINE_integer('prompt_len', 16, 'Prompt tokens before decoding.')
  flags.DEFINE_integer('new_tokens', 64, 'Decoded tokens per timed generation.')
  flags.DEFINE_integer('prefill_len', 512, 'Tokens per sequence of the timed prefill forward '
                       '(0: no prefill timing; --quick: at most 16).')
  flags.DEFINE_integer('trials', 5, 'Timing trials (median reported).')
  flags.DEFINE_float('target_ms', 50.0, 'Minimum duration of one timing trial.')
  flags.DEFINE_float('rotate_mb', 4 * L2_BYTES_H100 / 2 ** 20,
                                  'Distinct weight copies per timed call add up to this much.')
  flags.DEFINE_float('copy_mb', 1024.0, 'Size of the bandwidth-probe copy.')
  flags.DEFINE_integer('seed', 0, 'Random seed.')


def main(argv):
  del argv
  if not FLAGS.out_dir:
    raise app.UsageError('--out_dir is required')
  given = lambda name: FLAGS[name].value if FLAGS[name].present else None  # else run()'s default
  shapes, ms = given('shapes'), given('ms')
  run(out_dir=FLAGS.out_dir, quick=FLAGS.quick, sections=FLAGS.sections,
      shapes=None if shapes is None else parse_shapes(shapes),
      ms=None if ms is None else [int(m) for m in ms], fmts=given('formats'),
      with_xla=FLAGS.with_xla, with_tokamax=FLAGS.with_tokamax, sweep=FLAGS.sweep,
      write_tuning=FLAGS.write_tuning, e2e_models=given('e2e_models'),
      e2e_layers=FLAGS.e2e_layers, batch=FLAGS.batch, prompt_len=FLAGS.prompt_len,
      new_tokens=FLAGS.new_tokens, prefill_len=FLAGS.prefill_len, trials=FLAGS.trials,
      target_ms=FLAGS.target_ms,
      rotate_mb=FLAGS.rotate_mb, copy_mb=FLAGS.copy_mb, seed=FLAGS.seed,
      flag_values=common.flag_values(flags.FLAGS))


if __name__ == '__main__':
  define_flags()
  app.run(main)
