"""Gaussian blurs of the recipes: SimCLR/BYOL's kernel and PIL's box blur.

- `gaussian_blur`: SimCLR's and BYOL's separable Gaussian with a kernel of
  about a tenth of the image side and zero ('SAME') padding.
- `pil_gaussian_blur`: what `PIL.ImageFilter.GaussianBlur(radius=sigma)`
  computes (MoCo v2/v3 and SwAV): three passes of an "extended" box blur per
  axis, whose fractional radius makes the total variance exactly sigma^2
  (Gwosdek et al. 2011), with edge pixels repeated at the borders. It is
  reproduced in float32; PIL rounds to uint8 after every pass.

References:
  google-research/simclr `data_util.gaussian_blur`; deepmind-research
  `byol/utils/augmentations.py` (`_gaussian_blur_single_image`); Pillow
  `src/libImaging/BoxBlur.c` (`_gaussian_blur_radius`, `ImagingBoxBlur`);
  Gwosdek, Grewenig, Bruhn and Weickert, Theoretical Foundations of
  Gaussian Convolution by Extended Box Filtering, SSVM 2011.
"""

import math

import tensorflow as tf

from jaxssl.augment import color

PIL_BLUR_PASSES = 3


def gaussian_blur(image: tf.Tensor, *, kernel_size: int,
                  sigma: tf.Tensor) -> tf.Tensor:
  """Separable Gaussian blur with zero ('SAME') padding, as SimCLR.

  Args:
    image: float [H, W, C].
    kernel_size: nominal size; the kernel has 2 * int(kernel_size / 2) + 1
      taps (SimCLR passes H // 10 and BYOL H / 10: both 23 taps at 224 px).
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
  channels = color.num_channels(image)
  kernel_h = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, channels, 1])
  kernel_v = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, channels, 1])
  out = tf.nn.depthwise_conv2d(image[None], kernel_h, [1, 1, 1, 1], 'SAME')
  out = tf.nn.depthwise_conv2d(out, kernel_v, [1, 1, 1, 1], 'SAME')
  return out[0]


def pil_box_radius(sigma, passes: int = PIL_BLUR_PASSES):
  """PIL's extended box radius `(l, a)` for a Gaussian of std `sigma`.

  A box of integer half-width l plus end taps of weight a in [0, 1) at
  +-(l + 1) has variance sigma^2 / passes, so `passes` of them have
  variance sigma^2.

  Args:
    sigma: float scalar (tensor or Python float).
    passes: number of box passes per axis.

  Returns:
    `(l, a)`: float32 scalars, l integer-valued.
  """
  sigma = tf.cast(sigma, tf.float32)
  sigma2 = sigma * sigma / passes
  box_length = tf.sqrt(12.0 * sigma2 + 1.0)
  l = tf.floor((box_length - 1.0) / 2.0)
  a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2)
  a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0))
  return l, a


def _max_half_width(max_sigma: float, passes: int) -> int:
  # +1 for the end taps, +1 against float32 rounding at an integer boundary.
  l = math.floor((math.sqrt(12.0 * max_sigma**2 / passes + 1.0) - 1.0) / 2.0)
  return l + 2


def _box_pass(image: tf.Tensor, weights: tf.Tensor, half: int,
              axis: int) -> tf.Tensor:
  """One 1-D box pass along `axis` (0 = rows, 1 = columns), edges repeated."""
  size = tf.shape(image)[axis]
  index = tf.clip_by_value(tf.range(-half, size + half), 0, size - 1)
  padded = tf.gather(image, index, axis=axis)
  channels = image.shape[-1]
  shape = [1, 2 * half + 1, 1, 1] if axis == 1 else [2 * half + 1, 1, 1, 1]
  kernel = tf.tile(tf.reshape(weights, shape), [1, 1, channels, 1])
  return tf.nn.depthwise_conv2d(padded[None], kernel, [1, 1, 1, 1],
                                'VALID')[0]


def pil_gaussian_blur(image: tf.Tensor, *, sigma: tf.Tensor,
                      max_sigma: float,
                      passes: int = PIL_BLUR_PASSES) -> tf.Tensor:
  """`PIL.ImageFilter.GaussianBlur(radius=sigma)` in float32.

  Three extended-box passes along the width, then three along the height,
  each repeating the edge pixels beyond the border (so a constant image
  stays constant, unlike zero padding).

  Args:
    image: float [H, W, C].
    sigma: float scalar, the blur's standard deviation in pixels (PIL's
      `radius`), in (0, max_sigma].
    max_sigma: static upper bound of sigma; fixes the number of taps.
    passes: box passes per axis (PIL: 3).

  Returns:
    float [H, W, C], a convex combination of input pixels.

  References:
    Pillow `src/libImaging/BoxBlur.c`.
  """
  color.num_channels(image)
  half = _max_half_width(max_sigma, passes)
  l, a = pil_box_radius(sigma, passes)
  offset = tf.abs(tf.range(-half, half + 1, dtype=tf.float32))
  weights = tf.where(offset <= l, 1.0, tf.where(offset == l + 1.0, a, 0.0))
  weights /= 2.0 * (l + a) + 1.0
  shape = image.shape
  for axis in (1, 0):
    for _ in range(passes):
      image = tf.ensure_shape(_box_pass(image, weights, half, axis), shape)
  return image
