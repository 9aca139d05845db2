"""SimCLR method: the official objective, joint BN over both views, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import make_method, load_config
from jaxssl import cpu_kernels
from jaxssl import methods
from jaxssl.methods import common
from jaxssl.models import layers


def _reference_official_loss(z1, z2, temperature):
  """tf2/objective.py:add_contrastive_loss on one replica, float64 numpy."""
  h = np.concatenate([z1, z2]).astype(np.float64)
  h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-6)
  h1, h2 = np.split(h, 2)
  n = len(h1)
  masks = np.eye(n)
  aa = h1 @ h1.T / temperature - masks * 1e9
  bb = h2 @ h2.T / temperature - masks * 1e9
  ab = h1 @ h2.T / temperature
  ba = h2 @ h1.T / temperature

  def ce(logits):  # label i at column i of the first block
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[np.arange(n), np.arange(n)]

  loss_a = ce(np.concatenate([ab, aa], 1))
  loss_b = ce(np.concatenate([ba, bb], 1))
  return np.mean(loss_a + loss_b)


def _method(mesh, **overrides):
  config = load_config('simclr_tiny', **overrides)
  return config, make_method(config, mesh, steps_per_epoch=64, total_steps=8)


def _batch(n, size, seed=0):
  views = np.random.RandomState(seed).uniform(size=(n, 2, size, size, 1))
  return {'views': (jnp.asarray(views, jnp.float32),),
          'label': jnp.zeros((n,), jnp.int32)}


def test_loss_is_the_official_objective(mesh1):
  config, method = _method(mesh1)
  params, batch_stats, extra = method.init(jax.random.key(0))
  batch = _batch(16, config.dataset.image_size)
  loss, (_, _, metrics, _) = method.loss_fn(params, batch_stats, extra, batch,
                                         jax.random.key(1), 0)
  x = batch['views'][0].reshape((32,) + batch['views'][0].shape[2:])
  _, z = method.net.apply({'params': params, 'batch_stats': batch_stats}, x,
                          train=True, mutable=['batch_stats'])[0]
  z = np.asarray(z).reshape(16, 2, -1)
  expected = _reference_official_loss(z[:, 0], z[:, 1],
                                      config.simclr.temperature)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert metrics['loss'] == loss
  assert 0.0 <= metrics['contrast_acc'] <= 1.0
  assert metrics['embedding_std'] > 0


def test_batchnorm_statistics_cover_both_views_together(mesh1):
  config, method = _method(mesh1)
  params, batch_stats, extra = method.init(jax.random.key(0))
  batch = _batch(8, config.dataset.image_size, seed=3)
  _, (new_stats, _, _, _) = method.loss_fn(params, batch_stats, extra, batch,
                                        jax.random.key(1), 0)

  def stats_after(views):
    x = batch['views'][0][:, list(views)]
    x = x.reshape((-1,) + x.shape[2:])
    return method.net.apply({'params': params, 'batch_stats': batch_stats},
                            x, train=True,
                            mutable=['batch_stats'])[1]['batch_stats']

  joint, first_only = stats_after((0, 1)), stats_after((0,))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-7), new_stats, joint)
  differs = jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.allclose(a, b, rtol=1e-3), new_stats, first_only))
  assert any(differs)


def test_eight_devices_give_the_same_loss_and_gradients(mesh1, mesh8):
  config, m1 = _method(mesh1)
  _, m8 = _method(mesh8)
  params, batch_stats, extra = m1.init(jax.random.key(0))
  batch = _batch(16, config.dataset.image_size, seed=5)

  def value_and_grad(method, batch):
    fn = functools.partial(method.loss_fn, batch_stats=batch_stats,
                           extra=extra, batch=batch, rng=jax.random.key(1),
                           step=0)
    return jax.jit(jax.value_and_grad(lambda p: fn(p)[0]))(params)

  sharded = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh8, P('data'))), batch)
  loss1, grads1 = value_and_grad(m1, batch)
  loss8, grads8 = value_and_grad(m8, sharded)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  # float32 reductions run in a different order on 8 devices: compare each
  # gradient tensor to 1e-5 of its own scale.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), grads8, grads1)


@pytest.mark.parametrize('overrides, match', [
    ({'simclr.temperature': -1.0}, 'simclr.temperature=-1.0 must be > 0'),
    ({'simclr.loss_block_size': -4}, 'simclr.loss_block_size=-4'),
    ({'augment.num_views': 3}, 'augment.num_views=3'),
])
def test_validate_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    methods.get_method_class('simclr').validate_config(
        load_config('simclr_tiny', **overrides))


def test_embedding_std_detects_collapse():
  spread = jax.random.normal(jax.random.key(0), (512, 16))
  collapsed = jnp.ones((512, 16))
  np.testing.assert_allclose(common.embedding_std(spread), 1 / 4, rtol=0.1)
  assert common.embedding_std(collapsed) < 1e-6


def test_encoder_takes_the_trainers_factories(mesh1):
  # The trainer picks the encoder's ops once (cpu_kernels.select_factories)
  # and hands them over; without them a method builds XLA's ops.
  assert _method(mesh1)[1].net.encoder.conv is layers.Conv
  config = load_config('simclr_tiny')
  cpu = cpu_kernels.select_factories('cpu')
  method = methods.get_method_class('simclr')(
      config, methods.RunInfo.for_config(
          config, mesh=mesh1, num_channels=1, steps_per_epoch=64,
          total_steps=8, factories=cpu))
  assert (method.net.encoder.conv, method.net.encoder.norm) == (cpu.conv,
                                                                cpu.norm)
