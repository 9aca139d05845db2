"""Tests of jaxssl/methods/common.py: the shared method toolkit.

Fixed expectations come from float64 numpy; every collective (the loss
island, the multi-crop layout on a sharded batch) is checked 8 devices
against 1 device, values and gradients.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl.methods import common


def _unit64(x):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def _sharded(x, mesh):
  return jax.device_put(x, NamedSharding(mesh, P('data')))


def _gathered_loss(a, b):
  """A per-shard body: each shard's rows against all rows (all_gather)."""
  keys = jax.lax.all_gather(b, common.DATA_AXIS, tiled=True)
  local = jnp.sum(jnp.tanh(a @ keys.T))
  return jax.lax.psum(local, common.DATA_AXIS) / (a.shape[0] * 8.0)


def test_island_on_8_devices_equals_the_global_formula(mesh1, mesh8):
  rs = np.random.RandomState(0)
  a = jnp.asarray(rs.normal(size=(16, 4)), jnp.float32)
  b = jnp.asarray(rs.normal(size=(16, 4)), jnp.float32)

  def loss(mesh, a, b):
    return common.island(_gathered_loss, mesh)(a, b)

  value8, grads8 = jax.jit(jax.value_and_grad(
      lambda a, b: loss(mesh8, a, b), argnums=(0, 1)))(
          _sharded(a, mesh8), _sharded(b, mesh8))
  value1, grads1 = jax.jit(jax.value_and_grad(
      lambda a, b: loss(mesh1, a, b), argnums=(0, 1)))(a, b)
  # On 8 devices the local batch is 2, so the normaliser is 16 = the
  # global batch; on 1 device it is 16 · 8: the island is per-shard code.
  expected = np.tanh(np.asarray(a, np.float64) @ np.asarray(b, np.float64).T)
  np.testing.assert_allclose(value8, expected.sum() / 16, rtol=1e-5)
  np.testing.assert_allclose(value1, expected.sum() / 128, rtol=1e-5)
  for g8, g1 in zip(grads8, grads1):
    np.testing.assert_allclose(g8, 8 * np.asarray(g1), rtol=1e-5, atol=1e-6)


class _Dense(nn.Module):
  """A per-example map (no BN): any batch layout gives the same rows."""
  features: int

  @nn.compact
  def __call__(self, x, *, train):
    del train
    return nn.Dense(self.features)(x.reshape(x.shape[0], -1))


class _MultiCrop(nn.Module):
  @nn.compact
  def __call__(self, views, *, train, num_chunks=1):
    return common.multicrop_embed(_Dense(6, name='encoder'),
                                  _Dense(5, name='head'), views, train=train,
                                  num_chunks=num_chunks)


@pytest.mark.parametrize('num_chunks', [1, 2, 4])
def test_multicrop_embed_returns_each_crop_in_view_order(num_chunks):
  rs = np.random.RandomState(1)
  big = jnp.asarray(rs.uniform(size=(8, 2, 4, 4, 1)), jnp.float32)
  small = jnp.asarray(rs.uniform(size=(8, 3, 2, 2, 1)), jnp.float32)
  net = _MultiCrop()
  # Init on big crops only, so both Dense layers see 16 inputs; small
  # crops are zero-padded to that size for the reference.
  small16 = jnp.pad(small, ((0, 0), (0, 0), (0, 2), (0, 2), (0, 0)))
  variables = net.init(jax.random.key(0), (big,), train=False)
  z = net.apply(variables, (big, small16), train=False,
                num_chunks=num_chunks)
  assert z.shape == (8, 5, 5)
  enc = variables['params']['encoder']['Dense_0']
  head = variables['params']['head']['Dense_0']
  crops = np.concatenate([np.asarray(big), np.asarray(small16)], axis=1)
  for v in range(5):
    h = crops[:, v].reshape(8, -1) @ enc['kernel'] + enc['bias']
    expected = _unit64(np.asarray(h, np.float64) @ head['kernel']
                       + head['bias'])
    np.testing.assert_allclose(z[:, v], expected, rtol=1e-5, atol=1e-6)


def test_multicrop_embed_on_8_devices_equals_1_device(mesh8):
  rs = np.random.RandomState(2)
  views = (jnp.asarray(rs.uniform(size=(16, 2, 4, 4, 1)), jnp.float32),)
  net = _MultiCrop()
  variables = net.init(jax.random.key(0), views, train=False)

  def loss(params, views):
    z = net.apply({'params': params}, views, train=False, num_chunks=8)
    return jnp.sum(z[:, 0] * z[:, 1])

  value1, grads1 = jax.jit(jax.value_and_grad(loss))(variables['params'],
                                                    views)
  value8, grads8 = jax.jit(jax.value_and_grad(loss))(
      variables['params'], jax.tree.map(lambda x: _sharded(x, mesh8), views))
  np.testing.assert_allclose(value8, value1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), grads8, grads1)


def test_ema_update_is_the_formula_without_gradient_into_online():
  rs = np.random.RandomState(3)
  target = {'w': jnp.asarray(rs.normal(size=(4,)), jnp.float32)}
  online = {'w': jnp.asarray(rs.normal(size=(4,)), jnp.float32)}
  out = common.ema_update(target, online, 0.9)
  expected = (0.9 * np.asarray(target['w'], np.float64)
              + 0.1 * np.asarray(online['w'], np.float64))
  np.testing.assert_allclose(out['w'], expected, rtol=1e-6)
  grad = jax.grad(lambda o: jnp.sum(common.ema_update(target, o, 0.9)['w']))(
      online)
  np.testing.assert_array_equal(grad['w'], np.zeros(4))


def test_ema_target_copies_and_moves_only_its_parts():
  ema = common.EmaTarget(parts=('encoder', 'projector'),
                         momentum=common.constant_momentum(0.75),
                         timing='before_forward')
  params = {'encoder': {'k': jnp.ones(2)}, 'projector': {'k': jnp.ones(3)},
            'predictor': {'k': jnp.ones(4)}}
  stats = {'encoder': {'mean': jnp.zeros(2)}}
  target = ema.copy_of(params, stats)
  assert set(target['params']) == {'encoder', 'projector'}
  assert target['params']['encoder']['k'] is not params['encoder']['k']
  moved = ema.update(target, jax.tree.map(lambda x: 3 * x, params), 0)
  np.testing.assert_allclose(moved['params']['projector']['k'], 1.5)
  assert moved['batch_stats'] is target['batch_stats']


def test_monitors_match_float64_numpy():
  rs = np.random.RandomState(4)
  q, k = rs.normal(size=(6, 5)), rs.normal(size=(6, 5))
  neg = rs.normal(size=(7, 5))
  qn, kn, nn_ = _unit64(q), _unit64(k), _unit64(neg)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  np.testing.assert_allclose(common.embedding_std(f32(q)),
                             qn.std(0).mean(), rtol=1e-5)
  np.testing.assert_allclose(common.mean_cosine(f32(q), f32(k)),
                             (qn * kn).sum(1).mean(), rtol=1e-5, atol=1e-7)
  pos = (qn * kn).sum(1)
  cos, acc = common.contrast_accuracy(f32(q), f32(k), f32(neg))
  np.testing.assert_allclose(cos, pos.mean(), rtol=1e-5, atol=1e-7)
  assert acc == np.mean(pos > (qn @ nn_.T).max(1))
  sims = qn @ kn.T
  np.fill_diagonal(sims, -np.inf)
  cos, acc = common.in_batch_accuracy(f32(q), f32(k))
  np.testing.assert_allclose(cos, pos.mean(), rtol=1e-5, atol=1e-7)
  assert acc == np.mean(pos > sims.max(1))


def test_assignment_metrics_bounds():
  uniform = jnp.full((8, 4), 0.25)
  m = common.assignment_metrics(uniform)
  np.testing.assert_allclose(m['code_entropy'], np.log(4), rtol=1e-6)
  assert m['prototype_usage_entropy'] == 0.0  # argmax ties pick cluster 0
  spread = jax.nn.one_hot(jnp.arange(8) % 4, 4)
  m = common.assignment_metrics(spread)
  np.testing.assert_allclose(m['prototype_usage_entropy'], np.log(4),
                             rtol=1e-6)
  assert m['code_entropy'] == 0.0


def test_resolve_bn_groups():
  assert common.resolve_bn_groups(0, 8, 32, 'x.bn_groups') == 8
  assert common.resolve_bn_groups(2, 8, 32, 'x.bn_groups') == 2
  with pytest.raises(ValueError, match='x.bn_groups=0 gives 8 BatchNorm '
                     'groups, which do not divide global_batch_size=12'):
    common.resolve_bn_groups(0, 8, 12, 'x.bn_groups')


def test_shard_batch_keeps_values_and_shards_over_data(mesh8):
  x = jnp.arange(32.0).reshape(16, 2)
  y = jax.jit(lambda x: common.shard_batch(x * 2, mesh8))(x)
  np.testing.assert_array_equal(y, 2 * np.asarray(x))
  assert y.sharding.spec == P('data')


def test_ema_update_matches_formula():
  rng = np.random.default_rng(3)
  target = {'a': rng.normal(size=(3, 4)), 'b': {'c': rng.normal(size=(5,))}}
  online = jax.tree.map(lambda x: x + rng.normal(size=x.shape), target)
  as_f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                                     tree)
  tau = 0.99
  out = jax.jit(common.ema_update)(as_f32(target), as_f32(online),
                                   jnp.float32(tau))
  expected = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, target, online)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('tau, pick', [(1., 'target'), (0., 'online')])
def test_ema_update_endpoints(tau, pick):
  target = {'w': jnp.full((2,), 3., jnp.float32)}
  online = {'w': jnp.full((2,), -1., jnp.float32)}
  out = common.ema_update(target, online, tau)
  np.testing.assert_array_equal(out['w'], (target if pick == 'target'
                                           else online)['w'])


def test_ema_update_keeps_leaf_dtype():
  target = {'w': jnp.ones((4,), jnp.bfloat16)}
  online = {'w': jnp.zeros((4,), jnp.float32)}
  out = common.ema_update(target, online, 0.75)
  assert out['w'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out['w'], np.float32), 0.75)
