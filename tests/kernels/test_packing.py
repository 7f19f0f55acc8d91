"""Tests for kernels/packing.py.

Properties: ``unpack(pack(q)) == q`` for every supported bit width, along either axis, for 1-D to
3-D arrays; the packed words equal an independent oracle built from the documented little-endian
bit stream (and, for 4 bits, the AutoGPTQ packing loop); dtype/shape as documented; lengths that are
not a multiple of 32 (pack) or of ``bits`` (unpack) and unsupported widths raise; extremes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import packing

BITS = (2, 3, 4, 8)


def _codes(shape, bits, seed=0):
  return np.random.default_rng(seed).integers(0, 2 ** bits, size=shape).astype(np.int32)


def _oracle_pack(q, bits):
  """Packs ``q [n, ...]`` along axis 0 from the module docstring's bit-stream definition, with
  Python integers: run r of 32 values is the stream ``sum_k q[32 r + k] << (bits * k)``, word j of
  the run is bits ``32 j .. 32 j + 31`` of it."""
  q = np.asarray(q, np.int64)
  n = q.shape[0]
  flat = q.reshape(n, -1)
  out = np.zeros((n * bits // 32, flat.shape[1]), np.uint32)
  for r in range(n // 32):
    for c in range(flat.shape[1]):
      stream = 0
      for k in range(32):
        stream |= int(flat[32 * r + k, c]) << (bits * k)
      for j in range(bits):
        out[r * bits + j, c] = (stream >> (32 * j)) & 0xFFFFFFFF
  return out.view(np.int32).reshape((n * bits // 32,) + q.shape[1:])


@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('shape', [(32,), (32, 5), (96, 3), (64, 2, 3)])
def test_roundtrip_axis0(bits, shape):
  q = _codes(shape, bits, seed=bits)
  packed = packing.pack(jnp.asarray(q), bits)
  assert packed.dtype == jnp.int32
  assert packed.shape == (shape[0] * bits // 32,) + shape[1:]
  back = packing.unpack(packed, bits)
  assert back.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(back), q)


@pytest.mark.parametrize('bits', BITS)
def test_roundtrip_last_axis(bits):
  # qzeros layout: [groups, out] packed along out.
  q = _codes((3, 64), bits, seed=10 + bits)
  packed = packing.pack(q, bits, axis=1)
  assert packed.shape == (3, 64 * bits // 32)
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, axis=1)), q)
  # Negative axes are the same axis.
  np.testing.assert_array_equal(np.asarray(packing.pack(q, bits, axis=-1)), np.asarray(packed))
  # Packing along the last axis is packing the transpose along axis 0.
  np.testing.assert_array_equal(np.asarray(packed), np.asarray(packing.pack(q.T, bits)).T)


@pytest.mark.parametrize('bits', BITS)
def test_matches_bit_stream_oracle(bits):
  q = _codes((64, 3), bits, seed=20 + bits)
  np.testing.assert_array_equal(np.asarray(packing.pack(q, bits)), _oracle_pack(q, bits))


def test_4bit_matches_autogptq_loop():
  """AutoGPTQ's ``QuantLinear.pack`` for 4 bits: word i // 8 gets value i << 4 * (i % 8)."""
  q = _codes((64, 4), 4, seed=3).astype(np.uint32)
  ref = np.zeros((8, 4), np.uint32)
  for row in range(8):
    for j in range(8):
      ref[row] |= q[8 * row + j] << (4 * j)
  np.testing.assert_array_equal(np.asarray(packing.pack(q.astype(np.int32), 4)), ref.view(np.int32))


def test_3bit_straddling_values():
  """Values 10 and 21 of each 3-bit run straddle two words (GPTQ's 3-bit layout)."""
  q = np.zeros((32, 1), np.int32)
  q[10] = 7  # bits 30, 31 of word 0 and bit 0 of word 1
  q[21] = 5  # bit 31 of word 1 (value bit 0) and bits 0, 1 of word 2 (value bits 1, 2 = 0b10)
  words = np.asarray(packing.pack(q, 3)).view(np.uint32)[:, 0]
  assert words[0] == 0b11 << 30
  assert words[1] == (1 | (1 << 31))
  assert words[2] == 0b10
  np.testing.assert_array_equal(np.asarray(packing.unpack(packing.pack(q, 3), 3)), q)


@pytest.mark.parametrize('bits', BITS)
def test_extremes(bits):
  zeros = np.zeros((64, 3), np.int32)
  np.testing.assert_array_equal(np.asarray(packing.pack(zeros, bits)), 0)
  top = np.full((64, 3), 2 ** bits - 1, np.int32)
  packed = np.asarray(packing.pack(top, bits))
  np.testing.assert_array_equal(packed, -1)  # every bit of every word set
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits)), top)


@pytest.mark.parametrize('bits', BITS)
def test_unpack_of_any_words_is_in_range_and_repacks(bits):
  """Every int32 word pattern is a valid packing: unpack yields codes in [0, 2^bits) that pack back
  to the same words."""
  words = np.random.default_rng(bits).integers(-2 ** 31, 2 ** 31, size=(bits * 2, 3),
                                               dtype=np.int64).astype(np.int32)
  vals = np.asarray(packing.unpack(words, bits))
  assert vals.shape == (64, 3)
  assert vals.min() >= 0 and vals.max() < 2 ** bits
  np.testing.assert_array_equal(np.asarray(packing.pack(vals, bits)), words)


@pytest.mark.parametrize('n', [16, 33, 40])
def test_pack_rejects_length_not_multiple_of_32(n):
  with pytest.raises(ValueError, match='multiple of 32'):
    packing.pack(np.zeros((n, 2), np.int32), 4)


def test_unpack_rejects_word_count_not_multiple_of_bits():
  with pytest.raises(ValueError, match='multiple of 3 words'):
    packing.unpack(np.zeros((4, 2), np.int32), 3)
  with pytest.raises(ValueError, match='multiple of 4 words'):
    packing.unpack(np.zeros((6,), np.int32), 4)


@pytest.mark.parametrize('bits', [0, 1, 5, 6, 7, 16, 32])
def test_unsupported_bits(bits):
  with pytest.raises(ValueError, match=f'bits={bits} is not supported'):
    packing.check_bits(bits)
  with pytest.raises(ValueError, match='not supported'):
    packing.pack(np.zeros((32,), np.int32), bits)
  with pytest.raises(ValueError, match='not supported'):
    packing.unpack(np.zeros((32,), np.int32), bits)


def test_supported_bits_constant():
  assert packing.SUPPORTED_BITS == BITS


def test_pack_under_jit_and_pack_np():
  q = _codes((64, 5), 4, seed=7)
  eager = np.asarray(packing.pack(q, 4))
  jitted = jax.jit(lambda x: packing.pack(x, 4))(jnp.asarray(q))
  np.testing.assert_array_equal(np.asarray(jitted), eager)
  via_np = packing.pack_np(q, 4)
  assert isinstance(via_np, np.ndarray) and via_np.dtype == np.int32
  np.testing.assert_array_equal(via_np, eager)
  back = jax.jit(lambda p: packing.unpack(p, 4))(jitted)
  np.testing.assert_array_equal(np.asarray(back), q)


def test_input_dtypes():
  """Codes given as uint8 / int64 pack the same as int32."""
  q = _codes((32, 2), 8, seed=5)
  ref = np.asarray(packing.pack(q, 8))
  np.testing.assert_array_equal(np.asarray(packing.pack(q.astype(np.uint8), 8)), ref)
  np.testing.assert_array_equal(np.asarray(packing.pack(q.astype(np.int64), 8)), ref)


def test_out_of_range_code_does_not_corrupt_neighbours():
  q = np.zeros((32,), np.int32)
  q[0] = 16  # out of range for 4 bits
  try:
    packed = packing.pack(q, 4)
  except ValueError:
    return  # rejecting it is fine
  back = np.asarray(packing.unpack(packed, 4))
  np.testing.assert_array_equal(back[1:], q[1:])  # neighbours intact (value 0 comes back as 1)
