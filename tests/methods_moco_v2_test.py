"""MoCo v2: loss wiring, momentum update, shuffle-BN, queue, sharding, resume.

Expected values come from float64 numpy implementations of
facebookresearch/moco `moco/builder.py` and from an emulation of its
per-GPU algorithm (shuffle, local BN on each slice, unshuffle).
"""

import functools

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
from jaxssl import steps
from jaxssl import train
from jaxssl.augment import device
from jaxssl.methods import common

GROUPS = 8  # moco_v2_tiny's bn_groups
BATCH = 32  # moco_v2_tiny's global batch


def _method(mesh, **overrides):
  config = load_config('moco_v2_tiny', **overrides)
  return config, make_method(config, mesh, steps_per_epoch=64, total_steps=8)


def _views(n, size, seed=0):
  views = np.random.RandomState(seed).uniform(size=(n, 2, size, size, 1))
  return jnp.asarray(views, jnp.float32)


def _state(method, key_seed=7):
  """Init, with key params from another seed so that m matters."""
  params, batch_stats, extra = method.init(jax.random.key(0))
  other, _, _ = method.init(jax.random.key(key_seed))
  return params, batch_stats, dict(
      extra, target=dict(extra['target'], params=other))


def _f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _local_bn_forward(local, params, stats, x, groups):
  """One device at a time: each contiguous slice with its own (local) BN."""
  outs, new_stats = [], []
  for xg in np.split(np.asarray(x), groups):
    out, s = common.forward(local.net, params, stats, jnp.asarray(xg))
    outs.append(np.asarray(out.projection))
    new_stats.append(s)
  # jaxssl keeps the mean over devices of each device's running statistics.
  return np.concatenate(outs), jax.tree.map(
      lambda *s: np.mean(np.stack(s), 0), *new_stats)


def _reference_step(method, local, params, batch_stats, extra, views, rng):
  """builder.py:MoCo.forward in float64 where it matters, per-GPU BN."""
  m = method.config.moco_v2.momentum
  key_params = jax.tree.map(lambda k, q: m * k + (1 - m) * q,
                            _f64(extra['target']['params']), _f64(params))
  key_params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                              key_params)
  q, _ = _local_bn_forward(local, params, batch_stats, views[:, 0], GROUPS)
  perm = np.asarray(method.shuffle_permutation(rng, BATCH))
  k_shuffled, key_stats = _local_bn_forward(
      local, key_params32, extra['target']['batch_stats'],
      np.asarray(views[:, 1])[perm], GROUPS)
  k = np.empty_like(k_shuffled)
  k[perm] = k_shuffled  # _batch_unshuffle_ddp
  q, k = _unit(q.astype(np.float64)), _unit(k.astype(np.float64))
  queue = np.asarray(extra['queue'], np.float64)
  logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1)
  logits = logits / method.config.moco_v2.temperature
  top = logits.max(1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
  return {'loss': np.mean(lse - logits[:, 0]), 'q': q, 'k': k,
          'key_params': key_params, 'key_stats': key_stats,
          'acc': np.mean(logits[:, 0] > logits[:, 1:].max(1))}


@pytest.mark.parametrize('m', [0.0, 0.5, 0.99])
def test_step_matches_the_official_forward(mesh1, m):
  config, method = _method(mesh1, **{'moco_v2.momentum': m})
  _, local = _method(mesh1, **{'moco_v2.bn_groups': 1})
  params, batch_stats, extra = _state(method)
  views = _views(BATCH, config.dataset.image_size, seed=1)
  rng = jax.random.key(3)
  loss, (_, new_extra, metrics, _) = jax.jit(method.loss_fn)(
      params, batch_stats, extra, {'views': (views,)}, rng, 0)
  ref = _reference_step(method, local, params, batch_stats, extra, views, rng)
  np.testing.assert_allclose(loss, ref['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics['contrast_acc'], ref['acc'])
  np.testing.assert_allclose(metrics['positive_cosine'],
                             np.mean(np.sum(ref['q'] * ref['k'], 1)),
                             rtol=1e-5)
  # Momentum update on parameters: θk = m·θk + (1 − m)·θq.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               new_extra['target']['params'], ref['key_params'])
  # The key network's BN statistics are its own, from the shuffled forward.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()),
               new_extra['target']['batch_stats'], ref['key_stats'])
  # Enqueue after the loss: this batch's keys at rows [0, 32), pointer 32.
  np.testing.assert_allclose(new_extra['queue'][:BATCH], ref['k'], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(new_extra['queue'][BATCH:],
                                extra['queue'][BATCH:])
  assert int(new_extra['queue_ptr']) == BATCH


def test_queue_starts_as_unit_gaussian_rows(mesh1):
  config, method = _method(mesh1)
  params, batch_stats, extra = method.init(jax.random.key(0))
  queue = np.asarray(extra['queue'])
  assert queue.shape == (config.moco_v2.queue_size, config.head.output_dim)
  np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)
  assert abs(queue.mean()) < 0.05 and int(extra['queue_ptr']) == 0
  # The key network starts as a copy of the query network.
  jax.tree.map(np.testing.assert_array_equal, extra['target']['params'], params)
  jax.tree.map(np.testing.assert_array_equal, extra['target']['batch_stats'],
               batch_stats)


def _official_keys_on_devices(local, mesh, key_params, key_stats, x, perm):
  """_batch_shuffle_ddp → local BN on each device → _batch_unshuffle_ddp."""
  n = x.shape[0] // mesh.devices.size

  def per_device(x_local, perm):
    x_all = jax.lax.all_gather(x_local, 'data', tiled=True)
    start = jax.lax.axis_index('data') * n
    mine = jax.lax.dynamic_slice_in_dim(perm, start, n)
    k_local, stats = common.forward(local.net, key_params, key_stats,
                                    x_all[mine])
    k_local = k_local.projection
    k_all = jax.lax.all_gather(k_local, 'data', tiled=True)
    k_all = k_all[jnp.argsort(perm)]
    return (jax.lax.dynamic_slice_in_dim(k_all, start, n),
            jax.lax.pmean(stats, 'data'))

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), P()),
                     out_specs=(P('data'), P()))
  return jax.jit(fn)(x, perm)


def test_shuffle_bn_equals_per_device_bn_on_8_devices(mesh1, mesh8):
  config, m8 = _method(mesh8, **{'moco_v2.bn_groups': 0})
  _, m1 = _method(mesh1)  # bn_groups=8 on one device
  _, local = _method(mesh1, **{'moco_v2.bn_groups': 1})
  assert m8.bn_groups == m1.bn_groups == GROUPS
  params, batch_stats, _ = m1.init(jax.random.key(0))
  x = _views(BATCH, config.dataset.image_size, seed=2)[:, 1]
  rng = jax.random.key(5)
  perm = m1.shuffle_permutation(rng, BATCH)
  x8 = jax.device_put(x, NamedSharding(mesh8, P('data')))
  k_ref, stats_ref = _official_keys_on_devices(local, mesh8, params,
                                               batch_stats, x8, perm)
  for method, xs in ((m8, x8), (m1, x)):
    k, stats = jax.jit(method.keys)(params, batch_stats, xs, rng=rng)
    np.testing.assert_allclose(k, k_ref, rtol=1e-5,
                               atol=1e-5 * np.abs(k_ref).max())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), stats, stats_ref)


def _groups_of(i, perm, size):
  """(query BN group mates of image i, key BN group mates after shuffling)."""
  start = (i // size) * size
  pos = int(np.flatnonzero(perm == i)[0])
  kstart = (pos // size) * size
  return (set(range(start, start + size)) - {i},
          set(perm[kstart:kstart + size].tolist()) - {i})


def _key_of(method, params, stats, x, rng, i):
  return np.asarray(jax.jit(method.keys)(params, stats, x, rng=rng)[0][i])


@pytest.mark.parametrize('shuffle', [True, False])
def test_no_cross_sample_leak_through_batchnorm(mesh1, shuffle):
  """A key never shares BN statistics with its own query's group mates.

  Without the shuffle, key i is normalised with the statistics of the same
  images as query i (the leak that lets the network find its positive);
  with it, replacing query i's group mates leaves key i unchanged, while
  replacing its shuffled group mates changes it.
  """
  config, method = _method(mesh1, **{'moco_v2.shuffle_bn': shuffle})
  params, stats, _ = method.init(jax.random.key(0))
  x = np.asarray(_views(BATCH, config.dataset.image_size, seed=4)[:, 1])
  noise = np.random.RandomState(9).uniform(size=x.shape).astype(np.float32)
  rng = jax.random.key(11)
  size = BATCH // GROUPS
  perm = (np.asarray(method.shuffle_permutation(rng, BATCH)) if shuffle
          else np.arange(BATCH))
  # With shuffling: an image whose query group and shuffled key group share
  # no other image (without, they are the same group for every image).
  i = next(i for i in range(BATCH)
           if not shuffle or not set.intersection(*_groups_of(i, perm, size)))
  query_mates, key_mates = _groups_of(i, perm, size)
  before = _key_of(method, params, stats, x, rng, i)

  def replaced(indices):
    y = x.copy()
    y[sorted(indices)] = noise[sorted(indices)]
    return _key_of(method, params, stats, y, rng, i)

  changed = lambda k: not np.allclose(k, before, rtol=1e-4, atol=1e-6)
  if shuffle:
    np.testing.assert_allclose(replaced(query_mates), before, rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(
        replaced(set(range(BATCH)) - key_mates - {i}), before, rtol=1e-6,
        atol=1e-7)
    assert changed(replaced(key_mates))
  else:
    assert query_mates == key_mates
    assert changed(replaced(query_mates))


def test_shuffle_mixes_groups_across_steps(mesh1):
  _, method = _method(mesh1)
  size = BATCH // GROUPS
  shared = []
  for step in range(200):
    perm = np.asarray(method.shuffle_permutation(
        jax.random.fold_in(jax.random.key(0), step), BATCH))
    for i in range(BATCH):
      query_mates, key_mates = _groups_of(i, perm, size)
      shared.append(len(query_mates & key_mates) / len(query_mates))
  # A uniform permutation puts each of the 3 other images in key i's group
  # with probability 3/31; without shuffling the fraction is 1.
  assert abs(np.mean(shared) - 3 / 31) < 0.02


def test_gradients_on_8_devices_equal_1_device(mesh1, mesh8):
  config, m1 = _method(mesh1)
  _, m8 = _method(mesh8)
  params, batch_stats, extra = _state(m1)
  views = _views(BATCH, config.dataset.image_size, seed=6)
  batch = {'views': (views,)}
  sharded = {'views': (jax.device_put(views,
                                      NamedSharding(mesh8, P('data'))),)}

  def value_and_grad(method, batch):
    fn = functools.partial(method.loss_fn, batch_stats=batch_stats,
                           extra=extra, batch=batch, rng=jax.random.key(1),
                           step=0)
    return jax.jit(jax.value_and_grad(lambda p: fn(p)[0]))(params)

  loss1, grads1 = value_and_grad(m1, batch)
  loss8, grads8 = value_and_grad(m8, sharded)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), grads8, grads1)


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('moco_v2_tiny', fashion_mnist_dir)


def test_eight_devices_equal_one_device_with_queue_and_key_state(
    tiny, mesh1, mesh8):
  config = tiny()
  run1 = _run_steps(config, mesh1, 3)
  run8 = _run_steps(config, mesh8, 3)
  for (loss1, state1), (loss8, state8) in zip(run1, run8):
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for part in ('params', 'batch_stats', 'extra'):
      jax.tree.map(_close, getattr(state8, part), getattr(state1, part))
    assert int(state8.extra['queue_ptr']) == int(state1.extra['queue_ptr'])


def test_queue_is_replicated_and_wraps(tiny, mesh8):
  config = tiny()
  k_size = config.moco_v2.queue_size
  pointers = []

  def check(s, before, batch, state):
    # Every device holds the same queue.
    shards = [np.asarray(x.data) for x in state.extra['queue']
              .addressable_shards]
    assert len(shards) == 8
    for shard in shards[1:]:
      np.testing.assert_array_equal(shard, shards[0])
    # This step's keys, recomputed outside the step, at the old pointer.
    rng = jax.random.fold_in(jax.random.wrap_key_data(before.rng),
                             before.step)
    key_params = common.ema_update(before.extra['target']['params'],
                                   before.params, config.moco_v2.momentum)
    # The step finishes the host's crops on device before the forward.
    (views,) = device.finish_views(
        batch['views'], jax.random.fold_in(rng, steps.AUGMENT_STREAM),
        config.augment)
    k, _ = jax.jit(s.method.keys)(
        key_params, before.extra['target']['batch_stats'], views[:, 1], rng=rng)
    ptr = int(before.extra['queue_ptr'])
    rows = slice(ptr, ptr + BATCH)
    queue = shards[0]
    np.testing.assert_allclose(queue[rows], _unit(np.asarray(k, np.float64)),
                               rtol=1e-5, atol=1e-6)
    untouched = np.ones(k_size, bool)
    untouched[rows] = False
    np.testing.assert_array_equal(queue[untouched],
                                  before.extra['queue'][untouched])
    pointers.append(int(state.extra['queue_ptr']))

  _run_steps(config, mesh8, 6, on_step=check)
  assert pointers == [32, 64, 96, 0, 32, 64]


def test_run_resumes_exactly_exports_and_evaluates(tiny, tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  result = train.run(tiny(), straight)
  train.run(tiny(eval_after_training=False), resumed)
  # The process "died" after saving step 4 and before saving step 8.
  (epath.Path(resumed) / 'checkpoints' / '8').rmtree()
  assert train.run(tiny(eval_after_training=False), resumed)['step'] == 8
  a, b = restore_state(tiny(), straight, 8), restore_state(tiny(), resumed, 8)
  jax.tree.map(np.testing.assert_array_equal, b, a)
  assert set(a.extra) == {'target', 'queue', 'queue_ptr'}
  assert set(a.extra['target']) == {'params', 'batch_stats'}
  # The queue went round once: 8 steps of 32 keys in a queue of 128.
  assert int(a.extra['queue_ptr']) == 0
  enc, base = result['eval']['encoder'], result['eval']['random_init']
  for r in (enc, base):
    assert_evaluation(r)
  spec, _, exported = evaluate.load_encoder(straight, parallel.make_mesh())
  assert spec['method'] == 'moco_v2' and spec['step'] == 8
  # The export is the query encoder (encoder_q), as the official export.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported),
               {'params': a.params['encoder'],
                'batch_stats': a.batch_stats['encoder']})


def test_cpu_config_loss_is_finite_and_decreasing(fashion_mnist_dir, mesh8):
  # The config with a 1,024-key queue (4 batches, not 16), to fill it
  # sooner: 24 steps in all, not 36.
  config = load_config('moco_v2_fashion_mnist',
                       **{'dataset.data_dir': fashion_mnist_dir,
                          'moco_v2.queue_size': 1024})
  fill = config.moco_v2.queue_size // config.global_batch_size
  losses = np.array([loss for loss, _ in
                     _run_steps(config, mesh8, fill + 20)])
  assert np.all(np.isfinite(losses))
  # Once the queue holds only real keys, the loss goes down.
  assert losses[-5:].mean() < losses[fill:fill + 5].mean()


@pytest.mark.parametrize('overrides, match', [
    ({'moco_v2.queue_size': 100},
     'moco_v2.queue_size=100 must be a positive multiple of '
     'global_batch_size=32'),
    ({'moco_v2.temperature': 0.0}, 'moco_v2.temperature=0.0 must be > 0'),
    ({'moco_v2.momentum': 1.5}, r'moco_v2.momentum=1.5 must be in \[0, 1\]'),
    ({'moco_v2.bn_groups': 5}, 'moco_v2.bn_groups=5 must be 0'),
    ({'augment.num_views': 3}, 'augment.num_views=3'),
])
def test_bad_config_fails_before_compiling(overrides, match):
  with pytest.raises(ValueError, match=match) as info:
    train.setup(load_config('moco_v2_tiny', **overrides))
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('bn_groups, devices, expected', [
    (0, 8, 8), (0, 1, 1), (4, 8, 4), (8, 1, 8)])
def test_bn_groups_default_to_the_device_count(mesh1, mesh8, bn_groups,
                                               devices, expected):
  _, method = _method(mesh8 if devices == 8 else mesh1,
                      **{'moco_v2.bn_groups': bn_groups})
  assert method.bn_groups == expected
