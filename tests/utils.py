"""Shared test fixtures' builders."""

import jax
import numpy as np

from models import config as config_lib
from models import llama


def tiny_model(num_layers: int = 2, calib_shape: tuple[int, int] = (8, 32), scale: float = 0.1):
  """``(config, params, calibration tokens)`` of a random tiny Llama (seeded, so every test file
  that asks for the same sizes gets the same model)."""
  cfg = config_lib.tiny_config(num_layers=num_layers)
  params = llama.init_params(cfg, jax.random.key(0), scale=scale)
  calib = np.asarray(jax.random.randint(jax.random.key(1), calib_shape, 0, cfg.vocab_size))
  return cfg, params, calib
