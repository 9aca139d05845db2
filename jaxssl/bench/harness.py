"""The trainer's jitted step on synthetic data, and timing it.

Shared by the `step`, `input` and `compare` benchmarks: a config loader
with benchmark overrides, the trainer's `setup` (`jaxssl.step_setup`)
without reading data or importing TensorFlow (`facts='table'`), a
synthetic batch of the pipeline's shape, and a timer that counts XLA
compiles after the first call (a recompiling step is a benchmark failure).
"""

import os
import time

_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def load_config(path: str, *, batch: int | None = None,
                overrides=(), kernels: str | None = None):
  """Loads `path`'s `get_config()` and applies the benchmark overrides.

  Args:
    path: a config file such as `configs/simclr_cifar10.py`.
    batch: new `global_batch_size`, or None.
    overrides: `'dotted.key=value'` strings; values are Python literals,
      else strings.
    kernels: new `kernels` (`jaxssl.cpu_kernels.KERNELS`), or None.

  Returns:
    The locked, validated config.
  """
  import ast  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  from jaxssl import config_schema  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f'--config={path!r} is not a file; pass a config such '
                     'as configs/simclr_cifar10.py')
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  items = list(overrides)
  if batch is not None:
    items.append(f'global_batch_size={batch}')
  if kernels is not None:
    items.append(f'kernels={kernels!r}')
  for item in items:
    key, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'--set {item!r} must be KEY=VALUE, e.g. '
                       'model.dtype=bfloat16')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise ValueError(f'--set {key}: no such config key')
    node[leaf] = value
  config.lock()
  config_schema.validate(config)
  return config


# The tfds facts of the datasets the configs name, `(image shape, classes)`,
# for machines without tfds (the accelerator check); tests/bench_test.py
# checks them against tfds's own features.
KNOWN_DATASETS = {
    'fashion_mnist': ((28, 28, 1), 10),
    'cifar10': ((32, 32, 3), 10),
    'imagenet2012': ((None, None, 3), 1000),
}
FACTS = ('auto', 'tfds', 'table')


def _tfds_installed() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec('tensorflow_datasets') is not None


def synthetic_info(config, facts: str = 'auto'):
  """The dataset facts a step needs, without reading or preparing data.

  Args:
    config: the run config.
    facts: where the image shape and classes come from: 'tfds', the tfds
      builder's static features (and the split size from its metadata when
      the dataset is prepared); 'table', `KNOWN_DATASETS`, importing
      neither TensorFlow nor tfds; 'auto', 'tfds' where tfds is installed,
      else 'table'.

  Returns:
    A `DatasetInfo`. Its split size is the prepared split's (tfds only),
    else a nominal 1000 steps' worth: it only shapes the learning-rate
    schedule.
  """
  from jaxssl import data_facts  # pylint: disable=g-import-not-at-top
  if facts not in FACTS:
    raise ValueError(f'facts={facts!r} must be one of {FACTS}')
  name = config.dataset.name
  size = config.dataset.image_size
  nominal = 1000 * config.global_batch_size
  if name == data_facts.IMAGE_FOLDER:
    return data_facts.DatasetInfo(name, nominal, 1000, (size, size, 3))
  if facts == 'table' or (facts == 'auto' and not _tfds_installed()):
    if name not in KNOWN_DATASETS:
      raise ValueError(f'dataset.name={name!r} has no entry in '
                       f'jaxssl.bench.harness.KNOWN_DATASETS '
                       f'({sorted(KNOWN_DATASETS)}); use facts from tfds')
    shape, classes = KNOWN_DATASETS[name]
    return data_facts.DatasetInfo(name, nominal, classes, shape)
  return _tfds_info(config, nominal)


def _tfds_info(config, nominal: int):
  """`synthetic_info` from the tfds builder (imports TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jaxssl import datasets  # pylint: disable=g-import-not-at-top
  name = config.dataset.name
  builder = tfds.builder(name, data_dir=datasets.resolve_data_dir(
      config.dataset))
  image_key, label_key = datasets.feature_keys(builder)
  features = builder.info.features
  examples = nominal
  if builder.info.splits:  # Prepared here: its real size.
    examples = datasets.split_num_examples(builder,
                                           config.dataset.train_split)
  examples = max(examples, config.global_batch_size)  # >= 1 step per epoch
  return datasets.DatasetInfo(name, examples,
                              features[label_key].num_classes,
                              tuple(features[image_key].shape))


def synthetic_setup(config, mesh, facts: str = 'auto'):
  """`jaxssl.step_setup.setup` with dataset facts from `synthetic_info`.

  The same method, schedule, optimizer and jitted functions (donation and
  output shardings included) as the trainer's; tests/bench_test.py checks
  that both lower to the same program. `facts`: see `synthetic_info`.
  """
  from jaxssl import step_setup  # pylint: disable=g-import-not-at-top
  return step_setup.setup(config, mesh, info=synthetic_info(config, facts))


def synthetic_batch(config, num_channels: int, mesh, seed: int = 0) -> dict:
  """A global batch shaped like `input_pipeline.pretrain_batches`' output.

  Returns:
    `{'views': (float32 [B, V, S, S, C] in [0, 1),), 'label': int32 [B],
    'index': int32 [B]}`, B = global_batch_size, sharded over 'data'.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxssl import step_setup  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  size = config.dataset.image_size
  shape = (config.global_batch_size, config.augment.num_views, size, size,
           num_channels)
  local = {'views': (rng.random(shape, np.float32),),
           'label': rng.integers(0, 10, config.global_batch_size,
                                 dtype=np.int32),
           'index': np.arange(config.global_batch_size, dtype=np.int32)}
  return step_setup.global_batch(local, mesh)


# --------------------------------------------------------------- timing --


class CompileCounter:
  """Counts XLA backend compiles in this process (`jax.monitoring`).

  One listener is registered per process, on first use; `count` only
  grows.
  """
  count = 0
  seconds = 0.0
  _registered = False

  @classmethod
  def ensure_registered(cls) -> None:
    if cls._registered:
      return
    from jax import monitoring  # pylint: disable=g-import-not-at-top

    def listener(event, duration_secs, **kwargs):
      del kwargs
      if event == _COMPILE_EVENT:
        cls.count += 1
        cls.seconds += duration_secs

    monitoring.register_event_duration_secs_listener(listener)
    cls._registered = True


def timed_steps(step_fn, state, batch, *, warmup: int, steps: int) -> dict:
  """Calls `state, metrics = step_fn(state, batch)` and times the calls.

  The first call (compile + run) is timed on its own; then `warmup`
  untimed and `steps` timed calls, each blocked on. Compiles are counted
  from the second call on: any is a recompilation.

  Returns:
    `{'first_call_s', 'compile_s', 'step_times_s', 'compiles_after_first',
    'cache_size', 'state', 'metrics'}`; `cache_size` is the jitted
    function's cache size where jax exposes it, else None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  CompileCounter.ensure_registered()
  seconds = CompileCounter.seconds
  start = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  first_call = time.perf_counter() - start
  compile_s = CompileCounter.seconds - seconds
  after_first = CompileCounter.count
  times = []
  for index in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    if index >= warmup:
      times.append(time.perf_counter() - start)
  cache_size = getattr(step_fn, '_cache_size', None)
  return {'first_call_s': first_call, 'compile_s': compile_s,
          'step_times_s': times,
          'compiles_after_first': CompileCounter.count - after_first,
          'cache_size': cache_size() if cache_size else None,
          'state': state, 'metrics': metrics}
