"""Recovery: training-free low-rank compensation, local reconstruction, fine-tuning, prompting.

The main entry points (``recover.reconstruct.reconstruct``, ``recover.finetune.finetune`` and
``recover.prompting.train_pool`` are the training drivers; ``recover.lowrank`` holds the closed
forms)::

  comp = recover.Compensator(method='eora', rank=64)       # plugs into compress.compress_model
  params, report = compress.compress_model(params, cfg, calib, rules, recovery=comp)
"""

from recover.compensate import Compensator, adapter_share, quantize_adapters, truncate_adapters
from recover.compensate import with_svd_adapters
from recover.finetune import FinetuneConfig
from recover.lowrank import eora, quantize_adapter, srr, svd_compensate
from recover.prompting import IDPConfig, PromptPool
from recover.reconstruct import ReconConfig

__all__ = [
    'Compensator',
    'FinetuneConfig',
    'IDPConfig',
    'PromptPool',
    'ReconConfig',
    'adapter_share',
    'eora',
    'quantize_adapter',
    'quantize_adapters',
    'srr',
    'svd_compensate',
    'truncate_adapters',
    'with_svd_adapters',
]
