"""Smoke test of the kernel benchmark: ``run(quick=True)`` on the CPU (interpret mode)."""

import json

import jax
import numpy as np
import pytest

import kernels
from experiments import bench_kernels
from kernels import tuning


def test_parse_shapes():
  assert bench_kernels.parse_shapes(['4096x14336', '8X16']) == [(4096, 14336), (8, 16)]
  with pytest.raises(ValueError, match='INxOUT'):
    bench_kernels.parse_shapes(['4096'])


def test_group_for():
  assert bench_kernels.group_for(4096) == 128
  assert bench_kernels.group_for(576) == 64  # SmolLM2's hidden size
  assert bench_kernels.group_for(100) == -1


@pytest.mark.parametrize('fmt', ['w4g128_act', 'w4g128_act_perm', 's24_w4g128'])
def test_random_leaves_are_valid(fmt):
  leaf = bench_kernels.make_leaf(jax.random.key(0), fmt, 256, 64)
  dense = np.asarray(kernels.to_dense(leaf))
  assert dense.shape == (256, 64)
  assert np.count_nonzero(dense) > 0.4 * dense.size
  if fmt.startswith('s24'):
    assert np.all((dense.reshape(64, 4, 64) != 0).sum(axis=1) <= 2)
  assert bench_kernels.leaf_bytes(leaf) > 0
  if fmt == 'w4g128_act_perm':  # the serving layout of the same random act-order weight
    assert isinstance(leaf, kernels.PermutedInput) and leaf.inner.g_idx is None
    same = bench_kernels.make_leaf(jax.random.key(0), 'w4g128_act', 256, 64)
    np.testing.assert_array_equal(dense, np.asarray(kernels.to_dense(same)))


def test_unknown_format_raises():
  with pytest.raises(ValueError, match='unknown formats'):
    bench_kernels.run(fmts=['w5g7'], sections=('kernels',))


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='the quick run is the CPU smoke test')
def test_quick_run_writes_results(tmp_path):
  tuning_path = tmp_path / 'tuning.json'
  results = bench_kernels.run(out_dir=str(tmp_path), quick=True, ms=(1, 17),
                              fmts=('w4g128_lora64',), e2e_models=('tiny-llama',),
                              write_tuning=str(tuning_path))
  assert results['interpret'] and results['copy_bandwidth_gbs'] > 0
  rows = results['rows']
  assert [r['format'] for r in rows] == ['w4g128_lora64'] * 2
  for r in rows:
    assert r['impl'] == 'pallas_lowbit' and r['format_key'] == 'w4g128_lora'
    assert r['default_impl'] == 'xla'  # the CPU default order
    assert r['time_us'] > 0 and r['bf16_us'] > 0 and np.isfinite(r['speedup_vs_bf16'])
    assert r['rel_err'] < 1e-2  # the kernel output was checked against the f32 reference
    assert r['xla_us'] > 0 and r['dispatch_us'] > 0  # dequantize-then-dot, side by side
    assert 'tokamax_us' in r or r['tokamax_skipped']
  # what the tuning table dispatches to: this device is not in the shipped table, so the
  # built-in rule: the kernel for one row, dequantize-then-dot for 17
  assert [r['dispatch_impl'] for r in rows] == ['pallas_lowbit', 'xla']
  assert rows[1]['dispatch_us'] == rows[1]['xla_us']
  e2e = results['e2e']
  assert [r['variant'] for r in e2e] == ['bf16', 'w4 rtn']
  assert all(r['tokens_per_s'] > 0 and r['prefill_tokens_per_s'] > 0 for r in e2e)
  assert e2e[1]['weight_gb'] < e2e[0]['weight_gb']
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert len(saved['rows']) == 2 and saved['device'].startswith('cpu')
  table = (tmp_path / 'table.md').read_text()
  assert 'w4g128_lora64' in table and 'End-to-end decode' in table and 'xla_us' in table
  written = tuning.load_table(tuning_path)
  section = written['devices'][tuning.device_kind()]['formats']['w4g128_lora']
  (buckets,) = section.values()
  assert {'m1', 'm17-64'} <= set(buckets) and buckets['m257+']['impl'] == 'xla'
  assert 'NVIDIA H100 80GB HBM3' in written['devices']  # the shipped sections are kept


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='the quick run is the CPU smoke test')
def test_uncompilable_points_are_reported_and_swept(tmp_path, monkeypatch):
  # A default tile that fails to compile (as 512-row K steps did on an H100: shared memory) is
  # reported with its error, the sweep still runs and skips the candidates that fail too.
  real = bench_kernels.time_calls
  fail_blocks = {bench_kernels.BlockSizes.for_shape(1, 192, 256)}
  cands = [bench_kernels.BlockSizes(block_m=1, block_n=64, block_k=128, gemv=True),
           bench_kernels.BlockSizes(block_m=1, block_n=32, block_k=128, gemv=True)]
  fail_blocks.add(cands[1])
  monkeypatch.setattr(bench_kernels, 'sweep_candidates', lambda m: cands)

  def time_calls(fn, x, weights, **kw):
    block = getattr(fn, 'keywords', {}).get('block', 'dense')
    if block is None:
      block = bench_kernels.BlockSizes.for_shape(x.shape[0], 192, 256)
    if block in fail_blocks:
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Shared memory size limit exceeded')
    return real(fn, x, weights, **kw)

  monkeypatch.setattr(bench_kernels, 'time_calls', time_calls)
  results = bench_kernels.run(out_dir=str(tmp_path), quick=True, ms=(1,), fmts=('w4g128',),
                              sections=('kernels',), sweep=('w4g128',))
  (row,) = results['rows']
  assert row['error'].startswith('RESOURCE_EXHAUSTED') and 'time_us' not in row
  assert row['sweep_best_block'] == bench_kernels._block_str(cands[0])
  assert row['sweep_failed'] == 1 and row['sweep_best_us'] > 0
  assert 'RESOURCE_EXHAUSTED' in (tmp_path / 'table.md').read_text()
