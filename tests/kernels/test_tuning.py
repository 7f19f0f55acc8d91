"""The tuning table (kernels/tuning.py) and the dispatch that reads it (kernels/api.py).

Properties: keys (format, shape and M buckets); lookup on a listed device, an unseen device (the
"default" section, then the built-in rule: kernels for small M only), exact keys before patterns;
a malformed table fails with one line naming the file; the shipped table is valid and never picks
a kernel above the built-in small-M limit where it has no measurement saying so; the default
dispatch runs 'xla' for large M and the kernel (with the table's tiles) for small M; a table is
written from benchmark rows and read back.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import api, formats, layouts, lowbit_pallas, tuning
from kernels.pallas_common import BlockSizes
from tests.kernels import kernel_data as kd

BF16 = jnp.bfloat16
H100 = 'NVIDIA H100 80GB HBM3'


@pytest.fixture(autouse=True)
def _restore():
  yield
  tuning.set_table_path(None)
  api.set_default(None)
  api.set_interpret(False)


def _write(tmp_path, table, name='table.json'):
  path = tmp_path / name
  path.write_text(json.dumps(table))
  return path


def _table(device=H100, impl='pallas_lowbit', block=None):
  entry = {'impl': impl} if block is None else {'impl': impl, 'block': block}
  return {'version': 1, 'devices': {device: {'formats': {
      'w4g64': {'k128_n64': {'m1': entry, '*': {'impl': 'xla'}}},
      'w*': {'*': {'*': {'impl': 'xla'}}}}}}}


def test_keys():
  w, _ = kd.quantized(np.random.default_rng(0), 128, 48, 4, 64)
  assert tuning.format_key(w) == 'w4g64'
  act, _ = kd.quantized(np.random.default_rng(0), 128, 48, 3, -1, act_order=True)
  assert tuning.format_key(act) == 'w3gall_act'
  ad, _ = kd.adapter(np.random.default_rng(0), 128, 48, 4)
  assert tuning.format_key(formats.CompressedLinear(weight=w, adapter=ad)) == 'w4g64_lora'
  assert tuning.format_key(formats.CompressedLinear(
      weight=w, mask=jnp.ones((128, 48), bool))) is None
  assert tuning.format_key(jnp.ones((128, 48), BF16)) is None
  s, _ = kd.sparse24(np.random.default_rng(0), 128, 48, bits=4, group_size=64)
  assert tuning.format_key(s) == 's24_w4g64'
  assert tuning.format_key(kd.sparse24(np.random.default_rng(0), 128, 48)[0]) == 's24_bf16'
  assert tuning.shape_bucket(4096, 14336) == 'k4096_n16384'
  assert [tuning.m_bucket(m) for m in (1, 2, 4, 5, 16, 17, 64, 65, 256, 257, 10 ** 6)] == [
      'm1', 'm2-4', 'm2-4', 'm5-16', 'm5-16', 'm17-64', 'm17-64', 'm65-256', 'm65-256', 'm257+',
      'm257+']


def test_lookup_known_device_and_patterns():
  block = {'block_m': 1, 'block_n': 32, 'block_k': 64, 'split_k': 2, 'gemv': True}
  table = tuning.validate(_table(block=block))
  c = tuning.lookup('w4g64', 128, 64, 1, device=H100, table=table)
  assert c.impl == 'pallas_lowbit' and c.block == BlockSizes(**block)
  assert c.source == f'{H100}/w4g64/k128_n64/m1'
  assert tuning.lookup('w4g64', 128, 64, 2, device=H100, table=table).impl == 'xla'  # '*' M
  # another format of the family: the pattern; another shape: also the pattern's '*'
  assert tuning.lookup('w2g32', 128, 64, 1, device=H100, table=table).source == f'{H100}/w*/*/*'
  # the serving layout of act-order falls back to its contiguous format's entries
  assert tuning.lookup('w4g64_perm', 128, 64, 1, device=H100, table=table).impl == 'pallas_lowbit'


def test_unseen_device_takes_safe_defaults():
  table = tuning.validate(_table())
  for fmt, kernel in (('w4g64', 'pallas_lowbit'), ('s24_w4g128', 'pallas_sparse24')):
    for m in (1, 4, 16):
      c = tuning.lookup(fmt, 4096, 4096, m, device='Some Future GPU', table=table)
      assert (c.impl, c.block, c.source) == (kernel, None, 'built-in')
    for m in (17, 64, 256, 8192):
      assert tuning.lookup(fmt, 4096, 4096, m, device='Some Future GPU', table=table).impl == 'xla'
  assert tuning.lookup('w4g64', 128, 64, 64, table=None).impl == 'xla'


def test_shipped_table_is_valid_and_safe_for_large_m():
  table = tuning.load_table(tuning.SHIPPED_TABLE)
  assert H100 in table['devices'] and tuning.DEFAULT_DEVICE in table['devices']
  for device in ('Some Future GPU', 'cpu'):
    for fmt in ('w4g128', 'w3g128_act', 'w4g128_lora', 's24_bf16', 's24_w4g128', 'w2g64_perm'):
      for m in (17, 64, 256, 4096):
        assert tuning.lookup(fmt, 4096, 14336, m, device=device, table=table).impl == 'xla'
  # On the H100 the kernel stays where it beat bf16 (decode of the large Llama-3-8B linears) and
  # prefill sizes take the dequantize-then-dot path.
  assert tuning.lookup('w4g128', 4096, 14336, 1, device=H100, table=table).impl == 'pallas_lowbit'
  for m in (64, 256, 2048):
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096)):
      assert tuning.lookup('w4g128', k, n, m, device=H100, table=table).impl == 'xla'


@pytest.mark.parametrize('text,match', [
    ('{"version": 1, "devices": {', 'invalid JSON at line 1'),
    ('[]', 'expected an object'),
    ('{"version": 2, "devices": {}}', 'version 2'),
    ('{"devices": {"x": {"formats": {"w4g64": {"k1_n1": {"m3": {"impl": "xla"}}}}}}}',
     'unknown M bucket'),
    ('{"devices": {"x": {"formats": {"w4g64": {"big": {"m1": {"impl": "xla"}}}}}}}',
     'bad shape bucket'),
    ('{"devices": {"x": {"formats": {"*": {"*": {"m1": {"block": {}}}}}}}}', 'string "impl"'),
    ('{"devices": {"x": {"formats": {"*": {"*": {"m1": {"impl": "k", "block": {"block_n": 48}}}}}'
     '}}}', 'power of two'),
])
def test_malformed_table_is_one_clear_line(tmp_path, text, match):
  path = tmp_path / 'bad.json'
  path.write_text(text)
  with pytest.raises(tuning.TuningTableError, match=match) as e:
    tuning.load_table(path)
  assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_malformed_table_surfaces_through_linear(tmp_path):
  path = tmp_path / 'bad.json'
  path.write_text('{"devices": ')
  tuning.set_table_path(path)
  w, _ = kd.quantized(np.random.default_rng(0), 128, 48, 4, 64)
  api.set_default(api.GPU_DEFAULT)
  with api.interpret_mode(), pytest.raises(tuning.TuningTableError, match='invalid JSON'):
    kernels.linear(jnp.ones((1, 128), BF16), w)


def test_table_path_override_and_env(tmp_path, monkeypatch):
  a = _write(tmp_path, _table(), 'a.json')
  b = _write(tmp_path, _table(device='other'), 'b.json')
  monkeypatch.setenv(tuning.TABLE_ENV, str(a))
  assert tuning.table_path() == a and H100 in tuning.current_table()['devices']
  tuning.set_table_path(b)
  assert tuning.table_path() == b and 'other' in tuning.current_table()['devices']
  tuning.set_table_path(None)
  assert tuning.table_path() == a


def _dispatch(x, leaf):
  api.set_default(api.GPU_DEFAULT)
  with api.interpret_mode(), api.recording() as log:
    jax.eval_shape(kernels.linear, x, leaf)
  return log[-1], kernels.last_choice()


def test_default_dispatch_never_picks_a_kernel_for_large_m():
  w, _ = kd.quantized(np.random.default_rng(0), 128, 48, 4, 64)
  s, _ = kd.sparse24(np.random.default_rng(1), 128, 48, bits=4, group_size=64)
  for leaf in (w, s):
    for m in (17, 64, 300, 1024):
      impl, choice = _dispatch(jax.ShapeDtypeStruct((m, 128), BF16), leaf)
      assert impl == 'xla' and choice.impl == 'xla'
    impl, _ = _dispatch(jax.ShapeDtypeStruct((2, 4, 128), BF16), leaf)
    assert impl != 'xla'


def test_dispatch_follows_the_table_with_its_tiles(tmp_path, monkeypatch):
  block = {'block_m': 1, 'block_n': 16, 'block_k': 32, 'split_k': 2, 'gemv': True}
  table = _table(device=tuning.device_kind(), block=block)
  tuning.set_table_path(_write(tmp_path, table))
  rng = np.random.default_rng(2)
  w, dense = kd.quantized(rng, 128, 64, 4, 64)
  seen = []
  real = lowbit_pallas.linear

  def spy(x, w, *, block=None, interpret=False):
    seen.append(block)
    return real(x, w, block=block, interpret=interpret)

  monkeypatch.setattr(lowbit_pallas, 'linear', spy)
  api.set_default(api.GPU_DEFAULT)
  x = kd.activations(rng, (1, 128), BF16)
  with api.interpret_mode():
    y = kernels.linear(x, w)
    assert kernels.last_implementation() == 'pallas_lowbit'
    assert seen == [BlockSizes(**block)]
    assert kd.rel_err(y, kd.reference(x, dense)) < kd.REL_TOL[jnp.dtype(BF16)]
    kernels.linear(kd.activations(rng, (3, 128), BF16), w)  # the table's '*' M bucket: xla
    assert kernels.last_implementation() == 'xla'
    # A named implementation bypasses the table.
    kernels.linear(kd.activations(rng, (3, 128), BF16), w, implementation='pallas_lowbit')
    assert kernels.last_implementation() == 'pallas_lowbit' and seen[-1] is None


def test_table_from_rows_picks_winners_and_reads_back(tmp_path):
  def row(fmt, k, n, m, t, xla=None, bf16=10.0, sweep=None):
    r = {'format_key': fmt, 'K': k, 'N': n, 'M': m, 'impl': 'pallas_lowbit', 'time_us': t,
         'bf16_us': bf16, 'speedup_vs_bf16': bf16 / t}
    if xla is not None:
      r['xla_us'] = xla
    if sweep is not None:
      r.update(sweep_best_us=sweep[0], sweep_best_block=sweep[1])
    return r
  rows = [row('w4g128', 4096, 14336, 1, 5.0, xla=20.0, sweep=(4.0, 'm1n32k512s4gw4p4')),
          row('w4g128', 4096, 14336, 16, 8.0, xla=12.0),
          row('w4g128', 4096, 14336, 64, 30.0, xla=14.0),
          row('w4g128', 4096, 14336, 256, 60.0, xla=25.0),
          row('w4g128_act', 4096, 4096, 1, 8.0),    # no xla time, beat bf16: kernel
          row('w4g128_act', 4096, 4096, 64, 12.0)]  # no xla time, lost: built-in rule
  table = tuning.table_from_rows(rows, 'GPU X', source='test', base=tuning.validate(_table()))
  path = tmp_path / 'out.json'
  tuning.write_table(path, table)
  back = tuning.load_table(path)
  assert set(back['devices']) == {H100, 'GPU X', 'default'}
  look = lambda fmt, k, n, m: tuning.lookup(fmt, k, n, m, device='GPU X', table=back)
  c = look('w4g128', 4096, 14336, 1)
  assert c.impl == 'pallas_lowbit' and c.block == tuning.parse_block('m1n32k512s4gw4p4')
  assert look('w4g128', 4096, 14336, 16).impl == 'pallas_lowbit'
  assert look('w4g128', 4096, 14336, 16).block is None
  assert look('w4g128', 4096, 14336, 64).impl == 'xla'
  assert look('w4g128', 4096, 14336, 5000).impl == 'xla'  # above the measured M
  assert look('w4g128_act', 4096, 4096, 1).impl == 'pallas_lowbit'
  assert look('w4g128_act', 4096, 4096, 64).impl == 'xla'
  c = look('w4g128', 512, 512, 1)  # an unmeasured shape: the default section's rule
  assert c.source == 'default/*/*/m1' and c.impl == 'pallas_lowbit'
  assert path.read_text().count('\n') < 70  # one line per entry


def test_parse_block_round_trip():
  b = BlockSizes(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=4)
  assert tuning.parse_block('m16n64k128s4w4p4') == b
  with pytest.raises(ValueError, match='bad tile'):
    tuning.parse_block('m16n64')


def test_act_order_serving_leaf_dispatches_to_the_contiguous_kernel():
  w, _ = kd.quantized(np.random.default_rng(3), 128, 48, 4, 32, act_order=True)
  leaf = layouts.act_order_leaf(w)
  assert tuning.format_key(leaf) == 'w4g32_perm'
  impl, choice = _dispatch(jax.ShapeDtypeStruct((1, 128), BF16), leaf)
  assert impl == 'pallas_lowbit' and choice.impl == 'pallas_lowbit'


def test_tables_of_several_runs_merge():
  row = lambda k, n, m, t, xla: {'format_key': 'w4g128', 'K': k, 'N': n, 'M': m,
                                 'impl': 'pallas_lowbit', 'time_us': t, 'xla_us': xla,
                                 'bf16_us': 10.0}
  first = tuning.table_from_rows([row(4096, 4096, 1, 5.0, 9.0), row(4096, 4096, 64, 20.0, 12.0)],
                                 'GPU X', source='run 1')
  both = tuning.table_from_rows([row(4096, 14336, 1, 6.0, 9.0)], 'GPU X', source='run 2',
                                base=first)
  look = lambda k, n, m: tuning.lookup('w4g128', k, n, m, device='GPU X', table=both)
  assert look(4096, 4096, 1).source == 'GPU X/w4g128/k4096_n4096/m1'
  assert look(4096, 4096, 64).impl == 'xla' and look(4096, 14336, 1).impl == 'pallas_lowbit'
  # Only M = 1 measured on 4096x14336: the kernel is extrapolated to small M only.
  assert look(4096, 14336, 16).impl == 'pallas_lowbit' and look(4096, 14336, 17).impl == 'xla'
  assert both['devices']['GPU X']['source'] == 'run 1; run 2'
  # A later run's extrapolation does not replace a bucket an earlier run measured.
  again = tuning.table_from_rows([row(4096, 4096, 1, 5.0, 9.0)], 'GPU X', base=first)
  assert again['devices']['GPU X']['formats']['w4g128']['k4096_n4096']['m17-64']['xla_us'] == 12.0
