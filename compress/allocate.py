"""Mixed precision from measured sensitivity: bits per linear under an average-bits budget.

Each linear's relative output error ``||X (W - RTN_b(W))|| / ||X W||`` on the dense model's
calibration activations is measured for every candidate width ``b`` (RTN at the spec's group size,
a fast proxy of the final method); bits are then allotted greedily by the largest drop in squared
error per added bit-parameter. The result is a list of exact-path rules that go ahead of the
uniform ones (see :mod:`compress.rules`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from compress import calibration
from compress import quantize
from compress.matrix import jitted, relative_error
from compress.rules import LinearSpec, Rule
from models import llama
from models import tree
from models.config import ModelConfig


def auto_bits_rules(params: dict, cfg: ModelConfig, calib_tokens: np.ndarray, spec: LinearSpec, *,
                    budget: float, candidates: Sequence[int] = (2, 3, 4), batch_size: int = 8,
                    dtype=jnp.float32, progress: bool = True,
                    keep: Sequence[Rule] = ()) -> list[Rule]:
  """Mixed precision from measured sensitivity under an average-bits budget.

  Runs the dense model over the calibration set block by block, measures every linear's relative
  output error ``||X (W - RTN_b(W))|| / ||X W||`` for each candidate bit width ``b`` (RTN at the
  spec's group size as a fast proxy of the final method), then allots bits greedily: start every
  layer at the lowest width and repeatedly upgrade the layer with the largest drop in squared
  relative error per added bit-parameter, while the parameter-weighted average stays within
  ``budget``. Returns one exact-path rule per linear (to put ahead of the uniform rules).

  ``keep``: the user's own rules, which win: a linear one of them matches keeps that rule's spec
  (or stays dense) and is left out of the allocation, whose average covers the other linears.
  Put them ahead of the returned rules.
  """
  cands = sorted(set(int(b) for b in candidates))
  if not cands:
    raise ValueError('auto bits needs at least one candidate bit width')
  if not cands[0] <= budget <= cands[-1]:
    raise ValueError(f'average-bits budget {budget} is outside the candidates {cands}')
  if spec.qspec is None:
    raise ValueError('auto bits needs a quantization method')
  all_stats = calibration.dense_statistics(params, cfg, calib_tokens, batch_size=batch_size, dtype=dtype,
                               progress=progress)
  errors: dict[str, list[float]] = {}
  sizes: dict[str, int] = {}
  for i in range(cfg.num_layers):
    block = params['layers'][i]
    stats = all_stats[i]
    for lin in llama.block_linear_names(block):
      w = jnp.asarray(tree.get_linear(block, lin), jnp.float32)
      h = stats[llama.input_key(lin)].hessian
      path = f'layers/{i}/{lin}/kernel'
      if any(re.fullmatch(r.pattern, path) for r in keep):
        continue
      errs = []
      for b in cands:
        qs = dataclasses.replace(spec.qspec, bits=b)
        errs.append(relative_error(w, jitted(quantize.rtn_dense, spec=qs)(w), h) ** 2)
      errors[path] = errs
      sizes[path] = int(w.size)
  if not errors:
    raise ValueError('auto bits has no linear to allocate: the given rules fix every one')
  level = {p: 0 for p in errors}
  total = sum(sizes.values())
  used = cands[0] * total
  while True:
    best, best_gain = None, 0.0
    for p, l in level.items():
      if l + 1 >= len(cands):
        continue
      extra = (cands[l + 1] - cands[l]) * sizes[p]
      if used + extra > budget * total + 1e-9:
        continue
      gain = (errors[p][l] - errors[p][l + 1]) / extra
      if best is None or gain > best_gain:
        best, best_gain = p, gain
    if best is None:
      break
    used += (cands[level[best] + 1] - cands[level[best]]) * sizes[best]
    level[best] += 1
  return [Rule(re.escape(p), dataclasses.replace(spec, qspec=dataclasses.replace(
      spec.qspec, bits=cands[l]))) for p, l in level.items()]
