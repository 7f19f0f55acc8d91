r"""Forward and generation throughput of SmolLM2: our jitted JAX forward vs transformers (torch).

  python -m experiments.bench_forward --out_dir=results/bench_forward

Expect ~4 min on 2 CPU cores. Measures, in the same run and on the same tokens, float32 forward
tokens/s at seqlen 512 with batch 1 and 8 for both implementations (and their ratio), and greedy
generation tokens/s with the KV cache (ours: one jit for prefill + decode loop; torch: ``generate``
with its cache). Timings are the median of ``--repeats`` runs after a warm-up (which includes the
compile). Writes results.json and table.md.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Sequence

from absl import app, flags
import jax
import numpy as np

from experiments import common
from models import llama, loading


def _median_time(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(*, model: str = 'smollm2-135m', batches: Sequence[int] = (1, 8), seqlen: int = 512,
        repeats: int = 3, gen_tokens: int = 64, with_torch: bool = True) -> list[dict[str, Any]]:
  loaded = loading.load_model(model)
  cfg, params = loaded.config, loaded.params
  rng = np.random.default_rng(0)
  fwd = jax.jit(lambda p, t: llama.forward(p, t, cfg))
  hf = None
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count() or 1)
    src = loaded.source.rsplit('/', 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src[0], gguf_file=src[1],
                                                           dtype=torch.float32).eval()
  rows = []
  for b in batches:
    tokens = rng.integers(0, cfg.vocab_size, size=(b, seqlen)).astype(np.int32)
    t_ours = _median_time(lambda: fwd(params, tokens).block_until_ready(), repeats)
    row = {'benchmark': f'forward b={b} T={seqlen}', 'ours_tok_s': b * seqlen / t_ours}
    if hf is not None:
      tt = torch.tensor(tokens, dtype=torch.long)

      def torch_fwd():
        with torch.no_grad():
          hf(tt).logits  # pylint: disable=expression-not-assigned
      t_torch = _median_time(torch_fwd, repeats)
      row.update(torch_tok_s=b * seqlen / t_torch, ratio_ours_over_torch=t_torch / t_ours)
    rows.append(row)
    print(row)

  prompt = rng.integers(0, cfg.vocab_size, size=(1, 32)).astype(np.int32)
  gen = jax.jit(lambda p, t: llama.generate(p, t, cfg, max_new_tokens=gen_tokens))
  t_ours = _median_time(lambda: gen(params, prompt).block_until_ready(), repeats)
  row = {'benchmark': f'greedy generate {gen_tokens} tokens (prompt 32, b=1)',
         'ours_tok_s': gen_tokens / t_ours}
  if hf is not None:
    tp = torch.tensor(prompt, dtype=torch.long)

    def torch_gen():
      with torch.no_grad():
        hf.generate(tp, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)
    t_torch = _median_time(torch_gen, repeats)
    row.update(torch_tok_s=gen_tokens / t_torch, ratio_ours_over_torch=t_torch / t_ours)
  rows.append(row)
  print(row)
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so modules import side-effect free)."""
  flags.DEFINE_string('out_dir', 'results/bench_forward', 'Output directory.')
  flags.DEFINE_list('batches', ['1', '8'], 'Batch sizes of the forward benchmark.')
  flags.DEFINE_integer('seqlen', 512, 'Sequence length.')
  flags.DEFINE_integer('repeats', 3, 'Timed repetitions (median).')
  flags.DEFINE_integer('gen_tokens', 64, 'Generated tokens.')
  flags.DEFINE_bool('torch', True, 'Also time transformers/torch.')


def main(argv):
  del argv
  common.quiet_logs()
  rows = run(batches=[int(b) for b in FLAGS.batches], seqlen=FLAGS.seqlen,
             repeats=FLAGS.repeats, gen_tokens=FLAGS.gen_tokens, with_torch=FLAGS.torch)
  common.write_results(FLAGS.out_dir, {'model': 'smollm2-135m', 'dtype': 'float32',
                                        'cpu_count': os.cpu_count()}, rows=rows,
                       flags=common.flag_values(flags.FLAGS),
                       title='SmolLM2-135M forward/generation throughput, float32')
  print(common.markdown_table(rows))


if __name__ == '__main__':
  define_flags()
  app.run(main)
