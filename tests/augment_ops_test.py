"""Tests for the ops of the BYOL and torchvision recipes against their laws.

References are float64 numpy re-implementations of the official code (BYOL
`_decode_and_random_crop`, torchvision `RandomResizedCrop.get_params`,
Pillow's `BoxBlur.c`, `ImageEnhance`) or first principles; where Pillow is
installed, its own ops are the reference too. Statistical checks compare
two independent samples of n draws within 4 standard deviations of the
difference of their means (failure probability < 1e-4 per check).
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from jaxssl import augment
from jaxssl.augment import blur, color, crops


def sample_boxes(sampler, shape, n, **kwargs) -> np.ndarray:
  """[n, 4] int boxes (top, left, height, width) for seeds (i, 11)."""
  ds = tf.data.Dataset.range(n).map(lambda i: tf.concat(sampler(
      tf.constant(shape), tf.stack([i, tf.constant(11, tf.int64)]),
      **kwargs), 0))
  boxes = next(ds.batch(n).as_numpy_iterator())
  return boxes[:, [0, 1, 3, 4]].astype(np.int64)


def byol_box_numpy(rng, height, width, area_range, aspect_range):
  """BYOL `_decode_and_random_crop`: one draw, round, clamp (h, w)."""
  target = rng.uniform(*area_range) * height * width
  ratio = math.exp(rng.uniform(math.log(aspect_range[0]),
                               math.log(aspect_range[1])))
  w = min(round(math.sqrt(target * ratio)), width)
  h = min(round(math.sqrt(target / ratio)), height)
  return h, w


def torchvision_box_numpy(rng, height, width, area_range, aspect_range):
  """torchvision `RandomResizedCrop.get_params`: 10 tries, then centre."""
  for _ in range(10):
    target = rng.uniform(*area_range) * height * width
    ratio = math.exp(rng.uniform(math.log(aspect_range[0]),
                                 math.log(aspect_range[1])))
    w = round(math.sqrt(target * ratio))
    h = round(math.sqrt(target / ratio))
    if 0 < w <= width and 0 < h <= height:
      return h, w
  in_ratio = width / height
  if in_ratio < min(aspect_range):
    return round(width / min(aspect_range)), width
  if in_ratio > max(aspect_range):
    return height, round(height * max(aspect_range))
  return height, width


def assert_same_mean(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  spread = math.sqrt(a.var() / len(a) + b.var() / len(b))
  assert abs(a.mean() - b.mean()) <= 4 * spread + 1e-12, (a.mean(), b.mean())


@pytest.mark.parametrize('sampler,reference,shape,area,aspect', [
    ('byol', byol_box_numpy, (100, 100, 3), (0.08, 1.0), (3 / 4, 4 / 3)),
    ('byol', byol_box_numpy, (60, 150, 3), (0.08, 1.0), (3 / 4, 4 / 3)),
    ('torchvision', torchvision_box_numpy, (100, 100, 3), (0.2, 1.0),
     (3 / 4, 4 / 3)),
    ('torchvision', torchvision_box_numpy, (30, 100, 1), (0.5, 1.0),
     (3 / 4, 4 / 3)),  # mostly no fit: the fallback dominates
    ('torchvision', torchvision_box_numpy, (200, 200, 3), (0.05, 0.14),
     (3 / 4, 4 / 3)),  # SwAV's small crops
])
def test_crop_sampler_matches_the_official_law(sampler, reference, shape,
                                               area, aspect):
  n = 3000
  fn = {'byol': augment.sample_byol_crop_box,
        'torchvision': augment.sample_torchvision_crop_box}[sampler]
  boxes = sample_boxes(fn, shape, n, area_range=area, aspect_range=aspect)
  top, left, h, w = boxes.T
  height, width = shape[:2]
  assert (h >= 1).all() and (w >= 1).all()
  assert (top >= 0).all() and (top + h <= height).all()
  assert (left >= 0).all() and (left + w <= width).all()
  rng = np.random.default_rng(0)
  want = np.array([reference(rng, height, width, area, aspect)
                   for _ in range(n)])
  assert_same_mean(h, want[:, 0])
  assert_same_mean(w, want[:, 1])
  assert_same_mean(h * w, want[:, 0] * want[:, 1])
  # Offsets are uniform over the room left by the box (when there is some:
  # the fallback of the 30 x 100 case spans the full height).
  room = height - h
  moving = room > 0
  if moving.sum() > 100:
    assert_same_mean(top[moving] / room[moving],
                     rng.uniform(0, 1, moving.sum()))


@pytest.mark.parametrize('area', [(0.2, 1.0), (0.05, 0.14), (0.14, 1.0)])
def test_torchvision_boxes_keep_area_and_aspect_up_to_rounding(area):
  n, side = 2000, 200
  boxes = sample_boxes(augment.sample_torchvision_crop_box, (side, side, 3),
                       n, area_range=area, aspect_range=(3 / 4, 4 / 3))
  h, w = boxes[:, 2].astype(np.float64), boxes[:, 3].astype(np.float64)
  # Rounding moves each side by <= 0.5 px.
  low = (h - 0.5) * (w - 0.5) / side**2
  high = (h + 0.5) * (w + 0.5) / side**2
  assert (high >= area[0]).all() and (low <= area[1]).all()
  assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
  assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
  # Log-uniform aspect: E[log(w / h)] = 0 by symmetry.
  log_ratio = np.log(w / h)
  assert abs(log_ratio.mean()) < 4 * log_ratio.std() / math.sqrt(n)


@pytest.mark.parametrize('shape,aspect,box', [
    # W / H = 1 < 2: full width, height round(100 / 2), centred.
    ((100, 100, 3), (2.0, 3.0), (25, 0, 50, 100)),
    # W / H = 3 > 0.8: full height, width round(100 * 0.8), centred.
    ((100, 300, 3), (0.5, 0.8), (0, 110, 100, 80)),
])
def test_torchvision_fallback_is_a_centre_crop(shape, aspect, box):
  for i in range(5):
    begin, size = augment.sample_torchvision_crop_box(
        tf.constant(shape), tf.constant([i, 2], tf.int64),
        area_range=(0.95, 1.0), aspect_range=aspect)
    assert tuple(begin.numpy()[:2]) + tuple(size.numpy()[:2]) == box


def test_byol_sampler_clamps_instead_of_retrying():
  """Near-full areas with ratio != 1 overflow a side: BYOL clamps it."""
  boxes = sample_boxes(augment.sample_byol_crop_box, (100, 100, 3), 500,
                       area_range=(0.9, 1.0), aspect_range=(3 / 4, 4 / 3))
  clamped = (boxes[:, 2] == 100) | (boxes[:, 3] == 100)
  assert clamped.mean() > 0.5
  tv = sample_boxes(augment.sample_torchvision_crop_box, (100, 100, 3), 500,
                    area_range=(0.9, 1.0), aspect_range=(3 / 4, 4 / 3))
  assert (tv[:, 2] * tv[:, 3] >= 0.9 * 100 * 100 - 100).all()


@pytest.mark.parametrize('shape,out_size', [((50, 50, 3), 24),
                                            ((20, 20, 1), 48)])
def test_torchvision_resize_is_pil_bilinear(shape, out_size):
  image_pil = pytest.importorskip('PIL.Image')
  image = np.random.default_rng(0).random(shape).astype(np.float32)
  got = augment.random_resized_crop(
      tf.constant(image), tf.constant([0, 0], tf.int64),
      sampler='torchvision', area_range=(1.0, 1.0), aspect_range=(1.0, 1.0),
      out_size=out_size, method='bilinear', antialias=True).numpy()
  for ch in range(shape[-1]):
    want = np.asarray(image_pil.fromarray(image[..., ch], mode='F').resize(
        (out_size, out_size), image_pil.BILINEAR))
    np.testing.assert_allclose(got[..., ch], want, atol=1e-5)


def pil_blur_numpy(image, sigma, passes=3):
  """Pillow's GaussianBlur in float64: extended box passes, edges repeated."""
  sigma2 = sigma * sigma / passes
  l = math.floor((math.sqrt(12 * sigma2 + 1) - 1) / 2)
  a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1)**2))
  taps = np.array([a] + [1.0] * (2 * l + 1) + [a]) / (2 * (l + a) + 1)
  half = l + 1
  out = np.asarray(image, np.float64)
  for axis in (1, 0):
    for _ in range(passes):
      size = out.shape[axis]
      index = np.clip(np.arange(-half, size + half), 0, size - 1)
      padded = np.take(out, index, axis=axis)
      out = sum(t * np.take(padded, np.arange(k, k + size), axis=axis)
                for k, t in enumerate(taps))
  return out


@pytest.mark.parametrize('sigma', [0.1, 0.7, 1.3, 2.0])
@pytest.mark.parametrize('shape', [(30, 26, 3), (9, 11, 1)])
def test_pil_blur_matches_pillows_algorithm(sigma, shape):
  image = np.random.default_rng(1).random(shape)
  got = blur.pil_gaussian_blur(tf.constant(image, tf.float32),
                               sigma=tf.constant(sigma), max_sigma=2.0)
  np.testing.assert_allclose(got.numpy(), pil_blur_numpy(image, sigma),
                             atol=1e-5)


@pytest.mark.parametrize('sigma', [0.1, 1.0, 2.0])
def test_pil_blur_is_pillow_up_to_its_uint8_rounding(sigma):
  image_mod = pytest.importorskip('PIL.Image')
  image_filter = pytest.importorskip('PIL.ImageFilter')
  pixels = np.random.default_rng(2).integers(0, 256, (40, 30, 3), np.uint8)
  want = np.asarray(image_mod.fromarray(pixels).filter(
      image_filter.GaussianBlur(radius=sigma)), np.float64)
  got = blur.pil_gaussian_blur(tf.constant(pixels, tf.float32),
                               sigma=tf.constant(sigma), max_sigma=2.0)
  # Pillow rounds to the nearest level after each of its six passes; later
  # passes average (convex weights), so the errors add up to <= 6 x 0.5.
  assert np.abs(got.numpy() - want).max() <= 3.0 + 1e-3


@pytest.mark.parametrize('sigma', [0.5, 1.0, 2.0])
def test_pil_blur_variance_is_sigma_squared_and_edges_are_repeated(sigma):
  size = 41
  delta = np.zeros((size, size, 1), np.float32)
  delta[size // 2, size // 2] = 1.0
  out = blur.pil_gaussian_blur(tf.constant(delta), sigma=tf.constant(sigma),
                               max_sigma=2.0).numpy()[..., 0].astype(
                                   np.float64)
  x = np.arange(size) - size // 2
  assert abs(out.sum() - 1.0) < 1e-5
  np.testing.assert_allclose((out.sum(0) * x**2).sum(), sigma**2, rtol=1e-4)
  np.testing.assert_allclose((out.sum(1) * x**2).sum(), sigma**2, rtol=1e-4)
  flat = blur.pil_gaussian_blur(tf.fill([12, 10, 3], 0.7),
                                sigma=tf.constant(sigma), max_sigma=2.0)
  np.testing.assert_allclose(flat.numpy(), 0.7, atol=1e-6)


def test_simclr_and_byol_blur_kernels_have_the_same_taps():
  # SimCLR: kernel_size = H // 10; BYOL: H / 10; both radius int(k / 2).
  for height in range(1, 1025):
    assert int((height // 10) / 2) == int(height / 10 / 2)


def test_solarize_thresholds():
  values = tf.constant([0.0, 0.2, 0.49, 0.5, 0.7, 1.0])
  np.testing.assert_allclose(
      augment.solarize(values, threshold=0.5).numpy(),
      [0.0, 0.2, 0.49, 0.5, 0.3, 0.0], atol=1e-7)
  levels = np.arange(256)
  got = augment.solarize(tf.constant(levels / 255.0, tf.float32),
                         threshold=128 / 255).numpy() * 255
  # PIL ImageOps.solarize(threshold=128): i < 128 ? i : 255 - i.
  np.testing.assert_allclose(got, np.where(levels < 128, levels,
                                           255 - levels), atol=1e-4)
  image_ops = pytest.importorskip('PIL.ImageOps')
  image_mod = pytest.importorskip('PIL.Image')
  pil = np.asarray(image_ops.solarize(image_mod.fromarray(
      levels.astype(np.uint8)[None].repeat(3, 0)[..., None].repeat(3, 2))))
  np.testing.assert_allclose(got, pil[0, :, 0], atol=1e-4)


def jitter_one(image, strengths, law, seed, brightness='multiplicative'):
  return augment.jitter_colors(
      tf.constant(image, tf.float32), tf.constant([seed, 4], tf.int64),
      strengths=strengths, brightness=brightness, law=law).numpy().astype(
          np.float64)


def fit_blend(out, x, anchor):
  """Least-squares f in out = f * x + (1 - f) * anchor; returns (f, resid)."""
  u, v = (x - anchor).ravel(), (out - anchor).ravel()
  f = (u @ v) / (u @ u)
  return f, np.abs(v - f * u).max()


LUMA_PIL = np.array([0.299, 0.587, 0.114])
LUMA_TF = np.array([0.2989, 0.587, 0.114])


@pytest.mark.parametrize('seed', range(4))
def test_torchvision_contrast_blends_with_the_mean_luma(seed):
  # Mid-range pixels so that no factor in [0.6, 1.4] clips.
  x = 0.35 + 0.3 * np.random.default_rng(seed).random((8, 8, 3))
  out = jitter_one(x, (0.0, 0.4, 0.0, 0.0), 'torchvision', seed)
  f, resid = fit_blend(out, x, (x @ LUMA_PIL).mean())
  assert resid < 1e-5 and 0.6 - 1e-6 <= f <= 1.4 + 1e-6
  # The TF law blends each channel with its own mean instead.
  out_tf = jitter_one(x, (0.0, 0.4, 0.0, 0.0), 'tf', seed)
  f, resid = fit_blend(out_tf, x, x.mean(axis=(0, 1)))
  assert resid < 1e-5 and 0.6 - 1e-6 <= f <= 1.4 + 1e-6


@pytest.mark.parametrize('seed', range(4))
def test_torchvision_saturation_blends_with_the_pixel_luma(seed):
  x = 0.35 + 0.3 * np.random.default_rng(seed).random((8, 8, 3))
  out = jitter_one(x, (0.0, 0.0, 0.4, 0.0), 'torchvision', seed)
  f, resid = fit_blend(out, x, (x @ LUMA_PIL)[..., None])
  assert resid < 1e-5 and 0.6 - 1e-6 <= f <= 1.4 + 1e-6


def test_torchvision_factors_are_clamped_at_zero():
  """Contrast 1.5 draws factors from U[0, 2.5]: f = 0 is possible, not < 0."""
  x = 0.35 + 0.3 * np.random.default_rng(0).random((6, 6, 3))
  anchor = (x @ LUMA_PIL).mean()
  factors = []
  for seed in range(300):
    out = jitter_one(x, (0.0, 1.5, 0.0, 0.0), 'torchvision', seed)
    if out.min() > 1e-6 and out.max() < 1 - 1e-6:  # unclipped
      factors.append(fit_blend(out, x, anchor)[0])
  factors = np.array(factors)
  assert factors.min() >= -1e-6 and factors.min() < 0.1


@pytest.mark.parametrize('law,weights', [('tf', LUMA_TF),
                                         ('torchvision', LUMA_PIL)])
def test_grayscale_luma_per_law(law, weights):
  x = np.random.default_rng(3).random((5, 7, 3))
  got = augment.to_grayscale(tf.constant(x, tf.float32), law=law).numpy()
  np.testing.assert_allclose(got, np.repeat((x @ weights)[..., None], 3, -1),
                             atol=2e-6)


@pytest.mark.parametrize('brightness,low,high', [('additive', -0.4, 0.4),
                                                 ('multiplicative', 0.6, 1.4)])
@pytest.mark.parametrize('law', ['tf', 'torchvision'])
def test_brightness_law_at_strength_0_4(brightness, low, high, law):
  n = 600
  x = np.full((4, 4, 1), 0.5)
  values = np.array([jitter_one(x, (0.4, 0.0, 0.0, 0.0), law, seed,
                                brightness=brightness)[0, 0, 0]
                     for seed in range(n)])
  moves = values - 0.5 if brightness == 'additive' else values / 0.5
  width = high - low
  assert moves.min() >= low - 1e-6 and moves.max() <= high + 1e-6
  assert moves.min() < low + 0.02 * width and moves.max() > high - 0.02 * width
  assert abs(moves.mean() - (low + high) / 2) < 4 * width / math.sqrt(12 * n)


def test_bad_law_or_sampler_names():
  image = tf.zeros([8, 8, 3])
  with pytest.raises(ValueError, match="unknown colour law 'pil'"):
    augment.to_grayscale(image, law='pil')
  with pytest.raises(ValueError, match="unknown crop sampler 'random'"):
    crops.random_resized_crop(image, tf.constant([0, 0]), sampler='random',
                              area_range=(0.5, 1), aspect_range=(1, 1),
                              out_size=4, method='bilinear', antialias=True)
  with pytest.raises(ValueError, match="unknown resize method 'area'"):
    crops.random_resized_crop(image, tf.constant([0, 0]), sampler='tf',
                              area_range=(0.5, 1), aspect_range=(1, 1),
                              out_size=4, method='area', antialias=True)
  assert color.PIL_LUMA == tuple(LUMA_PIL)
