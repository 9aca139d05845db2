"""Everything `--mode=eval` measures on one encoder.

For the encoder, and for the same architecture at random init (the
baseline printed beside it), on `dataset.eval_train_split` (train) and
`dataset.eval_test_split` (test):
- `linear`: for each of `linear_eval.protocols`, `fast` (fixed centre-crop
  features, `jaxssl.evaluation.linear`) or `paper` (augmented crops through
  the frozen encoder, `jaxssl.evaluation.supervised`), labelled by name;
- `knn`: weighted cosine kNN (`jaxssl.evaluation.knn`) with the train
  features as the bank, for each k of `knn_eval.ks`;
- `health`: RankMe and uniformity of the centre-crop features, and
  alignment of the features of two augmented views of the same images
  (`jaxssl.evaluation.representation`), all on the first
  `health.num_samples` test images, the same sample at every evaluation;
- `finetune`: for each of `finetune.fractions`, the whole encoder
  fine-tuned on that class-balanced fraction of the train labels
  (`jaxssl.evaluation.supervised`); from random init, that is the same
  architecture trained from scratch with the same budget.
"""

from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from jaxssl import datasets
from jaxssl.augment import device
from jaxssl.augment import host
from jaxssl.evaluation import features
from jaxssl.evaluation import knn
from jaxssl.evaluation import linear
from jaxssl.evaluation import representation
from jaxssl.evaluation import supervised

PyTree = Any
# Seed of the two views whose features give the alignment: fixed, so every
# evaluation of every run sees the same pairs.
_PAIR_SEED = 0


def health_batches(config: ml_collections.ConfigDict, num_samples: int,
                   batch_size: int) -> Iterator[np.ndarray]:
  """The first test images, centre-cropped and in two augmented views.

  The views are made as in pretraining (`augment.host.crop_view`, then
  `augment.device.finish_views`) from fixed seeds, so the sample is the
  same at every evaluation, on every process and for any process count.

  Args:
    config: the run config (dataset.*, augment.*).
    num_samples: how many images, from the start of `eval_test_split`.
    batch_size: images per yielded batch (the last may have fewer).

  Yields:
    float32 `[b, 3, S, S, C]` (centre crop, view 1, view 2), the same on
    every process; min(num_samples, split size) images in all.
  """
  builder = datasets.get_builder(config.dataset)
  image_key, _ = datasets.feature_keys(builder)
  size = config.dataset.image_size
  c = ml_collections.ConfigDict(config.augment.to_dict())
  c.num_small_views = 0  # two global views; the small ones play no part

  def prepare(index, example):
    image = example[image_key]
    seeds = [tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(_PAIR_SEED, tf.int64), index]), v)
             for v in (0, 1)]
    views = tf.stack([host.crop_view(image, seed, view_index=v,
                                     out_size=size, config_augment=c)
                      for v, seed in enumerate(seeds)])
    return index, host.center_crop(image, out_size=size), views

  ds = builder.as_dataset(split=config.dataset.eval_test_split,
                          shuffle_files=False,
                          read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.take(num_samples).enumerate().map(prepare).batch(batch_size)

  @jax.jit
  @jax.vmap
  def finish(views, index):
    # Image i's views get the key fold_in(key(seed), i), whatever the batch.
    key = jax.random.fold_in(jax.random.key(_PAIR_SEED), index)
    return device.finish_views((views[None],), key, c)[0][0]

  for index, centre, views in tfds.as_numpy(ds):
    finished = np.asarray(finish(views, index))
    yield np.concatenate([centre[:, None], finished], 1)


def health_features(config: ml_collections.ConfigDict, encoder: nn.Module,
                    variables: PyTree, mesh: Mesh) -> np.ndarray:
  """Features `[n, 3, D]` of `health_batches`' images, batch by batch."""
  size = config.linear_eval.feature_batch_size
  chunks = []
  for batch in health_batches(config, config.health.num_samples, size):
    flat = batch.reshape(-1, *batch.shape[2:])
    chunks.append(features.features_of_images(encoder, variables, flat, mesh)
                  .reshape(len(batch), 3, -1))
  return np.concatenate(chunks)


def health_metrics(sample: np.ndarray) -> dict[str, float]:
  """RankMe, alignment and uniformity (t = 2) of a fixed sample.

  Args:
    sample: `[n, 3, D]` features of `health_batches`' images: RankMe and
      uniformity of the centre crops', alignment of the two views'.

  Returns:
    `{'rankme', 'alignment', 'uniformity'}` as floats.
  """
  centre, view1, view2 = (jnp.asarray(sample[:, i]) for i in range(3))
  return {'rankme': float(representation.rankme(centre)),
          'alignment': float(representation.alignment(view1, view2)),
          'uniformity': float(representation.uniformity(centre))}


def _knn(config, train, test, mesh, num_classes) -> dict[str, float]:
  """`knn.knn_accuracy` of `(features, labels)` pairs with `knn_eval`'s
  settings."""
  ke = config.knn_eval
  return knn.knn_accuracy(*train, *test, mesh=mesh, num_classes=num_classes,
                          ks=tuple(ke.ks), temperature=ke.temperature,
                          block_size=ke.block_size)


def monitors(config: ml_collections.ConfigDict, encoder: nn.Module,
             variables: PyTree, mesh: Mesh, num_classes: int
             ) -> dict[str, float]:
  """kNN accuracies and health metrics during pretraining, flat for logging.

  The same measurements as `evaluate_encoder`'s (`knn_eval`, `health`),
  without the linear probe (the online probe stands in for it).

  Returns:
    `{'knn_k<k>_top1', 'knn_k<k>_top5', 'rankme', 'alignment',
    'uniformity'}` for what is enabled.
  """
  flat = {}
  if config.knn_eval.enabled:
    train = features.split_features(config, encoder, variables, mesh,
                                    config.dataset.eval_train_split)
    test = features.split_features(config, encoder, variables, mesh,
                                   config.dataset.eval_test_split)
    flat.update(_knn(config, train, test, mesh, num_classes))
  if config.health.enabled:
    flat.update(health_metrics(
        health_features(config, encoder, variables, mesh)))
  return flat


def evaluate_encoder(config: ml_collections.ConfigDict, encoder: nn.Module,
                     variables: PyTree, mesh: Mesh, num_classes: int
                     ) -> dict[str, Any]:
  """Every evaluation of one encoder that `config` asks for.

  Args:
    config: the run config (dataset, linear_eval, knn_eval, health,
      finetune).
    encoder: the backbone.
    variables: its `{'params', 'batch_stats'}`, replicated on `mesh`.
    mesh: the device mesh.
    num_classes: the dataset's number of classes.

  Returns:
    `{'num_train', 'num_test', 'feature_dim', 'linear': {protocol: {'top1',
    'top5'}}, 'knn': {'k<k>': {'top1', 'top5'}} or None, 'health':
    {'rankme', 'alignment', 'uniformity'} or None, 'finetune': {fraction
    as text: {'top1', 'top5', 'num_labelled', ...}} or None}`, accuracies
    as fractions.
  """
  train = features.split_features(config, encoder, variables, mesh,
                                  config.dataset.eval_train_split)
  test = features.split_features(config, encoder, variables, mesh,
                                 config.dataset.eval_test_split)
  result = {'num_train': int(len(train[1])), 'num_test': int(len(test[1])),
            'feature_dim': int(train[0].shape[1]), 'linear': {},
            'knn': None, 'health': None, 'finetune': None}
  for protocol in config.linear_eval.protocols:
    if protocol == 'fast':
      result['linear'][protocol] = linear.fast_linear_probe(
          train, test, num_classes=num_classes, le=config.linear_eval,
          seed=config.seed)
    else:
      result['linear'][protocol] = supervised.train_and_test(
          config, encoder, variables, mesh,
          supervised.linear_recipe(config), num_classes=num_classes)
  if config.knn_eval.enabled:
    flat = _knn(config, train, test, mesh, num_classes)
    result['knn'] = {f'k{k}': {'top1': flat[f'knn_k{k}_top1'],
                               'top5': flat[f'knn_k{k}_top5']}
                     for k in config.knn_eval.ks}
  if config.health.enabled:
    result['health'] = health_metrics(
        health_features(config, encoder, variables, mesh))
  if config.finetune.fractions:
    result['finetune'] = {}
    for fraction in config.finetune.fractions:
      data_config, indices = supervised.labelled_set(config, fraction)
      result['finetune'][f'{fraction:g}'] = supervised.train_and_test(
          data_config, encoder, variables, mesh,
          supervised.finetune_recipe(config, fraction),
          num_classes=num_classes, indices=indices)
  return result
