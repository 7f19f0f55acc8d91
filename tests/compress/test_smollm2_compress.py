"""Integration tier: the pipeline on the real SmolLM2 with a small calibration set."""

import numpy as np
import pytest

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import common
from kernels import formats
from models import evaluate as eval_lib
from models import loading

pytestmark = pytest.mark.slow


def test_wanda_24_on_smollm2_is_finite_and_worse_than_dense():
  loaded = loading.load_model('smollm2-135m')
  tok = loaded.tokenizer()
  calib = common.calibration_for(tok, 'python-docs', 4, 128, seed=0)
  spec = rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('2:4'))
  params, reports = pipeline.compress_model(loaded.params, loaded.config, calib,
                                            rules_lib.uniform(spec), progress=False)
  assert len(reports) == 7 * loaded.config.num_layers
  leaf = params['layers'][5]['mlp']['down_proj']['kernel']
  assert isinstance(leaf.weight, formats.Sparse24Weight)
  bad = [(r.name, r.sparsity, r.rel_error) for r in reports
         if not (0.5 <= r.sparsity < 0.51 and 0 < r.rel_error < 1)]
  assert not bad, bad[:5]
  windows = common.eval_windows_for(tok, 'python-docs', 256, 2)
  res = eval_lib.compare(loaded.params, params, loaded.config, windows, batch_size=2,
                         progress=False)
  assert np.isfinite(res['ppl']) and res['ppl'] > res['ppl_ref'] * 1.2
  assert res['kl'] > 0.05 and 0 < res['top1'] < 1
