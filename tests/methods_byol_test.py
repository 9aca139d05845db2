"""BYOL: official loss, per-view BN, target BN statistics, EMA, sharding, resume."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import run_steps_with_states as _run_steps
from helpers import two_view_batch as _batch
from helpers import (make_method, assert_exported_and_evaluated, load_config,
                      restore_state, resume_after_losing_the_newest,
                      tiny_factory)
from jaxssl import methods
from jaxssl import train


def _method(mesh, *, total_steps=8, **overrides):
  config = load_config('byol_tiny', **overrides)
  return config, make_method(config, mesh, steps_per_epoch=64,
                             total_steps=total_steps)


def _reference_byol_loss(p1, p2, t1, t2):
  """byol_experiment.py:loss_fn's repr_loss, float64 numpy."""

  def l2n(x):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))

  def regression(x, y):
    return ((l2n(x) - l2n(y))**2).sum(-1)

  return np.mean(regression(p1, t2) + regression(p2, t1))


def test_loss_is_the_official_objective(mesh1):
  config, method = _method(mesh1)
  params, batch_stats, extra = method.init(jax.random.key(0))
  batch = _batch(16, config.dataset.image_size)
  loss, (_, _, metrics, _) = jax.jit(method.loss_fn)(
      params, batch_stats, extra, batch, jax.random.key(1), 0)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def apply(variables, view, predict):
    return method.net.apply(variables, batch['views'][0][:, view],
                            train=True, predict=predict,
                            mutable=['batch_stats'])[0]

  online = {'params': params, 'batch_stats': batch_stats}
  target = {'params': extra['target']['params'],
            'batch_stats': extra['target']['batch_stats']}
  (_, _, p1), (_, _, p2) = apply(online, 0, True), apply(online, 1, True)
  (_, t1, _), (_, t2, _) = apply(target, 0, False), apply(target, 1, False)
  expected = _reference_byol_loss(p1, p2, t1, t2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert metrics['loss'] == loss
  assert 0 < metrics['embedding_std'] <= 1
  assert -1 <= metrics['target_online_agreement'] <= 1
  np.testing.assert_allclose(metrics['tau'], config.byol.base_ema, rtol=1e-7)


def test_gradients_reach_the_online_parameters_only(mesh1):
  config, method = _method(mesh1)
  params, batch_stats, extra = method.init(jax.random.key(0))
  batch = _batch(8, config.dataset.image_size)

  def loss(params, extra):
    return method.loss_fn(params, batch_stats, extra, batch,
                          jax.random.key(1), 0)[0]

  online_grads, target_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      params, extra)
  assert all(np.all(g == 0) for g in jax.tree.leaves(target_grads))
  assert all(np.any(g != 0) for g in jax.tree.leaves(
      online_grads['predictor']))
  # The target has no predictor; it starts from its own key.
  assert set(extra['target']['params']) == {'encoder', 'projector'}
  assert not np.allclose(extra['target']['params']['encoder']['conv1']['kernel'],
                         params['encoder']['conv1']['kernel'])


def _conv1_stats(x, kernel):
  """Per-channel batch mean and biased variance of TinyCNN's 3x3 SAME conv1.

  Args:
    x: `[n, h, w, c]` images; kernel: `[3, 3, c, out]`. float64 numpy.
  """
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  kernel = np.asarray(kernel, np.float64)
  h, w = x.shape[1] - 2, x.shape[2] - 2
  y = sum(np.einsum('nhwc,co->nhwo', x[:, i:i + h, j:j + w], kernel[i, j])
          for i in range(3) for j in range(3))
  return y.mean((0, 1, 2)), y.var((0, 1, 2))


@pytest.mark.parametrize('network', ['online', 'target'])
def test_each_network_updates_its_own_bn_statistics_once_per_view(
    mesh1, network):
  config, method = _method(mesh1)
  params, batch_stats, extra = method.init(jax.random.key(0))
  batch = _batch(8, config.dataset.image_size, seed=3)
  _, (new_stats, new_extra, _, _) = jax.jit(method.loss_fn)(
      params, batch_stats, extra, batch, jax.random.key(1), 0)
  own, other = params, extra['target']['params']
  got = new_stats
  if network == 'target':
    own, other, got = other, own, new_extra['target']['batch_stats']
  got = got['encoder']['bn1']
  m = config.model.bn_momentum

  def expected(kernel):
    # Running averages start at (0, 1); view 1 updates first, then view 2.
    (mu1, var1), (mu2, var2) = (
        _conv1_stats(batch['views'][0][:, v], kernel) for v in (0, 1))
    return (m * (1 - m) * mu1 + (1 - m) * mu2,
            m * m + m * (1 - m) * var1 + (1 - m) * var2)

  mean, var = expected(own['encoder']['conv1']['kernel'])
  np.testing.assert_allclose(got['mean'], mean, rtol=1e-4,
                             atol=1e-5 * np.abs(mean).max())
  np.testing.assert_allclose(got['var'], var, rtol=1e-4)
  other_mean, _ = expected(other['encoder']['conv1']['kernel'])
  assert not np.allclose(got['mean'], other_mean, rtol=1e-2)


def test_tau_schedule_values(mesh1):
  base, k_total = 0.99, 1000
  _, method = _method(mesh1, total_steps=k_total,
                      **{'byol.base_ema': base})
  for k in (0, 250, 500, 1000, 1500):
    expected = 1 - (1 - base) * (np.cos(np.pi * min(k, k_total) / k_total)
                                 + 1) / 2
    np.testing.assert_allclose(method.tau_schedule(k), expected, rtol=1e-7)
  np.testing.assert_allclose(method.tau_schedule(500), 1 - (1 - base) / 2,
                             rtol=1e-7)
  assert method.tau_schedule(k_total) == 1.0


def _assert_float32_ema(new, target, online, tau):
  """`new` is `tau * target + (1 - tau) * online` rounded in float32.

  The exact value is taken in float64 from the float32 operands. Rounding
  the two products and the sum (fused or not) to float32 errs by at most
  2^-23 (|tau * target| + |(1 - tau) * online|), the bound checked here.
  """
  tau = np.float32(tau)
  a = np.float64(tau) * target
  b = np.float64(np.float32(1) - tau) * online
  bound = 2.0**-23 * (np.abs(a) + np.abs(b))
  assert np.all(np.abs(new - (a + b)) <= bound)


@pytest.mark.parametrize('updates_before', [0, 2])
def test_post_update_is_the_ema_with_tau_of_the_previous_count(
    mesh1, updates_before):
  # K = 4 makes consecutive taus far apart: 0.99, 0.9915, 0.995, 0.9985.
  _, method = _method(mesh1, total_steps=4, **{'byol.base_ema': 0.99})
  params, _, extra = method.init(jax.random.key(0))
  new_params, new_extra = method.post_update(
      params, extra, jnp.int32(updates_before + 1))
  tau = method.tau_schedule(updates_before)
  np.testing.assert_allclose(
      tau, 1 - 0.01 * (np.cos(np.pi * updates_before / 4) + 1) / 2,
      rtol=1e-7)
  assert new_params is params
  jax.tree.map(functools.partial(_assert_float32_ema, tau=tau),
               new_extra['target']['params'], extra['target']['params'],
               {k: params[k] for k in ('encoder', 'projector')})
  assert new_extra['target']['batch_stats'] is extra['target']['batch_stats']


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('byol_tiny', fashion_mnist_dir)


def test_target_after_a_step_is_the_ema_of_the_new_online_params(tiny, mesh8):
  s, history = _run_steps(tiny(), mesh8, 2)
  for k, (old, new, metrics) in enumerate(history):
    tau = np.float32(s.method.tau_schedule(k))
    assert metrics['tau'] == tau
    online = {name: new.params[name] for name in ('encoder', 'projector')}
    jax.tree.map(functools.partial(_assert_float32_ema, tau=tau),
                 new.extra['target']['params'], old.extra['target']['params'],
                 online)
    moved = jax.tree.leaves(jax.tree.map(
        lambda a, b: not np.array_equal(a, b), new.extra['target']['params'],
        old.extra['target']['params']))
    assert any(moved)


def _sharded_vs_single_close(got, ref):
  """Compares two pytrees of float32 results of 8-device and 1-device runs.

  Each leaf within rtol 1e-5 and atol 1e-5 x its largest |reference|, except
  the bias of a Dense layer followed by a BatchNorm (BYOL's MLPs, as
  Haiku's): BN removes any constant shift, so its gradient is exactly zero
  and the leaf holds only rounding noise, which must stay negligible.
  """
  if not isinstance(ref, dict):
    np.testing.assert_allclose(got, ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())
    return
  assert set(got) == set(ref)
  for key in ref:
    if (key.startswith('dense_') and 'bn_' + key[len('dense_'):] in ref
        and 'bias' in ref[key]):
      for value in (got[key]['bias'], ref[key]['bias']):
        assert np.abs(value).max() < 1e-6
      _sharded_vs_single_close(got[key]['kernel'], ref[key]['kernel'])
    else:
      _sharded_vs_single_close(got[key], ref[key])


def test_eight_devices_equal_one_device(tiny, mesh1, mesh8):
  config = tiny()
  _, one = _run_steps(config, mesh1, 3)
  _, eight = _run_steps(config, mesh8, 3)
  for (_, state1, metrics1), (_, state8, metrics8) in zip(one, eight):
    for key in ('loss', 'target_online_agreement', 'embedding_std'):
      # The agreement is a mean of cosines, terms in [-1, 1] that cancel
      # (-0.0156 at a step here, the runs 1.9e-7 apart): 1e-5 of the terms'
      # scale, 1, is the bound, as in methods_simsiam_test; 1e-5 of a
      # near-zero mean is not. The loss (two `2 - 2 cos` terms, near 4
      # here) and the std keep rtol 1e-5.
      cosines = key == 'target_online_agreement'
      np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5,
                                 atol=1e-5 if cosines else 0, err_msg=key)
    for tree in ('params', 'batch_stats', 'extra'):
      _sharded_vs_single_close(getattr(state8, tree), getattr(state1, tree))


def test_eight_devices_give_the_same_gradients(mesh1, mesh8):
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
  _sharded_vs_single_close(grads8, grads1)


@pytest.fixture(scope='module')
def straight_run(tiny, tmp_path_factory):
  """The tiny config end to end: pretraining, export and linear eval."""
  workdir = str(tmp_path_factory.mktemp('byol') / 'straight')
  return workdir, train.run(tiny(), workdir)


def test_run_exports_and_evaluates(straight_run):
  assert_exported_and_evaluated(*straight_run)


def test_resume_after_losing_the_newest_checkpoint_is_exact(
    tiny, straight_run, tmp_path):
  config = tiny(eval_after_training=False)
  resumed = str(tmp_path / 'resumed')
  resume_after_losing_the_newest(config, resumed)
  a = restore_state(config, straight_run[0], 8)
  b = restore_state(config, resumed, 8)
  assert set(b.extra) == {'target'}
  assert set(b.extra['target']) == {'params', 'batch_stats'}
  jax.tree.map(np.testing.assert_array_equal, b, a)


@pytest.mark.parametrize('overrides, match', [
    ({'byol.base_ema': 1.5}, r'byol.base_ema=1.5 must be in \[0, 1\]'),
    ({'byol.predictor_hidden_dim': 0}, 'byol.predictor_hidden_dim=0'),
    ({'head.num_layers': 0}, 'head.num_layers=0'),
    ({'augment.num_views': 3}, 'augment.num_views=3'),
])
def test_validate_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    methods.get_method_class('byol').validate_config(
        load_config('byol_tiny', **overrides))
