"""bfloat16 weights and activations with float32 statistics: a supported mode of the pipeline."""

import jax
import jax.numpy as jnp
import numpy as np

from compress import calibration
from compress import pipeline
from compress import rules as rules_lib
from kernels import QuantSpec
from models import evaluate
from models import llama
from recover import compensate
from tests.utils import tiny_model


def test_bfloat16_model_compresses_with_float32_statistics():
  cfg, params, calib = tiny_model(calib_shape=(16, 32))
  p16 = llama.cast_params(params, jnp.bfloat16)
  x16 = llama.embed(p16, jnp.asarray(calib), cfg, jnp.bfloat16)
  stats = calibration.collect_stats(p16['layers'][0], x16, cfg, ['attn_in'], 8)
  assert x16.dtype == jnp.bfloat16 and stats['attn_in'].hessian.dtype == jnp.float32
  spec = rules_lib.LinearSpec(quant='gptq', qspec=QuantSpec(bits=4, group_size=32))
  runs = {}
  for name, (p, dt) in {'f32': (params, jnp.float32), 'bf16': (p16, jnp.bfloat16)}.items():
    out, reports = pipeline.compress_model(
        p, cfg, calib, rules_lib.uniform(spec), dtype=dt, progress=False, batch_size=8,
        recovery=compensate.Compensator(method='eora', rank=8))
    ppl = evaluate.perplexity(out, cfg, calib, batch_size=8, dtype=dt, progress=False)['ppl']
    runs[name] = (out, reports, ppl)
  (o32, r32, ppl32), (o16, r16, ppl16) = runs['f32'], runs['bf16']
  assert np.isfinite(ppl16) and abs(ppl16 - ppl32) / ppl32 < 0.02, (ppl16, ppl32)
  for a, b in zip(r32, r16):
    assert abs(a.rel_error - b.rel_error) < 0.1 * a.rel_error + 1e-3, (a.name, a.rel_error,
                                                                       b.rel_error)
  codes = lambda o: np.asarray(o['layers'][1]['mlp']['down_proj']['kernel'].weight.ints())
  assert np.mean(codes(o16) == codes(o32)) > 0.9  # bf16 inputs move only rounding-edge codes
