"""The labelled training data of the `paper` linear protocol and of
fine-tuning: augmented batches whose global order does not depend on the
number of processes.

Order (B = the recipe's global batch, S = `dataset.num_shards`, 0 meaning
the process count P; b = B // S), as the pretraining data
(`jaxssl.input_pipeline`):
- the labelled examples, in index order, are dealt to S shards round-robin
  (shard i holds the examples at positions i, i + S, ...); every epoch has
  K = (n // S) // b steps;
- in epoch e, shard i shuffles its examples (a buffer of
  `dataset.shuffle_buffer`, seeded by (seed, i, e)) and gives its first
  K · b;
- at step t, shard i contributes its positions [t · b, (t + 1) · b);
  process p reads shards [p S / P, (p + 1) S / P) and concatenates them in
  shard order, so the global batch is the same for every P dividing S;
- the example of split index j is cropped and flipped in epoch e with the
  stateless seed fold_in((seed, e), j).

Each process decodes only its shards' labelled images (a 1% subset decodes
1%), once, kept in memory with `dataset.cache`.
"""

import math
from typing import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxssl import data_facts
from jaxssl import datasets
from jaxssl.augment import host

_plain = tf.autograph.experimental.do_not_convert
# SimCLR's evaluation crops: random resized crop over 8-100% of the area.
CROP_AREA = (0.08, 1.0)


def batch_multiple(config: ml_collections.ConfigDict, devices: int) -> int:
  """What a labelled global batch must be a multiple of: the device count
  and the shard count S."""
  shards = config.dataset.num_shards or jax.process_count()
  return math.lcm(devices, shards)


class LabelledData:
  """This process's share of the labelled examples, and its epochs."""

  def __init__(self, config: ml_collections.ConfigDict, split: str,
               indices: np.ndarray | None, *, batch_size: int,
               process_index: int | None = None,
               process_count: int | None = None):
    """Prepares the reading (nothing is read yet).

    Args:
      config: the run config (dataset.*, augment.*).
      split: a tfds split of `config.dataset`.
      indices: example indices into `split`, or None for all of them.
      batch_size: the global batch size B, a multiple of S.
      process_index: this process (default: JAX's).
      process_count: the process count P (default: JAX's).
    """
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    shards = data_facts.num_shards(
        ml_collections.ConfigDict({'dataset': {
            'num_shards': config.dataset.num_shards},
            'global_batch_size': batch_size}), count)
    builder = datasets.get_builder(config.dataset)
    image_key, label_key = datasets.feature_keys(builder)
    total = datasets.split_num_examples(builder, split)
    labelled = (np.arange(total) if indices is None
                else np.unique(np.asarray(indices)))
    self.count = len(labelled)
    self.shard_batch_size = batch_size // shards
    self.steps = self.count // shards // self.shard_batch_size
    self._config = config
    decode = builder.info.features[image_key].decode_example
    self._shards = []
    for i in range(p * shards // count, (p + 1) * shards // count):
      keep = np.zeros(total, bool)
      keep[labelled[i::shards]] = True
      mask = tf.constant(keep)
      ds = builder.as_dataset(
          split=split, shuffle_files=False,
          decoders={image_key: tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(try_autocache=False))
      ds = ds.enumerate().filter(_plain(lambda j, e, m=mask: m[j])).map(
          _plain(lambda j, e: (j, decode(e[image_key]),
                               tf.cast(e[label_key], tf.int32))))
      self._shards.append((i, int(keep.sum()),
                           ds.cache() if config.dataset.cache else ds))

  def epoch(self, epoch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's `{'image' [B/P, S', S', C] in [0, 1], 'label' [B/P]}`
    batches of one epoch (`steps` of them)."""
    c = self._config
    augment = ml_collections.ConfigDict(c.augment.to_dict())
    augment.crop_area, augment.flip = CROP_AREA, True
    augment.num_small_views = 0
    size = c.dataset.image_size

    def prepare(index, image, label):
      view_seed = tf.random.experimental.stateless_fold_in(
          tf.constant([seed, epoch], tf.int64), index)
      image = host.crop_view(image, view_seed, view_index=0, out_size=size,
                             config_augment=augment)
      return {'image': tf.clip_by_value(image, 0.0, 1.0), 'label': label}

    parts = []
    for i, size_i, examples in self._shards:
      ds = examples.shuffle(
          min(size_i, c.dataset.shuffle_buffer),
          seed=seed * 1_000_003 + i * 100_003 + epoch,
          reshuffle_each_iteration=False)
      ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
      parts.append(ds.batch(self.shard_batch_size, drop_remainder=True)
                   .take(self.steps))
    ds = tf.data.Dataset.zip(tuple(parts)).map(_plain(
        lambda *batches: {k: tf.concat([b[k] for b in batches], 0)
                          for k in ('image', 'label')}))
    return tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))
