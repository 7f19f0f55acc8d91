r"""Compression time on this CPU, side by side with the papers' reference code, in one run.

  python -m experiments.bench_compress_time --reference_root=REFS --out_dir=results/compress_timing

``REFS`` holds checkouts of the reference repositories (their code is run, not copied here)::

  git clone https://github.com/locuslab/wanda REFS/wanda
  git clone https://github.com/IST-DASLab/sparsegpt REFS/sparsegpt
  git clone https://github.com/IST-DASLab/gptq REFS/gptq

On SmolLM2-135M and the same calibration windows (``--calib_samples`` x ``--calib_seqlen`` of
python-docs train), it measures, one after the other on one machine:

* the machine: CPU, cores, load average before and after, and the float32 matmul peak
  (2048-cubed products, JAX and torch);
* a plain forward over the calibration tokens (batch 8): ours (jitted; the median of one
  before each method's run and one after the last, all kept in the JSON) and transformers', with
  their achieved GFLOP/s and share of the peak;
* for Wanda 2:4, SparseGPT 2:4 and GPTQ w3g64 (inputs propagated through the compressed blocks,
  the papers' setting): our pipeline on 1 and on 2 (simulated) devices, each in a fresh process
  (compilation included), its calibration passes against one plain forward; and the reference
  repositories' per-layer code (``WrappedGPT`` and Wanda's 2:4 mask, ``SparseGPT.fasterprune``,
  ``GPTQ.fasterquant`` with their ``Quantizer``) driven by their ``llama_sequential`` loop
  (one sequence per forward, statistics hooks on the linears, a second pass for the outputs),
  with transformers' current layer arguments; ``compile_s`` is our first block's extra time
  (compilation: the later blocks have the same shapes) and ``ratio_without_compile`` the ratio
  once compiled (a second run in one process, or a persistent compilation cache);
  ``calib_passes_over_forward`` is the whole run's time outside the numerics (the statistics
  and output passes and each linear's error report; compilation included) over the plain
  forward (compiled), ``calib_passes_compiled`` the same from the median compiled block;
* where the CPU has bfloat16 dot instructions (``avx512_bf16``): GPTQ with bfloat16 calibration
  passes (float32 statistics), its speed-up and its perplexity cost.

Writes ``results.json`` and ``table.md``; prints the table. Expect ~25 min on 2 cores at the
defaults. Nothing else should run meanwhile: the ratios compare runs made minutes apart.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app, flags
import numpy as np

METHODS = {  # row -> (our flags, reference)
    'wanda 2:4': (dict(prune='wanda', sparsity='2:4'), 'wanda'),
    'sparsegpt 2:4': (dict(prune='sparsegpt', sparsity='2:4'), 'sparsegpt'),
    'gptq w3g64': (dict(quant='gptq', bits=3, group_size=64), 'gptq'),
}
MATMUL_N = 2048


def _cpu() -> dict[str, Any]:
  model = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                if line.startswith('model name')), platform.processor())
  flags_line = next((line for line in open('/proc/cpuinfo') if line.startswith('flags')), '')
  return {'cpu': model, 'cores': os.cpu_count(), 'avx512_bf16': 'avx512_bf16' in flags_line,
          'loadavg': os.getloadavg()}


def _timed(fn, repeats: int) -> float:
  fn()
  t0 = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - t0) / repeats


def matmul_peak() -> dict[str, float]:
  """Float32 GFLOP/s of a 2048-cubed product, JAX and torch (the machine's practical peak)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  a = jnp.ones((MATMUL_N, MATMUL_N), jnp.float32)
  f = jax.jit(jnp.dot)
  flop = 2 * MATMUL_N ** 3
  jax_s = _timed(lambda: f(a, a).block_until_ready(), 10)
  t = torch.ones(MATMUL_N, MATMUL_N)
  torch_s = _timed(lambda: torch.mm(t, t), 10)  # torch uses every core by default
  return {'jax_gflops': flop / jax_s / 1e9, 'torch_gflops': flop / torch_s / 1e9}


def forward_flops(cfg, tokens: int, seqlen: int) -> float:
  """Multiply-adds x 2 of a forward with logits: every linear and the head, and attention's two
  products at full ``seqlen x seqlen`` (computed whole, masked)."""
  from models import llama  # pylint: disable=g-import-not-at-top
  linear = sum(a * b for a, b in llama.linear_shapes(cfg).values()) * cfg.num_layers
  head = cfg.vocab_size * cfg.hidden_size
  attn = 2 * cfg.num_layers * seqlen * cfg.num_heads * cfg.head_dim
  return 2.0 * tokens * (linear + head + attn)


# --------------------------------------------------------------------------- ours (a worker)

def per_block(reports, num_layers: int) -> list[list[Any]]:
  """A compression's per-layer reports grouped by block."""
  return [[r for r in reports if r.name.startswith(f'layers/{i}/')] for i in range(num_layers)]


def first_block_extra(per: Sequence[Sequence[Any]]) -> float | None:
  """Compilation: block 0's wall time against the median of the blocks after it (same shapes,
  compiled); None with one block."""
  blocks = [sum(r.wall_seconds for r in b) for b in per]
  return blocks[0] - float(np.median(blocks[1:])) if len(blocks) > 1 else None

def ours(calib_samples: int, calib_seqlen: int, methods: Sequence[str], devices: int,
         bf16: bool, eval_windows: int) -> dict[str, Any]:
  """Our side, in this process (whose device count the caller set): plain forward and each
  method's pipeline run; with ``bf16`` also GPTQ with bfloat16 passes and both perplexities."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from compress import pipeline  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  from experiments.compress_table import plain_forward_seconds  # pylint: disable=g-import-not-at-top
  from experiments.config import CompressConfig, build_rules, build_spec  # pylint: disable=g-import-not-at-top
  from models import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from models import loading  # pylint: disable=g-import-not-at-top
  from models import sharding  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == devices, jax.devices()
  loaded = loading.load_model('smollm2-135m')
  cfg = loaded.config
  tok = loaded.tokenizer()
  calib = common.calibration_for(tok, 'python-docs', calib_samples, calib_seqlen, 0)
  out: dict[str, Any] = {'devices': devices}
  with sharding.use(sharding.Placement.create(f'data:{devices}', 'none')):
    runs = [(m, 'float32') for m in methods] + ([('gptq w3g64', 'bfloat16')] if bf16 else [])
    plain = []  # the plain forward before every run and after the last: the machine drifts
    for m, dtype in runs:
      if devices == 1:
        plain.append(plain_forward_seconds(loaded, calib, 8))
      c = CompressConfig(model='smollm2-135m', **METHODS[m][0])
      spec = build_spec(c)
      params = loaded.params if dtype == 'float32' else loading.load_model(
          'smollm2-135m', dtype=jnp.bfloat16).params
      t0 = time.perf_counter()
      result, reports = pipeline.compress_model(params, cfg, calib, build_rules(c, spec),
                                                batch_size=8, dtype=jnp.dtype(dtype),
                                                progress=False)
      wall = time.perf_counter() - t0
      s = pipeline.summarize(reports)
      key = m if dtype == 'float32' else f'{m} bf16'
      per = per_block(reports, cfg.num_layers)
      # The passes of one compiled block: its wall time less its numerics and recovery.
      passes = [sum(r.wall_seconds - r.seconds - r.extra.get('recover_seconds', 0.0) for r in b)
                for b in per]
      out[key] = {'seconds': wall, 'calib_forward_s': s['calib_forward_seconds'],
                  'numerics_s': s['numerics_seconds'],
                  'first_block_extra_s': first_block_extra(per),
                  'calib_forward_compiled_s': float(np.median(passes[1:])) * cfg.num_layers}
      if bf16 and m == 'gptq w3g64' and eval_windows:  # the cost of bfloat16 passes
        windows = common.eval_windows_for(tok, 'python-docs', 512, eval_windows)
        result = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x,
                              result)
        out[key]['ppl'] = eval_lib.perplexity(result, cfg, windows, batch_size=4,
                                              progress=False)['ppl']
    if devices == 1:
      plain.append(plain_forward_seconds(loaded, calib, 8))
      out['plain_forward_runs_s'] = plain
      out['plain_forward_s'] = float(np.median(plain))
  return out


def _worker(devices: int, calib_samples: int, calib_seqlen: int, methods: Sequence[str],
            bf16: bool, eval_windows: int) -> dict[str, Any]:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  args = [sys.executable, '-m', 'experiments.bench_compress_time', '--worker',
          f'--devices={devices}', f'--calib_samples={calib_samples}',
          f'--calib_seqlen={calib_seqlen}', f'--methods={",".join(methods)}',
          f'--bf16={bf16}', f'--eval_windows={eval_windows}']
  proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'worker on {devices} devices failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the reference code

def _load(root: pathlib.Path, repo: str, module: str, file: str):
  """``module`` from ``root/repo/file``, with that repository's own ``quant`` module."""
  path = root / repo / file
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: clone {repo} into {root} (see --help)')
  sys.modules.pop('quant', None)
  sys.path.insert(0, str(path.parent))
  try:
    spec = importlib.util.spec_from_file_location(f'ref_{repo}_{module}', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
  finally:
    sys.path.pop(0)
  return mod


def reference(root: pathlib.Path, method: str, hf_model, calib: np.ndarray) -> float:
  """Seconds of the reference code's sequential compression of ``hf_model`` (modified in place)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.cuda.synchronize = lambda *a, **k: None  # the references sync CUDA; this is a CPU
  torch.cuda.empty_cache = lambda *a, **k: None
  if method == 'wanda':
    mod = _load(root, 'wanda', 'layerwrapper', 'lib/layerwrapper.py')
    make = lambda layer: mod.WrappedGPT(layer)  # noqa: E731

    def finish(w):  # lib/prune.py, prune_wanda, n:m branch
      metric = torch.abs(w.layer.weight.data) * torch.sqrt(w.scaler_row.reshape((1, -1)))
      mask = torch.zeros_like(metric) == 1
      for ii in range(metric.shape[1]):
        if ii % 4 == 0:
          tmp = metric[:, ii:(ii + 4)].float()
          mask.scatter_(1, ii + torch.topk(tmp, 2, dim=1, largest=False)[1], True)
      w.layer.weight.data[mask] = 0
  elif method == 'sparsegpt':
    mod = _load(root, 'sparsegpt', 'sparsegpt', 'sparsegpt.py')
    make = lambda layer: mod.SparseGPT(layer)  # noqa: E731

    def finish(g):  # llama.py: fasterprune(args.sparsity, prunen, prunem, percdamp, blocksize)
      g.fasterprune(0.5, prunen=2, prunem=4, percdamp=0.01, blocksize=128)
      g.free()
  else:
    mod = _load(root, 'gptq', 'gptq', 'gptq.py')

    def make(layer):
      g = mod.GPTQ(layer)
      g.quantizer = sys.modules['quant'].Quantizer()
      g.quantizer.configure(3, perchannel=True, sym=False, mse=False)
      return g

    def finish(g):  # llama.py: fasterquant(percdamp, groupsize, actorder, static_groups)
      g.fasterquant(percdamp=0.01, groupsize=64, actorder=False, static_groups=False)
      g.free()

  t0 = time.perf_counter()
  with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
    layers = hf_model.model.layers
    inps, kwargs = [], {}

    class Catcher(nn.Module):  # the inputs of block 0, and the arguments every block gets
      def __init__(self, module):
        super().__init__()
        self.module = module

      def forward(self, x, **kw):
        inps.append(x)
        kwargs.update(kw)
        raise ValueError

    layers[0] = Catcher(layers[0])
    for row in calib:
      try:
        hf_model(torch.tensor(row[None], dtype=torch.long))
      except ValueError:
        pass
    layers[0] = layers[0].module
    kw = {k: v for k, v in kwargs.items()
          if k in ('attention_mask', 'position_ids', 'position_embeddings', 'cache_position')}

    def run(layer, x):
      y = layer(x, **kw)
      return y[0] if isinstance(y, tuple) else y
    for layer in layers:
      subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
      objs = {n: make(m) for n, m in subset.items()}
      handles = [m.register_forward_hook(
          lambda _, inp, out, n=n: objs[n].add_batch(inp[0].data, out.data))
                 for n, m in subset.items()]
      for x in inps:
        run(layer, x)
      for h in handles:
        h.remove()
      for o in objs.values():
        finish(o)
      inps = [run(layer, x) for x in inps]
  return time.perf_counter() - t0


def _hf_model():
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from models import assets  # pylint: disable=g-import-not-at-top
  path = assets.smollm2_gguf()
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32,
      attn_implementation='sdpa').eval()


def torch_forward_seconds(calib: np.ndarray, batch_size: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  model = _hf_model()
  with torch.no_grad():
    model(torch.tensor(calib[:batch_size], dtype=torch.long))
    t0 = time.perf_counter()
    for i in range(0, len(calib), batch_size):
      model(torch.tensor(calib[i:i + batch_size], dtype=torch.long))
  return time.perf_counter() - t0


# --------------------------------------------------------------------------- the table

def run(*, reference_root: str, calib_samples: int, calib_seqlen: int, methods: Sequence[str],
        eval_windows: int) -> dict[str, Any]:
  from experiments import common  # pylint: disable=g-import-not-at-top
  from models import loading  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(reference_root)
  for m in methods:  # a missing checkout fails before any work
    repo = METHODS[m][1]
    if not (root / repo).is_dir():
      raise FileNotFoundError(f'{root / repo} does not exist: clone {repo} into {root} (see --help)')
  machine = _cpu()
  bf16 = machine['avx512_bf16']
  peak = matmul_peak()
  loaded = loading.load_model('smollm2-135m')
  cfg = loaded.config
  calib = common.calibration_for(loaded.tokenizer(), 'python-docs', calib_samples, calib_seqlen, 0)
  tokens = calib_samples * calib_seqlen
  out: dict[str, Any] = {'machine': machine, 'matmul_peak': peak, 'calib_samples': calib_samples,
                         'calib_seqlen': calib_seqlen}
  ours1 = _worker(1, calib_samples, calib_seqlen, methods, bf16, eval_windows)
  ours2 = _worker(2, calib_samples, calib_seqlen, methods, False, 0)
  torch_fwd = torch_forward_seconds(calib, 8)
  flop = forward_flops(cfg, tokens, calib_seqlen)
  plain = ours1['plain_forward_s']
  best = max(peak.values())  # the machine's practical peak: the faster of the two libraries
  out['forward'] = {
      'ours_s': plain, 'torch_s': torch_fwd, 'ours_tok_s': tokens / plain,
      'torch_tok_s': tokens / torch_fwd, 'ours_gflops': flop / plain / 1e9,
      'torch_gflops': flop / torch_fwd / 1e9,
      'ours_share_of_peak': flop / plain / 1e9 / best,
      'torch_share_of_peak': flop / torch_fwd / 1e9 / best}
  rows = [{'method': 'plain forward', 'ours_1dev_s': plain, 'reference_s': torch_fwd,
           'ratio_ours_over_ref': plain / torch_fwd}]
  for m in methods:
    ref_s = reference(root, METHODS[m][1], _hf_model(), calib)
    o1, o2 = ours1[m], ours2[m]
    rows.append({'method': m, 'ours_1dev_s': o1['seconds'], 'ours_2dev_s': o2['seconds'],
                 'reference_s': ref_s, 'ratio_ours_over_ref': o1['seconds'] / ref_s,
                 'calib_passes_over_forward': o1['calib_forward_s'] / plain,
                 'calib_passes_compiled': o1['calib_forward_compiled_s'] / plain,
                 'numerics_s': o1['numerics_s'], 'compile_s': o1['first_block_extra_s'],
                 'ratio_without_compile': (o1['seconds'] - o1['first_block_extra_s']) / ref_s})
  if 'gptq w3g64' in ours1 and 'ppl' in ours1['gptq w3g64']:
    rows[[r['method'] for r in rows].index('gptq w3g64')]['ppl'] = ours1['gptq w3g64']['ppl']
  if 'gptq w3g64 bf16' in ours1:
    b = ours1['gptq w3g64 bf16']
    rows.append({'method': 'gptq w3g64, bfloat16 passes', 'ours_1dev_s': b['seconds'],
                 'calib_passes_over_forward': b['calib_forward_s'] / plain,
                 'calib_passes_compiled': b['calib_forward_compiled_s'] / plain,
                 'numerics_s': b['numerics_s'], 'compile_s': b['first_block_extra_s'],
                 'ppl': b.get('ppl')})
  out['ours'] = {'1': ours1, '2': ours2}
  out['rows'] = rows
  out['machine']['loadavg_after'] = os.getloadavg()
  return out


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('reference_root', None, 'Directory with checkouts of wanda, sparsegpt, gptq.')
  flags.DEFINE_string('out_dir', 'results/compress_timing', 'Where results.json and table.md go.')
  flags.DEFINE_integer('calib_samples', 32, 'Calibration sequences.')
  flags.DEFINE_integer('calib_seqlen', 512, 'Calibration sequence length.')
  flags.DEFINE_list('methods', list(METHODS), 'Rows to run.')
  flags.DEFINE_integer('eval_windows', 8, 'python-docs windows for the bfloat16 perplexity cost.')
  flags.DEFINE_bool('worker', False, 'Internal: run our side and print JSON.')
  flags.DEFINE_integer('devices', 1, 'Internal: the worker\'s device count.')
  flags.DEFINE_bool('bf16', False, 'Internal: the worker also runs bfloat16 passes.')


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.worker:
    res = ours(FLAGS.calib_samples, FLAGS.calib_seqlen, FLAGS.methods, FLAGS.devices, FLAGS.bf16,
               FLAGS.eval_windows)
    print(json.dumps(res))
    return
  from experiments import common  # pylint: disable=g-import-not-at-top
  common.quiet_logs()
  if not FLAGS.reference_root:
    raise app.UsageError('--reference_root is required (see --help)')
  unknown = [m for m in FLAGS.methods if m not in METHODS]
  if unknown:
    raise app.UsageError(f'--methods: unknown {unknown}; choose from {list(METHODS)}')
  results = run(reference_root=FLAGS.reference_root, calib_samples=FLAGS.calib_samples,
                calib_seqlen=FLAGS.calib_seqlen, methods=FLAGS.methods,
                eval_windows=FLAGS.eval_windows)
  m = results['machine']
  title = (f'Compression time of SmolLM2-135M, {FLAGS.calib_samples} x {FLAGS.calib_seqlen} '
           f'calibration tokens, {m["cpu"]}, {m["cores"]} cores')
  common.write_results(FLAGS.out_dir, results, rows=results['rows'], title=title)
  print(common.markdown_table(results['rows']))
  print(json.dumps({'forward': results['forward'], 'matmul_peak': results['matmul_peak']}, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
