"""AWQ: activation-aware weight quantization (scale search and optional clipping search).

Paper: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024, https://arxiv.org/abs/2306.00978.
Reference implementation followed: mit-han-lab/llm-awq ``awq/quantize/auto_scale.py``
(``_search_module_scale``) and ``awq/quantize/auto_clip.py`` (``auto_clip_layer``).

Scale search. With ``s_x = mean_t |x_t|`` per input channel and ``alpha`` on the grid
``{0, 1/n_grid, ..., (n_grid - 1)/n_grid}``: ``s = clamp(s_x^alpha, min=1e-4)``,
``s = s / sqrt(max(s) min(s))``; quantize ``diag(s) W`` (rows of the ``[in, out]`` weight) with RTN
and keep the ``alpha`` with the smallest output error ``||X W - (X diag(1/s)) Q(diag(s) W)||^2``.
The reference measures that error by running the module on the calibration tokens; here it is computed
exactly from the Hessian, ``trace(D^T H D)`` with ``D = W - diag(1/s) Q(diag(s) W)``, so no
activations are kept. ``alpha = 0`` gives ``s = 1``, i.e. plain RTN, so the result is never worse
than RTN (in this error). The reference scores q/k/v (and gate/up) jointly on the attention (MLP)
output; here the score is the linear layer's own output error, and layers that must share one scale
(because one RMSNorm feeds them) are searched jointly by passing their weights concatenated along
the output axis (the error is then the sum of their output errors).

Clipping search (``clip=True``). After scaling, for every group of every output unit the weights
are clamped to ``[-m, m]`` with ``m = max|w_group| * (1 - i / n_grid)``, ``i < max_shrink * n_grid``
(1.0, 0.95, ..., 0.55 by default), and the ``m`` with the smallest error of that group's output
contribution is kept. As in the reference each group is scored on its own input slice
(``dw_g^T H_gg dw_g``, cross-group terms ignored), with the inputs of the scaled layer
(``H_s = diag(1/s) H diag(1/s)``); with ``group_size = -1`` this is the exact output error. A
``group_size`` that does not divide ``in`` leaves a shorter last group, searched on its own rows
(the reference requires whole groups; this is the natural extension, matching the grids of
:mod:`compress.quantize`).

Quantization grid: :mod:`compress.quantize` (the GPTQ reference quantizer, whose asymmetric range
always contains 0) rather than llm-awq's ``pseudo_quantize_tensor``, so AWQ, RTN and GPTQ results
share one storage format.

Using the result. :func:`awq` returns ``(QuantizedWeight of diag(s) W, s)``: the layer computes
``y = (x / s) @ dequantize(q)``. ``1/s`` is per *input row* and cannot be folded into the quantized
weight's per-(group, output) scales, so the consumer either folds ``1/s`` into the preceding op, as
AWQ does (the RMSNorm weight in front of q/k/v and gate/up, the output columns of v_proj in front
of o_proj when their shapes allow it, the output columns of up_proj in front of down_proj), or
multiplies the inputs by ``1/s`` at run time. :func:`awq_dense` returns the equivalent dense weight
``diag(1/s) dequantize(q)`` for evaluation. :func:`awq_block` does the folding for one decoder
block (what the pipeline calls).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp

from compress import calibration
from compress.matrix import LayerReport, LinearRecovery, jitted, measure, recover_linear
from compress.quantize import rtn, rtn_dense
from compress.rules import LinearSpec
from kernels import formats
from kernels.formats import QuantizedWeight, QuantSpec
from models import llama
from models import tree
from models.config import ModelConfig

Params = dict[str, Any]

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_args(w, hessian, act_mean, spec, n_grid):
  if not isinstance(spec, QuantSpec):
    raise ValueError(f'spec must be a QuantSpec, got {type(spec).__name__}.')
  n_in = calibration.check_weight_hessian(w, hessian, 'awq')
  if act_mean is not None and act_mean.shape != (n_in,):
    raise ValueError(
        f'awq: act_mean of shape {act_mean.shape} does not match a weight with {n_in} inputs.')
  if n_grid < 1:
    raise ValueError(f'n_grid must be >= 1, got {n_grid}.')


def awq_scales(act_mean: jax.Array, alpha: jax.Array | float) -> jax.Array:
  """AWQ's per-input-channel scales for one ``alpha``: ``s_x^alpha``, clamped and normalised.

  Args:
    act_mean: ``mean |x|`` per input channel ``[in]``.
    alpha: exponent in [0, 1).

  Returns:
    float32 ``[in]``; all ones for ``alpha = 0``.
  """
  s = jnp.maximum(jnp.power(jnp.asarray(act_mean, jnp.float32), alpha), 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def awq_grid_errors(w: jax.Array, hessian: jax.Array, act_mean: jax.Array, spec: QuantSpec, *,
                    n_grid: int = 20) -> tuple[jax.Array, jax.Array]:
  """Output error of every ``alpha`` on the search grid.

  Args:
    w: weight ``[in, out]``.
    hessian: ``X^T X`` ``[in, in]`` (any positive scale).
    act_mean: ``mean |x|`` per input channel ``[in]``.
    spec: quantization grid.
    n_grid: number of ``alpha`` values, ``alpha_i = i / n_grid``.

  Returns:
    ``(alphas [n_grid], errors [n_grid])`` with ``errors[i] = trace(D_i^T H D_i)``; ``errors[0]`` is
    RTN's error.
  """
  w = jnp.asarray(w, jnp.float32)
  hessian = jnp.asarray(hessian, jnp.float32)
  act_mean = jnp.asarray(act_mean, jnp.float32)
  _check_args(w, hessian, act_mean, spec, n_grid)
  alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

  def error(alpha):
    s = awq_scales(act_mean, alpha)[:, None]  # [in, 1]
    return calibration.output_error(w, rtn_dense(w * s, spec) / s, hessian)

  # lax.map keeps one candidate weight alive at a time.
  return alphas, jax.lax.map(error, alphas)


def awq_search(w: jax.Array, hessian: jax.Array, act_mean: jax.Array, spec: QuantSpec, *,
               n_grid: int = 20) -> jax.Array:
  """The AWQ input scales ``s [in]`` minimizing the output error (first minimum on ties)."""
  alphas, errors = awq_grid_errors(w, hessian, act_mean, spec, n_grid=n_grid)
  return awq_scales(act_mean, alphas[jnp.argmin(errors)])


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  """``x`` with zero rows appended along axis 0 up to ``rows``."""
  return jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _group_blocks(hessian: jax.Array, groups: int, g: int) -> jax.Array:
  """Diagonal blocks ``[G, g, g]`` of ``hessian [in, in]``; a shorter last group's block is
  zero-padded to ``g x g``."""
  n = groups * g
  h = _pad_rows(_pad_rows(hessian, n).T, n).T
  h4 = h.reshape(groups, g, groups, g)
  return jnp.moveaxis(jnp.diagonal(h4, axis1=0, axis2=2), -1, 0)  # [G, g, g]


def awq_clip(w: jax.Array, hessian: jax.Array, spec: QuantSpec, *, n_grid: int = 20,
             max_shrink: float = 0.5) -> jax.Array:
  """Per-(group, output) clipping thresholds chosen by AWQ's clipping search.

  Args:
    w: the (already scaled) weight ``[in, out]``.
    hessian: ``X^T X`` ``[in, in]`` of the inputs that multiply ``w`` (for a scaled weight, the
      scaled inputs: ``diag(1/s) H diag(1/s)``).
    spec: quantization grid.
    n_grid: shrink step ``1 / n_grid``.
    max_shrink: the largest shrink; ratios ``1 - i / n_grid`` for ``i < int(max_shrink * n_grid)``.

  Returns:
    ``max_val [groups, out]``: clamp group ``g`` of output ``o`` to ``[-max_val, max_val]``.
  """
  w = jnp.asarray(w, jnp.float32)
  hessian = jnp.asarray(hessian, jnp.float32)
  _check_args(w, hessian, None, spec, n_grid)
  n_steps = int(max_shrink * n_grid)
  if n_steps < 1:
    raise ValueError(f'awq_clip: max_shrink * n_grid = {max_shrink * n_grid} gives no candidate.')
  n_in, n_out = w.shape
  groups, glen = spec.num_groups(n_in), spec.group_len(n_in)
  # Groups as [G, g, out]; a shorter last group is padded with zero rows, which change neither
  # its max |w| nor its error (their rows and columns of the Hessian block are zero).
  wg = _pad_rows(w, groups * glen).reshape(groups, glen, n_out)
  h_blocks = _group_blocks(hessian, groups, glen)  # [G, g, g]
  org_max = jnp.max(jnp.abs(wg), axis=1)  # [G, out]
  ratios = 1.0 - jnp.arange(n_steps, dtype=jnp.float32) / n_grid

  def group_errors(ratio):
    clipped = apply_clip(w, org_max * ratio, spec)  # [in, out]
    d = _pad_rows(rtn_dense(clipped, spec) - w, groups * glen).reshape(wg.shape)  # [G, g, out]
    hd = jnp.einsum('gij,gjo->gio', h_blocks, d, precision=_HIGHEST)
    return jnp.sum(d * hd, axis=1)  # [G, out]

  errors = jax.lax.map(group_errors, ratios)  # [steps, G, out]
  best = jnp.argmin(errors, axis=0)  # first minimum: ratio 1.0 wins ties
  return org_max * ratios[best]


def apply_clip(w: jax.Array, max_val: jax.Array, spec: QuantSpec) -> jax.Array:
  """Clamps each group of ``w [in, out]`` to ``[-max_val, max_val]`` (``max_val [groups, out]``)."""
  n_in = w.shape[0]
  m = max_val[jnp.arange(n_in) // spec.group_len(n_in)]  # [in, out], the row's group
  return jnp.clip(jnp.asarray(w), -m, m)


def _awq_scaled_weight(w, hessian, act_mean, spec, n_grid, clip, clip_grid, max_shrink):
  w = jnp.asarray(w, jnp.float32)
  hessian = jnp.asarray(hessian, jnp.float32)
  s = awq_search(w, hessian, act_mean, spec, n_grid=n_grid)  # [in]
  ws = w * s[:, None]  # [in, out]
  if clip:
    hessian_s = hessian / (s[:, None] * s[None, :])  # inputs x / s
    ws = apply_clip(ws, awq_clip(ws, hessian_s, spec, n_grid=clip_grid, max_shrink=max_shrink),
                    spec)
  return ws, s


def awq(w: jax.Array, hessian: jax.Array, act_mean: jax.Array, spec: QuantSpec, *,
        n_grid: int = 20, clip: bool = False, clip_grid: int = 20,
        max_shrink: float = 0.5) -> tuple[QuantizedWeight, jax.Array]:
  """AWQ-quantizes ``w``.

  Args:
    w: weight ``[in, out]`` (concatenate layers that share an input scale along ``out``).
    hessian: ``X^T X`` ``[in, in]`` of the layer's calibration inputs.
    act_mean: ``mean |x|`` per input channel ``[in]`` (``calibration.mean_abs_activation``).
    spec: quantization grid.
    n_grid: scale-search grid size.
    clip: also run the clipping search.
    clip_grid: clipping-search step ``1 / clip_grid``.
    max_shrink: largest clipping shrink.

  Returns:
    ``(q, s)``: ``q`` quantizes ``diag(s) W`` (``[in, out]``), ``s [in]`` float32. The layer is
    ``y = (x / s) @ dequantize(q)``; see the module docstring for folding ``1/s``.
  """
  ws, s = _awq_scaled_weight(w, hessian, act_mean, spec, n_grid, clip, clip_grid, max_shrink)
  return rtn(ws, spec), s


def awq_dense(w: jax.Array, hessian: jax.Array, act_mean: jax.Array, spec: QuantSpec, *,
              n_grid: int = 20, clip: bool = False, clip_grid: int = 20,
              max_shrink: float = 0.5) -> jax.Array:
  """The dense float32 weight ``diag(1/s) dequantize(q)`` ``[in, out]``, equivalent to :func:`awq`.
  """
  ws, s = _awq_scaled_weight(w, hessian, act_mean, spec, n_grid, clip, clip_grid, max_shrink)
  return rtn_dense(ws, spec) / s[:, None]


# --------------------------------------------------------------------------- one block


def awq_block(block: Params, stats: dict[str, calibration.LinearStats],
              specs: dict[str, LinearSpec], cfg: ModelConfig, prefix: str,
              recovery: LinearRecovery | None = None,
              aux_stats: dict[str, calibration.LinearStats] | None = None
              ) -> tuple[Params, list[LayerReport]]:
  """AWQ on one block: search per-input-channel scales for each group of linears sharing an input,
  fold ``1/s`` into the preceding op (RMSNorm scale, or up_proj's output columns for down_proj),
  then quantize ``diag(s) W`` (with optional clip search). o_proj is scaled only when v_proj's output
  matches its input (no GQA), as in the llm-awq reference; otherwise it is plain RTN."""
  block = jax.tree.map(lambda x: x, block)  # shallow copy of containers
  reports = []
  norms = llama.input_norm_names(cfg)
  groups = [
      (('self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj'), 'attn_in', (norms['attn_in'],)),
      (('mlp/gate_proj', 'mlp/up_proj'), 'mlp_in', (norms['mlp_in'],)),
      (('mlp/down_proj',), 'down_in', ('up_proj_out',)),
      (('self_attn/o_proj',), 'o_in', ('v_proj_out',)),
  ]
  scales_in: dict[str, jax.Array] = {}
  t_search = time.time()
  dense = {lin: jnp.asarray(tree.get_linear(block, lin), jnp.float32)
           for lin in llama.block_linear_names(block)}
  is_awq = lambda l: l in specs and specs[l].quant == 'awq'  # noqa: E731
  for lins, key, (prev,) in groups:
    if not any(is_awq(l) for l in lins):
      continue
    if prev == 'v_proj_out' and cfg.num_heads != cfg.num_kv_heads:
      continue
    # The fold changes what every reader of the input sees, and the producer of a projection's
    # output: scale only when all readers are AWQ-quantized and the producer is AWQ or dense.
    # Otherwise the AWQ linears of the group are plain RTN (s = 1) and nothing is folded.
    producer = {'up_proj_out': 'mlp/up_proj', 'v_proj_out': 'self_attn/v_proj'}.get(prev)
    if not all(is_awq(l) for l in lins) or (producer in specs and not is_awq(producer)):
      logging.warning('%s: AWQ scales of %s skipped (linears sharing the input or its producer '
                      'use another method); they are plain RTN', prefix, ', '.join(lins))
      continue
    spec = specs[lins[0]]
    st = stats[key]
    w_cat = jnp.concatenate([dense[l] for l in lins], axis=1)
    s = jitted(awq_search, spec=spec.qspec)(w_cat, st.hessian,
                                                  calibration.mean_abs_activation(st))
    scales_in[key] = s
    for l in lins:
      dense[l] = dense[l] * s[:, None]
    if prev in norms.values():
      block[prev] = llama.scale_norm(block[prev], 1.0 / s, cfg)
    elif prev == 'up_proj_out':
      dense['mlp/up_proj'] = dense['mlp/up_proj'] / s[None, :]
    elif prev == 'v_proj_out':  # only reached without GQA (checked above)
      dense['self_attn/v_proj'] = dense['self_attn/v_proj'] / s[None, :]
  n_awq = sum(1 for s_ in specs.values() if s_.quant == 'awq')
  search_share = (time.time() - t_search) / max(1, n_awq)  # the shared scale search, split evenly
  for lin in llama.block_linear_names(block):
    spec = specs.get(lin)
    if spec is None or spec.quant != 'awq':
      continue
    key = llama.input_key(lin)
    h = stats[key].hessian
    s = scales_in.get(key)
    if s is not None:
      h = h / s[:, None] / s[None, :]  # statistics of the rescaled input x / s
    t0 = time.time()
    if spec.awq_clip:
      max_val = jitted(awq_clip, spec=spec.qspec)(dense[lin], h)
      w_fit = apply_clip(dense[lin], max_val, spec.qspec)
    else:
      w_fit = dense[lin]
    qw = jitted(rtn, spec=spec.qspec)(w_fit)
    leaf = formats.CompressedLinear(weight=qw)
    block = tree.set_linear(block, lin, leaf)
    jax.block_until_ready(qw)
    reports.append((lin, dense[lin], h, leaf, time.time() - t0 + search_share))
  # Linears whose folding changed but which are not AWQ-quantized keep the rescaled dense weight.
  for lin in ('mlp/up_proj', 'self_attn/v_proj'):
    if lin not in specs or specs[lin].quant != 'awq':
      block = tree.set_linear(block, lin, dense[lin].astype(jnp.asarray(tree.get_linear(block, lin)).dtype))
  out = []
  for lin, w_ref, h, leaf, secs in reports:
    rel_error, sparse, _ = measure(w_ref, leaf, h)
    rep = LayerReport(name=f'{prefix}/{lin}', method=specs[lin].describe(),
                      rel_error=rel_error, sparsity=sparse,
                      bits=specs[lin].bits, seconds=secs)
    if recovery is not None:
      # The target is the rescaled dense weight diag(s) W on the rescaled input x / s.
      key = llama.input_key(lin)
      s = scales_in.get(key)
      rescale = lambda st: st if s is None else dataclasses.replace(
          st, hessian=st.hessian / s[:, None] / s[None, :],
          act_abs_sum=None if st.act_abs_sum is None else st.act_abs_sum / s)
      aux = None if aux_stats is None else rescale(aux_stats[key])
      leaf = recover_linear(rep, recovery, w_ref, leaf, rescale(stats[key]), aux, specs[lin], h)
      block = tree.set_linear(block, lin, leaf)
    out.append(rep)
  return block, out
