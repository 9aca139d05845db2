"""On-device SimCLR augmentation: uint8 images to views, in JAX, under jit.

Only the SimCLR recipe (`augment.recipe = 'simclr'`, TF crop sampler,
bicubic resize, no multi-crop, no per-view blur or solarize tuples) is
implemented; `check_supported` rejects anything else before tracing. It is
the host recipe (`jaxssl.augment.simclr_view`) written so that a whole batch
of views is one fused XLA program:
- every random draw comes from the per-example key `fold_in(rng, n)`, n the
  example's index in the global batch, then `fold_in(., view)`; a batch
  sharded over 8 devices therefore gives exactly the views of 1 device;
- crop box, crop + bicubic resize as banded matrix products: `crops`;
- colour jitter in random order, grayscale: `color`; blur: `blur`.

Blur, a choice: each example draws its own Bernoulli(blur_prob) and its own
sigma from U[blur_sigma], as the host path does. The official code draws one
sigma per view-batch and replica, which would make the views depend on the
sharding; the law of a single view is the same.

Every other law (crop, flip 0.5, jitter p with random order and a clip after
each op, grayscale p, strengths, brightness mode, C=1 handling) is the host
path's. The random streams differ from the host's (JAX keys, not TF
stateless seeds): the two paths agree in distribution, not pixel for pixel.

References:
  Chen et al., A Simple Framework for Contrastive Learning of Visual
  Representations (SimCLR), ICML 2020, Appendix A.
  google-research/simclr `tf2/data_util.py`.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import augment
from jaxssl.augment_device import blur
from jaxssl.augment_device import color
from jaxssl.augment_device import crops

UINT8_SCALE = np.float32(1.0 / 255.0)  # tf.image.convert_image_dtype


def check_supported(config_augment: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError for what the device path does not do.

  Args:
    config_augment: `config.augment`; checked with `augment.check_config`
      first, then for the SimCLR recipe's options.
  """
  c = config_augment
  augment.check_config(c)
  required = (('recipe', 'simclr'), ('crop_sampler', 'tf'),
              ('resize_method', 'bicubic'), ('num_small_views', 0),
              ('view_blur_probs', ()), ('view_solarize_probs', ()))
  for key, allowed in required:
    value = tuple(c[key]) if isinstance(allowed, tuple) else c[key]
    if value != allowed:
      raise ValueError(f'augment.{key}={value!r} is not supported on device '
                       f'(augment.on_device implements only the SimCLR '
                       f'recipe: {key}={allowed!r})')


def _jitter_on(c: ml_collections.ConfigDict) -> bool:
  return c.color_prob > 0 and any(x > 0 for x in augment.jitter_strengths(c))


def sample_view_params(key: jax.Array, *, height: int, width: int,
                       channels: int,
                       config_augment: ml_collections.ConfigDict) -> dict:
  """Draws every random choice of one view.

  Args:
    key: PRNG key of the view.
    height: H of the source image (static).
    width: W of the source image (static).
    channels: C of the source image, 1 or 3 (static).
    config_augment: `config.augment` (crop_area, crop_aspect, flip,
      color_strength or color_jitter, color_prob, grayscale_prob, blur_prob,
      blur_sigma, brightness).

  Returns:
    A dict of scalars (and the int32 [4] box `(y, x, h, w)`, int32 [4]
    jitter order): box, flip, jitter, order, brightness, contrast,
    saturation, hue, grayscale, blur, sigma. Disabled ops draw False.

  References:
    google-research/simclr `data_util.preprocess_for_train`,
    `color_jitter_rand` (strengths 0.8 s, 0.8 s, 0.8 s, 0.2 s, or
    `augment.color_jitter`).
  """
  c = config_augment
  keys = jax.random.split(key, 11)
  b, con, sat, hue = augment.jitter_strengths(c)
  if c.brightness == 'multiplicative':
    bright_range = (max(1.0 - b, 0.0), 1.0 + b)
  else:
    bright_range = (-b, b)
  coin = lambda k, p: jax.random.bernoulli(k, p) if p > 0 else jnp.bool_(False)
  uniform = lambda k, r: jax.random.uniform(k, (), minval=r[0], maxval=r[1])
  return {
      'box': crops.sample_crop_box(keys[0], height=height, width=width,
                                   area_range=tuple(c.crop_area),
                                   aspect_range=tuple(c.crop_aspect)),
      'flip': coin(keys[1], 0.5 if c.flip else 0.0),
      'jitter': coin(keys[2], c.color_prob if _jitter_on(c) else 0.0),
      'order': jax.random.permutation(keys[3], 4).astype(jnp.int32),
      'brightness': uniform(keys[4], bright_range),
      'contrast': uniform(keys[5], (1.0 - con, 1.0 + con)),
      'saturation': uniform(keys[6], (1.0 - sat, 1.0 + sat)),
      'hue': uniform(keys[7], (-hue, hue)),
      'grayscale': coin(keys[8], c.grayscale_prob if channels == 3 else 0.0),
      'blur': coin(keys[9], c.blur_prob),
      'sigma': uniform(keys[10], tuple(c.blur_sigma)),
  }


def apply_view(image: jax.Array, params: dict, *, out_size: int,
               config_augment: ml_collections.ConfigDict) -> jax.Array:
  """One view of one image from its drawn parameters.

  Crop + bicubic resize, flip, jitter, grayscale, clip, blur, clip: the
  host recipe's order.

  Args:
    image: float32 [C, H, W] (channels first) in [0, 1].
    params: from `sample_view_params`.
    out_size: side of the square view (static).
    config_augment: `config.augment`; disabled ops are left out statically.

  Returns:
    float32 [C, out_size, out_size] in [0, 1].
  """
  c = config_augment
  view = crops.resize_crop(image, params['box'], out_size=out_size)
  if c.flip:
    view = jnp.where(params['flip'], view[:, :, ::-1], view)
  if _jitter_on(c):
    jittered = color.color_jitter(view, params, brightness=c.brightness)
    view = jnp.where(params['jitter'], jittered, view)
  if c.grayscale_prob > 0 and image.shape[0] == 3:
    view = jnp.where(params['grayscale'], color.to_grayscale(view), view)
  view = jnp.clip(view, 0.0, 1.0)
  if c.blur_prob > 0:
    blurred = jnp.clip(blur.gaussian_blur(view, params['sigma']), 0.0, 1.0)
    view = jnp.where(params['blur'], blurred, view)
  return view


def _to_float(images: jax.Array, num_views: int, out_size: int) -> jax.Array:
  """Checks the arguments (before tracing) and converts to [0, 1] floats,
  channels first: [N, C, H, W]."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images shape {images.shape} must be [N, H, W, C] with '
                     'C = 1 or 3')
  if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype,
                                                       jnp.floating):
    raise ValueError(f'images dtype {images.dtype} must be uint8 or a float '
                     'type in [0, 1]')
  if num_views < 1:
    raise ValueError(f'num_views={num_views} must be >= 1')
  if out_size < 1:
    raise ValueError(f'out_size={out_size} must be >= 1')
  images = jnp.transpose(images, (0, 3, 1, 2))
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) * UINT8_SCALE
  return images.astype(jnp.float32)


def simclr_views(images: jax.Array, rng: jax.Array, *, num_views: int,
                 out_size: int,
                 config_augment: ml_collections.ConfigDict) -> jax.Array:
  """SimCLR views of a batch, on device; pure and jit-able.

  Example n's view v uses the key `fold_in(fold_in(rng, n), v)`, so a view
  depends only on `(rng, n, v, image)`: not on the batch's sharding, nor on
  the other examples. Call it inside a jitted step on the global batch.

  Args:
    images: uint8 (or float in [0, 1]) [N, H, W, C], C = 1 or 3; the global
      batch, sharded or not.
    rng: PRNG key (typed, or raw uint32 [2]); e.g. the step's key.
    num_views: V, views per image (static).
    out_size: side of the square views (static).
    config_augment: `config.augment` (see `sample_view_params`).

  Returns:
    float32 [N, V, out_size, out_size, C] in [0, 1], sharded like `images`
    along N.

  References:
    google-research/simclr `data_util.preprocess_for_train`,
    `batch_random_blur`; SimCLR paper Appendix A.
  """
  images = _to_float(images, num_views, out_size)
  check_supported(config_augment)
  n, channels, height, width = images.shape
  example_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))
  views = jnp.arange(num_views)

  def one_view(image, key):
    params = sample_view_params(key, height=height, width=width,
                                channels=channels,
                                config_augment=config_augment)
    return apply_view(image, params, out_size=out_size,
                      config_augment=config_augment)

  def one_example(image, key):
    keys = jax.vmap(lambda v: jax.random.fold_in(key, v))(views)
    return jax.vmap(one_view, in_axes=(None, 0))(image, keys)

  out = jax.vmap(one_example)(images, example_keys)
  return jnp.transpose(out, (0, 1, 3, 4, 2))


def identity_views(images: jax.Array, *, num_views: int,
                   out_size: int) -> jax.Array:
  """Augmentation off: every view is the whole image, resized if needed.

  The image is converted to [0, 1] floats (`tf.image.convert_image_dtype`:
  uint8 times float32(1/255)) and, when its size differs from `out_size`,
  resized whole (bicubic) and clipped; when it is already `out_size` square,
  the view is exactly the converted image.

  Args:
    images: uint8 (or float in [0, 1]) [N, H, W, C], C = 1 or 3.
    num_views: V (static).
    out_size: side of the square views (static).

  Returns:
    float32 [N, V, out_size, out_size, C].
  """
  images = _to_float(images, num_views, out_size)
  n, channels, height, width = images.shape
  if (height, width) != (out_size, out_size):
    whole = jnp.array([0, 0, height, width], jnp.int32)
    images = jax.vmap(lambda x: crops.resize_crop(x, whole, out_size=out_size))(
        images)
    images = jnp.clip(images, 0.0, 1.0)
  images = jnp.transpose(images, (0, 2, 3, 1))
  return jnp.broadcast_to(images[:, None],
                          (n, num_views, out_size, out_size, channels))
