"""Device mesh, shardings and multi-host helpers.

fct_jax uses one 1-D mesh with a ``data`` axis over all devices of all hosts. Batches are global ``jax.Array``s
sharded along their leading dimension; parameters and frozen models are replicated. There is no pmap and no
``axis_name``: under ``jax.jit`` a mean over the batch (including BatchNorm's batch statistics) is a mean over the
*global* batch, and XLA inserts the cross-device reductions.
"""

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fct_jax.errors import FCTError

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: all devices, process-major order)."""
  devices = list(jax.devices()) if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading dimension split over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
  """Returns the per-process batch size; raises if the global batch does not split evenly over devices."""
  n = mesh.size
  if global_batch_size <= 0 or global_batch_size % n:
    raise FCTError(f"{what}={global_batch_size} is not a positive multiple of the device count {n}")
  procs = jax.process_count()
  return global_batch_size // procs


def host_to_global(local_batch, mesh: Mesh):
  """Builds global arrays, sharded on ``data``, from this process's slice of the global batch (a pytree)."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def barrier(name: str):
  """Waits until every process reaches this point (no-op with one process).

  Needed wherever process 0 writes a file that other processes then read (stage markers, configs).
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def multihost_requested() -> bool:
  """True when the environment describes a multi-process job (explicit coordinator, SLURM, or a TPU pod)."""
  if any(os.environ.get(k) for k in _MULTIHOST_ENV):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize_distributed(mode: str = "auto") -> bool:
  """Calls ``jax.distributed.initialize()`` when asked (``yes``) or when a multi-host job is detected (``auto``).

  Returns whether it initialised. Must run before any other JAX call touches the devices.
  """
  if mode not in ("auto", "yes", "no"):
    raise FCTError(f"distributed={mode!r}; valid values: auto, yes, no")
  if mode == "no" or (mode == "auto" and not multihost_requested()):
    return False
  jax.distributed.initialize()
  return True
