"""Our Wanda and SparseGPT 2:4 masks on the first block of SmolLM2 against plain NumPy
transcriptions of the papers' algorithms, on the same calibration windows (given as a ``.npy`` of
windows, as one would pass another tool's windows).

Wanda (Sun et al. 2023, Alg. 1): score ``|W_ij| * ||X_j||_2`` per weight (``W`` as ``[out, in]``,
``X_j`` the j-th input feature over all calibration tokens); 2:4 keeps the 2 largest scores of
every group of 4 consecutive inputs in each output row.

SparseGPT (Frantar & Alistarh 2023, Alg. 1, with the reference's 2:4 rule): ``H = X^T X`` damped
by 1% of its mean diagonal, ``U`` the upper Cholesky factor of ``H^-1``; columns (inputs) are
visited in order; at every 4th column the 2 weights of each row with the smallest
``w^2 / U_cc^2`` among the next 4 columns are pruned; each pruned column's error
``(w - q) / U_cc`` is spread over the later columns through ``U``'s row. Lazy batches of 128
columns change only the order of floating-point work, not the result, so the transcription
updates every later column at once.
"""

import numpy as np
import pytest

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import common
from kernels import formats
from models import llama
from models import loading

pytestmark = pytest.mark.slow


def wanda_24(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Kept mask ``[out, in]`` of Wanda 2:4 for ``w [out, in]`` and inputs ``x [tokens, in]``."""
  score = np.abs(w) * np.linalg.norm(x, axis=0)[None, :]
  out, n_in = w.shape
  groups = score.reshape(out, n_in // 4, 4)
  order = np.argsort(groups, axis=-1, kind='stable')  # ascending
  keep = np.ones_like(groups, dtype=bool)
  np.put_along_axis(keep, order[..., :2], False, axis=-1)
  return keep.reshape(out, n_in)


def sparsegpt_24(w: np.ndarray, x: np.ndarray, percdamp: float = 0.01) -> np.ndarray:
  """Kept mask ``[out, in]`` of SparseGPT 2:4 (float64)."""
  w = w.astype(np.float64).copy()
  h = x.astype(np.float64).T @ x.astype(np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h += percdamp * np.mean(np.diag(h)) * np.eye(len(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
  n_in = w.shape[1]
  keep = np.ones_like(w, dtype=bool)
  for c in range(n_in):
    if c % 4 == 0:
      score = w[:, c:c + 4] ** 2 / np.diag(u)[c:c + 4][None, :] ** 2
      drop = np.argsort(score, axis=1, kind='stable')[:, :2]
      np.put_along_axis(keep[:, c:c + 4], drop, False, axis=1)
    q = np.where(keep[:, c], w[:, c], 0.0)
    err = (w[:, c] - q) / u[c, c]
    w[:, c:] -= np.outer(err, u[c, c:])
  return keep


@pytest.fixture(scope='module')
def block0(tmp_path_factory):
  loaded = loading.load_model('smollm2-135m')
  cfg = loaded.config
  windows = common.calibration_for(loaded.tokenizer(), 'python-docs', 16, 128, 0)
  path = tmp_path_factory.mktemp('windows') / 'windows.npy'
  np.save(path, windows)
  same = common.calibration_for(loaded.tokenizer(), str(path), 16, 128, 0,
                                vocab_size=cfg.vocab_size)
  np.testing.assert_array_equal(same, windows)  # the file's windows, verbatim
  block = loaded.params['layers'][0]
  x = llama.embed(loaded.params, same, cfg)
  _, inputs = llama.block_apply(block, x, cfg, return_inputs=True)
  inputs = {k: np.asarray(v, np.float64).reshape(-1, v.shape[-1]) for k, v in inputs.items()}
  return loaded, same, inputs


def _our_masks(loaded, windows, prune):
  spec = rules_lib.LinearSpec(prune=prune, sparsity=PruneSpec.parse('2:4'))
  out, _ = pipeline.compress_model(
      loaded.params, loaded.config, windows,
      [rules_lib.Rule(r'layers/0/(self_attn|mlp)/[a-z]+_proj/kernel', spec)],
      progress=False, stop_after=1)
  block = out['layers'][0]
  return {lin: np.asarray(formats.to_dense(block[lin.split('/')[0]][lin.split('/')[1]]['kernel'])
                          ).T != 0 for lin in llama.LINEAR_NAMES}


def _differing(block0, prune, transcription) -> dict[str, float]:
  """Per block linear: the share of mask entries where ours and the transcription disagree."""
  loaded, windows, inputs = block0
  ours = _our_masks(loaded, windows, prune)
  out = {}
  for lin in llama.LINEAR_NAMES:
    sub, name = lin.split('/')
    w = np.asarray(loaded.params['layers'][0][sub][name]['kernel'], np.float64).T
    out[lin] = float(np.mean(ours[lin] != transcription(w, inputs[llama.LINEAR_INPUTS[lin]])))
    print(f'{prune} {lin}: {out[lin]:.2e} of the mask differs')
  return out


def test_wanda_24_masks_equal_the_papers_rule(block0):
  """Float32 statistics (ours) against float64 norms (the transcription): only near-ties may
  differ (measured: at most 2.1e-5 of the entries, q_proj; none in o_proj)."""
  for lin, differ in _differing(block0, 'wanda', wanda_24).items():
    assert differ <= 1e-4, (lin, differ)


def test_sparsegpt_24_masks_equal_the_papers_algorithm(block0):
  """Float32 (ours) against float64 (the transcription): a 2:4 choice between two nearly equal
  scores can go either way, and a flipped choice changes the later updates of its row, so at most
  0.1% of the entries may differ (measured: none in q/k/v, at most 2.0e-4 in down_proj)."""
  for lin, differ in _differing(block0, 'sparsegpt', sparsegpt_24).items():
    assert differ <= 1e-3, (lin, differ)
