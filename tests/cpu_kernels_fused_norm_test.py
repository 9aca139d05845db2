"""Tests for jaxssl.cpu_kernels.fused_norm and its `FusedBatchNorm`.

The hand-written VJP is checked against JAX's autodiff of a textbook
float64 BatchNorm (two-pass variance), written here, and against
`layers.BatchNorm` (JAX's autodiff of the same forward), for values, running statistics and the
gradients of x, gamma, beta and the residual.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl.cpu_kernels import fused_norm
from jaxssl.models import layers

_MODULES = {'fused': fused_norm.FusedBatchNorm, 'autodiff': layers.BatchNorm}

_SHAPES = [(32, 5), (16, 3, 3, 4)]


def _inputs(shape, seed=0):
  """x (group offsets of a few std), gamma, beta, residual, cotangent w."""
  rng = np.random.default_rng(seed)
  slices = np.arange(shape[0]) // (shape[0] // 4)
  expand = (slice(None),) + (None,) * (len(shape) - 1)
  x = rng.normal(size=shape) * (1 + 0.5 * slices[expand]) + slices[expand]
  features = shape[-1]
  return dict(
      x=x.astype(np.float32),
      scale=rng.uniform(0.5, 2.0, features).astype(np.float32),
      bias=rng.normal(size=features).astype(np.float32),
      residual=rng.normal(size=shape).astype(np.float32),
      w=rng.normal(size=shape).astype(np.float32))


def _reference(x, scale, bias, residual, num_groups, epsilon, relu):
  """Textbook BN in the input's dtype: `(y, group means, group vars)`."""
  xg = x.reshape((num_groups, -1, x.shape[-1]))
  mean = xg.mean(1)
  var = jnp.square(xg - mean[:, None]).mean(1)
  y = (xg - mean[:, None]) / jnp.sqrt(var[:, None] + epsilon) * scale + bias
  y = y.reshape(x.shape)
  if residual is not None:
    y = y + residual
  if relu:
    y = jnp.maximum(y, 0.0)
  return y, mean, var


def _float64_grads(inputs, num_groups, relu, with_residual, stat_weights):
  """Values and grads of sum(y w) [+ stats . weights] in float64."""
  with jax.enable_x64(True):
    args = {k: jnp.asarray(v, jnp.float64) for k, v in inputs.items()}

    def loss(x, scale, bias, residual):
      y, mean, var = _reference(x, scale, bias,
                                residual if with_residual else None,
                                num_groups, 1e-5, relu)
      total = jnp.sum(y * args['w'])
      if stat_weights is not None:
        total += jnp.sum(mean * stat_weights[0]) + jnp.sum(
            var * stat_weights[1])
      return total, y

    grads, y = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        args['x'], args['scale'], args['bias'], args['residual'])
    return np.asarray(y), [np.asarray(g) for g in grads]


def _assert_close(got, want, name):
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale,
                             err_msg=name)


@pytest.mark.parametrize('shape', _SHAPES)
@pytest.mark.parametrize('num_groups', [1, 4])
@pytest.mark.parametrize('relu', [False, True])
@pytest.mark.parametrize('with_residual', [False, True])
@pytest.mark.parametrize('stats_cotangent', [False, True])
def test_normalize_matches_float64_autodiff(shape, num_groups, relu,
                                            with_residual, stats_cotangent):
  inputs = _inputs(shape)
  features = shape[-1]
  rng = np.random.default_rng(3)
  stat_weights = (rng.normal(size=(2, num_groups, features)).astype(
      np.float32) if stats_cotangent else None)

  def loss(x, scale, bias, residual):
    y, mean, var = fused_norm.normalize(
        x, scale, bias, num_groups=num_groups, epsilon=1e-5,
        residual=residual if with_residual else None, relu=relu)
    total = jnp.sum(y * inputs['w'])
    if stat_weights is not None:
      total += jnp.sum(mean * stat_weights[0]) + jnp.sum(
          var * stat_weights[1])
    return total, y

  grads, y = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      inputs['x'], inputs['scale'], inputs['bias'], inputs['residual'])
  want_y, want_grads = _float64_grads(inputs, num_groups, relu,
                                      with_residual, stat_weights)
  _assert_close(y, want_y, 'y')
  for name, got, want in zip(('dx', 'dscale', 'dbias', 'dresidual'), grads,
                             want_grads):
    _assert_close(got, want, name)
  if not with_residual:
    np.testing.assert_array_equal(grads[3], 0.0)
  if relu:  # The mask matters on this data.
    assert (np.asarray(y) == 0).mean() > 0.1


def _module_grads(impl, inputs, num_groups, relu, use_scale=True,
                  use_bias=True):
  bn = _MODULES[impl](num_groups=num_groups, use_scale=use_scale,
                      use_bias=use_bias)
  variables = bn.init(jax.random.key(0, impl='rbg'), inputs['x'],
                      train=False)
  params = jax.tree.map(lambda p: p * 1.5 + 0.25,
                        variables.get('params', {}))

  def loss(params, x, residual):
    y, updates = bn.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x,
        train=True, residual=residual, relu=relu, mutable=['batch_stats'])
    return jnp.sum(y * inputs['w']), (y, updates['batch_stats'])

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
      params, inputs['x'], inputs['residual'])


@pytest.mark.parametrize('shape', _SHAPES)
@pytest.mark.parametrize('num_groups', [1, 4])
@pytest.mark.parametrize('affine', [(True, True), (True, False),
                                    (False, False)])
def test_module_fused_equals_autodiff(shape, num_groups, affine):
  inputs = _inputs(shape, seed=1)
  (grads, (y, stats)), (ref_grads, (ref_y, ref_stats)) = [
      _module_grads(impl, inputs, num_groups, relu=True, use_scale=affine[0],
                    use_bias=affine[1]) for impl in ('fused', 'autodiff')]
  _assert_close(y, ref_y, 'y')
  for name in ('mean', 'var'):
    np.testing.assert_allclose(stats[name], ref_stats[name], rtol=1e-6,
                               atol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    _assert_close(got, want, 'grad')


@pytest.mark.parametrize('num_groups', [1, 8])
def test_fused_on_8_devices_equals_1_device(mesh8, mesh1, num_groups):
  """Values and gradients of the fused VJP on a batch sharded 8 ways."""
  inputs = _inputs((32, 3, 3, 4), seed=2)

  def run(mesh):
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P('data')))
               for k, v in inputs.items() if k in ('x', 'residual', 'w')}
    return _module_grads('fused', dict(inputs, **sharded), num_groups,
                         relu=True)

  (grads8, (y8, stats8)), (grads1, (y1, stats1)) = run(mesh8), run(mesh1)
  _assert_close(y8, y1, 'y')
  for got, want in zip(jax.tree.leaves((grads8, stats8)),
                       jax.tree.leaves((grads1, stats1))):
    _assert_close(got, want, 'grad or statistic')


def _uses_custom_vjp(bn, x):
  variables = bn.init(jax.random.key(0, impl='rbg'), x, train=False)
  jaxpr = jax.make_jaxpr(lambda v, x: bn.apply(
      v, x, train=True, relu=True, mutable=['batch_stats']))(variables, x)
  return 'custom_vjp_call' in str(jaxpr)


def test_fused_module_takes_the_vjp_for_float32_only():
  x = jnp.ones((8, 3))
  assert _uses_custom_vjp(fused_norm.FusedBatchNorm(), x)
  assert not _uses_custom_vjp(
      fused_norm.FusedBatchNorm(dtype=jnp.bfloat16), x.astype(jnp.bfloat16))
  assert not _uses_custom_vjp(layers.BatchNorm(), x)


def test_bad_residual_shape():
  x = jnp.ones((8, 3))
  with pytest.raises(ValueError, match=r'residual shape \(8, 4\) differs'):
    fused_norm.FusedBatchNorm().init(jax.random.key(0), x, train=True,
                                     residual=jnp.ones((8, 4)))
