"""Several processes (hosts) as one run: ``jax.distributed`` and what each process does.

One run spans several processes, typically one per host, each driving its own devices; every
process runs the same program on the same inputs (multi-controller JAX), and the mesh of
:mod:`models.sharding` spans the devices of all of them.

* :func:`initialize` starts ``jax.distributed`` from explicit settings (``--coordinator_address``,
  ``--num_processes``, ``--process_id``) or from the cluster's environment (SLURM with more than
  one task, a multi-host TPU slice, ``JAX_COORDINATOR_ADDRESS``), before JAX touches a device. On
  the CPU backend it selects the gloo collectives, so cross-process reductions work there too.
  :func:`settings_problems` names a bad combination in one line before anything starts.
* :func:`is_writer` is process 0: the one process that writes results, tables, reports and
  exports (checkpoints are written by every process together, see :mod:`models.checkpoint`).
* :func:`process_rows` / :func:`process_part` give each process its part of every batch of a
  set of windows (the rows it feeds to its own devices); ``sharding.batch(part, local=True)``
  assembles a global batch from the parts with ``jax.make_array_from_process_local_data``. A
  batch given whole (identical on every process) is placed by :mod:`models.sharding` the same
  way: each process transfers only the rows of its own devices.
* :func:`to_local` turns arrays on the global mesh into arrays of this process (its devices hold
  all of their values), :func:`local_placement` is a placement over this process's devices (the
  stages that fetch per-sequence results to the host run there), and
  :func:`gather` fetches a global array whole to the host of every process.
* :func:`barrier` waits for every process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ('auto', 'on', 'off')


class DistributedError(RuntimeError):
  """``jax.distributed`` could not start as asked."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the processes of a run find each other.

  ``mode``: ``'auto'`` starts ``jax.distributed`` when the explicit settings or the environment
  ask for several processes (:func:`detect_environment`), ``'on'`` always (JAX detects what is not
  given, e.g. on a TPU slice from the metadata server), ``'off'`` never.
  """
  mode: str = 'auto'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id))


def _env_int(name: str) -> int | None:
  try:
    return int(os.environ[name])
  except (KeyError, ValueError):
    return None


def detect_environment() -> str | None:
  """The cluster environment that asks for several processes, or None: ``'slurm'`` (a job step
  of more than one task: ``SLURM_JOB_ID``, ``SLURM_NTASKS`` > 1, ``SLURM_PROCID``), ``'tpu'``
  (``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES`` naming more than one host) or ``'jax'``
  (``JAX_COORDINATOR_ADDRESS`` set; JAX reads it)."""
  if ('SLURM_JOB_ID' in os.environ and 'SLURM_PROCID' in os.environ and
      (_env_int('SLURM_NTASKS') or 1) > 1):
    return 'slurm'
  hosts = os.environ.get('TPU_PROCESS_ADDRESSES') or os.environ.get('TPU_WORKER_HOSTNAMES') or ''
  if len([h for h in hosts.split(',') if h.strip()]) > 1:
    return 'tpu'
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'jax'
  return None


def settings_problems(s: Settings) -> list[str]:
  """Every problem of ``s`` knowable before starting, one line each naming the flag."""
  p = []
  if s.mode not in MODES:
    p.append(f'--distributed={s.mode!r} is not one of {MODES}')
  if s.mode == 'off' and s.explicit:
    given = [f'--{k}' for k in ('coordinator_address', 'num_processes', 'process_id')
             if getattr(s, k) is not None]
    p.append(f'--distributed=off runs one process: {", ".join(given)} would do nothing; leave '
             f'{"it" if len(given) == 1 else "them"} out')
  if s.num_processes is not None and s.num_processes < 1:
    p.append(f'--num_processes={s.num_processes} must be at least 1')
  if s.process_id is not None and s.process_id < 0:
    p.append(f'--process_id={s.process_id} must be at least 0')
  if (s.process_id is not None and s.num_processes is not None and s.num_processes >= 1
      and s.process_id >= s.num_processes):
    p.append(f'--process_id={s.process_id} must be below --num_processes={s.num_processes} '
             f'(processes are numbered 0 to {s.num_processes - 1})')
  if s.coordinator_address is not None and not re.fullmatch(r'\S+:\d{1,5}',
                                                            s.coordinator_address):
    p.append(f'--coordinator_address={s.coordinator_address} is not HOST:PORT (e.g. '
             'node001:12345, the address of process 0)')
  if (s.mode == 'auto' and s.explicit and detect_environment() is None and
      (s.coordinator_address is None or s.num_processes is None or s.process_id is None)
      and s.num_processes != 1):
    missing = [f'--{k}' for k in ('coordinator_address', 'num_processes', 'process_id')
               if getattr(s, k) is None]
    p.append(f'several processes need {", ".join(missing)} too (no cluster environment such as '
             'SLURM or a TPU slice was detected to supply them)')
  return p


def wanted(s: Settings) -> bool:
  """Whether ``s`` asks for ``jax.distributed`` (one process asked explicitly: no)."""
  if s.mode == 'off' or s.num_processes == 1:
    return False
  return s.mode == 'on' or s.explicit or detect_environment() is not None


def is_initialized() -> bool:
  """Whether ``jax.distributed`` runs in this process."""
  return jax.distributed.is_initialized()


def _backends_started() -> bool:
  """Whether JAX has made its device clients (``jax.distributed`` can no longer start)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another JAX: jax.distributed names the problem itself
    return False


def use_cpu_collectives() -> None:
  """Cross-process collectives on the CPU backend through gloo (JAX's TCP implementation; JAX
  0.10 offers gloo, its default, mpi and megascale), unless another implementation was chosen
  (``JAX_CPU_COLLECTIVES_IMPLEMENTATION``). Without them a computation of several processes on
  CPU fails."""
  try:
    if getattr(jax.config, 'jax_cpu_collectives_implementation', None) in (None, 'none'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except (AttributeError, ValueError):  # a JAX without the option: its default is used
    pass


def initialize(s: Settings, *, timeout_s: int = 300) -> bool:
  """Starts ``jax.distributed`` when ``s`` asks for it (:func:`wanted`); returns whether the run
  spans several processes. Must run before JAX uses a device. Raises ValueError with the
  problems of :func:`settings_problems`, DistributedError when the start fails (one line: what
  failed and why)."""
  problems = settings_problems(s)
  if problems:
    raise ValueError('\n'.join(problems))
  if is_initialized():
    return jax.process_count() > 1
  if not wanted(s):
    return False
  if _backends_started():
    raise DistributedError('jax.distributed must start before JAX uses a device: call '
                           'models.distributed.initialize first')
  use_cpu_collectives()
  kwargs = {k: getattr(s, k) for k in ('coordinator_address', 'num_processes', 'process_id')
            if getattr(s, k) is not None}
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    where = ', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'from the environment'
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(f'jax.distributed did not start ({where}): {first}') from e
  logging.info('process %d of %d, %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def is_writer() -> bool:
  """True in the one process that writes results, tables, reports and exports (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- each process's part


def process_rows(n: int, batch_size: int, *, count: int | None = None,
                 index: int | None = None) -> np.ndarray:
  """The rows of ``n`` windows that process ``index`` of ``count`` (default: this one of all)
  feeds to its devices when they are taken ``batch_size`` at a time: its contiguous part of every
  batch, in order. The parts of all processes, batch by batch in process order, are the batches
  (``sharding.batch(part, local=True)`` assembles them). Raises ValueError when a batch does not
  split evenly over the processes."""
  count = jax.process_count() if count is None else count
  index = jax.process_index() if index is None else index
  if batch_size < 1 or batch_size % count:
    raise ValueError(f'a batch of {batch_size} sequences does not split over {count} processes: '
                     'pass a multiple of the number of processes')
  last = n % batch_size
  if last % count:
    raise ValueError(f'the last batch of {n} windows ({last} of them, {batch_size} a batch) does '
                     f'not split over {count} processes')
  rows = []
  for start in range(0, n, batch_size):
    size = min(batch_size, n - start)
    part = size // count
    rows.append(np.arange(start + index * part, start + (index + 1) * part))
  return np.concatenate(rows) if rows else np.zeros((0,), np.int64)


def process_part(windows: Any, batch_size: int) -> np.ndarray:
  """This process's part of ``windows [n, ...]`` (:func:`process_rows`)."""
  windows = np.asarray(windows)
  return windows[process_rows(len(windows), batch_size)]


def process_share(n: int, *, count: int | None = None, index: int | None = None) -> slice:
  """This process's contiguous share of ``n`` items split as evenly as possible over the processes
  (the first ``n % count`` get one more; a process may get none)."""
  count = jax.process_count() if count is None else count
  index = jax.process_index() if index is None else index
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return slice(start, start + base + (index < extra))


def sum_over_processes(x: Any) -> np.ndarray:
  """``x`` (a small float64 array, the same shape in every process) summed over the processes,
  in float64: each value travels as two float32 parts (value and remainder), gathered, and is
  summed on the host."""
  x = np.asarray(x, np.float64)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  hi = x.astype(np.float32)
  lo = (x - hi.astype(np.float64)).astype(np.float32)
  parts = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo])), np.float64)
  return parts.sum(axis=(0, 1))


# --------------------------------------------------------------------------- global and local


def spans_processes(x: Any) -> bool:
  """Whether ``x`` is an array on devices of other processes too."""
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def _holds_whole(x: jax.Array) -> bool:
  """Whether this process's devices hold every value of ``x``."""
  covered = np.zeros(x.shape, bool)
  for shard in x.addressable_shards:
    covered[shard.index] = True
  return bool(covered.all())


def to_local(tree: Any) -> Any:
  """Every array of ``tree`` that spans processes, or is committed to one device, as an array of
  this process on its default device, uncommitted (so that it goes with arrays on any placement
  of this process, :func:`local_placement`). Raises ValueError for an array split across
  processes (use :func:`gather`)."""
  def one(x):
    if not isinstance(x, jax.Array) or not (spans_processes(x) or x.committed):
      return x
    if spans_processes(x) and not x.is_fully_replicated and not _holds_whole(x):
      raise ValueError(f'an array {x.shape} is split across processes ({x.sharding}): gather it')
    return jnp.asarray(np.asarray(x))
  return jax.tree.map(one, tree)


def gather(x: Any) -> np.ndarray:
  """``x`` whole as a NumPy array on the host of every process (an all-gather across processes
  when it is split across them)."""
  if spans_processes(x) and not x.is_fully_replicated and not _holds_whole(x):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def local_placement(placement):
  """A :class:`models.sharding.Placement` like ``placement`` over this process's devices only
  (its model size where the local devices allow it, every other local device on data); the same
  placement when the run has one process."""
  from models import sharding  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return placement
  n = jax.local_device_count()
  model = placement.model_size if n % placement.model_size == 0 else 1
  if n == 1:
    return sharding.Placement(None, placement.offload, placement.params)
  devices = np.asarray(jax.local_devices()).reshape(n // model, model)
  return sharding.Placement(jax.sharding.Mesh(devices, sharding.AXES), placement.offload,
                            placement.params)
