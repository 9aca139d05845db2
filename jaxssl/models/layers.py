"""Building blocks shared by every encoder and head: conv, BatchNorm, inits.

Encoders take their convolution and BatchNorm as flax-style factories
(`conv=Conv`, `norm=BatchNorm` by default, as flax's examples/imagenet
ResNet), so a platform-specific implementation with the same parameters
(`jaxssl.cpu_kernels`) is swapped in from outside the model; this module
has no backend check. `BatchNorm` runs in the global view: under `jax.jit`
on a batch sharded over the `'data'` mesh axis its statistics are those of
the whole global batch (exact cross-replica BN, as SimCLR's `global_bn`,
BYOL's `cross_replica_axis` and MoCo v3's SyncBN), and `num_groups` gives
per-group statistics (MoCo v2 shuffle-BN, SwAV's per-node SyncBN) without
any collective.

Parameters are always float32; `dtype` is the compute dtype. Naming rule
relied on by `jaxssl.optim`: every BatchNorm submodule has 'bn' or 'norm' in
its name, no other module does, and only BatchNorm and Dense layers have a
`bias` leaf.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Initializer = Callable[..., jax.Array]
# A flax-style module factory: a Module class or a `functools.partial` of one.
ModuleDef = Any

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_CONV_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')

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
  The product is `lax.conv_general_dilated`; a subclass may override
  `convolve` (same values, same parameters), e.g. `cpu_kernels.CpuConv`.

  Attributes:
    features: output channels.
    kernel_size: side of the square kernel.
    strides: stride along height and width.
    dtype: compute dtype; the input and the kernel are cast to it.
    kernel_init: kernel initializer.

  References:
    google-research/simclr `resnet.py:conv2d_fixed_padding`.
  """
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32
  kernel_init: Initializer = conv_kernel_init

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
    return self.convolve(x.astype(self.dtype), kernel.astype(self.dtype),
                         (padding, padding))

  def convolve(self, x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
    """`x [B, H, W, C]` * `kernel [k, k, C, features]`, explicit `pads`."""
    return lax.conv_general_dilated(x, kernel, (self.strides,) * 2, pads,
                                    dimension_numbers=_CONV_DIMENSIONS)


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
    if train:
      mean, var = group_statistics(x.astype(jnp.float32), self.num_groups)
    else:
      mean, var = ra_mean.value[None], ra_var.value[None]
    y = affine(x, mean, var, scale, bias, self.epsilon).astype(self.dtype)
    if residual is not None:
      y = y + residual
    if relu:
      y = nn.relu(y)
    if train and not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean.mean(0)
      ra_var.value = m * ra_var.value + (1 - m) * var.mean(0)
    return y


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
  """`[B, ..., C]` -> `[G, B * ... / G, C]` (a view)."""
  return x.reshape(num_groups, -1, x.shape[-1])


def group_statistics(x: jax.Array,
                     num_groups: int) -> tuple[jax.Array, jax.Array]:
  """BatchNorm's per-group batch statistics.

  Args:
    x: `[batch, ..., C]` float32, the global batch; `num_groups` must
      divide the batch (checked by the caller).
    num_groups: contiguous batch slices with separate statistics.

  Returns:
    `(mean, var)`, each `[num_groups, C]`: the biased variance as
    E[x^2] - E[x]^2 (one fused reduction, as `nn.BatchNorm`), clipped at 0
    where it rounds below.
  """
  if num_groups == 1:
    # 2-D, as in `affine`: no [1, M, C] reductions (see there).
    x2 = x.reshape(-1, x.shape[-1])
    mean = x2.mean(0)[None]
    var = jnp.square(x2).mean(0)[None] - jnp.square(mean)
  else:
    xg = _grouped(x, num_groups)
    mean = xg.mean(1)
    var = jnp.square(xg).mean(1) - jnp.square(mean)
  return mean, jnp.maximum(0.0, var)


def affine(x: jax.Array, mean: jax.Array, var: jax.Array,
           scale: jax.Array | None, bias: jax.Array | None,
           epsilon: float) -> jax.Array:
  """`(x - mean) * rsqrt(var + eps) * scale + bias`, per group.

  With one group (`G = 1`, every BN but MoCo v2's shuffle-BN and SwAV's
  per-node BN) the map runs on `x` as it is, broadcasting `[C]` vectors;
  with G > 1 on the `[G, M, C]` view. The one-group form matters on
  XLA:CPU: through `[1, M, C]` the reductions of autodiff's backward
  (the gradients of the mean, scale and bias) are middle-axis reductions,
  which XLA:CPU hands to YNNPACK, and the quickstart step ran 2.6x slower
  (docs/benchmarks.md, "BatchNorm with one group").

  Args:
    x: `[batch, ..., C]`, any float dtype; computed in float32.
    mean: `[G, C]` statistics of `G` contiguous batch groups (batch or
      running averages; G divides the batch).
    var: `[G, C]`, likewise.
    scale: `[C]` gamma, or None for none.
    bias: `[C]` beta, or None for none.
    epsilon: added to the variance.

  Returns:
    float32, shaped like `x`.
  """
  mul = lax.rsqrt(var + epsilon)
  if scale is not None:
    mul = mul * scale
  x = x.astype(jnp.float32)
  if mean.shape[0] == 1:
    y = (x - mean[0]) * mul[0]
  else:
    y = ((_grouped(x, mean.shape[0]) - mean[:, None]) * mul[:, None]
         ).reshape(x.shape)
  if bias is not None:
    y = y + bias
  return y
