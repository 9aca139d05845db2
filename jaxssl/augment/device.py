"""The device half of every recipe (JAX, inside the jitted step).

`finish_views(views, rng, config_augment)` takes the host's cropped,
resized and flipped views (`jaxssl.augment.host.crop_view`) and applies, per
view, colour jitter (p = `color_prob`, the four ops in a uniformly random
order, clipped after each), grayscale (p = `grayscale_prob`), a clip, the
Gaussian blur (p = the view's `blur_prob`), a clip and solarize (p = the
view's `solarize_prob`), with the recipe's `Laws` (`recipes`). This is what
deepmind byol runs on its accelerators, for every recipe here.

Randomness is stateless: example n (its position in the global batch) and
view v draw every choice from `fold_in(fold_in(rng, n), v)`, rng being the
step's key. A view therefore depends only on `(rng, n, v, pixels)`: not on
the sharding (8 devices give the views of 1), not on the other examples,
and a resumed run draws what an uninterrupted one would.

The random choices are selects under `vmap` (every op runs on every view
and the drawn result is kept), which is what TPUs and GPUs want; on CPU the
quickstart's 28 px grayscale views make this a small part of the step
(docs/benchmarks.md).

Saturation and hue are closed forms of tf.image's HSV round trips (no
conversion to HSV and back); blurs are two [S, S] matrix products per view,
the matrix being SimCLR's zero-padded Gaussian or PIL's three extended box
passes with edges repeated (`blur_matrix`).

References:
  google-research/simclr `data_util.color_jitter_rand`, `gaussian_blur`,
  `batch_random_blur`; deepmind-research `byol/utils/augmentations.py`;
  torchvision `transforms.ColorJitter`, `RandomGrayscale`, `functional_pil`;
  Pillow `ImageEnhance`, `src/libImaging/BoxBlur.c`, `ImageOps.solarize`;
  TensorFlow `adjust_saturation_op.cc`, `adjust_hue_op.cc`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl.augment import recipes

HIGHEST = jax.lax.Precision.HIGHEST
PIL_BLUR_PASSES = 3


def luma(image: jax.Array, weights) -> jax.Array:
  """The weighted sum of R, G, B of [..., 3]: [..., 1] (identity for C=1).

  Elementwise rather than a dot, so accelerators do not round to bfloat16.
  """
  if image.shape[-1] == 1:
    return image
  w0, w1, w2 = (np.float32(w) for w in weights)
  return (image[..., 0] * w0 + image[..., 1] * w1 + image[..., 2] * w2)[
      ..., None]


def to_grayscale(image: jax.Array, *, law: str) -> jax.Array:
  """Luma ('tf': TF_LUMA, 'torchvision': PIL_LUMA) tiled to the channels."""
  weights = recipes.TF_LUMA if law == 'tf' else recipes.PIL_LUMA
  return jnp.broadcast_to(luma(image, weights), image.shape)


def spatial_mean(image: jax.Array) -> jax.Array:
  """Per-channel mean of [S, S, C] as [1, 1, C], summed in a fixed order.

  A pairwise tree of elementwise adds (zero-padded to a power of two)
  rather than `jnp.mean`: XLA picks a reduction's order per shape, so
  under `vmap` the same image gave means one ulp apart on a batch of 2
  and of 16 (8 devices against 1), which contrast, saturation and hue
  then magnified to 2.4e-6. Elementwise adds round the same way at every
  batch size, so a view is bit-identical however the batch is sharded.
  """
  flat = image.reshape(-1, image.shape[-1])
  count = flat.shape[0]
  flat = jnp.pad(flat, ((0, (1 << (count - 1).bit_length()) - count), (0, 0)))
  while flat.shape[0] > 1:
    half = flat.shape[0] // 2
    flat = flat[:half] + flat[half:]
  return (flat / np.float32(count))[None]


def adjust_contrast(image: jax.Array, factor: jax.Array, *,
                    law: str) -> jax.Array:
  """Contrast of [S, S, C]: 'tf' about each channel's spatial mean
  (`tf.image.adjust_contrast`), 'torchvision' about the image's mean PIL
  luma (`ImageEnhance.Contrast`, without its uint8 rounding). The means
  are `spatial_mean`'s (a fixed summation order)."""
  if law == 'tf':
    mean = spatial_mean(image)
  else:
    mean = spatial_mean(luma(image, recipes.PIL_LUMA))
  return (image - mean) * factor + mean


def adjust_saturation(image: jax.Array, factor: jax.Array, *,
                      law: str) -> jax.Array:
  """Saturation of RGB [S, S, 3].

  'tf': `tf.image.adjust_saturation` in closed form. TF converts to HSV,
  sets s' = min(s * factor, 1) and converts back; with hue and value kept,
  every channel's distance to the value (the max) scales by
  s' / s = min(factor, v / (v - min)); TF takes s = 0 where v <= 0.
  'torchvision': a blend with the pixel's PIL luma (`ImageEnhance.Color`).
  """
  if law == 'torchvision':
    return (image - luma(image, recipes.PIL_LUMA)) * factor + luma(
        image, recipes.PIL_LUMA)
  value = jnp.max(image, axis=-1, keepdims=True)
  chroma = value - jnp.min(image, axis=-1, keepdims=True)
  ratio = value / jnp.where(chroma > 0, chroma, 1.0)
  scale = jnp.where((value > 0) & (chroma > 0), jnp.minimum(factor, ratio),
                    0.0)
  return value - (value - image) * scale


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
  """`tf.image.adjust_hue` of RGB [S, S, 3]: rotate the HSV hue by `delta`
  turns, keeping each pixel's max, min and chroma (torchvision's
  `adjust_hue` is the same map on float pixels)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  low = jnp.minimum(jnp.minimum(r, g), b)
  chroma = value - low
  inverse = 1.0 / jnp.where(chroma > 0, chroma, 1.0)
  # Hue in sixths of a turn, wrapped to [0, 6) with floor (XLA's CPU float
  # remainder is a slow scalar library call).
  hue = jnp.where(value == r, (g - b) * inverse,
                  jnp.where(value == g, (b - r) * inverse + 2,
                            (r - g) * inverse + 4)) + 6 * delta
  hue = (hue - 6 * jnp.floor(hue / 6))[..., None]
  # The hexcone: each channel's share of the chroma is piecewise linear in
  # the hue, clip(slope * |hue - centre| + offset, 0, 1).
  centre = jnp.array([3.0, 2.0, 4.0])
  slope = jnp.array([1.0, -1.0, -1.0])
  offset = jnp.array([-1.0, 2.0, 2.0])
  share = jnp.clip(slope * jnp.abs(hue - centre) + offset, 0.0, 1.0)
  return low[..., None] + chroma[..., None] * share


def solarize(image: jax.Array, *, threshold: float) -> jax.Array:
  """x < t ? x : 1 - x (BYOL: t = 0.5; PIL's uint8 >= 128: t = 128/255)."""
  return jnp.where(image < threshold, image, 1.0 - image)


def gaussian_blur_matrix(sigma: jax.Array, *, size: int) -> jax.Array:
  """SimCLR's and BYOL's blur along one axis of a `size`-pixel view.

  The kernel has `2 * int((size // 10) / 2) + 1` taps (23 at 224 px;
  SimCLR's H // 10 and BYOL's H / 10 give the same radius), normalised over
  all taps, with zero ('SAME') padding. Below 20 px it is the identity.

  Args:
    sigma: float32 scalar, the standard deviation in pixels.
    size: side of the view (static).

  Returns:
    float32 [size, size]: row i holds output pixel i's weights.

  References:
    google-research/simclr `data_util.gaussian_blur`.
  """
  radius = int((size // 10) / 2)
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  inv_var = 1.0 / (2.0 * jnp.square(sigma))
  norm = jnp.sum(jnp.exp(-jnp.square(taps) * inv_var))
  offset = (jnp.arange(size)[None, :] - jnp.arange(size)[:, None]).astype(
      jnp.float32)
  weights = jnp.exp(-jnp.square(offset) * inv_var) / norm
  return jnp.where(jnp.abs(offset) <= radius, weights, 0.0)


def pil_box_radius(sigma, passes: int = PIL_BLUR_PASSES):
  """PIL's extended box radius `(l, a)` for a Gaussian of std `sigma`.

  A box of integer half-width l plus end taps of weight a in [0, 1) at
  +-(l + 1) has variance sigma^2 / passes, so `passes` of them have variance
  sigma^2 (Gwosdek et al., SSVM 2011; Pillow `_gaussian_blur_radius`).

  Returns:
    `(l, a)`: float32 scalars, l integer-valued.
  """
  sigma2 = jnp.square(jnp.asarray(sigma, jnp.float32)) / passes
  l = jnp.floor((jnp.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)
  a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2)
  a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0))
  return l, a


def pil_blur_matrix(sigma: jax.Array, *, size: int, max_sigma: float,
                    passes: int = PIL_BLUR_PASSES) -> jax.Array:
  """`PIL.ImageFilter.GaussianBlur(radius=sigma)` along one axis, float32.

  `passes` extended box passes, each repeating the edge pixels beyond the
  border (a constant image stays constant), composed into one matrix.

  Args:
    sigma: float32 scalar in (0, max_sigma].
    size: side of the view (static).
    max_sigma: static upper bound of sigma; fixes the number of taps.
    passes: box passes per axis (PIL: 3).

  Returns:
    float32 [size, size], rows summing to 1.

  References:
    Pillow `src/libImaging/BoxBlur.c` (`ImagingBoxBlur`).
  """
  # +1 for the end taps, +1 against float32 rounding at an integer boundary.
  half = math.floor((math.sqrt(12.0 * max_sigma**2 / passes + 1.0) - 1.0)
                    / 2.0) + 2
  l, a = pil_box_radius(sigma, passes)
  offsets = jnp.arange(-half, half + 1)
  distance = jnp.abs(offsets).astype(jnp.float32)
  taps = jnp.where(distance <= l, 1.0, jnp.where(distance == l + 1.0, a, 0.0))
  taps /= 2.0 * (l + a) + 1.0
  source = jnp.clip(jnp.arange(size)[:, None] + offsets[None, :], 0, size - 1)
  one_pass = jnp.einsum('ik,ikj->ij', jnp.broadcast_to(taps, source.shape),
                        jax.nn.one_hot(source, size), precision=HIGHEST)
  matrix = one_pass
  for _ in range(passes - 1):
    matrix = jnp.matmul(one_pass, matrix, precision=HIGHEST)
  return matrix


def blur(image: jax.Array, sigma: jax.Array, *, law: str,
         max_sigma: float) -> jax.Array:
  """The recipe's blur of a square [S, S, C] view (not clipped)."""
  size = image.shape[0]
  if law == 'tf':
    matrix = gaussian_blur_matrix(sigma, size=size)
  else:
    matrix = pil_blur_matrix(sigma, size=size, max_sigma=max_sigma)
  image = jnp.einsum('hp,pwc->hwc', matrix, image, precision=HIGHEST)
  return jnp.einsum('wq,hqc->hwc', matrix, image, precision=HIGHEST)


def _jitter_on(c: ml_collections.ConfigDict) -> bool:
  return c.color_prob > 0 and any(x > 0 for x in recipes.jitter_strengths(c))


def sample_view_params(key: jax.Array, *, spec: recipes.ViewSpec,
                       config_augment: ml_collections.ConfigDict) -> dict:
  """Draws every random choice of one view's device half.

  Args:
    key: PRNG key of the view, `fold_in(fold_in(rng, n), v)`.
    spec: the view's `recipes.view_spec` (blur and solarize probabilities).
    config_augment: `config.augment`.

  Returns:
    A dict of scalars: jitter, grayscale, blur, solarize (bool coins; False
    where the probability is 0), order (int32 [4], the jitter's op order),
    brightness (a factor, or an offset for 'additive'), contrast,
    saturation (factors from U[max(0, 1 - x), 1 + x]), hue (U[-h, h] turns),
    sigma (U[blur_sigma] pixels).
  """
  c = config_augment
  keys = jax.random.split(key, 10)
  b, con, sat, hue = recipes.jitter_strengths(c)
  if c.brightness == 'multiplicative':
    bright_range = (max(1.0 - b, 0.0), 1.0 + b)
  else:
    bright_range = (-b, b)
  coin = lambda k, p: jax.random.bernoulli(k, p) if p > 0 else jnp.bool_(False)
  uniform = lambda k, r: jax.random.uniform(k, (), minval=r[0], maxval=r[1])
  factor = lambda k, x: uniform(k, (max(1.0 - x, 0.0), 1.0 + x))
  return {
      'jitter': coin(keys[0], c.color_prob if _jitter_on(c) else 0.0),
      'order': jax.random.permutation(keys[1], 4).astype(jnp.int32),
      'brightness': uniform(keys[2], bright_range),
      'contrast': factor(keys[3], con),
      'saturation': factor(keys[4], sat),
      'hue': uniform(keys[5], (-hue, hue)),
      'grayscale': coin(keys[6], c.grayscale_prob),
      'blur': coin(keys[7], spec.blur_prob),
      'sigma': uniform(keys[8], tuple(c.blur_sigma)),
      'solarize': coin(keys[9], spec.solarize_prob),
  }


def color_jitter(image: jax.Array, params: dict, *, strengths,
                 brightness: str, law: str) -> jax.Array:
  """Brightness, contrast, saturation, hue in `params['order']`, clipped.

  An op of strength 0 is the identity, as in the official code; for C=1
  saturation and hue have nothing to act on.

  Args:
    image: float32 [S, S, C], one view.
    params: from `sample_view_params`.
    strengths: (b, c, s, h), `recipes.jitter_strengths`.
    brightness: 'multiplicative' (x * f) or 'additive' (x + delta).
    law: 'tf' or 'torchvision' (`recipes.Laws.jitter`).

  Returns:
    float32 [S, S, C] in [0, 1].
  """
  b, con, sat, hue = strengths
  colour = image.shape[-1] == 3
  identity = lambda x: x
  if brightness == 'multiplicative':
    bright = lambda x: x * params['brightness']
  else:
    bright = lambda x: x + params['brightness']
  ops = [
      bright if b > 0 else identity,
      functools.partial(adjust_contrast, factor=params['contrast'], law=law)
      if con > 0 else identity,
      functools.partial(adjust_saturation, factor=params['saturation'],
                        law=law) if sat > 0 and colour else identity,
      functools.partial(adjust_hue, delta=params['hue'])
      if hue > 0 and colour else identity,
  ]

  def apply_op(position, x):
    x = jax.lax.switch(params['order'][position], ops, x)
    return jnp.clip(x, 0.0, 1.0)

  # A loop, not four unrolled positions: unrolled, XLA fuses each position
  # into the next and recomputes the earlier ones once per channel read.
  return jax.lax.fori_loop(0, 4, apply_op, image)


def finish_view(view: jax.Array, key: jax.Array, *, spec: recipes.ViewSpec,
                config_augment: ml_collections.ConfigDict) -> jax.Array:
  """The device half of one view: jitter, grayscale, clip, blur, clip,
  solarize.

  Args:
    view: float32 [S, S, C] from `host.crop_view`.
    key: the view's PRNG key.
    spec: the view's `recipes.view_spec`.
    config_augment: `config.augment`; ops with probability 0 are left out
      statically.

  Returns:
    float32 [S, S, C] in [0, 1].
  """
  c = config_augment
  laws = recipes.get_laws(c.recipe)
  params = sample_view_params(key, spec=spec, config_augment=c)
  if _jitter_on(c):
    jittered = color_jitter(view, params,
                            strengths=recipes.jitter_strengths(c),
                            brightness=c.brightness, law=laws.jitter)
    view = jnp.where(params['jitter'], jittered, view)
  if c.grayscale_prob > 0 and view.shape[-1] == 3:
    view = jnp.where(params['grayscale'],
                     to_grayscale(view, law=laws.jitter), view)
  view = jnp.clip(view, 0.0, 1.0)
  if spec.blur_prob > 0:
    blurred = blur(view, params['sigma'], law=laws.blur,
                   max_sigma=c.blur_sigma[1])
    view = jnp.where(params['blur'], jnp.clip(blurred, 0.0, 1.0), view)
  if spec.solarize_prob > 0:
    view = jnp.where(params['solarize'],
                     solarize(view, threshold=laws.solarize_threshold), view)
  return view


def view_keys(rng: jax.Array, num_examples: int,
              view_index: int) -> jax.Array:
  """`fold_in(fold_in(rng, n), view_index)` for n < num_examples: [N]."""
  return jax.vmap(lambda n: jax.random.fold_in(
      jax.random.fold_in(rng, n), view_index))(jnp.arange(num_examples))


def _check_views(views, c: ml_collections.ConfigDict) -> None:
  """One-line errors for views that do not match `config.augment`."""
  counts = [c.num_views] + ([c.num_small_views] if c.num_small_views else [])
  shapes = [tuple(v.shape) for v in views]
  if len(views) != len(counts) or any(
      len(s) != 5 or s[1] != n or s[-1] not in (1, 3)
      for s, n in zip(shapes, counts)):
    raise ValueError(f'views of shapes {shapes} must be one [N, V, S, S, C] '
                     f'array per crop size with V = {counts} '
                     '(augment.num_views, augment.num_small_views) and C = 1 '
                     'or 3')


def finish_views(views, rng: jax.Array,
                 config_augment: ml_collections.ConfigDict):
  """The device half of every view of a global batch; pure, jit-able.

  Args:
    views: a tuple of float32 [N, V, S, S, C] arrays, the global batch
      (sharded along N or not): the global crops (V = num_views, S =
      dataset.image_size) and, with multi-crop, the small crops (V =
      num_small_views, S = small_image_size). View v counts across the
      tuple (the small crops are v = num_views ..).
    rng: PRNG key of this step's augmentation (typed).
    config_augment: `config.augment`.

  Returns:
    A tuple like `views`, float32 in [0, 1], sharded like `views`.

  References:
    deepmind-research `byol/utils/augmentations.py` (`postprocess`);
    google-research/simclr `data_util.preprocess_for_train`.
  """
  c = config_augment
  views = tuple(views)
  _check_views(views, c)
  out, first = [], 0
  for group in views:
    n = group.shape[0]
    finished = []
    for j in range(group.shape[1]):
      spec = recipes.view_spec(c, first + j)
      one = functools.partial(finish_view, spec=spec, config_augment=c)
      finished.append(jax.vmap(one)(group[:, j].astype(jnp.float32),
                                    view_keys(rng, n, first + j)))
    out.append(jnp.stack(finished, axis=1))
    first += group.shape[1]
  return tuple(out)
