"""Tests for jaxssl.input_pipeline: the data-order contract, views, eval.

Most tests use a tiny real tfds dataset built here (`jaxssl_tiny_images`),
whose label is the example's index, so every batch says exactly which
examples it holds. `tfds.testing.mock_data` covers mnist, cifar10 and
imagenet2012 (whose mocked images vary in size).
"""

import math

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxssl import input_pipeline
from jaxssl.augment import device
from jaxssl.augment import host

NUM_TRAIN = 50
NUM_TEST = 13


class JaxsslTinyImages(tfds.core.GeneratorBasedBuilder):
  """Random colour images of varying size; label = index (train then test)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(
                num_classes=NUM_TRAIN + NUM_TEST),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, NUM_TRAIN),
            'test': self._generate_examples(NUM_TRAIN, NUM_TEST)}

  def _generate_examples(self, start, count):
    for index in range(start, start + count):
      rng = np.random.default_rng(index)
      shape = (20 + index % 7 * 3, 24 + index % 5 * 4, 3)
      yield index, {'image': rng.integers(0, 256, shape, dtype=np.uint8),
                    'label': index}


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny_tfds')
  JaxsslTinyImages(data_dir=str(root)).download_and_prepare()
  return str(root)


def make_config(data_dir='', **overrides) -> ml_collections.ConfigDict:
  """A run config with exactly the keys the data modules read."""
  dataset = dict(name='jaxssl_tiny_images', data_dir=data_dir,
                 image_folder='', train_split='train', eval_train_split='train',
                 eval_test_split='test', image_size=16, shuffle_buffer=16,
                 cache=False, num_shards=0)
  augment = dict(recipe='simclr', num_views=2, crop_sampler='tf',
                 crop_area=(0.08, 1.0), crop_aspect=(3 / 4, 4 / 3),
                 resize_method='bicubic', flip=True, color_strength=1.0,
                 color_jitter=(), color_prob=0.8, grayscale_prob=0.2,
                 brightness='multiplicative', blur_prob=0.5,
                 view_blur_probs=(), blur_sigma=(0.1, 2.0),
                 view_solarize_probs=(), num_small_views=0,
                 small_image_size=8, small_crop_area=(0.05, 0.14))
  config = dict(seed=0, global_batch_size=8, dataset=dataset, augment=augment)
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  return ml_collections.ConfigDict(config)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


REFERENCE_STEPS = 48  # 8 epochs of 6 steps


@pytest.fixture(scope='module')
def reference(tiny_data_dir):
  """`reference(S)`: the first steps of a 1-process run with S shards."""
  runs = {}

  def get(shards):
    if shards not in runs:
      config = make_config(tiny_data_dir, **{'dataset.num_shards': shards})
      runs[shards] = take(input_pipeline.pretrain_batches(config),
                          REFERENCE_STEPS)
    return runs[shards]

  return get


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['label'], y['label'])
    assert len(x['views']) == len(y['views'])
    for u, v in zip(x['views'], y['views']):
      np.testing.assert_array_equal(u, v)


def shard_labels(data_dir, num_shards):
  """Label sets of the S contiguous shards, read straight from tfds."""
  builder = tfds.builder('jaxssl_tiny_images', data_dir=data_dir)
  return [set(next(builder.as_dataset(split=part).map(lambda ex: ex['label'])
                   .batch(NUM_TRAIN).as_numpy_iterator()).tolist())
          for part in tfds.even_splits('train', n=num_shards)]


def test_tf_sees_no_gpu():
  assert tf.config.get_visible_devices('GPU') == []


def finished(batch, config):
  """The device half of the batch's views (what the train step sees)."""
  return device.finish_views(batch['views'], jax.random.key(0),
                             config.augment)


def test_batch_structure_and_views(reference, tiny_data_dir):
  batch = reference(1)[0]
  assert set(batch) == {'views', 'label', 'index'}
  assert isinstance(batch['views'], tuple) and len(batch['views']) == 1
  views = batch['views'][0]
  assert views.shape == (8, 2, 16, 16, 3) and views.dtype == np.float32
  (done,) = finished(batch, make_config(tiny_data_dir))
  assert done.shape == views.shape and 0.0 <= done.min() <= done.max() <= 1.0
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert set(batch['label'].tolist()) <= set(range(NUM_TRAIN))
  # `index` is the example's position in the split's fixed tfds order.
  assert batch['index'].dtype == np.int32
  builder = tfds.builder('jaxssl_tiny_images', data_dir=tiny_data_dir)
  in_order = [int(ex['label']) for ex in builder.as_dataset(
      split='train', shuffle_files=False).as_numpy_iterator()]
  assert [in_order[i] for i in batch['index']] == batch['label'].tolist()
  for i in range(8):
    assert np.abs(views[i, 0] - views[i, 1]).max() > 0.05


@pytest.mark.parametrize('num_examples,shards,batch,expected', [
    (50, 2, 8, 6),  # shards 25, 25; 4 per shard per step
    (50, 4, 8, 6),  # shards 13, 13, 12, 12; 2 per shard
    (50, 3, 9, 5),  # shards 17, 17, 16; 3 per shard
    (50, 1, 8, 6),
])
def test_steps_per_epoch(num_examples, shards, batch, expected):
  config = make_config(global_batch_size=batch,
                       **{'dataset.num_shards': shards})
  assert input_pipeline.steps_per_epoch(config, num_examples) == expected


@pytest.mark.parametrize('shards', [1, 2, 4])
def test_each_epoch_sees_each_kept_example_once(tiny_data_dir, reference,
                                                shards):
  config = make_config(tiny_data_dir, **{'dataset.num_shards': shards})
  steps = input_pipeline.steps_per_epoch(config, NUM_TRAIN, process_count=1)
  per_shard = 8 // shards
  batches = reference(shards)
  parts = shard_labels(tiny_data_dir, shards)
  epochs = []
  for epoch in range(2):
    labels = np.stack([b['label'] for b in
                       batches[epoch * steps:(epoch + 1) * steps]])
    assert len(set(labels.ravel().tolist())) == steps * 8  # no repeats
    for shard in range(shards):
      block = labels[:, shard * per_shard:(shard + 1) * per_shard]
      assert set(block.ravel().tolist()) <= parts[shard]
    epochs.append(labels)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_dropped_examples_vary_between_epochs(tiny_data_dir, reference):
  config = make_config(tiny_data_dir)  # 6 steps of 8: 2 of 50 dropped
  steps = input_pipeline.steps_per_epoch(config, NUM_TRAIN, process_count=1)
  batches = reference(1)
  seen = set()
  for epoch in range(8):
    labels = {int(l) for b in batches[epoch * steps:(epoch + 1) * steps]
              for l in b['label']}
    seen |= labels
  assert seen == set(range(NUM_TRAIN))


@pytest.mark.parametrize('shards,processes', [(2, 2), (4, 2), (4, 4)])
def test_global_batches_do_not_depend_on_process_count(tiny_data_dir, reference,
                                                       shards, processes):
  config = make_config(tiny_data_dir, **{'dataset.num_shards': shards})
  steps = input_pipeline.steps_per_epoch(config, NUM_TRAIN, process_count=1)
  n = steps + 2  # crosses an epoch boundary
  single = reference(shards)[:n]
  local = [take(input_pipeline.pretrain_batches(
      config, process_index=p, process_count=processes), n)
           for p in range(processes)]
  for p in range(processes):
    assert local[p][0]['views'][0].shape[0] == 8 // processes
  joined = [{'label': np.concatenate([local[p][s]['label']
                                      for p in range(processes)]),
             'views': (np.concatenate([local[p][s]['views'][0]
                                       for p in range(processes)]),)}
            for s in range(n)]
  assert_batches_equal(single, joined)


@pytest.mark.parametrize('start_step', [1, 6, 9, 20])
def test_resume_yields_the_same_batches(tiny_data_dir, reference, start_step):
  config = make_config(tiny_data_dir, **{'dataset.num_shards': 2})
  resumed = take(input_pipeline.pretrain_batches(config,
                                                 start_step=start_step), 3)
  assert_batches_equal(reference(2)[start_step:start_step + 3], resumed)


MULTICROP = {'augment.recipe': 'swav', 'augment.crop_sampler': 'torchvision',
             'augment.resize_method': 'bilinear',
             'augment.crop_area': (0.14, 1.0),
             'augment.color_jitter': (0.8, 0.8, 0.8, 0.2),
             'augment.num_small_views': 3, 'augment.small_image_size': 8,
             'dataset.num_shards': 2}


@pytest.fixture(scope='module')
def multicrop_reference(tiny_data_dir):
  """The first 8 steps of a 1-process SwAV-style run (2 x 16 + 3 x 8 px)."""
  config = make_config(tiny_data_dir, **MULTICROP)
  return take(input_pipeline.pretrain_batches(config), 8)


def test_multicrop_batch_structure(multicrop_reference):
  batch = multicrop_reference[0]
  assert len(batch['views']) == 2
  big, small = batch['views']
  assert big.shape == (8, 2, 16, 16, 3) and small.shape == (8, 3, 8, 8, 3)
  assert big.dtype == small.dtype == np.float32
  for views in (big, small):
    assert 0.0 <= views.min() <= views.max() <= 1.0
  for i in range(3):  # each small crop is its own draw
    for j in range(i):
      assert np.abs(small[:, i] - small[:, j]).max() > 0.05


def test_small_crops_leave_the_global_views_unchanged(tiny_data_dir,
                                                      multicrop_reference):
  config = make_config(tiny_data_dir, **{**MULTICROP,
                                         'augment.num_small_views': 0})
  batches = take(input_pipeline.pretrain_batches(config), 2)
  for plain, multi in zip(batches, multicrop_reference):
    assert len(plain['views']) == 1
    np.testing.assert_array_equal(plain['views'][0], multi['views'][0])


def test_multicrop_does_not_depend_on_process_count(tiny_data_dir,
                                                    multicrop_reference):
  config, processes = make_config(tiny_data_dir, **MULTICROP), 2
  n = 8  # crosses the epoch boundary at step 6
  local = [take(input_pipeline.pretrain_batches(
      config, process_index=p, process_count=processes), n)
           for p in range(processes)]
  joined = [{'label': np.concatenate([local[p][s]['label']
                                      for p in range(processes)]),
             'views': tuple(np.concatenate([local[p][s]['views'][r]
                                            for p in range(processes)])
                            for r in range(2))}
            for s in range(n)]
  assert_batches_equal(multicrop_reference, joined)


@pytest.mark.parametrize('start_step', [1, 5])
def test_multicrop_resume_yields_the_same_batches(tiny_data_dir,
                                                  multicrop_reference,
                                                  start_step):
  config = make_config(tiny_data_dir, **MULTICROP)
  resumed = take(input_pipeline.pretrain_batches(config,
                                                 start_step=start_step), 3)
  assert_batches_equal(multicrop_reference[start_step:start_step + 3],
                       resumed)


def test_cache_refuses_images_of_varying_size(tiny_data_dir):
  config = make_config(tiny_data_dir, **{'dataset.cache': True})
  with pytest.raises(ValueError, match='dataset.cache=True needs images of '
                     'one size'):
    input_pipeline.pretrain_batches(config)


def test_cache_matches_streaming_on_fixed_size_images():
  with tfds.testing.mock_data(num_examples=24):
    streamed = take(input_pipeline.pretrain_batches(
        make_config(**{'dataset.name': 'cifar10'}),
        start_step=1), 4)
    cached = take(input_pipeline.pretrain_batches(
        make_config(**{'dataset.name': 'cifar10', 'dataset.cache': True}),
        start_step=1), 4)
  assert_batches_equal(streamed, cached)


def test_seed_changes_the_order(tiny_data_dir, reference):
  other = next(input_pipeline.pretrain_batches(make_config(tiny_data_dir,
                                                           seed=1)))
  assert not np.array_equal(reference(1)[0]['label'], other['label'])


@pytest.mark.parametrize('overrides,kwargs,message', [
    ({'global_batch_size': 10, 'dataset.num_shards': 4}, {},
     r'global_batch_size=10 is not divisible by dataset.num_shards=4'),
    ({'dataset.num_shards': 3}, {'process_count': 2},
     r'dataset.num_shards=3 must be a positive multiple of the process '
     r'count 2'),
    ({'global_batch_size': 9}, {'process_count': 2},
     r'global_batch_size=9 is not divisible by dataset.num_shards=2'),
    ({}, {'process_index': 2, 'process_count': 2},
     r'process_index=2 must be in \[0, 2\)'),
    ({}, {'start_step': -1}, r'start_step=-1 must be >= 0'),
    ({'global_batch_size': 64}, {},
     r"train split 'train' has 50 examples, too few for "
     r'global_batch_size=64'),
    ({'dataset.shuffle_buffer': 0}, {}, r'dataset.shuffle_buffer=0'),
    ({'augment.color_strength': 2.0}, {}, r'augment.color_strength=2.0'),
    ({'augment.recipe': 'byoll'}, {}, r"unknown augment recipe 'byoll'"),
    ({'dataset.name': 'tiny_imagess'}, {}, r"unknown dataset 'tiny_imagess'"),
    ({'dataset.train_split': 'validation'}, {}, r"bad split 'validation'"),
])
def test_bad_inputs_fail_at_the_call(tiny_data_dir, overrides, kwargs,
                                     message):
  config = make_config(tiny_data_dir, **overrides)
  with pytest.raises(ValueError, match=message):
    input_pipeline.pretrain_batches(config, **kwargs)  # not at next()


def test_eval_covers_the_split_in_a_fixed_order(tiny_data_dir):
  config = make_config(tiny_data_dir)
  batches = list(input_pipeline.eval_batches(config, 'test', batch_size=5))
  assert len(batches) == math.ceil(NUM_TEST / 5)
  for b in batches:
    assert b['image'].shape == (5, 16, 16, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == NUM_TEST and not mask[NUM_TEST:].any()
  labels = np.concatenate([b['label'] for b in batches])[mask]
  builder = tfds.builder('jaxssl_tiny_images', data_dir=tiny_data_dir)
  expected = [int(ex['label']) for ex in builder.as_dataset(split='test')]
  np.testing.assert_array_equal(labels, expected)
  padded = batches[-1]['image'][~batches[-1]['mask']]
  assert not padded.any()
  assert input_pipeline.num_examples(config, 'test') == NUM_TEST


@pytest.mark.parametrize('processes,batch_size', [(2, 4), (3, 2), (4, 8)])
def test_eval_processes_split_the_work(tiny_data_dir, processes, batch_size):
  config = make_config(tiny_data_dir)
  per_process = [list(input_pipeline.eval_batches(
      config, 'test', batch_size=batch_size, process_index=p,
      process_count=processes)) for p in range(processes)]
  expected_batches = math.ceil(math.ceil(NUM_TEST / processes) / batch_size)
  assert all(len(b) == expected_batches for b in per_process)
  labels = [int(l) for batches in per_process for b in batches
            for l in b['label'][b['mask']]]
  assert sorted(labels) == list(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))


def test_eval_images_are_centre_crops(tiny_data_dir):
  config = make_config(tiny_data_dir, **{'dataset.image_size': 40})
  batch = next(input_pipeline.eval_batches(config, 'test', batch_size=3))
  builder = tfds.builder('jaxssl_tiny_images', data_dir=tiny_data_dir)
  for i, ex in enumerate(builder.as_dataset(split='test').take(3)):
    expected = host.center_crop(ex['image'], out_size=40).numpy()
    np.testing.assert_allclose(batch['image'][i], expected, atol=1e-6)


@pytest.mark.parametrize('name,channels', [('mnist', 1), ('cifar10', 3),
                                           ('imagenet2012', 3)])
def test_mocked_datasets_flow_through(name, channels):
  config = make_config(**{'dataset.name': name, 'dataset.image_size': 24})
  with tfds.testing.mock_data(num_examples=16):
    batch = next(input_pipeline.pretrain_batches(config))
    evals = list(input_pipeline.eval_batches(config, 'test', batch_size=6))
  assert batch['views'][0].shape == (8, 2, 24, 24, channels)
  (done,) = finished(batch, config)
  assert 0.0 <= done.min() <= done.max() <= 1.0
  assert [b['image'].shape for b in evals] == [(6, 24, 24, channels)] * 3
  assert sum(int(b['mask'].sum()) for b in evals) == 16


def test_image_folder_with_a_corrupt_file_names_it(tmp_path):
  rng = np.random.default_rng(0)
  for label in ('a', 'b'):
    folder = tmp_path / 'train' / label
    folder.mkdir(parents=True)
    for i in range(6):
      tf.io.write_file(str(folder / f'{i}.png'), tf.io.encode_png(
          rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)))
  broken = tmp_path / 'train' / 'b' / 'broken.png'
  broken.write_bytes(b'\x89PNG truncated')
  config = make_config(**{'dataset.name': 'image_folder',
                          'dataset.image_folder': str(tmp_path),
                          'global_batch_size': 4, 'dataset.num_shards': 1})
  with pytest.raises(ValueError, match=f'cannot be decoded: {broken}'):
    take(input_pipeline.pretrain_batches(config), 6)
