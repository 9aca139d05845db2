"""Mesh and batch-divisibility checks of jaxssl.parallel."""

import jax
from jax.sharding import AxisType
import pytest

from jaxssl import parallel


def test_make_mesh_spans_the_devices_in_order(mesh8):
  assert mesh8.axis_names == (parallel.DATA_AXIS,)
  assert list(mesh8.devices) == jax.devices()[:8]
  assert parallel.make_mesh().devices.size == jax.device_count()


def test_make_mesh_axis_is_auto_even_for_a_subset():
  # jax.make_mesh defaults to Explicit axes; the global-view step needs Auto.
  mesh = parallel.make_mesh(jax.devices()[2:5])
  assert mesh.axis_types == (AxisType.Auto,)
  assert list(mesh.devices) == jax.devices()[2:5]


@pytest.mark.parametrize('global_batch_size, process_count, message', [
    (0, 1, 'global_batch_size=0 must be a positive integer'),
    (36, 1, 'global_batch_size=36 is not divisible by the device count 8; '
            'use a multiple of 8'),
    (36, 2, 'global_batch_size=36 is not divisible by the device count 8 '
            '(2 processes); use a multiple of 8'),
    (16, 3, 'global_batch_size=16 is not divisible by the process count 3 '
            '(8 devices); use a multiple of 24'),
    (12, 3, 'global_batch_size=12 is not divisible by the device count 8 '
            '(3 processes); use a multiple of 24'),
])
def test_check_batch_divides_names_batch_devices_and_processes(
    mesh8, global_batch_size, process_count, message):
  with pytest.raises(ValueError) as e:
    parallel.check_batch_divides(global_batch_size, mesh8, process_count)
  assert str(e.value) == message


@pytest.mark.parametrize('global_batch_size, process_count', [
    (8, 1), (16, 2), (24, 3), (64, 4)])
def test_check_batch_divides_accepts_even_splits(mesh8, global_batch_size,
                                                 process_count):
  parallel.check_batch_divides(global_batch_size, mesh8, process_count)
