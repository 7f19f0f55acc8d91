"""Random kernel inputs (never zeros), float64 NumPy references built from the raw integers, and the
test-case base shared by the Pallas kernel tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from kernels import formats
from kernels.formats import QuantizedWeight, QuantSpec, Sparse24Weight

# ||out - ref|| / ||ref|| bounds: the kernels round the output (and, for act-order or 2:4 floats,
# the dequantized weight) to the activation dtype once; float32 accumulation adds far less.
REL_TOL = {jnp.dtype(jnp.bfloat16): 5e-3, jnp.dtype(jnp.float16): 1e-3}

# The 6 ways to keep 2 of 4 positions, in increasing order.
_PAIRS = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])


def quantized(rng: np.random.Generator, k: int, n: int, bits: int, group_size: int,
              symmetric: bool = False, act_order: bool = False):
  """A random :class:`QuantizedWeight` ``[k, n]`` and its float64 dense weight."""
  spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
  groups = spec.num_groups(k)
  glen = spec.group_len(k)
  codes = rng.integers(0, 2 ** bits, (k, n))
  scales = rng.uniform(0.5, 1.5, (groups, n)).astype(np.float32) / (2 ** bits)
  if symmetric:
    zeros = np.full((groups, n), 2 ** (bits - 1))
  else:
    zeros = rng.integers(0, 2 ** bits, (groups, n))
  g = np.arange(k) // glen
  if act_order:
    g = rng.permutation(g)
  w = QuantizedWeight.from_ints(jnp.asarray(codes), jnp.asarray(scales), jnp.asarray(zeros), spec,
                                g_idx=jnp.asarray(g) if act_order else None)
  dense = (codes - zeros[g].astype(np.float64)) * scales[g].astype(np.float64)
  return w, dense


def sparse24(rng: np.random.Generator, k: int, n: int, bits: int | None = None,
             group_size: int = 128, symmetric: bool = False, value_dtype=jnp.bfloat16):
  """A random 2:4 weight ``[k, n]`` (float values, or ``bits``-bit values whose dense groups have
  ``group_size`` rows) and its float64 dense weight."""
  pairs = _PAIRS[rng.integers(0, 6, (k // 4, n))]  # [k/4, n, 2]
  idx = np.transpose(pairs, (0, 2, 1)).reshape(k // 2, n)
  if bits is None:
    vals = jnp.asarray(rng.standard_normal((k // 2, n)) * 0.1, value_dtype)
    vals64 = np.asarray(vals.astype(jnp.float32), np.float64)
  else:
    half = -1 if group_size == -1 else group_size // 2
    vals, vals64 = quantized(rng, k // 2, n, bits, half, symmetric)
  dense = np.zeros((k // 4, 4, n))
  v = vals64.reshape(k // 4, 2, n)
  i = idx.reshape(k // 4, 2, n)
  for j in range(2):
    np.put_along_axis(dense, i[:, j][:, None, :], v[:, j][:, None, :], axis=1)
  w = Sparse24Weight(values=vals, indices=jnp.asarray(idx, jnp.uint8))
  return w, dense.reshape(k, n)


def adapter(rng: np.random.Generator, k: int, n: int, rank: int):
  a = rng.standard_normal((k, rank)).astype(np.float32) * 0.1
  b = rng.standard_normal((rank, n)).astype(np.float32) * 0.1
  return formats.LowRank(a=jnp.asarray(a), b=jnp.asarray(b)), (a.astype(np.float64),
                                                               b.astype(np.float64))


def activations(rng: np.random.Generator, shape, dtype) -> jnp.ndarray:
  return jnp.asarray(rng.standard_normal(shape), dtype)


def reference(x, dense: np.ndarray, ab=None) -> np.ndarray:
  """float64 ``x @ dense (+ (x @ a) @ b)`` with x ``[..., k]``."""
  x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  y = x64 @ dense
  if ab is not None:
    y = y + (x64 @ ab[0]) @ ab[1]
  return y


def rel_err(out, ref: np.ndarray) -> float:
  out64 = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  return float(np.linalg.norm(out64 - ref) / np.linalg.norm(ref))


def abstract(tree):
  """``tree`` with every array replaced by its ``jax.ShapeDtypeStruct``."""
  return jax.eval_shape(lambda: tree)


class KernelTestCase(parameterized.TestCase):
  """Kernel cases, run in Pallas interpret mode (``INTERPRET = True``, the CPU tests) or compiled
  (:func:`compiled_variant`, GPU only)."""
  INTERPRET = True

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != 'gpu':
      self.skipTest('compiled Pallas kernels need a GPU')

  def check_matmul(self, matmul, rng: np.random.Generator, w, dense: np.ndarray, m: int, dtype,
                   rank: int = 0, block=None):
    """Runs ``matmul(x, w, adapter, block=..., interpret=...)`` on random activations ``[m, in]``
    (with a random float adapter of rank ``rank`` > 0) and checks the ``[m, out]`` output: dtype,
    no unwritten or NaN element, relative error to the float64 reference below :data:`REL_TOL`."""
    k, n = dense.shape
    x = activations(rng, (m, k), dtype)
    ad, ab = adapter(rng, k, n, rank) if rank else (None, None)
    y = matmul(x, w, ad, block=block, interpret=self.INTERPRET)
    self.assertEqual(y.shape, (m, n))
    self.assertEqual(y.dtype, dtype)
    self.assertTrue(np.all(np.isfinite(np.asarray(y, np.float32))), 'unwritten or NaN output')
    self.assertLess(rel_err(y, reference(x, dense, ab)), REL_TOL[jnp.dtype(dtype)])


def compiled_variant(interpret_cls: type) -> type:
  """The compiled twin of an interpret-mode test class: same cases, ``INTERPRET = False``, marked
  ``gpu``; named like ``interpret_cls`` without ``Interpret``."""
  name = interpret_cls.__name__.replace('Interpret', '')
  cls = type(name, (interpret_cls,), {
      'INTERPRET': False, '__module__': interpret_cls.__module__, '__qualname__': name,
      '__doc__': f'The cases of {interpret_cls.__name__}, compiled (GPU only).'})
  return pytest.mark.gpu(cls)
