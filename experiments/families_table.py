r"""Every supported family on a tiny random model: parity with transformers and one compression row.

  python -m experiments.families_table --out_dir=results/families

For each family of :mod:`experiments.tiny_families` (transformers' own config classes, random
weights, no download): the largest logit difference to transformers (float32, eager attention)
on a right-padded batch three sliding windows long, whether greedy generation with our KV cache
equals transformers' past the window, and the perplexity on text sampled from the model itself
of the dense model, Wanda 2:4 and GPTQ 4-bit (per output channel), each with and without EoRA
(rank 8). Writes ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import tiny_families as families
from kernels import QuantSpec
from models import evaluate
from models import llama
from models import loading
from models import tree
from recover import compensate

_OUT_DIR = flags.DEFINE_string('out_dir', 'results/families', 'Where results go.')
_FAMILIES = flags.DEFINE_list('families', list(families.FAMILIES + families.MOE_FAMILIES),
                              'Families to run.')

SPECS = {'wanda 2:4': rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec(n=2, m=4)),
         'gptq w4': rules_lib.LinearSpec(quant='gptq', qspec=QuantSpec(bits=4, group_size=-1))}


def _sampled(params, cfg, n: int, seed: int) -> np.ndarray:
  """``[n, 32]`` windows sampled from the model (temperature 1): text it has a perplexity on."""
  start = np.random.default_rng(seed).integers(1, cfg.vocab_size, size=(n, 1))
  gen = llama.generate(params, jnp.asarray(start), cfg, max_new_tokens=31, temperature=1.0,
                       key=jax.random.key(seed))
  return np.concatenate([start, np.asarray(gen)], axis=1)


def one_family(name: str) -> dict:
  """The row of one family."""
  import torch  # pylint: disable=g-import-not-at-top
  row: dict = {'family': name}
  with tempfile.TemporaryDirectory() as tmp:
    model, _ = families.hf_model(name)
    model.save_pretrained(tmp, safe_serialization=True)
    cfg, params = loading.load_hf_dir(tmp)
  row['model_type'] = cfg.model_type
  tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 3 * families.SLIDING_WINDOW))
  mask = np.ones_like(tokens, bool)
  mask[1, -6:] = False
  tokens[1, -6:] = 0
  with torch.no_grad():
    ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits
  ours = np.asarray(llama.forward(params, jnp.asarray(tokens), cfg))
  row['parity_max_abs'] = float(np.abs(ours[mask] - ref.numpy()[mask]).max())
  row['logit_scale'] = float(np.abs(ref.numpy()[mask]).max())

  gen_model, _ = families.hf_model(name, weight_std=0.05)
  with tempfile.TemporaryDirectory() as tmp:
    gen_model.save_pretrained(tmp, safe_serialization=True)
    gcfg, gparams = loading.load_hf_dir(tmp)
  prompt = np.random.default_rng(1).integers(1, gcfg.vocab_size, size=(2, 12))
  n_new = 2 * families.SLIDING_WINDOW
  with torch.no_grad():
    want = gen_model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=int),
                              max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
  got = np.asarray(llama.generate(gparams, jnp.asarray(prompt), gcfg, max_new_tokens=n_new))
  row['generation_equal'] = bool(np.array_equal(got, want.numpy()[:, prompt.shape[1]:]))

  calib, held = _sampled(params, cfg, 64, 0), _sampled(params, cfg, 16, 1)
  ppl = lambda p: float(evaluate.perplexity(p, cfg, held, progress=False)['ppl'])  # noqa: E731
  row['ppl_dense'] = ppl(params)
  for label, spec in SPECS.items():
    t0 = time.time()
    out, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False,
                                     recovery=compensate.Compensator(method='eora', rank=8))
    row[f'ppl {label}'] = ppl(tree.strip_adapters(out))
    row[f'ppl {label} + eora'] = ppl(out)
    row[f'seconds {label}'] = time.time() - t0
  return row


def table(rows: list[dict]) -> str:
  cols = ['family', 'parity (max abs logit diff)', 'generation', 'ppl dense'] + [
      f'ppl {k}{s}' for k in SPECS for s in ('', ' + eora')]
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in rows:
    cells = [r['family'], f'{r["parity_max_abs"]:.1e} (of {r["logit_scale"]:.1f})',
             'identical' if r['generation_equal'] else 'DIFFERS', f'{r["ppl_dense"]:.2f}']
    cells += [f'{r[f"ppl {k}{s}"]:.2f}' for k in SPECS for s in ('', ' + eora')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  out = pathlib.Path(_OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in _FAMILIES.value:
    rows.append(one_family(name))
    print(json.dumps(rows[-1]), flush=True)
  (out / 'results.json').write_text(json.dumps(rows, indent=2) + '\n')
  text = ('Tiny random models of each family (2 blocks, hidden 64, vocabulary 160; '
          '`python -m experiments.families_table`). Parity: largest absolute logit difference to '
          'transformers (float32) on a right-padded batch 3x the sliding window; generation: '
          'greedy with the KV cache, 16 new tokens past the window. Perplexity on 16 windows '
          'sampled from the dense model; calibration 64 x 32 sampled tokens; EoRA rank 8.\n\n')
  (out / 'table.md').write_text(text + table(rows))
  print(table(rows))


if __name__ == '__main__':
  app.run(main)
