"""Dataset facts and epoch arithmetic: what a step needs, without TensorFlow.

`DatasetInfo` and `IMAGE_FOLDER` (re-exported by `jaxssl.datasets`) and
the shard and steps-per-epoch rules of the pipeline (re-exported by
`jaxssl.input_pipeline`, whose module docstring states the data order)
live here so that the trainer's step can be built where TensorFlow and tfds are
not installed: `jaxssl.step_setup`, the benchmarks and the accelerator
check (`benchmarks/device_check.py`).
"""

import dataclasses

import jax
import ml_collections

IMAGE_FOLDER = 'image_folder'  # dataset.name of `datasets`' image folders


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of jaxssl needs to know about a dataset.

  Attributes:
    name: the tfds name (or 'image_folder').
    num_train_examples: examples in `dataset.train_split`.
    num_classes: number of labels.
    image_shape: `(H, W, C)` of the stored images; H and W are None when
      they vary (ImageNet, image folders).
  """
  name: str
  num_train_examples: int
  num_classes: int
  image_shape: tuple[int | None, int | None, int]


def num_shards(config: ml_collections.ConfigDict, process_count: int) -> int:
  """S: `dataset.num_shards`, or the process count when it is 0, checked."""
  shards = config.dataset.num_shards or process_count
  batch = config.global_batch_size
  if process_count < 1:
    raise ValueError(f'process_count={process_count} must be >= 1')
  if shards < 0 or shards % process_count:
    raise ValueError(f'dataset.num_shards={shards} must be a positive '
                     f'multiple of the process count {process_count}')
  if batch <= 0 or batch % shards:
    raise ValueError(f'global_batch_size={batch} is not divisible by '
                     f'dataset.num_shards={shards}; use a multiple of {shards}')
  return shards


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int,
                    *, process_count: int | None = None) -> int:
  """Steps per epoch of `pretrain_batches`: (n // S) // (B // S).

  Args:
    config: the run config (global_batch_size, dataset.num_shards).
    num_train_examples: examples in `dataset.train_split`.
    process_count: P, used when dataset.num_shards is 0; defaults to
      `jax.process_count()`.

  Returns:
    The number of steps in which every shard's kept examples are seen once.
  """
  if process_count is None:
    process_count = jax.process_count()
  shards = num_shards(config, process_count)
  return (num_train_examples // shards) // (config.global_batch_size // shards)
