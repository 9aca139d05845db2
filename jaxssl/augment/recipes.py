"""The per-view functions of the recipes and the registry that names them.

A view function maps `(image, seed)` to one augmented view:
`fn(image, seed, *, view_index, out_size, config_augment)`. Views
`0 .. num_views - 1` are the global crops (`crop_area`, `out_size` =
`dataset.image_size`); views `num_views .. num_views + num_small_views - 1`
are the small multi-crop crops (`small_crop_area`, `out_size` =
`small_image_size`). A view depends on `view_index` only through
`view_spec(config_augment, view_index)`, so callers may trace one function
per distinct spec.

Every recipe runs the same steps in the same order: random resized crop,
flip, colour jitter (p = `color_prob`), grayscale (p = `grayscale_prob`),
clip, Gaussian blur (p per view), clip, solarize (p per view). Flip commutes
with every later step (they are pointwise or mirror-symmetric), so this
order is each official pipeline's. What a recipe fixes beyond the config
keys is the implementation of the steps, `Laws`.
"""

import dataclasses
from typing import Callable, NamedTuple

import ml_collections
import tensorflow as tf

from jaxssl.augment import blur
from jaxssl.augment import color
from jaxssl.augment import crops

ViewFn = Callable[..., tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Laws:
  """How a family of official code bases implements the steps."""
  jitter: str  # 'tf' | 'torchvision' (see `color`)
  blur: str  # 'tf': SimCLR/BYOL kernel, zero padding; 'pil': PIL box blur
  antialias: bool  # PIL's resize widens the filter when downscaling
  clip_after_resize: bool  # BYOL clips after the bicubic resize; PIL: uint8
  solarize_threshold: float


SIMCLR_LAWS = Laws(jitter='tf', blur='tf', antialias=False,
                   clip_after_resize=False, solarize_threshold=0.5)
BYOL_LAWS = Laws(jitter='tf', blur='tf', antialias=False,
                 clip_after_resize=True, solarize_threshold=0.5)
TORCHVISION_LAWS = Laws(jitter='torchvision', blur='pil', antialias=True,
                        clip_after_resize=True,
                        solarize_threshold=128 / 255)


class ViewSpec(NamedTuple):
  """Everything a view depends on besides the image, seed and config."""
  small: bool  # a multi-crop small crop
  crop_area: tuple[float, float]
  blur_prob: float
  solarize_prob: float


def _per_view(values, view_index: int, default: float) -> float:
  # Tuples listing only the global views leave the small ones at default.
  return values[view_index] if view_index < len(values) else default


def view_spec(config_augment: ml_collections.ConfigDict,
              view_index: int) -> ViewSpec:
  """The crop area and the blur and solarize probabilities of one view.

  Args:
    config_augment: `config.augment`.
    view_index: in [0, num_views + num_small_views).

  Returns:
    The view's `ViewSpec`. `view_blur_probs` () means `blur_prob` for every
    view; `view_solarize_probs` () means no solarization. A tuple of
    `num_views` entries covers the global views and leaves the small ones
    at `blur_prob` and 0.
  """
  c = config_augment
  total = c.num_views + c.num_small_views
  if not 0 <= view_index < total:
    raise ValueError(f'view_index={view_index} must be in [0, {total}) '
                     '(augment.num_views + augment.num_small_views)')
  small = view_index >= c.num_views
  return ViewSpec(
      small=small,
      crop_area=tuple(c.small_crop_area if small else c.crop_area),
      blur_prob=float(_per_view(c.view_blur_probs, view_index, c.blur_prob)),
      solarize_prob=float(_per_view(c.view_solarize_probs, view_index, 0.0)))


def jitter_strengths(config_augment: ml_collections.ConfigDict):
  """(b, c, s, h): `color_jitter`, or SimCLR's from `color_strength`."""
  c = config_augment
  if c.color_jitter:
    return tuple(float(x) for x in c.color_jitter)
  s = c.color_strength
  return (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)


def _coin(seed: tf.Tensor, p: float) -> tf.Tensor:
  """A boolean that is True with probability p (SimCLR's `random_apply`)."""
  return tf.random.stateless_uniform([], seed) < p


def _blur(image, sigma, *, laws: Laws, out_size: int, max_sigma: float):
  if laws.blur == 'tf':
    # SimCLR's H // 10 and BYOL's H / 10 give the same int(size / 2) radius.
    return blur.gaussian_blur(image, kernel_size=out_size // 10, sigma=sigma)
  return blur.pil_gaussian_blur(image, sigma=sigma, max_sigma=max_sigma)


def _color_steps(image, seeds, c, laws: Laws):
  """Colour jitter (p = color_prob), then grayscale, then a clip."""
  strengths = jitter_strengths(c)
  if c.color_prob > 0 and any(x > 0 for x in strengths):
    image = tf.cond(
        _coin(seeds[2], c.color_prob),
        lambda: color.jitter_colors(image, seeds[3], strengths=strengths,
                                    brightness=c.brightness, law=laws.jitter),
        lambda: image)
  if c.grayscale_prob > 0 and color.num_channels(image) == 3:
    image = tf.cond(_coin(seeds[4], c.grayscale_prob),
                    lambda: color.to_grayscale(image, law=laws.jitter),
                    lambda: image)
  return tf.clip_by_value(image, 0.0, 1.0)


def make_view(image: tf.Tensor, seed: tf.Tensor, *, view_index: int,
              out_size: int, config_augment: ml_collections.ConfigDict,
              laws: Laws) -> tf.Tensor:
  """One view of one image under `laws` and `config.augment`.

  Args:
    image: uint8 or float [H, W, C] (C = 1 or 3, static), any H and W; a
      float image must already be in [0, 1].
    seed: int32 or int64 tensor [2]; the view is a pure function of it.
    view_index: which view (module docstring); picks the crop area and the
      per-view probabilities.
    out_size: side of the square output: `dataset.image_size` for a global
      view, `small_image_size` for a small one.
    config_augment: `config.augment`.
    laws: the recipe's implementation of the steps.

  Returns:
    float32 [out_size, out_size, C] in [0, 1].
  """
  c = config_augment
  spec = view_spec(c, view_index)
  if spec.small and out_size != c.small_image_size:
    raise ValueError(f'out_size={out_size} for small view {view_index}; '
                     f'must be augment.small_image_size={c.small_image_size}')
  channels = color.num_channels(image)
  # The first 7 seeds equal a 7-way split (Philox streams are prefixes), so
  # SimCLR's views are those of the 7-seed recipe before solarize existed.
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8))
  image = tf.image.convert_image_dtype(image, tf.float32)
  image = crops.random_resized_crop(
      image, seeds[0], sampler=c.crop_sampler, area_range=spec.crop_area,
      aspect_range=c.crop_aspect, out_size=out_size, method=c.resize_method,
      antialias=laws.antialias)
  if laws.clip_after_resize:
    image = tf.clip_by_value(image, 0.0, 1.0)
  if c.flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    image = tf.ensure_shape(image, [out_size, out_size, channels])
  image = _color_steps(image, seeds, c, laws)
  if spec.blur_prob > 0:
    sigma = tf.random.stateless_uniform([], seeds[6], minval=c.blur_sigma[0],
                                        maxval=c.blur_sigma[1])
    image = tf.cond(
        _coin(seeds[5], spec.blur_prob),
        lambda: _blur(image, sigma, laws=laws, out_size=out_size,
                      max_sigma=c.blur_sigma[1]),
        lambda: image)
    image = tf.clip_by_value(image, 0.0, 1.0)
  if spec.solarize_prob > 0:
    image = tf.cond(
        _coin(seeds[7], spec.solarize_prob),
        lambda: color.solarize(image, threshold=laws.solarize_threshold),
        lambda: image)
  return tf.ensure_shape(image, [out_size, out_size, channels])


def simclr_view(image: tf.Tensor, seed: tf.Tensor, *, out_size: int,
                config_augment: ml_collections.ConfigDict,
                view_index: int = 0) -> tf.Tensor:
  """A SimCLR view: TF ops, no clip before the colour ops.

  Differences from google-research/simclr, on purpose: the blur runs on the
  host, per image (SimCLR blurs on the device with one sigma per view-batch
  and replica, and a per-example coin); each image gets its own coin and
  sigma from the same laws, with the same kernel. `view_index` defaults to
  0, which is exact whenever the per-view tuples are empty (SimCLR's views
  are symmetric).

  Args, Returns: as `make_view`.

  References:
    google-research/simclr `data_util.preprocess_for_train` and
    `batch_random_blur`; SimCLR paper Appendix A.
  """
  return make_view(image, seed, view_index=view_index, out_size=out_size,
                   config_augment=config_augment, laws=SIMCLR_LAWS)


def byol_view(image: tf.Tensor, seed: tf.Tensor, *, view_index: int,
              out_size: int,
              config_augment: ml_collections.ConfigDict) -> tf.Tensor:
  """A BYOL view: TF ops, clipped after the bicubic resize.

  BYOL runs everything after the crop on the accelerator in JAX; its ops
  (additive brightness, per-channel-mean contrast, HSV saturation and hue,
  luma 0.2989/0.587/0.114, per-image sigma, 23-tap zero-padded blur at
  224 px, solarize x < 0.5 ? x : 1 - x) are the TF ops used here, so only
  the random streams differ.

  Args, Returns: as `make_view`.

  References:
    deepmind-research `byol/utils/augmentations.py`, `byol/utils/dataset.py`.
  """
  return make_view(image, seed, view_index=view_index, out_size=out_size,
                   config_augment=config_augment, laws=BYOL_LAWS)


def torchvision_view(image: tf.Tensor, seed: tf.Tensor, *, view_index: int,
                     out_size: int,
                     config_augment: ml_collections.ConfigDict) -> tf.Tensor:
  """A MoCo v2/v3 or SwAV view: the laws of torchvision's PIL transforms.

  `RandomResizedCrop` resizes with PIL's antialiased filter (as
  `tf.image.resize(antialias=True)`, equal in float), `ColorJitter` blends
  contrast with the image's mean luma and saturation with the pixel's luma,
  `RandomGrayscale` uses PIL's luma, the blur is PIL's `GaussianBlur` (three
  extended box passes with edges repeated), and solarize is PIL's threshold
  128. Differences: everything is float32, where PIL rounds to uint8 after
  every op (for a blur with sigma near 0.1 that rounding undoes most of
  PIL's blur; here it stays a slight blur).

  Args, Returns: as `make_view`.

  References:
    facebookresearch/moco `main_moco.py`, `moco/loader.py`;
    facebookresearch/moco-v3 `main_moco.py`, `moco/loader.py`;
    facebookresearch/swav `src/multicropdataset.py`.
  """
  return make_view(image, seed, view_index=view_index, out_size=out_size,
                   config_augment=config_augment, laws=TORCHVISION_LAWS)


RECIPES: dict[str, ViewFn] = {
    'simclr': simclr_view,
    'byol': byol_view,
    'moco_v2': torchvision_view,
    'moco_v3': torchvision_view,
    'swav': torchvision_view,
}


# The laws each recipe's view function uses (for config checks).
RECIPE_LAWS: dict[str, Laws] = {
    'simclr': SIMCLR_LAWS,
    'byol': BYOL_LAWS,
    'moco_v2': TORCHVISION_LAWS,
    'moco_v3': TORCHVISION_LAWS,
    'swav': TORCHVISION_LAWS,
}


def get_recipe(name: str) -> ViewFn:
  """Returns the view function registered under `name` in `RECIPES`."""
  if name not in RECIPES:
    raise ValueError(f"unknown augment recipe '{name}'; known: "
                     f'{", ".join(sorted(RECIPES))}')
  return RECIPES[name]
