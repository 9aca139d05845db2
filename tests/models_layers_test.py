"""Tests for jaxssl.models.layers: Conv padding/init and BatchNorm semantics.

The padding test also runs `cpu_kernels.CpuConv`, which must match
`layers.Conv`. Expected values come from float64 numpy implementations of the textbook
formulas (cross-correlation with explicit padding; batch normalisation with
biased variance), never from the code under test.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl import cpu_kernels
from jaxssl.models import layers

# RBG keys: threefry (jax_threefry_partitionable) takes seconds to compile
# per random op on CPU; the tests need init values, not a particular stream.
_KEY = jax.random.key(0, impl='rbg')


def _np_conv(x, kernel, stride, pads):
  """float64 NHWC cross-correlation with explicit (before, after) padding."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pads, pads, (0, 0)))
  kernel = np.asarray(kernel, np.float64)
  k = kernel.shape[0]
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j, :] = np.einsum('bhwc,hwco->bo', patch, kernel)
  return out


# (kernel, stride, side, SimCLR fixed padding, TF 'SAME' padding): fixed
# padding puts (k-1)//2 first; TF's SAME for a stride-2 conv on an even side
# pads less before, which is what SimCLR avoids.
_CONV_CASES = [
    (3, 1, 5, (1, 1), (1, 1)),
    (3, 2, 8, (1, 1), (0, 1)),
    (3, 2, 7, (1, 1), (1, 1)),
    (7, 2, 10, (3, 3), (2, 3)),
    (1, 2, 6, (0, 0), (0, 0)),
    (2, 1, 5, (0, 1), (0, 1)),
]


@pytest.mark.parametrize('conv', [layers.Conv, cpu_kernels.CpuConv])
@pytest.mark.parametrize('k,stride,side,fixed,same', _CONV_CASES)
def test_conv_uses_simclr_fixed_padding(conv, k, stride, side, fixed, same):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, side, side, 3)).astype(np.float32)
  module = conv(features=4, kernel_size=k, strides=stride, name='c',
                dtype=jnp.float32)
  variables = module.init(_KEY, x)
  kernel = variables['params']['kernel']
  out = module.apply(variables, x)
  expected = _np_conv(x, kernel, stride, fixed)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  if same != fixed:  # The test can tell the two rules apart.
    assert np.abs(_np_conv(x, kernel, stride, same) - expected).max() > 1e-2


def test_conv_param_layout_is_nn_conv_and_bias_free():
  x = jnp.zeros((1, 6, 6, 5))
  module = layers.Conv(features=7, kernel_size=3, strides=2, name='c',
                       dtype=jnp.bfloat16)
  variables = module.init(_KEY, x)
  theirs = jax.eval_shape(
      nn.Conv(7, (3, 3), use_bias=False).init, _KEY, x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == (
      jax.tree.map(lambda a: (a.shape, a.dtype), theirs))
  assert variables['params']['kernel'].dtype == jnp.float32
  assert module.apply(variables, x).dtype == jnp.bfloat16


def test_conv_kernel_init_is_tf1_variance_scaling():
  fan_in = 3 * 3 * 64
  kernel = layers.Conv(features=64, kernel_size=3, name='c',
                       dtype=jnp.float32).init(
      _KEY, jnp.zeros((1, 4, 4, 64)))['params']['kernel']
  kernel = np.asarray(kernel, np.float64)
  # TF1 truncated normal: the stddev of the result is sqrt(1 / fan_in); it
  # is drawn from N(0, s0^2) cut at 2 * s0, s0 = sqrt(1/fan_in) / 0.8796.
  assert abs(kernel.std() * np.sqrt(fan_in) - 1.0) < 0.03
  s0 = np.sqrt(1.0 / fan_in) / 0.87962566103423978
  assert np.abs(kernel).max() <= 2 * s0 * (1 + 1e-5)
  assert np.abs(kernel).max() > 1.9 * s0


@pytest.mark.parametrize('field,value', [
    ('features', 0), ('kernel_size', -1), ('strides', 0)])
def test_conv_rejects_bad_sizes(field, value):
  kwargs = dict(features=4, kernel_size=3, strides=1, name='c',
                dtype=jnp.float32)
  kwargs[field] = value
  with pytest.raises(ValueError, match=f'{field}={value}'):
    layers.Conv(**kwargs).init(_KEY, jnp.zeros((1, 4, 4, 2)))


def _np_batch_norm(x, scale, bias, eps, num_groups):
  """float64 BN over contiguous groups; returns (y, group means, vars)."""
  x = np.asarray(x, np.float64)
  groups = x.reshape((num_groups, -1) + x.shape[1:])
  ys, means, variances = [], [], []
  for g in groups:
    axes = tuple(range(g.ndim - 1))
    mean = g.mean(axes)
    var = ((g - mean)**2).mean(axes)
    ys.append((g - mean) / np.sqrt(var + eps) * scale + bias)
    means.append(mean)
    variances.append(var)
  return np.concatenate(ys).reshape(x.shape), np.stack(means), np.stack(
      variances)


def _bn_inputs(shape, seed=0):
  """Data whose 8 contiguous slices have different means and scales.

  The offsets stay within a few standard deviations, the regime of real
  activations: E[x^2] - E[x]^2 in float32 (nn.BatchNorm's formula, kept
  here) loses digits when a channel's |mean| is far above its std.
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape)
  slices = np.arange(shape[0]) // (shape[0] // 8)
  expand = (slice(None),) + (None,) * (len(shape) - 1)
  x = x * (1.0 + 0.25 * slices)[expand] + slices[expand]
  return (x + rng.normal(size=shape[-1])).astype(np.float32)


def _bn_variables(features, seed=1):
  rng = np.random.default_rng(seed)
  return {
      'params': {'scale': rng.uniform(0.5, 2.0, features).astype(np.float32),
                 'bias': rng.normal(size=features).astype(np.float32)},
      'batch_stats': {
          'mean': rng.normal(size=features).astype(np.float32),
          'var': rng.uniform(0.5, 2.0, features).astype(np.float32)},
  }


@pytest.mark.parametrize('shape', [(32, 5), (16, 3, 3, 4)])
@pytest.mark.parametrize('num_groups', [1, 2, 4, 8])
def test_batch_norm_train_matches_numpy_per_group(shape, num_groups):
  x = _bn_inputs(shape)
  variables = _bn_variables(shape[-1])
  momentum, eps = 0.9, 1e-5
  bn = layers.BatchNorm(momentum=momentum, epsilon=eps, num_groups=num_groups)
  y, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  p, s = variables['params'], variables['batch_stats']
  y_np, means, variances = _np_batch_norm(x, p['scale'], p['bias'], eps,
                                          num_groups)
  np.testing.assert_allclose(y, y_np, rtol=1e-4, atol=1e-4)
  # Documented update: the mean over groups of the group statistics.
  np.testing.assert_allclose(
      updates['batch_stats']['mean'],
      momentum * s['mean'] + (1 - momentum) * means.mean(0), rtol=1e-5,
      atol=1e-5)
  np.testing.assert_allclose(
      updates['batch_stats']['var'],
      momentum * s['var'] + (1 - momentum) * variances.mean(0), rtol=1e-5,
      atol=1e-5)
  if num_groups > 1:  # Grouping must change the result on this data.
    y_global, _, _ = _np_batch_norm(x, p['scale'], p['bias'], eps, 1)
    assert np.abs(y_global - y_np).max() > 0.1


def test_batch_norm_eval_uses_running_averages():
  x = _bn_inputs((8, 2, 2, 3))
  variables = _bn_variables(3)
  y = layers.BatchNorm(epsilon=1e-3, num_groups=4).apply(
      variables, x, train=False)
  p, s = variables['params'], variables['batch_stats']
  expected = ((x.astype(np.float64) - s['mean']) /
              np.sqrt(s['var'].astype(np.float64) + 1e-3) * p['scale'] +
              p['bias'])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_init_does_not_update_running_averages():
  variables = layers.BatchNorm().init(
      _KEY, _bn_inputs((8, 3)) + 5.0, train=True)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], 0.0)
  np.testing.assert_array_equal(variables['batch_stats']['var'], 1.0)
  np.testing.assert_array_equal(variables['params']['scale'], 1.0)
  np.testing.assert_array_equal(variables['params']['bias'], 0.0)


@pytest.mark.parametrize('use_scale,use_bias,expected', [
    (True, True, {'scale', 'bias'}),
    (True, False, {'scale'}),
    (False, False, set()),
])
def test_batch_norm_affine_flags(use_scale, use_bias, expected):
  x = _bn_inputs((8, 3))
  variables = layers.BatchNorm(use_scale=use_scale, use_bias=use_bias).init(
      _KEY, x, train=True)
  assert set(variables.get('params', {})) == expected
  y = layers.BatchNorm(use_scale=use_scale, use_bias=use_bias).apply(
      variables, x, train=True, mutable=['batch_stats'])[0]
  y_np, _, _ = _np_batch_norm(x, 1.0, 0.0, 1e-5, 1)
  np.testing.assert_allclose(y, y_np, rtol=1e-4, atol=1e-4)


def test_batch_norm_scale_init():
  variables = layers.BatchNorm(scale_init=jax.nn.initializers.zeros).init(
      _KEY, jnp.ones((4, 3)), train=True)
  np.testing.assert_array_equal(variables['params']['scale'], 0.0)


def test_batch_norm_bfloat16_computes_stats_in_float32():
  x = _bn_inputs((16, 6)).astype(jnp.bfloat16)
  variables = _bn_variables(6)
  bn = layers.BatchNorm(dtype=jnp.bfloat16)
  y, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16
  assert updates['batch_stats']['mean'].dtype == jnp.float32
  assert updates['batch_stats']['var'].dtype == jnp.float32
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  y_np, means, _ = _np_batch_norm(x64, variables['params']['scale'],
                                  variables['params']['bias'], 1e-5, 1)
  np.testing.assert_allclose(np.asarray(y, np.float64), y_np, rtol=2e-2,
                             atol=2e-2)
  # float32 statistics: the running mean is exact to float32 precision
  # (bfloat16 accumulation would be off by ~1e-2 at these magnitudes).
  np.testing.assert_allclose(
      updates['batch_stats']['mean'],
      0.9 * variables['batch_stats']['mean'] + 0.1 * means[0], rtol=1e-5,
      atol=1e-5)


@pytest.mark.parametrize('batch,num_groups', [(6, 4), (8, 3)])
def test_batch_norm_rejects_indivisible_groups(batch, num_groups):
  with pytest.raises(ValueError, match=f'batch size {batch} is not divisible'
                     f' by num_groups={num_groups}'):
    layers.BatchNorm(num_groups=num_groups).init(
        _KEY, jnp.ones((batch, 3)), train=True)


@pytest.mark.parametrize('num_groups', [1, 8])
def test_batch_norm_on_8_devices_equals_full_batch(mesh8, mesh1, num_groups):
  """Global-view BN on a batch sharded over 8 devices is full-batch BN."""
  x = _bn_inputs((32, 3, 3, 4))
  variables = _bn_variables(4)
  bn = layers.BatchNorm(momentum=0.9, epsilon=1e-5, num_groups=num_groups)
  step = jax.jit(lambda v, x: bn.apply(v, x, train=True,
                                       mutable=['batch_stats']))
  x8 = jax.device_put(x, NamedSharding(mesh8, P('data')))
  x1 = jax.device_put(x, NamedSharding(mesh1, P('data')))
  assert len(x8.addressable_shards) == 8
  assert x8.addressable_shards[0].data.shape == (4, 3, 3, 4)
  y8, stats8 = step(variables, x8)
  y1, stats1 = step(variables, x1)
  np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-5)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(stats8['batch_stats'][name],
                               stats1['batch_stats'][name], rtol=1e-5,
                               atol=1e-6)
  p, s = variables['params'], variables['batch_stats']
  y_np, means, variances = _np_batch_norm(x, p['scale'], p['bias'], 1e-5,
                                          num_groups)
  np.testing.assert_allclose(y8, y_np, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats8['batch_stats']['mean'],
                             0.9 * s['mean'] + 0.1 * means.mean(0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats8['batch_stats']['var'],
                             0.9 * s['var'] + 0.1 * variances.mean(0),
                             rtol=1e-5, atol=1e-5)
  # Control: on this data per-device statistics would be far off.
  y_local, _, _ = _np_batch_norm(x, p['scale'], p['bias'], 1e-5, 8)
  if num_groups == 1:
    assert np.abs(y_local - y_np).max() > 0.1


@pytest.mark.parametrize('name,expected', [
    ('float32', jnp.float32), ('bfloat16', jnp.bfloat16)])
def test_dtype_from_name(name, expected):
  assert layers.dtype_from_name(name) == expected


def test_dtype_from_name_rejects_unknown_name():
  with pytest.raises(ValueError,
                     match=r"^unknown dtype 'fp16'; known: bfloat16, float32$"):
    layers.dtype_from_name('fp16')
