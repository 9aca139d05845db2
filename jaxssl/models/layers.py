"""Building blocks shared by every encoder and head: conv, BatchNorm, inits.

Every convolution of every encoder is built by `conv`, so a faster
platform-specific convolution can be swapped in at one place. `BatchNorm`
runs in the global view: under `jax.jit` on a batch sharded over the `'data'`
mesh axis its statistics are those of the whole global batch (exact
cross-replica BN, as SimCLR's `global_bn`, BYOL's `cross_replica_axis` and
MoCo v3's SyncBN), and `num_groups` gives per-group statistics (MoCo v2
shuffle-BN, SwAV's per-node SyncBN) without any collective. On a CPU
backend its training-mode gradient is `fused_norm`'s hand-written VJP, with
a block's residual add and ReLU fused in (`BatchNorm.impl`).

Parameters are always float32; `dtype` is the compute dtype. Naming rule
relied on by `jaxssl.optim`: every BatchNorm submodule has 'bn' or 'norm' in
its name, no other module does, and only BatchNorm and Dense layers have a
`bias` leaf.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import fastconv, fused_norm

Initializer = Callable[..., jax.Array]

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# `BatchNorm.impl`: 'auto' is 'fused' for float32 on a CPU backend, else
# 'autodiff' (TPU and GPU keep JAX's autodiff).
BN_IMPLS = ('auto', 'fused', 'autodiff')

# TF1 `tf.variance_scaling_initializer()`: scale 1, fan_in, truncated normal
# (stddev corrected for the truncation), the init of SimCLR's convolutions.
conv_kernel_init = nn.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal')
# SimCLR's projection and supervised heads: RandomNormal(stddev=0.01).
simclr_dense_init = nn.initializers.normal(stddev=0.01)
# PyTorch's nn.Linear default (kaiming_uniform with a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): how the MoCo v2/v3 and SwAV heads and
# prototypes were initialised.
torch_linear_init = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform')


def dtype_from_name(name: str) -> Any:
  """Returns the jnp dtype for a `config.model.dtype` name.

  Args:
    name: 'float32' or 'bfloat16'.

  Returns:
    `jnp.float32` or `jnp.bfloat16`.
  """
  if name not in DTYPES:
    raise ValueError(
        f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPES))}")
  return DTYPES[name]


def _fixed_padding(kernel_size: int) -> tuple[int, int]:
  # SimCLR's `fixed_padding`: pad k-1 in total, the smaller half first, so a
  # strided conv sees the same borders whatever the input size (TF's 'SAME'
  # would pad asymmetrically depending on the size). For stride 1 this is
  # exactly 'SAME'.
  pad_total = kernel_size - 1
  pad_beg = pad_total // 2
  return pad_beg, pad_total - pad_beg


class Conv(nn.Module):
  """2-D convolution without bias, with SimCLR's padding rule.

  Stride 1 pads 'SAME'; stride > 1 pads (k-1)//2 before and the rest after,
  then convolves 'VALID' (SimCLR's `conv2d_fixed_padding`). The parameter
  layout is `nn.Conv`'s: one `kernel` of shape `[k, k, in, out]`, float32.

  Attributes:
    features: output channels.
    kernel_size: side of the square kernel.
    strides: stride along height and width.
    dtype: compute dtype; the input and the kernel are cast to it.
    kernel_init: kernel initializer.
    impl: `fastconv.conv2d` implementation: 'auto' (im2col matmuls or
      Winograd on CPU, `lax.conv_general_dilated` on TPU/GPU), 'im2col' or
      'xla'.

  References:
    google-research/simclr `resnet.py:conv2d_fixed_padding`.
  """
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32
  kernel_init: Initializer = conv_kernel_init
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the convolution.

    Args:
      x: `[batch, height, width, in_channels]`, global or per-shard.

    Returns:
      `[batch, out_height, out_width, features]` in `dtype`.
    """
    for field in ('features', 'kernel_size', 'strides'):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'Conv {field}={value!r} must be a positive integer')
    if x.ndim != 4:
      raise ValueError(
          f'Conv input has shape {x.shape}; expected [batch, H, W, C]')
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, x.shape[-1], self.features), jnp.float32)
    padding = _fixed_padding(k)
    return fastconv.conv2d(x.astype(self.dtype), kernel.astype(self.dtype),
                           strides=self.strides, padding=(padding, padding),
                           impl=self.impl)


def conv(features: int, kernel_size: int, strides: int = 1, *, name: str,
         dtype: Any, kernel_init: Initializer = conv_kernel_init,
         impl: str = 'auto') -> nn.Module:
  """Builds the convolution every encoder uses (the one plug-in point).

  Args:
    features: output channels.
    kernel_size: side of the square kernel.
    strides: stride along height and width.
    name: submodule name; must not contain 'bn' or 'norm'.
    dtype: compute dtype.
    kernel_init: kernel initializer (TF1 variance scaling by default).
    impl: convolution implementation (`Conv.impl`).

  Returns:
    A Linen module mapping `[B, H, W, C]` to `[B, H', W', features]`, with a
    single float32 `kernel` param of shape `[k, k, C, features]`.
  """
  return Conv(features=features, kernel_size=kernel_size, strides=strides,
              dtype=dtype, kernel_init=kernel_init, impl=impl, name=name)


class BatchNorm(nn.Module):
  """BatchNorm over the global batch, optionally in equal contiguous groups.

  In training the batch statistics are taken over every axis but the last;
  the variance is the biased one, computed in float32 as E[x^2] - E[x]^2
  like `nn.BatchNorm` (one fused reduction, one all-reduce when sharded; it
  loses digits only for a channel whose |mean| is far above its std).
  Called under `jax.jit` on a batch sharded over devices they are the
  statistics of the global batch, so no `axis_name` is needed. With
  `num_groups = G` the batch `[B, ...]` is split into G contiguous slices of
  B/G examples and each slice is normalised with its own statistics; when
  the slices coincide with device shards this is per-device BN (MoCo v2
  shuffle-BN) or per-node BN (SwAV), computed without communication.

  Running averages: `mean <- momentum * mean + (1 - momentum) * m` and the
  same for `var`, where m (and the variance) is the average over the G groups
  of the group statistics (for G = 1, the batch statistics). PyTorch DDP
  would instead keep rank 0's group statistics; the average over groups is
  the less noisy estimate of the same quantity. Nothing is updated while the
  module is being initialised (as `nn.BatchNorm`).

  Statistics and normalisation run in float32; the output is cast to
  `dtype`. Params (float32): `scale` (if `use_scale`) and `bias` (if
  `use_bias`); collection 'batch_stats': `mean`, `var`.

  Attributes:
    momentum: decay of the running averages (0.9 in every official recipe).
    epsilon: added to the variance (1e-5 in every official recipe).
    num_groups: number of equal contiguous batch slices with separate
      statistics; must divide the batch.
    use_scale: learn a scale gamma (False: PyTorch `affine=False`).
    use_bias: learn an offset beta (False: TF `center=False`).
    scale_init: initializer of gamma (zeros for zero-init residual blocks).
    bias_init: initializer of beta.
    dtype: output dtype.
    impl: training-mode gradient (`BN_IMPLS`): 'fused' is
      `fused_norm.normalize`'s hand-written VJP (float32 only; the residual
      add and ReLU fused in), 'autodiff' is JAX's autodiff of the same
      forward, 'auto' picks 'fused' for float32 on a CPU backend.

  References:
    Ioffe & Szegedy, 2015; google-research/simclr `resnet.py` (global_bn);
    facebookresearch/moco `builder.py:_batch_shuffle_ddp`;
    facebookresearch/swav `main_swav.py` (syncbn_process_group_size).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  num_groups: int = 1
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               residual: jax.Array | None = None,
               relu: bool = False) -> jax.Array:
    """Normalises `x` with batch statistics (train) or running averages.

    Args:
      x: `[batch, ..., features]`, the global batch (sharded or not).
      train: use and update batch statistics; else use running averages.
      residual: optional array shaped like `x`, added to the output (a
        residual block's shortcut).
      relu: apply ReLU last (after the residual).

    Returns:
      An array shaped like `x`, in `dtype`.
    """
    if not isinstance(self.num_groups, int) or self.num_groups <= 0:
      raise ValueError(
          f'BatchNorm num_groups={self.num_groups!r} must be a positive '
          'integer')
    if self.impl not in BN_IMPLS:
      raise ValueError(f'BatchNorm impl={self.impl!r}; known: '
                       f"{', '.join(BN_IMPLS)}")
    if residual is not None and residual.shape != x.shape:
      raise ValueError(f'BatchNorm residual shape {residual.shape} differs '
                       f'from the input shape {x.shape}')
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,),
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,),
                           jnp.float32)
    scale = (self.param('scale', self.scale_init, (features,), jnp.float32)
             if self.use_scale else None)
    bias = (self.param('bias', self.bias_init, (features,), jnp.float32)
            if self.use_bias else None)
    if train and x.shape[0] % self.num_groups:
      raise ValueError(
          f'BatchNorm batch size {x.shape[0]} is not divisible by '
          f'num_groups={self.num_groups}; use a batch that is a multiple of '
          'it')
    if train and self._use_fused(x, residual):
      y, mean, var = fused_norm.normalize(
          x.astype(jnp.float32),
          jnp.ones((features,)) if scale is None else scale,
          jnp.zeros((features,)) if bias is None else bias,
          num_groups=self.num_groups, epsilon=self.epsilon,
          residual=None if residual is None else residual.astype(
              jnp.float32), relu=relu)
      y = y.astype(self.dtype)
    else:
      if train:
        mean, var = fused_norm.group_statistics(x.astype(jnp.float32),
                                                self.num_groups)
      else:
        mean, var = ra_mean.value[None], ra_var.value[None]
      y = fused_norm.affine(x, mean, var, scale, bias,
                            self.epsilon).astype(self.dtype)
      if residual is not None:
        y = y + residual
      if relu:
        y = nn.relu(y)
    if train and not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean.mean(0)
      ra_var.value = m * ra_var.value + (1 - m) * var.mean(0)
    return y

  def _use_fused(self, x: jax.Array, residual: jax.Array | None) -> bool:
    if self.impl != 'auto':
      return self.impl == 'fused'
    float32 = all(a is None or a.dtype == jnp.float32
                  for a in (x, residual)) and self.dtype == jnp.float32
    return float32 and jax.default_backend() == 'cpu'
