"""MoCo v3: loss wiring, momentum schedule and update, BN per view, sharding.

Expected values come from float64 numpy implementations of
facebookresearch/moco-v3 `moco/builder.py` and `main_moco.py`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import assert_close_8_vs_1 as _close
from helpers import run_steps_with_losses as _run_steps
from helpers import assert_evaluation, make_method, load_config
from helpers import restore_state, tiny_factory
from jaxssl import evaluate
from jaxssl import parallel
from jaxssl import train
from jaxssl.methods import common

BATCH = 32  # moco_v3_tiny's global batch
TOTAL_STEPS = 40


def _method(mesh, **overrides):
  config = load_config('moco_v3_tiny', **overrides)
  return config, make_method(config, mesh, steps_per_epoch=10,
                             total_steps=TOTAL_STEPS)


def _views(n, size, seed=0):
  views = np.random.RandomState(seed).uniform(size=(n, 2, size, size, 1))
  return jnp.asarray(views, jnp.float32)


def _state(method, key_seed=7):
  """Init, with momentum params from another seed so that m matters."""
  params, batch_stats, extra = method.init(jax.random.key(0))
  other, _, _ = method.init(jax.random.key(key_seed))
  return params, batch_stats, dict(extra, target=dict(
      extra['target'], params={k: other[k] for k in ('encoder', 'projector')}))


def _close_tree(actual, desired):
  """rtol 1e-5, atol 1e-5 × the max |value| over the WHOLE desired tree.

  The repo's rule for float32 trees with leaves that are exactly zero in
  exact arithmetic (a BN bias gradient, the mean of a BN fed by a centred
  bias-free Linear): such a leaf carries rounding noise only, so a
  per-leaf relative tolerance means nothing for it.
  """
  atol = 1e-5 * max(float(np.abs(x).max()) for x in jax.tree.leaves(desired))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=atol),
               actual, desired)


def _f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_momentum(m0, t, total):
  """main_moco.py:adjust_moco_momentum at fractional epoch t / total."""
  return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t / total)) * (1.0 - m0)


def _reference_ctr(q, k, tau):
  """builder.py:MoCo.contrastive_loss on one GPU holding the whole batch."""
  q, k = _unit(np.asarray(q, np.float64)), _unit(np.asarray(k, np.float64))
  logits = q @ k.T / tau
  top = logits.max(1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
  return np.mean(lse - np.diag(logits)) * 2 * tau


@pytest.mark.parametrize('step, tau', [(0, 1.0), (13, 0.2), (TOTAL_STEPS, 1.0)])
def test_step_matches_the_official_forward(mesh1, step, tau):
  config, method = _method(mesh1, **{'moco_v3.temperature': tau})
  params, batch_stats, extra = _state(method)
  views = _views(BATCH, config.dataset.image_size, seed=1)
  loss, (new_stats, new_extra, metrics, _) = jax.jit(method.loss_fn)(
      params, batch_stats, extra, {'views': (views,)}, jax.random.key(3),
      step)
  m = _reference_momentum(config.moco_v3.base_momentum, step, TOTAL_STEPS)
  np.testing.assert_allclose(metrics['momentum'], m, rtol=1e-6)
  # θk = m·θk + (1 − m)·θq over encoder and projector, not the predictor.
  key_params = jax.tree.map(lambda k, q: m * k + (1 - m) * q,
                            _f64(extra['target']['params']),
                            _f64(method.ema.select(params)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               new_extra['target']['params'], key_params)
  # Each view is its own forward (per-view BN); keys from the updated
  # momentum network, its own BN statistics chained view 1 then view 2.
  key_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), key_params)
  q1, s = common.forward(method.net, params, batch_stats, views[:, 0],
                         predict=True)
  q2, s = common.forward(method.net, params, s, views[:, 1], predict=True)
  k1, ks = common.forward(method.net, key_params,
                          extra['target']['batch_stats'], views[:, 0])
  k2, ks = common.forward(method.net, key_params, ks, views[:, 1])
  q1, q2 = q1.prediction, q2.prediction
  k1, k2 = k1.projection, k2.projection
  expected = _reference_ctr(q1, k2, tau) + _reference_ctr(q2, k1, tau)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # The predictor's first BN mean is exactly zero (a bias-free Linear of
  # the projector's affine-free BN output), so it holds rounding noise only:
  # tolerance from the whole tree (see _close_tree).
  _close_tree(new_stats, s)
  _close_tree(new_extra['target']['batch_stats'], ks)
  sims = _unit(np.asarray(q1, np.float64)) @ _unit(
      np.asarray(k2, np.float64)).T
  np.testing.assert_allclose(metrics['contrast_acc'],
                             np.mean(sims.argmax(1) == np.arange(BATCH)))
  # The mean of cosines near 0 cancels: scale the atol by the cosines.
  np.testing.assert_allclose(
      metrics['positive_cosine'], np.mean(np.diag(sims)), rtol=1e-5,
      atol=1e-5 * np.abs(np.diag(sims)).max())


@pytest.mark.parametrize('m0', [0.99, 0.996])
def test_momentum_follows_the_cosine_schedule(mesh1, m0):
  _, method = _method(mesh1, **{'moco_v3.base_momentum': m0})
  for t in (0, 1, TOTAL_STEPS // 2, TOTAL_STEPS - 1, TOTAL_STEPS,
            TOTAL_STEPS + 5):
    expected = _reference_momentum(m0, min(t, TOTAL_STEPS), TOTAL_STEPS)
    np.testing.assert_allclose(method.momentum_schedule(t), expected,
                               rtol=1e-7, atol=1e-7)
  assert float(method.momentum_schedule(0)) == np.float32(m0)
  assert float(method.momentum_schedule(TOTAL_STEPS)) == 1.0


def test_views_do_not_share_batchnorm_statistics(mesh1):
  config, method = _method(mesh1)
  params, batch_stats, extra = method.init(jax.random.key(0))
  views = np.asarray(_views(BATCH, config.dataset.image_size, seed=2))
  other = views.copy()
  other[:, 1] = np.random.RandomState(5).uniform(size=other[:, 1].shape)

  def q1_of(v):
    return common.forward(method.net, params, batch_stats,
                          jnp.asarray(v[:, 0]), predict=True)[0].prediction

  # Changing every second view leaves the first view's predictions alone.
  np.testing.assert_array_equal(q1_of(other), q1_of(views))
  loss_a = method.loss_fn(params, batch_stats, extra,
                          {'views': (jnp.asarray(views),)},
                          jax.random.key(0), 0)[0]
  loss_b = method.loss_fn(params, batch_stats, extra,
                          {'views': (jnp.asarray(other),)},
                          jax.random.key(0), 0)[0]
  assert not np.isclose(loss_a, loss_b)


def test_heads_follow_the_resnet_recipe(mesh1):
  config, method = _method(mesh1)
  params, batch_stats, extra = method.init(jax.random.key(0))
  shapes = jax.tree.map(np.shape, params)
  hidden, out = config.head.hidden_dim, config.head.output_dim
  pred_hidden = config.moco_v3.predictor_hidden_dim
  # Linear layers without bias; last projector BN without gamma and beta.
  assert shapes['projector'] == {
      'dense_0': {'kernel': (16, hidden)},
      'bn_0': {'scale': (hidden,), 'bias': (hidden,)},
      'dense_1': {'kernel': (hidden, out)}}
  assert set(batch_stats['projector']) == {'bn_0', 'bn_1'}
  assert shapes['predictor'] == {
      'dense_0': {'kernel': (out, pred_hidden)},
      'bn_0': {'scale': (pred_hidden,), 'bias': (pred_hidden,)},
      'dense_1': {'kernel': (pred_hidden, out)}}
  assert set(batch_stats['predictor']) == {'bn_0'}
  # The momentum network copies encoder and projector only.
  assert set(extra['target']['params']) == {'encoder', 'projector'}
  jax.tree.map(np.testing.assert_array_equal, extra['target']['params'],
               method.ema.select(params))


def test_gradients_on_8_devices_equal_1_device(mesh1, mesh8):
  # 8x8 images: at 16x16 the float32 conv-kernel gradients (sums of 16k
  # cancelling terms through BN) differ by ~1.2x the tolerance below even
  # between one device and the same batch permuted on one device, a noise
  # floor and not a sharding effect; at 8x8 that floor is ~0.5x.
  config, m1 = _method(mesh1, **{'dataset.image_size': 8})
  _, m8 = _method(mesh8, **{'dataset.image_size': 8})
  params, batch_stats, extra = _state(m1)
  views = _views(BATCH, config.dataset.image_size, seed=6)
  sharded = jax.device_put(views, NamedSharding(mesh8, P('data')))

  def value_and_grad(method, views):
    fn = functools.partial(method.loss_fn, batch_stats=batch_stats,
                           extra=extra, batch={'views': (views,)},
                           rng=jax.random.key(1), step=3)
    return jax.jit(jax.value_and_grad(lambda p: fn(p)[0]))(params)

  loss1, grads1 = value_and_grad(m1, views)
  loss8, grads8 = value_and_grad(m8, sharded)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  _close_tree(grads8, grads1)
  assert set(grads1) == {'encoder', 'projector', 'predictor'}


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('moco_v3_tiny', fashion_mnist_dir)


def test_eight_devices_equal_one_device_with_momentum_state(tiny, mesh1,
                                                            mesh8):
  config = tiny()
  run1 = _run_steps(config, mesh1, 3)
  run8 = _run_steps(config, mesh8, 3)
  for (loss1, state1), (loss8, state8) in zip(run1, run8):
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(_close, state8.params, state1.params)
    jax.tree.map(_close, state8.extra['target']['params'],
                 state1.extra['target']['params'])
    # BN statistics include the exactly-zero predictor mean: whole-tree atol.
    _close_tree(state8.batch_stats, state1.batch_stats)
    _close_tree(state8.extra['target']['batch_stats'],
                state1.extra['target']['batch_stats'])


def test_run_resumes_exactly_exports_and_evaluates(tiny, tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  result = train.run(tiny(), straight)
  train.run(tiny(eval_after_training=False), resumed)
  # The process "died" after saving step 4 and before saving step 8.
  (epath.Path(resumed) / 'checkpoints' / '8').rmtree()
  assert train.run(tiny(eval_after_training=False), resumed)['step'] == 8
  a, b = restore_state(tiny(), straight, 8), restore_state(tiny(), resumed, 8)
  jax.tree.map(np.testing.assert_array_equal, b, a)
  assert set(a.extra) == {'target'}
  assert set(a.extra['target']) == {'params', 'batch_stats'}
  enc, base = result['eval']['encoder'], result['eval']['random_init']
  for r in (enc, base):
    assert_evaluation(r)
  spec, _, exported = evaluate.load_encoder(straight, parallel.make_mesh())
  assert spec['method'] == 'moco_v3' and spec['step'] == 8
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported),
               {'params': a.params['encoder'],
                'batch_stats': a.batch_stats['encoder']})


def test_cpu_config_loss_is_finite_and_decreasing(fashion_mnist_dir, mesh8):
  config = load_config('moco_v3_fashion_mnist',
                       **{'dataset.data_dir': fashion_mnist_dir})
  losses = np.array([loss for loss, _ in _run_steps(config, mesh8, 20)])
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean()


@pytest.mark.parametrize('overrides, match', [
    ({'moco_v3.temperature': -1.0}, 'moco_v3.temperature=-1.0 must be > 0'),
    ({'moco_v3.base_momentum': 1.5},
     r'moco_v3.base_momentum=1.5 must be in \[0, 1\]'),
    ({'moco_v3.predictor_hidden_dim': 0},
     'moco_v3.predictor_hidden_dim=0 must be positive'),
    ({'augment.num_views': 3}, 'augment.num_views=3'),
    ({'head.num_layers': 0}, 'head.num_layers=0 must be >= 1'),
])
def test_bad_config_fails_before_compiling(overrides, match):
  with pytest.raises(ValueError, match=match) as info:
    train.setup(load_config('moco_v3_tiny', **overrides))
  assert '\n' not in str(info.value)
