"""Addressing the linears of a param tree: the one place that knows where a weight leaf lives.

A block linear is named by its path inside a block, ``'self_attn/q_proj'`` or an expert's
``'mlp/experts/3/down_proj'`` (see :func:`models.llama.linear_names`), and by its full path in the
model, ``'layers/{i}/self_attn/q_proj/kernel'`` (the string rules match). Setters return copies with new
containers and the same arrays, so the input tree is never modified.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from kernels import formats
from models import distributed
from models import llama

Params = dict[str, Any]


def linear_path(layer: int, lin: str) -> str:
  """The full path ``layers/{layer}/{lin}/kernel`` of a block linear."""
  return f'layers/{layer}/{lin}/kernel'


def split_path(path: str) -> tuple[int, str]:
  """``'layers/3/mlp/up_proj/kernel'`` -> ``(3, 'mlp/up_proj')``."""
  parts = path.split('/')
  if len(parts) < 5 or parts[0] != 'layers' or not parts[1].isdigit() or parts[-1] != 'kernel':
    raise ValueError(f'{path!r} is not a block linear path (layers/I/SUB/.../NAME/kernel)')
  return int(parts[1]), '/'.join(parts[2:-1])


def get_linear(block: Params, lin: str):
  """The weight leaf of linear ``lin`` (e.g. ``'self_attn/q_proj'``) of a block."""
  return llama.get_node(block, lin)['kernel']


def _replace(node: Any, parts: list[str], fn: Callable[[Any], Any]) -> Any:
  """A copy of ``node`` with ``fn`` applied at ``parts`` (only the containers on the way copied)."""
  if not parts:
    return fn(node)
  if isinstance(node, list):
    i = int(parts[0])
    return node[:i] + [_replace(node[i], parts[1:], fn)] + node[i + 1:]
  return dict(node, **{parts[0]: _replace(node[parts[0]], parts[1:], fn)})


def set_linear(block: Params, lin: str, leaf) -> Params:
  """A copy of ``block`` with linear ``lin``'s weight leaf replaced (containers copied, not arrays)."""
  return _replace(block, lin.split('/'), lambda node: dict(node, kernel=leaf))


def linear_paths(params: Params) -> list[str]:
  """Full paths of every block linear, block by block in :func:`models.llama.linear_names` order."""
  return [linear_path(i, lin) for i, block in enumerate(params['layers'])
          for lin in llama.block_linear_names(block)]


def linear_leaves(params: Params) -> dict[str, Any]:
  """``{full path: weight leaf}`` of every block linear."""
  return {linear_path(i, lin): get_linear(block, lin)
          for i, block in enumerate(params['layers']) for lin in llama.block_linear_names(block)}


def replace_leaves(params: Params, leaves: dict[str, Any]) -> Params:
  """A copy of ``params`` with the block linears at ``leaves``' full paths replaced."""
  out = dict(params)
  layers = list(params['layers'])
  for path, leaf in leaves.items():
    i, lin = split_path(path)
    layers[i] = set_linear(layers[i], lin, leaf)
  out['layers'] = layers
  return out


def map_compressed(fn: Callable[..., Any], params: Any, *others: Any) -> Any:
  """Applies ``fn(leaf, *other_leaves)`` to every CompressedLinear of ``params``; ``others`` are
  trees of the same structure (e.g. the dense model) whose leaves at the same paths are passed."""
  return jax.tree.map(
      lambda x, *o: fn(x, *o) if isinstance(x, formats.CompressedLinear) else x,
      params, *others, is_leaf=formats.is_weight_leaf)


def strip_adapter(leaf):
  """The leaf without its low-rank adapter (any other leaf unchanged)."""
  if isinstance(leaf, formats.CompressedLinear) and leaf.adapter is not None:
    return dataclasses.replace(leaf, adapter=None)
  return leaf


def strip_adapters(params: Any) -> Any:
  """The same tree with every adapter removed (the compression alone)."""
  return jax.tree.map(strip_adapter, params, is_leaf=formats.is_weight_leaf)


def adapters(params: Any) -> dict[str, formats.LowRank]:
  """``{full path: adapter}`` of every block linear that carries one."""
  return {p: leaf.adapter for p, leaf in linear_leaves(params).items()
          if isinstance(leaf, formats.CompressedLinear) and leaf.adapter is not None}


def block_shapes(layers: Any, i: int) -> Any:
  """Block ``i`` of ``params['layers']`` for code that needs only its structure and shapes: its
  abstract shapes when the blocks are still on disk (``layers.abstract``, a
  :class:`models.loading.LazyLayers`), else the block itself."""
  return layers.abstract(i) if hasattr(layers, 'abstract') else layers[i]


def to_host(block: Any) -> Any:
  """``block`` with every array whole as a NumPy array in host memory (an all-gather across
  processes where an array is split across them)."""
  return jax.tree.map(distributed.gather, block)
