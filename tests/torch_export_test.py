"""The torchvision export: names and layouts, parity with torch, the CLI.

The parity tests need torch and torchvision and are skipped without them;
the rest needs neither. The torch half runs in its own process
(tests/torch_features.py, which says why), once for every case.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import load_config
from jaxssl import config_schema, encoder_export, models, safetensors_file
from jaxssl import torch_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(encoder=None, *, image_size=16, channels=3, model=None,
          **model_keys):
  """An encoder spec: `model` (default: the schema's) with `encoder` and
  `model_keys` (e.g. stem, input_normalization, bn_epsilon) set."""
  model = dict(model or config_schema.defaults().model.to_dict())
  model.update(model_keys, **({'encoder': encoder} if encoder else {}))
  return {'model': model, 'image_size': image_size,
          'num_channels': channels, 'method': 'simclr',
          'dataset': 'fashion_mnist', 'step': 8,
          'format': 'jaxssl-encoder-v1'}


def _random_variables(spec, seed=0):
  """`(encoder, variables)`: random kernels, BN scales, offsets and stats."""
  encoder = models.make_encoder(ml_collections.ConfigDict(spec['model']),
                                image_size=spec['image_size'])
  shape = (1, spec['image_size'], spec['image_size'], spec['num_channels'])
  abstract = jax.eval_shape(functools.partial(encoder.init, train=False),
                            jax.random.key(0), jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, size = path[-1].key, leaf.shape
    if name == 'kernel':  # He init, so activations keep their scale
      return rng.normal(size=size) * np.sqrt(2.0 / np.prod(size[:-1]))
    if name == 'scale':
      return rng.uniform(0.5, 1.5, size)
    if name == 'var':
      return rng.uniform(0.5, 2.0, size)
    return rng.normal(scale=0.1, size=size)  # bias, mean

  variables = {'params': abstract['params'],
               'batch_stats': abstract['batch_stats']}
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: draw(p, x).astype(np.float32), variables)
  return encoder, variables


# --- Names and layouts, without torch. ------------------------------------

# len(torchvision.models.resnet<N>().state_dict()) - 2 (fc.weight, fc.bias),
# counted with torchvision 0.29.1.
TORCHVISION_ENTRIES = {'resnet18': 120, 'resnet34': 216, 'resnet50': 318}


@pytest.mark.parametrize('encoder', sorted(TORCHVISION_ENTRIES))
def test_names_and_layouts_are_torchvisions(encoder):
  spec = _spec(encoder, stem='imagenet', image_size=32)
  _, variables = _random_variables(spec)
  state = torch_export.torchvision_state_dict(variables, spec)
  assert len(state) == TORCHVISION_ENTRIES[encoder]
  wide = 1 if encoder != 'resnet50' else 4
  assert state['conv1.weight'].shape == (64, 3, 7, 7)
  assert state['layer2.0.downsample.0.weight'].shape == (128 * wide, 64 * wide,
                                                         1, 1)
  assert state['layer4.1.bn1.running_var'].shape == (512,)
  assert ('layer1.0.downsample.0.weight' in state) == (encoder == 'resnet50')
  assert state['bn1.num_batches_tracked'].dtype == np.int64
  assert state['bn1.num_batches_tracked'].shape == ()
  assert not any(name.startswith('fc.') for name in state)
  params, stats = variables['params'], variables['batch_stats']
  kernel = params['stem_conv']['kernel']  # [h, w, in, out]
  for o, i, h, w in [(0, 0, 0, 0), (63, 2, 6, 1), (5, 1, 3, 6)]:
    assert state['conv1.weight'][o, i, h, w] == kernel[h, w, i, o]
  conv2 = params['stage3_block1']['conv2']['kernel']
  assert state['layer3.1.conv2.weight'][7, 2, 0, 1] == conv2[0, 1, 2, 7]
  shortcut = params['stage2_block0']['shortcut_bn']
  np.testing.assert_array_equal(state['layer2.0.downsample.1.weight'],
                                shortcut['scale'])
  np.testing.assert_array_equal(state['layer2.0.downsample.1.bias'],
                                shortcut['bias'])
  np.testing.assert_array_equal(state['layer4.1.bn1.running_var'],
                                stats['stage4_block1']['bn1']['var'])
  np.testing.assert_array_equal(state['bn1.running_mean'],
                                stats['stem_bn']['mean'])


@pytest.mark.parametrize('spec, message', [
    (_spec('tiny_cnn'), "encoder 'tiny_cnn' has no torchvision equivalent; "
     '--format=torch supports resnet18, resnet34, resnet50, resnet101, '
     'resnet152'),
    (_spec('small_cnn', image_size=28, channels=1),
     "encoder 'small_cnn' has no torchvision equivalent; --format=torch "
     'supports resnet18, resnet34, resnet50, resnet101, resnet152'),
    (_spec('resnet18', width_multiplier=2), 'model.width_multiplier=2 has no '
     'torchvision equivalent (resnet18 scales no channel count); '
     '--format=torch supports width_multiplier=1'),
])
def test_models_without_a_torchvision_twin_are_refused(tmp_path, spec,
                                                       message):
  # Refused on the spec alone, before any variable is read.
  variables = {'params': {}, 'batch_stats': {}}
  with pytest.raises(ValueError) as e:
    torch_export.export_torch(str(tmp_path / 'out'), variables, spec)
  assert str(e.value) == message
  assert not (tmp_path / 'out').exists()


def test_variables_of_another_resnet_are_refused():
  _, variables = _random_variables(_spec('resnet18'))
  with pytest.raises(ValueError) as e:
    torch_export.torchvision_state_dict(variables, _spec('resnet34'))
  assert str(e.value).startswith(
      "the variables do not match resnet34: modules [] unknown, "
      "['stage1_block2/conv1', ")


def test_the_json_says_what_the_model_expects():
  from jaxssl.augment import host  # pylint: disable=g-import-not-at-top
  grey = torch_export.describe(_spec(
      'resnet18', stem='cifar', channels=1, input_normalization='imagenet',
      bn_epsilon=1e-3))
  assert grey['stem'] == 'cifar' and grey['feature_dim'] == 512
  assert grey['bn_epsilon'] == 1e-3 and grey['max_pool'] is None
  assert grey['input']['layout'] == 'NCHW'
  assert grey['input']['channels'] == 1
  assert grey['input']['value_range'] == [0.0, 1.0]
  np.testing.assert_allclose(grey['input']['normalize']['mean'],
                             [(0.485 + 0.456 + 0.406) / 3])
  np.testing.assert_allclose(grey['input']['normalize']['std'],
                             [(0.229 + 0.224 + 0.225) / 3])
  assert f'{host.CROP_PROPORTION:.1%}' in grey['input']['eval_preprocessing']
  assert (f'<= {host.SMALL_IMAGE_SIDE} px'
          in grey['input']['eval_preprocessing'])
  assert ('model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, '
          'padding=1, bias=False)') in grey['recipe']
  assert 'model.maxpool = nn.Identity()' in grey['recipe']
  assert 'module.eps = 0.001' in grey['recipe']
  big = torch_export.describe(_spec('resnet50', image_size=224))
  assert big['stem'] == 'imagenet' and big['feature_dim'] == 2048
  assert big['input']['normalize'] is None
  assert big['input']['height'] == big['input']['width'] == 224
  assert big['torchvision_constructor'] == 'torchvision.models.resnet50'
  assert 'model.maxpool = SamePadMaxPool()' in big['recipe']
  assert 'nn.Conv2d' not in big['recipe'] and 'eps' not in big['recipe']
  assert big['source'] == {'method': 'simclr', 'dataset': 'fashion_mnist',
                           'step': 8}


def test_the_docs_max_pool_is_the_recipes():
  with open(os.path.join(REPO, 'docs', 'evaluation.md')) as f:
    text = f.read()
  section = text[text.index('## In PyTorch (torchvision)'):]
  start = section.index('```python\n') + len('```python\n')
  documented = section[start:section.index('```', start)]
  recipe = torch_export.recipe(_spec('resnet50', image_size=224))
  code = [line for line in recipe.splitlines()
          if line.strip() and not line.strip().startswith('#')]
  start = code.index('class SamePadMaxPool(nn.Module):')
  assert [line for line in documented.splitlines()
          if line.strip()][2:] == code[start:start + 6]


def test_export_writes_the_weights_and_the_json(tmp_path):
  spec = _spec('resnet18', stem='cifar')
  _, variables = _random_variables(spec)
  path = torch_export.export_torch(str(tmp_path / 'out'), variables, spec)
  assert path == tmp_path / 'out' / 'encoder.safetensors'
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == [
      'encoder.json', 'encoder.safetensors']
  back = safetensors_file.read(str(path))
  expected = torch_export.torchvision_state_dict(variables, spec)
  assert list(back) == list(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(back[name], value)
  assert safetensors_file.read_metadata(str(path)) == {
      'format': 'pt', 'architecture': 'resnet18',
      'description': 'encoder.json'}
  description = json.loads((tmp_path / 'out' / 'encoder.json').read_text())
  assert description == torch_export.describe(spec)


# --- Parity with torchvision (torch in its own process). -------------------

# name -> (spec, image sides to compare at). The ImageNet-stem ResNet-18 is
# compared at 64 px (max-pool input 32: even, where 'SAME' and torchvision
# pad differently) and 66 px (33: odd, where they agree).
CASES = {
    'resnet18_imagenet': (_spec('resnet18', stem='imagenet', image_size=64,
                                input_normalization='imagenet'), (64, 66)),
    'resnet18_cifar': (_spec('resnet18', stem='cifar', bn_epsilon=1e-3),
                       (16,)),
    'resnet50_grey': (_spec('resnet50', stem='imagenet', image_size=32,
                            channels=1, input_normalization='swav'), (32,)),
}
BATCH = 6


def _readme_snippet() -> str:
  """The README's PyTorch snippet (the block after '#### In PyTorch')."""
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  section = text[text.index('#### In PyTorch'):]
  start = section.index('```python\n') + len('```python\n')
  return section[start:section.index('```', start)]


def _needs_torch():
  # find_spec, not importorskip: importing torchvision here, after
  # tensorflow, can segfault the test process (tests/torch_features.py).
  for name in ('torch', 'torchvision'):
    if importlib.util.find_spec(name) is None:
      pytest.skip(f'{name} is not installed (pip install -e ".[torch]")')


def _images(tmp, name, size, channels, seed):
  x = np.random.default_rng(seed).uniform(
      size=(BATCH, size, size, channels)).astype(np.float32)
  path = str(tmp / f'{name}_{size}.npy')
  np.save(path, x.transpose(0, 3, 1, 2))  # NCHW for torch
  return x, path


def _jax_features(encoder, variables, x):
  return np.asarray(jax.jit(functools.partial(encoder.apply, train=False))(
      variables, x))


@pytest.fixture(scope='module')
def parity(tmp_path_factory):
  """name -> (jaxssl features per side, the torch process's outputs)."""
  _needs_torch()
  tmp = tmp_path_factory.mktemp('torch_parity')
  jobs, expected = [], {}
  for seed, (name, (spec, sides)) in enumerate(CASES.items()):
    encoder, variables = _random_variables(spec, seed)
    export = str(tmp / name)
    torch_export.export_torch(export, variables, spec)
    images = [_images(tmp, name, side, spec['num_channels'], seed)
              for side in sides]
    expected[name] = [_jax_features(encoder, variables, x) for x, _ in images]
    jobs.append({'export': export, 'images': [p for _, p in images],
                 'out': str(tmp / f'{name}.npz')})
  # The README snippet, on the CIFAR-10 config's encoder.
  spec = _spec(image_size=32,
               model=load_config('simclr_cifar10').model.to_dict())
  encoder, variables = _random_variables(spec, 7)
  torch_export.export_torch(str(tmp / 'c10'), variables, spec)
  x, path = _images(tmp, 'readme', 32, 3, 7)
  expected['readme'] = [_jax_features(encoder, variables, x)]
  jobs.append({'snippet': _readme_snippet().replace(
      'runs/c10/torch_export', str(tmp / 'c10')), 'images': [path],
               'out': str(tmp / 'readme.npz')})
  (tmp / 'jobs.json').write_text(json.dumps(jobs))
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tests', 'torch_features.py'),
       str(tmp / 'jobs.json')], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=REPO), timeout=600)
  assert result.returncode == 0, result.stderr
  return {name: (expected[name], dict(np.load(job['out'])))
          for name, job in zip(expected, jobs)}


def _assert_same_features(torch_features, jax_features):
  # 1e-4 relative to the features' scale (averages of ReLUs can be ~0).
  np.testing.assert_allclose(torch_features, jax_features, rtol=1e-4,
                             atol=1e-4 * np.abs(jax_features).max())
  head = np.random.default_rng(1).normal(size=(jax_features.shape[1], 10))
  np.testing.assert_array_equal(
      (torch_features.astype(np.float64) @ head).argmax(1),
      (jax_features.astype(np.float64) @ head).argmax(1))


@pytest.mark.parametrize('name', [*CASES, 'readme'])
def test_torchvision_features_equal_jaxssls(parity, name):
  expected, got = parity[name]
  for i, jax_features in enumerate(expected):
    assert got[f'features_{i}'].shape == jax_features.shape
    _assert_same_features(got[f'features_{i}'], jax_features)


def test_torchvisions_own_max_pool_shifts_the_features_at_even_sides(parity):
  expected, got = parity['resnet18_imagenet']
  even, odd = expected  # sides 64 and 66: max-pool inputs 32 and 33
  gap = np.abs(got['stock_0'] - even).max() / np.abs(even).max()
  assert gap > 1e-2  # 0.17 measured: the recipe's SamePadMaxPool is needed
  _assert_same_features(got['stock_1'], odd)
  (grey,), got = parity['resnet50_grey']
  assert np.abs(got['stock_0'] - grey).max() / np.abs(grey).max() > 1e-2


@pytest.mark.parametrize('name', CASES)
def test_strict_false_keeps_a_new_fc_and_nothing_else_differs(parity, name):
  _, got = parity[name]
  assert list(got['missing']) == ['fc.bias', 'fc.weight']
  assert list(got['unexpected']) == []
  if 'reference_equal' in got:  # the safetensors package is installed
    assert int(got['reference_equal']) == 1


# --- The command line. ----------------------------------------------------

def _main(*args):
  return subprocess.run(
      [sys.executable, '-m', 'jaxssl.main', '--config=configs/simclr_tiny.py',
       *args], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ,
               XLA_FLAGS='--xla_force_host_platform_device_count=8'))


def _orbax_export(directory, spec):
  _, variables = _random_variables(spec)
  encoder_export.export_encoder(str(directory),
                                jax.tree.map(jnp.asarray, variables), spec)
  return variables


def test_the_command_line_exports_to_torch(tmp_path):
  spec = _spec('resnet18', stem='cifar', channels=1)
  variables = _orbax_export(tmp_path / 'source', spec)
  workdir = tmp_path / 'run'
  result = _main('--mode=export', '--format=torch', f'--workdir={workdir}',
                 f'--source={tmp_path}/source')
  assert result.returncode == 0, result.stderr
  weights = workdir / 'torch_export' / 'encoder.safetensors'
  assert result.stdout.splitlines()[-1] == (
      f'exported the encoder at step 8 as torchvision resnet18 to {weights} '
      '(and encoder.json)')
  back = safetensors_file.read(str(weights))
  assert back['conv1.weight'].shape == (64, 1, 3, 3)
  for name, value in torch_export.torchvision_state_dict(
      variables, spec).items():
    np.testing.assert_array_equal(back[name], value)
  description = json.loads((weights.parent / 'encoder.json').read_text())
  assert (description['architecture'], description['stem']) == (
      'resnet18', 'cifar')


@pytest.mark.parametrize('args, message', [
    (['--mode=export', '--format=torch', '--source={tmp}/tiny'],
     "encoder 'tiny_cnn' has no torchvision equivalent; --format=torch "
     'supports resnet18, resnet34, resnet50, resnet101, resnet152'),
    (['--mode=eval', '--format=torch'],
     '--format=torch applies to --mode=export only; got --mode=eval'),
    (['--mode=export', '--format=onnx'],
     'bad command line: flag --format=onnx: value should be one of '
     '<orbax|torch>'),
])
def test_bad_export_input_is_one_line_and_writes_nothing(tmp_path, args,
                                                         message):
  _orbax_export(tmp_path / 'tiny', _spec('tiny_cnn'))
  result = _main(f'--workdir={tmp_path}/run',
                 *[a.format(tmp=tmp_path) for a in args])
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [f'jaxssl: error: {message}']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['tiny']
