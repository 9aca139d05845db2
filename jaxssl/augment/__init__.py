"""Host-side image augmentations (tf.image, stateless) at the official parameters.

Every random choice is drawn with a stateless op (`tf.random.stateless_*`,
`tf.image.stateless_*`) from an explicit `seed` of shape [2], so a view is a
pure function of `(image, seed)`: the input pipeline derives the seed from
`(config.seed, shard, epoch, position, view)` and a resumed run sees exactly
the views an uninterrupted run would.

Images are float32 in [0, 1] throughout (SimCLR feeds [0, 1] pixels to the
network; there is no mean/std normalisation). Both colour (C=3) and grey
(C=1) images are accepted; for C=1, saturation, hue and grayscale conversion
have nothing to act on and are skipped, while brightness and contrast apply.

Differences from google-research/simclr, on purpose:
- Blur runs on the host, per image: SimCLR blurs on the device with one
  sigma per view-batch and replica, and a per-example Bernoulli selector.
  Here each image gets its own Bernoulli(blur_prob) draw and its own sigma
  from the same U[blur_sigma] law, with the same kernel (H // 10 wide,
  radius int(size / 2), zero padding).
- The eval centre crop is skipped when the output is <= 32 px (as SimCLR
  does for CIFAR) and also when the source's shorter side is <= 32 px
  (MNIST-like images), which have no border to spare.
- Only the random draws differ from TF's stateful ops; the laws are the same.

References:
  Chen et al., A Simple Framework for Contrastive Learning of Visual
  Representations (SimCLR), ICML 2020, Appendix A.
  google-research/simclr `tf2/data_util.py` (`preprocess_for_train`,
  `color_jitter_rand`, `center_crop`, `gaussian_blur`).
"""

from typing import Callable

import ml_collections
import tensorflow as tf

CROP_PROPORTION = 0.875  # SimCLR's (and the standard ImageNet) eval crop.
SMALL_IMAGE_SIDE = 32  # At or below this side, eval takes no centre crop.
BRIGHTNESS_MODES = ('multiplicative', 'additive')
# contrast and saturation use factors U[1 - 0.8 s, 1 + 0.8 s], which TF only
# accepts for a non-negative lower bound; the official code fails beyond too.
MAX_COLOR_STRENGTH = 1.25

ViewFn = Callable[..., tf.Tensor]


def check_config(config_augment: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad `config.augment` value.

  Args:
    config_augment: the `config.augment` block (keys listed in
      `simclr_view`, plus recipe and num_views).
  """
  c = config_augment
  get_recipe(c.recipe)
  if c.num_views < 1:
    raise ValueError(f'augment.num_views={c.num_views} must be >= 1')
  _check_interval('augment.crop_area', c.crop_area, 0.0, 1.0)
  _check_interval('augment.crop_aspect', c.crop_aspect, 0.0, float('inf'))
  _check_interval('augment.blur_sigma', c.blur_sigma, 0.0, float('inf'))
  for key in ('color_prob', 'grayscale_prob', 'blur_prob'):
    if not 0.0 <= c[key] <= 1.0:
      raise ValueError(f'augment.{key}={c[key]} must be a probability in '
                       '[0, 1]')
  if not 0.0 <= c.color_strength <= MAX_COLOR_STRENGTH:
    raise ValueError(f'augment.color_strength={c.color_strength} must be in '
                     f'[0, {MAX_COLOR_STRENGTH}] (contrast and saturation '
                     'factors 1 - 0.8 s must stay >= 0)')
  if c.brightness not in BRIGHTNESS_MODES:
    raise ValueError(f"unknown augment.brightness '{c.brightness}'; known: "
                     f'{", ".join(BRIGHTNESS_MODES)}')


def _check_interval(name, value, low, high):
  lo, hi = value
  if not low < lo <= hi or (hi > high):
    raise ValueError(f'{name}={tuple(value)} must satisfy {low} < lo <= hi '
                     f'<= {high}')


def _num_channels(image: tf.Tensor) -> int:
  channels = image.shape[-1]
  if image.shape.rank != 3 or channels not in (1, 3):
    raise ValueError(f'image shape {image.shape} must be [H, W, C] with a '
                     'static C of 1 or 3')
  return channels


def _coin(seed: tf.Tensor, p: float) -> tf.Tensor:
  """A boolean that is True with probability p (SimCLR's `random_apply`)."""
  return tf.random.stateless_uniform([], seed) < p


def sample_crop_box(image_shape: tf.Tensor, seed: tf.Tensor, *,
                    area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3)):
  """Samples SimCLR's random-resized-crop box.

  `tf.image.sample_distorted_bounding_box` with the whole image as the box,
  `min_object_covered=0.1`, 100 attempts, aspect (width / height) uniform in
  `aspect_range` and area fraction in `area_range`; after 100 failures it
  returns the whole image.

  Args:
    image_shape: int tensor [3], `(H, W, C)` of the source image.
    seed: int tensor [2].
    area_range: bounds of the crop area as a fraction of the image area.
    aspect_range: bounds of the crop aspect ratio width / height.

  Returns:
    `(begin, size)`: int32 tensors [3] for `tf.slice`.

  References:
    google-research/simclr `data_util.crop_and_resize`.
  """
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=whole_image, seed=seed,
      min_object_covered=0.1, aspect_ratio_range=tuple(aspect_range),
      area_range=tuple(area_range), max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return begin, size


def random_brightness(image: tf.Tensor, seed: tf.Tensor, *, max_delta: float,
                      mode: str = 'multiplicative') -> tf.Tensor:
  """SimCLR's brightness jitter (no clipping; the caller clips).

  Args:
    image: float [H, W, C].
    seed: int tensor [2].
    max_delta: 0.8 * s.
    mode: 'multiplicative' (SimCLR v2: x * U[max(1 - d, 0), 1 + d]) or
      'additive' (SimCLR v1: x + U[-d, d]).

  Returns:
    float [H, W, C].
  """
  if mode == 'multiplicative':
    factor = tf.random.stateless_uniform(
        [], seed, minval=max(1.0 - max_delta, 0.0), maxval=1.0 + max_delta)
    return image * factor
  if mode == 'additive':
    return tf.image.stateless_random_brightness(image, max_delta, seed)
  raise ValueError(f"unknown brightness mode '{mode}'; known: "
                   f'{", ".join(BRIGHTNESS_MODES)}')


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """ITU-R 601 luma, tiled back to 3 channels (identity for C=1)."""
  if _num_channels(image) == 1:
    return image
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def color_jitter(image: tf.Tensor, seed: tf.Tensor, *, strength: float,
                 brightness: str = 'multiplicative') -> tf.Tensor:
  """Brightness, contrast, saturation and hue in a random order, clipped.

  Strengths are (0.8 s, 0.8 s, 0.8 s, 0.2 s); the order is a uniform random
  permutation of the four ops and the image is clipped to [0, 1] after each
  one. An op with strength 0 is skipped, as in the official code.

  Args:
    image: float [H, W, C] in [0, 1].
    seed: int tensor [2].
    strength: s, SimCLR's `color_jitter_strength`.
    brightness: 'multiplicative' (v2) or 'additive' (v1).

  Returns:
    float [H, W, C] in [0, 1].

  References:
    google-research/simclr `data_util.color_jitter_rand`.
  """
  channels = _num_channels(image)
  order_seed, *op_seeds = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
  ops = [
      lambda x: random_brightness(x, op_seeds[0], max_delta=b,
                                  mode=brightness),
      lambda x: tf.image.stateless_random_contrast(x, 1 - c, 1 + c,
                                                   op_seeds[1]),
      lambda x: tf.image.stateless_random_saturation(x, 1 - s, 1 + s,
                                                     op_seeds[2]),
      lambda x: tf.image.stateless_random_hue(x, h, op_seeds[3]),
  ]
  active = [b > 0, c > 0, s > 0 and channels == 3, h > 0 and channels == 3]
  ops = [op if on else (lambda x: x) for op, on in zip(ops, active)]
  order = tf.random.experimental.stateless_shuffle(tf.range(4), order_seed)
  shape = image.shape

  def apply_next(i, x):
    # One switch in a loop rather than four unrolled ones: a quarter of the
    # graph, which makes tracing the input pipeline noticeably faster.
    x = tf.switch_case(order[i], [lambda op=op: op(x) for op in ops])
    return i + 1, tf.ensure_shape(tf.clip_by_value(x, 0.0, 1.0), shape)

  _, image = tf.while_loop(lambda i, _: i < 4, apply_next,
                           (tf.constant(0), image))
  return image


def gaussian_blur(image: tf.Tensor, *, kernel_size: int,
                  sigma: tf.Tensor) -> tf.Tensor:
  """Separable Gaussian blur with zero ('SAME') padding, as SimCLR.

  Args:
    image: float [H, W, C].
    kernel_size: nominal size; the kernel has 2 * int(kernel_size / 2) + 1
      taps (SimCLR passes H // 10: 23 taps at 224 px).
    sigma: float scalar, the Gaussian's standard deviation in pixels.

  Returns:
    float [H, W, C], not clipped.

  References:
    google-research/simclr `data_util.gaussian_blur`.
  """
  radius = int(kernel_size / 2)
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  taps = tf.exp(-tf.square(x) / (2.0 * tf.square(tf.cast(sigma, tf.float32))))
  taps /= tf.reduce_sum(taps)
  channels = _num_channels(image)
  kernel_h = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, channels, 1])
  kernel_v = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, channels, 1])
  out = tf.nn.depthwise_conv2d(image[None], kernel_h, [1, 1, 1, 1], 'SAME')
  out = tf.nn.depthwise_conv2d(out, kernel_v, [1, 1, 1, 1], 'SAME')
  return out[0]


def simclr_view(image: tf.Tensor, seed: tf.Tensor, *, out_size: int,
                config_augment: ml_collections.ConfigDict) -> tf.Tensor:
  """One SimCLR view of one image: crop, flip, colour, grayscale, blur.

  Args:
    image: uint8 or float [H, W, C] (C = 1 or 3, static), any H and W; a
      float image must already be in [0, 1].
    seed: int32 or int64 tensor [2]; the view is a pure function of it.
    out_size: side of the square output.
    config_augment: `config.augment` (crop_area, crop_aspect, flip,
      color_strength, color_prob, grayscale_prob, blur_prob, blur_sigma,
      brightness).

  Returns:
    float32 [out_size, out_size, C] in [0, 1].

  References:
    google-research/simclr `data_util.preprocess_for_train` and
    `batch_random_blur`; SimCLR paper Appendix A.
  """
  c = config_augment
  channels = _num_channels(image)
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 7))
  image = tf.image.convert_image_dtype(image, tf.float32)
  begin, size = sample_crop_box(tf.shape(image), seeds[0],
                                area_range=c.crop_area,
                                aspect_range=c.crop_aspect)
  image = tf.slice(image, begin, size)
  image = tf.image.resize(image, [out_size, out_size],
                          method=tf.image.ResizeMethod.BICUBIC)
  # The dynamic slice and the flip lose the static channel count, which the
  # colour ops need.
  image = tf.ensure_shape(image, [out_size, out_size, channels])
  if c.flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    image = tf.ensure_shape(image, [out_size, out_size, channels])
  if c.color_prob > 0 and c.color_strength > 0:
    image = tf.cond(
        _coin(seeds[2], c.color_prob),
        lambda: color_jitter(image, seeds[3], strength=c.color_strength,
                             brightness=c.brightness),
        lambda: image)
  if c.grayscale_prob > 0 and channels == 3:
    image = tf.cond(_coin(seeds[4], c.grayscale_prob),
                    lambda: to_grayscale(image), lambda: image)
  image = tf.clip_by_value(image, 0.0, 1.0)
  if c.blur_prob > 0:
    sigma = tf.random.stateless_uniform([], seeds[6], minval=c.blur_sigma[0],
                                        maxval=c.blur_sigma[1])
    image = tf.cond(
        _coin(seeds[5], c.blur_prob),
        lambda: gaussian_blur(image, kernel_size=out_size // 10, sigma=sigma),
        lambda: image)
    image = tf.clip_by_value(image, 0.0, 1.0)
  return tf.ensure_shape(image, [out_size, out_size, channels])


def center_crop(image: tf.Tensor, *, out_size: int,
                crop_fraction: float = CROP_PROPORTION) -> tf.Tensor:
  """SimCLR's evaluation crop: aspect-preserving centre crop, bicubic resize.

  The crop keeps `crop_fraction` of the shorter side (a square, since the
  output is square), offset `((side - crop) + 1) // 2`. Small images are not
  cropped, only resized: the official code skips the crop when the output
  is <= 32 px (CIFAR); we also skip it when the source's shorter side is
  <= 32 px (MNIST-like), whose few pixels have no border to spare.

  Args:
    image: uint8 or float [H, W, C] in [0, 1], C = 1 or 3.
    out_size: side of the square output.
    crop_fraction: fraction of the shorter side kept.

  Returns:
    float32 [out_size, out_size, C] in [0, 1].

  References:
    google-research/simclr `data_util.center_crop`, `data.get_preprocess_fn`.
  """
  channels = _num_channels(image)
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f'crop_fraction={crop_fraction} must be in (0, 1]')
  image = tf.image.convert_image_dtype(image, tf.float32)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short = tf.minimum(height, width)
  crop = tf.cast(tf.math.rint(crop_fraction * tf.cast(short, tf.float32)),
                 tf.int32)
  if out_size <= SMALL_IMAGE_SIDE:
    crop_h, crop_w = height, width
  else:
    skip = short <= SMALL_IMAGE_SIDE
    crop_h = tf.where(skip, height, crop)
    crop_w = tf.where(skip, width, crop)
  image = tf.slice(image, [(height - crop_h + 1) // 2,
                           (width - crop_w + 1) // 2, 0],
                   [crop_h, crop_w, channels])
  image = tf.image.resize(image, [out_size, out_size],
                          method=tf.image.ResizeMethod.BICUBIC)
  image = tf.clip_by_value(image, 0.0, 1.0)
  return tf.ensure_shape(image, [out_size, out_size, channels])


RECIPES: dict[str, ViewFn] = {
    'simclr': simclr_view,
}


def get_recipe(name: str) -> ViewFn:
  """Returns the view function registered under `name` in `RECIPES`."""
  if name not in RECIPES:
    raise ValueError(f"unknown augment recipe '{name}'; known: "
                     f'{", ".join(sorted(RECIPES))}')
  return RECIPES[name]
