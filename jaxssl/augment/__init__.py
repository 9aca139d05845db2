"""Augmentations at the official parameters, split as deepmind byol splits them.

- `recipes` (no TF, no JAX): the recipe tables, `recipe_defaults(name)`,
  `view_spec`, `check_config`. Config files import only this.
- `host` (tf.data, TF ops): decode is the pipeline's; this crops the
  original image (random resized crop, every multi-crop size), resizes and
  flips, for every recipe.
- `device` (JAX, inside the jitted step): colour jitter, grayscale, blur and
  solarize with per-view probabilities, for every recipe, keyed by the step
  and the example's position in the global batch.

Pixels stay float32 in [0, 1] for every recipe: the mean/std normalisation
of BYOL, MoCo and SwAV is the encoder's first op
(`model.input_normalization`).
"""

from jaxssl.augment.recipes import (RECIPES, check_config, recipe_defaults,
                                    view_spec)

__all__ = ['RECIPES', 'check_config', 'recipe_defaults', 'view_spec']
