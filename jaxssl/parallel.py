"""Device mesh and sharding helpers for the 1-D data-parallel layout.

jaxssl runs one `jax.jit` program over a mesh with a single axis, `'data'`:
the batch is sharded along it, parameters and optimizer state are replicated.
Model forwards run in the global view (so BatchNorm statistics are global);
losses that need per-device semantics run in `jax.shard_map` islands over the
same axis and receive `axis_name=DATA_AXIS`. See docs/architecture.md.
"""

import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a 1-D mesh named `'data'` with an Auto axis type.

  Args:
    devices: the devices to span, in order; all of `jax.devices()` (every
      process's devices, in a multi-host run) by default.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a global batch: leading axis split over `'data'`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of replicated values (params, optimizer state, step, rng)."""
  return NamedSharding(mesh, P())


def check_batch_divides(global_batch_size: int, mesh: Mesh,
                        process_count: int = 1) -> None:
  """Raises ValueError unless the global batch splits over devices and hosts.

  Args:
    global_batch_size: images per step, summed over all processes.
    mesh: the training mesh.
    process_count: number of JAX processes feeding the mesh.
  """
  devices = mesh.devices.size
  if global_batch_size <= 0:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be a positive integer')
  if global_batch_size % devices:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by the '
        f'device count {devices}; use a multiple of {devices}')
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by the '
        f'process count {process_count} (devices={devices}); use a multiple '
        f'of {np.lcm(devices, process_count)}')


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Starts JAX's multi-controller runtime when this is one of many processes.

  Explicit arguments win; otherwise a Cloud TPU pod slice (more than one
  worker in `TPU_WORKER_HOSTNAMES`), a multi-slice job or SLURM with more
  than one task is detected and `jax.distributed.initialize()` auto-detects
  the rest. A single process with no cluster environment does nothing.

  Returns:
    Whether the distributed runtime was initialised.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return True
  if (int(os.environ.get('SLURM_NTASKS', '1')) > 1
      or ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')
      or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS')):
    jax.distributed.initialize()
    return True
  return False
