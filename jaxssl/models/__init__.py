"""Encoders and heads, selected by name from `config.model`.

`make_encoder(config.model, image_size=...)` returns a Linen module called as
`encoder(x, train=bool)` on `[B, H, W, C]` images; it returns pooled float32
features `[B, feature_dim(config.model)]`. Config keys read:

  encoder            registry name, a key of `ENCODERS`
  width_multiplier   positive int; scales every channel count
  stem               'auto' (CIFAR stem iff image_size <= 32) | 'imagenet' |
                     'cifar'; ResNets only
  dtype              'float32' | 'bfloat16' compute dtype; params are float32
  bn_momentum        BatchNorm running-average decay (0.9)
  bn_epsilon         BatchNorm epsilon (1e-5)
  zero_init_residual gamma = 0 in the last BN of each residual block; ResNets
  input_normalization 'none' | 'imagenet' | 'swav': (x - mean) / std as the
                     encoder's first op (`INPUT_NORMALIZATIONS`)

The convolution and BatchNorm implementations are not part of the model
config: `make_encoder` takes them as `conv=` / `norm=` factories (plain XLA
ops by default); `jaxssl.cpu_kernels.select_factories` picks faster CPU ones
outside the model, with the same parameters. `validate_model_config` checks
the keys at startup; `compute_dtype` gives the
dtype that heads should compute in; heads live in `jaxssl.models.heads`.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxssl.models import heads, layers, resnet, small
from jaxssl.models.heads import (MLPHead, Prototypes, ProjectionHead,
                                 normalize_prototypes)
from jaxssl.models.layers import BatchNorm, Conv, dtype_from_name

# name -> builder(model_config, *, cifar_stem, bn_groups, conv, norm) ->
# nn.Module. Each module exposes `feature_dim` and `min_image_size`.
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    'resnet18': functools.partial(resnet.build_resnet, 18),
    'resnet34': functools.partial(resnet.build_resnet, 34),
    'resnet50': functools.partial(resnet.build_resnet, 50),
    'resnet101': functools.partial(resnet.build_resnet, 101),
    'resnet152': functools.partial(resnet.build_resnet, 152),
    'small_cnn': small.build_small_cnn,
    'tiny_cnn': small.build_tiny_cnn,
}

STEMS = ('auto', 'imagenet', 'cifar')
# name -> (RGB mean, RGB std) of [0, 1] pixels. BYOL and MoCo use the
# ImageNet statistics; SwAV's code has std 0.228 for red (a typo it keeps).
INPUT_NORMALIZATIONS = {
    'none': None,
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'swav': ((0.485, 0.456, 0.406), (0.228, 0.224, 0.225)),
}
# 'auto' picks SimCLR's CIFAR stem up to this image side (`image_size<=32`).
CIFAR_STEM_MAX_IMAGE_SIZE = 32


def validate_model_config(model_config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError naming the first bad `config.model` value.

  Args:
    model_config: `config.model` (keys in the module docstring).
  """
  if model_config.encoder not in ENCODERS:
    raise ValueError(f'unknown encoder {model_config.encoder!r}; known: '
                     f"{', '.join(ENCODERS)}")
  width = model_config.width_multiplier
  if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
    raise ValueError(
        f'model.width_multiplier={width!r} must be a positive integer')
  if model_config.stem not in STEMS:
    raise ValueError(f'unknown model.stem {model_config.stem!r}; known: '
                     f"{', '.join(STEMS)}")
  layers.dtype_from_name(model_config.dtype)
  if not 0.0 <= model_config.bn_momentum < 1.0:
    raise ValueError(f'model.bn_momentum={model_config.bn_momentum!r} must '
                     'be in [0, 1)')
  if not model_config.bn_epsilon > 0.0:
    raise ValueError(
        f'model.bn_epsilon={model_config.bn_epsilon!r} must be positive')
  if model_config.input_normalization not in INPUT_NORMALIZATIONS:
    raise ValueError(
        f'unknown model.input_normalization '
        f'{model_config.input_normalization!r}; known: '
        f"{', '.join(INPUT_NORMALIZATIONS)}")


def input_statistics(name: str, num_channels: int):
  """`(mean, std)` tuples of `num_channels` floats for a normalisation.

  Args:
    name: a key of `INPUT_NORMALIZATIONS` other than 'none'.
    num_channels: 3, or 1 for grey images, which get the mean of the three
      channel means and the mean of the three stds.

  Returns:
    `(mean, std)`, each a tuple of `num_channels` floats.
  """
  known = [k for k, stats in INPUT_NORMALIZATIONS.items() if stats]
  if name not in known:
    raise ValueError(f'input normalisation {name!r} has no statistics; '
                     f"known: {', '.join(known)}")
  if num_channels not in (1, 3):
    raise ValueError(f'num_channels={num_channels} must be 1 or 3')
  mean, std = INPUT_NORMALIZATIONS[name]
  if num_channels == 1:
    return (sum(mean) / 3,), (sum(std) / 3,)
  return mean, std


class NormalizedEncoder(nn.Module):
  """An encoder whose first op is `(x - mean) / std` per channel.

  It shares the wrapped encoder's scope, so its variables are exactly the
  encoder's (same tree, same init): checkpoints and exports do not depend
  on the normalisation, which is a fixed op, not a parameter.
  """

  encoder: nn.Module
  normalization: str

  def setup(self):
    nn.share_scope(self, self.encoder)

  @property
  def feature_dim(self) -> int:
    return self.encoder.feature_dim

  @property
  def min_image_size(self) -> int:
    return self.encoder.min_image_size

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Normalises `[B, H, W, C]` pixels in [0, 1] (float32), then encodes."""
    mean, std = input_statistics(self.normalization, x.shape[-1])
    y = (x.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / (
        jnp.asarray(std, jnp.float32))
    return self.encoder(y.astype(x.dtype), train=train)


def make_encoder(model_config: ml_collections.ConfigDict, *, image_size: int,
                 bn_groups: int = 1, conv: layers.ModuleDef = layers.Conv,
                 norm: layers.ModuleDef = layers.BatchNorm) -> nn.Module:
  """Builds the encoder named by `model_config.encoder`.

  Args:
    model_config: `config.model` (keys in the module docstring).
    image_size: side of the square input images; picks the stem under
      'auto' and must be at least the encoder's `min_image_size` (32 for a
      ResNet with the ImageNet stem, 8 with the CIFAR stem).
    bn_groups: BatchNorm statistics groups; 1 = global batch statistics,
      G = separate statistics for G contiguous slices of the batch (MoCo v2
      shuffle-BN with G = devices, SwAV per-node BN).
    conv: convolution factory: `layers.Conv` or a subclass with the same
      fields and parameters (`jaxssl.cpu_kernels.select_factories`).
    norm: BatchNorm factory: `layers.BatchNorm` or such a subclass.

  Returns:
    An unbound Linen module; `encoder(x, train)` maps `[B, H, W, C]` float
    images in [0, 1] (the global batch) to `[B, feature_dim]` float32
    features. With `input_normalization` other than 'none' it is a
    `NormalizedEncoder` (same variables), so exported encoders carry the
    normalisation and evaluation feeds [0, 1] pixels for every method.
  """
  validate_model_config(model_config)
  if isinstance(image_size, bool) or not isinstance(image_size, int) or (
      image_size <= 0):
    raise ValueError(f'image_size={image_size!r} must be a positive integer')
  if isinstance(bn_groups, bool) or not isinstance(bn_groups, int) or (
      bn_groups <= 0):
    raise ValueError(f'bn_groups={bn_groups!r} must be a positive integer')
  if model_config.stem == 'auto':
    cifar_stem = image_size <= CIFAR_STEM_MAX_IMAGE_SIZE
  else:
    cifar_stem = model_config.stem == 'cifar'
  encoder = ENCODERS[model_config.encoder](
      model_config, cifar_stem=cifar_stem, bn_groups=bn_groups, conv=conv,
      norm=norm)
  if image_size < encoder.min_image_size:
    raise ValueError(
        f'image_size={image_size} is too small for encoder '
        f'{model_config.encoder!r} with stem {model_config.stem!r}; use at '
        f'least {encoder.min_image_size}')
  if model_config.input_normalization == 'none':
    return encoder
  return NormalizedEncoder(encoder=encoder,
                           normalization=model_config.input_normalization)


def feature_dim(model_config: ml_collections.ConfigDict) -> int:
  """Width of the encoder's pooled features.

  Args:
    model_config: `config.model`.

  Returns:
    e.g. 2048 * width_multiplier for ResNet-50, 512 * width_multiplier for
    ResNet-18, 128 * width_multiplier for 'small_cnn'.
  """
  validate_model_config(model_config)
  # The feature width does not depend on the stem.
  encoder = ENCODERS[model_config.encoder](
      model_config, cifar_stem=False, bn_groups=1)
  return encoder.feature_dim


def compute_dtype(model_config: ml_collections.ConfigDict) -> Any:
  """The compute dtype named by `model_config.dtype`, for heads and methods.

  Args:
    model_config: `config.model`.

  Returns:
    `jnp.float32` or `jnp.bfloat16`.
  """
  return layers.dtype_from_name(model_config.dtype)


__all__ = [
    'ENCODERS', 'INPUT_NORMALIZATIONS', 'STEMS', 'BatchNorm', 'Conv',
    'MLPHead', 'NormalizedEncoder', 'ProjectionHead', 'Prototypes',
    'compute_dtype', 'dtype_from_name', 'feature_dim', 'heads',
    'input_statistics', 'layers', 'make_encoder', 'normalize_prototypes',
    'resnet', 'small', 'validate_model_config',
]
