"""Device mesh and sharding helpers for the 1-D data-parallel layout.

jaxssl runs one `jax.jit` program over a mesh with a single axis, `'data'`:
the batch is sharded along it, parameters and optimizer state are replicated.
Model forwards run in the global view (so BatchNorm statistics are global);
losses that need per-device semantics run in `jax.shard_map` islands over the
same axis and receive `axis_name=DATA_AXIS`. See docs/architecture.md. The
multi-process runtime (initialisation, heartbeat) is in `jaxssl.distributed`.
"""

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a 1-D mesh named `'data'` with an Auto axis type.

  Built with `jax.make_mesh`, which orders the devices for the hardware's
  interconnect (a ring on TPU; `jax.devices()` order on CPU and GPU). The
  axis type is given explicitly: `jax.make_mesh` defaults to Explicit axes
  in JAX >= 0.9, and jaxssl's global-view program needs Auto (design.md §2).

  Args:
    devices: the devices to span; all of `jax.devices()` (every process's
      devices, in a multi-host run) by default.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a global batch: leading axis split over `'data'`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of replicated values (params, optimizer state, step, rng)."""
  return NamedSharding(mesh, P())


def check_batch_divides(global_batch_size: int, mesh: Mesh,
                        process_count: int = 1,
                        accumulation_steps: int = 1) -> None:
  """Raises ValueError unless the global batch splits over devices and hosts.

  Each message is one line naming the global batch, the device count and,
  in a multi-process run, the process count.

  Args:
    global_batch_size: images per step, summed over all processes.
    mesh: the training mesh.
    process_count: number of JAX processes feeding the mesh.
    accumulation_steps: micro-batches per step, each of which is split
      over the devices too.
  """
  devices = mesh.devices.size
  multiple = math.lcm(devices, process_count)
  if global_batch_size <= 0:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be a positive integer')
  hosts = f' ({process_count} processes)' if process_count > 1 else ''
  if global_batch_size % devices:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by the '
        f'device count {devices}{hosts}; use a multiple of {multiple}')
  micro = global_batch_size // accumulation_steps
  if accumulation_steps > 1 and (global_batch_size % accumulation_steps
                                 or micro % devices):
    raise ValueError(
        f'global_batch_size={global_batch_size} / accumulation_steps='
        f'{accumulation_steps} is not a whole multiple of the device count '
        f'{devices}; use a global batch that is a multiple of '
        f'{accumulation_steps * devices}')
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by the '
        f'process count {process_count} ({devices} devices); use a multiple '
        f'of {multiple}')
