"""Several processes as one run (``jax.distributed``, gloo collectives on CPU).

Two processes on localhost, one CPU device each, run the main command (GPTQ on a 4-block tiny
model, ``--mesh=data:2``) and give the result of one process with the same mesh on two devices;
a run killed in one process resumes on two processes, and on one. The pieces (batches from each
process's rows, gathering, checkpoints, the checks) run in two processes of this module
(``python -m tests.test_multihost PORT INDEX OUT``); the settings checks and each process's part of
a batch are also tested in this process.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from models import checkpoint
from models import distributed
from models import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = 4
TIMEOUT_S = 300


# --------------------------------------------------------------------------- in this process


@pytest.mark.parametrize('settings, match', [
    (distributed.Settings(coordinator_address='localhost:1234', num_processes=2, process_id=2),
     'must be below --num_processes=2'),
    (distributed.Settings(num_processes=0), 'must be at least 1'),
    (distributed.Settings(coordinator_address='localhost', num_processes=2, process_id=0),
     'is not HOST:PORT'),
    (distributed.Settings(mode='off', process_id=1), '--distributed=off runs one process'),
    (distributed.Settings(mode='sometimes'), 'is not one of'),
])
def test_bad_settings_are_named_in_one_line(settings, match, monkeypatch):
  for var in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES',
              'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  problems = distributed.settings_problems(settings)
  assert any(match in p for p in problems), problems
  assert all('\n' not in p for p in problems)
  with pytest.raises(ValueError, match=match):
    distributed.initialize(settings)


def test_settings_and_environment(monkeypatch):
  for var in ('SLURM_JOB_ID', 'SLURM_PROCID', 'SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES',
              'TPU_PROCESS_ADDRESSES', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  assert distributed.detect_environment() is None
  assert not distributed.wanted(distributed.Settings())
  assert distributed.settings_problems(distributed.Settings(num_processes=2)) == [
      'several processes need --coordinator_address, --process_id too (no cluster environment '
      'such as SLURM or a TPU slice was detected to supply them)']
  assert not distributed.wanted(distributed.Settings(num_processes=1))
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_PROCID', '0')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.detect_environment() is None  # one task: one process
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert distributed.detect_environment() == 'slurm'
  assert distributed.wanted(distributed.Settings())
  assert not distributed.wanted(distributed.Settings(mode='off'))
  assert distributed.settings_problems(distributed.Settings(num_processes=4)) == []
  # One process: nothing starts, and the writer is this process.
  assert distributed.initialize(distributed.Settings(mode='off')) is False
  assert distributed.is_writer() and distributed.process_count() == 1


def test_each_process_gets_its_part_of_every_batch():
  rows = [distributed.process_rows(12, 4, count=2, index=i) for i in range(2)]
  np.testing.assert_array_equal(rows[0], [0, 1, 4, 5, 8, 9])
  np.testing.assert_array_equal(rows[1], [2, 3, 6, 7, 10, 11])
  # The parts, batch by batch in process order, are the batches.
  batches = [np.concatenate([r[2 * b:2 * b + 2] for r in rows]) for b in range(3)]
  np.testing.assert_array_equal(np.concatenate(batches), np.arange(12))
  np.testing.assert_array_equal(distributed.process_rows(6, 4, count=2, index=1), [2, 3, 5])
  with pytest.raises(ValueError, match='does not split over 2 processes'):
    distributed.process_rows(8, 3, count=2, index=0)
  with pytest.raises(ValueError, match='last batch'):
    distributed.process_rows(9, 4, count=2, index=0)
  # Evaluation shares: contiguous, as even as possible, every item once.
  shares = [range(7)[distributed.process_share(7, count=3, index=i)] for i in range(3)]
  assert [list(r) for r in shares] == [[0, 1, 2], [3, 4], [5, 6]]
  assert len(range(1)[distributed.process_share(1, count=2, index=1)]) == 0
  np.testing.assert_array_equal(distributed.sum_over_processes([1.5, 2.0]), [1.5, 2.0])
  # One process: its part is everything, and a local batch is the batch.
  x = np.arange(24.0).reshape(6, 4)
  np.testing.assert_array_equal(distributed.process_part(x, 2), x)
  np.testing.assert_array_equal(np.asarray(sharding.batch(x[:2], local=True)), x[:2])
  assert distributed.local_placement(sharding.active()) is sharding.active()
  tree = {'a': jax.device_put(np.ones(3, np.float32), jax.devices()[0]), 'b': np.zeros(2)}
  local = distributed.to_local(tree)
  assert not local['a'].committed and local['b'] is tree['b']


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  if devices > 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _command(setup, out, save, *extra):
  corpus, model = setup
  return [sys.executable, '-m', 'experiments.compress', f'--model={model}',
          f'--calib_data={corpus}', '--calib_samples=8', '--calib_seqlen=32',
          f'--eval_data={corpus}', '--eval_seqlen=32', '--eval_windows=2', '--probes=none',
          '--batch_size=4', '--quant=gptq', '--bits=4', '--group_size=32', '--mesh=data:2',
          f'--out_dir={out}', f'--save={save}', *extra]


def _start(cmd, env, log: pathlib.Path) -> subprocess.Popen:
  with open(log, 'w') as f:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def _finish(procs, logs) -> None:
  deadline = time.time() + TIMEOUT_S
  try:
    for proc, log in zip(procs, logs):
      proc.wait(timeout=max(1.0, deadline - time.time()))
      assert proc.returncode == 0, log.read_text()[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _one_process(setup, tmp, name, *extra):
  """One process with two CPU devices (the same mesh, data:2)."""
  out, save, log = tmp / name, tmp / f'{name}_model', tmp / f'{name}.log'
  _finish([_start(_command(setup, out, save, *extra), _env(devices=2), log)], [log])
  return out, save


def _two_processes(setup, tmp, name, *extra, kill_after_block=False, stage='checkpoint'):
  """Two processes, one CPU device each. ``kill_after_block``: SIGKILL process 1 as soon as the
  first checkpoint of ``stage`` (the compression's, or a training stage's) is in place, then
  process 0 (a job dies whole)."""
  out, save = tmp / name, tmp / f'{name}_model'
  port = _free_port()
  logs = [tmp / f'{name}.{i}.log' for i in range(2)]
  procs = [_start(_command(setup, out, save, f'--coordinator_address=localhost:{port}',
                           '--num_processes=2', f'--process_id={i}', *extra), _env(), logs[i])
           for i in range(2)]
  if not kill_after_block:
    _finish(procs, logs)
    return out, save, logs
  deadline = time.time() + TIMEOUT_S
  try:
    while not (out / stage / 'state').exists():
      assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
      assert time.time() < deadline, 'no checkpoint appeared'
      time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    time.sleep(1.0)  # process 0 fails in its next collective with the peer gone
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return out, save, logs


def _worker(port: int, index: int, out: str) -> None:
  """One of two processes of :func:`test_the_pieces_across_two_processes`: writes what it saw."""
  from experiments import config as run_config  # pylint: disable=g-import-not-at-top
  assert distributed.initialize(distributed.Settings(
      coordinator_address=f'localhost:{port}', num_processes=2, process_id=index))
  placement = sharding.Placement.create('data:2')
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  gram = jax.jit(lambda b: b.T @ b)
  seen = {'writer': distributed.is_writer(), 'spans': placement.spans_processes,
          'local_mesh': distributed.local_placement(placement).mesh is None}
  with sharding.use(placement):
    whole = sharding.batch(x)  # the same value everywhere: each process reads its rows
    parts = [sharding.batch(p, local=True) for p in np.split(distributed.process_part(x, 4), 2)]
    seen['gram_whole'] = np.asarray(gram(whole)).tolist()  # replicated: fetched on every host
    seen['gram_parts'] = (np.asarray(gram(parts[0])) + np.asarray(gram(parts[1]))).tolist()
    seen['gathered'] = distributed.gather(jax.jit(lambda b: b * 2)(whole)).tolist()
    seen['summed'] = distributed.sum_over_processes([index + 0.1, 1e8 + 1e-3]).tolist()
    with sharding.use(sharding.Placement(placement.mesh, 'host')):
      seen['offloaded'] = sharding.activations(jax.jit(lambda b: b + 1)(whole)).tolist()
    local = distributed.to_local({'g': gram(whole)})['g']
    seen['to_local'] = bool(local.is_fully_addressable and not local.committed)
    # A checkpoint of a batch split over the processes, written by both, read by both.
    checkpoint.save_tree(f'{out}.ckpt', {'x': whole, 'n': 3})
    tree, _ = checkpoint.load_tree(f'{out}.ckpt')
    seen['restored'] = np.asarray(tree['x']).tolist() == x.tolist() and int(tree['n']) == 3
  base = dict(model='tiny-llama', calib_data='shakespeare', eval_data=('shakespeare',),
              calib_seqlen=32, eval_seqlen=32, quant='rtn', group_size=32, probes='none')
  seen['problems'] = run_config.validate(run_config.CompressConfig(
      **base, mesh='data:1', batch_size=3, coordinator_address=f'localhost:{port}',
      num_processes=2, process_id=index))
  with open(f'{out}.{index}.json', 'w') as f:
    json.dump(seen, f)


@pytest.mark.slow
def test_the_pieces_across_two_processes(tmp_path):
  """Batches from each process's rows, gathering, offload, local copies, checkpoints and the
  checks of a run of several processes, in two processes of one CPU device each."""
  port, out = _free_port(), str(tmp_path / 'seen')
  logs = [tmp_path / f'{i}.log' for i in range(2)]
  worker = [sys.executable, '-m', 'tests.test_multihost', str(port)]
  _finish([_start(worker + [str(i), out], _env(), logs[i]) for i in range(2)], logs)
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  for i in range(2):
    seen = json.loads(pathlib.Path(f'{out}.{i}.json').read_text())
    assert seen['writer'] == (i == 0) and seen['spans'] and seen['local_mesh']
    np.testing.assert_array_equal(seen['gram_whole'], x.T @ x)
    np.testing.assert_allclose(seen['gram_parts'], x.T @ x, rtol=1e-6)
    np.testing.assert_array_equal(seen['gathered'], 2 * x)
    np.testing.assert_allclose(seen['summed'], [1.2, 2e8 + 2e-3], rtol=1e-15)  # float64 sums
    np.testing.assert_array_equal(seen['offloaded'], x + 1)
    assert seen['to_local'] and seen['restored']
    problems = seen['problems']
    assert any('uses 1 of the 2 devices of 2 processes' in p for p in problems), problems
    assert any('--batch_size=3 is not a multiple of the number of processes (2)' in p
               for p in problems), problems


def _compare(got_save, ref_save, got_out, ref_out, exact: bool, exact_metrics: bool | None = None):
  """Saved leaves and results against a reference run; ``exact``: bit for bit (``exact_metrics``:
  the evaluation too, default as ``exact``)."""
  exact_metrics = exact if exact_metrics is None else exact_metrics
  got, _ = checkpoint.load_tree(got_save)
  ref, _ = checkpoint.load_tree(ref_save)
  got, ref = jax.tree.leaves(got), jax.tree.leaves(ref)
  assert len(got) == len(ref)
  for a, b in zip(got, ref):
    a, b = np.asarray(a), np.asarray(b)
    if exact or a.dtype.kind in 'iub':  # codes, zeros: identical
      np.testing.assert_array_equal(a, b)
    elif a.size:
      assert np.max(np.abs(a - b)) <= 1e-5 * max(float(np.max(np.abs(b))), 1e-30)
  res = json.loads((got_out / 'results.json').read_text())
  ref_res = json.loads((ref_out / 'results.json').read_text())
  for key in ('ppl_dense', 'ppl_compressed', 'kl_compressed', 'top1_compressed', 'eval_tokens',
              'calibration_sha256', 'mesh'):
    if exact_metrics or isinstance(ref_res[key], str):
      assert res[key] == ref_res[key], key
    else:  # KL near zero: float32 rounding of the log-probabilities, ~1e-8 absolute
      slack = 1e-7 if key == 'kl_compressed' else 0.0
      assert abs(res[key] - ref_res[key]) <= 1e-5 * abs(ref_res[key]) + slack, key
  return res


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A corpus and a saved 4-block tiny model (so that a kill lands between blocks)."""
  from models import config as config_lib  # pylint: disable=g-import-not-at-top
  from models import llama  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('multihost')
  words = ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'compress', 'recover', 'layer']
  corpus = tmp / 'corpus.txt'
  corpus.write_text(' '.join(np.random.default_rng(0).choice(words, size=6000)) + '\n')
  cfg = config_lib.tiny_config(num_layers=LAYERS)
  checkpoint.save_model(tmp / 'model', llama.init_params(cfg, jax.random.key(0)), cfg,
                        {'model': 'tiny-llama'})
  return corpus, tmp / 'model'


@pytest.fixture(scope='module')
def uninterrupted(setup, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('runs')
  return tmp, _one_process(setup, tmp, 'one'), _two_processes(setup, tmp, 'two')


@pytest.mark.slow
def test_two_processes_give_the_result_of_one(uninterrupted):
  _, (one_out, one_save), (two_out, two_save, logs) = uninterrupted
  res = _compare(two_save, one_save, two_out, one_out, exact=False)
  assert res['processes'] == 2 and res['complete']
  assert res['eval_windows_per_process'] == [1, 1]  # each process evaluated its share
  # Process 0 alone wrote the results (nothing was moved aside, process 1 reported nothing).
  assert sorted(p.name for p in two_out.glob('results*.json')) == ['results.json']
  assert 'wrote' in logs[0].read_text() and 'wrote' not in logs[1].read_text()


@pytest.mark.slow
def test_a_run_killed_in_one_process_resumes(setup, uninterrupted):
  tmp, _, (two_out, two_save, _) = uninterrupted
  every_block = '--checkpoint_every_s=0'
  out, save, _ = _two_processes(setup, tmp, 'killed', every_block, kill_after_block=True)
  state = checkpoint.load_metadata(out / 'checkpoint' / 'state')['metadata']
  assert 1 <= state['next'] < LAYERS, state['next']  # killed during the compression
  copy = tmp / 'killed_copy'
  shutil.copytree(out, copy)
  # Both processes rerun: they resume after the saved blocks and end where the run without
  # interruption ends, bit for bit.
  out, save, _ = _two_processes(setup, tmp, 'killed', every_block)
  _compare(save, two_save, out, two_out, exact=True)
  # The checkpoint the two processes wrote resumes in one process (same mesh) as well: the same
  # weights bit for bit; its evaluation runs whole in one process (two split it: float rounding).
  out1, save1 = _one_process(setup, tmp, 'killed_copy', every_block)
  _compare(save1, two_save, out1, two_out, exact=True, exact_metrics=False)


TRAIN = ('--reconstruct=block', '--recon_samples=8', '--recon_batch=4', '--recon_lr=1e-3',
         '--finetune=lora', '--ft_steps=3', '--ft_samples=8', '--lora_rank=4')


@pytest.mark.slow
def test_training_spans_the_processes(setup, tmp_path):
  """Block reconstruction then LoRA fine-tuning on the mesh of two processes (every batch split
  across them, the gradients all-reduced) give the trained model of one process with the same
  mesh on two devices; a run killed during the reconstruction resumes."""
  one_out, one_save = _one_process(setup, tmp_path, 'one', *TRAIN)
  two_out, two_save, _ = _two_processes(setup, tmp_path, 'two', *TRAIN)
  every = '--checkpoint_every_s=0'
  out, _, _ = _two_processes(setup, tmp_path, 'killed', *TRAIN, every, kill_after_block=True,
                             stage='recon_checkpoint')
  state = checkpoint.load_metadata(out / 'recon_checkpoint' / 'state')['metadata']
  assert 1 <= state['next'] < LAYERS, state['next']  # killed during the reconstruction
  out, save, _ = _two_processes(setup, tmp_path, 'killed', *TRAIN, every)
  _compare(save, two_save, out, two_out, exact=True)
  res = _compare(two_save, one_save, two_out, one_out, exact=False)
  ref = json.loads((one_out / 'results.json').read_text())
  assert res['train_mesh'] == ref['train_mesh'] == 'data:2,model:1'
  assert res['train_processes'] == 2 and ref['train_processes'] == 1
  assert res['processes'] == 2 and res['tokens_seen'] == ref['tokens_seen'] > 0
  for key in ('ppl_recovered', 'kl_recovered'):
    assert abs(res[key] - ref[key]) <= 1e-5 * abs(ref[key]) + 1e-7, key
  # The training changed the model: the recovered model is not the compressed one.
  assert res['ppl_recovered'] != res['ppl_compressed']
  for a, b in zip(res['windows'], ref['windows']):
    assert a['name'] == b['name']
    np.testing.assert_allclose(a['loss_after'], b['loss_after'], rtol=1e-4)


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
