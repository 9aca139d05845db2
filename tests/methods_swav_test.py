"""SwAV method: official loss, multi-crop BN groups, queue, freezing, resume.

Synthetic-batch tests build the step from `jaxssl.steps` directly (no data);
the end-to-end tests run `jaxssl.train` on real Fashion-MNIST.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import assert_evaluation, make_method, load_config
from helpers import restore_state, tiny_factory
from jaxssl import input_pipeline
from jaxssl import methods
from jaxssl import models
from jaxssl import optim
from jaxssl import parallel
from jaxssl import steps
from jaxssl import train
from jaxssl.methods import common

GLOBAL_ONLY = ((2, 16),)
MULTI_CROP = ((2, 16), (4, 8))  # (crops, side) per resolution group


def _sinkhorn_reference(out, epsilon, num_iters):
  """main_swav.py:distributed_sinkhorn on one rank, float64, [B, K] in/out."""
  q = np.exp(out / epsilon).T  # K x B
  q /= q.sum()
  k, b = q.shape
  for _ in range(num_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def _reference_loss(scores, crops_for_assign, temperature, epsilon, num_iters,
                    queue_scores=None):
  """main_swav.py:train's loss from per-crop scores, float64 numpy."""
  bs, n_crops = scores[0].shape[0], len(scores)
  loss = 0.0
  for i, crop in enumerate(crops_for_assign):
    out = scores[crop]
    if queue_scores is not None:
      out = np.concatenate([queue_scores[i], out])
    q = _sinkhorn_reference(out, epsilon, num_iters)[-bs:]
    subloss = 0.0
    for v in range(n_crops):
      if v == crop:
        continue
      x = scores[v] / temperature
      log_p = x - x.max(1, keepdims=True)
      log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
      subloss -= np.mean(np.sum(q * log_p, axis=1))
    loss += subloss / (n_crops - 1)
  return loss / len(crops_for_assign)


def _method(mesh, *, steps_per_epoch=64, **overrides):
  config = load_config('swav_tiny', **overrides)
  return config, make_method(config, mesh, steps_per_epoch=steps_per_epoch,
                             total_steps=config.num_train_steps)


def _batch(n, groups=MULTI_CROP, seed=0, mesh=None):
  rs = np.random.RandomState(seed)
  batch = {'views': tuple(jnp.asarray(rs.uniform(size=(n, v, s, s, 1)),
                                      jnp.float32) for v, s in groups),
           'label': jnp.zeros((n,), jnp.int32)}
  if mesh is not None:
    batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
  return batch


def _unit_rows(shape, seed):
  x = np.random.RandomState(seed).normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _forward(method, params, batch_stats, batch):
  (z, scores, _), _ = method.net.apply(
      {'params': params, 'batch_stats': batch_stats}, batch['views'],
      train=True, num_chunks=method.num_chunks, mutable=['batch_stats'])
  return np.asarray(z, np.float64), np.asarray(scores, np.float64)


@pytest.mark.parametrize('groups, queue, crops_for_assign', [
    (GLOBAL_ONLY, 'none', (0, 1)),
    (MULTI_CROP, 'none', (0, 1)),
    (MULTI_CROP, 'partial', (0, 1)),
    (MULTI_CROP, 'full', (0, 1)),
    (MULTI_CROP, 'full', (1,)),
])
def test_loss_is_the_official_computation(mesh1, groups, queue,
                                          crops_for_assign):
  """Partial queues are ignored; full ones enter Sinkhorn with today's C."""
  config, method = _method(mesh1, **{
      'swav.crops_for_assign': crops_for_assign,
      'swav.queue_length': 0 if queue == 'none' else 64})
  params, batch_stats, extra = method.init(jax.random.key(0))
  batch = _batch(32, groups, seed=1)
  queue_rows = {'none': 0, 'partial': 32, 'full': 64}[queue]
  if queue != 'none':
    extra = {'queue': jnp.asarray(_unit_rows((len(crops_for_assign), 64, 16),
                                             2), jnp.float32),
             'queue_rows': jnp.asarray(queue_rows, jnp.int32)}
  loss, (_, _, metrics, _) = jax.jit(method.loss_fn)(
      params, batch_stats, extra, batch, jax.random.key(1), 0)
  z, scores = _forward(method, params, batch_stats, batch)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-6)
  kernel = np.asarray(params['prototypes']['kernel'], np.float64)
  np.testing.assert_allclose(z @ kernel, scores, rtol=1e-5, atol=1e-6)
  per_crop = [scores[:, v] for v in range(scores.shape[1])]
  c = config.swav
  args = (crops_for_assign, c.temperature, c.epsilon, c.sinkhorn_iterations)
  without_queue = _reference_loss(per_crop, *args)
  if queue == 'full':
    queue_scores = [np.asarray(extra['queue'][i], np.float64) @ kernel
                    for i in range(len(crops_for_assign))]
    expected = _reference_loss(per_crop, *args, queue_scores=queue_scores)
    assert abs(expected - without_queue) > 1e-3  # the queue matters here
  else:
    expected = without_queue
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert metrics['loss'] == loss
  assert metrics['queue_in_use'] == float(queue == 'full')


def _reference_group_forward(method, params, batch_stats, batch, groups):
  """z of each BN group computed alone, one encoder call per resolution."""
  # One group at a time: global statistics over the group (bn_groups=1).
  encoder = models.make_encoder(method.config.model,
                                image_size=method.image_size)
  head = method.net.head.clone(bn_groups=1)
  enc_vars = {'params': params['encoder'], 'batch_stats': batch_stats['encoder']}
  head_vars = {'params': params['head'], 'batch_stats': batch_stats['head']}
  n = batch['views'][0].shape[0]
  zs = []
  for g in np.split(np.arange(n), groups):
    feats = []
    for x in batch['views']:
      x = x[g].reshape((-1,) + x.shape[2:])
      feats.append(encoder.apply(
          enc_vars, x, train=True, mutable=['batch_stats'])[0])
    h = jnp.concatenate(feats)
    z = head.apply(head_vars, h, train=True, mutable=['batch_stats'])[0]
    z = np.asarray(z, np.float64)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    # feats are [global crops of all examples; small crops of all examples]
    parts, start = [], 0
    for x in batch['views']:
      v = x.shape[1]
      parts.append(z[start:start + len(g) * v].reshape(len(g), v, -1))
      start += len(g) * v
    zs.append(np.concatenate(parts, axis=1))
  return np.concatenate(zs)


@pytest.mark.parametrize('examples_per_group', [0, 4, 16])
@pytest.mark.parametrize('mesh_name', ['mesh1', 'mesh8'])
def test_batchnorm_per_resolution_and_per_group(request, mesh_name,
                                                examples_per_group):
  mesh = request.getfixturevalue(mesh_name)
  _, method = _method(mesh,
                      **{'swav.bn_examples_per_group': examples_per_group})
  params, batch_stats, _ = method.init(jax.random.key(0))
  batch = _batch(32, MULTI_CROP, seed=3, mesh=mesh)
  z, _ = _forward(method, params, batch_stats, batch)
  groups = 32 // examples_per_group if examples_per_group else 1
  expected = _reference_group_forward(method, params, batch_stats, batch,
                                      groups)
  np.testing.assert_allclose(z, expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())


def test_eight_devices_give_the_same_loss_and_gradients(mesh1, mesh8):
  overrides = {'swav.bn_examples_per_group': 8, 'swav.queue_length': 64}
  _, m1 = _method(mesh1, **overrides)
  _, m8 = _method(mesh8, **overrides)
  params, batch_stats, _ = m1.init(jax.random.key(0))
  extra = {'queue': jnp.asarray(_unit_rows((2, 64, 16), 4), jnp.float32),
           'queue_rows': jnp.asarray(64, jnp.int32)}
  batch = _batch(32, MULTI_CROP, seed=5)

  def run(method, batch):
    fn = functools.partial(method.loss_fn, batch_stats=batch_stats,
                           extra=extra, batch=batch, rng=jax.random.key(1),
                           step=0)
    return jax.jit(jax.value_and_grad(lambda p: fn(p)[0]))(params)

  loss1, grads1 = run(m1, batch)
  loss8, grads8 = run(m8, jax.device_put(batch, NamedSharding(mesh8,
                                                              P('data'))))
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  _assert_trees_close(grads8, grads1)
  assert np.abs(grads1['prototypes']['kernel']).max() > 0


def _assert_trees_close(actual, expected):
  """Sharded vs single-device float32 trees: rtol 1e-5, atol tree-wide.

  atol = 1e-5 x the max |value| over the WHOLE expected tree (the repo's
  rule), because some leaves are exactly zero in exact arithmetic and only
  rounding noise in float32 (the gradients of the hidden Dense biases of
  the head, which feed a BatchNorm that removes them), so a per-leaf scale
  is meaningless for them.
  """
  scale = max(np.abs(np.asarray(x, np.float64)).max()
              for x in jax.tree.leaves(expected))

  def check(path, a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(check, actual, expected)


def _stepper(config, mesh, steps_per_epoch=64):
  """`train.setup` without the dataset: (method, init_fn, train_step)."""
  method = make_method(config, mesh, steps_per_epoch=steps_per_epoch,
                       total_steps=config.num_train_steps)
  schedule = optim.make_schedule(
      config.optim, global_batch_size=config.global_batch_size,
      steps_per_epoch=steps_per_epoch, total_steps=config.num_train_steps)
  optimizer = optim.make_optimizer(config.optim, schedule)
  replicated = parallel.replicated(mesh)
  init_fn = jax.jit(steps.make_init_fn(method, optimizer, config.seed),
                    out_shardings=replicated)
  step_fn = jax.jit(steps.make_train_step(method, optimizer, schedule),
                    out_shardings=(replicated, replicated))
  return method, init_fn, step_fn


def _kernel_column_norms(state):
  return np.linalg.norm(np.asarray(state.params['prototypes']['kernel']),
                        axis=0)


@pytest.mark.parametrize('freeze', [0, 3])
def test_prototypes_frozen_then_renormalised(mesh8, freeze):
  # A large learning rate, so that an update visibly changes the norms.
  config = load_config('swav_tiny', **{
      'swav.freeze_prototypes_niters': freeze,
      'optim.base_learning_rate': 30.0, 'num_train_steps': freeze + 2,
      'augment.num_small_views': MULTI_CROP[1][0]})
  _, init_fn, step_fn = _stepper(config, mesh8)
  state = init_fn()
  np.testing.assert_allclose(_kernel_column_norms(state), 1.0, rtol=1e-6)
  initial = jax.device_get(state.params)
  for i in range(freeze + 2):
    state, _ = step_fn(state, _batch(32, MULTI_CROP, seed=10 + i, mesh=mesh8))
    params = jax.device_get(state.params)
    # Exactly `freeze` updates leave the prototypes bit-identical ...
    same = np.array_equal(params['prototypes']['kernel'],
                          initial['prototypes']['kernel'])
    assert same == (i + 1 <= freeze), i + 1
    # ... while the rest of the network trains from the first step.
    assert not np.array_equal(params['head']['dense_1']['kernel'],
                              initial['head']['dense_1']['kernel'])
    np.testing.assert_allclose(_kernel_column_norms(state), 1.0, rtol=1e-6)


def test_post_update_normalises_moved_prototypes(mesh1):
  _, method = _method(mesh1, **{'swav.freeze_prototypes_niters': 5})
  params, _, _ = method.init(jax.random.key(0))
  kernel = np.random.RandomState(0).normal(size=(16, 10)).astype(np.float32)
  params = {**params, 'prototypes': {'kernel': jnp.asarray(kernel)}}
  frozen, _ = method.post_update(params, {}, jnp.asarray(5))
  moved, _ = method.post_update(params, {}, jnp.asarray(6))
  np.testing.assert_array_equal(frozen['prototypes']['kernel'], kernel)
  np.testing.assert_allclose(moved['prototypes']['kernel'],
                             kernel / np.linalg.norm(kernel, axis=0),
                             rtol=1e-6)


def test_queue_starts_shifts_and_is_used_only_when_full(mesh8):
  """Queue semantics vs numpy over steps: start epoch, shift, use when full."""
  config, method = _method(mesh8, steps_per_epoch=2, **{
      'swav.queue_length': 80,  # truncated to 64, two global batches
      'swav.epoch_queue_starts': 1.0, 'swav.crops_for_assign': (1, 0)})
  assert method.queue_length == 64 and method.queue_start_step == 2
  params, batch_stats, extra = method.init(jax.random.key(0))
  loss_fn = jax.jit(method.loss_fn)
  expected_queue = np.zeros((2, 64, 16), np.float32)
  in_use = []
  for step in range(6):
    batch = _batch(32, MULTI_CROP, seed=20 + step, mesh=mesh8)
    _, (_, new_extra, metrics, _) = loss_fn(params, batch_stats, extra, batch,
                                         jax.random.key(1), step)
    in_use.append(float(metrics['queue_in_use']))
    if step >= 2:
      z, _ = _forward(method, params, batch_stats, batch)
      newest = np.stack([z[:, 1], z[:, 0]]).astype(np.float32)
      expected_queue = np.concatenate([newest, expected_queue[:, :-32]], 1)
    # Jitted vs eager float32 forwards round differently (about 1e-6 here):
    # the repo's float32 rule. A wrong shift or order is off by O(1).
    np.testing.assert_allclose(new_extra['queue'], expected_queue, rtol=1e-5,
                               atol=1e-5 * np.abs(expected_queue).max())
    assert int(new_extra['queue_rows']) == min(max(step - 1, 0) * 32, 64)
    extra = new_extra
  # Empty before the start epoch, filled at steps 2 and 3, used from 4 on.
  assert in_use == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize('spread', [True, False])
def test_code_metrics_detect_collapse(spread):
  k = 8
  if spread:
    codes = jnp.tile(jnp.eye(k), (4, 1)) * 0.9 + 0.1 / k
  else:
    codes = jnp.full((32, k), 1.0 / k).at[:, 3].add(1e-3)
  m = common.assignment_metrics(codes)
  if spread:
    np.testing.assert_allclose(m['prototype_usage_entropy'], np.log(k),
                               rtol=1e-6)
    assert m['code_entropy'] < 0.5 * np.log(k)
  else:
    assert m['prototype_usage_entropy'] < 1e-6
    np.testing.assert_allclose(m['code_entropy'], np.log(k), rtol=1e-3)


@pytest.mark.parametrize('overrides, match', [
    ({'swav.temperature': 0.0}, 'swav.temperature=0.0 must be > 0'),
    ({'swav.epsilon': -0.05}, 'swav.epsilon=-0.05 must be > 0'),
    ({'swav.num_prototypes': 0}, 'swav.num_prototypes=0'),
    ({'swav.crops_for_assign': (0, 4)}, r'swav.crops_for_assign=\(0, 4\)'),
    ({'swav.crops_for_assign': (1, 1)}, r'swav.crops_for_assign=\(1, 1\)'),
    ({'swav.queue_length': 16}, 'swav.queue_length=16 is shorter than one'),
    ({'swav.bn_examples_per_group': 5}, 'swav.bn_examples_per_group=5'),
    ({'swav.freeze_prototypes_niters': -1},
     'swav.freeze_prototypes_niters=-1'),
    ({'head.num_layers': 0}, 'head.num_layers=0'),
])
def test_validate_config(overrides, match):
  with pytest.raises(ValueError, match=match) as info:
    methods.get_method_class('swav').validate_config(load_config('swav_tiny', **overrides))
  assert '\n' not in str(info.value)


# End to end on real data.


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('swav_tiny', fashion_mnist_dir)


def _train(config, mesh, num_steps):
  s = train.setup(config, mesh)
  state = s.init_fn()
  batches = input_pipeline.pretrain_batches(config, start_step=0)
  losses = []
  for _ in range(num_steps):
    state, metrics = s.train_step(state, train.global_batch(next(batches),
                                                            mesh))
    losses.append(float(metrics['loss']))
  return np.asarray(losses), jax.device_get(state)


def test_eight_devices_equal_one_device(tiny, mesh1, mesh8):
  # Step 3 updates the prototypes (freeze 2) with a full queue (2 batches).
  config = tiny(**{'swav.bn_examples_per_group': 8})
  losses1, state1 = _train(config, mesh1, 3)
  losses8, state8 = _train(config, mesh8, 3)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for a, b in [(state8.params, state1.params), (state8.extra, state1.extra),
               (state8.batch_stats, state1.batch_stats)]:
    _assert_trees_close(a, b)
  assert int(state1.extra['queue_rows']) == 64


def test_run_resumes_exactly_exports_and_evaluates(tiny, tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  result = train.run(tiny(), straight)
  enc, base = result['eval']['encoder'], result['eval']['random_init']
  for r in (enc, base):
    assert_evaluation(r)
  assert (epath.Path(straight) / 'export' / 'spec').exists()
  config = tiny(eval_after_training=False)
  train.run(config, resumed)
  # The process "died" after saving step 4 (queue full, prototypes moving).
  (epath.Path(resumed) / 'checkpoints' / '8').rmtree()
  assert train.run(config, resumed)['step'] == 8
  a, b = restore_state(config, straight, 8), restore_state(config, resumed, 8)
  jax.tree.map(np.testing.assert_array_equal, b, a)
  assert int(a.extra['queue_rows']) == 64


def test_fashion_mnist_config_loss_is_finite_and_decreasing(fashion_mnist_dir,
                                                            mesh8):
  config = load_config('swav_fashion_mnist', **{
      'dataset.data_dir': fashion_mnist_dir, 'num_train_steps': 12,
      'dataset.train_split': 'train[:8192]', 'dataset.shuffle_buffer': 8192})
  losses, _ = _train(config, mesh8, 12)
  assert np.all(np.isfinite(losses))
  assert losses[-3:].mean() < losses[:3].mean() - 0.05, losses
