"""2:4 sparse Pallas kernel (float values and 2:4 + low-bit values) against a float64 reference.

``Sparse24PallasInterpretTest`` runs every case in Pallas interpret mode on the CPU (CI);
``Sparse24PallasTest`` runs the same cases compiled, on a GPU only.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from kernels import formats, sparse24_pallas
from kernels.sparse24_pallas import BlockSizes
from tests.kernels import kernel_data as kd

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# name, value bits (None: float values), dense group_size, symmetric, value dtype, M, K, N,
# activation dtype, rank, block
_CASES = (
    ('bf16_m1_gemv', None, 0, False, BF16, 1, 128, 96, BF16, 0, None),
    ('f16_m17_dot', None, 0, False, F16, 17, 128, 80, F16, 0, None),
    ('f32values_m3', None, 0, False, F32, 3, 64, 40, BF16, 0, None),
    ('bf16_adapter_m1', None, 0, False, BF16, 1, 64, 48, BF16, 16, None),
    ('int4_g128_m1', 4, 128, False, None, 1, 256, 72, BF16, 0, None),
    ('int4_g128_adapter_m17', 4, 128, False, None, 17, 256, 64, BF16, 8, None),
    ('int4_gall_sym_in100_m3', 4, -1, True, None, 3, 100, 24, BF16, 0, None),
    ('int8_gall_splitk_adapter_m9', 8, -1, False, None, 9, 256, 64, F16, 4,
     BlockSizes(block_m=16, block_n=32, block_k=64, split_k=2)),
    ('int3_g128_m2', 3, 128, False, None, 2, 256, 64, BF16, 0, None),
    ('int2_g64_m17', 2, 64, True, None, 17, 256, 40, BF16, 0, None),
    # 160 inputs in groups of 64: the last dense group (32 rows, 16 kept values) is shorter.
    ('int4_g64_ragged_in160_m3', 4, 64, False, None, 3, 160, 48, BF16, 0, None),
)


class Sparse24PallasInterpretTest(kd.KernelTestCase):
  """The cases in Pallas interpret mode; ``Sparse24PallasTest`` runs them compiled."""

  @parameterized.named_parameters(*_CASES)
  def test_matches_float64_reference(self, bits, group_size, symmetric, value_dtype, m, k, n,
                                     dtype, rank, block):
    rng = np.random.default_rng(hash((bits, group_size, m, k, n)) % 2 ** 32)
    w, dense = kd.sparse24(rng, k, n, bits, group_size, symmetric, value_dtype)
    self.assertTrue(np.all((dense.reshape(k // 4, 4, n) != 0).sum(1) <= 2))
    self.check_matmul(sparse24_pallas.sparse24_matmul, rng, w, dense, m, dtype, rank, block)

  def test_from_formats_helpers(self):
    """A weight built by ``sparse24_from_quantized`` (the compress path) multiplies correctly."""
    rng = np.random.default_rng(3)
    q, dense = kd.quantized(rng, 128, 48, 4, 64)
    keep = np.argsort(rng.random((32, 4, 48)), axis=1)[:, :2]
    mask = np.zeros((32, 4, 48), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    mask = mask.reshape(128, 48)
    s = formats.sparse24_from_quantized(q, jnp.asarray(mask))
    x = kd.activations(rng, (2, 1, 128), BF16)
    y = sparse24_pallas.linear(x, formats.CompressedLinear(weight=s), interpret=self.INTERPRET)
    self.assertEqual(y.shape, (2, 1, 48))
    ref = kd.reference(x, np.where(mask, dense, 0.0))
    self.assertLess(kd.rel_err(y, ref), kd.REL_TOL[jnp.dtype(BF16)])


Sparse24PallasTest = kd.compiled_variant(Sparse24PallasInterpretTest)


class CheckSupportedTest(absltest.TestCase):
  """``check_supported`` decides from shapes and static fields alone (abstract leaves)."""

  def test_supported(self):
    rng = np.random.default_rng(0)
    for bits in (None, 4):
      w, _ = kd.sparse24(rng, 256, 64, bits)
      block = sparse24_pallas.check_supported(jax.ShapeDtypeStruct((1, 256), BF16), kd.abstract(w))
      self.assertTrue(block.gemv)

  def test_unsupported(self):
    rng = np.random.default_rng(0)
    x = jax.ShapeDtypeStruct((1, 256), BF16)
    w, _ = kd.sparse24(rng, 256, 64, 4)
    with self.assertRaises(NotImplementedError):  # float32 activations
      sparse24_pallas.check_supported(jax.ShapeDtypeStruct((1, 256), F32), kd.abstract(w))
    with self.assertRaises(NotImplementedError):  # a QuantizedWeight is not a 2:4 weight
      q, _ = kd.quantized(rng, 256, 64, 4, 128)
      sparse24_pallas.check_supported(x, kd.abstract(q))
    with self.assertRaises(NotImplementedError):  # masks go to the reference
      leaf = formats.CompressedLinear(weight=kd.abstract(w),
                                      mask=jax.ShapeDtypeStruct((256, 64), jnp.bool_))
      sparse24_pallas.check_supported(x, leaf)
    with self.assertRaises(NotImplementedError):  # 2-bit values in groups of 8 compressed rows
      w2, _ = kd.sparse24(rng, 256, 64, 2, group_size=16)
      sparse24_pallas.check_supported(x, kd.abstract(w2))
    with self.assertRaises(NotImplementedError):  # in not a multiple of 4
      odd = formats.Sparse24Weight(values=jax.ShapeDtypeStruct((3, 64), BF16),
                                   indices=jax.ShapeDtypeStruct((3, 64), jnp.uint8))
      sparse24_pallas.check_supported(jax.ShapeDtypeStruct((1, 6), BF16), odd)
    with self.assertRaisesRegex(ValueError, 'do not match'):
      sparse24_pallas.check_supported(jax.ShapeDtypeStruct((1, 128), BF16), kd.abstract(w))


if __name__ == '__main__':
  absltest.main()
