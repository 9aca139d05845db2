"""Test-wide setup and fixtures: a simulated 8-device pod on the host CPU.

Shared test functions live in `tests/helpers.py`; no test imports this file
or another test file.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""

import os
import pathlib
import re

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# As jaxssl.runtime.configure_process: no oneDNN banners on AVX-512 hosts.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402,F401  (imported after XLA_FLAGS on purpose)
import pytest  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def xla_compilation_cache(request, tmp_path_factory):
  """One persistent XLA compilation cache per test run.

  Many tests build the same tiny train step afresh (jit caches are per
  function object), so a cache hit skips XLA's compile: a third less time
  for the trainer tests. The cache lives in this run's pytest temp dir
  (shared by the xdist workers; pytest deletes old temp dirs), so no run
  reuses another's. Subprocesses started by tests do not use it, and a
  worker that compiled before this fixture ran just compiles uncached.
  """
  base = tmp_path_factory.getbasetemp()
  if hasattr(request.config, 'workerinput'):  # xdist: the run's basetemp
    base = base.parent
  jax.config.update('jax_compilation_cache_dir', str(base / 'xla-cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


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


def _files_with_shared_fixtures(root) -> frozenset[str]:
  """Test files (as xdist node ids start) that define a module- or
  class-scoped fixture: a training run, a `jaxssl.bench` subprocess, ...
  """
  pattern = re.compile(r"scope=['\"](module|class)['\"]")
  return frozenset(f'tests/{p.name}' for p in root.glob('*_test.py')
                   if pattern.search(p.read_text()))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`-n N` (xdist's `load`): tests spread one by one, except that a file
  with a module- or class-scoped fixture goes to one worker whole, so its
  fixture is built once, not once per worker. Such files are scheduled
  first (xdist orders units by their test count), single tests fill in.

  (`--dist loadgroup` would do this with marks, but it renames node ids
  through an attribute that pytest 9.2 no longer reads.)
  """
  if config.getvalue('dist') != 'load':
    return None
  from xdist.scheduler import LoadScopeScheduling
  grouped = _files_with_shared_fixtures(pathlib.Path(__file__).parent)

  class SharedFixturesTogether(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      path = nodeid.split('::', 1)[0]
      return path if path in grouped else nodeid

  return SharedFixturesTogether(config, log)
