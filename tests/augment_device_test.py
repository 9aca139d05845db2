"""Tests of jaxssl.augment_device: the on-device SimCLR recipe.

Laws are checked against first principles (binomial rates with 4.5-sigma
tolerances, fixed keys, so a pass is reproducible and a wrong rate fails)
and against TensorFlow itself: the crop sampler's distribution with a
two-sample Kolmogorov-Smirnov bound, and the deterministic ops (bicubic
crop-resize, saturation, hue, contrast, grayscale, blur) pixel for pixel.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxssl import augment
from jaxssl import augment_device
from jaxssl import config_schema
from jaxssl.augment_device import blur
from jaxssl.augment_device import color
from jaxssl.augment_device import crops

NUM_PARAMS = 4000  # views per statistical check of the drawn parameters
NUM_VIEWS_OUT = 1024  # views per statistical check on the outputs


def _config(**overrides) -> ml_collections.ConfigDict:
  c = config_schema.defaults().augment
  for key, value in overrides.items():
    c[key] = value
  return c


def _binomial_tolerance(p: float, n: int) -> float:
  # 4.5 sigma: a correct rate fails with probability < 1e-5.
  return 4.5 * np.sqrt(p * (1 - p) / n)


def _ks_bound(n: int, m: int) -> float:
  # Two-sample KS critical value at alpha = 1e-3 (c = 1.95); conservative
  # for the discrete crop sides.
  return 1.95 * np.sqrt((n + m) / (n * m))


def _ks_statistic(a, b) -> float:
  grid = np.union1d(a, b)
  cdf = lambda x: np.searchsorted(np.sort(x), grid, side='right') / len(x)
  return float(np.max(np.abs(cdf(a) - cdf(b))))


@pytest.fixture(scope='module')
def params():
  """NUM_PARAMS draws of the default recipe's view parameters, 32 x 48."""
  keys = jax.random.split(jax.random.key(0), NUM_PARAMS)
  draw = functools.partial(augment_device.sample_view_params, height=32,
                           width=48, channels=3, config_augment=_config())
  return jax.tree.map(np.asarray, jax.jit(jax.vmap(draw))(keys))


@pytest.mark.parametrize('name,p', [('flip', 0.5), ('jitter', 0.8),
                                    ('grayscale', 0.2), ('blur', 0.5)])
def test_coin_rates(params, name, p):
  rate = params[name].mean()
  assert abs(rate - p) < _binomial_tolerance(p, NUM_PARAMS), (name, rate)


@pytest.mark.parametrize('name,low,high', [('brightness', 0.2, 1.8),
                                           ('contrast', 0.2, 1.8),
                                           ('saturation', 0.2, 1.8),
                                           ('hue', -0.2, 0.2),
                                           ('sigma', 0.1, 2.0)])
def test_uniform_ranges(params, name, low, high):
  x = params[name]
  assert x.min() >= low and x.max() <= high
  width = high - low
  # Fills the range (the extreme of 4000 uniforms is within 0.3% of it) with
  # the uniform's mean (sd width / sqrt(12 n)).
  assert x.min() < low + 0.003 * width and x.max() > high - 0.003 * width
  assert abs(x.mean() - (low + high) / 2) < 4.5 * width / np.sqrt(
      12 * NUM_PARAMS)


def test_jitter_order_is_uniform_permutation(params):
  order = params['order']
  np.testing.assert_array_equal(np.sort(order, axis=1),
                                np.tile(np.arange(4), (NUM_PARAMS, 1)))
  # Each op at each position with probability 1/4.
  counts = (order[:, :, None] == np.arange(4)).mean(axis=0)
  assert np.all(np.abs(counts - 0.25) < _binomial_tolerance(0.25, NUM_PARAMS))


def test_crop_box_ranges(params):
  y, x, h, w = params['box'].T
  area = h * w / (32 * 48)
  assert np.all((y >= 0) & (x >= 0) & (y + h <= 32) & (x + w <= 48))
  whole = (h == 32) & (w == 48)
  assert np.all(whole | ((area >= 0.08) & (area <= 1.0)))
  # Rounding the sides to pixels moves the aspect by < 1 px per side.
  aspect = w / h
  assert np.all(whole | ((aspect > 0.75 - 1 / h) & (aspect < 4 / 3 + 1 / h)))


@pytest.fixture(scope='module')
def tf_boxes():
  """TF's `sample_distorted_bounding_box` as SimCLR calls it, 2000 draws."""
  seeds = tf.reshape(tf.range(4000, dtype=tf.int64), [2000, 2])

  @tf.function
  def draw(seeds):
    def one(seed):
      begin, size = augment.sample_crop_box(tf.constant([32, 48, 3]), seed)
      return tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.map_fn(one, seeds, fn_output_signature=tf.int32)

  return draw(seeds).numpy()


@pytest.mark.parametrize('column,name', [(0, 'y'), (1, 'x'), (2, 'h'),
                                         (3, 'w'), (None, 'area')])
def test_crop_box_law_matches_tf(params, tf_boxes, column, name):
  ours, theirs = params['box'], tf_boxes
  if column is None:
    a, b = ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3]
  else:
    a, b = ours[:, column], theirs[:, column]
  statistic = _ks_statistic(a, b)
  assert statistic < _ks_bound(len(a), len(b)), (name, statistic)


@pytest.mark.parametrize('box', [(0, 0, 32, 48), (3, 5, 20, 17),
                                 (10, 30, 9, 18), (0, 0, 4, 4)])
@pytest.mark.parametrize('out_size', [16, 24])
def test_resize_crop_matches_tf_bicubic(box, out_size):
  image = np.random.RandomState(1).rand(32, 48, 3).astype(np.float32)
  y, x, h, w = box
  expected = tf.image.resize(image[y:y + h, x:x + w], (out_size, out_size),
                             method='bicubic').numpy()
  ours = crops.resize_crop(jnp.transpose(image, (2, 0, 1)),
                           jnp.array(box, jnp.int32), out_size=out_size)
  np.testing.assert_allclose(np.transpose(ours, (1, 2, 0)), expected,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('op', ['saturation', 'hue', 'contrast',
                                'grayscale'])
@pytest.mark.parametrize('amount', [0.3, 1.6, -0.15])
def test_color_ops_match_tf_image(op, amount):
  image = np.random.RandomState(2).rand(12, 10, 3).astype(np.float32)
  image[0, :3] = 0.5  # grey pixels: zero chroma
  image[1, :3] = 0.0  # black pixels: zero value
  chw = jnp.transpose(image, (2, 0, 1))
  if op == 'saturation':
    ours = color.adjust_saturation(chw, abs(amount))
    expected = tf.image.adjust_saturation(image, abs(amount))
  elif op == 'hue':
    # Hue deltas are in [-1, 1] turns.
    ours = color.adjust_hue(chw, amount / 2)
    expected = tf.image.adjust_hue(image, amount / 2)
  elif op == 'contrast':
    ours = color.adjust_contrast(chw, abs(amount))
    expected = tf.image.adjust_contrast(image, abs(amount))
  else:
    ours = color.to_grayscale(chw)
    expected = tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])
  np.testing.assert_allclose(np.transpose(ours, (1, 2, 0)), expected.numpy(),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('sigma', [0.1, 0.9, 2.0])
def test_blur_matches_host_blur(size, sigma):
  image = np.random.RandomState(3).rand(size, size, 3).astype(np.float32)
  expected = augment.gaussian_blur(tf.constant(image), kernel_size=size // 10,
                                   sigma=tf.constant(sigma)).numpy()
  ours = blur.gaussian_blur(jnp.transpose(image, (2, 0, 1)),
                            jnp.float32(sigma))
  np.testing.assert_allclose(np.transpose(ours, (1, 2, 0)), expected,
                             rtol=1e-5, atol=1e-5)


# Output-level checks: one op on, everything else off, the crop whole (area
# 1 on a square image leaves only the whole-image box), so each view either
# is the image or shows the op.
_ONLY = dict(crop_area=(1.0, 1.0), flip=False, color_prob=0.0,
             grayscale_prob=0.0, blur_prob=0.0)


@functools.lru_cache(maxsize=None)
def _views_fn(overrides: tuple, out_size: int, num_views: int, impl: str):
  """One jitted `simclr_views` per (config, size, views, loop)."""
  return jax.jit(functools.partial(
      augment_device.simclr_views, num_views=num_views, out_size=out_size,
      config_augment=_config(**dict(overrides)), impl=impl))


def _views(images, overrides: dict, *, out_size=None, num_views=2, seed=0,
           impl='auto'):
  fn = _views_fn(tuple(sorted(overrides.items())),
                 out_size or images.shape[1], num_views, impl)
  return np.asarray(fn(images, jax.random.key(seed)))


def _to_float(images):
  """`tf.image.convert_image_dtype` of uint8: times float32(1 / 255)."""
  return images.astype(np.float32) * np.float32(1 / 255)


@pytest.fixture(scope='module')
def rgb_images():
  n = NUM_VIEWS_OUT // 2
  return np.random.RandomState(4).randint(0, 256, (n, 32, 32, 3), np.uint8)


@pytest.mark.parametrize('impl', ['vectorized', 'sequential'])
@pytest.mark.parametrize('name,overrides,p', [
    ('flip', dict(flip=True), 0.5),
    ('jitter', dict(color_prob=0.8), 0.8),
    ('grayscale', dict(grayscale_prob=0.2), 0.2),
    ('blur', dict(blur_prob=0.5), 0.5),
])
def test_output_rates(rgb_images, name, overrides, p, impl):
  source = _to_float(rgb_images)
  views = _views(rgb_images, {**_ONLY, **overrides}, impl=impl)
  unchanged = np.all(views == source[:, None], axis=(2, 3, 4))
  if name == 'flip':
    # The flipped views are exactly the mirrored images.
    mirrored = np.all(views == source[:, None, :, ::-1], axis=(2, 3, 4))
    assert np.all(unchanged ^ mirrored)
  elif name == 'grayscale':
    equal = np.all(views == views[..., :1], axis=(2, 3, 4))
    assert np.all(unchanged ^ equal)
  rate = 1.0 - unchanged.mean()
  assert abs(rate - p) < _binomial_tolerance(p, NUM_VIEWS_OUT), (name, rate)


def test_brightness_factor_range_in_outputs():
  # A uniform grey image: contrast, saturation and hue of strength 0 leave
  # it exactly, so each view is 0.25 * U[1 - 0.8, 1 + 0.8].
  images = np.full((NUM_VIEWS_OUT // 2, 8, 8, 3), 64, np.uint8)
  value = np.float32(64) * np.float32(1 / 255)
  views = _views(images, {**_ONLY, 'color_prob': 1.0,
                          'color_jitter': (0.8, 0.0, 0.0, 0.0)})
  factor = views[..., 0, 0, 0] / value
  assert np.all(views == views[..., :1, :1, :1])
  assert factor.min() >= 0.2 - 1e-6 and factor.max() <= 1.8 + 1e-6
  assert factor.min() < 0.25 and factor.max() > 1.75
  assert abs(factor.mean() - 1.0) < 4.5 * 1.6 / np.sqrt(12 * factor.size)


@pytest.mark.parametrize('channels,out_size', [(3, 24), (1, 40)])
def test_full_recipe_shapes_and_range(channels, out_size):
  images = np.random.RandomState(5).randint(0, 256, (16, 32, 32, channels),
                                            np.uint8)
  views = _views(images, {}, out_size=out_size, num_views=3)
  assert views.shape == (16, 3, out_size, out_size, channels)
  assert views.dtype == np.float32
  assert views.min() >= 0.0 and views.max() <= 1.0
  # Different views of one image differ.
  assert not np.array_equal(views[:, 0], views[:, 1])


def test_identity_when_off(rgb_images):
  images = rgb_images[:16]
  expected = tf.image.convert_image_dtype(images, tf.float32).numpy()
  np.testing.assert_array_equal(_views(images, _ONLY),
                                np.stack([expected] * 2, axis=1))
  identity = augment_device.identity_views(images, num_views=2, out_size=32)
  np.testing.assert_array_equal(identity, np.stack([expected] * 2, axis=1))


def test_identity_views_resizes_whole_image(rgb_images):
  images = rgb_images[:4]
  expected = tf.clip_by_value(tf.image.resize(
      tf.image.convert_image_dtype(images, tf.float32), (20, 20),
      method='bicubic'), 0.0, 1.0).numpy()
  ours = augment_device.identity_views(images, num_views=1, out_size=20)
  np.testing.assert_allclose(ours[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_deterministic_per_rng():
  images = np.random.RandomState(5).randint(0, 256, (16, 32, 32, 3), np.uint8)
  a = _views(images, {}, out_size=24, num_views=3, seed=3)
  b = _views(images, {}, out_size=24, num_views=3, seed=3)
  np.testing.assert_array_equal(a, b)
  c = _views(images, {}, out_size=24, num_views=3, seed=4)
  assert np.all(np.any(a != c, axis=(2, 3, 4)))


def test_sharded_equals_single_device(mesh8):
  images = np.random.RandomState(5).randint(0, 256, (16, 32, 32, 3), np.uint8)
  # The 1-device reference is the unsharded jit on the default device.
  single = _views(images, {}, out_size=24, num_views=3, seed=7)
  sharding = NamedSharding(mesh8, P('data'))
  fn = jax.jit(functools.partial(augment_device.simclr_views, num_views=3,
                                 out_size=24, config_augment=_config()),
               in_shardings=(sharding, None), out_shardings=sharding)
  sharded = fn(jax.device_put(images, sharding), jax.random.key(7))
  assert len(sharded.sharding.device_set) == 8
  # Per-example float32 maths: rtol 1e-5 and atol 1e-5 x max |reference|.
  np.testing.assert_allclose(np.asarray(sharded), single, rtol=1e-5,
                             atol=1e-5 * np.abs(single).max())


@pytest.mark.parametrize('channels,source,out_size', [(3, 48, 40),
                                                      (1, 32, 24)])
def test_sequential_equals_vectorized(channels, source, out_size):
  # The full recipe, blur included (5 taps at 40 px, 3 at 24), views that
  # draw each op and views that do not.
  images = np.random.RandomState(6).randint(
      0, 256, (12, source, source, channels), np.uint8)
  keys = augment_device.view_keys(jax.random.key(9), 12, 2).reshape(-1)
  drawn = jax.vmap(functools.partial(
      augment_device.sample_view_params, height=source, width=source,
      channels=channels, config_augment=_config()))(keys)
  for name in ('flip', 'jitter', 'blur'):
    assert 0 < int(np.sum(drawn[name])) < 24, name
  vectorized = _views(images, {}, out_size=out_size, seed=9,
                      impl='vectorized')
  sequential = _views(images, {}, out_size=out_size, seed=9,
                      impl='sequential')
  assert sequential.shape == (12, 2, out_size, out_size, channels)
  np.testing.assert_allclose(sequential, vectorized, rtol=1e-5, atol=1e-5)
  assert not np.array_equal(sequential[:, 0], sequential[:, 1])


def test_resolve_impl(monkeypatch):
  # This test process has 8 CPU devices: 'auto' keeps the sharded batch
  # vectorised; a 1-device CPU run loops.
  assert augment_device.resolve_impl('auto') == 'vectorized'
  assert augment_device.resolve_impl('sequential') == 'sequential'
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  assert augment_device.resolve_impl('auto') == 'sequential'
  assert augment_device.resolve_impl('vectorized') == 'vectorized'
  with pytest.raises(ValueError, match="'loop'.*known: auto, vectorized, "
                     'sequential'):
    augment_device.resolve_impl('loop')


@pytest.mark.parametrize('overrides,bad', [
    (dict(recipe='byol'), 'augment.recipe'),
    (dict(num_small_views=2), 'augment.num_small_views'),
    (dict(view_blur_probs=(1.0, 0.1)), 'augment.view_blur_probs'),
    (dict(view_solarize_probs=(0.0, 0.2)), 'augment.view_solarize_probs'),
    (dict(resize_method='bilinear'), 'augment.resize_method'),
    (dict(blur_prob=1.5), 'augment.blur_prob'),
])
def test_unsupported_config_raises(overrides, bad):
  images = np.zeros((2, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=bad):
    augment_device.simclr_views(images, jax.random.key(0), num_views=2,
                                out_size=8, config_augment=_config(**overrides))


@pytest.mark.parametrize('shape,dtype', [((2, 8, 8, 2), np.uint8),
                                         ((8, 8, 3), np.uint8),
                                         ((2, 8, 8, 3), np.int32)])
def test_bad_images_raise(shape, dtype):
  with pytest.raises(ValueError, match='images'):
    augment_device.simclr_views(np.zeros(shape, dtype), jax.random.key(0),
                                num_views=2, out_size=8,
                                config_augment=_config())


def test_bench_subcommand_tiny(capsys):
  import json
  from jaxssl.bench import __main__ as bench
  code = bench.main(['augment', '--json', '--sizes', '8', '--batch', '4',
                     '--batches', '1', '--repeats', '1'])
  report = json.loads(capsys.readouterr().out)
  assert code == 0 and report['ok']
  assert report['device_impl'] == 'vectorized'  # 8 devices in this process
  (row,) = report['results']
  assert row['size'] == 8 and row['blur'] and row['batch'] == 4
  assert row['host_img_s'] > 0 and row['device_img_s'] > 0
  assert row['ratio'] == pytest.approx(row['device_img_s'] / row['host_img_s'])
  text = bench.augment.format_report(report)
  assert 'tf.data img/s' in text and 'device img/s' in text


def test_bench_stages_add_the_ops_one_by_one(capsys):
  import json
  from jaxssl.bench import __main__ as bench
  code = bench.main(['augment', '--json', '--sizes', '24', '--batch', '2',
                     '--batches', '1', '--repeats', '1', '--stages',
                     '--impl', 'sequential'])
  report = json.loads(capsys.readouterr().out)
  assert code == 0 and report['ok']
  assert report['device_impl'] == 'sequential'
  (row,) = report['results']
  stages = row['stages']
  assert [s['stage'] for s in stages] == [
      'crop + resize', '+ flip', '+ colour jitter', '+ grayscale', '+ blur']
  for s in stages:
    assert s['device_img_s'] > 0
    assert s['ms_per_view'] == pytest.approx(
        1e3 / (s['device_img_s'] * 2))
  assert 'ms/view' in bench.augment.format_report(report)
