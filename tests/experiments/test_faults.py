"""Fault tests of the main command: a run killed (SIGKILL) at random points of compression,
reconstruction and fine-tuning, then rerun, ends bit for bit where the uninterrupted run ends."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from models import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]
KILL_FRACTIONS = (0.35, 0.55, 0.75, 0.9)  # of the uninterrupted run's wall time


def _command(corpus, out_dir, save):
  return [sys.executable, '-m', 'experiments.compress', '--model=tiny-llama',
          f'--calib_data={corpus}', '--calib_samples=8', '--calib_seqlen=32',
          f'--eval_data={corpus}', '--eval_seqlen=32', '--eval_windows=2', '--probes=none',
          '--batch_size=2', '--quant=gptq', '--bits=3', '--group_size=32',
          '--reconstruct=block', '--recon_samples=4', '--recon_lr=3e-3',
          '--finetune=lora', '--ft_steps=24', '--ft_samples=4', '--lora_rank=4',
          '--checkpoint_every_s=0', f'--out_dir={out_dir}', f'--save={save}']


def _run(cmd, kill_after=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  if kill_after is None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return None
  time.sleep(kill_after)
  if proc.poll() is not None:
    return 'finished'
  stages = [d for d in ('checkpoint', 'recon_checkpoint', 'ft_checkpoint')
            if (pathlib.Path(cmd[-2].split('=', 1)[1]) / d / 'state').exists()]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return stages[-1] if stages else 'before any checkpoint'


def _leaves(path):
  tree, _ = checkpoint.load_tree(path)
  return jax.tree.leaves(tree)


@pytest.fixture
def corpus(tmp_path):
  rng = np.random.default_rng(0)
  words = ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'compress', 'recover', 'layer']
  path = tmp_path / 'corpus.txt'
  path.write_text(' '.join(rng.choice(words, size=6000)) + '\n')
  return path


def test_kill_and_resume_is_bitwise_the_uninterrupted_run(corpus, tmp_path):
  t0 = time.time()
  _run(_command(corpus, tmp_path / 'ref', tmp_path / 'ref_model'))
  wall = time.time() - t0
  ref = _leaves(tmp_path / 'ref_model')
  ref_results = json.loads((tmp_path / 'ref' / 'results.json').read_text())
  interrupted = []
  for k, frac in enumerate(KILL_FRACTIONS):
    out, save = tmp_path / f'run{k}', tmp_path / f'model{k}'
    cmd = _command(corpus, out, save)
    interrupted.append(_run(cmd, kill_after=frac * wall))
    _run(cmd)  # resumes from whatever the killed run saved
    got = _leaves(save)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    res = json.loads((out / 'results.json').read_text())
    for key in ('ppl_dense', 'ppl_compressed', 'kl_compressed', 'ppl_recovered', 'kl_recovered'):
      assert res[key] == ref_results[key], (key, interrupted[-1])
  # The kills landed in more than one stage (the fractions spread over the run).
  print('interrupted stages:', interrupted)
  assert len(set(interrupted)) >= 2, interrupted


def _config(corpus, **kw):
  from experiments import config
  base = dict(model='tiny-llama', calib_data=str(corpus), calib_samples=8, calib_seqlen=32,
              eval_data=(str(corpus),), eval_seqlen=32, eval_windows=2, probes='none',
              batch_size=2, quant='rtn', bits=3, group_size=32, checkpoint_every_s=0.0)
  if kw.get('reconstruct', 'block') != 'none':
    base.update(reconstruct='block', recon_samples=4, recon_lr=3e-3)
  base.update(kw)
  return config.CompressConfig(**base)


def test_stale_reconstruction_is_never_resumed(corpus, tmp_path):
  """The reported scenario: a reconstruction job rerun with other --rules (and --restart, or with
  checkpoint/ deleted by hand) must not resume the old reconstruction."""
  from experiments import compress_lib
  out = str(tmp_path / 'out')
  first = compress_lib.run(_config(corpus), out_dir=out)
  other = _config(corpus, rules=('.*/mlp/.*=2',))
  fresh = compress_lib.run(other, out_dir=str(tmp_path / 'fresh'))
  assert fresh['ppl_recovered'] != first['ppl_recovered']
  again = compress_lib.run(other, out_dir=out, restart=True)
  assert again['ppl_recovered'] == fresh['ppl_recovered']
  # Deleting only the compression checkpoint by hand: the old reconstruction state belongs to
  # another compressed model, so it is refused, not resumed.
  compress_lib.run(_config(corpus), out_dir=str(tmp_path / 'manual'))
  import shutil
  shutil.rmtree(tmp_path / 'manual' / 'checkpoint')
  with pytest.raises(checkpoint.CheckpointError, match='different run'):
    compress_lib.run(other, out_dir=str(tmp_path / 'manual'))


def test_times_add_up_over_a_resume(corpus, tmp_path):
  from experiments import compress_lib
  out = str(tmp_path / 'out')
  whole = compress_lib.run(_config(corpus, reconstruct='none'), out_dir=out)
  # A second run resumes at the end of every stage: its seconds are those of the first run.
  again = compress_lib.run(_config(corpus, reconstruct='none'), out_dir=out)
  for key in ('compress_seconds', 'numerics_seconds', 'calib_forward_seconds'):
    assert again[key] == whole[key] and whole[key] >= 0, key
  assert whole['compress_seconds'] >= whole['numerics_seconds']


def test_refused_rerun_moves_the_old_results_aside(corpus, tmp_path):
  """A rerun whose flags differ is refused by the checkpoint; the old results.json does not stay
  behind as if it were this run's."""
  out, env = tmp_path / 'out', dict(os.environ, PYTHONPATH=str(ROOT))
  base = [sys.executable, '-m', 'experiments.compress', '--model=tiny-llama',
          f'--calib_data={corpus}', '--calib_samples=4', '--calib_seqlen=32',
          f'--eval_data={corpus}', '--eval_seqlen=32', '--eval_windows=2', '--probes=none',
          '--batch_size=2', '--quant=rtn', '--group_size=32', f'--out_dir={out}']
  first = subprocess.run(base + ['--bits=3'], cwd=ROOT, env=env, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-2000:]
  old = json.loads((out / 'results.json').read_text())
  assert old['complete'] and old['method'] == 'rtn w3g32'
  second = subprocess.run(base + ['--bits=4'], cwd=ROOT, env=env, capture_output=True, text=True)
  assert second.returncode == 1
  errors = [l for l in second.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'different run' in errors[0] and 'Traceback' not in second.stderr
  assert not (out / 'results.json').exists()
  assert json.loads((out / 'results.previous.json').read_text()) == old
