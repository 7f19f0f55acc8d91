"""``kernels.linear`` dispatch: backend default order, fallback to 'xla', and what gets recorded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import api, formats, layouts, lowbit_pallas
from tests.kernels import kernel_data as kd

BF16 = jnp.bfloat16
_ALL = ('pallas_lowbit', 'pallas_sparse24', 'xla')


@pytest.fixture(autouse=True)
def _restore_defaults():
  yield
  api.set_default(None)
  api.set_interpret(False)


def _quantized(k=128, n=48, seed=0, **kw):
  return kd.quantized(np.random.default_rng(seed), k, n, 4, 64, **kw)


def test_default_order_depends_on_backend():
  assert api.default_order('cpu') == ('xla',)
  assert api.default_order('gpu') == _ALL
  assert api.default_order() == (_ALL if jax.default_backend() == 'gpu' else ('xla',))
  api.set_default(['pallas_lowbit', 'xla'])
  assert api.default_order('cpu') == ('pallas_lowbit', 'xla')
  with pytest.raises(ValueError, match='unknown linear implementation'):
    api.set_default(['nope'])


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='checks the CPU default')
def test_cpu_default_runs_reference():
  w, dense = _quantized()
  x = kd.activations(np.random.default_rng(1), (3, 128), BF16)
  y = kernels.linear(x, w)
  assert kernels.last_implementation() == 'xla'
  assert kd.rel_err(y, kd.reference(x, dense)) < 1e-2


def test_compiled_kernels_decline_without_gpu():
  if jax.default_backend() == 'gpu':
    pytest.skip('a GPU runs the compiled kernel')
  w, _ = _quantized()
  x = kd.activations(np.random.default_rng(1), (1, 128), BF16)
  kernels.linear(x, w, implementation=_ALL)
  assert kernels.last_implementation() == 'xla'
  with pytest.raises(ExceptionGroup):
    kernels.linear(x, w, implementation='pallas_lowbit')


@pytest.mark.parametrize('case', ['mask', 'dense', 'float32', 'sparse_to_lowbit'])
def test_unsupported_falls_back_to_xla(case):
  rng = np.random.default_rng(2)
  w, dense = _quantized()
  x = kd.activations(rng, (2, 128), BF16)
  order = ('pallas_lowbit', 'xla')
  if case == 'mask':
    mask = rng.random((128, 48)) < 0.5
    leaf, dense = formats.CompressedLinear(weight=w, mask=jnp.asarray(mask)), dense * mask
  elif case == 'dense':
    leaf = jnp.asarray(dense, BF16)
  elif case == 'float32':
    leaf, x = w, x.astype(jnp.float32)
  else:
    leaf, dense = kd.sparse24(rng, 128, 48)
  with api.interpret_mode():
    with api.recording() as log:
      y = kernels.linear(x, leaf, implementation=order)
  assert kernels.last_implementation() == 'xla'
  assert log == ['xla']
  assert kd.rel_err(y, kd.reference(x, dense)) < 1e-2


def test_kernels_run_and_are_recorded_in_interpret_mode():
  rng = np.random.default_rng(3)
  w, dense = _quantized()
  ad, ab = kd.adapter(rng, 128, 48, 8)
  s, sdense = kd.sparse24(rng, 128, 48, bits=4, group_size=64)
  x = kd.activations(rng, (2, 1, 128), BF16)
  with api.interpret_mode(), api.recording() as log:
    y1 = kernels.linear(x, formats.CompressedLinear(weight=w, adapter=ad), implementation=_ALL)
    assert kernels.last_implementation() == 'pallas_lowbit'
    y2 = kernels.linear(x, s, implementation=_ALL)
    assert kernels.last_implementation() == 'pallas_sparse24'
  assert log == ['pallas_lowbit', 'pallas_sparse24']
  assert y1.shape == y2.shape == (2, 1, 48)
  assert kd.rel_err(y1, kd.reference(x, dense, ab)) < kd.REL_TOL[jnp.dtype(BF16)]
  assert kd.rel_err(y2, kd.reference(x, sdense)) < kd.REL_TOL[jnp.dtype(BF16)]
  assert not api.interpret_enabled()


def test_quantized_adapter_runs_outside_the_kernel():
  rng = np.random.default_rng(4)
  w, dense = _quantized()
  qa, a64 = kd.quantized(rng, 128, 32, 8, 64)
  qb, b64 = kd.quantized(rng, 32, 48, 8, 32)
  x = kd.activations(rng, (2, 128), BF16)
  leaf = formats.CompressedLinear(weight=w, adapter=formats.LowRank(a=qa, b=qb))
  with api.interpret_mode():
    y = kernels.linear(x, leaf, implementation=_ALL)
  assert kernels.last_implementation() == 'pallas_lowbit'
  assert kd.rel_err(y, kd.reference(x, dense, (a64, b64))) < 1e-2


def test_many_rows_fall_back(monkeypatch):
  monkeypatch.setattr(lowbit_pallas, 'DISPATCH_MAX_M', 2)
  w, dense = _quantized()
  x = kd.activations(np.random.default_rng(5), (3, 128), BF16)
  with api.interpret_mode():
    y = kernels.linear(x, w, implementation=_ALL)
  assert kernels.last_implementation() == 'xla'
  assert kd.rel_err(y, kd.reference(x, dense)) < 1e-2


def test_mismatched_shapes_raise():
  w, _ = _quantized()
  with api.interpret_mode(), pytest.raises(ValueError, match='in_features=128'):
    kernels.linear(jnp.ones((1, 64), BF16), w, implementation=_ALL)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
def test_gpu_default_dispatch_uses_kernels():
  rng = np.random.default_rng(6)
  w, dense = kd.quantized(rng, 512, 384, 4, 128)
  s, sdense = kd.sparse24(rng, 512, 384, bits=4, group_size=128)
  x = kd.activations(rng, (1, 4, 512), BF16)
  y = jax.jit(kernels.linear)(x, w)
  assert kernels.last_implementation() == 'pallas_lowbit'
  assert kd.rel_err(y, kd.reference(x, dense)) < kd.REL_TOL[jnp.dtype(BF16)]
  y = jax.jit(kernels.linear)(x, s)
  assert kernels.last_implementation() == 'pallas_sparse24'
  assert kd.rel_err(y, kd.reference(x, sdense)) < kd.REL_TOL[jnp.dtype(BF16)]


def test_compressed_model_traces_through_the_kernels():
  """Prefill and decode of a model whose linears are quantized or 2:4 pick the kernels (traced
  with the GPU default order; the numerics of each kernel are checked in the kernel tests)."""
  from models import config as config_lib, llama  # pylint: disable=g-import-not-at-top
  cfg = config_lib.tiny_config(num_layers=1)
  params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0), BF16))
  rng = np.random.default_rng(7)
  block = params['layers'][0]
  for part, name in (('self_attn', 'q_proj'), ('self_attn', 'k_proj'), ('self_attn', 'v_proj'),
                     ('self_attn', 'o_proj'), ('mlp', 'gate_proj'), ('mlp', 'down_proj')):
    k, n = block[part][name]['kernel'].shape
    block[part][name]['kernel'] = jax.eval_shape(lambda k=k, n=n: kd.quantized(rng, k, n, 4, 32)[0])
  k, n = block['mlp']['up_proj']['kernel'].shape
  block['mlp']['up_proj']['kernel'] = jax.eval_shape(
      lambda: kd.sparse24(rng, k, n, bits=4, group_size=64)[0])
  prompt = jnp.zeros((2, 5), jnp.int32)
  api.set_default(api.GPU_DEFAULT)
  with api.interpret_mode(), api.recording() as log:
    out = jax.eval_shape(
        lambda p, t: llama.generate(p, t, cfg, max_new_tokens=3, dtype=BF16), params, prompt)
  assert out.shape == (2, 3)
  # prefill + one traced decode step, each: 6 low-bit linears, 1 sparse one, the dense LM head.
  per_pass = ['pallas_lowbit'] * 6 + ['pallas_sparse24'] + ['xla']
  assert sorted(log) == sorted(per_pass * 2)


def test_ragged_groups_run_through_every_implementation():
  """A group size that does not divide K (g64 on 160 inputs: groups of 64, 64 and 32): the
  reference, the low-bit kernel (plain and act-order re-laid out) and the 2:4 kernel (its values'
  groups halved) all equal the dequantized dense product."""
  rng = np.random.default_rng(7)
  x = kd.activations(rng, (3, 160), BF16)
  w, dense = kd.quantized(rng, 160, 48, 4, 64)
  wa, dense_a = kd.quantized(rng, 160, 48, 3, 64, act_order=True)
  s, sdense = kd.sparse24(rng, 160, 48, bits=4, group_size=64)
  assert w.scales.shape[0] == wa.scales.shape[0] == s.values.scales.shape[0] == 3
  cases = [(w, dense, 'pallas_lowbit'), (layouts.act_order_leaf(wa), dense_a, 'pallas_lowbit'),
           (s, sdense, 'pallas_sparse24')]
  for leaf, want, impl in cases:
    ref = kd.reference(x, want)
    assert kd.rel_err(kernels.linear(x, leaf, implementation='xla'), ref) < 1e-2
    with api.interpret_mode():
      y = kernels.linear(x, leaf, implementation=_ALL)
      assert kernels.last_implementation() == impl
    assert kd.rel_err(y, ref) < kd.REL_TOL[jnp.dtype(BF16)]
