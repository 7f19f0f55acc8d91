"""The flags of ``experiments.compress`` are generated from ``CompressConfig`` (one declaration)."""

import dataclasses
import sys

from absl import flags
import pytest

from experiments import common
from experiments import config as run_config
from experiments.config import CompressConfig


def _flag_values() -> flags.FlagValues:
  """A fresh FlagValues with the generated flags (the global FLAGS stays untouched)."""
  fv = flags.FlagValues()
  common.define_flags_from(CompressConfig, flag_values=fv)
  return fv


def _parse(*args: str) -> CompressConfig:
  fv = _flag_values()
  fv(['compress', *args])
  return common.from_flags(CompressConfig, fv)


def test_every_field_has_a_flag_with_help():
  fv = _flag_values()
  for f in dataclasses.fields(CompressConfig):
    assert f.name in fv, f.name
    assert f.metadata['help'] and fv[f.name].help.endswith(f.metadata['help']), f.name
  assert {f.name for f in dataclasses.fields(CompressConfig)} == set(fv)
  # Key flags of the calling module (here this test), so the script's --help lists them.
  assert {f.name for f in fv.get_key_flags_for_module(sys.modules[__name__])} == set(fv)


def test_flag_kinds_and_defaults():
  fv = _flag_values()
  assert isinstance(fv['dtype'], flags.EnumFlag) and fv['dtype'].parser.enum_values == [
      'float32', 'bfloat16']
  assert isinstance(fv['eval_data'].parser, flags.ListParser)
  assert fv['auto_candidates'].default == ['2', '3', '4'] and fv['rules'].default == []
  assert fv['srr_k'].default is None and isinstance(fv['srr_k'].parser, flags.IntegerParser)
  assert fv['auto_bits'].default is None and isinstance(fv['auto_bits'].parser, flags.FloatParser)
  assert isinstance(fv['act_order'], flags.BooleanFlag)


def test_command_line_gives_the_config():
  c = _parse('--quant=gptq', '--bits=3', '--eval_data=a,b', '--auto_candidates=2,4', '--srr_k=-1')
  assert c == CompressConfig(quant='gptq', bits=3, eval_data=('a', 'b'), auto_candidates=(2, 4),
                             srr_k=-1)
  assert isinstance(c.auto_candidates[0], int)
  c = _parse('--rules=lm_head=none,.*down.*=4', '--auto_bits=3.5', '--act_order',
             '--dtype=bfloat16', '--ft_lr=1e-3', '--probes=none')
  assert c == CompressConfig(rules=('lm_head=none', '.*down.*=4'), auto_bits=3.5, act_order=True,
                             dtype='bfloat16', ft_lr=1e-3, probes='none')


def test_defaults_round_trip():
  assert _parse() == CompressConfig()


def test_bad_values_are_rejected():
  with pytest.raises(flags.IllegalFlagValueError):
    _parse('--dtype=float16')
  with pytest.raises(ValueError, match='--auto_candidates=2,x'):
    _parse('--auto_candidates=2,x')


def test_a_field_without_help_is_an_error():

  @dataclasses.dataclass(frozen=True)
  class Config:
    bits: int = 4

  with pytest.raises(ValueError, match='Config.bits has no help'):
    common.define_flags_from(Config, flag_values=flags.FlagValues())


def test_distributed_flags_give_the_config():
  c = _parse('--coordinator_address=node001:1234', '--num_processes=2', '--process_id=1')
  assert c == CompressConfig(coordinator_address='node001:1234', num_processes=2, process_id=1)
  assert _parse('--distributed=off').distributed == 'off'
  with pytest.raises(flags.IllegalFlagValueError):
    _parse('--distributed=maybe')


def test_bad_distributed_flags_are_one_line_each(tmp_path, monkeypatch):
  from experiments import compress  # pylint: disable=g-import-not-at-top
  for var in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES',
              'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  fv = flags.FlagValues()
  compress.define_flags(fv)
  fv(['compress', '--model=tiny-llama', '--calib_data=shakespeare', '--calib_seqlen=32',
      '--eval_data=shakespeare', '--eval_seqlen=32', '--quant=rtn', '--group_size=32',
      '--probes=none', f'--out_dir={tmp_path}', '--coordinator_address=localhost:1234',
      '--num_processes=2', '--process_id=2'])
  _, problems = compress.check_flags(fv)
  assert problems == ['--process_id=2 must be below --num_processes=2 (processes are numbered 0 '
                      'to 1)']
  # Settings that ask for several processes in a process that did not start them.
  problems = run_config.validate(CompressConfig(
      model='tiny-llama', calib_data='shakespeare', eval_data=('shakespeare',), calib_seqlen=32,
      eval_seqlen=32, quant='rtn', group_size=32, probes='none',
      coordinator_address='localhost:1234', num_processes=2, process_id=0))
  assert len(problems) == 1 and 'jax.distributed was not started' in problems[0], problems
