"""Compressing a second block of the same shape compiles nothing new.

The model is the tiny random 2-layer Llama. A warm-up ``compress_model(..., stop_after=1)``
compiles everything block 0 needs; a full ``compress_model`` run afterwards (block 0 again, then
block 1 of the same shapes) must not compile anything.

What is counted: JAX records the duration event ``/jax/core/compile/backend_compile_duration``
(``jax._src.dispatch.BACKEND_COMPILE_EVENT``; matched here as any duration event whose name contains
``backend_compile``) once for every executable it has to obtain because its in-memory caches missed:
both a real XLA compilation and a hit of the persistent compilation cache that tests/conftest.py
enables (checked on jax 0.10.2: a persistent-cache hit records the event too, together with
``/jax/compilation_cache/cache_hits``). In-memory cache hits record nothing. So

* ``requests`` = backend_compile events: every trace that reached the compiler;
* ``real`` = ``requests`` minus ``/jax/compilation_cache/cache_hits``: true XLA compilations.

The test asserts ``real == 0`` and, more strictly, ``requests == 0``: a second identical block must
be served from the in-memory caches. (Without the test-only persistent cache every request would be
a real compilation, and counting requests makes the result independent of what earlier test
runs left in that cache.) A positive control shows that a block of a new shape is counted.
"""

import collections
import contextlib

import jax
import numpy as np
import pytest

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from kernels import QuantSpec
from models import config as config_lib, llama
from tests.utils import tiny_model

GPTQ4 = rules_lib.LinearSpec(quant='gptq', qspec=QuantSpec(bits=4, group_size=32))
WANDA24 = rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('2:4'))

_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


@contextlib.contextmanager
def count_compiles():
  """Counts compile requests and persistent-cache hits while the block runs (see module doc)."""
  counts = collections.Counter()
  active = [True]  # turns the listeners off even where they cannot be unregistered

  def on_duration(event, duration_secs, **kwargs):
    del duration_secs
    if active[0] and 'backend_compile' in event:
      counts['requests'] += 1
      names.append(str(kwargs.get('fun_name', '?')))

  def on_event(event, **kwargs):
    del kwargs
    if active[0] and event == _CACHE_HIT_EVENT:
      counts['persistent_hits'] += 1

  names = []
  counts['requests'] = counts['persistent_hits'] = 0
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield counts, names
  finally:
    active[0] = False
    for unregister, fn in ((getattr(jax.monitoring, 'unregister_event_duration_listener', None),
                            on_duration),
                           (getattr(jax.monitoring, 'unregister_event_listener', None), on_event)):
      if unregister is not None:
        unregister(fn)


@pytest.fixture(scope='module')
def tiny():
  return tiny_model(calib_shape=(8, 32))


@pytest.mark.parametrize('spec', [GPTQ4, WANDA24], ids=['gptq4', 'wanda24'])
def test_second_block_of_same_shape_compiles_nothing(tiny, spec):
  cfg, params, calib = tiny
  rules = rules_lib.uniform(spec)
  pipeline.compress_model(params, cfg, calib, rules, progress=False, stop_after=1)  # warm-up
  with count_compiles() as (counts, names):
    out, reports = pipeline.compress_model(params, cfg, calib, rules, progress=False)
  # The full run did compress both blocks.
  assert len(reports) == 7 * cfg.num_layers
  assert any(r.name.startswith('layers/1/') for r in reports)
  assert out['layers'][1]['mlp']['down_proj']['kernel'] is not (
      params['layers'][1]['mlp']['down_proj']['kernel'])
  real = counts['requests'] - counts['persistent_hits']
  assert real == 0, f'{real} real XLA compilations in the second run: {names}'
  assert counts['requests'] == 0, (
      f"{counts['requests']} compile requests ({counts['persistent_hits']} persistent-cache hits) "
      f'in the second run: {names}')


def test_positive_control_new_shape_is_counted(tiny):
  """The counter sees the compilations a block of a new shape needs (an intermediate size that no
  other test uses, so nothing in this process has compiled it)."""
  cfg, params, calib = tiny
  rules = rules_lib.uniform(WANDA24)
  pipeline.compress_model(params, cfg, calib, rules, progress=False, stop_after=1)  # warm-up
  other = config_lib.tiny_config(num_layers=2, intermediate_size=160)
  other_params = llama.init_params(other, jax.random.key(0), scale=0.1)
  with count_compiles() as (counts, names):
    pipeline.compress_model(other_params, other, calib, rules, progress=False, stop_after=1)
  assert counts['requests'] > 0
  assert names and all(isinstance(n, str) for n in names)
  # The listeners are off once the block has exited.
  before = counts['requests']
  jax.jit(lambda x: x * 3 + 1)(np.ones(7, np.float32))  # a fresh function: a compile request
  assert counts['requests'] == before


def test_counter_sees_a_fresh_jit():
  with count_compiles() as (counts, _):
    jax.jit(lambda x: x * 5 - 2)(np.ones((3, 11), np.float32))
  assert counts['requests'] == 1
  assert counts['persistent_hits'] <= 1
