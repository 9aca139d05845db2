"""Tests for jaxssl.augment: shapes, ranges, laws of the random ops, errors.

Probabilities are estimated from N fixed-seed draws; each tolerance is 4
binomial (or uniform-mean) standard deviations, so a correct implementation
fails with probability < 1e-4 per check, and a wrong rate (e.g. 0.5 instead
of 0.2) is many deviations away.
"""

import math

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from jaxssl import augment


def augment_config(**overrides) -> ml_collections.ConfigDict:
  """`config.augment` at SimCLR's ImageNet parameters, with overrides."""
  c = dict(recipe='simclr', num_views=2, crop_sampler='tf',
           crop_area=(0.08, 1.0), crop_aspect=(3 / 4, 4 / 3),
           resize_method='bicubic', flip=True, color_strength=1.0,
           color_jitter=(), color_prob=0.8, grayscale_prob=0.2,
           brightness='multiplicative', blur_prob=0.5, view_blur_probs=(),
           blur_sigma=(0.1, 2.0), view_solarize_probs=(), num_small_views=0,
           small_image_size=96, small_crop_area=(0.05, 0.14),
           on_device=False)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


# Only the op under test is random: the crop is the whole (square) image and
# a same-size bicubic resize is the identity.
IDENTITY = dict(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=False,
                color_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def random_image(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def many_views(image, config, *, n, out_size, seed0=0) -> np.ndarray:
  """`simclr_view` for seeds (seed0, 0..n-1), stacked: [n, out, out, C]."""
  image = tf.constant(image)

  def view(i):
    seed = tf.stack([tf.constant(seed0, tf.int64), i])
    return augment.simclr_view(image, seed, out_size=out_size,
                               config_augment=config)

  ds = tf.data.Dataset.range(n).map(view, num_parallel_calls=tf.data.AUTOTUNE)
  return next(ds.batch(n).as_numpy_iterator())


def tolerance(p, n):
  return 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize('shape', [(28, 28, 1), (40, 60, 3), (300, 17, 3)])
@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
@pytest.mark.parametrize('out_size', [16, 64])
def test_view_shape_dtype_and_range(shape, dtype, out_size):
  image = random_image(shape)
  if dtype == np.float32:
    image = image.astype(np.float32) / 255
  views = many_views(image, augment_config(), n=16, out_size=out_size)
  assert views.shape == (16, out_size, out_size, shape[-1])
  assert views.dtype == np.float32
  assert views.min() >= 0.0 and views.max() <= 1.0


def test_uint8_and_float_inputs_give_the_same_view():
  image = random_image((40, 60, 3))
  seed = tf.constant([3, 4], tf.int64)
  cfg = augment_config()
  a = augment.simclr_view(tf.constant(image), seed, out_size=32,
                          config_augment=cfg)
  b = augment.simclr_view(tf.constant(image.astype(np.float32) / 255), seed,
                          out_size=32, config_augment=cfg)
  np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_view_is_a_pure_function_of_the_seed_and_views_differ():
  image = tf.constant(random_image((40, 60, 3)))
  cfg = augment_config()

  def view(seed):
    return augment.simclr_view(image, tf.constant(seed, tf.int64),
                               out_size=32, config_augment=cfg).numpy()

  np.testing.assert_array_equal(view([1, 2]), view([1, 2]))
  views = [view([1, v]) for v in range(8)]
  for i in range(8):
    for j in range(i):
      assert np.abs(views[i] - views[j]).max() > 0.05


def test_flip_rate_is_one_half():
  n, image = 1000, random_image((24, 24, 3))
  views = many_views(image, augment_config(**{**IDENTITY, 'flip': True}),
                     n=n, out_size=24)
  original = image.astype(np.float32) / 255
  same = np.all(np.abs(views - original) < 1e-6, axis=(1, 2, 3))
  flipped = np.all(np.abs(views - original[:, ::-1]) < 1e-6, axis=(1, 2, 3))
  assert np.all(same ^ flipped)  # every view is one or the other
  assert abs(flipped.mean() - 0.5) < tolerance(0.5, n)


def test_grayscale_rate_and_weights_on_colour_images():
  n, image = 1000, random_image((24, 24, 3))
  views = many_views(image, augment_config(**{**IDENTITY,
                                              'grayscale_prob': 0.2}),
                     n=n, out_size=24)
  gray = np.all(np.abs(views - views[..., :1]) < 1e-6, axis=(1, 2, 3))
  assert abs(gray.mean() - 0.2) < tolerance(0.2, n)
  # ITU-R 601 luma, the weights of tf.image.rgb_to_grayscale.
  luma = (image.astype(np.float64) / 255) @ np.array([0.2989, 0.587, 0.114])
  np.testing.assert_allclose(views[gray][0, ..., 0], luma, atol=2e-3)


def test_color_jitter_rate():
  n, image = 1000, random_image((24, 24, 3))
  views = many_views(image, augment_config(**{**IDENTITY, 'color_prob': 0.8}),
                     n=n, out_size=24)
  changed = np.abs(views - image.astype(np.float32) / 255).max(
      axis=(1, 2, 3)) > 1e-3
  assert abs(changed.mean() - 0.8) < tolerance(0.8, n)


def test_blur_rate_and_sigma_law():
  """A centred delta blurs to k k^T, so k1 / k0 = exp(-1 / (2 sigma^2))."""
  n, size = 1000, 64
  image = np.zeros((size, size, 1), np.float32)
  image[size // 2, size // 2] = 1.0
  cfg = augment_config(**{**IDENTITY, 'blur_prob': 0.5,
                          'blur_sigma': (0.5, 2.0)})
  views = many_views(image, cfg, n=n, out_size=size)
  centre = views[:, size // 2, size // 2, 0]
  blurred = centre < 1.0 - 1e-6
  assert abs(blurred.mean() - 0.5) < tolerance(0.5, n)
  ratio = (views[blurred, size // 2, size // 2 + 1, 0] /
           centre[blurred]).astype(np.float64)
  sigma = np.sqrt(-1.0 / (2.0 * np.log(ratio)))
  assert sigma.min() > 0.5 - 1e-3 and sigma.max() < 2.0 + 1e-3
  # Uniform on [0.5, 2]: mean 1.25, standard deviation 1.5 / sqrt(12).
  assert abs(sigma.mean() - 1.25) < 4 * 1.5 / math.sqrt(12 * blurred.sum())


def test_identity_config_returns_the_image():
  image = random_image((24, 24, 3))
  views = many_views(image, augment_config(**IDENTITY), n=8, out_size=24)
  np.testing.assert_allclose(views, np.broadcast_to(image / 255, views.shape),
                             atol=1e-6)


@pytest.mark.parametrize('mode,strength,low,high', [
    ('multiplicative', 1.0, 0.2, 1.8),
    ('multiplicative', 1.25, 0.0, 2.0),
    ('multiplicative', 0.5, 0.6, 1.4),
])
def test_multiplicative_brightness_factor_law(mode, strength, low, high):
  n = 2000
  image = tf.fill([4, 4, 1], 0.25)  # 0.25 * 2 stays unclipped
  factors = np.array([
      random_brightness_value(image, [i, 5], 0.8 * strength, mode) / 0.25
      for i in range(n)])
  assert factors.min() >= low - 1e-6 and factors.max() <= high + 1e-6
  width = high - low
  assert factors.min() < low + 0.01 * width
  assert factors.max() > high - 0.01 * width
  assert abs(factors.mean() - (low + high) / 2) < 4 * width / math.sqrt(12 * n)


@pytest.mark.parametrize('strength', [0.5, 1.0])
def test_additive_brightness_delta_law(strength):
  n = 2000
  image = tf.fill([4, 4, 1], 0.5)
  deltas = np.array([
      random_brightness_value(image, [i, 6], 0.8 * strength, 'additive') - 0.5
      for i in range(n)])
  bound = 0.8 * strength
  assert deltas.min() >= -bound - 1e-6 and deltas.max() <= bound + 1e-6
  assert deltas.min() < -0.98 * bound and deltas.max() > 0.98 * bound
  assert abs(deltas.mean()) < 4 * 2 * bound / math.sqrt(12 * n)


def random_brightness_value(image, seed, max_delta, mode) -> float:
  out = augment.random_brightness(image, tf.constant(seed, tf.int64),
                                  max_delta=max_delta, mode=mode)
  values = out.numpy()
  assert np.ptp(values) < 1e-6  # one factor for the whole image
  return float(values.flat[0])


@pytest.mark.parametrize('shape', [(100, 100, 3), (28, 28, 1), (60, 90, 3)])
def test_crop_box_area_and_aspect_ranges(shape):
  n = 2000
  ds = tf.data.Dataset.range(n).map(lambda i: augment.sample_crop_box(
      tf.constant(shape), tf.stack([i, tf.constant(9, tf.int64)]))[1])
  sizes = next(ds.batch(n).as_numpy_iterator()).astype(np.float64)
  h, w = sizes[:, 0], sizes[:, 1]
  area = h * w / (shape[0] * shape[1])
  full = area == 1.0
  # min_object_covered=0.1 lifts the effective lower bound from 0.08 to 0.1.
  assert area.min() >= 0.1 - 1e-9 and area.max() <= 1.0
  # Integer sizes: the width is rounded, so the ratio may move by 0.5 / h.
  aspect = w / h
  slack = 0.5 / h + 1e-9
  ok = (aspect >= 3 / 4 - slack) & (aspect <= 4 / 3 + slack)
  assert np.all(ok | full)
  assert area.min() < 0.15 and area.max() > 0.8  # both ends occur


def test_crop_box_falls_back_to_the_whole_image():
  shape = (100, 100, 3)
  for i in range(20):
    begin, size = augment.sample_crop_box(
        tf.constant(shape), tf.constant([i, 1], tf.int64),
        area_range=(0.95, 1.0), aspect_range=(2.0, 3.0))
    assert list(begin.numpy()[:2]) == [0, 0]
    assert list(size.numpy()[:2]) == [100, 100]


def numpy_blur(image, kernel_size, sigma):
  """Float64 separable Gaussian blur with zero padding (SimCLR's law)."""
  radius = int(kernel_size / 2)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-x**2 / (2 * sigma**2))
  k /= k.sum()
  h, w, c = image.shape
  padded = np.zeros((h + 2 * radius, w + 2 * radius, c))
  padded[radius:radius + h, radius:radius + w] = image
  out = np.zeros((h, w, c))
  for i in range(-radius, radius + 1):
    for j in range(-radius, radius + 1):
      out += (k[i + radius] * k[j + radius] *
              padded[radius + i:radius + i + h, radius + j:radius + j + w])
  return out


@pytest.mark.parametrize('kernel_size,sigma', [(22, 1.7), (6, 0.8), (3, 2.0),
                                               (1, 1.0)])
@pytest.mark.parametrize('channels', [1, 3])
def test_gaussian_blur_matches_numpy(kernel_size, sigma, channels):
  image = random_image((30, 26, channels)).astype(np.float64) / 255
  got = augment.gaussian_blur(tf.constant(image, tf.float32),
                              kernel_size=kernel_size, sigma=sigma)
  np.testing.assert_allclose(got.numpy(), numpy_blur(image, kernel_size,
                                                     sigma), atol=1e-5)


@pytest.mark.parametrize('shape,out_size,box', [
    ((64, 48, 3), 40, (11, 3, 42, 42)),  # crop rint(0.875 * 48) = 42
    ((48, 64, 3), 40, (3, 11, 42, 42)),
    ((300, 200, 1), 64, (63, 13, 175, 175)),
    ((64, 48, 3), 32, (0, 0, 64, 48)),  # output <= 32 px: no crop (CIFAR)
    ((28, 28, 1), 64, (0, 0, 28, 28)),  # source <= 32 px: no crop (MNIST)
])
def test_center_crop_geometry(shape, out_size, box):
  image = random_image(shape)
  top, left, height, width = box
  region = image[top:top + height, left:left + width].astype(np.float32) / 255
  expected = np.clip(tf.image.resize(region, [out_size, out_size],
                                     method='bicubic').numpy(), 0, 1)
  got = augment.center_crop(tf.constant(image), out_size=out_size)
  assert got.shape == (out_size, out_size, shape[-1])
  np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_grey_images_skip_colour_only_ops():
  image = tf.constant(random_image((20, 20, 1)).astype(np.float32) / 255)
  assert augment.to_grayscale(image) is image
  out = augment.color_jitter(image, tf.constant([1, 2], tf.int64),
                             strength=1.0)
  assert out.shape == (20, 20, 1)
  assert 0.0 <= float(tf.reduce_min(out)) <= float(tf.reduce_max(out)) <= 1.0


def test_color_jitter_clips_every_op():
  image = tf.constant(random_image((16, 16, 3)).astype(np.float32) / 255)
  for i in range(20):
    out = augment.color_jitter(image, tf.constant([i, 3], tf.int64),
                               strength=1.25, brightness='additive').numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_recipe_registry():
  assert augment.get_recipe('simclr') is augment.simclr_view
  with pytest.raises(ValueError, match=r"unknown augment recipe 'simclrr'; "
                     r'known: byol, moco_v2, moco_v3, simclr, swav'):
    augment.get_recipe('simclrr')


@pytest.mark.parametrize('override,message', [
    ({'recipe': 'byoll'}, "unknown augment recipe 'byoll'"),
    ({'num_views': 0}, 'augment.num_views=0'),
    ({'crop_area': (0.5, 0.1)}, r'augment.crop_area=\(0.5, 0.1\)'),
    ({'crop_area': (0.08, 1.5)}, r'augment.crop_area=\(0.08, 1.5\)'),
    ({'crop_aspect': (0.0, 1.0)}, r'augment.crop_aspect=\(0.0, 1.0\)'),
    ({'blur_sigma': (2.0, 0.1)}, r'augment.blur_sigma=\(2.0, 0.1\)'),
    ({'color_prob': 1.2}, 'augment.color_prob=1.2'),
    ({'grayscale_prob': -0.1}, r'augment.grayscale_prob=-0.1'),
    ({'blur_prob': 2.0}, 'augment.blur_prob=2.0'),
    ({'color_strength': 1.5}, 'augment.color_strength=1.5'),
    ({'brightness': 'gamma'}, "unknown augment.brightness 'gamma'"),
])
def test_check_config_names_the_bad_value(override, message):
  with pytest.raises(ValueError, match=message):
    augment.check_config(augment_config(**override))


def test_bad_image_rank_or_channels():
  cfg = augment_config()
  with pytest.raises(ValueError, match='static C of 1 or 3'):
    augment.simclr_view(tf.zeros([8, 8, 4]), tf.constant([0, 0]), out_size=8,
                        config_augment=cfg)
  with pytest.raises(ValueError, match=r'crop_fraction=1.5'):
    augment.center_crop(tf.zeros([8, 8, 3]), out_size=8, crop_fraction=1.5)
