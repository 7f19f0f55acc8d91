r"""End to end at the scale of Llama-3-8B: GPTQ 4-bit g128 + EoRA r64, wall time per stage and
peak device memory (the scale issue's GPU benchmark).

  python -m experiments.bench_scale --out_dir=results/bench_scale_h100          # one GPU
  python -m experiments.bench_scale --size=tiny --calib_samples=8 --calib_seqlen=64 \
      --dtype=float32 --out_dir=/tmp/scale                                       # CPU smoke run

A model with random weights and the exact shapes of Llama-3-8B (``--size=8b``: 32 blocks,
hidden 4096, MLP 14336, 32 heads of 128, 8 KV heads, vocabulary 128256; or ``70b``, or ``tiny``)
in ``--dtype`` (bfloat16: float32 statistics) is compressed with GPTQ (``--bits``,
``--group_size``) and compensated with EoRA (``--rank``) on ``--calib_samples`` x
``--calib_seqlen`` random tokens, inputs propagated through the compressed blocks, with the
library's pipeline (``compress.pipeline.compress_model``). Random weights and tokens give the
shapes, not the accuracy: the times and memory are what the benchmark is for.

Per stage, from the pipeline's report: the calibration passes (statistics and propagation),
GPTQ's numerics, EoRA's, and the whole run; the first block's extra time (compilation); the
device's peak memory where the backend reports it (``memory_stats()['peak_bytes_in_use']``).
Anchor (llm-compressor's GPTQ on Llama-3-8B, one GPU): 745 s; target here: GPTQ at most 370 s on
one H100/H200 and EoRA adding at most 25%. Writes ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_enum('size', '8b', ['8b', '70b', 'tiny'], 'Shapes of Llama-3-8B, -70B, or tiny.')
  flags.DEFINE_integer('calib_samples', 128, 'Calibration sequences.')
  flags.DEFINE_integer('calib_seqlen', 2048, 'Calibration sequence length.')
  flags.DEFINE_integer('batch_size', 8, 'Sequences per calibration step.')
  flags.DEFINE_integer('bits', 4, 'GPTQ bits.')
  flags.DEFINE_integer('group_size', 128, 'GPTQ group size.')
  flags.DEFINE_integer('rank', 64, 'EoRA rank (0: GPTQ alone).')
  flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Weights and activations.')
  flags.DEFINE_integer('seed', 0, 'Weights and tokens.')
  flags.DEFINE_string('out_dir', 'results/bench_scale', 'Where results.json and table.md go.')


def _config(size: str):
  from experiments import plan  # pylint: disable=g-import-not-at-top
  from models import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.tiny_config() if size == 'tiny' else plan.llama3_config(size)


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def run(*, size: str, calib_samples: int, calib_seqlen: int, batch_size: int, bits: int,
        group_size: int, rank: int, dtype: str, seed: int) -> dict[str, Any]:
  from compress import pipeline  # pylint: disable=g-import-not-at-top
  from experiments import bench_compress_time  # pylint: disable=g-import-not-at-top
  from compress import rules as rules_lib  # pylint: disable=g-import-not-at-top
  from kernels import QuantSpec  # pylint: disable=g-import-not-at-top
  from models import llama  # pylint: disable=g-import-not-at-top
  from recover import compensate  # pylint: disable=g-import-not-at-top
  cfg = _config(size)
  # Every bad value fails here, before the model is made.
  spec = rules_lib.LinearSpec(quant='gptq', qspec=QuantSpec(bits=bits, group_size=group_size))
  for lin, shape in llama.linear_shapes(cfg).items():
    spec.check_shape(shape, lin)
  if calib_samples % batch_size:
    raise ValueError(f'--calib_samples={calib_samples} is not a multiple of --batch_size={batch_size}')
  t0 = time.perf_counter()
  params = llama.init_params(cfg, jax.random.key(seed), jnp.dtype(dtype))
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (calib_samples, calib_seqlen),
                                                dtype=np.int32)
  recovery = compensate.Compensator(method='eora', rank=rank) if rank else None
  t0 = time.perf_counter()
  result, reports = pipeline.compress_model(params, cfg, tokens, rules_lib.uniform(spec),
                                            batch_size=batch_size, dtype=jnp.dtype(dtype),
                                            recovery=recovery)
  jax.block_until_ready(result)
  wall = time.perf_counter() - t0
  s = pipeline.summarize(reports)
  gptq_s = wall - s['recover_seconds']
  peak = _peak_bytes()
  return {
      'device': str(jax.devices()[0].device_kind), 'devices': jax.device_count(),
      'model': f'random, shapes of {size}', 'tokens': calib_samples * calib_seqlen,
      'dtype': dtype, 'init_s': init_s, 'wall_s': wall,
      'calib_passes_s': s['calib_forward_seconds'], 'gptq_numerics_s': s['numerics_seconds'],
      'eora_s': s['recover_seconds'], 'gptq_s': gptq_s,
      'eora_over_gptq': s['recover_seconds'] / gptq_s if gptq_s else None,
      'first_block_extra_s': bench_compress_time.first_block_extra(
          bench_compress_time.per_block(reports, cfg.num_layers)),
      'peak_device_gb': None if peak is None else peak / 2 ** 30,
      'mean_rel_error': s['mean_rel_error'],
  }


def main(argv: Sequence[str]) -> None:
  del argv
  from experiments import common  # pylint: disable=g-import-not-at-top
  common.quiet_logs()
  row = run(size=FLAGS.size, calib_samples=FLAGS.calib_samples, calib_seqlen=FLAGS.calib_seqlen,
            batch_size=FLAGS.batch_size, bits=FLAGS.bits, group_size=FLAGS.group_size,
            rank=FLAGS.rank, dtype=FLAGS.dtype, seed=FLAGS.seed)
  title = (f'GPTQ w{FLAGS.bits}g{FLAGS.group_size} + EoRA r{FLAGS.rank}, {row["model"]}, '
           f'{FLAGS.calib_samples} x {FLAGS.calib_seqlen} tokens, {row["device"]}')
  common.write_results(FLAGS.out_dir, {'row': row}, rows=[row], title=title)
  print(common.markdown_table([row]))


if __name__ == '__main__':
  define_flags()
  app.run(main)
