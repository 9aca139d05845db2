"""Functions shared by the test files (fixtures stay in conftest.py).

Import as `from helpers import ...`: pytest puts tests/ on sys.path, and
test modules are imported after conftest.py has set XLA_FLAGS.
"""

import jax


def load_config(name: str, **overrides):
  """Loads `configs/<name>.py` and applies dotted-key overrides."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parent.parent / 'configs' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  return set_overrides(config, overrides)


def set_overrides(config, overrides: dict):
  """Sets each dotted `key: value` of `overrides` in `config`, then locks it."""
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


def assert_resumes_bit_identical(config, tmp_path) -> None:
  """An 8-step run and one resumed from step 4 end with identical states."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxssl import train  # after XLA_FLAGS
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.run(config, straight)
  resume_after_losing_the_newest(config, resumed)
  jax.tree.map(np.testing.assert_array_equal,
               restore_state(config, resumed, 8),
               restore_state(config, straight, 8))
  assert (epath.Path(resumed) / 'checkpoints' / '8').exists()


def assert_exported_and_evaluated(workdir: str, result: dict) -> None:
  """`train.run`'s result after 8 steps: an export and its evaluation."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  assert result['step'] == 8
  enc, rand = result['eval']['encoder'], result['eval']['random_init']
  for r in (enc, rand):
    assert_evaluation(r)
  assert (epath.Path(workdir) / 'export' / 'spec').exists()


def assert_evaluation(r: dict) -> None:
  """One encoder's `evaluate.run` entry holds every evaluation, in range."""
  assert list(r['linear']) == ['fast']
  accuracies = [r['linear']['fast']] + list(r['knn'].values())
  for a in accuracies:
    assert 0.0 < a['top1'] <= a['top5'] <= 1.0
  assert set(r['knn']) == {'k20', 'k200'}
  health = r['health']
  assert 1.0 <= health['rankme'] <= r['feature_dim']
  assert 0.0 <= health['alignment'] <= 4.0 and health['uniformity'] <= 0.0


def make_method(config, mesh, *, steps_per_epoch: int = 1,
                total_steps: int = 1, num_channels: int = 1,
                num_classes: int = 10, num_train_examples: int = 0):
  """`config.method`'s class built on `mesh`, as `train.setup` builds it."""
  from jaxssl import methods  # after XLA_FLAGS
  run = methods.RunInfo.for_config(
      config, mesh=mesh, num_channels=num_channels,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      num_classes=num_classes, num_train_examples=num_train_examples)
  return methods.get_method_class(config.method)(config, run)


def two_view_batch(n: int, size: int, seed: int = 0):
  """`{'views': ([n, 2, size, size, 1] uniform float32,), 'label'}`."""
  import jax.numpy as jnp
  import numpy as np
  views = np.random.RandomState(seed).uniform(size=(n, 2, size, size, 1))
  return {'views': (jnp.asarray(views, jnp.float32),),
          'label': jnp.zeros((n,), jnp.int32)}


def run_steps_with_states(config, mesh, num_steps):
  """`(setup, [(state before, state after, metrics)] per step)`, on host."""
  from jaxssl import input_pipeline, train  # after XLA_FLAGS
  s = train.setup(config, mesh)
  state = s.init_fn()
  batches = input_pipeline.pretrain_batches(config, start_step=0)
  history = []
  for _ in range(num_steps):
    old = jax.device_get(state)
    state, metrics = s.train_step(state, train.global_batch(next(batches),
                                                            mesh))
    history.append((old, jax.device_get(state), jax.device_get(metrics)))
  return s, history


def host(tree):
  """`tree` as numpy arrays on the host."""
  import numpy as np
  return jax.tree.map(np.asarray, jax.device_get(tree))


def run_steps_with_losses(config, mesh, num_steps, on_step=None):
  """`[(loss, state after on host)]` per step; `on_step(setup, state
  before, batch, state after)` is called after each step if given."""
  from jaxssl import input_pipeline, train  # after XLA_FLAGS
  s = train.setup(config, mesh)
  state = s.init_fn()
  batches = input_pipeline.pretrain_batches(config, start_step=0)
  history = []
  for _ in range(num_steps):
    batch = train.global_batch(next(batches), mesh)
    before = host(state) if on_step else None
    state, metrics = s.train_step(state, batch)
    if on_step:
      on_step(s, before, batch, state)
    history.append((float(metrics['loss']), host(state)))
  return history


def assert_close_8_vs_1(a, b):
  """8-device vs 1-device leaves: rtol 1e-5, atol 1e-5 of b's largest."""
  import numpy as np
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def model_config(**overrides):
  """A float32 ResNet-18 `config.model` (auto stem, no input normalisation)."""
  import ml_collections
  config = ml_collections.ConfigDict(dict(
      encoder='resnet18', width_multiplier=1, stem='auto', dtype='float32',
      bn_momentum=0.9, bn_epsilon=1e-5, zero_init_residual=True,
      input_normalization='none'))
  config.update(overrides)
  return config
