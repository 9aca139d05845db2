"""The online linear probe: its loss and update against float64 NumPy, the
encoder untouched by it, and 8 devices against 1 on real Fashion-MNIST."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_close_8_vs_1, host, load_config, tiny_factory
from jaxssl import input_pipeline
from jaxssl import online_probe
from jaxssl import train


def _probe(name='simclr_tiny', **overrides):
  config = load_config(name, **overrides)
  return config, online_probe.OnlineProbe(
      config, feature_dim=6, num_classes=4,
      schedule=optax.constant_schedule(0.5))


def _numpy_loss(kernel, bias, features, labels, weight_decay):
  x = features.reshape(-1, features.shape[-1]).astype(np.float64)
  y = np.repeat(labels, features.shape[1])
  logits = x @ kernel + bias
  logits = logits - logits.max(1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  ce = -log_p[np.arange(len(y)), y].mean()
  return ce + weight_decay * 0.5 * np.sum(kernel ** 2), ce, np.mean(
      logits.argmax(1) == y)


@pytest.mark.parametrize('views', [1, 2])
def test_loss_is_cross_entropy_over_views_plus_half_l2(views):
  config, probe = _probe(**{'optim.weight_decay': 0.01})
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(6, 4)).astype(np.float32),
            'bias': rng.normal(size=4).astype(np.float32)}
  features = rng.normal(size=(10, views, 6)).astype(np.float32)
  labels = rng.integers(0, 4, size=10).astype(np.int32)
  loss, metrics = jax.jit(probe.loss)(params, features, labels)
  want, ce, top1 = _numpy_loss(params['kernel'].astype(np.float64),
                               params['bias'], features, labels,
                               config.optim.weight_decay)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(metrics['online_probe_loss'], ce, rtol=1e-6)
  assert float(metrics['online_probe_top1']) == np.float32(top1)


def test_no_gradient_reaches_the_features():
  _, probe = _probe()
  params = probe.init(jax.random.key(0))['params']
  grad = jax.grad(lambda f: probe.loss(params, f, jnp.zeros(3, jnp.int32))[0])(
      jnp.ones((3, 2, 6)))
  assert not np.any(np.asarray(grad))


def test_init_is_simclrs_supervised_head():
  _, probe = _probe()
  params = probe.init(jax.random.key(1))['params']
  assert params['kernel'].shape == (6, 4) and not np.any(params['bias'])
  assert 0.005 < float(np.std(params['kernel'])) < 0.02


def test_update_under_simclr_lars_is_plain_momentum_with_lr_inside():
  # Excluded from weight decay and the trust ratio, as `head_supervised`:
  # v = m v + lr g; w -= v (SimCLR's classic momentum).
  config, probe = _probe()
  assert config.optim.name == 'lars' and config.optim.lars_variant == 'simclr'
  state = probe.init(jax.random.key(2))
  rng = np.random.default_rng(3)
  features = rng.normal(size=(8, 2, 6)).astype(np.float32)
  labels = rng.integers(0, 4, size=8).astype(np.int32)
  w = {k: np.asarray(v, np.float64) for k, v in state['params'].items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  for _ in range(3):
    grads = jax.grad(lambda p: probe.loss(p, features, labels)[0])(
        jax.tree.map(jnp.asarray, {k: x.astype(np.float32)
                                   for k, x in state['params'].items()}))
    state, _ = probe.step(state, features, labels)
    for k in w:
      v[k] = config.optim.momentum * v[k] + 0.5 * np.asarray(grads[k])
      w[k] = w[k] - v[k]
      np.testing.assert_allclose(state['params'][k], w[k], rtol=1e-5,
                                 atol=1e-7)


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('simclr_tiny', fashion_mnist_dir)


def _run(config, mesh, num_steps=3):
  s = train.setup(config, mesh)
  state = s.init_fn()
  batches = input_pipeline.pretrain_batches(config, start_step=0)
  metrics = []
  for _ in range(num_steps):
    state, m = s.train_step(state, train.global_batch(next(batches), mesh))
    metrics.append(host(m))
  return host(state), metrics


@pytest.mark.parametrize('method', ['simclr_tiny', 'byol_tiny', 'swav_tiny'])
def test_the_method_is_bit_identical_with_the_probe_on_or_off(
    fashion_mnist_dir, mesh8, method):
  make = tiny_factory(method, fashion_mnist_dir)
  on, metrics = _run(make(), mesh8)
  off, _ = _run(make(**{'online_probe.enabled': False}), mesh8)
  assert off.probe == {} and set(on.probe) == {'params', 'opt_state'}
  for name in ('params', 'batch_stats', 'opt_state', 'extra', 'rng'):
    jax.tree.map(np.testing.assert_array_equal, getattr(on, name),
                 getattr(off, name))
  assert {'online_probe_loss', 'online_probe_top1'} <= set(metrics[0])
  # The probe itself moved.
  first = train.setup(make(), mesh8).init_fn()
  assert not np.allclose(on.probe['params']['kernel'],
                         host(first.probe['params']['kernel']))


def test_probe_on_8_devices_equals_1(tiny, mesh8, mesh1):
  eight, m8 = _run(tiny(), mesh8)
  one, m1 = _run(tiny(), mesh1)
  jax.tree.map(assert_close_8_vs_1, eight.probe, one.probe)
  for a, b in zip(m8, m1):
    np.testing.assert_allclose(a['online_probe_loss'], b['online_probe_loss'],
                               rtol=1e-5)
    assert a['online_probe_top1'] == b['online_probe_top1']
