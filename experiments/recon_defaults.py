r"""Block reconstruction at the main command's settings: which learning rate closes the gap.

  python -m experiments.recon_defaults --out_dir=results/recon_defaults

Runs the main command (``experiments.compress``) as a user would, ``--prune=wanda --sparsity=2:4
--reconstruct=block`` with every other flag at its default, once per ``--lrs`` value of
``--recon_lr``, and reports the share of the gap to dense that reconstruction closes:
``(ppl_compressed - ppl_recovered) / (ppl_compressed - ppl_dense)``. The default of
``--recon_lr`` is the value this table supports (the paper's 1e-5 is its first row). Expect
~8 min per learning rate on 2 CPU cores (128 x 512 reconstruction sequences, one epoch).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Sequence

from absl import app, flags

from experiments import common
from experiments import compress_lib
from experiments.config import CompressConfig

FLAGS = flags.FLAGS
LRS = (1e-5, 1e-4, 3e-4, 1e-3)


def run(*, out_dir: str, lrs: Sequence[float] = LRS, prune: str = 'wanda', sparsity: str = '2:4',
        **overrides: Any) -> dict[str, Any]:
  """One main-command run per learning rate; ``overrides``: other :class:`CompressConfig` fields
  (the defaults otherwise)."""
  out = pathlib.Path(out_dir)
  done = out / 'results.json'
  # The settings every row shares (all but the learning rate): rows of an earlier run into the
  # same directory are kept only when they were made with the same ones, never reported stale.
  settings = repr(dataclasses.replace(
      CompressConfig(prune=prune, sparsity=sparsity, reconstruct='block', **overrides),
      recon_lr=0.0))
  earlier = json.loads(done.read_text()) if done.exists() else {}
  rows = list(earlier.get('rows', [])) if earlier.get('settings') == settings else []
  results: dict[str, Any] = {'command': f'--prune={prune} --sparsity={sparsity} '
                                        '--reconstruct=block --recon_lr=LR',
                             'defaults': {k: v for k, v in dataclasses.asdict(CompressConfig()).items()
                                          if k.startswith('recon')},
                             'settings': settings}
  results['rows'] = rows
  for lr in lrs:
    if any(r['recon_lr'] == lr for r in rows):
      continue
    c = CompressConfig(prune=prune, sparsity=sparsity, reconstruct='block', recon_lr=lr,
                       **overrides)
    t0 = time.time()
    res = compress_lib.run(c, out_dir=str(out / 'runs' / f'lr{lr:g}'))
    gap = res['ppl_compressed'] - res['ppl_dense']
    rows.append({'recon_lr': lr, 'ppl_dense': res['ppl_dense'],
                 'ppl_compressed': res['ppl_compressed'], 'ppl_recovered': res['ppl_recovered'],
                 'gap_closed': (res['ppl_compressed'] - res['ppl_recovered']) / gap if gap else 0.0,
                 'kl_compressed': res['kl_compressed'], 'kl_recovered': res['kl_recovered'],
                 'probe_acc_recovered': res.get('probe_acc_recovered'),
                 'train_seconds': res.get('train_seconds'), 'run_seconds': time.time() - t0})
    rows.sort(key=lambda r: r['recon_lr'])
    results['rows'] = rows
    common.write_results(out, results, rows=rows, flags={'lrs': list(lrs), 'prune': prune,
                                                         'sparsity': sparsity, **overrides},
                         title=f'Block reconstruction after {prune} {sparsity} at the main '
                               'command\'s defaults, by learning rate')
  return results


def main(argv):
  del argv
  common.quiet_logs()
  res = run(out_dir=FLAGS.out_dir, lrs=[float(x) for x in FLAGS.lrs])
  print(common.markdown_table(res.get('rows', [])))


if __name__ == '__main__':
  flags.DEFINE_list('lrs', [f'{x:g}' for x in LRS], 'Learning rates (--recon_lr) to run.')
  flags.DEFINE_string('out_dir', 'results/recon_defaults', 'Output directory.')
  app.run(main)
