"""``linear(x, w)``: the only place that multiplies by a weight.

Implementations are registered by name; ``linear`` tries them in order and falls back to the jnp
reference (``'xla'``). An implementation signals that it cannot handle a call by raising
``NotImplementedError`` at trace time. The name of the implementation that ran last is recorded
(``last_implementation()``) so that experiments can report it; :func:`recording` collects every
choice made while a model is traced.

Default order (when ``set_default`` was not called) depends on the backend: on GPU the Pallas
kernels come first (``'pallas_lowbit'``, ``'pallas_sparse24'``, then ``'xla'``), elsewhere only
``'xla'`` runs. A kernel is registered only if its module imports (tokamax-style), and each
registered kernel declines calls with more than its module's ``DISPATCH_MAX_M`` activation rows.
Pallas kernels run on the CPU only in interpret mode (:func:`interpret_mode`), which the tests use.

Dispatch by measured speed: when no implementation is named, the built-in kernels run only where
the per-device tuning table (:mod:`kernels.tuning`) picks them for the call's format, weight shape
and number of rows, with the table's tiles; otherwise they decline and the next name in the order
runs (``'xla'``: dequantize the whole matrix once, then the dense dot). Without a table entry the
built-in rule holds: kernels for at most ``tuning.SMALL_M`` rows only, so prefill never runs a
kernel that dequantizes each weight tile once per row tile. A named ``implementation`` bypasses the
table. :func:`last_choice` says what the table decided for the last call.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator, Sequence

import jax

from kernels import reference

IMPLEMENTATIONS: dict[str, Callable] = {'xla': reference.linear}
# Preferred order on GPU; names that are not registered are skipped.
GPU_DEFAULT: tuple[str, ...] = ('pallas_lowbit', 'pallas_sparse24', 'xla')
_DEFAULT: tuple[str, ...] | None = None  # None: by backend (see default_order)
_LAST: dict[str, object] = {}
# Built-in kernels whose use the tuning table decides (they take a ``block`` keyword).
_TUNED: set[str] = set()
_RECORDERS: list[list[str]] = []
_INTERPRET = {'on': False}


def register(name: str, fn: Callable, *, default_first: bool = False) -> None:
  """Registers an implementation; ``default_first`` puts it ahead of the current default order."""
  global _DEFAULT
  IMPLEMENTATIONS[name] = fn
  _TUNED.discard(name)  # a replaced built-in kernel is no longer the table's to decide
  if default_first:
    current = default_order()
    if name not in current:
      _DEFAULT = (name,) + current


def set_default(order: Sequence[str] | None) -> None:
  """Sets the default order; ``None`` restores the backend-dependent default."""
  global _DEFAULT
  if order is None:
    _DEFAULT = None
    return
  for name in order:
    if name not in IMPLEMENTATIONS:
      raise ValueError(f'unknown linear implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}')
  _DEFAULT = tuple(order)


def default_order(backend: str | None = None) -> tuple[str, ...]:
  """The order ``linear`` tries when no implementation is named."""
  if _DEFAULT is not None:
    return _DEFAULT
  backend = backend or jax.default_backend()
  if backend in ('gpu', 'cuda', 'rocm'):
    return tuple(n for n in GPU_DEFAULT if n in IMPLEMENTATIONS)
  return ('xla',)


def last_implementation() -> str | None:
  return _LAST.get('name')


def last_choice():
  """The :class:`kernels.tuning.Choice` behind the last dispatched call (None when the table was
  not consulted: a named implementation, or no built-in kernel in the order)."""
  return _LAST.get('choice')


@contextlib.contextmanager
def recording() -> Iterator[list[str]]:
  """Collects the name of every implementation ``linear`` picks (at trace time) inside the block."""
  log: list[str] = []
  _RECORDERS.append(log)
  try:
    yield log
  finally:
    _RECORDERS.remove(log)


def set_interpret(on: bool) -> None:
  """Runs the Pallas kernels in interpret mode (the CPU can run them only so)."""
  _INTERPRET['on'] = bool(on)


def interpret_enabled() -> bool:
  return _INTERPRET['on']


@contextlib.contextmanager
def interpret_mode(on: bool = True) -> Iterator[None]:
  """Context manager form of :func:`set_interpret` (restores the previous setting)."""
  before = _INTERPRET['on']
  _INTERPRET['on'] = bool(on)
  try:
    yield
  finally:
    _INTERPRET['on'] = before


def linear(x: jax.Array, w, *, implementation: str | Sequence[str] | None = None) -> jax.Array:
  """``y = x @ W`` for a dense or compressed weight leaf (see :mod:`kernels.formats`)."""
  dispatch = implementation is None
  if dispatch:
    names = default_order()
  elif isinstance(implementation, str):
    names = (implementation,)
  else:
    names = tuple(implementation)
  errors = []
  choice, asked = None, False
  for name in names:
    if name not in IMPLEMENTATIONS:
      raise ValueError(f'unknown linear implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}')
    kwargs = {}
    if dispatch and name in _TUNED:
      if not asked:
        from kernels import tuning  # pylint: disable=g-import-not-at-top
        choice, asked = tuning.choose(x, w), True
      if choice is not None:
        if choice.impl != name:
          errors.append(NotImplementedError(
              f'{name}: the tuning table ({choice.source}) picks {choice.impl!r}.'))
          continue
        kwargs = {'block': choice.block}
    try:
      y = IMPLEMENTATIONS[name](x, w, **kwargs)
    except NotImplementedError as e:
      errors.append(e)
      continue
    _LAST['name'] = name
    _LAST['choice'] = choice
    for log in _RECORDERS:
      log.append(name)
    return y
  raise ExceptionGroup('all linear implementations failed', errors)


def _interpret_flag(name: str) -> bool:
  """Whether to interpret: Pallas/Triton kernels compile for CUDA GPUs only; anywhere else they
  run in interpret mode if it is switched on, and decline otherwise."""
  if _INTERPRET['on']:
    return True
  if jax.default_backend() not in ('gpu', 'cuda'):
    raise NotImplementedError(f'{name}: compiled Pallas/Triton kernels need a CUDA GPU '
                              f'(backend is {jax.default_backend()!r}); use interpret_mode().')
  return False


def _rows(x) -> int:
  m = 1
  for d in x.shape[:-1]:
    m *= d
  return m


def _kernel_implementation(name: str, module) -> Callable:
  """``name``'s entry: ``module.linear`` in the right mode, declining above
  ``module.DISPATCH_MAX_M`` activation rows (read at call time). ``block``: tiles (the tuning
  table's); tiles the call cannot use (e.g. a K step across a quantization group) give way to the
  kernel's defaults."""
  def implementation(x, w, block=None):
    if _rows(x) > module.DISPATCH_MAX_M:
      raise NotImplementedError(f'{name}: M={_rows(x)} > DISPATCH_MAX_M='
                                f'{module.DISPATCH_MAX_M}; the reference is faster.')
    if block is not None:
      try:
        module.check_supported(x, w, block)
      except NotImplementedError:
        block = None
    return module.linear(x, w, block=block, interpret=_interpret_flag(name))
  implementation.__name__ = implementation.__qualname__ = name
  return implementation


def _register_kernels() -> None:
  for name, module_name in (('pallas_lowbit', 'kernels.lowbit_pallas'),
                            ('pallas_sparse24', 'kernels.sparse24_pallas')):
    try:
      module = importlib.import_module(module_name)
    except ImportError:  # a jax without Pallas/Triton support: the reference serves everything
      continue
    IMPLEMENTATIONS[name] = _kernel_implementation(name, module)
    _TUNED.add(name)


_register_kernels()
