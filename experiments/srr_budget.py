r"""SRR rank budgets: preserve-then-quantize vs quantize-then-compensate (SVD, EoRA) on SmolLM2 layers.

  python -m experiments.srr_budget --out_dir=results/srr
  python -m experiments.srr_budget --section=global --out_dir=results/srr_global/layers

Expect ~15 min on 2 CPU cores. For a subset of blocks (``--blocks``) the dense model's calibration
statistics are collected once (python-docs train, 32 x 512); then every linear of those blocks is
quantized (RTN, 3-bit g64 and 2-bit g64) and compensated with a rank budget r in {16, 32, 64,
128} by: plain SVD of the error (ZeroQuant-V2), EoRA, and SRR (top-k directions of the
activation-scaled weight preserved, the residual quantized, the remaining r - k ranks spent on
EoRA of the residual's error). The metric is the objective all three address, the relative output
error ``||X (W - W_hat - A B)||_F / ||X W||_F`` on the calibration inputs, averaged over the layers.
A second table sweeps a fixed k against the reference energy rule
``k = floor(r * sum(sigma[:r]^2) / sum(sigma^2))`` and the searched k, at rank 64, 3-bit. A PNG plots
error against rank.

Paper (Cho et al. 2026, arXiv 2602.02001): at equal rank budgets SRR lowers the error of
quantize-then-compensate methods, most at 2-bit and small ranks; the energy rule is close to the
best fixed k. Measuring layer errors instead of downstream accuracy keeps this ablation cheap; the
EoRA tables script gives downstream numbers for SVD/EoRA.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any, Sequence

from absl import app, flags
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from compress import calibration
from compress import quantize
from compress.matrix import relative_error
from experiments import common
from kernels import QuantSpec, formats
from models import llama, loading
from recover import budget as budget_lib
from recover import lowrank

FLAGS = flags.FLAGS
SETTINGS = {'w3g64': QuantSpec(bits=3, group_size=64), 'w2g64': QuantSpec(bits=2, group_size=64)}


def _rel(w, w_total, h) -> float:
  return relative_error(w, w_total, h)


def _layer_stats(model, blocks, calib_samples, calib_seqlen):
  loaded = loading.load_model(model)
  tok = loaded.tokenizer()
  calib = common.calibration_for(tok, 'python-docs', calib_samples, calib_seqlen, 0)
  per_block = calibration.dense_statistics(loaded.params, loaded.config, calib, blocks=list(blocks))
  stats = {(i, k): v for i in blocks for k, v in per_block[i].items()}
  layers = [(i, lin) for i in blocks for lin in llama.LINEAR_NAMES]
  return loaded, stats, layers


def run(*, out_dir: str, blocks: Sequence[int] = (0, 6, 12, 18, 24, 29),
        ranks: Sequence[int] = (16, 32, 64, 128), settings: Sequence[str] = ('w3g64', 'w2g64'),
        k_sweep_rank: int = 64, k_fractions: Sequence[float] = (0.0, 0.125, 0.25, 0.5, 0.75),
        model: str = 'smollm2-135m', calib_samples: int = 32, calib_seqlen: int = 512
        ) -> dict[str, Any]:
  loaded, stats, layers = _layer_stats(model, blocks, calib_samples, calib_seqlen)
  errs: dict[tuple[str, str, int], list[float]] = {}
  ksweep: dict[str, list[float]] = {}
  t0 = time.time()
  for setting in settings:
    qs = SETTINGS[setting]
    for i, lin in tqdm(layers, desc=f'layers {setting}'):
      sub, name = lin.split('/')
      w = jnp.asarray(loaded.params['layers'][i][sub][name]['kernel'], jnp.float32)
      st = stats[(i, llama.LINEAR_INPUTS[lin])]
      h = st.hessian
      basis = lowrank.eigen_basis(h, num_tokens=int(st.num_tokens), name=f'layers/{i}/{lin}')
      w_q = quantize.rtn_dense(w, qs)
      delta = w - w_q
      errs.setdefault((setting, 'none', 0), []).append(_rel(w, w_q, h))

      def quantize_fn(residual):
        q = quantize.rtn(residual, qs)
        return q, formats.dequantize(q)

      max_r = min(max(ranks), *w.shape)
      svd_full = lowrank.svd_compensate(delta, max_r)
      eora_full = lowrank.eora_from_basis(delta, basis, max_r)
      for r in ranks:
        rr = min(r, *w.shape)
        for method, lr in (('svd', svd_full), ('eora', eora_full)):
          ab = lr.a[:, :rr] @ lr.b[:rr]
          errs.setdefault((setting, method, r), []).append(_rel(w, w_q + ab, h))
        q, adapter, _ = lowrank.srr(w, h, rr, quantize_fn, basis=basis, name=f'layers/{i}/{lin}')
        total = formats.dequantize(q) + formats.to_dense(adapter.a) @ formats.to_dense(adapter.b)
        errs.setdefault((setting, 'srr', r), []).append(_rel(w, total, h))
      if setting == settings[0]:
        rr = min(k_sweep_rank, *w.shape)
        for frac in k_fractions:
          k = int(frac * rr)
          q, adapter, _ = lowrank.srr(w, h, rr, quantize_fn, k=k, basis=basis)
          total = formats.dequantize(q) + adapter.a @ adapter.b
          ksweep.setdefault(f'fixed k={frac:g}r', []).append(_rel(w, total, h))
        q, adapter, info = lowrank.srr(w, h, rr, quantize_fn, basis=basis)
        ksweep.setdefault('energy rule', []).append(_rel(w, formats.dequantize(q) + adapter.a @ adapter.b, h))
        ksweep.setdefault('energy rule k/r', []).append(info['k'] / rr)
        q, adapter, info = lowrank.srr_search_k(w, h, rr, quantize_fn, basis=basis)
        ksweep.setdefault('searched', []).append(_rel(w, formats.dequantize(q) + adapter.a @ adapter.b, h))
        ksweep.setdefault('searched k/r', []).append(info['k'] / rr)
  rows = []
  for setting in settings:
    row = {'quant': setting, 'none': float(np.mean(errs[(setting, 'none', 0)]))}
    for r in ranks:
      for method in ('svd', 'eora', 'srr'):
        row[f'{method} r{r}'] = float(np.mean(errs[(setting, method, r)]))
    rows.append(row)
  k_rows = [{'k choice': name, f'mean rel error (r={k_sweep_rank}, {settings[0]})': float(np.mean(v))}
            for name, v in ksweep.items()]
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  common.line_plot(
      out / 'srr_budget.png',
      {f'SmolLM2 layers, RTN {setting}': {
          method.upper(): (list(ranks), [row[f'{method} r{r}'] for r in ranks])
          for method in ('svd', 'eora', 'srr')} for setting, row in zip(settings, rows)},
      xlabel='rank budget', ylabel='mean relative output error', xscale=('log', 2),
      hlines={f'SmolLM2 layers, RTN {setting}': {'no compensation': row['none']}
              for setting, row in zip(settings, rows)})
  (out / 'srr_budget.md').write_text(
      '# SRR vs SVD vs EoRA: mean relative output error over layers\n\n' +
      common.markdown_table(rows) + '\n# SRR k choice\n\n' + common.markdown_table(k_rows))
  return {'rows': rows, 'k_sweep': k_rows, 'layers': len(layers), 'blocks': list(blocks),
          'seconds': time.time() - t0,
          'calib': f'python-docs train {calib_samples}x{calib_seqlen}, dense inputs'}


def run_global(*, out_dir: str, blocks: Sequence[int] = (0, 6, 12, 18, 24, 29),
               settings: Sequence[str] = ('w3g64', 'w2g64'), rank: int = 64, max_rank: int = 256,
               model: str = 'smollm2-135m', calib_samples: int = 32, calib_seqlen: int = 512
               ) -> dict[str, Any]:
  """The model-wide budget on the same layers: uniform rank ``rank`` against the same adapter
  parameters allotted over the layers (``recover.budget.allocate_curves``), for EoRA (ranks only:
  SRR's k = 0 curve) and SRR (k and rank), errors weighed as they are ('absolute') or relative to
  each layer's dense output energy ('relative'). The metric is the mean relative output error over
  the layers, ``sqrt(err / ||X W||^2)`` per layer, with every error from the candidates' curves."""
  loaded, stats, layers = _layer_stats(model, blocks, calib_samples, calib_seqlen)
  t0 = time.time()
  rows, alloc_info = [], {}
  for setting in settings:
    qs = SETTINGS[setting]

    def quantize_fn(residual, qs=qs):
      q = quantize.rtn(residual, qs)
      return q, formats.dequantize(q)

    curves, costs, energies = {}, {}, {}
    for i, lin in tqdm(layers, desc=f'candidates {setting}'):
      sub, name = lin.split('/')
      w = jnp.asarray(loaded.params['layers'][i][sub][name]['kernel'], jnp.float32)
      st = stats[(i, llama.LINEAR_INPUTS[lin])]
      key = f'layers/{i}/{lin}'
      cands = lowrank.srr_candidates(w, st.hessian, max_rank, quantize_fn, rank=rank,
                                     num_tokens=int(st.num_tokens), name=key)
      curves[key] = budget_lib.srr_curves(cands)
      costs[key] = int(w.shape[0] + w.shape[1])
      energies[key] = lowrank.weighted_error(w, st.hessian, num_tokens=int(st.num_tokens)) ** 2
    total = sum(rank * c for c in costs.values())

    def summarize(label, choice, cvs):
      rel = [math.sqrt(max(cvs[n][j].error(r), 0.0) / energies[n]) for n, (j, r) in choice.items()]
      ranks = [r for _, r in choice.values()]
      rows.append({'quant': setting, 'allotment': label, 'mean rel error': float(np.mean(rel)),
                   'adapter_params': int(sum(r * costs[n] for n, (_, r) in choice.items())),
                   'rank_min': min(ranks), 'rank_max': max(ranks),
                   'k_mean': float(np.mean([cvs[n][j].min_rank for n, (j, _) in choice.items()]))})

    eora = {n: [cvs[0]] for n, cvs in curves.items()}  # k = 0: quantize, then EoRA
    summarize('eora uniform', {n: (0, rank) for n in curves}, eora)
    searched = budget_lib.uniform_choice(curves, rank)
    summarize('srr uniform (searched k)', searched, curves)
    for weighting in budget_lib.WEIGHTINGS:
      weights = (None if weighting == 'absolute' else
                 {n: 1.0 / max(e, 1e-30) for n, e in energies.items()})
      for label, cvs, start in (('eora', eora, {n: (0, rank) for n in curves}),
                                ('srr', curves, searched)):
        choice = budget_lib.allocate_curves(cvs, costs, total, weights=weights, starts=[start])
        summarize(f'{label} global {weighting}', choice, cvs)
        alloc_info[f'{setting} {label} {weighting}'] = {n: list(v) for n, v in choice.items()}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'global.md').write_text(
      f'# Uniform rank {rank} vs one budget over the layers (RTN, mean relative output error)\n\n'
      + common.markdown_table(rows))
  return {'rows': rows, 'choices': alloc_info, 'layers': len(layers), 'blocks': list(blocks),
          'seconds': time.time() - t0, 'rank': rank, 'max_rank': max_rank,
          'calib': f'python-docs train {calib_samples}x{calib_seqlen}, dense inputs'}


def define_flags() -> None:
  flags.DEFINE_string('out_dir', 'results/srr', 'Output directory.')
  flags.DEFINE_list('blocks', ['0', '6', '12', '18', '24', '29'], 'Blocks whose linears are measured.')
  flags.DEFINE_list('ranks', ['16', '32', '64', '128'], 'Rank budgets.')
  flags.DEFINE_integer('calib_samples', 32, 'Calibration sequences.')
  flags.DEFINE_enum('section', 'ranks', ['ranks', 'global'],
                    'ranks: the rank and k tables; global: uniform rank 64 vs one budget over '
                    'the layers (write it to its own --out_dir).')


def main(argv):
  del argv
  common.quiet_logs()
  if FLAGS.section == 'global':
    res = run_global(out_dir=FLAGS.out_dir, blocks=[int(b) for b in FLAGS.blocks],
                     calib_samples=FLAGS.calib_samples)
    common.write_results(FLAGS.out_dir, res, rows=res['rows'], flags=common.flag_values(FLAGS),
                         title='SRR and EoRA: uniform rank vs one budget over SmolLM2 layers')
    print((pathlib.Path(FLAGS.out_dir) / 'global.md').read_text())
    return
  res = run(out_dir=FLAGS.out_dir, blocks=[int(b) for b in FLAGS.blocks],
            ranks=[int(r) for r in FLAGS.ranks], calib_samples=FLAGS.calib_samples)
  common.write_results(FLAGS.out_dir, res, rows=res['rows'], flags=common.flag_values(FLAGS),
                       title='SRR rank budgets on SmolLM2-135M')
  print((pathlib.Path(FLAGS.out_dir) / 'srr_budget.md').read_text())


if __name__ == '__main__':
  define_flags()
  app.run(main)
