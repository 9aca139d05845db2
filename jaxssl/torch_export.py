"""The encoder as a torchvision ResNet: safetensors weights and a JSON.

Layout (`--mode=export --format=torch`):
  <workdir>/torch_export/encoder.safetensors  the encoder as a headless
                                              `torchvision.models.resnet<N>`
                                              state_dict (no fc)
  <workdir>/torch_export/encoder.json         architecture, stem, input
                                              (size, channels, range,
                                              normalisation, layout), BN
                                              epsilon, and the torchvision
                                              recipe that loads the file

Names and layouts are torchvision's: `conv1`, `bn1`, `layer{s}.{b}.conv{i}`,
`layer{s}.{b}.bn{i}`, `layer{s}.{b}.downsample.{0,1}`; conv weights OIHW
(jaxssl's kernels are HWIO), BatchNorm `weight`, `bias`, `running_mean`,
`running_var` and `num_batches_tracked`. Converting needs no torch: the file
is written by `jaxssl.safetensors_file`.

Where the two networks differ and what the recipe does about it:
- the 3x3 stride-2 max-pool of the ImageNet stem pads TF-style 'SAME' in
  jaxssl (as SimCLR's TF code): for an even input side nothing before and
  one row/column after, while torchvision pads one on each side. The
  windows then sit one pixel apart and the features differ, so the recipe
  replaces `maxpool` with `SamePadMaxPool`. jaxssl's convs already pad
  symmetrically like torchvision's (`layers.Conv`, SimCLR's fixed padding).
- the CIFAR stem (3x3 stride-1 conv, no max-pool) and 1-channel inputs are
  not torchvision models: the recipe replaces `conv1` (and `maxpool`).
- `input_normalization` is the first op of a jaxssl encoder but not of the
  torchvision model: the JSON gives the mean and std to apply first.
Models without a torchvision equivalent (the small CNNs, a width multiplier
other than 1) are refused by `check_exportable`.
"""

import json
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxssl import models
from jaxssl import safetensors_file
from jaxssl.checkpoint import absolute
from jaxssl.models import resnet

PyTree = Any
TORCH_SUBDIR = 'torch_export'
WEIGHTS_FILE = 'encoder.safetensors'
SPEC_FILE = 'encoder.json'
FORMAT = 'jaxssl-torchvision-v1'
# jaxssl encoder name -> ResNet depth; the torchvision constructor is
# `torchvision.models.<name>`.
SUPPORTED = {f'resnet{depth}': depth for depth in resnet.ARCHITECTURES}
TORCHVISION_BN_EPSILON = 1e-5


def check_exportable(spec: dict[str, Any]) -> None:
  """Raises a one-line ValueError unless torchvision has the encoder.

  Args:
    spec: an encoder spec (`evaluate.encoder_spec`).
  """
  model = spec['model']
  if model['encoder'] not in SUPPORTED:
    raise ValueError(
        f"encoder {model['encoder']!r} has no torchvision equivalent; "
        f"--format=torch supports {', '.join(SUPPORTED)}")
  if model['width_multiplier'] != 1:
    raise ValueError(
        f"model.width_multiplier={model['width_multiplier']} has no "
        f"torchvision equivalent ({model['encoder']} scales no channel "
        'count); --format=torch supports width_multiplier=1')


def is_cifar_stem(spec: dict[str, Any]) -> bool:
  """The stem the encoder was built with ('auto' resolved by image size)."""
  stem = spec['model']['stem']
  if stem == 'auto':
    return spec['image_size'] <= models.CIFAR_STEM_MAX_IMAGE_SIZE
  return stem == 'cifar'


def _torch_module_names(depth: int) -> list[tuple[str, str]]:
  """`(jaxssl submodule path, torchvision module)` in state_dict order."""
  block, stage_sizes = resnet.ARCHITECTURES[depth]
  convs = 3 if block is resnet.BottleneckBlock else 2
  names = [('stem_conv', 'conv1'), ('stem_bn', 'bn1')]
  for stage, blocks in enumerate(stage_sizes, start=1):
    for index in range(blocks):
      jax_block = f'stage{stage}_block{index}'
      torch_block = f'layer{stage}.{index}'
      for i in range(1, convs + 1):
        names += [(f'{jax_block}/conv{i}', f'{torch_block}.conv{i}'),
                  (f'{jax_block}/bn{i}', f'{torch_block}.bn{i}')]
      names += [(f'{jax_block}/shortcut_conv', f'{torch_block}.downsample.0'),
                (f'{jax_block}/shortcut_bn', f'{torch_block}.downsample.1')]
  return names


def _host(x) -> np.ndarray:
  """A replicated (possibly multi-process) jax array as a host float32 array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_shards[0].data  # replicated: one shard is the whole
  return np.asarray(jax.device_get(x), dtype=np.float32)


def torchvision_state_dict(variables: PyTree, spec: dict[str, Any]
                           ) -> dict[str, np.ndarray]:
  """The encoder's variables under torchvision's ResNet names and layouts.

  Args:
    variables: `{'params': ..., 'batch_stats': ...}` of a jaxssl ResNet
      (replicated jax arrays or numpy); conv kernels `[kh, kw, in, out]`.
    spec: its encoder spec (`check_exportable` must accept it).

  Returns:
    name -> array in `torchvision.models.resnet<N>().state_dict()` order
    without `fc.*`: conv weights `[out, in, kh, kw]` float32, BatchNorm
    `weight`/`bias` (jaxssl's `scale`/`bias`), `running_mean`/`running_var`
    (jaxssl's `batch_stats` `mean`/`var`), all float32 `[C]`, and
    `num_batches_tracked` int64 `[]` = 0 (jaxssl does not count batches;
    torch reads it only with `momentum=None`).

  Raises:
    ValueError: the variables do not hold exactly the modules of that
      ResNet (a spec that does not describe them).
  """
  check_exportable(spec)
  params = variables['params']
  stats = variables.get('batch_stats', {})
  state, used, missing = {}, set(), []
  for jax_name, torch_name in _torch_module_names(
      SUPPORTED[spec['model']['encoder']]):
    jax_block, _, leaf = jax_name.rpartition('/')
    node = params.get(jax_block, {}) if jax_block else params
    if leaf not in node:
      if not leaf.startswith('shortcut'):  # only where the shape changes
        missing.append(jax_name)
      continue
    used.add(jax_name)
    if 'conv' in leaf:
      state[f'{torch_name}.weight'] = _host(node[leaf]['kernel']).transpose(
          3, 2, 0, 1)
      continue
    node_stats = stats.get(jax_block, {}) if jax_block else stats
    state[f'{torch_name}.weight'] = _host(node[leaf]['scale'])
    state[f'{torch_name}.bias'] = _host(node[leaf]['bias'])
    state[f'{torch_name}.running_mean'] = _host(node_stats[leaf]['mean'])
    state[f'{torch_name}.running_var'] = _host(node_stats[leaf]['var'])
    state[f'{torch_name}.num_batches_tracked'] = np.zeros((), np.int64)
  present = {'/'.join(p.key for p in path[:-1])
             for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  if present != used or missing:
    raise ValueError(
        f"the variables do not match {spec['model']['encoder']}: modules "
        f'{sorted(present - used)} unknown, {missing} missing')
  return state


def _feature_dim(spec: dict[str, Any]) -> int:
  block, _ = resnet.ARCHITECTURES[SUPPORTED[spec['model']['encoder']]]
  return 512 * block.expansion


def _input(spec: dict[str, Any]) -> dict[str, Any]:
  """What the torchvision model expects as input (the JSON's 'input')."""
  name = spec['model']['input_normalization']
  normalize = None
  if name != 'none':
    mean, std = models.input_statistics(name, spec['num_channels'])
    normalize = {'mean': list(mean), 'std': list(std), 'name': name}
  return {
      'layout': 'NCHW',
      'channels': spec['num_channels'],
      'height': spec['image_size'],
      'width': spec['image_size'],
      'dtype': 'float32',
      'value_range': [0.0, 1.0],
      'normalize': normalize,
      'note': (
          'float32 pixels in [0, 1] (uint8 / 255), NCHW (jaxssl feeds the '
          'same pixels as NHWC: x_torch = x_jax.transpose(0, 3, 1, 2)); '
          + ('no mean/std normalisation' if normalize is None else
             'then (x - mean) / std per channel, e.g. torchvision.transforms.'
             'Normalize(mean, std): jaxssl does it inside its encoder, the '
             'torchvision model does not')
          + '. The encoder was trained at height x width; a ResNet accepts '
          'other sizes.'),
      'eval_preprocessing': (
          "jaxssl's evaluation (SimCLR's): an aspect-preserving centre crop "
          'of 87.5% of the shorter side (no crop when the output or the '
          "source's shorter side is <= 32 px), bicubic resize to "
          'height x width, clip to [0, 1]'),
  }


def _conv1_line(spec: dict[str, Any], cifar: bool) -> str | None:
  channels = spec['num_channels']
  if cifar:
    return (f'model.conv1 = nn.Conv2d({channels}, 64, kernel_size=3, '
            'stride=1, padding=1, bias=False)  # the CIFAR stem')
  if channels != 3:
    return (f'model.conv1 = nn.Conv2d({channels}, 64, kernel_size=7, '
            f'stride=2, padding=3, bias=False)  # {channels}-channel input')
  return None


_SAME_PAD_MAX_POOL = '''

class SamePadMaxPool(nn.Module):
  """jaxssl's stem max-pool: 3x3, stride 2, TF 'SAME' padding."""

  def forward(self, x):
    # 'SAME' pads (side % 2) rows/columns before and 1 after; torchvision's
    # MaxPool2d(3, 2, padding=1) pads 1 and 1, a shift for even sides.
    h, w = x.shape[-2:]
    x = F.pad(x, (w % 2, 1, h % 2, 1), value=float('-inf'))
    return F.max_pool2d(x, kernel_size=3, stride=2)
'''


def recipe(spec: dict[str, Any]) -> str:
  """Python that builds `model` (torchvision, eval mode) from `state`.

  Args:
    spec: an encoder spec that `check_exportable` accepts.

  Returns:
    Source text: given `state`, the safetensors file's tensors as a dict of
    torch tensors, it defines `model`, whose output on NCHW input is the
    jaxssl encoder's `[B, feature_dim]` features.
  """
  name = spec['model']['encoder']
  cifar = is_cifar_stem(spec)
  lines = [
      '# state: this file\'s tensors, e.g. safetensors.torch.load_file(path)',
      '# or {k: torch.from_numpy(v) for k, v in '
      'jaxssl.safetensors_file.read(path).items()}',
      'import torchvision', 'from torch import nn']
  if not cifar:
    lines.append('from torch.nn import functional as F')
    lines += _SAME_PAD_MAX_POOL.split('\n') + ['']
  lines.append(f'model = torchvision.models.{name}()')
  conv1 = _conv1_line(spec, cifar)
  if conv1:
    lines.append(conv1)
  lines.append('model.maxpool = nn.Identity()' if cifar
               else 'model.maxpool = SamePadMaxPool()')
  feature_dim = _feature_dim(spec)
  lines.append(f'model.fc = nn.Identity()  # headless: model(x) is '
               f'[B, {feature_dim}]')
  epsilon = spec['model']['bn_epsilon']
  if epsilon != TORCHVISION_BN_EPSILON:
    lines += ['for module in model.modules():',
              '  if isinstance(module, nn.BatchNorm2d):',
              f'    module.eps = {epsilon!r}']
  lines += ['model.load_state_dict(state)', 'model.eval()']
  return '\n'.join(lines) + '\n'


def describe(spec: dict[str, Any]) -> dict[str, Any]:
  """The JSON written beside the weights: what the model is and expects.

  Args:
    spec: an encoder spec that `check_exportable` accepts.

  Returns:
    A JSON-able dict: `format`, `weights`, `architecture`,
    `torchvision_constructor`, `stem`, `feature_dim`, `bn_epsilon`,
    `input` (layout, channels, size, range, normalisation, preprocessing),
    `max_pool`, `output`, `compute_dtype`, `source` and `recipe`.
  """
  check_exportable(spec)
  name = spec['model']['encoder']
  cifar = is_cifar_stem(spec)
  stem = ('cifar: conv1 is 3x3 stride 1 and there is no max-pool; not a '
          'torchvision model, the recipe replaces conv1 and maxpool' if cifar
          else 'imagenet: conv1 7x7 stride 2, then a 3x3 stride-2 max-pool')
  return {
      'format': FORMAT,
      'weights': WEIGHTS_FILE,
      'architecture': name,
      'torchvision_constructor': f'torchvision.models.{name}',
      'stem': 'cifar' if cifar else 'imagenet',
      'stem_note': stem,
      'feature_dim': _feature_dim(spec),
      'bn_epsilon': spec['model']['bn_epsilon'],
      'input': _input(spec),
      'max_pool': (None if cifar else
                   "TF 'SAME' padding: for an even side, 0 before and 1 "
                   'after (torchvision: 1 and 1); the recipe replaces '
                   'model.maxpool with SamePadMaxPool, without which the '
                   'features differ'),
      'output': (f'the global average pool, [B, {_feature_dim(spec)}] '
                 'float32; no fc (the encoder is headless): set model.fc = '
                 'nn.Identity(), or keep a new fc and load with strict=False'),
      'compute_dtype': (
          f"jaxssl computed in {spec['model']['dtype']}; the weights are "
          'float32'),
      'source': {key: spec.get(key) for key in ('method', 'dataset', 'step')},
      'recipe': recipe(spec),
  }


def export_torch(directory: str, variables: PyTree,
                 spec: dict[str, Any]) -> epath.Path:
  """Writes `encoder.safetensors` and `encoder.json` into `directory`.

  Everything is converted (and `check_exportable` passed) before anything
  is written; each file is written beside its destination and renamed over
  it. Every process calls it; process 0 writes.

  Args:
    directory: destination folder (local or gs://), created if missing.
    variables: `{'params': ..., 'batch_stats': ...}` of the encoder.
    spec: its encoder spec.

  Returns:
    The path of the weights file.
  """
  state = torchvision_state_dict(variables, spec)
  files = {
      WEIGHTS_FILE: safetensors_file.encode(state, {
          'format': 'pt', 'architecture': spec['model']['encoder'],
          'description': SPEC_FILE}),
      SPEC_FILE: (json.dumps(describe(spec), indent=2) + '\n').encode(),
  }
  folder = absolute(directory)
  if jax.process_index() == 0:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
      incoming = folder / f'{name}.incoming'
      incoming.write_bytes(data)
      incoming.replace(folder / name)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('jaxssl_torch_export_done')
  return folder / WEIGHTS_FILE
