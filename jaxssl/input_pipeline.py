"""Host input pipeline: tfds examples to deterministic, resumable view batches.

The data order is a function of the config and the step only; it does not
depend on the number of processes reading it, and a run resumed at step k
sees exactly what an uninterrupted run sees from step k on.

Order of the pretraining data (B = global_batch_size, S = dataset.num_shards,
0 meaning the process count P; b = B // S):
- the train split is cut into S contiguous near-equal shards
  (`tfds.even_splits`); every epoch has K = min shard size // b steps;
- in epoch e, shard i drops (size_i - K * b) examples chosen uniformly at
  random, then shuffles each block of `dataset.shuffle_buffer` consecutive
  examples, giving positions 0 .. K * b - 1 (stateless, seeded by
  (seed, i, e); tfds reads with shuffle_files=False);
- at step s (epoch s // K, t = s % K) shard i contributes positions
  [t * b, (t + 1) * b); process p reads shards [p S / P, (p + 1) S / P) and
  concatenates them in shard order, so the global batch is the same for
  every P that divides S;
- view v of the example at (shard i, epoch e, position j) is cropped with
  the stateless seed fold_in(seed, i, e, 2, j, v); the global crops are
  v = 0 .. V - 1 and the multi-crop small crops v = V .. V + V_small - 1.
Images are decoded after the skip to the resume point, so resuming costs
reading, not decoding, the skipped records.

The host makes the crops of every view from the original image
(`augment.host.crop_view`: random resized crop, resize, flip); the colour,
grayscale, blur and solarize steps run in the train step on the device
(`augment.device.finish_views`, called by `jaxssl.steps`). Each example also
carries its label and its index in the train split.
"""

import dataclasses
import math
from typing import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxssl import datasets  # importing it hides the GPUs from TensorFlow
from jaxssl.data_facts import num_shards, steps_per_epoch  # re-exported; no TF
from jaxssl.augment import host
from jaxssl.augment import recipes

# tf.data functions here are plain graph code; autograph's conversion would
# only slow tracing and log warnings about lambdas it cannot parse.
_plain = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything the per-epoch datasets need, checked once up front."""
  builder: tfds.core.DatasetBuilder
  image_key: str
  label_key: str
  shard_indices: tuple[int, ...]  # the global shard numbers this process reads
  shard_splits: tuple  # their tfds split specs
  shard_sizes: tuple[int, ...]
  shard_offsets: tuple[int, ...]  # index in the split of each shard's first
  cached: tuple | None  # decoded (images, labels) per shard, or None
  per_shard_batch_size: int
  steps_per_epoch: int
  config: ml_collections.ConfigDict


def _fold(seed: tf.Tensor, *data) -> tf.Tensor:
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, d)
  return seed


def _make_plan(config, process_index: int, process_count: int) -> _Plan:
  """Checks the config and prepares the dataset; raises ValueError early."""
  shards = num_shards(config, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in '
                     f'[0, {process_count})')
  recipes.check_config(config.augment)
  builder = datasets.get_builder(config.dataset)
  image_key, label_key = datasets.feature_keys(builder)
  per_process = shards // process_count
  indices = tuple(range(process_index * per_process,
                        (process_index + 1) * per_process))
  datasets.split_num_examples(builder, config.dataset.train_split)  # checks it
  all_splits = tfds.even_splits(config.dataset.train_split, n=shards)
  sizes = [datasets.split_num_examples(builder, s) for s in all_splits]
  per_shard_batch_size = config.global_batch_size // shards
  steps = min(sizes) // per_shard_batch_size
  if steps == 0:
    raise ValueError(
        f"train split '{config.dataset.train_split}' has {sum(sizes)} "
        f'examples, too few for global_batch_size={config.global_batch_size} '
        f'over {shards} shards (each needs >= {per_shard_batch_size})')
  if config.dataset.shuffle_buffer < 1:
    raise ValueError(f'dataset.shuffle_buffer={config.dataset.shuffle_buffer}'
                     ' must be >= 1')
  splits = tuple(all_splits[i] for i in indices)
  cached = None
  if config.dataset.cache:
    cached = tuple(_load_decoded(builder, s, image_key, label_key)
                   for s in splits)
  return _Plan(builder=builder, image_key=image_key, label_key=label_key,
               shard_indices=indices, shard_splits=splits,
               shard_sizes=tuple(sizes[i] for i in indices),
               shard_offsets=tuple(sum(sizes[:i]) for i in indices),
               cached=cached, per_shard_batch_size=per_shard_batch_size,
               steps_per_epoch=steps, config=config)


def _read(builder, split, image_key, label_key, *, decode: bool):
  """`(image, label)` pairs of `split` in tfds's fixed (unshuffled) order."""
  decoders = None if decode else {image_key: tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(try_autocache=False))
  return ds.map(_plain(lambda ex: (ex[image_key], ex[label_key])))


def _load_decoded(builder, split, image_key, label_key):
  """Decodes a shard into host memory (`dataset.cache`)."""
  shape = builder.info.features[image_key].shape
  if None in shape:
    raise ValueError(
        f"dataset.cache=True needs images of one size; '{builder.name}' has "
        f'image shape {shape}; set dataset.cache=False')
  ds = _read(builder, split, image_key, label_key, decode=True)
  images, labels = [], []
  for image, label in _iterate(ds.batch(4096), builder, split):
    images.append(image)
    labels.append(label)
  return np.concatenate(images), np.concatenate(labels)


def _shard_stream(plan: _Plan, slot: int, start_step: int) -> tf.data.Dataset:
  """Endless `(shard, epoch, position, image, label, index)` batches of b.

  Images are still encoded (or decoded, from the cache); views are made
  after the shards are merged, so the augmentation is traced once.
  """
  cfg = plan.config
  shard, size = plan.shard_indices[slot], plan.shard_sizes[slot]
  b, steps = plan.per_shard_batch_size, plan.steps_per_epoch
  if plan.cached is None:
    source = _read(plan.builder, plan.shard_splits[slot], plan.image_key,
                   plan.label_key, decode=False)
  else:
    source = tf.data.Dataset.from_tensor_slices(plan.cached[slot])
  offset = plan.shard_offsets[slot]
  source = source.enumerate().map(_plain(
      lambda i, ex: (ex[0], ex[1], i + offset)))
  num_drop = size - steps * b
  first_epoch, skip_steps = divmod(start_step, steps)

  def epoch_examples(epoch):
    epoch_seed = _fold(_shard_seed(cfg.seed, shard), epoch)
    ds = source
    if num_drop:
      drop = tf.random.experimental.stateless_shuffle(
          tf.range(size), _fold(epoch_seed, 0))[:num_drop]
      keep = tf.tensor_scatter_nd_update(
          tf.ones([size], tf.bool), drop[:, None], tf.zeros([num_drop], tf.bool))
      ds = ds.enumerate().filter(_plain(lambda i, ex: keep[i])).map(
          _plain(lambda i, ex: ex))

    @_plain
    def shuffle_block(block_index, block):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(tf.shape(block[1])[0]), _fold(epoch_seed, 1, block_index))
      return tf.nest.map_structure(lambda x: tf.gather(x, order), block)

    ds = ds.batch(cfg.dataset.shuffle_buffer).enumerate().map(shuffle_block)
    ds = ds.unbatch().enumerate()
    skip = tf.where(epoch == first_epoch, tf.constant(skip_steps * b, tf.int64),
                    tf.constant(0, tf.int64))
    return ds.skip(skip).map(_plain(
        lambda position, ex: (tf.constant(shard, tf.int64), epoch, position,
                              ex[0], ex[1], ex[2])))

  # Every epoch holds steps * b examples (minus the skip), so batches never
  # straddle two epochs.
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_examples)
  return ds.batch(b, drop_remainder=True)


def _shard_seed(seed: int, shard) -> tf.Tensor:
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(shard, tf.int64)])


def _view_functions(plan: _Plan) -> Callable[..., tf.Tensor]:
  """`view(image, seed, v)`, traced once per distinct `view_spec` crop.

  Views with the same crop area and size (all of SimCLR's; SwAV's global
  and small groups) share one trace; autograph stays off, the ops use
  tf.cond themselves.
  """
  cfg = plan.config
  traced = {}

  def view(image, seed, v):
    spec = recipes.view_spec(cfg.augment, v)
    trace_key = (spec.small, spec.crop_area)
    if trace_key not in traced:
      out_size = (cfg.augment.small_image_size if spec.small
                  else cfg.dataset.image_size)
      traced[trace_key] = tf.function(
          lambda image, seed, v=v, out_size=out_size: host.crop_view(
              image, seed, view_index=v, out_size=out_size,
              config_augment=cfg.augment),
          autograph=False)
    return traced[trace_key](image, seed)

  return view


def _train_dataset(plan: _Plan, start_step: int) -> tf.data.Dataset:
  """The process's batches: its shards side by side, then the views."""
  cfg = plan.config
  streams = [_shard_stream(plan, slot, start_step)
             for slot in range(len(plan.shard_indices))]
  ds = tf.data.Dataset.zip(tuple(streams)).map(_plain(
      lambda *parts: tuple(tf.concat(column, 0) for column in zip(*parts))))
  image_feature = plan.builder.info.features[plan.image_key]
  view = _view_functions(plan)
  num_global = cfg.augment.num_views
  num_total = num_global + cfg.augment.num_small_views

  @_plain
  def make_views(shard, epoch, position, image, label, index):
    if plan.cached is None:
      image = image_feature.decode_example(image)
    example_seed = _fold(_shard_seed(cfg.seed, shard), epoch, 2, position)
    views = [view(image, _fold(example_seed, v), v) for v in range(num_total)]
    out = {'views': tf.stack(views[:num_global]),
           'label': tf.cast(label, tf.int32),
           'index': tf.cast(index, tf.int32)}
    if num_total > num_global:
      out['small_views'] = tf.stack(views[num_global:])
    return out

  ds = ds.unbatch().map(make_views, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  ds = ds.batch(plan.per_shard_batch_size * len(plan.shard_indices))
  options = tf.data.Options()
  options.deterministic = True
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _iterate(ds: tf.data.Dataset, builder, split) -> Iterator:
  """Iterates `ds` as numpy; a decode failure names the corrupt files."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      item = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      bad = datasets.corrupt_images(builder, split)
      if not bad:
        raise
      raise ValueError(f'{len(bad)} image file(s) cannot be decoded: '
                       f'{", ".join(bad[:10])}; fix or remove them') from e
    yield item


def pretrain_batches(config: ml_collections.ConfigDict, *, start_step: int = 0,
                     process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict]:
  """Endless local batches of augmented views, from `start_step` on.

  Everything is checked and the dataset prepared before this returns; the
  order is described in the module docstring.

  Args:
    config: the run config (seed, global_batch_size, dataset.*, augment.*).
    start_step: the first step to yield (a resumed run passes its step).
    process_index: this process, in [0, process_count).
    process_count: number of processes reading the data.

  Returns:
    An iterator of `{'views': views, 'label': int32 [n_local], 'index':
    int32 [n_local]}` (index: the example's position in the train split),
    per-process
    (local), n_local = global_batch_size // process_count. `views` is
    `(float32 [n_local, V, S, S, C],)` with V = augment.num_views and
    S = dataset.image_size, plus, when augment.num_small_views > 0, a second
    entry `float32 [n_local, V_small, s, s, C]` (the multi-crop small crops,
    s = augment.small_image_size). These are the host half of the views
    (crop, resize, flip; SimCLR's bicubic resize may overshoot [0, 1]); the
    train step finishes them (`augment.device.finish_views`).

  References:
    google-research/simclr `data.build_input_fn` (two views per image);
    deepmind-research byol `utils/dataset.py` (contiguous per-host shards).
  """
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  plan = _make_plan(config, process_index, process_count)

  ds = _train_dataset(plan, start_step)

  def generate():
    for batch in _iterate(ds, plan.builder, config.dataset.train_split):
      views = (batch['views'],)
      if 'small_views' in batch:
        views += (batch['small_views'],)
      yield {'views': views, 'label': batch['label'], 'index': batch['index']}

  return generate()


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples in `split` of `config.dataset`."""
  return datasets.split_num_examples(datasets.get_builder(config.dataset),
                                     split)


def eval_batches(config: ml_collections.ConfigDict, split: str, *,
                 batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Centre-cropped batches covering this process's part of `split` once.

  The split is read in tfds's fixed order; process p reads part p of
  `tfds.split_for_jax_process` (near-equal contiguous parts). The last batch
  is padded with zero images, label 0 and mask False, and every process
  yields the same number of batches, ceil(ceil(n / P) / batch_size), so
  multi-host evaluation steps stay in lockstep.

  Args:
    config: the run config (dataset.*).
    split: a tfds split spec, e.g. `config.dataset.eval_test_split`.
    batch_size: examples per batch of this process (local).
    process_index: this process, in [0, process_count).
    process_count: number of processes.

  Returns:
    An iterator of `{'image': float32 [batch_size, H, W, C] in [0, 1],
    'label': int32 [batch_size], 'mask': bool [batch_size]}`.

  References:
    google-research/simclr `data_util.preprocess_for_eval` (crop 0.875).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be >= 1')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in '
                     f'[0, {process_count})')
  builder = datasets.get_builder(config.dataset)
  image_key, label_key = datasets.feature_keys(builder)
  total = datasets.split_num_examples(builder, split)
  part = tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count)
  local = datasets.split_num_examples(builder, part)
  num_batches = math.ceil(max(local, math.ceil(total / process_count))
                          / batch_size)
  size, channels = config.dataset.image_size, builder.info.features[
      image_key].shape[-1]

  @_plain
  def prepare(image, label):
    return {'image': host.center_crop(image, out_size=size),
            'label': tf.cast(label, tf.int32), 'mask': True}

  ds = _read(builder, part, image_key, label_key, decode=True).map(
      prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = {'image': tf.zeros([size, size, channels]),
             'label': tf.constant(0, tf.int32), 'mask': False}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(
      num_batches * batch_size - local))
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  return _iterate(ds, builder, part)
