"""Models: configs, the Llama-family forward pass as functions of a param tree, loading, tree
addressing, losses, evaluation and checkpoints (``models.data`` holds the corpora and windows).

  m = models.load_model('smollm2-135m')           # params, config, tokenizer
  logits = models.forward(m.params, tokens, m.config)
"""

from models.checkpoint import save_model
from models.config import ModelConfig
from models.evaluate import compare, perplexity, score_multiple_choice
from models.llama import forward, generate
from models.loading import LoadedModel, load_model
from models.tree import get_linear, linear_leaves, replace_leaves, set_linear, strip_adapters

__all__ = [
    'LoadedModel',
    'ModelConfig',
    'compare',
    'forward',
    'generate',
    'get_linear',
    'linear_leaves',
    'load_model',
    'perplexity',
    'replace_leaves',
    'save_model',
    'score_multiple_choice',
    'set_linear',
    'strip_adapters',
]
