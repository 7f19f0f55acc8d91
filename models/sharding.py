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
* :func:`stacked`: the weights and statistics of the experts of a block, stacked, split along
  the expert axis over the devices, so that their numerics run in parallel.
* :func:`shard_params` / :func:`constrain_params`: the parameters and optimizer state of a
  training run, by the placement's ``params`` rule: ``replicated`` (every device holds them
  whole; plain data parallelism) or ``fsdp`` (fully sharded: each array of at least
  :data:`FSDP_MIN_ELEMENTS` values split along the data axis by its largest axis the data axis
  divides, so each device holds ``1/N`` of the weights, adapters and Adam moments; XLA gathers a
  weight where the step uses it and reduce-scatters its gradient).

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
PARAM_RULES = ('replicated', 'fsdp')
FSDP_MIN_ELEMENTS = 1024  # smaller arrays (norms, biases, scalars) stay whole on every device


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
  """A mesh (None: the default device, nothing sharded), where activations live, and how the
  parameters of a training run are placed (:data:`PARAM_RULES`)."""
  mesh: Mesh | None = None
  offload: str = 'none'
  params: str = 'replicated'

  @classmethod
  def create(cls, mesh: str | None = None, offload: str = 'none',
             params: str = 'replicated') -> 'Placement':
    if offload not in OFFLOADS:
      raise ValueError(f'--offload={offload!r} is not one of {OFFLOADS}')
    if params not in PARAM_RULES:
      raise ValueError(f'--param_sharding={params!r} is not one of {PARAM_RULES}')
    sizes = parse_mesh(mesh)
    if math.prod(sizes.values()) == 1:
      return cls(None, offload, params)
    n = math.prod(sizes.values())
    devices = jax.devices()
    if jax.process_count() > 1:  # process by process: a model group inside one process
      devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    devices = np.asarray(devices[:n]).reshape(sizes['data'], sizes['model'])
    return cls(Mesh(devices, AXES), offload, params)

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


def stacked(tree: Any) -> Any:
  """Arrays ``[E, ...]`` of ``E`` independent problems (the experts of a mixture, each with its
  weight and its ``H``), split along their first axis over every device of the mesh when the
  device count divides ``E`` (else over the model axis, else the data axis, else whole on every
  device): a program mapped over ``E`` then solves them on all devices at once. With several
  processes only the model axis splits them (a model group stays inside one process, so every
  process ends with every expert's result)."""
  mesh = active().mesh
  if mesh is None:
    return tree
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, 'shape')]
  e = leaves[0].shape[0] if leaves else 1
  choices = ((('model',),) if active().spans_processes else (AXES, ('model',), ('data',)))
  for axes in choices:
    n = math.prod(mesh.shape[a] for a in axes)
    if n > 1 and e % n == 0:
      return _put(tree, P(axes if len(axes) > 1 else axes[0]))
  return _put(tree, P())


def replicate(tree: Any) -> Any:
  """Every array of ``tree`` whole on every device."""
  if active().mesh is None:
    return tree
  return _put(tree, P())


def param_spec(shape: tuple[int, ...]) -> P:
  """Where the active placement's ``params`` rule puts a parameter of ``shape``: whole
  (``replicated``, or an array too small or with no axis the data axis divides), or split along
  the data axis by its largest such axis (``fsdp``; the first of equal ones)."""
  n = active().data_size
  if active().params != 'fsdp' or n == 1 or math.prod(shape) < FSDP_MIN_ELEMENTS:
    return P()
  axes = [a for a in range(len(shape)) if shape[a] % n == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda a: (shape[a], -a))
  return P(*([None] * axis), 'data')


def shard_params(tree: Any) -> Any:
  """The arrays of ``tree`` (trainable and frozen parameters, optimizer state) on the devices by
  the active placement's ``params`` rule (:func:`param_spec`); other leaves as they are. With no
  mesh, the tree unchanged."""
  if active().mesh is None:
    return tree
  return jax.tree.map(
      lambda x: _put(x, param_spec(x.shape)) if isinstance(x, (jax.Array, np.ndarray)) else x,
      tree)


def constrain_params(tree: Any) -> Any:
  """Inside a jitted function: the arrays of ``tree`` kept where :func:`shard_params` puts them
  (so a training loop's carried parameters and optimizer state stay sharded from step to step).
  Baked in when the function is traced under the active placement."""
  mesh = active().mesh
  if mesh is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, param_spec(x.shape))) if hasattr(x, 'shape') else x, tree)


def device_share(tree: Any) -> float:
  """The largest fraction of one array of ``tree`` (of at least :data:`FSDP_MIN_ELEMENTS` values)
  that one device holds: 1.0 when some such array is whole on a device, ``1/N`` when every one
  is split ``N`` ways."""
  shares = [float(np.prod(x.addressable_shards[0].data.shape)) / x.size
            for x in jax.tree.leaves(tree)
            if isinstance(x, jax.Array) and x.size >= FSDP_MIN_ELEMENTS]
  return max(shares, default=1.0)


def activations(x: jax.Array) -> Any:
  """Activations kept between blocks: on the devices, or in host memory with ``--offload=host``
  (whole on every process: gathered across processes when the batch was split over them)."""
  if active().offload != 'host':
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from models import distributed  # pylint: disable=g-import-not-at-top
    return distributed.gather(x)
  return np.asarray(x)
