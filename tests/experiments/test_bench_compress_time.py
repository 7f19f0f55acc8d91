"""The compression-time benchmark's pieces (the benchmark itself runs the reference repositories,
which are not fetched here): its driver of a reference's per-layer code, on a stand-in with the
reference's interface, prunes every linear of a transformers model; a missing checkout is named
before any work."""

import numpy as np
import pytest

from experiments import bench_compress_time as bench
from experiments import tiny_families

torch = pytest.importorskip('torch')

STAND_IN = '''
import torch

class WrappedGPT:  # the interface of wanda's lib/layerwrapper.py: a running sum of squares
    def __init__(self, layer):
        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inp, out):
        x = inp.reshape(-1, inp.shape[-1]).float()
        self.scaler_row += (x * x).sum(0)
        self.nsamples += 1
'''


def test_the_reference_driver_prunes_every_linear_2_4(tmp_path):
  (tmp_path / 'wanda' / 'lib').mkdir(parents=True)
  (tmp_path / 'wanda' / 'lib' / 'layerwrapper.py').write_text(STAND_IN)
  model, cfg = tiny_families.hf_model('llama')
  calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 16))
  seconds = bench.reference(tmp_path, 'wanda', model, calib)
  assert seconds > 0
  linears = [m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
  assert len(linears) == 7 * cfg.num_hidden_layers
  for m in linears:
    nonzero = (m.weight.reshape(m.weight.shape[0], -1, 4) != 0).sum(-1)
    assert int(nonzero.max()) <= 2


def test_a_missing_checkout_is_named_before_any_work(tmp_path):
  with pytest.raises(FileNotFoundError, match='sparsegpt does not exist: clone sparsegpt'):
    bench.run(reference_root=str(tmp_path), calib_samples=2, calib_seqlen=8,
              methods=['sparsegpt 2:4'], eval_windows=0)

