"""End to end with augment.on_device: pipeline layout, training, resume.

configs/simclr_tiny.py with `augment.on_device=True`: the input pipeline
yields uint8 images at dataset.image_size, the train step makes the views
on device, the loss is finite and changes, and a run resumed from its
step-4 checkpoint ends with exactly the state of an uninterrupted run.
"""

import jax
import numpy as np
import pytest
import tensorflow as tf
from helpers import restore_state, tiny_factory
from etils import epath

from jaxssl import config_schema
from jaxssl import input_pipeline
from jaxssl import steps
from jaxssl import train


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('simclr_tiny', fashion_mnist_dir,
                      **{'augment.on_device': True})


def test_pipeline_yields_uint8_images_in_the_host_order(tiny):
  config = tiny()
  on = next(input_pipeline.pretrain_batches(config, start_step=3))
  off = next(input_pipeline.pretrain_batches(
      tiny(**{'augment.on_device': False}), start_step=3))
  assert set(on) == {'image', 'label'}
  assert on['image'].dtype == np.uint8
  assert on['image'].shape == (32, 16, 16, 1)
  # Same examples, same order: only the views are made elsewhere.
  np.testing.assert_array_equal(on['label'], off['label'])


def test_device_image_keeps_same_size_and_resizes_others():
  image = np.random.RandomState(0).randint(0, 256, (28, 28, 1), np.uint8)
  same = input_pipeline.device_image(tf.constant(image), 28).numpy()
  np.testing.assert_array_equal(same, image)
  small = input_pipeline.device_image(tf.constant(image), 16).numpy()
  expected = tf.image.resize(image.astype(np.float32), (16, 16),
                             method='bicubic', antialias=True).numpy()
  assert small.dtype == np.uint8
  np.testing.assert_array_equal(small, np.clip(np.round(expected), 0, 255))


def test_step_views_have_the_host_layout(tiny):
  config = tiny()
  images = np.zeros((4, 16, 16, 1), np.uint8)
  batch = steps.device_views({'image': images, 'label': np.zeros(4)},
                             jax.random.key(0), config)
  assert isinstance(batch['views'], tuple) and len(batch['views']) == 1
  assert batch['views'][0].shape == (4, 2, 16, 16, 1)
  assert batch['views'][0].dtype == np.float32


def test_trains_with_changing_finite_loss_and_resumes_exactly(tiny, tmp_path):
  config = tiny(eval_after_training=False)
  s = train.setup(config)
  state = s.init_fn()
  batches = input_pipeline.pretrain_batches(config, start_step=0)
  losses = []
  for _ in range(3):
    state, metrics = s.train_step(state, train.global_batch(next(batches),
                                                            s.mesh))
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)) and len(set(losses)) == 3, losses

  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.run(config, straight)
  train.run(config, resumed)
  # The process "died" after saving step 4 and before saving step 8.
  (epath.Path(resumed) / 'checkpoints' / '8').rmtree()
  assert train.run(config, resumed)['step'] == 8
  jax.tree.map(np.testing.assert_array_equal,
               restore_state(config, resumed, 8),
               restore_state(config, straight, 8))


@pytest.mark.parametrize('overrides,match', [
    ({'augment.recipe': 'byol'}, 'augment.recipe'),
    ({'augment.num_small_views': 2}, 'augment.num_small_views'),
])
def test_validate_rejects_unsupported(overrides, match):
  config = config_schema.defaults()
  config.augment.on_device = True
  for key, value in overrides.items():
    config.augment[key.split('.')[1]] = value
  with pytest.raises(ValueError, match=match):
    config_schema.validate(config)
