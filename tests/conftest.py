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


def tiny_factory(name: str, data_dir: str, **fixed):
  """`make(**overrides)`: `load_config(name)` on `data_dir`, with `fixed`
  and then `overrides` applied (the body of each file's `tiny` fixture)."""
  def make(**overrides):
    return load_config(name, **{'dataset.data_dir': data_dir, **fixed,
                                **overrides})
  return make


def restore_state(config, workdir: str, step: int):
  """The whole train state of `workdir`'s checkpoint `step`, on the host."""
  from jaxssl import checkpoint, parallel, train  # after XLA_FLAGS
  s = train.setup(config)
  abstract = checkpoint.abstract_with_sharding(
      jax.eval_shape(s.init_fn), parallel.replicated(s.mesh))
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  state = ckpt.restore(step, abstract)
  ckpt.close()
  return jax.device_get(state)


def resume_after_losing_the_newest(config, workdir: str) -> None:
  """Runs `config` to 8 steps in `workdir`, deletes checkpoint 8 (as if the
  process died between saves) and resumes from 4 to 8."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from jaxssl import checkpoint, train  # after XLA_FLAGS
  train.run(config, workdir)
  (epath.Path(workdir) / 'checkpoints' / '8').rmtree()
  assert checkpoint.Checkpointer(workdir, keep=2).latest_step() == 4
  assert train.run(config, workdir)['step'] == 8


def assert_exported_and_evaluated(workdir: str, result: dict) -> None:
  """`train.run`'s result after 8 steps: an export and both probes."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  assert result['step'] == 8
  enc, rand = result['eval']['encoder'], result['eval']['random_init']
  for r in (enc, rand):
    assert 0.0 < r['top1'] <= r['top5'] <= 1.0
  assert (epath.Path(workdir) / 'export' / 'spec').exists()


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
