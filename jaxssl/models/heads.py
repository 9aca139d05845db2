"""Projection heads, predictors and SwAV prototypes.

`ProjectionHead` is SimCLR v2's head; `MLPHead` covers the BYOL, MoCo v2,
MoCo v3 and SwAV MLPs through flags; `Prototypes` is SwAV's bias-free linear
layer, renormalised by `normalize_prototypes` after every update. Every head
takes a compute `dtype` (params stay float32) and returns float32, so the
logits computed from it are float32. Dense layers are named `dense_{i}`,
BatchNorms `bn_{i}` (the weight-decay masks rely on the 'bn').
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import layers


def _check_positive(owner: str, **values: Any) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'{owner} {name}={value!r} must be a positive integer')


class ProjectionHead(nn.Module):
  """SimCLR v2 projection head: Dense+BN+ReLU layers, then Dense+BN.

  Middle layers: `Dense(hidden_dim, no bias) -> BN (with beta) -> ReLU`; the
  Dense bias is dropped because the BN that follows has an offset. Last
  layer: `Dense(output_dim, no bias) -> BN without beta`, no ReLU. Dense
  kernels are drawn from N(0, 0.01^2). `num_layers=0` is the identity (the
  raw features); `num_layers=1` is a single Dense+BN(no beta).
  SimCLR v2: `num_layers=3, hidden_dim=None (= feature dim), output_dim=128`;
  SimCLR v1: `num_layers=2`.

  Attributes:
    num_layers: Dense layers; 0 = identity.
    hidden_dim: width of the middle layers; None = the input's width.
    output_dim: width of the projection.
    dtype: compute dtype (params float32, output float32).
    bn_momentum: BatchNorm running-average decay.
    bn_epsilon: BatchNorm epsilon.
    bn_groups: BatchNorm statistics groups (see `layers.BatchNorm`).

  References:
    Chen et al., Big Self-Supervised Models are Strong Semi-Supervised
    Learners, 2020; google-research/simclr `tf2/model.py:ProjectionHead`.
  """
  num_layers: int = 3
  hidden_dim: int | None = None
  output_dim: int = 128
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, *,
               return_hiddens: bool = False
               ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
    """Projects features.

    Args:
      x: `[batch, feature_dim]` encoder features, the global batch.
      train: BatchNorm uses (and updates) batch statistics.
      return_hiddens: also return every layer's output.

    Returns:
      `[batch, output_dim]` float32 projections (`[batch, feature_dim]` when
      `num_layers=0`); with `return_hiddens`, also the list
      `[x, layer_1, ..., layer_num_layers]` (float32), whose index is
      SimCLR's `ft_proj_selector`.
    """
    if not isinstance(self.num_layers, int) or self.num_layers < 0:
      raise ValueError(f'ProjectionHead num_layers={self.num_layers!r} must '
                       'be a non-negative integer')
    _check_positive('ProjectionHead', output_dim=self.output_dim)
    hidden_dim = x.shape[-1] if self.hidden_dim is None else self.hidden_dim
    _check_positive('ProjectionHead', hidden_dim=hidden_dim)
    hiddens = [x.astype(jnp.float32)]
    h = x
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      h = nn.Dense(self.output_dim if last else hidden_dim, use_bias=False,
                   dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=layers.simclr_dense_init, name=f'dense_{i}')(h)
      h = layers.BatchNorm(
          momentum=self.bn_momentum, epsilon=self.bn_epsilon,
          num_groups=self.bn_groups, use_bias=not last, dtype=self.dtype,
          name=f'bn_{i}')(h, train, relu=not last)
      hiddens.append(h.astype(jnp.float32))
    if return_hiddens:
      return hiddens[-1], hiddens
    return hiddens[-1]


class MLPHead(nn.Module):
  """MLP projector / predictor of BYOL, MoCo v2, MoCo v3 and SwAV.

  Hidden layers: `Dense(hidden_dim, bias=hidden_bias) -> BN (if use_bn) ->
  ReLU`; last layer: `Dense(output_dim, bias=output_bias)`, then BN if
  `last_bn` (affine or not). The official configurations:

  - BYOL projector and predictor (defaults): `MLPHead(4096, 256)`, i.e.
    Linear(bias) -> BN -> ReLU -> Linear(no bias), no output BN.
  - MoCo v2: `MLPHead(2048, 128, use_bn=False, output_bias=True)`, i.e.
    Linear -> ReLU -> Linear, both with bias, no BN.
  - MoCo v3 (ResNet) projector: `MLPHead(4096, 256, hidden_bias=False,
    last_bn=True, last_bn_affine=False)`; predictor: `MLPHead(4096, 256,
    hidden_bias=False)`.
  - SwAV: `MLPHead(2048, 128, output_bias=True)` (hidden 8192 for w2/w4).

  Kernels default to PyTorch's Linear init (MoCo, SwAV); BYOL used Haiku's
  truncated normal with stddev 1/sqrt(fan_in), which `kernel_init` can set.
  Biases start at zero.

  Attributes:
    hidden_dim: width of the hidden layers.
    output_dim: width of the output.
    num_layers: Dense layers (>= 1).
    use_bn: BatchNorm after each hidden Dense.
    hidden_bias: bias in the hidden Dense layers.
    output_bias: bias in the last Dense layer.
    last_bn: BatchNorm after the last Dense layer.
    last_bn_affine: whether that BatchNorm has gamma and beta.
    dtype: compute dtype (params float32, output float32).
    bn_momentum: BatchNorm running-average decay.
    bn_epsilon: BatchNorm epsilon.
    bn_groups: BatchNorm statistics groups (see `layers.BatchNorm`).
    kernel_init: initializer of every Dense kernel.

  References:
    Grill et al., 2020 (BYOL), deepmind-research `byol/utils/networks.py`;
    Chen et al., 2020 (MoCo v2), facebookresearch/moco `main_moco.py`;
    Chen et al., 2021 (MoCo v3), facebookresearch/moco-v3 `moco/builder.py`;
    Caron et al., 2020 (SwAV), facebookresearch/swav `src/resnet50.py`.
  """
  hidden_dim: int
  output_dim: int
  num_layers: int = 2
  use_bn: bool = True
  hidden_bias: bool = True
  output_bias: bool = False
  last_bn: bool = False
  last_bn_affine: bool = True
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_groups: int = 1
  kernel_init: layers.Initializer = layers.torch_linear_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the MLP.

    Args:
      x: `[batch, in_dim]` features, the global batch.
      train: BatchNorm uses (and updates) batch statistics.

    Returns:
      `[batch, output_dim]` float32.
    """
    _check_positive('MLPHead', hidden_dim=self.hidden_dim,
                    output_dim=self.output_dim, num_layers=self.num_layers)
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              param_dtype=jnp.float32,
                              kernel_init=self.kernel_init)
    norm = functools.partial(
        layers.BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        num_groups=self.bn_groups, dtype=self.dtype)
    for i in range(self.num_layers - 1):
      x = dense(self.hidden_dim, use_bias=self.hidden_bias,
                name=f'dense_{i}')(x)
      if self.use_bn:
        x = norm(name=f'bn_{i}')(x, train, relu=True)
      else:
        x = nn.relu(x)
    last = self.num_layers - 1
    x = dense(self.output_dim, use_bias=self.output_bias,
              name=f'dense_{last}')(x)
    if self.last_bn:
      x = norm(use_scale=self.last_bn_affine, use_bias=self.last_bn_affine,
               name=f'bn_{last}')(x, train)
    return x.astype(jnp.float32)


class Prototypes(nn.Module):
  """SwAV prototypes: a bias-free linear layer, kernel `[dim, num_prototypes]`.

  With L2-normalised inputs and prototypes (`normalize_prototypes` after
  each update) the output is the cosine similarity to every prototype.

  Attributes:
    num_prototypes: K (3000 for ImageNet).
    dtype: compute dtype; float32 by default because the scores become
      logits.
    kernel_init: kernel initializer (PyTorch's Linear init, as SwAV).

  References:
    Caron et al., Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments, 2020; facebookresearch/swav `src/resnet50.py`.
  """
  num_prototypes: int
  dtype: Any = jnp.float32
  kernel_init: layers.Initializer = layers.torch_linear_init

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """Scores embeddings against the prototypes.

    Args:
      z: `[batch, dim]` L2-normalised embeddings.

    Returns:
      `[batch, num_prototypes]` float32 scores.
    """
    _check_positive('Prototypes', num_prototypes=self.num_prototypes)
    kernel = self.param('kernel', self.kernel_init,
                        (z.shape[-1], self.num_prototypes), jnp.float32)
    return jnp.dot(z.astype(self.dtype),
                   kernel.astype(self.dtype)).astype(jnp.float32)


def normalize_prototypes(params: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """L2-normalises every prototype (each column of the kernel).

  SwAV does `W <- normalize(W, dim=1)` on its `[K, dim]` weight at the start
  of every iteration; our kernel is the transpose, `[dim, K]`. Applied after
  each optimizer update it leaves the same prototypes for the next forward.
  Pure; a zero column stays finite (`x * rsqrt(max(|x|^2, 1e-12))`).

  Args:
    params: the `Prototypes` module's params, `{'kernel': [dim, K]}`.

  Returns:
    The same structure with unit-norm columns.

  References:
    facebookresearch/swav `main_swav.py:train` (prototypes normalisation).
  """
  if set(params) != {'kernel'}:
    raise ValueError(
        f'normalize_prototypes expects the Prototypes params {{"kernel"}}; '
        f'got keys {sorted(params)}')
  kernel = params['kernel']
  sq_norm = jnp.sum(jnp.square(kernel), axis=0, keepdims=True)
  return {'kernel': kernel * jax.lax.rsqrt(jnp.maximum(sq_norm, 1e-12))}
