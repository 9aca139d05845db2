"""Test-wide setup: a simulated 8-device pod on the host CPU.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402,F401  (imported after XLA_FLAGS on purpose)
import pytest  # noqa: E402


@pytest.fixture(scope='session')
def mesh8():
  """A 1-D mesh named 'data' over the 8 simulated CPU devices."""
  from jaxssl import parallel
  return parallel.make_mesh(jax.devices()[:8])


@pytest.fixture(scope='session')
def mesh1():
  """A 1-D mesh named 'data' over one device: the single-device twin."""
  from jaxssl import parallel
  return parallel.make_mesh(jax.devices()[:1])
