"""The augmentation recipes as tables: per-view probabilities and strengths.

TF-free and JAX-free, so that loading a config (which calls
`recipe_defaults`) or checking it imports neither. The host half of a view
(`jaxssl.augment.host`) and its device half (`jaxssl.augment.device`) both
read their parameters from here.

Every recipe runs the same steps in the same order: random resized crop,
flip (host); colour jitter (p = `color_prob`), grayscale (p =
`grayscale_prob`), clip, Gaussian blur (p per view), clip, solarize (p per
view) (device). Flip commutes with every later step (they are pointwise or
mirror-symmetric), so this order is each official pipeline's. What a recipe
fixes beyond the config keys is the implementation of the steps, `Laws`.

Views `0 .. num_views - 1` are the global crops (`crop_area`, side
`dataset.image_size`); views `num_views .. num_views + num_small_views - 1`
are the multi-crop small crops (`small_crop_area`, side
`small_image_size`).

References:
  Chen et al., SimCLR, ICML 2020, Appendix A; Grill et al., BYOL, NeurIPS
  2020, Table 6; Chen et al., Improved Baselines with Momentum Contrastive
  Learning (MoCo v2), 2020; Chen, Xie and He, An Empirical Study of
  Training Self-Supervised Vision Transformers (MoCo v3), ICCV 2021; Caron
  et al., SwAV, NeurIPS 2020.
"""

import dataclasses
from typing import NamedTuple

import ml_collections

CROP_SAMPLERS = ('tf', 'byol', 'torchvision')
RESIZE_METHODS = ('bicubic', 'bilinear')
BRIGHTNESS_MODES = ('multiplicative', 'additive')
TF_LUMA = (0.2989, 0.587, 0.114)  # tf.image.rgb_to_grayscale
PIL_LUMA = (0.299, 0.587, 0.114)  # PIL Image.convert('L'), ITU-R 601-2
# SimCLR's contrast and saturation factors are U[1 - 0.8 s, 1 + 0.8 s], which
# tf.image only accepts for a non-negative lower bound (the official code
# fails beyond too).
MAX_COLOR_STRENGTH = 1.25


@dataclasses.dataclass(frozen=True)
class Laws:
  """How a family of official code bases implements the steps.

  Attributes:
    jitter: 'tf' (SimCLR's tf.image and BYOL's JAX port of it: contrast
      about each channel's mean, saturation in HSV clipped, luma TF_LUMA) or
      'torchvision' (PIL: contrast blended with the mean luma, saturation
      with the pixel's luma, luma PIL_LUMA; factors U[max(0, 1 - x), 1 + x]).
    blur: 'tf' (SimCLR/BYOL: a kernel of side // 10 taps, zero padding) or
      'pil' (PIL's GaussianBlur: three extended box passes, edges repeated).
    antialias: the resize widens its filter when downscaling (PIL).
    clip_after_resize: BYOL clips after the bicubic resize; PIL is uint8.
    solarize_threshold: x < t ? x : 1 - x (0.5, PIL's 128 / 255).
  """
  jitter: str
  blur: str
  antialias: bool
  clip_after_resize: bool
  solarize_threshold: float


SIMCLR_LAWS = Laws(jitter='tf', blur='tf', antialias=False,
                   clip_after_resize=False, solarize_threshold=0.5)
BYOL_LAWS = Laws(jitter='tf', blur='tf', antialias=False,
                 clip_after_resize=True, solarize_threshold=0.5)
TORCHVISION_LAWS = Laws(jitter='torchvision', blur='pil', antialias=True,
                        clip_after_resize=True,
                        solarize_threshold=128 / 255)

RECIPE_LAWS: dict[str, Laws] = {
    'simclr': SIMCLR_LAWS,
    'byol': BYOL_LAWS,
    'moco_v2': TORCHVISION_LAWS,
    'moco_v3': TORCHVISION_LAWS,
    'swav': TORCHVISION_LAWS,
}
RECIPES = tuple(sorted(RECIPE_LAWS))

# The keys whose official values differ between recipes; every other key of
# `config.augment` (num_views, crop_aspect, flip, color_strength,
# color_prob 0.8, grayscale_prob 0.2, blur_sigma (0.1, 2)) is the same in
# all five. SimCLR's entry is `config_schema.defaults()`.
_SIMCLR = dict(
    recipe='simclr', crop_sampler='tf', crop_area=(0.08, 1.0),
    resize_method='bicubic', color_jitter=(), brightness='multiplicative',
    blur_prob=0.5, view_blur_probs=(), view_solarize_probs=(),
    num_small_views=0, small_image_size=96, small_crop_area=(0.05, 0.14))
_RECIPE_VALUES = {
    'simclr': {},
    'byol': dict(crop_sampler='byol', color_jitter=(0.4, 0.4, 0.2, 0.1),
                 brightness='additive', view_blur_probs=(1.0, 0.1),
                 view_solarize_probs=(0.0, 0.2)),
    'moco_v2': dict(crop_sampler='torchvision', crop_area=(0.2, 1.0),
                    resize_method='bilinear',
                    color_jitter=(0.4, 0.4, 0.4, 0.1)),
    # moco-v3's code default is crop_min=0.08; every ResNet-50 config in its
    # CONFIG.md uses 0.2.
    'moco_v3': dict(crop_sampler='torchvision', crop_area=(0.2, 1.0),
                    resize_method='bilinear',
                    color_jitter=(0.4, 0.4, 0.2, 0.1),
                    view_blur_probs=(1.0, 0.1),
                    view_solarize_probs=(0.0, 0.2)),
    'swav': dict(crop_sampler='torchvision', crop_area=(0.14, 1.0),
                 resize_method='bilinear', color_jitter=(0.8, 0.8, 0.8, 0.2),
                 num_small_views=6, small_image_size=96,
                 small_crop_area=(0.05, 0.14)),
}


def get_laws(recipe: str) -> Laws:
  """The `Laws` of `recipe`; a one-line error for an unknown name."""
  if recipe not in RECIPE_LAWS:
    raise ValueError(f"unknown augment recipe '{recipe}'; known: "
                     f'{", ".join(RECIPES)}')
  return RECIPE_LAWS[recipe]


def recipe_defaults(recipe: str) -> dict:
  """The official values of the recipe-specific `config.augment` keys.

  Use in a config file as `c.augment.update(augment.recipe_defaults('byol'))`,
  then tune (e.g. no blur at 32 px: `view_blur_probs = (0.0, 0.0)`). Sizes
  are ImageNet's (SwAV: 2 x 224 + 6 x 96 with `dataset.image_size = 224`).

  Args:
    recipe: a name in `RECIPES`.

  Returns:
    A dict over recipe, crop_sampler, crop_area, resize_method,
    color_jitter, brightness, blur_prob, view_blur_probs,
    view_solarize_probs, num_small_views, small_image_size and
    small_crop_area.
  """
  get_laws(recipe)
  return {**_SIMCLR, 'recipe': recipe, **_RECIPE_VALUES[recipe]}


class ViewSpec(NamedTuple):
  """Everything a view depends on besides the image, key and config."""
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
  """(b, c, s, h): `color_jitter`, or SimCLR's (.8s, .8s, .8s, .2s)."""
  c = config_augment
  if c.color_jitter:
    return tuple(float(x) for x in c.color_jitter)
  s = c.color_strength
  return (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)


def _check_interval(name, value, low, high):
  lo, hi = value
  if not low < lo <= hi or (hi > high):
    raise ValueError(f'{name}={tuple(value)} must satisfy {low} < lo <= hi '
                     f'<= {high}')


def _check_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"unknown augment.{name} '{value}'; known: "
                     f'{", ".join(allowed)}')


def _check_jitter(c, laws: Laws) -> None:
  if not 0.0 <= c.color_strength <= MAX_COLOR_STRENGTH:
    raise ValueError(f'augment.color_strength={c.color_strength} must be in '
                     f'[0, {MAX_COLOR_STRENGTH}] (contrast and saturation '
                     'factors 1 - 0.8 s must stay >= 0)')
  if c.color_jitter and len(c.color_jitter) != 4:
    raise ValueError(f'augment.color_jitter={tuple(c.color_jitter)} must be '
                     '() or 4 strengths (brightness, contrast, saturation, '
                     'hue)')
  b, con, sat, hue = jitter_strengths(c)
  # tf.image needs non-negative contrast and saturation factors 1 - x;
  # torchvision clamps them at 0 instead.
  top = 1.0 if laws.jitter == 'tf' else float('inf')
  if min(b, con, sat, hue) < 0 or max(con, sat) > top or hue > 0.5:
    raise ValueError(f'augment.color_jitter={(b, con, sat, hue)} must be >= 0 '
                     f'with hue <= 0.5 (and contrast, saturation <= 1 for '
                     f"recipe '{c.recipe}')")


def _check_per_view(c) -> None:
  lengths = (0, c.num_views, c.num_views + c.num_small_views)
  for key in ('view_blur_probs', 'view_solarize_probs'):
    if len(c[key]) not in lengths:
      raise ValueError(
          f'augment.{key}={tuple(c[key])} must have 0, num_views='
          f'{c.num_views} or num_views + num_small_views={lengths[2]} '
          'entries')
    if not all(0.0 <= p <= 1.0 for p in c[key]):
      raise ValueError(f'augment.{key}={tuple(c[key])} must hold '
                       'probabilities in [0, 1]')


def check_config(config_augment: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError naming the first bad `config.augment` value.

  Args:
    config_augment: the `config.augment` block (keys listed in
      `config_schema.defaults`).
  """
  c = config_augment
  laws = get_laws(c.recipe)
  if c.num_views < 1:
    raise ValueError(f'augment.num_views={c.num_views} must be >= 1')
  if c.num_small_views < 0:
    raise ValueError(f'augment.num_small_views={c.num_small_views} must be '
                     '>= 0')
  if c.small_image_size < 1:
    raise ValueError(f'augment.small_image_size={c.small_image_size} must be '
                     '>= 1')
  _check_choice('crop_sampler', c.crop_sampler, CROP_SAMPLERS)
  _check_choice('resize_method', c.resize_method, RESIZE_METHODS)
  _check_choice('brightness', c.brightness, BRIGHTNESS_MODES)
  _check_interval('augment.crop_area', c.crop_area, 0.0, 1.0)
  _check_interval('augment.small_crop_area', c.small_crop_area, 0.0, 1.0)
  _check_interval('augment.crop_aspect', c.crop_aspect, 0.0, float('inf'))
  _check_interval('augment.blur_sigma', c.blur_sigma, 0.0, float('inf'))
  for key in ('color_prob', 'grayscale_prob', 'blur_prob'):
    if not 0.0 <= c[key] <= 1.0:
      raise ValueError(f'augment.{key}={c[key]} must be a probability in '
                       '[0, 1]')
  _check_per_view(c)
  _check_jitter(c, laws)
