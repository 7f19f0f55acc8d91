"""Test-session settings: a compilation cache so that identical computations compiled from
different function objects (many tests build fresh jitted lambdas) compile once.

The cache lives in a fresh directory of this test session, removed at its end: an entry written by
another process (a concurrent or killed test run) is never read, since a half-written entry can
crash the reader. ``COMPRESS_RECOVER_TEST_JAX_CACHE`` names a directory to keep between runs
instead (one test run at a time)."""

import atexit
import os
import shutil
import tempfile

import jax

_CACHE = os.environ.get('COMPRESS_RECOVER_TEST_JAX_CACHE')
if not _CACHE:
  _CACHE = tempfile.mkdtemp(prefix='compress-recover-jax-cache-')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  """Drops every compiled program after each test module. XLA's CPU executables each hold memory
  maps, and one process running the whole suite would otherwise pile up tens of thousands of them,
  past the kernel's limit (vm.max_map_count, 65530), and crash."""
  yield
  jax.clear_caches()
