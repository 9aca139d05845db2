"""The trainer's method, optimizer and jitted step, built without data.

`setup(config, mesh, info)` is everything a run builds before it reads
data: the validated config, the mesh, the method, the schedule and
optimizer, and the jitted `init_fn` and `train_step`. `jaxssl.train` (the
loop, which re-exports these names) reads the dataset facts from tfds; the
benchmarks pass facts of synthetic data. This module imports neither
TensorFlow nor tfds (`jaxssl.datasets` only when `info` is not given), so
the step can be built and timed where they are not installed (the
accelerator check, `benchmarks/device_check.py`).
"""

import dataclasses
import math
from typing import Any

import jax
import ml_collections

from jaxssl import config_schema
from jaxssl import cpu_kernels
from jaxssl import data_facts
from jaxssl import methods
from jaxssl import models
from jaxssl import online_probe
from jaxssl import optim
from jaxssl import parallel
from jaxssl import runtime
from jaxssl import steps


@dataclasses.dataclass
class Setup:
  """What `run`, `export` and the tests need to drive a run."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  info: data_facts.DatasetInfo
  method: methods.Method
  steps_per_epoch: int
  total_steps: int
  init_fn: Any  # jitted () -> TrainState, replicated
  train_step: Any  # jitted (state, batch) -> (state, metrics), state donated
  resolved: dict[str, Any]  # every 'auto'/0 sentinel's value in this run
  factories: cpu_kernels.Factories  # the encoders' ops, picked once


def total_train_steps(config: ml_collections.ConfigDict,
                      steps_per_epoch: int) -> int:
  """`num_train_steps` if set, else `ceil(num_epochs · steps_per_epoch)`."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return max(1, math.ceil(config.num_epochs * steps_per_epoch))


def setup(config: ml_collections.ConfigDict,
          mesh: jax.sharding.Mesh | None = None,
          info: data_facts.DatasetInfo | None = None) -> Setup:
  """Validates the config and builds everything a run needs, uncompiled.

  `info` gives the dataset facts (split size, classes, image shape); by
  default they are read from the dataset. The benchmarks pass facts of
  synthetic data instead (`jaxssl.bench.harness.synthetic_info`).
  """
  config_schema.validate(config)
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_batch_divides(config.global_batch_size, mesh,
                               jax.process_count(), config.accumulation_steps)
  if info is None:
    # Imports TensorFlow and tfds: only when the facts come from the data.
    from jaxssl import datasets  # pylint: disable=g-import-not-at-top
    info = datasets.dataset_info(config.dataset)
  if config.global_batch_size > info.num_train_examples:
    raise ValueError(
        f'global_batch_size={config.global_batch_size} is larger than the '
        f'{info.num_train_examples} examples of dataset.train_split='
        f'{config.dataset.train_split!r}; use a smaller batch or a larger '
        'split')
  steps_per_epoch = data_facts.steps_per_epoch(
      config, info.num_train_examples)
  total_steps = total_train_steps(config, steps_per_epoch)
  # Picked once per process (the process's device count, not the mesh's:
  # simulated devices share the cores whichever of them the mesh uses).
  factories = cpu_kernels.select_factories(config.kernels)
  if factories.name == 'cpu' and runtime.tune_malloc():
    # Measured to help only there (jaxssl/runtime.py).
    factories = factories._replace(
        reason=f'{factories.reason}; glibc malloc keeps freed memory')
  run_info = methods.RunInfo.for_config(
      config, mesh=mesh, num_channels=info.image_shape[-1],
      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      num_classes=info.num_classes,
      num_train_examples=info.num_train_examples, factories=factories,
      device_memory_bytes=runtime.device_memory_bytes(
          mesh.devices.flat[0]))
  method = methods.get_method_class(config.method)(config, run_info)
  schedule = optim.make_schedule(
      config.optim, global_batch_size=config.global_batch_size,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  optimizer = optim.make_optimizer(
      config.optim, schedule, fixed_lr_mask=method.fixed_lr_mask,
      fixed_lr=optim.peak_learning_rate(config.optim,
                                        config.global_batch_size))
  probe = None
  if config.online_probe.enabled:
    probe = online_probe.OnlineProbe(
        config, feature_dim=models.feature_dim(config.model),
        num_classes=info.num_classes, schedule=schedule)
  replicated = parallel.replicated(mesh)
  init_fn = jax.jit(steps.make_init_fn(method, optimizer, config.seed, probe),
                    out_shardings=replicated)
  train_step = jax.jit(
      steps.make_train_step(method, optimizer, schedule, probe),
      donate_argnames='state', out_shardings=(replicated, replicated))
  return Setup(config, mesh, info, method, steps_per_epoch, total_steps,
               init_fn, train_step, resolved_values(config, method, run_info),
               factories)


def resolved_values(config: ml_collections.ConfigDict, method: methods.Method,
                    run_info: methods.RunInfo) -> dict[str, Any]:
  """The value of every `auto`/0 sentinel in this run, `{'key': value}`.

  Printed at start (`resolved: k=v, ...`) and saved in the checkpoint
  metadata (`meta['resolved']`), so a run records the values it used.
  """
  values = {
      'steps_per_epoch': run_info.steps_per_epoch,
      'total_steps': run_info.total_steps,
      'dataset.num_shards': data_facts.num_shards(config,
                                                  jax.process_count()),
      'model.stem': _resolved_stem(config.model.stem, run_info.image_size),
      'num_devices': run_info.num_devices,
  }
  if run_info.factories is not None:
    values['kernels'] = run_info.factories.name
  values.update(method.resolved())
  return values


def _resolved_stem(stem: str, image_size: int) -> str:
  """The stem `models.make_encoder` builds for `stem` ('auto' resolved)."""
  if stem != 'auto':
    return stem
  return ('cifar' if image_size <= models.CIFAR_STEM_MAX_IMAGE_SIZE
          else 'imagenet')


def resolved_line(resolved: dict[str, Any]) -> str:
  """`resolved: k=v, ...` in key order, the line printed at start."""
  return 'resolved: ' + ', '.join(f'{k}={v}' for k, v in sorted(
      resolved.items()))


def global_batch(local: dict[str, Any], mesh) -> dict[str, Any]:
  """Assembles a global batch sharded over 'data' from each process's part."""
  sharding = parallel.batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)
