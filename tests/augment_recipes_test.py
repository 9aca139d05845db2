"""Tests for jaxssl.augment.recipes: official values, view specs, checks.

The official values below are typed in from the sources named in
docs/data.md, not read from jaxssl. The rates and laws that these values
drive are tested in augment_device_test.py and augment_host_test.py.
"""

import os
import subprocess
import sys

import pytest

from jaxssl import augment
from jaxssl import config_schema
from jaxssl.augment import recipes


def recipe_config(recipe, **overrides):
  c = config_schema.defaults().augment
  c.update(recipes.recipe_defaults(recipe))
  c.update(overrides)
  return c



def test_simclr_recipe_values_are_the_schema_defaults():
  defaults = config_schema.defaults().augment
  for key, value in recipes.recipe_defaults('simclr').items():
    assert defaults[key] == value, key


@pytest.mark.parametrize('recipe,expected', [
    # deepmind-research byol/utils/augmentations.py, dataset.py.
    ('byol', dict(crop_sampler='byol', crop_area=(0.08, 1.0),
                  resize_method='bicubic', color_jitter=(0.4, 0.4, 0.2, 0.1),
                  brightness='additive', view_blur_probs=(1.0, 0.1),
                  view_solarize_probs=(0.0, 0.2), num_small_views=0)),
    # facebookresearch/moco main_moco.py --aug-plus.
    ('moco_v2', dict(crop_sampler='torchvision', crop_area=(0.2, 1.0),
                     resize_method='bilinear',
                     color_jitter=(0.4, 0.4, 0.4, 0.1),
                     brightness='multiplicative', blur_prob=0.5,
                     view_blur_probs=(), view_solarize_probs=())),
    # facebookresearch/moco-v3 main_moco.py, CONFIG.md (crop_min 0.2).
    ('moco_v3', dict(crop_sampler='torchvision', crop_area=(0.2, 1.0),
                     resize_method='bilinear',
                     color_jitter=(0.4, 0.4, 0.2, 0.1),
                     view_blur_probs=(1.0, 0.1),
                     view_solarize_probs=(0.0, 0.2))),
    # facebookresearch/swav src/multicropdataset.py, scripts (2x224+6x96).
    ('swav', dict(crop_sampler='torchvision', crop_area=(0.14, 1.0),
                  resize_method='bilinear', color_jitter=(0.8, 0.8, 0.8, 0.2),
                  blur_prob=0.5, view_blur_probs=(), num_small_views=6,
                  small_image_size=96, small_crop_area=(0.05, 0.14))),
])
def test_official_recipe_values(recipe, expected):
  values = recipes.recipe_defaults(recipe)
  assert values['recipe'] == recipe
  for key, value in expected.items():
    assert values[key] == value, key
  config = recipe_config(recipe)
  recipes.check_config(config)
  # Shared by all five: p = 0.8 jitter, 0.2 grayscale, sigma in [0.1, 2].
  assert (config.color_prob, config.grayscale_prob) == (0.8, 0.2)
  assert tuple(config.blur_sigma) == (0.1, 2.0) and config.num_views == 2


def test_view_spec():
  config = recipe_config('byol', num_small_views=2, small_image_size=8)
  assert recipes.view_spec(config, 0) == recipes.ViewSpec(
      small=False, crop_area=(0.08, 1.0), blur_prob=1.0, solarize_prob=0.0)
  assert recipes.view_spec(config, 1).solarize_prob == 0.2
  # Tuples that list the global views leave the small ones at the defaults.
  assert recipes.view_spec(config, 3) == recipes.ViewSpec(
      small=True, crop_area=(0.05, 0.14), blur_prob=0.5, solarize_prob=0.0)
  config.view_blur_probs = (1.0, 0.1, 0.3, 0.4)
  assert recipes.view_spec(config, 3).blur_prob == 0.4
  with pytest.raises(ValueError, match=r'view_index=4 must be in \[0, 4\)'):
    recipes.view_spec(config, 4)


@pytest.mark.parametrize('recipe,overrides,message', [
    ('simclr', {'crop_sampler': 'pil'}, "unknown augment.crop_sampler 'pil'"),
    ('simclr', {'resize_method': 'area'},
     "unknown augment.resize_method 'area'"),
    ('simclr', {'color_jitter': (0.4, 0.4, 0.2)},
     r'augment.color_jitter=\(0.4, 0.4, 0.2\) must be \(\) or 4'),
    ('moco_v2', {'color_jitter': (0.4, 0.4, 0.4, 0.6)},
     r'augment.color_jitter=\(0.4, 0.4, 0.4, 0.6\) must be >= 0 with hue'),
    ('byol', {'color_jitter': (0.4, 1.2, 0.2, 0.1)},
     r"contrast, saturation <= 1 for recipe 'byol'"),
    ('byol', {'view_blur_probs': (1.0, 0.1, 0.5)},
     r'augment.view_blur_probs=\(1.0, 0.1, 0.5\) must have 0, num_views=2'),
    ('moco_v3', {'view_solarize_probs': (0.0, 1.5)},
     r'augment.view_solarize_probs=\(0.0, 1.5\) must hold probabilities'),
    ('swav', {'num_small_views': -1}, 'augment.num_small_views=-1'),
    ('swav', {'small_image_size': 0}, 'augment.small_image_size=0'),
    ('swav', {'small_crop_area': (0.14, 0.05)},
     r'augment.small_crop_area=\(0.14, 0.05\) must satisfy'),
    ('swav', {'recipe': 'swav2'}, "unknown augment recipe 'swav2'"),
])
def test_check_config_names_the_bad_value(recipe, overrides, message):
  config = recipe_config(recipe)
  config.update(overrides)
  with pytest.raises(ValueError, match=message):
    recipes.check_config(config)


def test_torchvision_jitter_accepts_strengths_above_one():
  config = recipe_config('moco_v2', color_jitter=(1.5, 1.5, 1.5, 0.5))
  recipes.check_config(config)  # torchvision clamps factors at 0
  with pytest.raises(ValueError, match="unknown augment recipe 'sim'"):
    recipes.recipe_defaults('sim')


@pytest.mark.parametrize('override,message', [
    ({'recipe': 'byoll'}, "unknown augment recipe 'byoll'"),
    ({'num_views': 0}, 'augment.num_views=0'),
    ({'crop_area': (0.5, 0.1)}, r'augment.crop_area=\(0.5, 0.1\)'),
    ({'crop_area': (0.08, 1.5)}, r'augment.crop_area=\(0.08, 1.5\)'),
    ({'crop_aspect': (0.0, 1.0)}, r'augment.crop_aspect=\(0.0, 1.0\)'),
    ({'blur_sigma': (2.0, 0.1)}, r'augment.blur_sigma=\(2.0, 0.1\)'),
    ({'color_prob': 1.2}, 'augment.color_prob=1.2'),
    ({'grayscale_prob': -0.1}, r'augment.grayscale_prob=-0.1'),
    ({'blur_prob': 2.0}, 'augment.blur_prob=2.0'),
    ({'color_strength': 1.5}, 'augment.color_strength=1.5'),
    ({'brightness': 'gamma'}, "unknown augment.brightness 'gamma'"),
])
def test_check_config_names_the_bad_simclr_value(override, message):
  with pytest.raises(ValueError, match=message):
    config = recipe_config('simclr')
    config.update(override)
    recipes.check_config(config)


def test_recipe_names_and_laws():
  assert recipes.RECIPES == ('byol', 'moco_v2', 'moco_v3', 'simclr', 'swav')
  assert recipes.get_laws('simclr').blur == 'tf'
  assert recipes.get_laws('swav').jitter == 'torchvision'
  with pytest.raises(ValueError, match=r"unknown augment recipe 'simclrr'; "
                     r'known: byol, moco_v2, moco_v3, simclr, swav'):
    recipes.get_laws('simclrr')


def test_package_exports_the_tables():
  assert augment.recipe_defaults is recipes.recipe_defaults
  assert augment.check_config is recipes.check_config


def test_loading_a_config_imports_neither_tensorflow_nor_the_ops():
  code = ('import sys\n'
          'from ml_collections import config_flags\n'
          'from jaxssl import config_schema\n'
          'import importlib.util\n'
          "spec = importlib.util.spec_from_file_location('c', "
          "'configs/byol_tpu.py')\n"
          'module = importlib.util.module_from_spec(spec)\n'
          'spec.loader.exec_module(module)\n'
          'config_schema.validate(module.get_config())\n'
          "bad = [m for m in ('tensorflow', 'jaxssl.augment.host', "
          "'jaxssl.augment.device') if m in sys.modules]\n"
          'print(bad)\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True, cwd=root,
                       env=dict(os.environ, PYTHONPATH=root))
  assert out.stdout.strip() == '[]', out.stderr[-2000:]
