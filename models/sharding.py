"""Where arrays live: one mesh over all devices of all processes, with a data and a model axis.

Every stage reads the active :class:`Placement` (``with sharding.use(placement): ...``; by default
one device, nothing sharded) through three functions, and XLA does the rest (computation follows
data: a jitted function of sharded inputs runs sharded, and a sum over a sharded axis comes out
all-reduced):

* :func:`batch`: a batch of sequences (token ids or activations ``[B, ...]``) split along the
  ``data`` axis. Calibration statistics ``H = X^T X`` of a data-sharded batch come out summed
  over the data axis; evaluation and training batches are data-parallel the same way. A batch
  whose size the data axis does not divide is replicated instead (same numbers, no speed-up).
* :func:`columns`: a weight ``[in, out]`` with its output axis split along the ``model`` axis.
  The output columns of GPTQ, SparseGPT, Wanda and RTN are independent given ``H``, so a large
  matrix's numerics run on all devices of the model axis.
* :func:`replicate`: parameters and statistics every device needs whole.

``--mesh=data:N,model:M`` (:func:`parse_mesh`) names the axes' sizes; the mesh takes the first
``N x M`` devices (``jax.devices()``, all processes). The default puts every device on ``data``.
``--offload=host`` keeps the activations between blocks in host memory (:func:`activations`):
each batch moves to the devices when it is used.

With several processes (:mod:`models.distributed`) the mesh holds the devices of all of them,
process by process, so the data axis splits every batch across processes and a model group stays
inside one process. A host value given to :func:`batch`, :func:`columns` or :func:`replicate` is
the same on every process, and each process transfers only the part its own devices hold
(``jax.make_array_from_callback``); ``batch(part, local=True)`` assembles a batch from each
process's own rows instead (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'model')
OFFLOADS = ('none', 'host')


def parse_mesh(spec: str | None, n_devices: int | None = None) -> dict[str, int]:
  """``'data:4,model:2'`` -> ``{'data': 4, 'model': 2}``; ``None``/``''``/``'auto'``: every
  device on data; a missing data size takes the devices the model axis leaves. Raises ValueError
  naming the problem (unknown axis, not a positive size, more devices than there are)."""
  n = jax.device_count() if n_devices is None else n_devices
  if spec in (None, '', 'auto'):
    return {'data': n, 'model': 1}
  sizes: dict[str, int] = {}
  for part in spec.split(','):
    name, sep, size = part.strip().partition(':')
    if not sep or name not in AXES:
      raise ValueError(f'--mesh={spec}: expected axis:size pairs over {AXES}, e.g. data:4,model:2')
    if name in sizes:
      raise ValueError(f'--mesh={spec}: axis {name} given twice')
    try:
      sizes[name] = int(size)
    except ValueError:
      raise ValueError(f'--mesh={spec}: size {size!r} of axis {name} is not an integer') from None
    if sizes[name] < 1:
      raise ValueError(f'--mesh={spec}: size {sizes[name]} of axis {name} must be positive')
  if 'data' not in sizes:  # the devices the model axis leaves
    sizes['data'] = max(1, n // sizes.get('model', 1))
  sizes = {'data': sizes['data'], 'model': sizes.get('model', 1)}
  if math.prod(sizes.values()) > n:
    raise ValueError(f'--mesh={spec} needs {math.prod(sizes.values())} devices '
                     f'(data {sizes["data"]} x model {sizes["model"]}) but there are {n}')
  return sizes


@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh (None: the default device, nothing sharded) and where activations live."""
  mesh: Mesh | None = None
  offload: str = 'none'

  @classmethod
  def create(cls, mesh: str | None = None, offload: str = 'none') -> 'Placement':
    if offload not in OFFLOADS:
      raise ValueError(f'--offload={offload!r} is not one of {OFFLOADS}')
    sizes = parse_mesh(mesh)
    if math.prod(sizes.values()) == 1:
      return cls(None, offload)
    n = math.prod(sizes.values())
    devices = jax.devices()
    if jax.process_count() > 1:  # process by process: a model group inside one process
      devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    devices = np.asarray(devices[:n]).reshape(sizes['data'], sizes['model'])
    return cls(Mesh(devices, AXES), offload)

  @property
  def spans_processes(self) -> bool:
    """Whether the mesh holds devices of other processes."""
    return self.mesh is not None and self.mesh.is_multi_process

  @property
  def data_size(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape['data']

  @property
  def model_size(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape['model']

  def describe(self) -> str:
    return f'data:{self.data_size},model:{self.model_size}'


_ACTIVE: list[Placement] = [Placement()]


def active() -> Placement:
  """The placement of the innermost :func:`use` (the default: one device)."""
  return _ACTIVE[-1]


@contextlib.contextmanager
def use(placement: Placement) -> Iterator[Placement]:
  """Makes ``placement`` the active one inside the block."""
  _ACTIVE.append(placement)
  try:
    yield placement
  finally:
    _ACTIVE.pop()


def _global(x: Any, sharding: NamedSharding) -> jax.Array:
  """``x`` on a mesh of several processes: an array of the mesh resharded, any other value (the
  same on every process) read by each process only where its own devices hold it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _put(x: Any, spec: P) -> Any:
  mesh = active().mesh
  if mesh is None:
    return jax.tree.map(jax.numpy.asarray, x)
  sharding = NamedSharding(mesh, spec)
  if active().spans_processes:
    return jax.tree.map(lambda a: _global(a, sharding), x)
  return jax.device_put(x, sharding)


def batch(x: Any, local: bool = False) -> jax.Array:
  """A batch ``[B, ...]`` on the devices, split along the data axis when it divides ``B``.

  ``local``: ``x`` is this process's part of the batch (its rows, see
  :func:`models.distributed.process_rows`); the batch is the parts of all processes in process
  order, split along the data axis (which must divide it and span the processes)."""
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  if local and active().spans_processes:
    sharding = NamedSharding(active().mesh, P('data'))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  if active().mesh is None or x.shape[0] % active().data_size:
    return _put(x, P())
  return _put(x, P('data'))


def batches(x: Any, batch_size: int) -> jax.Array:
  """``x [N, ...]`` (``N`` a multiple of ``batch_size``) as ``[N / batch_size, batch_size, ...]``
  on the devices: consecutive batches of ``batch_size`` rows, each split along the data axis when
  it divides ``batch_size`` (for a jitted loop over the batches, :func:`jax.lax.scan`)."""
  n = x.shape[0]
  if n % batch_size:
    raise ValueError(f'{n} rows are not whole batches of {batch_size}')
  x = x.reshape((n // batch_size, batch_size) + tuple(x.shape[1:]))
  if active().mesh is None or batch_size % active().data_size:
    return _put(x, P())
  return _put(x, P(None, 'data'))


def constrain_batch(tree: Any) -> Any:
  """Inside a jitted function: every array of ``tree`` (a training batch ``[B, ...]``) split along
  the data axis where it divides ``B``, so the step runs data-parallel and its gradients come out
  all-reduced. Baked in when the function is traced under the active placement."""
  mesh = active().mesh
  if mesh is None:
    return tree

  def one(x):
    if x.ndim == 0 or x.shape[0] % active().data_size:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P('data')))
  return jax.tree.map(one, tree)


def columns(w: Any) -> Any:
  """A weight ``[in, out]`` split along the model axis by its output columns when the axis
  divides them (else replicated)."""
  if active().mesh is None or w.shape[-1] % active().model_size:
    return _put(w, P())
  return _put(w, P(*([None] * (w.ndim - 1)), 'model'))


def replicate(tree: Any) -> Any:
  """Every array of ``tree`` whole on every device."""
  if active().mesh is None:
    return tree
  return _put(tree, P())


def activations(x: jax.Array) -> Any:
  """Activations kept between blocks: on the devices, or in host memory with ``--offload=host``
  (whole on every process: gathered across processes when the batch was split over them)."""
  if active().offload != 'host':
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from models import distributed  # pylint: disable=g-import-not-at-top
    return distributed.gather(x)
  return np.asarray(x)
