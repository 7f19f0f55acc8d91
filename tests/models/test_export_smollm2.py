"""Integration tier: SmolLM2-135M exported in every packed format and loaded by the library each
is for (in one separate process, :mod:`experiments.third_party`), against our logits.

Tolerances: compressed-tensors and the dense exports give float32 weights bit for bit, so the
logits (up to ~40 in magnitude) differ by summation order only (5e-3 leaves a wide margin over the
~2e-4 seen); GPTQModel dequantizes in float16, which moves them by up to ~0.2 through 30 blocks
(3-bit) while the top-1 token agrees: 0.5 and >= 99% top-1 agreement.
"""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import common
from kernels import QuantSpec
from models import export
from models import llama
from models import loading
from recover import compensate

pytestmark = pytest.mark.slow
pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('compressed_tensors')
pytest.importorskip('gptqmodel')
pytest.importorskip('peft')

Q4 = QuantSpec(bits=4, group_size=64)


def test_smollm2_exports_load_in_third_party_libraries(tmp_path):
  loaded = loading.load_model('smollm2-135m')
  cfg, params = loaded.config, loaded.params
  tokens = common.eval_windows_for(loaded.tokenizer(), 'python-docs', 128, 1)
  np.save(tmp_path / 'tokens.npy', tokens)
  rtn, _ = pipeline.compress_model(params, cfg, tokens, rules_lib.uniform(
      rules_lib.LinearSpec(quant='rtn', qspec=Q4)), progress=False,
                                   recovery=compensate.Compensator(method='svd', rank=16))
  sparse, _ = pipeline.compress_model(params, cfg, tokens, rules_lib.uniform(
      rules_lib.LinearSpec(prune='magnitude', sparsity=PruneSpec(n=2, m=4), quant='rtn',
                           qspec=Q4)), progress=False)
  cases = {  # name: (model, format, peft base, float16 loader)
      'rtn_svd_peft_on_gptq': (rtn, 'peft', 'gptq', True),
      'rtn_svd_peft_on_ct': (rtn, 'peft', 'compressed-tensors', False),
      'rtn_24_ct': (sparse, 'compressed-tensors', 'hf', False),
  }
  jobs = []
  for name, (model, fmt, base, _) in cases.items():
    path = export.save(tmp_path / name, fmt, model, cfg, peft_base=base)
    jobs.append({'base': str(path / 'base' if fmt == 'peft' else path),
                 'adapter': str(path / 'adapter') if fmt == 'peft' else None,
                 'tokens': str(tmp_path / 'tokens.npy'), 'out': str(tmp_path / f'{name}.npy')})
  (tmp_path / 'jobs.json').write_text(json.dumps(jobs))
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.third_party', str(tmp_path / 'jobs.json')],
      capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name, (model, _, _, float16) in cases.items():
    want = np.asarray(llama.forward(model, jnp.asarray(tokens), cfg))
    got = np.load(tmp_path / f'{name}.npy')
    np.testing.assert_allclose(got, want, atol=0.5 if float16 else 5e-3, rtol=0, err_msg=name)
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.99, name
