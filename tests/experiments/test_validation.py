"""``experiments.compress`` checks its flags before any work: every problem that the flags, the
model's config and the files' existence and size show is reported at once, one ``error: --flag``
line each, exit status 2, no help dump, nothing written, within 3 s.

Each case runs the command line in a subprocess (its wall time includes starting Python and
importing jax, about 1.0-1.5 s here) and, on the same flags, :func:`compress.check_flags` in-process
(the validation alone, milliseconds). The cases on ``smollm2-135m`` read its config from the cached
GGUF asset (``slow``); the others use ``tiny-llama`` (hidden size 64, k/v width 32, MLP width 128,
512 positions).
"""

import os
import pathlib
import subprocess
import sys
import time

from absl import flags
import numpy as np
import pytest

from experiments import compress as compress_cli
from experiments import compress_lib, config
from experiments import evaluate as evaluate_exp
from experiments.config import CompressConfig
from models import config as config_lib
from models import loading

REPO = pathlib.Path(__file__).resolve().parents[2]
LIMIT_S = 3.0  # time to error of a validation case


@pytest.fixture
def paths(tmp_path):
  """Files for the cases (and the ``{name}`` placeholders of their flags)."""
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  words = ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'compress', 'recover', 'layer']
  (inputs / 'corpus.txt').write_text(' '.join(rng.choice(words, size=6000)) + '\n')
  (inputs / 'empty.txt').write_text('')
  (inputs / 'short.txt').write_text('a few words, far fewer than one sequence\n')
  (inputs / 'binary.txt').write_bytes(bytes(range(256)) * 8)
  (inputs / 'a_file').write_text('not a directory\n')
  return {'tmp': str(tmp_path), 'corpus': str(inputs / 'corpus.txt'),
          'empty': str(inputs / 'empty.txt'), 'short': str(inputs / 'short.txt'),
          'binary': str(inputs / 'binary.txt'), 'missing': str(inputs / 'missing.txt'),
          'a_file': str(inputs / 'a_file'), 'out': str(tmp_path / 'out'),
          'save': str(tmp_path / 'saved')}


def _files(root: str) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), root)
          for d, dirs, files in os.walk(root) for f in files + dirs}


def _check_flags(argv):
  fv = flags.FlagValues()
  compress_cli.define_flags(fv)
  fv(['compress', *argv])
  return compress_cli.check_flags(fv)


def _cli(argv) -> tuple[subprocess.CompletedProcess, float]:
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, '-m', 'experiments.compress', *argv], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  return proc, time.perf_counter() - t0


@pytest.fixture(scope='module')
def import_floor_s() -> float:
  """Seconds to start Python and import the CLI's modules, without doing anything."""
  t0 = time.perf_counter()
  subprocess.run([sys.executable, '-c', 'import experiments.compress'], cwd=REPO, check=True,
                 capture_output=True, timeout=120)
  return time.perf_counter() - t0


def _assert_reported(argv, expected, paths, floor_s):
  """Runs the command line and the in-process check on ``argv``; every ``expected`` fragment must
  be on an ``error:`` line, both must agree, fail fast and write nothing."""
  argv = [a.format(**paths) for a in argv]
  if not any(a.startswith('--out_dir') for a in argv):
    argv.append(f'--out_dir={paths["out"]}')
  before = _files(paths['tmp'])
  t0 = time.perf_counter()
  _, problems = _check_flags(argv)
  in_process_s = time.perf_counter() - t0
  proc, cli_s = _cli(argv)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
  errors = [line[len('error: '):] for line in proc.stderr.splitlines()
            if line.startswith('error: ')]
  assert errors == problems
  for fragment in expected:
    assert any(fragment in e for e in errors), (fragment, errors)
  assert '--[no]act_order' not in proc.stderr and 'USAGE' not in proc.stderr  # no help dump
  assert 'Traceback' not in proc.stderr
  assert _files(paths['tmp']) == before  # nothing written: no out_dir, no save, no temp file
  assert in_process_s < LIMIT_S
  # The wall time includes Python's start and jax's import (``floor_s``, ~1-1.5 s on an idle
  # machine): 3 s, or the floor plus 1.5 s on a machine so loaded that the floor alone is larger.
  assert cli_s < max(LIMIT_S, floor_s + 1.5), (cli_s, floor_s)


TINY = ['--model=tiny-llama']

# (id, flags, fragments that must be on the error lines): the cases of the issue.
CASES = [
    # Checked only after compression and/or evaluation ran.
    ('save_unwritable', TINY + ['--quant=rtn', '--save={a_file}/model'],
     ['--save={a_file}/model is not writable: {a_file} is not a directory']),
    ('save_unwritable_dir', TINY + ['--quant=rtn', '--save=/proc/compress-test/model'],
     ['--save=/proc/compress-test/model is not writable: cannot create files in /proc']),
    ('out_dir_unwritable', TINY + ['--quant=rtn', '--out_dir=/proc/compress-test/out'],
     ['--out_dir=/proc/compress-test/out is not writable']),
    ('out_dir_is_a_file', TINY + ['--quant=rtn', '--out_dir={a_file}'],
     ['--out_dir={a_file} exists and is not a directory']),
    ('lora_rank_0', TINY + ['--quant=rtn', '--finetune=lora', '--lora_rank=0'],
     ['--lora_rank=0 must be positive']),
    ('stream_with_training', TINY + ['--quant=rtn', '--stream', '--reconstruct=block',
                                     '--probes={corpus}'],
     ['--reconstruct=block trains or searches on the whole model; --stream holds one block',
      '--probes={corpus}: multiple-choice probes need the whole model']),
    ('probes_missing', TINY + ['--quant=rtn', '--probes={missing}'],
     ['--probes={missing}: ', 'does not exist']),
    ('srr_k_negative', TINY + ['--quant=rtn', '--recover=srr', '--rank=8', '--srr_k=-5'],
     ['--srr_k=-5 must be -1 (search), 0 or a positive preserved rank']),
    ('auto_candidates_bad_bits', TINY + ['--quant=rtn', '--auto_bits=3', '--auto_candidates=2,5'],
     ['--auto_candidates=2,5: 5 is not a supported bit width']),
    # Checked only after loading and tokenizing.
    ('group_size_not_dividing', TINY + ['--prune=sparsegpt', '--quant=gptq', '--group_size=48'],
     ['--group_size=48 does not divide the input width 64 of layers/*/self_attn/q_proj',
      '--group_size=48 does not divide the input width 128 of layers/*/mlp/down_proj',
      'which --prune=sparsegpt with quantization needs; --group_size=64 divides every width']),
    ('rules_errors', TINY + ['--quant=rtn', '--rules=(=4,no_equals,.*q_proj.*=5,.*=abc,nothing=3'],
     ["--rules=(=4: invalid rule pattern '('", '--rules=no_equals: rule',
      '--rules=.*q_proj.*=5: bits=5',
      "--rules=.*=abc: rule '.*=abc': 'abc' is not a bit width",
      '--rules=nothing=3: the pattern matches no linear']),
    ('rules_bits_without_quant', TINY + ['--prune=wanda', '--rules=.*down_proj.*=3'],
     ['--rules=.*down_proj.*=3: ', 'no quantization method']),
    ('rules_leave_nothing', TINY + ['--quant=rtn', '--rules=.*=none'],
     ['--rules=.*=none: no linear of tiny-llama is left to compress']),
    ('auto_bits_range', TINY + ['--quant=rtn', '--auto_bits=5'],
     ['--auto_bits=5 is outside the range of --auto_candidates (2 to 4 bits)']),
    ('calib_empty', TINY + ['--quant=rtn', '--calib_data={empty}'],
     ['--calib_data={empty} is empty']),
    ('calib_short', TINY + ['--quant=rtn', '--calib_data={short}', '--calib_seqlen=128'],
     ['--calib_data={short} is too short: 41 bytes', '129 tokens']),
    ('calib_missing', TINY + ['--quant=rtn', '--calib_data={missing}'],
     ['--calib_data={missing}: no such file']),
    ('calib_binary', TINY + ['--quant=rtn', '--calib_data={binary}'],
     ['--calib_data={binary} is not UTF-8 text (byte 0x80 at offset 128)']),
    ('calib_unknown_corpus', TINY + ['--quant=rtn', '--calib_data=wikitext3'],
     ['--calib_data=wikitext3 is neither a known corpus']),
    ('eval_windows_and_seqlen', TINY + ['--quant=rtn', '--eval_windows=0', '--eval_seqlen=1'],
     ['--eval_windows=0 must be positive, or -1', '--eval_seqlen=1 must be at least 2']),
    ('eval_file_short', TINY + ['--quant=rtn', '--eval_data={corpus},{short}', '--eval_seqlen=64',
                                '--eval_windows=4'],
     ['--eval_data={short} is too short: 41 bytes, and --eval_windows x --eval_seqlen = 4 x 64']),
    ('recover_data_missing', TINY + ['--quant=rtn', '--recover=eora', '--rank=8',
                                     '--recover_data={missing}'],
     ['--recover_data={missing}: no such file']),
    # Silently accepted.
    ('eval_seqlen_above_positions', TINY + ['--quant=rtn', '--eval_seqlen=1024'],
     ['--eval_seqlen=1024 exceeds the 512 positions of tiny-llama']),
    ('rank_above_width', TINY + ['--quant=rtn', '--recover=eora', '--rank=40'],
     ['--rank=40 exceeds min(in, out) = 32 of layers/*/self_attn/k_proj']),
    ('lora_rank_above_width', TINY + ['--quant=rtn', '--finetune=lora', '--lora_rank=48'],
     ['--lora_rank=48 exceeds min(in, out) = 32']),
    ('sparsity_without_prune', TINY + ['--sparsity=2:4'],
     ['--sparsity=2:4 has no effect without --prune']),
    ('auto_bits_without_quant', TINY + ['--auto_bits=3'],
     ['--auto_bits=3 needs a quantization method']),
    ('flag_without_its_method', TINY + ['--quant=rtn', '--rank=8', '--ft_steps=5'],
     ['--rank=8 has no effect without --recover', '--ft_steps=5 has no effect without --finetune']),
    # Unclear.
    ('batch_size_0', TINY + ['--quant=rtn', '--batch_size=0'], ['--batch_size=0 must be positive']),
    ('seed_negative', TINY + ['--quant=rtn', '--seed=-1'], ['--seed=-1 must be non-negative']),
    ('out_dir_missing', TINY + ['--quant=rtn', '--out_dir='], ['--out_dir is required']),
    ('export_peft_without_adapters', TINY + ['--quant=rtn', '--export=peft'],
     ['--export=peft writes low-rank adapters, but nothing makes them']),
    ('unknown_model', ['--model=no-such-model', '--quant=rtn'],
     ["--model=no-such-model: unknown model 'no-such-model'"]),
]


@pytest.mark.parametrize('argv,expected', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reported_before_any_work(argv, expected, paths, import_floor_s):
  expected = [e.format(**paths) for e in expected]
  _assert_reported(argv, expected, paths, import_floor_s)


@pytest.mark.slow
@pytest.mark.parametrize('argv,expected', [
    (['--prune=sparsegpt', '--quant=gptq', '--group_size=128'],
     ['--group_size=128 does not divide the input width 576 of layers/*/self_attn/q_proj',
      '(hidden size), which --prune=sparsegpt with quantization needs; --group_size=64 divides '
      'every width (576, 1536)']),
    (['--quant=rtn', '--eval_seqlen=9000'],
     ['--eval_seqlen=9000 exceeds the 8192 positions of smollm2-135m']),
    (['--quant=rtn', '--recover=eora', '--rank=256'],
     ['--rank=256 exceeds min(in, out) = 192 of layers/*/self_attn/k_proj, '
      'layers/*/self_attn/v_proj (576 x 192)']),
], ids=['group_size_128', 'eval_seqlen_above_positions', 'rank_above_width'])
def test_reported_before_any_work_smollm2(argv, expected, paths, import_floor_s):
  _assert_reported(['--model=smollm2-135m', *argv], expected, paths, import_floor_s)


def test_every_problem_is_reported_together(paths, import_floor_s):
  argv = TINY + ['--quant=gptq', '--batch_size=0', '--seed=-1',
                 '--calib_data={binary}', '--probes={missing}', '--recover=srr', '--rank=40',
                 '--srr_k=-5', '--eval_seqlen=1024', '--sparsity=2:4', '--save={a_file}/m']
  expected = ['--batch_size=0', '--seed=-1', '--calib_data=', '--probes=',
              '--rank=40', '--srr_k=-5', '--eval_seqlen=1024', '--sparsity=2:4', '--save=']
  _assert_reported(argv, expected, paths, import_floor_s)
  _, problems = _check_flags([a.format(**paths) for a in argv] + [f'--out_dir={paths["out"]}'])
  assert len(problems) >= len(expected)


def test_library_run_raises_the_same_problems(paths):
  c = CompressConfig(model='tiny-llama', quant='rtn', batch_size=0, calib_data=paths['missing'])
  with pytest.raises(ValueError, match=r'(?s)--batch_size=0 must be positive.*--calib_data='):
    compress_lib.run(c, out_dir=paths['out'])
  assert not os.path.exists(paths['out'])


@pytest.mark.slow
def test_defaults_validate_on_the_default_model():
  cfg = loading.load_config('smollm2-135m')
  assert (cfg.hidden_size, cfg.intermediate_size, cfg.max_position_embeddings) == (576, 1536, 8192)
  for c in (CompressConfig(), CompressConfig(quant='gptq'),
            CompressConfig(quant='rtn', auto_bits=3), CompressConfig(quant='gptq', recover='eora'),
            CompressConfig(prune='wanda')):
    assert config.validate(c, given=()) == [], c
  resolved = config.resolve(CompressConfig(quant='gptq'), cfg)
  assert resolved.group_size == 64
  assert config.build_spec(resolved).describe() == 'gptq w4g64'
  tiny = config_lib.tiny_config()
  assert config.resolve(CompressConfig(quant='gptq'), tiny).group_size == 64
  assert config.resolve(CompressConfig(group_size=-1), cfg).group_size == -1


@pytest.mark.slow
def test_help_examples_validate(tmp_path):
  """The command lines of ``experiments.compress``'s docstring pass the check on the default
  model."""
  doc = compress_cli.__doc__.split('\n\n')
  commands = [' '.join(part.replace('\\\n', ' ').split()) for part in doc
              if 'python -m experiments.compress' in part]
  assert len(commands) == 2
  for command in commands:
    argv = [a for a in command.split()[3:] if not a.startswith('--out_dir')]
    _, problems = _check_flags([*argv, f'--out_dir={tmp_path / "out"}'])
    assert problems == [], (command, problems)


@pytest.mark.slow
def test_gguf_header_config_matches_the_gguf_reader():
  import gguf  # pylint: disable=g-import-not-at-top
  from models import assets  # pylint: disable=g-import-not-at-top
  path = assets.smollm2_gguf()
  reader = gguf.GGUFReader(str(path))
  meta = {k: loading._gguf_value(f)  # pylint: disable=protected-access
          for k, f in reader.fields.items()}
  expected = config_lib.from_gguf_metadata(meta, {t.name for t in reader.tensors})
  t0 = time.perf_counter()
  assert loading.load_config('smollm2-135m') == expected
  assert time.perf_counter() - t0 < 0.5


def test_evaluate_reads_a_saved_model(paths):
  """``run(..., save=DIR)`` writes what ``experiments.evaluate --model=DIR`` (and ``load_model``)
  read: the same perplexity as the compressed model in the run; compressing it again is refused."""
  c = CompressConfig(model='tiny-llama', quant='rtn', bits=4, calib_data=paths['corpus'],
                     calib_samples=4, calib_seqlen=32, eval_data=(paths['corpus'],), eval_seqlen=32,
                     eval_windows=2, probes='none', batch_size=2)
  res = compress_lib.run(c, out_dir=paths['out'], save=paths['save'])
  assert res['config']['group_size'] == 64 and res['method'] == 'rtn w4g64'
  assert loading.load_config(paths['save']) == config_lib.tiny_config()
  out = evaluate_exp.run(model=paths['save'], eval_data=[paths['corpus']], eval_seqlen=32,
                         eval_windows=2, batch_size=1, probes='none')
  np.testing.assert_allclose(out['ppl'], res['ppl_compressed'], rtol=1e-4)
  problems = config.validate(CompressConfig(model=paths['save'], quant='rtn'))
  assert len(problems) == 1 and 'is a compressed checkpoint (rtn w4g64)' in problems[0]
