"""Tests for jaxssl.augment.device: the device half of every recipe.

The deterministic ops are checked against TensorFlow's own ops (tf.image's
saturation, hue, contrast, grayscale), against float64 numpy
re-implementations of the official code (SimCLR's zero-padded blur,
Pillow's `BoxBlur.c`, torchvision's `ColorJitter` blends) and, where Pillow
is installed, against Pillow. Rates are binomial with 4.5-sigma tolerances
from fixed keys (a correct rate fails with probability < 1e-5); uniform
laws are checked by their range and mean.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxssl import config_schema
from jaxssl.augment import device
from jaxssl.augment import recipes

LUMA_PIL = np.array([0.299, 0.587, 0.114])
LUMA_TF = np.array([0.2989, 0.587, 0.114])
N = 1024  # views per rate check
# Every device op off: each test turns on the one it checks.
OFF = dict(color_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
           view_blur_probs=(), view_solarize_probs=())
# A blur with sigma near 0.1 leaves float32 pixels exactly as they were (the
# neighbours' weights are ~1e-22), so rate checks draw sigma in [1, 2].
VISIBLE_BLUR = dict(blur_sigma=(1.0, 2.0))


def config(recipe='simclr', **overrides) -> ml_collections.ConfigDict:
  c = config_schema.defaults('simclr').augment
  c.update(recipes.recipe_defaults(recipe))
  c.update(overrides)
  return c


def finish(views, c, seed=0):
  """`finish_views` jitted; views a tuple of numpy [N, V, S, S, C]."""
  fn = jax.jit(lambda v, k: device.finish_views(v, k, c))
  return tuple(np.asarray(x) for x in fn(views, jax.random.key(seed)))


def binomial_tolerance(p, n):
  return 4.5 * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope='module')
def rgb_views():
  """N // 2 examples x 2 views of random RGB 24 px pixels in [0, 1]."""
  return np.random.RandomState(4).rand(N // 2, 2, 24, 24, 3).astype(
      np.float32)


@pytest.mark.parametrize('op', ['saturation', 'hue', 'contrast',
                                'grayscale'])
@pytest.mark.parametrize('amount', [0.3, 1.6, -0.15])
def test_tf_law_colour_ops_match_tf_image(op, amount):
  image = np.random.RandomState(2).rand(12, 10, 3).astype(np.float32)
  image[0, :3] = 0.5  # grey pixels: zero chroma
  image[1, :3] = 0.0  # black pixels: zero value
  if op == 'saturation':
    ours = device.adjust_saturation(image, abs(amount), law='tf')
    expected = tf.image.adjust_saturation(image, abs(amount))
  elif op == 'hue':
    ours = device.adjust_hue(image, amount / 2)  # deltas in [-1, 1] turns
    expected = tf.image.adjust_hue(image, amount / 2)
  elif op == 'contrast':
    ours = device.adjust_contrast(image, abs(amount), law='tf')
    expected = tf.image.adjust_contrast(image, abs(amount))
  else:
    ours = device.to_grayscale(image, law='tf')
    expected = tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_torchvision_contrast_and_saturation_blend_with_pil_luma():
  x = 0.35 + 0.3 * np.random.default_rng(0).random((8, 8, 3))
  f = 0.7
  contrast = device.adjust_contrast(x.astype(np.float32), f,
                                    law='torchvision')
  mean_luma = (x @ LUMA_PIL).mean()
  np.testing.assert_allclose(contrast, f * x + (1 - f) * mean_luma,
                             atol=1e-6)
  saturation = device.adjust_saturation(x.astype(np.float32), f,
                                        law='torchvision')
  np.testing.assert_allclose(
      saturation, f * x + (1 - f) * (x @ LUMA_PIL)[..., None], atol=1e-6)


@pytest.mark.parametrize('law,weights', [('tf', LUMA_TF),
                                         ('torchvision', LUMA_PIL)])
def test_grayscale_luma_per_law(law, weights):
  x = np.random.default_rng(3).random((5, 7, 3)).astype(np.float32)
  np.testing.assert_allclose(device.to_grayscale(x, law=law),
                             np.repeat((x @ weights)[..., None], 3, -1),
                             atol=2e-6)


def test_solarize_thresholds_bytes_as_pil():
  levels = np.arange(256)
  got = np.asarray(device.solarize(jnp.asarray(levels / 255.0, jnp.float32),
                                   threshold=128 / 255)) * 255
  # PIL ImageOps.solarize(threshold=128): i < 128 ? i : 255 - i.
  np.testing.assert_allclose(got, np.where(levels < 128, levels,
                                           255 - levels), atol=1e-4)
  half = device.solarize(jnp.array([0.0, 0.49, 0.5, 0.7]), threshold=0.5)
  np.testing.assert_allclose(half, [0.0, 0.49, 0.5, 0.3], atol=1e-7)


def simclr_blur_numpy(image, kernel_size, sigma):
  """Float64 separable Gaussian blur with zero padding (SimCLR's law)."""
  radius = int(kernel_size / 2)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-x**2 / (2 * sigma**2))
  k /= k.sum()
  h, w, _ = image.shape
  padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)))
  out = np.zeros_like(image, dtype=np.float64)
  for i in range(-radius, radius + 1):
    for j in range(-radius, radius + 1):
      out += (k[i + radius] * k[j + radius] *
              padded[radius + i:radius + i + h, radius + j:radius + j + w])
  return out


@pytest.mark.parametrize('size', [16, 32, 64])
@pytest.mark.parametrize('sigma', [0.1, 0.9, 2.0])
@pytest.mark.parametrize('channels', [1, 3])
def test_simclr_blur_matches_the_official_kernel(size, sigma, channels):
  image = np.random.RandomState(3).rand(size, size, channels)
  ours = device.blur(jnp.asarray(image, jnp.float32), jnp.float32(sigma),
                     law='tf', max_sigma=2.0)
  np.testing.assert_allclose(ours, simclr_blur_numpy(image, size // 10,
                                                     sigma), atol=1e-5)


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
@pytest.mark.parametrize('shape', [(26, 26, 3), (9, 9, 1)])
def test_pil_blur_matches_pillows_algorithm(sigma, shape):
  image = np.random.default_rng(1).random(shape)
  got = device.blur(jnp.asarray(image, jnp.float32), jnp.float32(sigma),
                    law='pil', max_sigma=2.0)
  np.testing.assert_allclose(got, pil_blur_numpy(image, sigma), atol=1e-5)


@pytest.mark.parametrize('sigma', [0.1, 1.0, 2.0])
def test_pil_blur_is_pillow_up_to_its_uint8_rounding(sigma):
  image_mod = pytest.importorskip('PIL.Image')
  image_filter = pytest.importorskip('PIL.ImageFilter')
  pixels = np.random.default_rng(2).integers(0, 256, (30, 30, 3), np.uint8)
  want = np.asarray(image_mod.fromarray(pixels).filter(
      image_filter.GaussianBlur(radius=sigma)), np.float64)
  got = device.blur(jnp.asarray(pixels, jnp.float32), jnp.float32(sigma),
                    law='pil', max_sigma=2.0)
  # Pillow rounds to the nearest level after each of its six passes; later
  # passes average (convex weights), so the errors add up to <= 6 x 0.5.
  assert np.abs(np.asarray(got) - want).max() <= 3.0 + 1e-3


def test_pil_blur_variance_is_sigma_squared_and_edges_are_repeated():
  size = 41
  delta = np.zeros((size, size, 1), np.float32)
  delta[size // 2, size // 2] = 1.0
  x = np.arange(size) - size // 2
  for sigma in (0.5, 1.0, 2.0):
    out = np.asarray(device.blur(delta, jnp.float32(sigma), law='pil',
                                 max_sigma=2.0))[..., 0].astype(np.float64)
    assert abs(out.sum() - 1.0) < 1e-5
    np.testing.assert_allclose((out.sum(0) * x**2).sum(), sigma**2,
                               rtol=1e-4)
    flat = device.blur(jnp.full((12, 12, 3), 0.7), jnp.float32(sigma),
                       law='pil', max_sigma=2.0)
    np.testing.assert_allclose(flat, 0.7, atol=1e-6)


def changed(out, views):
  """bool [N, V]: the views that the device half changed."""
  return np.any(out != views, axis=(2, 3, 4))


@pytest.mark.parametrize('name,overrides,p', [
    ('jitter', dict(color_prob=0.8), 0.8),
    ('grayscale', dict(grayscale_prob=0.2), 0.2),
    ('blur', dict(blur_prob=0.5, **VISIBLE_BLUR), 0.5),
])
def test_symmetric_rates(rgb_views, name, overrides, p):
  (out,) = finish((rgb_views,), config(**{**OFF, **overrides}))
  hit = changed(out, rgb_views)
  if name == 'grayscale':
    gray = np.all(out == out[..., :1], axis=(2, 3, 4))
    assert np.all(hit == gray)
  assert abs(hit.mean() - p) < binomial_tolerance(p, hit.size), hit.mean()


@pytest.mark.parametrize('recipe', ['byol', 'moco_v3'])
def test_asymmetric_blur_and_solarize_rates(rgb_views, recipe):
  """View 0 always blurred, never solarized; view 1: 0.1 and 0.2."""
  c = recipes.recipe_defaults(recipe)
  for key, probs in [('view_blur_probs', (1.0, 0.1)),
                     ('view_solarize_probs', (0.0, 0.2))]:
    assert tuple(c[key]) == probs
    only = {**OFF, key: c[key], **VISIBLE_BLUR}
    if key == 'view_blur_probs':
      only['blur_prob'] = 0.5  # unused: the per-view tuple wins
    (out,) = finish((rgb_views,), config(recipe, **only))
    hit = changed(out, rgb_views)
    for v, p in enumerate(probs):
      n = hit.shape[0]
      assert abs(hit[:, v].mean() - p) <= binomial_tolerance(p, n) + 1e-12


def test_swav_multicrop_blurs_every_crop_with_p_one_half():
  rng = np.random.RandomState(6)
  views = (rng.rand(256, 2, 24, 24, 3).astype(np.float32),
           rng.rand(256, 3, 12, 12, 3).astype(np.float32))
  c = config('swav', **{**OFF, 'blur_prob': 0.5, **VISIBLE_BLUR},
             num_small_views=3,
             small_image_size=12)
  out = finish(views, c)
  assert [o.shape for o in out] == [v.shape for v in views]
  rates = np.concatenate([changed(o, v) for o, v in zip(out, views)], 1)
  assert rates.shape == (256, 5)
  for v in range(5):
    assert abs(rates[:, v].mean() - 0.5) < binomial_tolerance(0.5, 256)


@pytest.mark.parametrize('brightness,low,high', [('additive', -0.4, 0.4),
                                                 ('multiplicative', 0.6, 1.4)])
def test_brightness_law_at_strength_0_4(brightness, low, high):
  views = np.full((N // 2, 2, 4, 4, 1), 0.5, np.float32)
  c = config(**{**OFF, 'color_prob': 1.0},
             color_jitter=(0.4, 0.0, 0.0, 0.0), brightness=brightness)
  (out,) = finish((views,), c)
  values = out[..., 0, 0, 0].ravel().astype(np.float64)
  assert np.all(out == out[:, :, :1, :1])  # one draw per view
  moves = values - 0.5 if brightness == 'additive' else values / 0.5
  width = high - low
  assert moves.min() >= low - 1e-6 and moves.max() <= high + 1e-6
  assert moves.min() < low + 0.02 * width and moves.max() > high - 0.02 * width
  assert abs(moves.mean() - (low + high) / 2) < 4.5 * width / math.sqrt(
      12 * moves.size)


def test_torchvision_contrast_factors_are_clamped_at_zero():
  """Contrast 1.5 draws factors from U[0, 2.5]: near 0 occurs, never < 0."""
  x = 0.35 + 0.3 * np.random.default_rng(0).random((6, 6, 3))
  views = np.broadcast_to(x.astype(np.float32), (512, 1, 6, 6, 3))
  c = config('moco_v2', **{**OFF, 'color_prob': 1.0}, num_views=1,
             color_jitter=(0.0, 1.5, 0.0, 0.0))
  (out,) = finish((np.array(views),), c)
  anchor = (x @ LUMA_PIL).mean()
  u = (x - anchor).ravel()
  unclipped = (out.min(axis=(1, 2, 3, 4)) > 1e-6) & (
      out.max(axis=(1, 2, 3, 4)) < 1 - 1e-6)
  factors = np.array([(u @ (o.ravel() - anchor)) / (u @ u)
                      for o in out[unclipped, 0].astype(np.float64)])
  assert factors.min() >= -1e-6 and factors.min() < 0.1


def test_every_recipe_gives_views_in_range_and_changes_them(rgb_views):
  overshoot = rgb_views * 1.4 - 0.2  # SimCLR's host crops may overshoot
  for recipe in recipes.RECIPES:
    (out,) = finish((overshoot,), config(recipe, num_small_views=0))
    assert out.dtype == np.float32 and out.shape == overshoot.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert changed(out, np.clip(overshoot, 0, 1)).mean() > 0.5


def test_identity_when_off_and_grey_views_skip_colour_only_ops(rgb_views):
  (out,) = finish((rgb_views[:8],), config(**OFF))
  np.testing.assert_array_equal(out, rgb_views[:8])
  grey = rgb_views[:64, ..., :1]
  (out,) = finish((grey,), config(color_strength=1.25))
  assert out.shape == grey.shape and 0.0 <= out.min() <= out.max() <= 1.0


def test_pure_in_the_key_and_views_differ(rgb_views):
  views = (rgb_views[:16],)
  a, = finish(views, config(), seed=3)
  b, = finish(views, config(), seed=3)
  c, = finish(views, config(), seed=4)
  np.testing.assert_array_equal(a, b)
  assert np.any(a != c)
  # Example n's view depends on n: the same pixels at two positions differ.
  same = np.repeat(rgb_views[:1], 16, axis=0)
  d, = finish((same,), config(), seed=3)
  assert len({d[n].tobytes() for n in range(16)}) > 8


def test_sharded_equals_single_device_for_multicrop(mesh8):
  rng = np.random.RandomState(5)
  views = (rng.rand(16, 2, 24, 24, 3).astype(np.float32),
           rng.rand(16, 2, 12, 12, 3).astype(np.float32))
  c = config('swav', num_small_views=2, small_image_size=12,
             view_solarize_probs=(0.0, 0.2, 0.3, 0.4))
  single = finish(views, c, seed=7)
  sharding = NamedSharding(mesh8, P('data'))
  sharded = tuple(jax.device_put(v, sharding) for v in views)
  fn = jax.jit(lambda v, k: device.finish_views(v, k, c))
  out = fn(sharded, jax.random.key(7))
  for o, s in zip(out, single):
    assert o.sharding.spec == P('data')
    np.testing.assert_allclose(np.asarray(o), s, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('shapes', [
    [(4, 3, 8, 8, 3)],  # 3 views, config has 2
    [(4, 2, 8, 8, 4)],  # 4 channels
    [(4, 2, 8, 8)],  # rank 4
    [(4, 2, 8, 8, 3), (4, 2, 4, 4, 3)],  # small crops, config has none
])
def test_bad_views_raise_one_line(shapes):
  views = tuple(np.zeros(s, np.float32) for s in shapes)
  with pytest.raises(ValueError, match=r'^views of shapes .* must be one '
                     r'\[N, V, S, S, C\] array per crop size with V = \[2\]'):
    device.finish_views(views, jax.random.key(0), config())
