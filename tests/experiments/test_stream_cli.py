"""The main command with ``--stream`` on a sharded checkpoint: the numbers, the export and the
saved model of the run that loads everything, with the blocks read one at a time."""

import jax
import numpy as np
import pytest

from experiments import compress_lib
from experiments import tiny_families as families
from experiments.config import CompressConfig
from models import loading


def _equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stream_gives_the_whole_model_results(tmp_path):
  model = families.save('llama', tmp_path / 'llama', tokenizer=True, max_shard_size='40KB',
                        num_hidden_layers=3)
  common = dict(model=str(model), quant='gptq', bits=4, group_size=32, recover='eora', rank=8,
                calib_samples=8, calib_seqlen=32, eval_windows=4, eval_seqlen=32, batch_size=4,
                export='hf')
  out = {}
  for stream in (False, True):
    name = 'stream' if stream else 'whole'
    out[name] = compress_lib.run(CompressConfig(**common, stream=stream,
                                                probes=None if stream else 'none'),
                                 out_dir=str(tmp_path / name), save=str(tmp_path / f'{name}_save'))
  whole, stream = out['whole'], out['stream']
  assert stream['config']['stream'] and 'probe_acc_compressed' not in stream  # probes off
  for key in ('ppl_dense', 'ppl_compressed', 'kl_compressed', 'top1_compressed', 'ppl_recovered'):
    assert stream[key] == pytest.approx(whole[key], rel=1e-5), key
  assert [r['rel_error'] for r in stream['layers']] == [r['rel_error'] for r in whole['layers']]
  _equal_trees(loading.load_model(str(tmp_path / 'stream_save')).params,
               loading.load_model(str(tmp_path / 'whole_save')).params)
  _equal_trees(loading.load_hf_dir(tmp_path / 'stream' / 'export_hf')[1],
               loading.load_hf_dir(tmp_path / 'whole' / 'export_hf')[1])
