"""``--stream``: a model stored as several safetensors shards is compressed with host memory
bounded by about one block (measured as the process's peak RSS), device arrays under the plan's
figure, and the result of the run that loads everything."""

import json
import os
import subprocess
import sys

import pytest

from experiments import tiny_families
from models import llama
from models import loading

SHAPES = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
              num_key_value_heads=8, head_dim=128, vocab_size=128)
SMALL, BIG = 2, 6
# glibc moves its mmap threshold up after large frees and then keeps freed blocks in its heap; a
# fixed threshold returns every large buffer when it is freed, so RSS shows what is held.
ENV = {'MALLOC_MMAP_THRESHOLD_': '131072'}


def _run(model_dir, mode, tmp_path):
  out = tmp_path / f'{model_dir.name}_{mode}.json'
  subprocess.run([sys.executable, '-m', 'tests.stream_memory_check', str(model_dir), mode,
                  str(out)], check=True, timeout=600, env={**os.environ, **ENV})
  return json.loads(out.read_text())


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """The same blocks, SMALL or BIG of them, in 24 MB shards."""
  root = tmp_path_factory.mktemp('stream')
  return {n: tiny_families.save('llama', root / f'llama{n}', tokenizer=True, max_shard_size='24MB',
                                weight_std=0.02, num_hidden_layers=n, **SHAPES) for n in (SMALL, BIG)}


def test_streaming_holds_about_one_block_in_host_memory(models, tmp_path):
  cfg = loading.load_config(str(models[BIG]))
  assert len(list(models[BIG].glob('*.safetensors'))) > BIG  # really sharded
  dense_block = sum(a * b for a, b in llama.linear_shapes(cfg).values()) * 4  # float32
  small = _run(models[SMALL], 'stream', tmp_path)
  big = _run(models[BIG], 'stream', tmp_path)
  eager = _run(models[BIG], 'eager', tmp_path)
  more = BIG - SMALL
  compressed = big['plan']['host']['compressed model'] / cfg.num_layers  # one block, compressed
  # More blocks cost their compressed size; one dense block of slack for allocator noise.
  grew = big['max_rss'] - small['max_rss']
  sizes = f'grew {grew / 1e6:.1f} MB; blocks: dense {dense_block / 1e6:.1f}, compressed {compressed / 1e6:.1f} MB'
  print(sizes, f'; eager grew {(eager["max_rss"] - small["max_rss"]) / 1e6:.1f} MB; device arrays '
        f'{big["max_live_device_bytes"] / 1e6:.1f} MB, plan {big["plan"]["device_peak"] / 1e6:.1f} MB')
  assert grew < more * compressed + dense_block, sizes
  # The measurement sees a whole model when one is loaded: it would catch a regression.
  assert eager['max_rss'] - small['max_rss'] > more * dense_block * 0.9, (
      eager['max_rss'] - small['max_rss']) / 1e6
  # Device arrays stay under what --plan says for the run.
  assert big['max_live_device_bytes'] <= big['plan']['device_peak']
  assert big['max_live_device_bytes'] + 3 * dense_block < eager['max_live_device_bytes']
  # The same numbers as loading everything.
  assert big['ppl_dense'] == pytest.approx(eager['ppl_dense'], rel=1e-5)
  assert big['ppl_compressed'] == pytest.approx(eager['ppl_compressed'], rel=1e-5)
