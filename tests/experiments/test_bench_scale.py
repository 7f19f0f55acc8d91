"""The scale benchmark (GPTQ + EoRA end to end on a random model of given shapes) on the tiny
shapes: its stages add up, and a bad value fails before the model is made."""

import pytest

from experiments import bench_scale


def test_tiny_run_reports_every_stage():
  row = bench_scale.run(size='tiny', calib_samples=4, calib_seqlen=32, batch_size=2, bits=4,
                        group_size=32, rank=4, dtype='float32', seed=0)
  assert row['tokens'] == 128 and row['devices'] >= 1
  assert row['eora_s'] > 0 and row['gptq_numerics_s'] > 0 and row['calib_passes_s'] >= 0
  parts = row['calib_passes_s'] + row['gptq_numerics_s'] + row['eora_s']
  assert parts == pytest.approx(row['wall_s'], rel=0.05)
  assert row['gptq_s'] == pytest.approx(row['wall_s'] - row['eora_s'])
  assert 0 < row['mean_rel_error'] < 0.5


def test_bad_values_fail_before_work():
  with pytest.raises(ValueError, match='bits=5'):
    bench_scale.run(size='tiny', calib_samples=4, calib_seqlen=32, batch_size=2, bits=5,
                    group_size=32, rank=4, dtype='float32', seed=0)
  with pytest.raises(ValueError, match='batch_size'):
    bench_scale.run(size='tiny', calib_samples=5, calib_seqlen=32, batch_size=2, bits=4,
                    group_size=32, rank=4, dtype='float32', seed=0)
