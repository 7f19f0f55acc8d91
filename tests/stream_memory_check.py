"""One compression run in a fresh process, for tests/test_stream_memory.py: its peak resident
memory and the peak of its live device arrays.

  python -m tests.stream_memory_check MODEL_DIR stream|eager OUT.json

The run is the main command's (GPTQ 4-bit, evaluation included) on ``MODEL_DIR``; with ``stream``
it is ``--stream`` (blocks read from the safetensors shards one at a time, finished blocks in host
memory, evaluation by blocks). Writes ``{'max_rss', 'max_live_device_bytes', 'ppl_dense',
'ppl_compressed', 'plan'}`` (bytes; ``plan``: :func:`experiments.plan.plan` of the same run).
"""

import json
import sys

import jax

from compress import calibration
from compress import pipeline
from experiments import compress_lib
from experiments import config as run_config
from experiments import plan as plan_lib
from models import loading


def config(model_dir: str, stream: bool) -> run_config.CompressConfig:
  return run_config.CompressConfig(
      model=model_dir, quant='gptq', bits=4, group_size=128, calib_samples=8, calib_seqlen=128,
      eval_windows=4, eval_seqlen=128, batch_size=4, probes='none', stream=stream)


def peak_rss() -> int:
  """This process's peak resident memory in bytes: ``VmHWM``, the high-water mark of its own
  address space (``ru_maxrss`` would carry the peak of the parent that started it across exec)."""
  with open('/proc/self/status') as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
  return kb * 1024


def main(model_dir: str, mode: str, out: str) -> None:
  peak = [0]

  def watch(fn):
    def wrapped(*args, **kwargs):
      peak[0] = max(peak[0], sum(x.nbytes for x in jax.live_arrays()))
      return fn(*args, **kwargs)
    return wrapped
  # The moments the most is on the devices: statistics being collected (the block, its inputs)
  # and a matrix being compressed (the block, its statistics).
  calibration.collect_stats = watch(calibration.collect_stats)
  pipeline.compress_matrix = watch(pipeline.compress_matrix)
  c = config(model_dir, mode == 'stream')
  res = compress_lib.run(c)
  p = plan_lib.plan(c, loading.load_config(model_dir), 1)
  peak[0] = max(peak[0], sum(x.nbytes for x in jax.live_arrays()))
  with open(out, 'w') as f:
    json.dump({'max_rss': peak_rss(),
               'max_live_device_bytes': peak[0], 'ppl_dense': res['ppl_dense'],
               'ppl_compressed': res['ppl_compressed'], 'plan': p}, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
