"""Tests for jaxssl.augment.host: crop samplers, resize, flip, centre crop.

References are float64 numpy re-implementations of the official samplers
(SimCLR's `tf.image.sample_distorted_bounding_box` call, BYOL
`_decode_and_random_crop`, torchvision `RandomResizedCrop.get_params`),
Pillow's resize, and `tf.image.resize`. Statistical checks compare two
independent samples of n draws within 4 standard deviations of the
difference of their means, or a rate within 4 binomial standard deviations
(failure probability < 1e-4 per check).
"""

import math

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from jaxssl import config_schema
from jaxssl.augment import host
from jaxssl.augment import recipes


def augment_config(**overrides) -> ml_collections.ConfigDict:
  """`config.augment` at SimCLR's ImageNet parameters, with overrides."""
  c = config_schema.defaults('simclr').augment
  c.update(overrides)
  return c


def recipe_config(recipe, **overrides) -> ml_collections.ConfigDict:
  """`config.augment` at `recipe`'s official values, with overrides."""
  return augment_config(**{**recipes.recipe_defaults(recipe), **overrides})


# The crop is the whole (square) image and a same-size resize is the
# identity, so only the op under test is random.
IDENTITY = dict(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=False)


def random_image(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def many_views(image, config, *, n, out_size, seed0=0,
               view_index=0) -> np.ndarray:
  """`host.crop_view` for seeds (seed0, 0..n-1), stacked: [n, S, S, C]."""
  image = tf.constant(image)

  def view(i):
    seed = tf.stack([tf.constant(seed0, tf.int64), i])
    return host.crop_view(image, seed, view_index=view_index,
                          out_size=out_size,
                          config_augment=config)

  ds = tf.data.Dataset.range(n).map(view, num_parallel_calls=tf.data.AUTOTUNE)
  return next(ds.batch(n).as_numpy_iterator())


def tolerance(p, n):
  return 4 * math.sqrt(p * (1 - p) / n)



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
  fn = {'byol': host.sample_byol_crop_box,
        'torchvision': host.sample_torchvision_crop_box}[sampler]
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
  boxes = sample_boxes(host.sample_torchvision_crop_box, (side, side, 3),
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
    begin, size = host.sample_torchvision_crop_box(
        tf.constant(shape), tf.constant([i, 2], tf.int64),
        area_range=(0.95, 1.0), aspect_range=aspect)
    assert tuple(begin.numpy()[:2]) + tuple(size.numpy()[:2]) == box


def test_byol_sampler_clamps_instead_of_retrying():
  """Near-full areas with ratio != 1 overflow a side: BYOL clamps it."""
  boxes = sample_boxes(host.sample_byol_crop_box, (100, 100, 3), 500,
                       area_range=(0.9, 1.0), aspect_range=(3 / 4, 4 / 3))
  clamped = (boxes[:, 2] == 100) | (boxes[:, 3] == 100)
  assert clamped.mean() > 0.5
  tv = sample_boxes(host.sample_torchvision_crop_box, (100, 100, 3), 500,
                    area_range=(0.9, 1.0), aspect_range=(3 / 4, 4 / 3))
  assert (tv[:, 2] * tv[:, 3] >= 0.9 * 100 * 100 - 100).all()


@pytest.mark.parametrize('shape,out_size', [((50, 50, 3), 24),
                                            ((20, 20, 1), 48)])
def test_torchvision_resize_is_pil_bilinear(shape, out_size):
  image_pil = pytest.importorskip('PIL.Image')
  image = np.random.default_rng(0).random(shape).astype(np.float32)
  got = host.random_resized_crop(
      tf.constant(image), tf.constant([0, 0], tf.int64),
      sampler='torchvision', area_range=(1.0, 1.0), aspect_range=(1.0, 1.0),
      out_size=out_size, method='bilinear', antialias=True).numpy()
  for ch in range(shape[-1]):
    want = np.asarray(image_pil.fromarray(image[..., ch], mode='F').resize(
        (out_size, out_size), image_pil.BILINEAR))
    np.testing.assert_allclose(got[..., ch], want, atol=1e-5)


@pytest.mark.parametrize('shape', [(28, 28, 1), (40, 60, 3), (300, 17, 3)])
@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
@pytest.mark.parametrize('out_size', [16, 64])
@pytest.mark.parametrize('recipe', ['byol', 'moco_v2'])
def test_view_shape_dtype_and_range(shape, dtype, out_size, recipe):
  # These recipes clip after the resize (SimCLR's overshoot: a test below).
  image = random_image(shape)
  if dtype == np.float32:
    image = image.astype(np.float32) / 255
  views = many_views(image, recipe_config(recipe), n=16, out_size=out_size)
  assert views.shape == (16, out_size, out_size, shape[-1])
  assert views.dtype == np.float32
  assert views.min() >= 0.0 and views.max() <= 1.0


def test_uint8_and_float_inputs_give_the_same_view():
  image = random_image((40, 60, 3))
  seed = tf.constant([3, 4], tf.int64)
  cfg = augment_config()
  a = host.crop_view(tf.constant(image), seed, view_index=0, out_size=32,
                     config_augment=cfg)
  b = host.crop_view(tf.constant(image.astype(np.float32) / 255), seed,
                     view_index=0, out_size=32, config_augment=cfg)
  np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_view_is_a_pure_function_of_the_seed_and_views_differ():
  image = tf.constant(random_image((40, 60, 3)))
  cfg = augment_config()

  def view(seed):
    return host.crop_view(image, tf.constant(seed, tf.int64), view_index=0,
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


@pytest.mark.parametrize('shape', [(100, 100, 3), (28, 28, 1), (60, 90, 3)])
def test_crop_box_area_and_aspect_ranges(shape):
  n = 2000
  ds = tf.data.Dataset.range(n).map(lambda i: host.sample_crop_box(
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
    begin, size = host.sample_crop_box(
        tf.constant(shape), tf.constant([i, 1], tf.int64),
        area_range=(0.95, 1.0), aspect_range=(2.0, 3.0))
    assert list(begin.numpy()[:2]) == [0, 0]
    assert list(size.numpy()[:2]) == [100, 100]


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
  got = host.center_crop(tf.constant(image), out_size=out_size)
  assert got.shape == (out_size, out_size, shape[-1])
  np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_bad_image_rank_or_channels():
  cfg = augment_config()
  with pytest.raises(ValueError, match='static C of 1 or 3'):
    host.crop_view(tf.zeros([8, 8, 4]), tf.constant([0, 0]), view_index=0,
                   out_size=8, config_augment=cfg)
  with pytest.raises(ValueError, match=r'crop_fraction=1.5'):
    host.center_crop(tf.zeros([8, 8, 3]), out_size=8, crop_fraction=1.5)


def test_byol_clips_after_resize_and_simclr_does_not():
  """SimCLR keeps the bicubic overshoot (its colour steps clip later)."""
  board = np.kron(np.indices((4, 4)).sum(0) % 2, np.ones((2, 2)))
  image = np.stack([board, 1 - board, board], -1).astype(np.float32)
  resized = tf.image.resize(image, [32, 32], method='bicubic').numpy()
  assert resized.max() > 1.01 and resized.min() < -0.01
  for recipe, want in [('simclr', resized), ('byol', np.clip(resized, 0, 1))]:
    config = recipe_config(recipe, crop_sampler='tf', **IDENTITY)
    got = many_views(image, config, n=2, out_size=32)[0]
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_small_crops_have_their_size_and_area():
  config = recipe_config('swav', num_small_views=2, small_image_size=12,
                         flip=False)
  image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  views = many_views(image, config, n=4, out_size=12, view_index=3)
  assert views.shape == (4, 12, 12, 3)
  assert 0.0 <= views.min() <= views.max() <= 1.0
  with pytest.raises(ValueError, match=r'out_size=16 for small view 2; must '
                     r'be augment.small_image_size=12'):
    host.crop_view(tf.constant(image), tf.constant([0, 0]), view_index=2,
                   out_size=16, config_augment=config)
