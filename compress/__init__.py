"""Compression: calibration statistics, one-matrix pruning and quantization, rules, the pipeline.

The main entry points (the modules hold the rest: ``compress.gptq``, ``compress.sparsegpt``,
``compress.prune``, ``compress.quantize``, ``compress.awq`` for the one-matrix numerics)::

  spec = compress.LinearSpec(quant='gptq', qspec=kernels.QuantSpec(bits=3, group_size=64))
  params, report = compress.compress_model(params, cfg, calib_tokens, compress.uniform(spec))
"""

from compress.allocate import auto_bits_rules
from compress.calibration import LinearStats, collect_stats, dense_statistics, update_stats
from compress.matrix import LayerReport, LinearRecovery, compress_matrix
from compress.pipeline import compress_model, summarize, validate_rules
from compress.prune import PruneSpec
from compress.rules import LinearSpec, Rule, match, parse_rule, uniform

__all__ = [
    'LayerReport',
    'LinearRecovery',
    'LinearSpec',
    'LinearStats',
    'PruneSpec',
    'Rule',
    'auto_bits_rules',
    'collect_stats',
    'compress_matrix',
    'compress_model',
    'dense_statistics',
    'match',
    'parse_rule',
    'summarize',
    'uniform',
    'update_stats',
    'validate_rules',
]
