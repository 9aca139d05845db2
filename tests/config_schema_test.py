"""Every config declares every key, documents its command, and validates."""

import os
import pathlib
import subprocess
import sys

import pytest

from helpers import load_config
from jaxssl import config_schema

CONFIGS = sorted(p.stem for p in
                 (pathlib.Path(__file__).parent.parent / 'configs').glob('*.py'))


def _keys(config, prefix=''):
  out = set()
  for key, value in config.items():
    if hasattr(value, 'items'):
      out |= _keys(value, f'{prefix}{key}.')
    else:
      out.add(f'{prefix}{key}')
  return out


@pytest.mark.parametrize('name', CONFIGS)
def test_config_declares_every_key_and_validates(name):
  config = load_config(name)
  assert _keys(config) == _keys(config_schema.defaults(config.method))
  config_schema.validate(config)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_docstring_starts_with_command_and_expectation(name):
  path = pathlib.Path(__file__).parent.parent / 'configs' / f'{name}.py'
  import ast
  doc = ast.get_docstring(ast.parse(path.read_text()))
  lines = [line for line in doc.splitlines() if line.strip()]
  command = next(line for line in lines if line.startswith('python -m'))
  assert f'--config=configs/{name}.py' in command
  assert any(line.startswith('Expected:') for line in lines)


def test_configs_are_locked():
  config = load_config('simclr_tiny')
  with pytest.raises(AttributeError):
    config.not_a_key = 1


@pytest.mark.parametrize('overrides, match', [
    ({'global_batch_size': 0}, 'global_batch_size=0 must be positive'),
    ({'num_epochs': 0.0, 'num_train_steps': -1},
     'num_epochs=0.0 must be positive'),
    ({'log_every_steps': 0}, 'log_every_steps=0 must be positive'),
    ({'dataset.image_size': -2}, 'dataset.image_size=-2'),
    ({'augment.crop_area': (0.5, 0.2)},
     r'augment.crop_area=\(0.5, 0.2\) must satisfy'),
    ({'augment.color_prob': 1.5}, 'augment.color_prob=1.5 must be a '
                                  'probability'),
    ({'model.dtype': 'float16'}, 'float16'),
    ({'model.width_multiplier': 0}, 'model.width_multiplier=0'),
    ({'optim.weight_decay': -1.0}, 'optim.weight_decay=-1.0 must be >= 0'),
    ({'optim.base_learning_rate': float('nan')},
     'optim.base_learning_rate=nan must be a positive number'),
    ({'linear_eval.lr_scaling': 'cubic'},
     "linear_eval.lr_scaling='cubic' is not allowed"),
    ({'linear_eval.num_epochs': 0}, 'linear_eval.num_epochs=0'),
])
def test_bad_values_give_one_line_errors(overrides, match):
  with pytest.raises(ValueError, match=match) as info:
    config_schema.validate(load_config('simclr_tiny', **overrides))
  assert '\n' not in str(info.value)


def test_loading_every_config_file_does_not_import_tensorflow():
  # A fresh interpreter: this test process has imported TensorFlow already.
  script = (
      'import importlib.util, pathlib, sys\n'
      'for path in sorted(pathlib.Path("configs").glob("*.py")):\n'
      '  spec = importlib.util.spec_from_file_location(path.stem, path)\n'
      '  module = importlib.util.module_from_spec(spec)\n'
      '  spec.loader.exec_module(module)\n'
      '  module.get_config()\n'
      'print(sorted(m for m in sys.modules\n'
      '             if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")))\n')
  repo = pathlib.Path(__file__).parent.parent
  out = subprocess.run([sys.executable, '-c', script], cwd=repo, check=True,
                       capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(repo))).stdout
  assert out.strip() == '[]'
