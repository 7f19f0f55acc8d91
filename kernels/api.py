"""``linear(x, w)``: the only place that multiplies by a weight.

Implementations are registered by name; ``linear`` tries them in order and falls back to the jnp
reference (``'xla'``). An implementation signals that it cannot handle a call by raising
``NotImplementedError`` at trace time. The name of the implementation that ran last is recorded
(``last_implementation()``) so that experiments can report it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

from kernels import reference

IMPLEMENTATIONS: dict[str, Callable] = {'xla': reference.linear}
_DEFAULT: tuple[str, ...] = ('xla',)
_LAST: dict[str, str] = {}


def register(name: str, fn: Callable, *, default_first: bool = False) -> None:
  """Registers an implementation; ``default_first`` puts it ahead of the reference by default."""
  global _DEFAULT
  IMPLEMENTATIONS[name] = fn
  if default_first and name not in _DEFAULT:
    _DEFAULT = (name,) + _DEFAULT


def set_default(order: Sequence[str]) -> None:
  global _DEFAULT
  for name in order:
    if name not in IMPLEMENTATIONS:
      raise ValueError(f'unknown linear implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}')
  _DEFAULT = tuple(order)


def last_implementation() -> str | None:
  return _LAST.get('name')


def linear(x: jax.Array, w, *, implementation: str | Sequence[str] | None = None) -> jax.Array:
  """``y = x @ W`` for a dense or compressed weight leaf (see :mod:`kernels.formats`)."""
  if implementation is None:
    names = _DEFAULT
  elif isinstance(implementation, str):
    names = (implementation,)
  else:
    names = tuple(implementation)
  errors = []
  for name in names:
    if name not in IMPLEMENTATIONS:
      raise ValueError(f'unknown linear implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}')
    try:
      y = IMPLEMENTATIONS[name](x, w)
    except NotImplementedError as e:
      errors.append(e)
      continue
    _LAST['name'] = name
    return y
  raise ExceptionGroup('all linear implementations failed', errors)
