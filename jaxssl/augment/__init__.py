"""Host-side image augmentations (stateless tf.image), official parameters.

Every random choice is drawn with a stateless op (`tf.random.stateless_*`,
`tf.image.stateless_*`) from an explicit `seed` of shape [2], so a view is a
pure function of `(image, seed)`: the input pipeline derives the seed from
`(config.seed, shard, epoch, position, view)` and a resumed run sees exactly
the views an uninterrupted run would.

`config.augment.recipe` names a view function in `RECIPES` ('simclr',
'byol', 'moco_v2', 'moco_v3', 'swav'); the recipe fixes how each step is
implemented (TF ops for SimCLR and BYOL, the laws of torchvision's PIL
transforms for MoCo and SwAV, see `recipes.Laws`), and the config keys give
its parameters. `recipe_defaults(name)` returns the official values of the
keys that differ between recipes; `config_schema.defaults()` declares every
key at SimCLR's values. Pixels stay float32 in [0, 1] for every recipe: the
mean/std normalisation of BYOL, MoCo and SwAV is the encoder's first op
(`model.input_normalization`).

Both colour (C=3) and grey (C=1) images are accepted; for C=1, saturation,
hue and grayscale conversion have nothing to act on and are skipped, while
brightness and contrast apply. The eval centre crop is skipped when the
output is <= 32 px (as SimCLR does for CIFAR) and also when the source's
shorter side is <= 32 px (MNIST-like), which have no border to spare.

References:
  Chen et al., SimCLR, ICML 2020, Appendix A; Grill et al., BYOL, NeurIPS
  2020, Table 6; Chen et al., Improved Baselines with Momentum Contrastive
  Learning (MoCo v2), 2020; Chen, Xie and He, An Empirical Study of
  Training Self-Supervised Vision Transformers (MoCo v3), ICCV 2021; Caron
  et al., SwAV, NeurIPS 2020. Code: see each submodule.
"""

import ml_collections

from jaxssl.augment import blur
from jaxssl.augment import color
from jaxssl.augment import crops
from jaxssl.augment import recipes
from jaxssl.augment.blur import gaussian_blur, pil_gaussian_blur
from jaxssl.augment.color import (BRIGHTNESS_MODES, MAX_COLOR_STRENGTH,
                                  color_jitter, jitter_colors,
                                  random_brightness, solarize, to_grayscale)
from jaxssl.augment.crops import (CROP_PROPORTION, CROP_SAMPLERS,
                                  RESIZE_METHODS, SMALL_IMAGE_SIDE,
                                  center_crop, random_resized_crop,
                                  sample_byol_crop_box, sample_crop_box,
                                  sample_torchvision_crop_box)
from jaxssl.augment.recipes import (RECIPES, ViewFn, ViewSpec, byol_view,
                                    get_recipe, jitter_strengths, make_view,
                                    simclr_view, torchvision_view, view_spec)

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


def recipe_defaults(recipe: str) -> dict:
  """The official values of the recipe-specific `config.augment` keys.

  Use in a config file as `c.augment.update(augment.recipe_defaults('byol'))`,
  then tune (e.g. no blur at 32 px: `view_blur_probs = (0.0, 0.0)`). Sizes
  are ImageNet's (SwAV: 2 x 224 + 6 x 96 with `dataset.image_size = 224`).

  Args:
    recipe: a key of `RECIPES`.

  Returns:
    A dict over recipe, crop_sampler, crop_area, resize_method,
    color_jitter, brightness, blur_prob, view_blur_probs,
    view_solarize_probs, num_small_views, small_image_size and
    small_crop_area.
  """
  get_recipe(recipe)
  return {**_SIMCLR, 'recipe': recipe, **_RECIPE_VALUES[recipe]}


def _check_interval(name, value, low, high):
  lo, hi = value
  if not low < lo <= hi or (hi > high):
    raise ValueError(f'{name}={tuple(value)} must satisfy {low} < lo <= hi '
                     f'<= {high}')


def _check_probs(name, values):
  for p in values:
    if not 0.0 <= p <= 1.0:
      raise ValueError(f'augment.{name}={tuple(values)} must hold '
                       'probabilities in [0, 1]')


def _check_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"unknown augment.{name} '{value}'; known: "
                     f'{", ".join(allowed)}')


def _check_jitter(c, laws) -> None:
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


def check_config(config_augment: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad `config.augment` value.

  Args:
    config_augment: the `config.augment` block (keys listed in
      `config_schema.defaults`).
  """
  c = config_augment
  get_recipe(c.recipe)
  laws = recipes.RECIPE_LAWS[c.recipe]
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
  lengths = (0, c.num_views, c.num_views + c.num_small_views)
  for key in ('view_blur_probs', 'view_solarize_probs'):
    if len(c[key]) not in lengths:
      raise ValueError(
          f'augment.{key}={tuple(c[key])} must have 0, num_views='
          f'{c.num_views} or num_views + num_small_views={lengths[2]} '
          'entries')
    _check_probs(key, c[key])
  _check_jitter(c, laws)


__all__ = [
    'BRIGHTNESS_MODES', 'CROP_PROPORTION', 'CROP_SAMPLERS',
    'MAX_COLOR_STRENGTH', 'RECIPES', 'RESIZE_METHODS', 'SMALL_IMAGE_SIDE',
    'ViewFn', 'ViewSpec', 'blur', 'byol_view', 'center_crop', 'check_config',
    'color', 'color_jitter', 'crops', 'gaussian_blur', 'get_recipe',
    'jitter_colors', 'jitter_strengths', 'make_view', 'pil_gaussian_blur',
    'random_brightness', 'random_resized_crop', 'recipe_defaults', 'recipes',
    'sample_byol_crop_box', 'sample_crop_box', 'sample_torchvision_crop_box',
    'simclr_view', 'solarize', 'to_grayscale', 'torchvision_view',
    'view_spec',
]
