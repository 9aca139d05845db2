"""Tests for `model.input_normalization`: statistics, wrapping, export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import config_schema
from jaxssl import evaluate
from jaxssl import models

_KEY = jax.random.key(0, impl='rbg')  # fast init on CPU; values don't matter

# The official constants, typed in from the sources: BYOL
# `utils/dataset.py:normalize_images`, MoCo `main_moco.py`, SwAV
# `src/multicropdataset.py` (std 0.228 for red).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWAV_STD = (0.228, 0.224, 0.225)


def model_config(normalization='none', encoder='tiny_cnn'):
  config = config_schema.defaults().model
  config.encoder = encoder
  config.input_normalization = normalization
  return config


def random_images(shape, seed=0):
  return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_default_is_none_and_the_plain_encoder():
  config = model_config()
  assert config_schema.defaults().model.input_normalization == 'none'
  encoder = models.make_encoder(config, image_size=16)
  assert not isinstance(encoder, models.NormalizedEncoder)


@pytest.mark.parametrize('name,mean,std', [
    ('imagenet', IMAGENET_MEAN, IMAGENET_STD),
    ('swav', IMAGENET_MEAN, SWAV_STD),
])
def test_statistics(name, mean, std):
  assert models.input_statistics(name, 3) == (mean, std)
  grey_mean, grey_std = models.input_statistics(name, 1)
  np.testing.assert_allclose(grey_mean, [np.mean(np.float64(mean))],
                             rtol=1e-12)
  np.testing.assert_allclose(grey_std, [np.mean(np.float64(std))],
                             rtol=1e-12)


@pytest.mark.parametrize('name,mean,std', [
    ('imagenet', IMAGENET_MEAN, IMAGENET_STD),
    ('swav', IMAGENET_MEAN, SWAV_STD),
])
@pytest.mark.parametrize('channels', [1, 3])
def test_normalized_encoder_equals_encoder_of_normalized_pixels(
    name, mean, std, channels):
  x = random_images((4, 16, 16, channels))
  if channels == 1:
    mean, std = (np.mean(mean),), (np.mean(std),)
  expected_input = (x.astype(np.float64) - np.array(mean)) / np.array(std)
  plain = models.make_encoder(model_config(), image_size=16)
  wrapped = models.make_encoder(model_config(name), image_size=16)
  assert isinstance(wrapped, models.NormalizedEncoder)
  variables = plain.init(_KEY, jnp.asarray(x), train=False)
  wrapped_variables = wrapped.init(_KEY, jnp.asarray(x), train=False)
  # Same tree, same initial values: the normalisation is not a parameter.
  assert (jax.tree.structure(variables)
          == jax.tree.structure(wrapped_variables))
  for a, b in zip(jax.tree.leaves(variables),
                  jax.tree.leaves(wrapped_variables)):
    np.testing.assert_array_equal(a, b)
  got = wrapped.apply(variables, jnp.asarray(x), train=False)
  want = plain.apply(variables, jnp.asarray(expected_input, jnp.float32),
                     train=False)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
  # Training mode updates the same BatchNorm statistics.
  _, updates = wrapped.apply(variables, jnp.asarray(x), train=True,
                             mutable=['batch_stats'])
  _, plain_updates = plain.apply(variables,
                                 jnp.asarray(expected_input, jnp.float32),
                                 train=True, mutable=['batch_stats'])
  assert (jax.tree.structure(updates) == jax.tree.structure(plain_updates))


def test_wrapper_forwards_encoder_properties():
  plain = models.make_encoder(model_config(encoder='resnet18'),
                              image_size=32)
  wrapped = models.make_encoder(model_config('imagenet', 'resnet18'),
                                image_size=32)
  assert wrapped.feature_dim == plain.feature_dim == 512
  assert wrapped.min_image_size == plain.min_image_size


def test_exported_encoder_spec_carries_the_normalization():
  config = model_config('swav')
  spec = {'model': config.to_dict(), 'image_size': 16, 'num_channels': 3}
  encoder, abstract = evaluate.build_encoder(spec)
  assert isinstance(encoder, models.NormalizedEncoder)
  assert encoder.normalization == 'swav'
  plain, plain_abstract = evaluate.build_encoder(
      {**spec, 'model': model_config().to_dict()})
  assert (jax.tree.structure(abstract) == jax.tree.structure(plain_abstract))


def test_bad_names():
  with pytest.raises(ValueError, match=r"unknown model.input_normalization "
                     r"'imagnet'; known: none, imagenet, swav"):
    models.make_encoder(model_config('imagnet'), image_size=16)
  with pytest.raises(ValueError, match="'none' has no statistics"):
    models.input_statistics('none', 3)
  with pytest.raises(ValueError, match='num_channels=4 must be 1 or 3'):
    models.input_statistics('imagenet', 4)
