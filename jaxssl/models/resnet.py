"""ResNet v1.5 encoders (18/34/50/101/152) as in SimCLR's TF code.

Bottleneck blocks put the stride on the 3x3 conv (v1.5); basic blocks serve
ResNet-18/34. `width_multiplier` scales every channel count, the stem
included. The CIFAR stem (3x3 stride-1 conv, no max-pool) replaces the
ImageNet stem (7x7 stride-2 conv, 3x3 stride-2 max-pool) for small images.
Convs have no bias and are built by the `conv` factory, every BatchNorm by
the `norm` factory (`layers.Conv` and `layers.BatchNorm` by default: global
statistics, optional groups), as in flax's examples/imagenet ResNet. The output is the
global average pool, in float32, without any classifier.

One deliberate difference from SimCLR's `block_group`: the projection
shortcut is used only where the shape changes (stride > 1 or a different
channel count), as in torchvision and Haiku. SimCLR's TF code also projects
in the first block of ResNet-18/34's first stage (64 -> 64 channels, stride
1); ResNet-50 and deeper are identical either way.

Padding, against torchvision's ResNet: the convs match (SimCLR's fixed
padding, `layers.Conv`, is symmetric for odd kernels), but the ImageNet
stem's max-pool pads 'SAME' as SimCLR's TF code does, which for an even
side puts the windows one pixel below and right of torchvision's
`MaxPool2d(3, 2, padding=1)`; `jaxssl.torch_export`'s recipe pads likewise.
"""

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxssl.models import layers


class _Block(nn.Module):
  """Fields shared by the residual blocks."""
  filters: int
  strides: int = 1
  zero_init_residual: bool = True
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_groups: int = 1
  conv: layers.ModuleDef = layers.Conv
  norm: layers.ModuleDef = layers.BatchNorm

  def _conv(self, features: int, kernel_size: int, strides: int,
            name: str) -> nn.Module:
    return self.conv(features=features, kernel_size=kernel_size,
                     strides=strides, dtype=self.dtype, name=name)

  def _norm(self, name: str, zero_init: bool = False) -> nn.Module:
    scale_init = (nn.initializers.zeros if zero_init and
                  self.zero_init_residual else nn.initializers.ones)
    return self.norm(
        momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        num_groups=self.bn_groups, scale_init=scale_init, dtype=self.dtype,
        name=name)

  def _shortcut(self, x: jax.Array, out_features: int,
                train: bool) -> jax.Array:
    if self.strides == 1 and x.shape[-1] == out_features:
      return x
    x = self._conv(out_features, 1, self.strides, 'shortcut_conv')(x)
    return self._norm('shortcut_bn')(x, train)


class BasicBlock(_Block):
  """Two 3x3 convs (stride on the first); ResNet-18/34.

  References:
    He et al., 2016; google-research/simclr `resnet.py:residual_block`.
  """
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    shortcut = self._shortcut(x, self.filters, train)
    y = self._conv(self.filters, 3, self.strides, 'conv1')(x)
    y = self._norm('bn1')(y, train, relu=True)
    y = self._conv(self.filters, 3, 1, 'conv2')(y)
    return self._norm('bn2', zero_init=True)(y, train, residual=shortcut,
                                             relu=True)


class BottleneckBlock(_Block):
  """1x1 -> 3x3 (stride) -> 1x1 (4x filters); ResNet-50/101/152.

  References:
    He et al., 2016; google-research/simclr `resnet.py:bottleneck_block`.
  """
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_features = self.expansion * self.filters
    shortcut = self._shortcut(x, out_features, train)
    y = self._conv(self.filters, 1, 1, 'conv1')(x)
    y = self._norm('bn1')(y, train, relu=True)
    y = self._conv(self.filters, 3, self.strides, 'conv2')(y)
    y = self._norm('bn2')(y, train, relu=True)
    y = self._conv(out_features, 1, 1, 'conv3')(y)
    return self._norm('bn3', zero_init=True)(y, train, residual=shortcut,
                                             relu=True)


# depth -> (block, blocks per stage); SimCLR's `model_params` table.
ARCHITECTURES = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (BottleneckBlock, (3, 4, 6, 3)),
    101: (BottleneckBlock, (3, 4, 23, 3)),
    152: (BottleneckBlock, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
  """ResNet v1.5 trunk with global average pooling and no classifier.

  Submodule names: `stem_conv`, `stem_bn`, then `stage{s}_block{b}` (s from
  1, b from 0) with `conv1..3`, `bn1..3`, `shortcut_conv`, `shortcut_bn`.

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    width_multiplier: scales every channel count (stem included).
    cifar_stem: 3x3 stride-1 stem without max-pool instead of 7x7/2 + pool.
    zero_init_residual: gamma = 0 in the last BN of every residual block.
    dtype: compute dtype (params stay float32; output is float32).
    bn_momentum: BatchNorm running-average decay.
    bn_epsilon: BatchNorm epsilon.
    bn_groups: BatchNorm statistics groups (see `layers.BatchNorm`).
    conv: convolution factory, `layers.Conv` or a module with its fields
      and parameters (`jaxssl.cpu_kernels.CpuConv`).
    norm: BatchNorm factory, `layers.BatchNorm` or a module with its fields,
      parameters and call signature (residual and ReLU included, so an
      implementation may fuse them).

  References:
    He et al., Deep Residual Learning for Image Recognition, 2016;
    google-research/simclr `resnet.py`, `tf2/resnet.py`.
  """
  depth: int = 50
  width_multiplier: int = 1
  cifar_stem: bool = False
  zero_init_residual: bool = True
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_groups: int = 1
  conv: layers.ModuleDef = layers.Conv
  norm: layers.ModuleDef = layers.BatchNorm

  def _architecture(self) -> tuple[type[_Block], tuple[int, ...]]:
    if self.depth not in ARCHITECTURES:
      raise ValueError(
          f'unknown ResNet depth {self.depth!r}; known: '
          f"{', '.join(str(d) for d in ARCHITECTURES)}")
    return ARCHITECTURES[self.depth]

  @property
  def feature_dim(self) -> int:
    """Channels of the pooled output: 512 * expansion * width_multiplier."""
    block, _ = self._architecture()
    return 512 * block.expansion * self.width_multiplier

  @property
  def min_image_size(self) -> int:
    """Smallest input side: the total downsampling factor of the trunk."""
    return 8 if self.cifar_stem else 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Encodes images into pooled features.

    Args:
      x: `[batch, height, width, channels]` float images, the global batch.
      train: BatchNorm uses (and updates) batch statistics.

    Returns:
      `[batch, feature_dim]` float32 features.
    """
    block_cls, stage_sizes = self._architecture()
    if x.ndim != 4:
      raise ValueError(
          f'ResNet input has shape {x.shape}; expected [batch, H, W, C]')
    width = 64 * self.width_multiplier
    norm = functools.partial(
        self.norm, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        num_groups=self.bn_groups, dtype=self.dtype)
    conv = functools.partial(self.conv, dtype=self.dtype, name='stem_conv')
    if self.cifar_stem:
      x = conv(features=width, kernel_size=3, strides=1)(x)
      x = norm(name='stem_bn')(x, train, relu=True)
    else:
      x = conv(features=width, kernel_size=7, strides=2)(x)
      x = norm(name='stem_bn')(x, train, relu=True)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for stage, num_blocks in enumerate(stage_sizes):
      for index in range(num_blocks):
        x = block_cls(
            filters=width * 2**stage,
            strides=2 if stage > 0 and index == 0 else 1,
            zero_init_residual=self.zero_init_residual, dtype=self.dtype,
            bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
            bn_groups=self.bn_groups, conv=self.conv, norm=self.norm,
            name=f'stage{stage + 1}_block{index}')(x, train)
    return x.astype(jnp.float32).mean(axis=(1, 2))


def build_resnet(depth: int, model_config: ml_collections.ConfigDict, *,
                 cifar_stem: bool, bn_groups: int,
                 conv: layers.ModuleDef = layers.Conv,
                 norm: layers.ModuleDef = layers.BatchNorm) -> ResNet:
  """Builds a ResNet from `config.model` (the `ENCODERS` entry point).

  Args:
    depth: 18, 34, 50, 101 or 152.
    model_config: `config.model`; reads `width_multiplier`, `dtype`,
      `zero_init_residual`, `bn_momentum`, `bn_epsilon`.
    cifar_stem: the resolved stem choice.
    bn_groups: BatchNorm statistics groups.
    conv: convolution factory (`ResNet.conv`).
    norm: BatchNorm factory (`ResNet.norm`).

  Returns:
    The (unbound) `ResNet` module.
  """
  return ResNet(
      depth=depth, width_multiplier=model_config.width_multiplier,
      cifar_stem=cifar_stem,
      zero_init_residual=model_config.zero_init_residual,
      dtype=layers.dtype_from_name(model_config.dtype),
      bn_momentum=model_config.bn_momentum,
      bn_epsilon=model_config.bn_epsilon, bn_groups=bn_groups, conv=conv,
      norm=norm)
