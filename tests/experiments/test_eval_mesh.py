"""``experiments.evaluate`` and ``experiments.lm_eval`` with ``--mesh``: on 8 simulated CPU devices
(data:8, data:4,model:2) the same perplexities, probe and lm-eval accuracies, log-likelihoods and
generations as on one; a bad ``--mesh`` is one ``error:`` line before the model loads.

The 8 devices exist only in a process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (as tests/test_mesh.py runs
tests/mesh_check.py): this module, run as

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m tests.experiments.test_eval_mesh OUT.json TMP_DIR

does the work on every mesh and writes the results the tests compare.
"""

import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
from tests.utils import write_mc_task

pytest.importorskip('lm_eval')

ROOT = pathlib.Path(__file__).resolve().parents[2]
MESHES = ('data:1', 'data:8', 'data:4,model:2')
EIGHT = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
WORDS = ['the', 'cat', 'is', 'a', 'dog', 'world', 'answer', 'tiny', 'model', 'of']


def _files(tmp: pathlib.Path) -> dict[str, str]:
  """A text corpus, a probe file and a local lm-eval multiple-choice task (``tiny_mc``)."""
  rng = random.Random(0)
  words = lambda lo, hi: ' '.join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
  (tmp / 'corpus.txt').write_text(words(3000, 3000) + '\n')
  probes = [{'context': words(2, 8), 'choices': [' ' + words(1, 3) for _ in range(3)],
             'gold': rng.randrange(3)} for _ in range(5)]
  (tmp / 'probes.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in probes))
  tasks = tmp / 'tasks'
  docs = [{'question': words(2, 20), 'choices': [words(1, 4) for _ in range(3)],
           'gold': rng.randrange(3)} for _ in range(12)]
  write_mc_task(tasks, docs)
  return {'corpus': str(tmp / 'corpus.txt'), 'probes': str(tmp / 'probes.jsonl'),
          'tasks': str(tasks)}


def main(path: str, tmp: str) -> None:
  """Both scripts' ``run`` and the lm-eval model's requests on every mesh of :data:`MESHES`."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  from experiments import evaluate, lm_eval  # pylint: disable=g-import-not-at-top
  from models import harness, sharding  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  files = _files(pathlib.Path(tmp))
  pairs = [(f'{w} is', f' {v}') for w, v in zip(WORDS, reversed(WORDS))] * 2  # 20: ragged 4
  prompts = [f'the {w} of' for w in WORDS[:5]]  # 5 rows: padded to 8 by greedy_generate
  out = {}
  for mesh in MESHES:
    ev = evaluate.run(model='tiny-llama', eval_data=[files['corpus']], eval_seqlen=32,
                      eval_windows=12, batch_size=8, probes=files['probes'], mesh=mesh)
    lm = lm_eval.run(model='tiny-llama', tasks=['tiny_mc'], include_path=files['tasks'],
                     limit=10, batch_size=8, max_length=64, bootstrap_iters=0, mesh=mesh,
                     out_dir=f'{tmp}/lm_eval_{mesh}')
    with sharding.use(sharding.Placement.create(mesh)):
      model = harness.CompressRecoverLM(model='tiny-llama', batch_size=8, max_length=64,
                                        max_gen_toks=6)
      ll = model.loglikelihood([Instance('loglikelihood', {}, p, i) for i, p in enumerate(pairs)],
                               disable_tqdm=True)
      gen = model.generate_until([Instance('generate_until', {}, (p, {'until': ['\n']}), i)
                                  for i, p in enumerate(prompts)], disable_tqdm=True)
      params_sharding = str(jax.tree.leaves(model.params)[0].sharding)
    saved = json.loads(pathlib.Path(f'{tmp}/lm_eval_{mesh}/results.json').read_text())
    out[mesh] = {'ppl': ev['ppl'], 'eval_tokens': ev['eval_tokens'], 'mesh': ev['mesh'],
                 'probe_acc': [ev['probe_acc'], ev['probe_acc_norm']],
                 'lm_eval': {r['metric']: r['value'] for r in lm['rows']},
                 'lm_eval_mesh': saved['mesh'], 'loglikelihood': [x for x, _ in ll],
                 'greedy': [g for _, g in ll], 'generated': gen, 'params': params_sharding}
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)


@pytest.fixture(scope='module')
def mesh_results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('eval_mesh')
  proc = subprocess.run([sys.executable, '-m', 'tests.experiments.test_eval_mesh',
                         str(tmp / 'out.json'), str(tmp)], env=EIGHT, cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((tmp / 'out.json').read_text())


def test_evaluate_is_the_same_on_every_mesh(mesh_results):
  one = mesh_results['data:1']
  assert one['mesh'] == 'data:1,model:1' and one['eval_tokens'] == 12 * 31
  for mesh in MESHES[1:]:
    r = mesh_results[mesh]
    assert r['mesh'] == mesh + (',model:1' if 'model' not in mesh else '')
    assert r['eval_tokens'] == one['eval_tokens']
    assert abs(r['ppl'] - one['ppl']) / one['ppl'] < 1e-5, (mesh, r['ppl'], one['ppl'])
    assert r['probe_acc'] == one['probe_acc'], mesh


def test_lm_eval_is_the_same_on_every_mesh(mesh_results):
  one = mesh_results['data:1']
  assert set(one['lm_eval']) == {'acc', 'acc_norm'} and one['lm_eval_mesh'] == 'data:1,model:1'
  for mesh in MESHES[1:]:
    r = mesh_results[mesh]
    assert r['lm_eval'] == one['lm_eval'], mesh
    assert r['lm_eval_mesh'] == r['mesh'], mesh
    assert r['greedy'] == one['greedy'] and r['generated'] == one['generated'], mesh
    np.testing.assert_allclose(r['loglikelihood'], one['loglikelihood'], rtol=1e-5, atol=1e-5)
    assert 'NamedSharding' in r['params'], r['params']  # replicated on the mesh, not device 0


@pytest.mark.parametrize('script,args', [
    ('evaluate', ['--model=tiny-llama', '--mesh=data:3']),  # 3 does not divide --batch_size=8
    ('evaluate', ['--model=tiny-llama', '--mesh=data:16']),  # more devices than there are
    ('lm_eval', ['--model=tiny-llama', '--tasks=tiny_mc', '--mesh=rows:8']),  # no such axis
])
def test_a_bad_mesh_is_one_error_line(script, args, tmp_path):
  files = _files(tmp_path)
  proc = subprocess.run([sys.executable, '-m', f'experiments.{script}', *args,
                         f'--include_path={files["tasks"]}' if script == 'lm_eval' else
                         '--eval_windows=2', f'--out_dir={tmp_path / "out"}'],
                        env=EIGHT, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f'error: {args[-1]}'), lines
  assert not (tmp_path / 'out').exists()


def test_a_bad_mesh_is_reported_before_the_model_loads(tmp_path):
  """The model does not exist: the mesh is what is reported (evaluate checks it first; lm_eval
  reports every problem)."""
  from experiments import evaluate, lm_eval  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'^--mesh=data:999 needs 999 devices'):
    evaluate.run(model=str(tmp_path / 'missing'), eval_data=['x'], eval_seqlen=8, eval_windows=1,
                 mesh='data:999')
  with pytest.raises(lm_eval.LmEvalError) as e:
    lm_eval.run(model=str(tmp_path / 'missing'), tasks=['tiny_mc'],
                include_path=_files(tmp_path)['tasks'], mesh='data:999')
  assert any(p.startswith('--mesh=data:999 needs 999 devices') for p in e.value.problems)
  assert any(p.startswith('--model=') for p in e.value.problems)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
