"""W{2,3,4,8}A16 Pallas kernel against a float64 NumPy reference built from the raw integers.

``LowbitPallasInterpretTest`` runs every case in Pallas interpret mode on the CPU (CI);
``LowbitPallasTest`` runs the same cases compiled, on a GPU only.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from kernels import formats, lowbit_pallas
from kernels.lowbit_pallas import BlockSizes
from tests.kernels import kernel_data as kd

BF16, F16 = jnp.bfloat16, jnp.float16

# name, bits, group_size, symmetric, act_order, M, K, N, dtype, rank, block
_CASES = (
    ('w4_g128_asym_m1_gemv', 4, 128, False, False, 1, 256, 192, BF16, 0, None),
    ('w4_g32_sym_m17_f16', 4, 32, True, False, 17, 96, 80, F16, 0, None),
    ('w3_g64_asym_m3', 3, 64, False, False, 3, 192, 96, BF16, 0, None),
    ('w3_gall_sym_m17_f16', 3, -1, True, False, 17, 160, 48, F16, 0, None),
    ('w2_g64_asym_m5_dot', 2, 64, False, False, 5, 256, 64, BF16, 0, None),
    ('w2_g32_sym_m1', 2, 32, True, False, 1, 64, 40, BF16, 0, None),
    ('w8_gall_asym_m17', 8, -1, False, False, 17, 128, 72, BF16, 0, None),
    ('w8_g128_sym_m3_f16', 8, 128, True, False, 3, 256, 64, F16, 0, None),
    ('w4_g128_actorder_m1_gemv', 4, 128, False, True, 1, 640, 96, BF16, 0, None),
    ('w4_g32_actorder_m3', 4, 32, False, True, 3, 128, 64, BF16, 0, None),
    ('w3_g64_actorder_m17_f16', 3, 64, False, True, 17, 128, 48, F16, 0, None),
    ('w4_in100_m2', 4, -1, False, False, 2, 100, 48, BF16, 0, None),
    ('w4_g64_adapter_splitk_gemv', 4, 64, False, False, 1, 256, 64, BF16, 8,
     BlockSizes(block_m=1, block_n=32, block_k=64, split_k=2, gemv=True)),
    ('w4_g128_adapter_m17', 4, 128, False, False, 17, 256, 80, BF16, 16, None),
    ('w2_g64_splitk_dot_m9', 2, 64, True, False, 9, 256, 64, BF16, 0,
     BlockSizes(block_m=16, block_n=32, block_k=64, split_k=4)),
    # Group sizes that do not divide K: a shorter last group with its own scale and zero.
    ('w4_g32_ragged_in80_m3', 4, 32, False, False, 3, 80, 64, BF16, 0, None),  # 32, 32, 16
    ('w4_g128_ragged_in576_m1_gemv', 4, 128, False, False, 1, 576, 64, BF16, 0, None),
    ('w3_g64_ragged_in160_m17_f16', 3, 64, True, False, 17, 160, 48, F16, 0, None),
    ('w2_g64_ragged_splitk_adapter_m5', 2, 64, False, False, 5, 224, 64, BF16, 8,
     BlockSizes(block_m=16, block_n=32, block_k=64, split_k=2)),
    ('w4_g32_ragged_actorder_m3', 4, 32, False, True, 3, 80, 64, BF16, 0, None),
)


class LowbitPallasInterpretTest(kd.KernelTestCase):
  """The cases in Pallas interpret mode; ``LowbitPallasTest`` runs them compiled."""

  @parameterized.named_parameters(*_CASES)
  def test_matches_float64_reference(self, bits, group_size, symmetric, act_order, m, k, n, dtype,
                                     rank, block):
    rng = np.random.default_rng(hash((bits, group_size, m, k, n)) % 2 ** 32)
    w, dense = kd.quantized(rng, k, n, bits, group_size, symmetric, act_order)
    self.check_matmul(lowbit_pallas.lowbit_matmul, rng, w, dense, m, dtype, rank, block)

  def test_leading_dims_and_compressed_linear(self):
    rng = np.random.default_rng(7)
    w, dense = kd.quantized(rng, 128, 48, 4, 64)
    ad, ab = kd.adapter(rng, 128, 48, 4)
    x = kd.activations(rng, (2, 3, 128), BF16)
    y = lowbit_pallas.linear(x, formats.CompressedLinear(weight=w, adapter=ad),
                             interpret=self.INTERPRET)
    self.assertEqual(y.shape, (2, 3, 48))
    self.assertLess(kd.rel_err(y, kd.reference(x, dense, ab)), kd.REL_TOL[jnp.dtype(BF16)])


LowbitPallasTest = kd.compiled_variant(LowbitPallasInterpretTest)


class CheckSupportedTest(parameterized.TestCase):
  """``check_supported`` decides from shapes and static fields alone (abstract leaves)."""

  def _weight(self, k=256, n=64, bits=4, group_size=128, act_order=False):
    w, _ = kd.quantized(np.random.default_rng(0), k, n, bits, group_size, act_order=act_order)
    return kd.abstract(w)

  def test_supported_returns_blocks(self):
    w = self._weight()
    block = lowbit_pallas.check_supported(jax.ShapeDtypeStruct((1, 256), BF16), w)
    self.assertTrue(block.gemv)
    block = lowbit_pallas.check_supported(jax.ShapeDtypeStruct((4, 64, 256), F16), w)
    self.assertFalse(block.gemv)
    self.assertEqual(block.block_m, 128)
    lowbit_pallas.check_supported(jax.ShapeDtypeStruct((3, 256), BF16),
                                  self._weight(act_order=True))

  def test_float32_activations_unsupported(self):
    with self.assertRaises(NotImplementedError):
      lowbit_pallas.check_supported(jax.ShapeDtypeStruct((1, 256), jnp.float32), self._weight())

  def test_mask_leaf_unsupported(self):
    leaf = formats.CompressedLinear(weight=self._weight(),
                                    mask=jax.ShapeDtypeStruct((256, 64), jnp.bool_))
    with self.assertRaises(NotImplementedError):
      lowbit_pallas.check_supported(jax.ShapeDtypeStruct((1, 256), BF16), leaf)

  def test_other_leaf_types_unsupported(self):
    x = jax.ShapeDtypeStruct((1, 256), BF16)
    with self.assertRaises(NotImplementedError):
      lowbit_pallas.check_supported(x, jax.ShapeDtypeStruct((256, 64), BF16))
    s, _ = kd.sparse24(np.random.default_rng(0), 256, 64)
    with self.assertRaises(NotImplementedError):
      lowbit_pallas.check_supported(x, kd.abstract(s))

  def test_group_not_a_whole_tile_unsupported(self):
    x = jax.ShapeDtypeStruct((1, 96), BF16)
    # 48 rows = 3 x 16: fine for 4-bit words, not for 3-bit runs of 32.
    lowbit_pallas.check_supported(x, self._weight(k=96, bits=4, group_size=48))
    with self.assertRaises(NotImplementedError):
      lowbit_pallas.check_supported(x, self._weight(k=96, bits=3, group_size=48))

  def test_quantized_adapter_not_fused(self):
    w = self._weight()
    qa, _ = kd.quantized(np.random.default_rng(1), 256, 32, 4, 128)
    qb, _ = kd.quantized(np.random.default_rng(2), 32, 64, 4, 32)
    leaf = formats.CompressedLinear(weight=w, adapter=kd.abstract(formats.LowRank(a=qa, b=qb)))
    with self.assertRaises(NotImplementedError):
      lowbit_pallas.check_supported(jax.ShapeDtypeStruct((1, 256), BF16), leaf)

  def test_mismatched_input_raises_value_error(self):
    with self.assertRaisesRegex(ValueError, 'in_features=256'):
      lowbit_pallas.check_supported(jax.ShapeDtypeStruct((1, 128), BF16), self._weight())

  @parameterized.parameters(
      dict(block_m=3), dict(block_n=8), dict(block_k=48), dict(block_m=8, gemv=True),
      dict(block_m=4, gemv=False), dict(split_k=0))
  def test_invalid_block_sizes(self, **kwargs):
    base = dict(block_m=16, block_n=64, block_k=64)
    with self.assertRaises(ValueError):
      BlockSizes(**{**base, **kwargs})

  def test_default_blocks_split_k_at_decode(self):
    # Decode: one row takes the GEMV path; K splits 4 ways, further while the output tiles alone
    # give fewer than ~2 programs per SM, never below 2 K steps per program.
    wide = BlockSizes.for_shape(1, 28672, 8192)
    self.assertTrue(wide.gemv)
    self.assertEqual(wide.split_k, 4)
    narrow = BlockSizes.for_shape(1, 2048, 8192)  # 16 tiles of 128
    self.assertEqual(narrow.split_k, 16)
    self.assertEqual(BlockSizes.for_shape(1, 2048, 512).split_k, 1)  # one 256-row step each
    few = BlockSizes.for_shape(4, 4096, 4096)  # 2-16 rows: a 16-row dot tile
    self.assertFalse(few.gemv)
    self.assertEqual((few.block_m, few.block_k), (16, 128))
    # Prefill tiles fit the shared memory that 512-row K steps overran on an H100.
    self.assertEqual(BlockSizes.for_shape(256, 4096, 4096).block_k, 64)

  def test_act_order_gets_narrow_decode_tiles(self):
    # Scales gathered per input row: the narrow tiles the H100 sweep picked for act-order weights.
    w, act = self._weight(), self._weight(act_order=True)
    for m, want in ((1, (32, 512)), (9, (32, 128))):
      x = jax.ShapeDtypeStruct((m, 256), BF16)
      block = lowbit_pallas.check_supported(x, act)
      self.assertEqual((block.block_n, block.block_k), want)
      self.assertEqual(lowbit_pallas.check_supported(x, w).block_n, 128 if m == 1 else 64)

if __name__ == '__main__':
  absltest.main()
