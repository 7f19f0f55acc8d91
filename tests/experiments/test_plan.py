"""``--plan``: its figures bound XLA's own (``compiled.memory_analysis()``) on the tiny model, and
the command refuses a run that does not fit, naming the flags that would shrink it."""

import json

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from compress import calibration, gptq, matrix, sparsegpt
from compress.prune import PruneSpec
from experiments import compress as compress_cli
from experiments import config as run_config
from experiments import plan
from kernels import QuantSpec
from models import config as config_lib
from models import llama


def _total(compiled) -> int:
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes


@pytest.fixture(scope='module')
def tiny():
  cfg = config_lib.tiny_config(num_layers=2)
  return cfg, llama.init_params(cfg, jax.random.key(0), scale=0.1)


def test_model_and_statistics_are_exact(tiny):
  cfg, params = tiny
  assert plan.model_bytes(cfg, jnp.float32) == sum(x.nbytes for x in jax.tree.leaves(params))
  keys = tuple(sorted(set(llama.LINEAR_INPUTS.values())))
  stats = {k: calibration.init_stats(calibration.input_width(cfg, k)) for k in keys}
  x = jnp.zeros((4, 32, cfg.hidden_size))
  out = calibration._stats_fn(cfg, keys, 'float32', True, False).lower(  # pylint: disable=protected-access
      params['layers'][0], x, stats).compile().memory_analysis().output_size_in_bytes
  assert plan.stats_bytes(cfg) == pytest.approx(out, rel=0.01)


def test_block_forward_bounds_xla(tiny):
  cfg, params = tiny
  for rows, seqlen in ((4, 32), (2, 128)):
    x = jnp.zeros((rows, seqlen, cfg.hidden_size))
    m = calibration._out_fn(cfg, 'float32').lower(  # pylint: disable=protected-access
        params['layers'][0], x).compile().memory_analysis()
    xla = m.temp_size_in_bytes + m.output_size_in_bytes
    ours = plan.block_forward_bytes(cfg, rows, seqlen, 4)
    assert xla <= ours <= 4 * xla, (rows, seqlen, xla, ours)


@pytest.mark.parametrize('n_in, n_out', [(128, 64), (256, 64), (128, 512)])
def test_one_matrix_numerics_bound_xla(n_in, n_out):
  w, h = jnp.zeros((n_in, n_out)), jnp.eye(n_in)
  ours = plan.numerics_bytes(n_in, n_out, 1, False)
  for fn in (matrix.jitted(gptq.gptq, spec=QuantSpec(bits=4, group_size=32), block_size=128,
                           damp=0.01, act_order=True, static_groups=False),
             matrix.jitted(sparsegpt.sparsegpt, spec=PruneSpec.parse('2:4'), block_size=128,
                           percdamp=0.01)):
    xla = _total(fn.lower(w, h).compile())
    assert xla <= ours <= 2 * xla, (n_in, n_out, xla, ours)
  assert plan.numerics_bytes(n_in, n_out, 2, False) < ours  # the model axis splits the columns


def _plan_cli(tmp_path, *args):
  fv = flags.FlagValues()
  compress_cli.define_flags(fv)
  fv(['compress', '--model=tiny-llama', '--quant=gptq', '--bits=4', '--group_size=32',
      '--calib_data=shakespeare', '--eval_data=shakespeare', '--calib_seqlen=64',
      '--eval_seqlen=64', '--probes=none', f'--out_dir={tmp_path}', '--plan', *args])
  saved = compress_cli.FLAGS
  compress_cli.FLAGS = fv
  try:
    c, problems = compress_cli.check_flags(fv)
    assert problems == [], problems
    return compress_cli.show_plan(c), json.loads((tmp_path / 'plan.json').read_text())
  finally:
    compress_cli.FLAGS = saved


def test_the_plan_refuses_what_does_not_fit_and_names_the_flags(tmp_path, capsys):
  rc, p = _plan_cli(tmp_path, '--device_memory_gb=1')
  assert rc == 0 and p['fits'] and p['device_peak'] < 1e9
  rc, p = _plan_cli(tmp_path, '--device_memory_gb=0.0003', '--plan_devices=8',
                    '--mesh=data:4,model:2', '--batch_size=8')
  out = capsys.readouterr().out
  assert rc == 2 and not p['fits'] and p['mesh'] == 'data:4,model:2'
  assert 'does not fit' in out and '--dtype=bfloat16' in out


def test_plans_of_big_models_from_their_configs_alone():
  """Llama-3-8B shapes: no weight exists here; the plan needs only the config."""
  cfg = config_lib.ModelConfig(
      model_type='llama', vocab_size=128256, hidden_size=4096, intermediate_size=14336,
      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e5,
      rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=8192)
  c = run_config.CompressConfig(quant='gptq', bits=4, group_size=128, recover='eora', rank=64,
                                calib_samples=128, calib_seqlen=2048, dtype='bfloat16')
  one = plan.plan(c, cfg, 1, 80e9)
  assert one['fits'] and 15e9 < one['device']['dense model'] < 17e9
  split = plan.plan(run_config.CompressConfig(**{**c.__dict__, 'mesh': 'data:4,model:2'}), cfg, 8)
  assert split['device']['one-matrix numerics'] < one['device']['one-matrix numerics']
  assert split['device']['block forward temporaries'] < one['device']['block forward temporaries']


def test_asymmetric_calibration_counts_the_dense_stream(tiny):
  cfg, _ = tiny
  base = dict(model='tiny-llama', quant='gptq', bits=4, group_size=32, calib_samples=64,
              calib_seqlen=64)
  plain = plan.plan(run_config.CompressConfig(**base), cfg, 1)
  asym = plan.plan(run_config.CompressConfig(**base, asymmetric=True), cfg, 1)
  for key in ('activations between blocks', 'statistics (H)'):
    assert asym['device'][key] == 2 * plain['device'][key]
  assert asym['device_peak'] > plain['device_peak']
