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
- colour jitter in random order, grayscale: `color`; blur: `blur`;
- two loops give the same views: vectorised (vmap, the random choices as
  selects) for TPUs, GPUs and sharded batches, sequential (`lax.map` with
  real branches) for a 1-device CPU run: `resolve_impl`.

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

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import augment
from jaxssl.augment_device import blur
from jaxssl.augment_device import color
from jaxssl.augment_device import crops

UINT8_SCALE = np.float32(1.0 / 255.0)  # tf.image.convert_image_dtype
IMPLS = ('auto', 'vectorized', 'sequential')


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


def _view_before_blur(image: jax.Array, params: dict, *, out_size: int,
                      config_augment: ml_collections.ConfigDict) -> jax.Array:
  """Crop + resize, flip, jitter, grayscale, clip: `apply_view` up to the
  blur. [C, H, W] -> [C, out_size, out_size]."""
  c = config_augment
  view = crops.resize_crop(image, params['box'], out_size=out_size)
  if c.flip:
    view = jnp.where(params['flip'], view[:, :, ::-1], view)
  if _jitter_on(c):
    # A real branch in the sequential loop, a select under vmap.
    view = jax.lax.cond(params['jitter'], functools.partial(
        color.color_jitter, params=params, brightness=c.brightness),
                        lambda x: x, view)
  if c.grayscale_prob > 0 and image.shape[0] == 3:
    view = jnp.where(params['grayscale'], color.to_grayscale(view), view)
  return jnp.clip(view, 0.0, 1.0)


def _blurred(view: jax.Array, sigma: jax.Array) -> jax.Array:
  return jnp.clip(blur.gaussian_blur(view, sigma), 0.0, 1.0)


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
  view = _view_before_blur(image, params, out_size=out_size,
                           config_augment=config_augment)
  if config_augment.blur_prob > 0:
    view = jnp.where(params['blur'], _blurred(view, params['sigma']), view)
  return view


def _sequential_views(images: jax.Array, keys: jax.Array, *, out_size: int,
                      config_augment: ml_collections.ConfigDict) -> jax.Array:
  """`apply_view` of every view in a loop with real branches.

  Args:
    images: uint8 or float [N, H, W, C].
    keys: PRNG keys [N, V] of the views.
    out_size: S (static).
    config_augment: `config.augment`.

  Returns:
    float32 [N * V, S, S, C], example-major.
  """
  n, height, width, channels = images.shape
  examples = jnp.repeat(jnp.arange(n), keys.shape[1])
  keys = keys.reshape(-1)
  params = jax.vmap(functools.partial(
      sample_view_params, height=height, width=width, channels=channels,
      config_augment=config_augment))(keys)

  def one_view(args):
    example, view_params = args
    image = _to_float(jax.lax.dynamic_index_in_dim(images, example, 0, False))
    view = _view_before_blur(image, view_params, out_size=out_size,
                             config_augment=config_augment)
    # Channels last here, in cache: a transpose of the whole batch after
    # the loop would cost another pass through memory.
    return jnp.moveaxis(view, 0, -1)

  views = jax.lax.map(one_view, (examples, params))
  if config_augment.blur_prob > 0:
    # Only the views that drew the blur, in a loop of that many steps: a
    # cond inside the loop above would run the blur's products about 1.7x
    # slower on CPU, a select would blur every view.
    drawn = jnp.argsort(jnp.logical_not(params['blur']), stable=True)

    def blur_one(j, views):
      k = drawn[j]
      view = _blurred(jnp.moveaxis(views[k], -1, 0), params['sigma'][k])
      return jax.lax.dynamic_update_index_in_dim(
          views, jnp.moveaxis(view, 0, -1), k, 0)

    views = jax.lax.fori_loop(0, jnp.sum(params['blur']), blur_one, views)
  return views


def _check_args(images: jax.Array, num_views: int, out_size: int) -> None:
  """One-line errors for bad arguments, before tracing."""
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


def _to_float(images: jax.Array) -> jax.Array:
  """[..., H, W, C] uint8 or float to [0, 1] float32 [..., C, H, W]."""
  images = jnp.moveaxis(images, -1, -3)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) * UINT8_SCALE
  return images.astype(jnp.float32)


def view_keys(rng: jax.Array, num_examples: int,
              num_views: int) -> jax.Array:
  """The key of every view: `fold_in(fold_in(rng, n), v)`, shape [N, V]."""
  return jax.vmap(lambda n: jax.vmap(lambda v: jax.random.fold_in(
      jax.random.fold_in(rng, n), v))(jnp.arange(num_views)))(
          jnp.arange(num_examples))


def resolve_impl(impl: str) -> str:
  """The loop `simclr_views` runs: 'vectorized' or 'sequential'.

  'auto' is 'sequential' on a CPU backend with a single device in the whole
  run, and 'vectorized' otherwise (TPU, GPU, several devices, whose global
  batch is sharded along N: a loop over N would gather it).

  Args:
    impl: a name in `IMPLS`.

  Returns:
    'vectorized' or 'sequential'.
  """
  if impl not in IMPLS:
    raise ValueError(f"augment impl {impl!r} is unknown; known: "
                     f"{', '.join(IMPLS)}")
  if impl != 'auto':
    return impl
  if jax.default_backend() == 'cpu' and jax.device_count() == 1:
    return 'sequential'
  return 'vectorized'


def simclr_views(images: jax.Array, rng: jax.Array, *, num_views: int,
                 out_size: int, config_augment: ml_collections.ConfigDict,
                 impl: str = 'auto') -> jax.Array:
  """SimCLR views of a batch, on device; pure and jit-able.

  Example n's view v uses the key `fold_in(fold_in(rng, n), v)`, so a view
  depends only on `(rng, n, v, image)`: not on the batch's sharding, nor on
  the other examples, nor on `impl`. Call it inside a jitted step on the
  global batch.

  Two loops compute the same views (equal up to float32 rounding):
  - 'vectorized': every view at once under vmap; the random choices become
    selects, so every op runs on every view (all four colour ops at each of
    the jitter's four positions). Right for TPUs, GPUs and sharded batches.
  - 'sequential': `lax.map` over the N * V views, one at a time, with real
    branches: a view pays only for the ops it draws, and its intermediates
    stay in cache. 2.2x faster on CPU at 224 px (docs/benchmarks.md).

  Args:
    images: uint8 (or float in [0, 1]) [N, H, W, C], C = 1 or 3; the global
      batch, sharded or not.
    rng: PRNG key (typed, or raw uint32 [2]); e.g. the step's key.
    num_views: V, views per image (static).
    out_size: side of the square views (static).
    config_augment: `config.augment` (see `sample_view_params`).
    impl: 'auto' (see `resolve_impl`), 'vectorized' or 'sequential'.

  Returns:
    float32 [N, V, out_size, out_size, C] in [0, 1], sharded like `images`
    along N.

  References:
    google-research/simclr `data_util.preprocess_for_train`,
    `batch_random_blur`; SimCLR paper Appendix A.
  """
  _check_args(images, num_views, out_size)
  check_supported(config_augment)
  impl = resolve_impl(impl)
  n, height, width, channels = images.shape
  keys = view_keys(rng, n, num_views)
  if impl == 'sequential':
    out = _sequential_views(images, keys, out_size=out_size,
                            config_augment=config_augment)
    return out.reshape(n, num_views, out_size, out_size, channels)

  def one_view(image, key):
    params = sample_view_params(key, height=height, width=width,
                                channels=channels,
                                config_augment=config_augment)
    return apply_view(image, params, out_size=out_size,
                      config_augment=config_augment)

  one_example = jax.vmap(one_view, in_axes=(None, 0))
  out = jax.vmap(one_example)(_to_float(images), keys)
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
  _check_args(images, num_views, out_size)
  images = _to_float(images)
  n, channels, height, width = images.shape
  if (height, width) != (out_size, out_size):
    whole = jnp.array([0, 0, height, width], jnp.int32)
    images = jax.vmap(lambda x: crops.resize_crop(x, whole, out_size=out_size))(
        images)
    images = jnp.clip(images, 0.0, 1.0)
  images = jnp.transpose(images, (0, 2, 3, 1))
  return jnp.broadcast_to(images[:, None],
                          (n, num_views, out_size, out_size, channels))
