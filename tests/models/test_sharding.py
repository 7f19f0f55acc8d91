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
