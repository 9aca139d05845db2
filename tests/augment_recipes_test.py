"""Tests for the recipes: official values, per-view laws, SimCLR unchanged.

Rates are estimated from n fixed-seed views; each tolerance is 4 binomial
standard deviations, sqrt(p (1 - p) / n), so a correct implementation fails
with probability < 1e-4 per check while a wrong rate (0.5 for 0.1, 0.2 for
0) is many deviations away. The official values below are typed in from
the sources named in docs/data.md, not read from jaxssl.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from jaxssl import augment
from jaxssl import config_schema

# Only the op under test is random: the crop is the whole square image, a
# same-size resize is the identity, no flip, no colour.
IDENTITY = dict(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=False,
                color_prob=0.0, grayscale_prob=0.0)


def recipe_config(recipe, **overrides):
  c = config_schema.defaults().augment
  c.update(augment.recipe_defaults(recipe))
  c.update(overrides)
  return c


def many_views(image, config, *, n, out_size, view_index, seed0=0):
  """`n` views for seeds (seed0, 0..n-1), stacked: [n, out, out, C]."""
  image = tf.constant(image)
  view_fn = augment.get_recipe(config.recipe)

  def view(i):
    seed = tf.stack([tf.constant(seed0, tf.int64), i])
    return view_fn(image, seed, view_index=view_index, out_size=out_size,
                   config_augment=config)

  ds = tf.data.Dataset.range(n).map(view, num_parallel_calls=tf.data.AUTOTUNE)
  return next(ds.batch(n).as_numpy_iterator())


def tolerance(p, n):
  return 4 * math.sqrt(p * (1 - p) / n)


def test_simclr_recipe_values_are_the_schema_defaults():
  defaults = config_schema.defaults().augment
  for key, value in augment.recipe_defaults('simclr').items():
    assert defaults[key] == value, key


@pytest.mark.parametrize('recipe,expected', [
    # deepmind-research byol/utils/augmentations.py, dataset.py.
    ('byol', dict(crop_sampler='byol', crop_area=(0.08, 1.0),
                  resize_method='bicubic', color_jitter=(0.4, 0.4, 0.2, 0.1),
                  brightness='additive', view_blur_probs=(1.0, 0.1),
                  view_solarize_probs=(0.0, 0.2), num_small_views=0)),
    # facebookresearch/moco main_moco.py --aug-plus.
    ('moco_v2', dict(crop_sampler='torchvision', crop_area=(0.2, 1.0),
                     resize_method='bilinear',
                     color_jitter=(0.4, 0.4, 0.4, 0.1),
                     brightness='multiplicative', blur_prob=0.5,
                     view_blur_probs=(), view_solarize_probs=())),
    # facebookresearch/moco-v3 main_moco.py, CONFIG.md (crop_min 0.2).
    ('moco_v3', dict(crop_sampler='torchvision', crop_area=(0.2, 1.0),
                     resize_method='bilinear',
                     color_jitter=(0.4, 0.4, 0.2, 0.1),
                     view_blur_probs=(1.0, 0.1),
                     view_solarize_probs=(0.0, 0.2))),
    # facebookresearch/swav src/multicropdataset.py, scripts (2x224+6x96).
    ('swav', dict(crop_sampler='torchvision', crop_area=(0.14, 1.0),
                  resize_method='bilinear', color_jitter=(0.8, 0.8, 0.8, 0.2),
                  blur_prob=0.5, view_blur_probs=(), num_small_views=6,
                  small_image_size=96, small_crop_area=(0.05, 0.14))),
])
def test_official_recipe_values(recipe, expected):
  values = augment.recipe_defaults(recipe)
  assert values['recipe'] == recipe
  for key, value in expected.items():
    assert values[key] == value, key
  config = recipe_config(recipe)
  augment.check_config(config)
  # Shared by all five: p = 0.8 jitter, 0.2 grayscale, sigma in [0.1, 2].
  assert (config.color_prob, config.grayscale_prob) == (0.8, 0.2)
  assert tuple(config.blur_sigma) == (0.1, 2.0) and config.num_views == 2


@pytest.mark.parametrize('recipe', ['byol', 'moco_v3'])
def test_asymmetric_blur_rates(recipe):
  """View 1 always blurred, view 2 about 10%: a delta spreads iff blurred."""
  n, size = 1000, 40
  image = np.zeros((size, size, 3), np.float32)
  image[size // 2, size // 2] = 1.0
  # sigma >= 0.5 so that every blur shows (at 0.1 a Gaussian tap is 1e-22).
  config = recipe_config(recipe, view_solarize_probs=(), blur_sigma=(0.5, 2.0),
                         **IDENTITY)
  for view_index, p in [(0, 1.0), (1, 0.1)]:
    views = many_views(image, config, n=n, out_size=size,
                       view_index=view_index)
    blurred = views[:, size // 2, size // 2 + 1, 0] > 1e-4
    if p == 1.0:
      assert blurred.all()
    else:
      assert abs(blurred.mean() - p) < tolerance(p, n)


@pytest.mark.parametrize('recipe', ['byol', 'moco_v3'])
def test_asymmetric_solarize_rates(recipe):
  """View 2 solarized about 20%, view 1 never: 0.8 -> 0.2 inside the image."""
  n, size = 1000, 24
  image = np.full((size, size, 3), 0.8, np.float32)
  config = recipe_config(recipe, **IDENTITY)
  for view_index, p in [(0, 0.0), (1, 0.2)]:
    views = many_views(image, config, n=n, out_size=size,
                       view_index=view_index)
    centre = views[:, size // 2, size // 2, 0]
    solarized = np.abs(centre - 0.2) < 1e-4
    assert np.all(solarized | (np.abs(centre - 0.8) < 1e-4))
    if p == 0.0:
      assert not solarized.any()
    else:
      assert abs(solarized.mean() - p) < tolerance(p, n)


@pytest.mark.parametrize('recipe,p', [('moco_v2', 0.5), ('swav', 0.5)])
def test_symmetric_blur_rate(recipe, p):
  n, size = 800, 32
  image = np.zeros((size, size, 1), np.float32)
  image[size // 2, size // 2] = 1.0
  config = recipe_config(recipe, blur_sigma=(0.5, 2.0), **IDENTITY)
  for view_index in (0, 1):
    views = many_views(image, config, n=n, out_size=size,
                       view_index=view_index)
    blurred = views[:, size // 2, size // 2 + 1, 0] > 1e-4
    assert abs(blurred.mean() - p) < tolerance(p, n)


def test_byol_brightness_is_additive_0_4_with_p_0_8():
  n = 1000
  image = np.full((8, 8, 1), 0.5, np.float32)
  config = recipe_config('byol', view_blur_probs=(0.0, 0.0),
                         view_solarize_probs=(), **{**IDENTITY,
                                                    'color_prob': 0.8})
  config.color_jitter = (0.4, 0.0, 0.0, 0.0)
  deltas = many_views(image, config, n=n, out_size=8,
                      view_index=0)[:, 0, 0, 0] - 0.5
  moved = np.abs(deltas) > 1e-7
  assert abs(moved.mean() - 0.8) < tolerance(0.8, n)
  assert deltas.min() >= -0.4 - 1e-6 and deltas.max() <= 0.4 + 1e-6
  assert deltas.min() < -0.38 and deltas.max() > 0.38
  assert abs(deltas[moved].mean()) < 4 * 0.8 / math.sqrt(12 * moved.sum())


def test_byol_clips_after_resize_and_simclr_does_not():
  """Bicubic overshoot reaches grayscale in SimCLR, is clipped first in BYOL."""
  board = np.kron(np.indices((4, 4)).sum(0) % 2, np.ones((2, 2)))
  image = np.stack([board, 1 - board, board], -1).astype(np.float32)
  resized = tf.image.resize(image, [32, 32], method='bicubic').numpy()
  assert resized.max() > 1.01 and resized.min() < -0.01
  luma = np.array([0.2989, 0.587, 0.114])
  overrides = dict(crop_sampler='tf', view_blur_probs=(0.0, 0.0),
                   view_solarize_probs=(), **{**IDENTITY,
                                              'grayscale_prob': 1.0})
  for recipe, source in [('simclr', resized),
                         ('byol', np.clip(resized, 0, 1))]:
    config = recipe_config(recipe, **overrides)
    got = many_views(image, config, n=2, out_size=32, view_index=0)[0]
    want = np.clip(np.repeat((source @ luma)[..., None], 3, -1), 0, 1)
    np.testing.assert_allclose(got, want, atol=2e-5)


def simclr_by_hand(image, seed, config, out_size):
  """SimCLR's documented steps with 7 seeds, from the public ops."""
  s = tf.unstack(tf.random.experimental.stateless_split(seed, 7))
  x = tf.image.convert_image_dtype(image, tf.float32)
  begin, size = augment.sample_crop_box(tf.shape(x), s[0])
  x = tf.image.resize(tf.slice(x, begin, size), [out_size, out_size],
                      method='bicubic')
  x = tf.ensure_shape(x, [out_size, out_size, 3])
  x = tf.image.stateless_random_flip_left_right(x, s[1])
  if tf.random.stateless_uniform([], s[2]) < config.color_prob:
    x = augment.color_jitter(x, s[3], strength=config.color_strength)
  if tf.random.stateless_uniform([], s[4]) < config.grayscale_prob:
    x = augment.to_grayscale(x)
  x = tf.clip_by_value(x, 0.0, 1.0)
  sigma = tf.random.stateless_uniform([], s[6], minval=0.1, maxval=2.0)
  if tf.random.stateless_uniform([], s[5]) < config.blur_prob:
    x = augment.gaussian_blur(x, kernel_size=out_size // 10, sigma=sigma)
    x = tf.clip_by_value(x, 0.0, 1.0)
  return x.numpy()


def test_default_config_is_the_simclr_recipe():
  config = config_schema.defaults().augment
  image = tf.constant(np.random.default_rng(0).integers(
      0, 256, (50, 70, 3), dtype=np.uint8))
  for i in range(12):
    seed = tf.constant([i, 3], tf.int64)
    got = augment.simclr_view(image, seed, out_size=40, config_augment=config)
    np.testing.assert_array_equal(got.numpy(),
                                  simclr_by_hand(image, seed, config, 40))


def test_view_spec():
  config = recipe_config('byol', num_small_views=2, small_image_size=8)
  assert augment.view_spec(config, 0) == augment.ViewSpec(
      small=False, crop_area=(0.08, 1.0), blur_prob=1.0, solarize_prob=0.0)
  assert augment.view_spec(config, 1).solarize_prob == 0.2
  # Tuples that list the global views leave the small ones at the defaults.
  assert augment.view_spec(config, 3) == augment.ViewSpec(
      small=True, crop_area=(0.05, 0.14), blur_prob=0.5, solarize_prob=0.0)
  config.view_blur_probs = (1.0, 0.1, 0.3, 0.4)
  assert augment.view_spec(config, 3).blur_prob == 0.4
  with pytest.raises(ValueError, match=r'view_index=4 must be in \[0, 4\)'):
    augment.view_spec(config, 4)


def test_small_crops_have_their_size_and_area():
  config = recipe_config('swav', num_small_views=2, small_image_size=12,
                         flip=False)
  image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  views = many_views(image, config, n=4, out_size=12, view_index=3)
  assert views.shape == (4, 12, 12, 3)
  assert 0.0 <= views.min() <= views.max() <= 1.0
  with pytest.raises(ValueError, match=r'out_size=16 for small view 2; must '
                     r'be augment.small_image_size=12'):
    augment.torchvision_view(tf.constant(image), tf.constant([0, 0]),
                             view_index=2, out_size=16, config_augment=config)


@pytest.mark.parametrize('recipe', sorted(augment.RECIPES))
@pytest.mark.parametrize('shape', [(30, 41, 3), (28, 28, 1)])
def test_every_recipe_gives_views_in_range(recipe, shape):
  config = recipe_config(recipe, num_small_views=1, small_image_size=8)
  image = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
  for view_index, size in [(0, 24), (1, 24), (2, 8)]:
    views = many_views(image, config, n=6, out_size=size,
                       view_index=view_index)
    assert views.shape == (6, size, size, shape[-1])
    assert views.dtype == np.float32
    assert 0.0 <= views.min() <= views.max() <= 1.0
    assert np.abs(views[0] - views[1]).max() > 0.01  # seeds matter


@pytest.mark.parametrize('recipe,overrides,message', [
    ('simclr', {'crop_sampler': 'pil'}, "unknown augment.crop_sampler 'pil'"),
    ('simclr', {'resize_method': 'area'},
     "unknown augment.resize_method 'area'"),
    ('simclr', {'color_jitter': (0.4, 0.4, 0.2)},
     r'augment.color_jitter=\(0.4, 0.4, 0.2\) must be \(\) or 4'),
    ('moco_v2', {'color_jitter': (0.4, 0.4, 0.4, 0.6)},
     r'augment.color_jitter=\(0.4, 0.4, 0.4, 0.6\) must be >= 0 with hue'),
    ('byol', {'color_jitter': (0.4, 1.2, 0.2, 0.1)},
     r"contrast, saturation <= 1 for recipe 'byol'"),
    ('byol', {'view_blur_probs': (1.0, 0.1, 0.5)},
     r'augment.view_blur_probs=\(1.0, 0.1, 0.5\) must have 0, num_views=2'),
    ('moco_v3', {'view_solarize_probs': (0.0, 1.5)},
     r'augment.view_solarize_probs=\(0.0, 1.5\) must hold probabilities'),
    ('swav', {'num_small_views': -1}, 'augment.num_small_views=-1'),
    ('swav', {'small_image_size': 0}, 'augment.small_image_size=0'),
    ('swav', {'small_crop_area': (0.14, 0.05)},
     r'augment.small_crop_area=\(0.14, 0.05\) must satisfy'),
    ('swav', {'recipe': 'swav2'}, "unknown augment recipe 'swav2'"),
])
def test_check_config_names_the_bad_value(recipe, overrides, message):
  config = recipe_config(recipe)
  config.update(overrides)
  with pytest.raises(ValueError, match=message):
    augment.check_config(config)


def test_torchvision_jitter_accepts_strengths_above_one():
  config = recipe_config('moco_v2', color_jitter=(1.5, 1.5, 1.5, 0.5))
  augment.check_config(config)  # torchvision clamps factors at 0
  with pytest.raises(ValueError, match="unknown augment recipe 'sim'"):
    augment.recipe_defaults('sim')
