"""The host half of every recipe (tf.data, TF ops): crop, resize, flip.

`crop_view(image, seed, view_index=, out_size=, config_augment=)` takes the
decoded ORIGINAL image (any size) and returns one view's random resized
crop (every multi-crop size), flipped with p = 0.5; the colour, grayscale,
blur and solarize steps run on the device, inside the jitted step
(`jaxssl.augment.device`), as in deepmind byol. Every random choice here is
stateless (`tf.random.stateless_*`) from an explicit seed of shape [2], so a
view is a pure function of `(image, seed)`. `center_crop` is the
evaluation crop.

Crop samplers:

The three official samplers draw a box from the same nominal law (area a
fraction of the image in `area_range`, aspect ratio width / height in
`aspect_range`) but differ in how, which changes the distribution:
- 'tf' (SimCLR): `tf.image.sample_distorted_bounding_box`, aspect uniform
  in the ratio, `min_object_covered=0.1` (so the area is at least 0.1 of the
  image), up to 100 attempts, then the whole image.
- 'byol' (BYOL): one draw, aspect log-uniform, width and height rounded and
  clamped to the image (no retry, no fallback), offset uniform.
- 'torchvision' (MoCo v2/v3, SwAV: `RandomResizedCrop`): up to 10 attempts
  with log-uniform aspect; the first that fits is used with a uniform
  offset; else a centre crop of the whole image clamped to the aspect range.
Rounding is Python's and TF's round-half-to-even in both; the draws are in
float32 here where torchvision uses float64.

References:
  google-research/simclr `data_util.crop_and_resize`; deepmind-research
  `byol/utils/dataset.py` (`_decode_and_random_crop`); torchvision
  `transforms.RandomResizedCrop.get_params`.
"""

import math

import ml_collections
import tensorflow as tf

from jaxssl.augment import recipes

TORCHVISION_ATTEMPTS = 10
CROP_PROPORTION = 0.875  # SimCLR's (and the standard ImageNet) eval crop.
SMALL_IMAGE_SIDE = 32  # At or below this side, eval takes no centre crop.


def num_channels(image: tf.Tensor) -> int:
  """The static channel count C of an [H, W, C] image; must be 1 or 3."""
  channels = image.shape[-1]
  if image.shape.rank != 3 or channels not in (1, 3):
    raise ValueError(f'image shape {image.shape} must be [H, W, C] with a '
                     'static C of 1 or 3')
  return channels


def sample_crop_box(image_shape: tf.Tensor, seed: tf.Tensor, *,
                    area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3)):
  """Samples SimCLR's random-resized-crop box ('tf' sampler).

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


def _draw_sides(seed, image_shape, area_range, aspect_range, num):
  """`num` candidate (h, w): area U[area_range], log-uniform aspect."""
  area_seed, ratio_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  height, width = image_shape[0], image_shape[1]
  area = tf.cast(height * width, tf.float32)
  target = tf.random.stateless_uniform(
      [num], area_seed, minval=area_range[0], maxval=area_range[1]) * area
  log_ratio = tf.random.stateless_uniform(
      [num], ratio_seed, minval=math.log(aspect_range[0]),
      maxval=math.log(aspect_range[1]))
  ratio = tf.exp(log_ratio)
  w = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
  return h, w


def _uniform_offset(seed, room):
  """An int32 uniform in [0, room] (room >= 0)."""
  return tf.random.stateless_uniform([], seed, minval=0, maxval=room + 1,
                                     dtype=tf.int32)


def sample_byol_crop_box(image_shape: tf.Tensor, seed: tf.Tensor, *,
                         area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3)):
  """Samples BYOL's crop box: one draw, clamped, no retry ('byol' sampler).

  Width and height are `round(sqrt(area * ratio))` and
  `round(sqrt(area / ratio))`, clamped to the image (and, here, to >= 1 px,
  which only matters for images of a few pixels); the offset is uniform.

  Args:
    image_shape: int tensor [3], `(H, W, C)`.
    seed: int tensor [2].
    area_range: bounds of the target area as a fraction of the image area.
    aspect_range: bounds of width / height, sampled log-uniformly.

  Returns:
    `(begin, size)`: int32 tensors [3] for `tf.slice`.

  References:
    deepmind-research `byol/utils/dataset.py` (`_decode_and_random_crop`).
  """
  side_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  image_shape = tf.cast(image_shape, tf.int32)
  h, w = _draw_sides(side_seed, image_shape, area_range, aspect_range, 1)
  h = tf.clip_by_value(h[0], 1, image_shape[0])
  w = tf.clip_by_value(w[0], 1, image_shape[1])
  top = _uniform_offset(top_seed, image_shape[0] - h)
  left = _uniform_offset(left_seed, image_shape[1] - w)
  return tf.stack([top, left, 0]), tf.stack([h, w, -1])


def sample_torchvision_crop_box(image_shape: tf.Tensor, seed: tf.Tensor, *,
                                area_range=(0.08, 1.0),
                                aspect_range=(3 / 4, 4 / 3)):
  """Samples torchvision's `RandomResizedCrop` box ('torchvision' sampler).

  Up to 10 attempts; an attempt fits when 0 < w <= W and 0 < h <= H, and
  the first fit gets a uniform offset. With no fit, the fallback is a
  centred crop: the whole image if its ratio is within `aspect_range`,
  else the full width (height `round(W / min_ratio)`) or the full height
  (width `round(H * max_ratio)`).

  Args:
    image_shape: int tensor [3], `(H, W, C)`.
    seed: int tensor [2].
    area_range: torchvision's `scale`.
    aspect_range: torchvision's `ratio`, sampled log-uniformly.

  Returns:
    `(begin, size)`: int32 tensors [3] for `tf.slice`.

  References:
    torchvision `transforms.RandomResizedCrop.get_params`.
  """
  side_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  image_shape = tf.cast(image_shape, tf.int32)
  height, width = image_shape[0], image_shape[1]
  h, w = _draw_sides(side_seed, image_shape, area_range, aspect_range,
                     TORCHVISION_ATTEMPTS)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))  # the first fitting attempt
  lo, hi = aspect_range
  fheight, fwidth = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  in_ratio = fwidth / fheight
  fallback_h = tf.where(in_ratio < lo,
                        tf.cast(tf.round(fwidth / lo), tf.int32), height)
  fallback_w = tf.where(in_ratio > hi,
                        tf.cast(tf.round(fheight * hi), tf.int32), width)
  found = tf.reduce_any(fits)
  h = tf.where(found, h[first], fallback_h)
  w = tf.where(found, w[first], fallback_w)
  top = tf.where(found, _uniform_offset(top_seed, height - h),
                 (height - h) // 2)
  left = tf.where(found, _uniform_offset(left_seed, width - w),
                  (width - w) // 2)
  return tf.stack([top, left, 0]), tf.stack([h, w, -1])


_SAMPLERS = {'tf': sample_crop_box, 'byol': sample_byol_crop_box,
             'torchvision': sample_torchvision_crop_box}


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, *, sampler: str,
                        area_range, aspect_range, out_size: int,
                        method: str, antialias: bool) -> tf.Tensor:
  """A random box of `image` resized to `out_size` x `out_size`.

  Args:
    image: float [H, W, C] (C static).
    seed: int tensor [2].
    sampler: 'tf' | 'byol' | 'torchvision' (module docstring).
    area_range: bounds of the crop area as a fraction of the image area.
    aspect_range: bounds of width / height.
    out_size: side of the square output.
    method: 'bicubic' or 'bilinear'.
    antialias: widen the filter when downscaling, as PIL does (torchvision
      recipes); `tf.image.resize` without it is SimCLR's and BYOL's.

  Returns:
    float [out_size, out_size, C], not clipped (bicubic overshoots).
  """
  if sampler not in _SAMPLERS:
    raise ValueError(f"unknown crop sampler '{sampler}'; known: "
                     f'{", ".join(recipes.CROP_SAMPLERS)}')
  if method not in recipes.RESIZE_METHODS:
    raise ValueError(f"unknown resize method '{method}'; known: "
                     f'{", ".join(recipes.RESIZE_METHODS)}')
  channels = num_channels(image)
  begin, size = _SAMPLERS[sampler](tf.shape(image), seed,
                                   area_range=area_range,
                                   aspect_range=aspect_range)
  image = tf.slice(image, begin, size)
  image = tf.image.resize(image, [out_size, out_size], method=method,
                          antialias=antialias)
  # The dynamic slice loses the static channel count the colour ops need.
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
  channels = num_channels(image)
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


def crop_view(image: tf.Tensor, seed: tf.Tensor, *, view_index: int,
              out_size: int,
              config_augment: ml_collections.ConfigDict) -> tf.Tensor:
  """The host half of one view: random resized crop of the original, flip.

  The crop is drawn on the decoded original image (not a resized copy), with
  the recipe's sampler and resize (`recipes.Laws`: PIL's antialiased resize
  for the torchvision recipes; BYOL and PIL clip after the resize, SimCLR
  does not, its colour steps clip later). The rest of the view is made on
  the device by `jaxssl.augment.device.finish_views`.

  Args:
    image: uint8 or float [H, W, C] (C = 1 or 3, static), any H and W; a
      float image must already be in [0, 1].
    seed: int32 or int64 tensor [2]; the view is a pure function of it.
    view_index: which view (`recipes.view_spec`); picks the crop area.
    out_size: side of the square output: `dataset.image_size` for a global
      view, `small_image_size` for a small one.
    config_augment: `config.augment`.

  Returns:
    float32 [out_size, out_size, C], in [0, 1] up to the bicubic overshoot
    of the SimCLR recipe.

  References:
    google-research/simclr `data_util.preprocess_for_train`;
    deepmind-research `byol/utils/dataset.py`; torchvision
    `RandomResizedCrop`, `RandomHorizontalFlip`.
  """
  c = config_augment
  laws = recipes.get_laws(c.recipe)
  spec = recipes.view_spec(c, view_index)
  if spec.small and out_size != c.small_image_size:
    raise ValueError(f'out_size={out_size} for small view {view_index}; '
                     f'must be augment.small_image_size={c.small_image_size}')
  channels = num_channels(image)
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  image = tf.image.convert_image_dtype(image, tf.float32)
  image = random_resized_crop(
      image, crop_seed, sampler=c.crop_sampler, area_range=spec.crop_area,
      aspect_range=c.crop_aspect, out_size=out_size, method=c.resize_method,
      antialias=laws.antialias)
  if laws.clip_after_resize:
    image = tf.clip_by_value(image, 0.0, 1.0)
  if c.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return tf.ensure_shape(image, [out_size, out_size, channels])
