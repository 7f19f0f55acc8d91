"""The same results on a mesh of 8 simulated CPU devices as on one (tests/mesh_check.py runs the
work in a process of its own, where XLA can be given 8 host devices)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def mesh_results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('mesh')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-m', 'tests.mesh_check', str(tmp / 'out.json'), str(tmp)],
                        env=env, capture_output=True, text=True, timeout=1500, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((tmp / 'out.json').read_text())


def test_compression_and_recovery_are_the_same_on_every_mesh(mesh_results):
  for method, meshes in mesh_results['methods'].items():
    assert set(meshes) >= {'data:8', 'data:4,model:2'}, method
    for mesh, d in meshes.items():
      assert d['ints_equal'], (method, mesh)  # codes, zeros, masks, 2:4 indices
      assert d['float_rel'] < 1e-5, (method, mesh, d)
      assert d['ppl_rel'] < 1e-6, (method, mesh, d)


def test_the_main_command_on_a_mesh_with_host_offload(mesh_results):
  """Reconstruction and LoRA train data-parallel: Adam turns the all-reduce's rounding into
  changes of up to its step size on parameters whose gradients are near its epsilon, so the
  trained floats are compared through the model's perplexity."""
  (mesh, d), = mesh_results['main_command']['reconstruct + lora'].items()
  assert d['mesh_recorded'] == 'data:4,model:2' and d['offload_recorded'] == 'host'
  assert d['ints_equal'], d
  assert d['ppl_rel'] < 1e-5, (mesh, d)


def test_fully_sharded_training_is_data_parallel_training(mesh_results):
  """``fsdp`` keeps each large weight, adapter and Adam moment split over the 8 devices (one
  eighth each) and trains the same model as replicated parameters and as one device."""
  r = mesh_results['fsdp']
  for case in ('finetune global', 'finetune lora', 'reconstruct block'):
    for mesh, d in r[case].items():
      assert d['ints_equal'], (case, mesh, d)
      assert d['loss_rel'] < 1e-5 and d['float_rel'] < 1e-4, (case, mesh, d)
  for method in ('global', 'lora'):  # the trained arrays and Adam moments during training
    assert r[f'finetune {method}']['data:8 fsdp']['shard_fraction'] == 1 / 8, r
    assert r[f'finetune {method}']['data:8']['shard_fraction'] == 1.0, r
  mem = r['memory']
  assert mem['data:8 fsdp']['shard_fraction'] == 1 / 8 and mem['data:8']['shard_fraction'] == 1.0
  # Weights and both Adam moments: a device holds about an eighth of what replication holds.
  assert mem['data:8 fsdp']['argument_bytes'] < 0.25 * mem['data:8']['argument_bytes'], mem
