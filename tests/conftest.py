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


def load_config(name: str, **overrides):
  """Loads `configs/<name>.py` and applies dotted-key overrides."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parent.parent / 'configs' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  config.lock()
  return config


@pytest.fixture(scope='session')
def fashion_mnist_dir(tmp_path_factory):
  """A tfds data_dir with Fashion-MNIST prepared from the Debian package.

  Skips when the package is missing, except under CI (CI=true), where the
  tests that need real data must run.
  """
  source = os.environ.get('JAXSSL_FASHION_MNIST_DIR',
                          '/usr/share/datasets/fashion-mnist')
  if not os.path.exists(os.path.join(source, 'train-images-idx3-ubyte.gz')):
    message = ('Fashion-MNIST is missing: sudo apt-get install -y '
               'dataset-fashion-mnist')
    if os.environ.get('CI', '').lower() == 'true':
      pytest.fail(message)
    pytest.skip(message)
  return str(tmp_path_factory.mktemp('tfds'))
