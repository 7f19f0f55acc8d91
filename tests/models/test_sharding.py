"""--mesh parsing and the default placement (the mesh runs themselves: tests/test_mesh.py)."""

import numpy as np
import pytest

from experiments import config as run_config
from models import sharding


@pytest.mark.parametrize('spec, n, want', [
    (None, 8, {'data': 8, 'model': 1}),
    ('auto', 4, {'data': 4, 'model': 1}),
    ('data:4,model:2', 8, {'data': 4, 'model': 2}),
    ('model:2', 8, {'data': 4, 'model': 2}),
    ('data:2', 8, {'data': 2, 'model': 1}),
])
def test_parse_mesh(spec, n, want):
  assert sharding.parse_mesh(spec, n) == want


@pytest.mark.parametrize('spec, match', [
    ('data:4,model:4', 'needs 16 devices'),
    ('pipe:2', 'expected axis:size pairs'),
    ('data:x', 'is not an integer'),
    ('data:0', 'must be positive'),
    ('data:2,data:2', 'given twice'),
])
def test_bad_meshes_are_named(spec, match):
  with pytest.raises(ValueError, match=match):
    sharding.parse_mesh(spec, 8)


def test_the_default_placement_changes_nothing():
  x = np.arange(12.0).reshape(3, 4)
  assert sharding.active().mesh is None
  np.testing.assert_array_equal(np.asarray(sharding.batch(x)), x)
  np.testing.assert_array_equal(np.asarray(sharding.columns(x)), x)
  assert sharding.activations(sharding.batch(x)) is not None
  with sharding.use(sharding.Placement(None, 'host')):
    assert isinstance(sharding.activations(sharding.batch(x)), np.ndarray)
  assert sharding.active().offload == 'none'


def test_the_main_command_checks_the_mesh_before_any_work(tmp_path):
  base = dict(model='tiny-llama', calib_data='shakespeare', eval_data=('shakespeare',),
              calib_seqlen=32, eval_seqlen=32, quant='rtn', group_size=32, probes='none')
  problems = run_config.validate(run_config.CompressConfig(**base, mesh='data:4'),
                                 out_dir=str(tmp_path / 'r'))
  assert any('needs 4 devices' in p for p in problems), problems
  problems = run_config.validate(run_config.CompressConfig(**base, mesh='data:1', batch_size=3),
                                 out_dir=str(tmp_path / 'r'))
  assert problems == []


def test_host_offload_gives_and_resumes_the_same_compression(tmp_path):
  """Activations in host memory (NumPy between blocks): the same result as on the device, and a
  run cut after one block resumes bit for bit (with dense-input and recovery activations too)."""
  import jax  # pylint: disable=g-import-not-at-top
  from compress import pipeline, rules as rules_lib  # pylint: disable=g-import-not-at-top
  from kernels import QuantSpec  # pylint: disable=g-import-not-at-top
  from recover import compensate  # pylint: disable=g-import-not-at-top
  from tests.utils import tiny_model  # pylint: disable=g-import-not-at-top
  cfg, params, calib = tiny_model(num_layers=3, calib_shape=(8, 32))
  rules = rules_lib.uniform(rules_lib.LinearSpec(quant='gptq', qspec=QuantSpec(bits=4,
                                                                             group_size=32)))
  kw = dict(progress=False, recovery=compensate.Compensator(method='eora', rank=8),
            aux_tokens=calib[:4], dense_inputs=True)
  on_device, _ = pipeline.compress_model(params, cfg, calib, rules, **kw)
  with sharding.use(sharding.Placement(None, 'host')):
    full, _ = pipeline.compress_model(params, cfg, calib, rules, **kw)
    pipeline.compress_model(params, cfg, calib, rules, checkpoint_dir=str(tmp_path), stop_after=1,
                            checkpoint_every_s=0, **kw)
    resumed, _ = pipeline.compress_model(params, cfg, calib, rules, checkpoint_dir=str(tmp_path),
                                         checkpoint_every_s=0, **kw)
  for a, b, c in zip(jax.tree.leaves(on_device), jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


def test_a_checkpoint_restores_uncommitted_under_a_mesh(tmp_path):
  """Under a mesh, restored arrays are not tied to one device: they go with the mesh's batches
  (a model saved with --save compresses again on a mesh)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from models import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.save_tree(tmp_path / 'c', {'w': np.arange(6.0, dtype=np.float32)})
  assert checkpoint.load_tree(tmp_path / 'c')[0]['w'].committed  # no mesh: as before
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.AXES)
  with sharding.use(sharding.Placement(mesh)):
    w = checkpoint.load_tree(tmp_path / 'c')[0]['w']
    assert not w.committed and not sharding.active().spans_processes
    np.testing.assert_array_equal(np.asarray(w), np.arange(6.0))
