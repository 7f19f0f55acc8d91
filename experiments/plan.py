r"""The dry run of the main command: per-device and per-host peak memory of a run, from the model's
config alone (no weight is read), and whether it fits.

  python -m experiments.compress --model=DIR --quant=gptq --bits=4 --recover=eora --plan \
      --plan_devices=8 --device_memory_gb=80 --out_dir=/tmp/plan

The figures model what the pipeline holds at its two peaks:

* **compression** (one block at a time): the dense model (loaded whole onto each device; with
  ``--stream`` the embedding and head and one dense block, read from the checkpoint when its turn
  comes),
  the calibration activations between blocks (two copies while a block's outputs are computed;
  twice that with ``--asymmetric``, whose dense stream runs beside the compressed one; with
  ``--offload=host`` only the batch in flight is on the device), one block's forward
  temporaries for a batch of ``--batch_size / data`` sequences (a bound on the CPU, whose steps
  may be smaller: :func:`compress.calibration.step_size`), the block's statistics
  ``H = X^T X`` (float32) of every linear input (and GPTAQ's cross term of the same size), the
  one-matrix numerics of its largest linear
  (the weight's columns split over ``model``; ``H`` and its inverse factor; float64
  eigendecompositions for EoRA/SVD/SRR) and the compressed model so far (with ``--stream``: one
  compressed block; the finished ones are in host memory);
* **evaluation**: the dense and the compressed model, and the logits of an evaluation batch
  (with ``--stream``: one block at a time, the windows' hidden states in host memory).

Per host: the dense model as read (float32), or with ``--stream`` one dense block (read and
converted) plus the compressed model and the evaluation's hidden states.

Array sizes come from ``jax.eval_shape`` of the leaves the rules will make
(:func:`compress.matrix.abstract_leaf`); the temporaries from formulas checked against
``compiled.memory_analysis()`` on the tiny model (tests/experiments/test_plan.py: every figure is
at least XLA's and within a small factor of it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compress import matrix as matrix_lib
from compress import rules as rules_lib
from experiments.config import CompressConfig, build_rules, build_spec
from models import llama
from models import sharding
from models.config import ModelConfig

GB = 1e9


def _nbytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _abstract_params(cfg: ModelConfig, dtype) -> Any:
  return jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0), dtype=dtype))


def model_bytes(cfg: ModelConfig, dtype) -> int:
  """The dense model's parameters in ``dtype``."""
  return _nbytes(_abstract_params(cfg, dtype))


def outer_bytes(cfg: ModelConfig, dtype) -> int:
  """The parameters outside the blocks (embedding, final norm, untied head) in ``dtype``."""
  return _nbytes({k: v for k, v in _abstract_params(cfg, dtype).items() if k != 'layers'})


def block_forward_bytes(cfg: ModelConfig, rows: int, seqlen: int, act_bytes: int) -> int:
  """Temporaries of one block's forward on ``rows`` sequences: the residual stream and norms, the
  q/k/v projections and the attention output, the float32 attention scores and their softmax,
  and the MLP's gate/up/product."""
  tokens = rows * seqlen
  qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  return (tokens * (4 * cfg.hidden_size + qkv + cfg.num_heads * cfg.head_dim
                    + 3 * cfg.intermediate_size) * act_bytes
          + 2 * rows * cfg.num_heads * seqlen * seqlen * 4)


def stats_bytes(cfg: ModelConfig) -> int:
  """Float32 ``H`` and activation sums of every linear input of a block."""
  shapes = llama.linear_shapes(cfg)
  widths = {llama.input_key(lin): shape[0] for lin, shape in shapes.items()}
  return sum((w * w + w) * 4 + 4 for w in widths.values())


def numerics_bytes(n_in: int, n_out: int, model: int, decomposition: bool) -> int:
  """One matrix's numerics (GPTQ / SparseGPT, the largest): six float32 copies of this device's
  weight columns and nine of ``H`` (damped, factored, inverted, permuted; fitted to XLA's
  figures for GPTQ with act-order and SparseGPT, which it bounds by 1.1-1.5x), and for a low-rank
  recovery the float64 eigendecomposition of ``H`` and the whitened error."""
  cols = -(-n_out // model)
  out = 6 * n_in * cols * 4 + 9 * n_in * n_in * 4
  if decomposition:
    out += 3 * n_in * n_in * 8 + 2 * n_in * cols * 8
  return out


def eval_bytes(cfg: ModelConfig, rows: int, seqlen: int) -> int:
  """An evaluation batch's float32 logits, their log-softmax and the dense model's reference."""
  return 3 * rows * seqlen * cfg.vocab_size * 4


def plan(c: CompressConfig, cfg: ModelConfig, n_devices: int | None = None,
         device_bytes: float | None = None) -> dict[str, Any]:
  """The peaks of a run of ``c`` on ``cfg`` (see the module docstring), per device and per host,
  on ``n_devices`` devices (default: this machine's) split by ``c.mesh``; ``fits`` and, when it
  does not, ``hints`` naming flags that shrink the largest parts."""
  n = jax.device_count() if n_devices is None else n_devices
  sizes = sharding.parse_mesh(c.mesh, n)
  data, model = sizes['data'], sizes['model']
  dtype = jnp.dtype(c.dtype)
  act = dtype.itemsize
  dense = model_bytes(cfg, dtype)
  spec = build_spec(c)
  rules = build_rules(c, spec)
  shapes = llama.linear_shapes(cfg)
  rank = c.rank if c.recover != 'none' else (c.lora_rank if c.finetune == 'lora' else 0)
  compressed_linears = 0
  dense_linears = 0
  for i in range(cfg.num_layers):
    for lin, shape in shapes.items():
      s = rules_lib.match(rules, f'layers/{i}/{lin}/kernel')
      leaf = matrix_lib.abstract_leaf(s, shape, rank if s is not None and not s.is_noop else 0)
      compressed_linears += _nbytes(leaf)
      dense_linears += int(np.prod(shape)) * 4
  compressed = dense - dense_linears * act // 4 + compressed_linears
  # --asymmetric (GPTAQ) carries the dense stream beside the compressed one.
  copies = (1 + int(c.dense_inputs or c.asymmetric)
            + int(c.recover_data is not None and c.recover != 'none'))
  between = copies * c.calib_samples * c.calib_seqlen * cfg.hidden_size * act
  rows = max(1, c.batch_size // data)
  in_flight = 2 * rows * c.calib_seqlen * cfg.hidden_size * act
  largest = max(shapes.values(), key=lambda s: s[0] * s[1] + s[0] * s[0])
  decomposition = c.recover != 'none'
  eval_rows = max(1, max(1, c.batch_size // 2) // data)
  common = {
      'activations between blocks': in_flight if c.offload == 'host' else 2 * between,
      'block forward temporaries': block_forward_bytes(cfg, rows, c.calib_seqlen, act),
      # GPTAQ keeps a cross term of H's size beside each H
      'statistics (H)': stats_bytes(cfg) * (2 if c.asymmetric else 1),
      'one-matrix numerics': numerics_bytes(*largest, model, decomposition),
  }
  logits = eval_bytes(cfg, eval_rows, c.eval_seqlen)
  if c.stream:
    top = outer_bytes(cfg, dtype)
    block = (dense - top) // cfg.num_layers
    compressed_block = (compressed - top) // cfg.num_layers
    device = {'embedding and head': top, 'one dense block': block, **common,
              'one compressed block': compressed_block}
    evaluation = {'embedding and head': top, 'one block': max(block, compressed_block),
                  'block forward temporaries': block_forward_bytes(cfg, eval_rows, c.eval_seqlen,
                                                                   act),
                  'evaluation logits': logits}
    hidden = 2 * c.eval_windows * c.eval_seqlen * cfg.hidden_size * 4 if c.eval_windows > 0 else 0
    host = {'one dense block (float32 while reading)': 2 * (model_bytes(cfg, jnp.float32)
                                                            - outer_bytes(cfg, jnp.float32))
                                                       // cfg.num_layers,
            'compressed model': compressed,
            'evaluation hidden states (both models)': hidden,
            'offloaded activations': 2 * between if c.offload == 'host' else 0}
  else:
    device = {'dense model': dense, **common, 'compressed model': compressed}
    evaluation = {'dense model': dense, 'compressed model': compressed,
                  'evaluation logits': logits}
    host = {'dense model (float32 while loading)': model_bytes(cfg, jnp.float32),
            'offloaded activations': 2 * between if c.offload == 'host' else 0}
  device_peak = max(sum(device.values()), sum(evaluation.values()))
  out = {'mesh': f'data:{data},model:{model}', 'devices': n, 'dtype': dtype.name,
         'device': device, 'evaluation': evaluation, 'host': host,
         'device_peak': device_peak, 'host_peak': sum(host.values()),
         'device_limit': device_bytes}
  out['fits'] = device_bytes is None or device_peak <= device_bytes
  out['hints'] = [] if out['fits'] else _hints(c, device, evaluation, device_bytes)
  return out


def _hints(c: CompressConfig, device: dict[str, int], evaluation: dict[str, int],
           limit: float) -> list[str]:
  """Flags that would shrink what does not fit, largest part first."""
  hints = []
  dense = device.get('dense model', 0)
  if dense > 0.5 * limit:
    hints.append(f'--stream keeps one block of the dense model ({dense / GB:.1f} GB whole) on the '
                 'devices at a time, reading the blocks from the checkpoint')
  if dense > limit and c.dtype == 'float32':
    hints.append('--dtype=bfloat16 halves the dense model')
  if device['activations between blocks'] > 0.2 * limit and c.offload != 'host':
    hints.append('--offload=host keeps the calibration activations in host memory '
                 f'({device["activations between blocks"] / GB:.1f} GB on the device now)')
  if device['block forward temporaries'] > 0.2 * limit:
    hints.append('a smaller --batch_size, or more devices on --mesh data, shrinks the block '
                 'forward temporaries')
  if device['one-matrix numerics'] > 0.2 * limit and 'model' not in (c.mesh or ''):
    hints.append('--mesh=model:M splits the weight columns of each matrix\'s numerics over M '
                 'devices')
  if evaluation['evaluation logits'] > 0.2 * limit:
    hints.append('a smaller --batch_size shrinks the evaluation logits')
  return hints


def format_plan(p: dict[str, Any]) -> str:
  """The plan as a markdown table, the peaks and the verdict."""
  lines = [f'plan: {p["devices"]} devices, mesh {p["mesh"]}, {p["dtype"]}', '',
           '| phase | part | GB per device |', '|---|---|---|']
  for phase in ('device', 'evaluation'):
    name = 'compression' if phase == 'device' else 'evaluation'
    for part, b in p[phase].items():
      lines.append(f'| {name} | {part} | {b / GB:.2f} |')
    lines.append(f'| {name} | **total** | **{sum(p[phase].values()) / GB:.2f}** |')
  lines += ['', f'device peak {p["device_peak"] / GB:.2f} GB'
            + (f' of {p["device_limit"] / GB:.0f} GB' if p['device_limit'] else '')
            + f'; host peak {p["host_peak"] / GB:.2f} GB']
  if p['device_limit']:
    lines.append('fits' if p['fits'] else 'does not fit: ' + '; '.join(p['hints']))
  return '\n'.join(lines)


def device_memory() -> float | None:
  """This machine's device memory in bytes where the backend reports it."""
  try:
    stats = jax.local_devices()[0].memory_stats()
    return float(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None
  except Exception:  # pylint: disable=broad-except
    return None


# --------------------------------------------------------------------------- the README's table

def llama3_config(size: str) -> ModelConfig:
  """The shapes of Llama-3-8B or Llama-3-70B (``size``: '8b' or '70b'); no weight is needed."""
  hidden, inter, layers, heads = {'8b': (4096, 14336, 32, 32), '70b': (8192, 28672, 80, 64)}[size]
  return ModelConfig(model_type='llama', vocab_size=128256, hidden_size=hidden,
                     intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=8,
                     head_dim=128, rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     max_position_embeddings=8192)


def big_model_table(device_gb: float = 80.0) -> list[dict[str, Any]]:
  """Plans of GPTQ 4-bit g128 + EoRA r64 (128 x 2048 calibration tokens, bfloat16,
  ``--batch_size=8 --offload=host``) for Llama-3-8B and -70B on 1, 8 and 64 devices of
  ``device_gb``, whole and ``--stream``: one row each, in GB per device (host: per host)."""
  rows = []
  for size in ('8b', '70b'):
    cfg = llama3_config(size)
    for n, mesh in ((1, 'data:1'), (8, 'data:8'), (64, 'data:8,model:8')):
      for stream in (False, True):
        c = CompressConfig(quant='gptq', bits=4, group_size=128, recover='eora', rank=64,
                           calib_samples=128, calib_seqlen=2048, dtype='bfloat16', batch_size=8,
                           offload='host', mesh=mesh, stream=stream)
        p = plan(c, cfg, n, device_gb * GB)
        dense = p['device'].get('dense model', p['device'].get('one dense block', 0))
        rows.append({
            'model': f'Llama-3-{size.upper()}', 'devices': n, 'mesh': mesh,
            'stream': 'yes' if stream else 'no',
            'dense on device': round(dense / GB, 1),
            "largest matrix's numerics": round(p['device']['one-matrix numerics'] / GB, 1),
            'compression peak': round(sum(p['device'].values()) / GB, 1),
            'evaluation peak': round(sum(p['evaluation'].values()) / GB, 1),
            'host peak': round(p['host_peak'] / GB, 1),
            'fits': 'yes' if p['fits'] else 'no'})
  return rows


def main(argv) -> None:
  """Writes the table of :func:`big_model_table` to ``--out_dir`` (results.json, table.md)."""
  del argv
  from experiments import common  # pylint: disable=g-import-not-at-top
  rows = big_model_table()
  common.write_results(FLAGS.out_dir, {'rows': rows, 'device_gb': 80}, rows=rows,
                       title='Plans for Llama-3-8B and -70B (GB per device, 80 GB devices)')
  print(common.markdown_table(rows))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string('out_dir', 'results/plan', 'Where results.json and table.md go.')
  FLAGS = flags.FLAGS
  app.run(main)
