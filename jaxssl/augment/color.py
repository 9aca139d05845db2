"""Colour ops of the recipes: brightness, jitter, grayscale, solarize.

Two laws of colour jitter are implemented, because the official code bases
differ in how contrast and saturation move an image:
- 'tf' (SimCLR `tf.image`, and BYOL's JAX port of the same ops): contrast
  scales each channel about its own spatial mean; saturation scales S in HSV
  and clips it to [0, 1]; grayscale uses `tf.image.rgb_to_grayscale`'s luma
  (0.2989, 0.587, 0.114).
- 'torchvision' (MoCo v2/v3 and SwAV, `transforms.ColorJitter` on PIL
  images): contrast blends with the image-wide mean of the luma; saturation
  blends with the per-pixel luma; grayscale uses PIL's luma
  (0.299, 0.587, 0.114). Factors are drawn from U[max(0, 1 - x), 1 + x].
Both shift hue in HSV by U[-h, h] and apply the four ops in a uniformly
random order, clipping to [0, 1] after each (PIL's uint8 images clip
implicitly). jaxssl works in float32, so PIL's rounding to uint8 after every
op, and its integer-rounded contrast mean, are not reproduced.

References:
  google-research/simclr `data_util.color_jitter_rand`; deepmind-research
  `byol/utils/augmentations.py`; torchvision `transforms.ColorJitter`,
  `functional_pil.adjust_{brightness,contrast,saturation,hue}`; Pillow
  `ImageEnhance`.
"""

import tensorflow as tf

BRIGHTNESS_MODES = ('multiplicative', 'additive')
JITTER_LAWS = ('tf', 'torchvision')
TF_LUMA = (0.2989, 0.587, 0.114)  # tf.image.rgb_to_grayscale
PIL_LUMA = (0.299, 0.587, 0.114)  # PIL Image.convert('L'), ITU-R 601-2
# SimCLR's contrast and saturation factors are U[1 - 0.8 s, 1 + 0.8 s], which
# tf.image only accepts for a non-negative lower bound (the official code
# fails beyond too).
MAX_COLOR_STRENGTH = 1.25


def num_channels(image: tf.Tensor) -> int:
  """The static channel count C of an [H, W, C] image; must be 1 or 3."""
  channels = image.shape[-1]
  if image.shape.rank != 3 or channels not in (1, 3):
    raise ValueError(f'image shape {image.shape} must be [H, W, C] with a '
                     'static C of 1 or 3')
  return channels


def random_brightness(image: tf.Tensor, seed: tf.Tensor, *, max_delta: float,
                      mode: str = 'multiplicative') -> tf.Tensor:
  """Brightness jitter (no clipping; the caller clips).

  Args:
    image: float [H, W, C].
    seed: int tensor [2].
    max_delta: b, the brightness strength (SimCLR: 0.8 s).
    mode: 'multiplicative' (SimCLR v2, torchvision: x * U[max(1 - b, 0),
      1 + b]) or 'additive' (SimCLR v1, BYOL: x + U[-b, b]).

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


def luma(image: tf.Tensor, weights=TF_LUMA) -> tf.Tensor:
  """The weighted sum of R, G, B: float [H, W, 1] (identity for C=1)."""
  if num_channels(image) == 1:
    return image
  if weights == TF_LUMA:
    return tf.image.rgb_to_grayscale(image)
  return tf.tensordot(image, tf.constant(weights, image.dtype), 1)[..., None]


def to_grayscale(image: tf.Tensor, *, law: str = 'tf') -> tf.Tensor:
  """Luma tiled back to 3 channels (identity for C=1).

  Args:
    image: float [H, W, C].
    law: 'tf' (weights 0.2989, 0.587, 0.114) or 'torchvision' (PIL's 0.299,
      0.587, 0.114).

  Returns:
    float [H, W, C].
  """
  if num_channels(image) == 1:
    return image
  return tf.tile(luma(image, _luma_weights(law)), [1, 1, 3])


def _luma_weights(law: str):
  if law not in JITTER_LAWS:
    raise ValueError(f"unknown colour law '{law}'; known: "
                     f'{", ".join(JITTER_LAWS)}')
  return TF_LUMA if law == 'tf' else PIL_LUMA


def solarize(image: tf.Tensor, *, threshold: float) -> tf.Tensor:
  """Inverts the pixels at or above `threshold`: x < t ? x : 1 - x.

  BYOL uses t = 0.5 on [0, 1] floats; PIL's `ImageOps.solarize` (MoCo v3)
  inverts uint8 values >= 128, i.e. t = 128 / 255 on [0, 1].
  """
  return tf.where(image < threshold, image, 1.0 - image)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, *, strength: float,
                 brightness: str = 'multiplicative') -> tf.Tensor:
  """SimCLR's jitter of strength s: (0.8 s, 0.8 s, 0.8 s, 0.2 s), 'tf' law.

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
  strengths = (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
  return jitter_colors(image, seed, strengths=strengths, brightness=brightness,
                       law='tf')


def _tv_factor(seed, strength):
  return tf.random.stateless_uniform([], seed, minval=max(1.0 - strength, 0.0),
                                     maxval=1.0 + strength)


def _jitter_ops(strengths, brightness, law, seeds):
  """The four ops `x -> x'` of a jitter law, each with its own seed."""
  b, c, s, h = strengths
  bright = lambda x: random_brightness(x, seeds[0], max_delta=b,
                                       mode=brightness)
  hue = lambda x: tf.image.stateless_random_hue(x, h, seeds[3])
  if law == 'tf':
    contrast = lambda x: tf.image.stateless_random_contrast(x, 1 - c, 1 + c,
                                                            seeds[1])
    saturation = lambda x: tf.image.stateless_random_saturation(
        x, 1 - s, 1 + s, seeds[2])
    return [bright, contrast, saturation, hue]

  def contrast(x):
    f = _tv_factor(seeds[1], c)
    return f * x + (1.0 - f) * tf.reduce_mean(luma(x, PIL_LUMA))

  def saturation(x):
    f = _tv_factor(seeds[2], s)
    return f * x + (1.0 - f) * luma(x, PIL_LUMA)

  return [bright, contrast, saturation, hue]


def jitter_colors(image: tf.Tensor, seed: tf.Tensor, *, strengths,
                  brightness: str, law: str) -> tf.Tensor:
  """Brightness, contrast, saturation and hue in a random order, clipped.

  The order is a uniform random permutation of the four ops and the image
  is clipped to [0, 1] after each one. An op of strength 0 is skipped, as in
  the official code; for C=1 saturation and hue have nothing to act on.

  Args:
    image: float [H, W, C] in [0, 1].
    seed: int tensor [2].
    strengths: (b, c, s, h): brightness, contrast and saturation strengths
      (factors from U[1 - x, 1 + x]) and the hue shift bound (U[-h, h] of a
      full turn, h <= 0.5).
    brightness: 'multiplicative' or 'additive' (see `random_brightness`).
    law: 'tf' or 'torchvision' (module docstring).

  Returns:
    float [H, W, C] in [0, 1].

  References:
    google-research/simclr `data_util.color_jitter_rand`; torchvision
    `transforms.ColorJitter`.
  """
  channels = num_channels(image)
  _luma_weights(law)  # checks the law
  order_seed, *op_seeds = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  b, c, s, h = strengths
  ops = _jitter_ops(strengths, brightness, law, op_seeds)
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
