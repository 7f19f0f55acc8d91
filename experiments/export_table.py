r"""Every export format x every compression it can hold, loaded by the third-party library it is
for, against our logits: the table of what works where.

  python -m experiments.export_table --model=smollm2-135m --out_dir=results/exports

For each compression (RTN, GPTQ with and without act-order, 3-bit, AWQ, SparseGPT 2:4 alone and
with 4-bit GPTQ, unstructured Wanda, GPTQ + EoRA) it writes every format (``hf``, ``gptq``,
``compressed-tensors``, ``peft`` on each base) or records the one-line refusal, loads every export
in one separate process (:mod:`experiments.third_party`: transformers, its GPTQ integration through
GPTQModel's torch kernel, its compressed-tensors integration, PEFT) and compares the logits on
``--eval_tokens`` tokens of the python-docs test split with ours. The file size is the export's
safetensors bytes against the dense ``hf`` export's (float32; a bfloat16 dense checkpoint is half
of it). Expect ~10-15 min on 2 CPU cores for SmolLM2-135M.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app, flags
import jax.numpy as jnp
import numpy as np

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import common
from kernels import QuantSpec
from models import export
from models import llama
from models import loading
from recover import compensate

L = rules_lib.LinearSpec


def compressions(group_size: int) -> dict[str, tuple[L, int]]:
  """``{name: (spec, EoRA rank or 0)}`` of the table's rows."""
  q4 = QuantSpec(bits=4, group_size=group_size)
  sp24 = PruneSpec(n=2, m=4)
  return {
      'rtn w4': (L(quant='rtn', qspec=q4), 0),
      'gptq w4 act-order': (L(quant='gptq', qspec=q4, act_order=True), 0),
      'gptq w3 sym': (L(quant='gptq', qspec=QuantSpec(bits=3, group_size=group_size,
                                                       symmetric=True)), 0),
      'awq w4': (L(quant='awq', qspec=q4), 0),
      'sparsegpt 2:4': (L(prune='sparsegpt', sparsity=sp24), 0),
      'sparsegpt 2:4 + gptq w4': (L(prune='sparsegpt', sparsity=sp24, quant='gptq', qspec=q4), 0),
      'wanda 50%': (L(prune='wanda', sparsity=PruneSpec(sparsity=0.5)), 0),
      'gptq w4 + eora r32': (L(quant='gptq', qspec=q4), 32),
  }


LOADED_BY = {
    'hf': 'transformers',
    'gptq': 'transformers GPTQ (GPTQModel, torch kernel)',
    'compressed-tensors': 'transformers compressed-tensors',
}
TARGETS = [('hf', 'hf'), ('gptq', 'hf'), ('compressed-tensors', 'hf'), ('peft', 'hf'),
           ('peft', 'gptq'), ('peft', 'compressed-tensors')]


def _size(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob('*.safetensors'))


def run(*, model: str, calib_samples: int, calib_seqlen: int, eval_tokens: int,
        group_size: int, work_dir: str, only: Sequence[str] = ()) -> dict[str, Any]:
  """All the logic; reads no flags."""
  t0 = time.time()
  loaded = loading.load_model(model)
  cfg, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer()
  calib = common.calibration_for(tokenizer, 'python-docs', calib_samples, calib_seqlen, 0)
  tokens = common.eval_windows_for(tokenizer, 'python-docs', eval_tokens, 1)
  work = pathlib.Path(work_dir)
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  np.save(work / 'tokens.npy', tokens)
  dense_size = _size(export.save(work / 'dense', 'hf', params, cfg))
  rows, jobs, ours = [], [], {}
  for name, (spec, rank) in compressions(group_size).items():
    if only and name not in only:
      continue
    recovery = compensate.Compensator(method='eora', rank=rank) if rank else None
    compressed, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec),
                                            recovery=recovery)
    ours[name] = np.asarray(llama.forward(compressed, jnp.asarray(tokens), cfg))
    for fmt, base in TARGETS:
      if (fmt == 'peft' and not rank) or (rank and fmt in export.QUANTIZED_FORMATS):
        continue  # peft needs adapters; packed formats cannot merge them (peft on those bases)
      label = fmt if fmt != 'peft' else f'peft on {base}'
      slug = common.slug(f'{name} {label}')
      row = {'method': name, 'format': label}
      try:
        path = export.save(work / slug, fmt, compressed, cfg, peft_base=base,
                           merge_adapters=fmt == 'hf')
      except export.ExportError as e:
        rows.append(dict(row, loaded_by='refused', note=str(e)))
        continue
      job_base = path / 'base' if fmt == 'peft' else path
      jobs.append({'base': str(job_base), 'adapter': str(path / 'adapter') if fmt == 'peft'
                   else None, 'tokens': str(work / 'tokens.npy'), 'out': str(work / f'{slug}.npy')})
      rows.append(dict(row, slug=slug, size_mb=_size(path) / 2**20,
                       size_vs_dense=_size(path) / dense_size,
                       loaded_by=LOADED_BY[base if fmt == 'peft' else fmt] +
                       (' + peft' if fmt == 'peft' else '')))
  (work / 'jobs.json').write_text(json.dumps(jobs))
  print(f'loading {len(jobs)} exports with the third-party libraries ...', flush=True)
  proc = subprocess.run([sys.executable, '-m', 'experiments.third_party', str(work / 'jobs.json')],
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'the third-party loaders failed:\n{proc.stderr[-4000:]}')
  for row in rows:
    slug = row.pop('slug', None)
    if slug is None:
      continue
    got = np.load(work / f'{slug}.npy')
    want = ours[row['method']]
    row['max_abs_logit_diff'] = float(np.max(np.abs(got - want)))
    row['max_abs_logit'] = float(np.max(np.abs(want)))
    row['top1_agreement'] = float(np.mean(got.argmax(-1) == want.argmax(-1)))
  return {'model': model, 'rows': rows, 'eval_tokens': int(tokens.size),
          'calib': f'python-docs {calib_samples} x {calib_seqlen}', 'group_size': group_size,
          'dense_hf_mb': dense_size / 2**20, 'seconds': time.time() - t0}


COLUMNS = ['method', 'format', 'loaded_by', 'max_abs_logit_diff', 'max_abs_logit',
           'top1_agreement', 'size_mb', 'size_vs_dense', 'note']
FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('model', 'smollm2-135m', 'Model name, checkpoint directory or .gguf file.')
  flags.DEFINE_integer('calib_samples', 32, 'Calibration sequences (python-docs train).')
  flags.DEFINE_integer('calib_seqlen', 256, 'Calibration sequence length.')
  flags.DEFINE_integer('eval_tokens', 256, 'Tokens the logits are compared on (python-docs test).')
  flags.DEFINE_integer('group_size', 64, 'Quantization group size.')
  flags.DEFINE_list('only', [], 'Only these compressions (names as in the table).')
  flags.DEFINE_string('work_dir', None, 'Where the exports are written (default OUT_DIR/work, '
                      'removed at the end).')
  flags.DEFINE_string('out_dir', 'results/exports', 'Where results.json and table.md go.')


def main(argv: Sequence[str]):
  del argv
  common.quiet_logs()
  work = FLAGS.work_dir or str(pathlib.Path(FLAGS.out_dir) / 'work')
  res = run(model=FLAGS.model, calib_samples=FLAGS.calib_samples, calib_seqlen=FLAGS.calib_seqlen,
            eval_tokens=FLAGS.eval_tokens, group_size=FLAGS.group_size, work_dir=work,
            only=FLAGS.only)
  if not FLAGS.work_dir:
    shutil.rmtree(work, ignore_errors=True)
  common.write_results(FLAGS.out_dir, res, rows=res['rows'], columns=COLUMNS,
                       flags=common.flag_values(FLAGS),
                       title=f'Exports of {FLAGS.model} loaded by third-party libraries')
  print(common.markdown_table(res['rows'], COLUMNS))


if __name__ == '__main__':
  define_flags()
  app.run(main)
