"""Shared test fixtures' builders."""

import json
import pathlib

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


MC_TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_mc_task(directory: pathlib.Path, docs) -> pathlib.Path:
  """A local lm-eval multiple-choice task ``tiny_mc`` (YAML + JSONL of ``docs``: ``question``,
  ``choices``, ``gold``) in ``directory``; returns it."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'tiny_mc.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
  (directory / 'tiny_mc.yaml').write_text(MC_TASK_YAML.format(data=directory / 'tiny_mc.jsonl'))
  return directory
