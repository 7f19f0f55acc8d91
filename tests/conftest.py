"""Test-session settings: a persistent compilation cache so that identical computations compiled
from different function objects (many tests build fresh jitted lambdas) compile once."""

import os
import tempfile

import jax

_CACHE = os.environ.get('COMPRESS_RECOVER_TEST_JAX_CACHE',
                        os.path.join(tempfile.gettempdir(), 'compress-recover-jax-cache'))
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
