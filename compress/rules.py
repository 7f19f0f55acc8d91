"""Compression recipes: what to do to each linear, chosen by a regex on its parameter path.

A recipe is a sequence of :class:`Rule`; the first rule whose ``pattern`` matches a path (with
``re.fullmatch``) decides, and a rule with ``spec=None`` leaves the layer untouched. Paths look like
``layers/3/self_attn/q_proj/kernel``. Embeddings and the LM head are untouched unless a rule names
them (``lm_head/kernel``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

from compress.gptq import DEFAULT_ALPHA
from compress.prune import WANDAPP_ALPHA, PruneSpec
from kernels.formats import QuantSpec

PRUNE_METHODS = ('none', 'magnitude', 'wanda', 'wanda++', 'sparsegpt')
QUANT_METHODS = ('none', 'rtn', 'gptq', 'awq')
# Every projection of a block, experts' included; a mixture of experts' router (mlp/gate) and
# shared-expert gate are not projections and stay dense unless a rule names them.
BLOCK_LINEARS = r'layers/\d+/(self_attn|mlp)/((experts/\d+|shared_expert)/)?[a-z]+_proj/kernel'
# LinearSpec fields added after the first recipes: left out of its repr while at their default.
_LATER_FIELDS = frozenset({'asymmetric', 'asymmetric_alpha', 'wandapp_alpha'})


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearSpec:
  """How to compress one linear layer (hashable).

  Attributes:
    prune: 'none', 'magnitude', 'wanda', 'wanda++' (Wanda with regional gradients) or 'sparsegpt'.
    sparsity: the pattern, required when pruning.
    quant: 'none', 'rtn', 'gptq' or 'awq'.
    qspec: the grid, required when quantizing.
    act_order: GPTQ act-order.
    static_groups: GPTQ static groups.
    awq_clip: AWQ's clipping search.
    block_size: GPTQ/SparseGPT lazy-batch size.
    damp: GPTQ/SparseGPT relative dampening.
    asymmetric: asymmetric calibration (GPTAQ) for GPTQ and SparseGPT: fit the compressed
      model's inputs to the dense model's outputs (the pipeline then runs both streams).
    asymmetric_alpha: GPTAQ's weight of the asymmetric term (0 would be plain GPTQ/SparseGPT).
    wandapp_alpha: Wanda++'s weight of the regional gradient in its score (``prune='wanda++'``).
  """
  prune: str = 'none'
  sparsity: PruneSpec | None = None
  quant: str = 'none'
  qspec: QuantSpec | None = None
  act_order: bool = False
  static_groups: bool = False
  awq_clip: bool = False
  block_size: int = 128
  damp: float = 0.01
  asymmetric: bool = False
  asymmetric_alpha: float = DEFAULT_ALPHA
  wandapp_alpha: float = WANDAPP_ALPHA

  def __post_init__(self):
    if self.prune not in PRUNE_METHODS:
      raise ValueError(f'unknown pruning method {self.prune!r}; choose one of {PRUNE_METHODS}')
    if self.quant not in QUANT_METHODS:
      raise ValueError(f'unknown quantization method {self.quant!r}; choose one of {QUANT_METHODS}')
    if self.prune != 'none' and self.sparsity is None:
      raise ValueError(f'pruning with {self.prune} needs a sparsity')
    if self.quant != 'none' and self.qspec is None:
      raise ValueError(f'quantization with {self.quant} needs a QuantSpec (bits, group size)')
    if self.quant == 'awq' and self.prune != 'none':
      raise ValueError('AWQ combined with pruning is not supported; use GPTQ or RTN with pruning')
    if self.act_order and self.quant != 'gptq':
      raise ValueError('act_order only applies to GPTQ')
    if self.asymmetric and self.quant != 'gptq' and self.prune != 'sparsegpt':
      raise ValueError('asymmetric calibration (GPTAQ) only applies to GPTQ and SparseGPT, not to '
                       f'{self.describe()}')
    if not (isinstance(self.asymmetric_alpha, (int, float)) and self.asymmetric_alpha > 0
            and math.isfinite(self.asymmetric_alpha)):
      raise ValueError(f'asymmetric_alpha must be a positive number, got {self.asymmetric_alpha!r}')
    if not (isinstance(self.wandapp_alpha, (int, float)) and self.wandapp_alpha >= 0
            and math.isfinite(self.wandapp_alpha)):
      raise ValueError(f'wandapp_alpha must be a number >= 0, got {self.wandapp_alpha!r}')

  def __repr__(self) -> str:
    # The fields added after the first recipes (_LATER_FIELDS) appear only when they differ from
    # their default, so that the repr of every earlier spec, part of a resumable run's identity
    # (compress/pipeline.py), stays what it was.
    shown = [f for f in dataclasses.fields(self)
             if f.repr and not (f.name in _LATER_FIELDS and getattr(self, f.name) == f.default)]
    return (f'{type(self).__qualname__}('
            + ', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown) + ')')

  @property
  def is_noop(self) -> bool:
    return self.prune == 'none' and self.quant == 'none'

  @property
  def bits(self) -> float:
    return float(self.qspec.bits) if self.quant != 'none' else 16.0

  def check_shape(self, shape: tuple[int, int], name: str = '') -> None:
    """Raises ValueError if the spec cannot apply to a ``[in, out]`` weight."""
    n_in = shape[0]
    where = f' of {name}' if name else ''
    # A group size that does not divide the input leaves a shorter last group (as GPTQ's reference
    # and its checkpoint format allow); only SparseGPT's joint prune + quantize sweep needs whole
    # groups.
    if self.qspec is not None and self.quant != 'none' and self.prune == 'sparsegpt':
      if self.qspec.is_ragged(n_in):
        raise ValueError(f'group_size={self.qspec.group_size} does not divide the input dimension '
                         f'{n_in}{where}, which SparseGPT with quantization needs')
    if self.sparsity is not None and self.sparsity.m and n_in % self.sparsity.m:
      raise ValueError(f'{self.sparsity.n}:{self.sparsity.m} sparsity needs the input dimension{where} '
                       f'({n_in}) to be a multiple of {self.sparsity.m}')

  def describe(self) -> str:
    parts = []
    if self.prune != 'none':
      parts.append(f'{self.prune} {self.sparsity.pattern}')
    if self.quant != 'none':
      g = self.qspec.group_size
      parts.append(f'{self.quant} w{self.qspec.bits}' + (f'g{g}' if g != -1 else '') +
                   (' sym' if self.qspec.symmetric else '') + (' act-order' if self.act_order else ''))
    text = ' + '.join(parts) or 'dense'
    if self.asymmetric:
      text += ' asymmetric' + ('' if self.asymmetric_alpha == DEFAULT_ALPHA
                               else f' alpha={self.asymmetric_alpha:g}')
    return text


@dataclasses.dataclass(frozen=True)
class Rule:
  """``pattern`` (regex, full match on the path) -> ``spec`` (None = leave dense)."""
  pattern: str
  spec: LinearSpec | None

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f'invalid rule pattern {self.pattern!r}: {e}') from e


def match(rules: Sequence[Rule], path: str) -> LinearSpec | None:
  """The spec of the first rule matching ``path``; None when none matches or it says so."""
  for rule in rules:
    if re.fullmatch(rule.pattern, path):
      return rule.spec
  return None


def uniform(spec: LinearSpec, *, include_head: bool = False) -> list[Rule]:
  """Every block linear gets ``spec``; the LM head too if asked (embeddings never)."""
  rules = [Rule(BLOCK_LINEARS, spec)]
  if include_head:
    rules.append(Rule(r'lm_head/kernel', spec))
  return rules


def parse_rule(text: str, base: LinearSpec) -> Rule:
  """Parses ``'REGEX=bits'`` or ``'REGEX=none'`` into a rule derived from ``base``.

  Example: ``'.*/mlp/down_proj/kernel=4'`` gives down projections 4 bits, the rest of ``base``.
  """
  if '=' not in text:
    raise ValueError(f'rule {text!r} must look like REGEX=BITS or REGEX=none')
  pattern, value = text.rsplit('=', 1)
  if value == 'none':
    return Rule(pattern, None)
  try:
    bits = int(value)
  except ValueError as e:
    raise ValueError(f'rule {text!r}: {value!r} is not a bit width or none') from e
  if base.qspec is None or base.quant == 'none':
    raise ValueError(f'rule {text!r} sets bits but no quantization method is selected')
  return Rule(pattern, dataclasses.replace(base, qspec=dataclasses.replace(base.qspec, bits=bits)))
