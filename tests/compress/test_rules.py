"""Tests for compress/rules.py.

Properties: ``match`` returns the spec of the first rule that full-matches a path and None when no
rule matches (or the matching rule says so); ``uniform`` selects every block linear and, only when
asked, the LM head, never embeddings/norms/biases; ``parse_rule`` reads ``REGEX=BITS`` and
``REGEX=none`` and rejects malformed text with a ValueError naming the problem; ``LinearSpec``
validation, ``check_shape``, ``describe``, ``is_noop``, ``bits``, hashability.
"""

import dataclasses

import pytest

from compress import rules
from compress.prune import PruneSpec
from compress.rules import LinearSpec, Rule
from kernels.formats import QuantSpec

GPTQ4 = LinearSpec(quant='gptq', qspec=QuantSpec(bits=4, group_size=32))
RTN3 = LinearSpec(quant='rtn', qspec=QuantSpec(bits=3, group_size=-1, symmetric=True))
WANDA24 = LinearSpec(prune='wanda', sparsity=PruneSpec.parse('2:4'))

BLOCK_PATHS = [f'layers/{i}/{sub}/{name}_proj/kernel'
               for i in (0, 7, 31)
               for sub, names in (('self_attn', ('q', 'k', 'v', 'o')),
                                  ('mlp', ('gate', 'up', 'down')))
               for name in names]
OTHER_PATHS = ['lm_head/kernel', 'embed_tokens/embedding', 'norm/scale',
               'layers/0/input_layernorm/scale', 'layers/0/self_attn/q_proj/bias',
               'model/layers/0/self_attn/q_proj/kernel', 'layers/x/mlp/up_proj/kernel',
               'layers/0/mlp/up_proj/kernel/extra']


# --------------------------------------------------------------------------- match / uniform


def test_first_match_wins():
  rs = [Rule(r'layers/0/.*', None), Rule(r'.*/down_proj/kernel', RTN3), Rule(r'.*', GPTQ4)]
  assert rules.match(rs, 'layers/0/mlp/down_proj/kernel') is None  # rule 0 (None) wins
  assert rules.match(rs, 'layers/1/mlp/down_proj/kernel') is RTN3
  assert rules.match(rs, 'layers/1/mlp/up_proj/kernel') is GPTQ4
  # Reversed order: the catch-all now wins everywhere.
  assert rules.match(rs[::-1], 'layers/0/mlp/down_proj/kernel') is GPTQ4


def test_unmatched_gives_none_and_match_is_full():
  rs = [Rule(r'layers/0', GPTQ4), Rule(r'mlp/down_proj', RTN3)]
  # re.fullmatch: a prefix or substring is not a match.
  assert rules.match(rs, 'layers/0/mlp/down_proj/kernel') is None
  assert rules.match(rs, 'layers/0') is GPTQ4
  assert rules.match([], 'layers/0/mlp/down_proj/kernel') is None


@pytest.mark.parametrize('include_head', [False, True])
def test_uniform(include_head):
  rs = rules.uniform(GPTQ4, include_head=include_head)
  for path in BLOCK_PATHS:
    assert rules.match(rs, path) is GPTQ4, path
  for path in OTHER_PATHS:
    expect = GPTQ4 if (include_head and path == 'lm_head/kernel') else None
    assert rules.match(rs, path) is expect, path
  assert len(rs) == (2 if include_head else 1)


def test_rule_rejects_invalid_regex():
  with pytest.raises(ValueError, match='invalid rule pattern'):
    Rule('layers/(0', GPTQ4)


# --------------------------------------------------------------------------- parse_rule


def test_parse_rule_bits():
  r = rules.parse_rule('.*/mlp/down_proj/kernel=3', GPTQ4)
  assert r.pattern == '.*/mlp/down_proj/kernel'
  assert r.spec.qspec == QuantSpec(bits=3, group_size=32)
  assert r.spec == dataclasses.replace(GPTQ4, qspec=QuantSpec(bits=3, group_size=32))
  assert rules.match([r], 'layers/5/mlp/down_proj/kernel').bits == 3.0
  # The last '=' separates: a pattern may itself contain '='.
  r2 = rules.parse_rule('a=b=8', GPTQ4)
  assert r2.pattern == 'a=b' and r2.spec.qspec.bits == 8
  # Other fields of the base carry over (pruning, group size, symmetry).
  base = LinearSpec(prune='sparsegpt', sparsity=PruneSpec.parse('0.5'), quant='gptq',
                    qspec=QuantSpec(bits=4, group_size=64, symmetric=True))
  r3 = rules.parse_rule('x=2', base)
  assert r3.spec.prune == 'sparsegpt' and r3.spec.qspec == QuantSpec(bits=2, group_size=64,
                                                                     symmetric=True)


def test_parse_rule_none():
  r = rules.parse_rule('layers/0/.*=none', GPTQ4)
  assert r.pattern == 'layers/0/.*' and r.spec is None
  assert rules.match([r] + rules.uniform(GPTQ4), 'layers/0/mlp/up_proj/kernel') is None
  # 'none' needs no quantization method.
  assert rules.parse_rule('x=none', WANDA24).spec is None


@pytest.mark.parametrize('text,base,message', [
    ('layers/0/.*', GPTQ4, 'must look like REGEX=BITS or REGEX=none'),
    ('x=four', GPTQ4, "'four' is not a bit width or none"),
    ('x=', GPTQ4, "'' is not a bit width or none"),
    ('x=4.5', GPTQ4, 'not a bit width'),
    ('x=None', GPTQ4, 'not a bit width'),
    ('x=4', WANDA24, 'no quantization method is selected'),
    ('x=5', GPTQ4, 'bits=5 is not supported'),
    ('x=16', GPTQ4, 'bits=16 is not supported'),
    ('layers/(0=4', GPTQ4, 'invalid rule pattern'),
    ('layers/(0=none', GPTQ4, 'invalid rule pattern'),
])
def test_parse_rule_errors(text, base, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    rules.parse_rule(text, base)


def test_parse_rule_bits_without_quant_method_is_an_error():
  base = LinearSpec(quant='none', qspec=QuantSpec(bits=4, group_size=32))
  with pytest.raises(ValueError, match='no quantization method'):
    rules.parse_rule('x=2', base)


# --------------------------------------------------------------------------- LinearSpec


@pytest.mark.parametrize('kwargs,message', [
    (dict(prune='random', sparsity=PruneSpec.parse('0.5')), "unknown pruning method 'random'"),
    (dict(quant='hqq', qspec=QuantSpec()), "unknown quantization method 'hqq'"),
    (dict(prune='wanda'), 'pruning with wanda needs a sparsity'),
    (dict(quant='gptq'), 'quantization with gptq needs a QuantSpec'),
    (dict(quant='awq', qspec=QuantSpec(), prune='wanda', sparsity=PruneSpec.parse('0.5')),
     'AWQ combined with pruning is not supported'),
    (dict(quant='rtn', qspec=QuantSpec(), act_order=True), 'act_order only applies to GPTQ'),
    (dict(act_order=True), 'act_order only applies to GPTQ'),
])
def test_linear_spec_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    LinearSpec(**kwargs)


def test_linear_spec_keyword_only_and_frozen():
  with pytest.raises(TypeError):
    LinearSpec('wanda')  # pylint: disable=too-many-function-args
  with pytest.raises(dataclasses.FrozenInstanceError):
    GPTQ4.quant = 'rtn'


def test_check_shape():
  GPTQ4.check_shape((64, 10))
  GPTQ4.check_shape((96, 7), 'layers/0/mlp/down_proj')
  GPTQ4.check_shape((48, 10), 'layers/1/mlp/down_proj')  # a shorter last group of 16
  joint = dataclasses.replace(GPTQ4, prune='sparsegpt', sparsity=PruneSpec.parse('0.5'))
  with pytest.raises(ValueError, match=r'group_size=32 does not divide the input dimension 48 of '
                     r'layers/1/mlp/down_proj, which SparseGPT'):
    joint.check_shape((48, 10), 'layers/1/mlp/down_proj')
  RTN3.check_shape((47, 10))  # one group per output unit: any input dimension
  # The output dimension is never constrained.
  GPTQ4.check_shape((64, 33))
  WANDA24.check_shape((8, 3))
  with pytest.raises(ValueError, match=r'2:4 sparsity needs the input dimension of q \(10\) to '
                     r'be a multiple of 4'):
    WANDA24.check_shape((10, 3), 'q')
  LinearSpec(prune='magnitude', sparsity=PruneSpec.parse('0.5')).check_shape((7, 3))
  LinearSpec().check_shape((7, 3))
  # A qspec without a quantization method imposes no group constraint.
  LinearSpec(qspec=QuantSpec(group_size=32)).check_shape((48, 3))


def test_describe():
  assert LinearSpec().describe() == 'dense'
  assert GPTQ4.describe() == 'gptq w4g32'
  assert RTN3.describe() == 'rtn w3 sym'
  assert WANDA24.describe() == 'wanda 2:4'
  assert LinearSpec(prune='magnitude', sparsity=PruneSpec.parse('0.5')).describe() == (
      'magnitude 0.5')
  spec = LinearSpec(prune='sparsegpt', sparsity=PruneSpec.parse('4:8'), quant='gptq',
                    qspec=QuantSpec(bits=2, group_size=64), act_order=True)
  assert spec.describe() == 'sparsegpt 4:8 + gptq w2g64 act-order'


def test_is_noop_and_bits():
  assert LinearSpec().is_noop and LinearSpec().bits == 16.0
  assert not GPTQ4.is_noop and GPTQ4.bits == 4.0
  assert not WANDA24.is_noop and WANDA24.bits == 16.0
  assert RTN3.bits == 3.0
  assert isinstance(GPTQ4.bits, float)
  # A qspec alone does not quantize.
  assert LinearSpec(qspec=QuantSpec(bits=2)).is_noop
  assert LinearSpec(qspec=QuantSpec(bits=2)).bits == 16.0


def test_hashable():
  same = LinearSpec(quant='gptq', qspec=QuantSpec(bits=4, group_size=32))
  assert same == GPTQ4 and hash(same) == hash(GPTQ4)
  assert len({GPTQ4, same, RTN3, WANDA24}) == 3
  assert dataclasses.replace(GPTQ4, damp=0.1) != GPTQ4
  assert hash(Rule('x', GPTQ4)) == hash(Rule('x', same))
