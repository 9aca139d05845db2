"""Exact gradient accumulation: jaxssl/methods/micro_batches.py and the step.

The claim under test: with `accumulation_steps` = k the step's loss and
gradient are those of ONE step over the whole global batch whose
BatchNorm statistics are grouped by micro-batch (micro-batch m = examples
m, m + k, ...). The references are written independently here:
- the literal two-pass gradient cache (Gao et al. 2021): embed every
  micro-batch, differentiate the loss with respect to all embeddings, then
  one VJP per micro-batch with its slice of that gradient, summed;
- one differentiation through an unrolled Python loop of micro-batch
  forwards (no scan, no remat), for every method in the registry: the
  'gradient_cache' methods through their own forwards, the 'average' ones
  (BYOL, SimSiam) as the gradient of the mean of micro-batch losses.
Each comparison runs on 8 devices and on 1, values and gradients.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import assert_resumes_bit_identical, load_config, make_method
from helpers import tiny_factory
from jaxssl import config_schema
from jaxssl import losses
from jaxssl import methods
from jaxssl import parallel
from jaxssl import steps
from jaxssl.methods import micro_batches

K = 2  # micro-batches of the method cases: 32 / 2 = 16, two per device


class _Embedder(nn.Module):
  """A BatchNorm MLP: a stand-in for an encoder and head."""

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Dense(12)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(6)(nn.relu(x))


def _embed(net, params, stats, x):
  """`[n, 2, d]` pairs to `[n, 2, 6]` embeddings, BN over the 2n rows."""
  out, mutated = net.apply({'params': params, 'batch_stats': stats},
                           x.reshape(-1, x.shape[-1]), train=True,
                           mutable=['batch_stats'])
  return out.reshape(x.shape[0], 2, -1), mutated['batch_stats']


def _ntxent(z):
  return losses.nt_xent(z[:, 0], z[:, 1], 0.5)


def _literal_gradient_cache(net, params, stats, x, k):
  """GradCache's two passes written out: `(loss, grads, stats)`."""
  chunks = [x[m::k] for m in range(k)]
  z, running = [], stats
  for chunk in chunks:  # pass 1: embeddings only
    z_m, running = _embed(net, params, running, chunk)
    z.append(z_m)
  order = np.argsort(np.concatenate([np.arange(m, len(x), k)
                                     for m in range(k)]))
  z_all = jnp.concatenate(z)[order]
  loss, dz = jax.value_and_grad(_ntxent)(z_all)
  grads = jax.tree.map(jnp.zeros_like, params)
  for m, chunk in enumerate(chunks):  # pass 2: one VJP per micro-batch
    _, vjp = jax.vjp(lambda p, c=chunk: _embed(net, p, stats, c)[0], params)
    (g,) = vjp(dz[m::k])
    grads = jax.tree.map(jnp.add, grads, g)
  return loss, grads, running


def _unrolled(fn, k, mesh=None):
  """`micro_batches.micro_batched`'s meaning, as a plain Python loop."""
  del mesh
  if k == 1:
    return fn

  def run(params, batch_stats, inputs, **kw):
    outputs = []
    for m in range(k):
      chunk = jax.tree.map(lambda a, m=m: a[m::k], inputs)
      extra = {'rng': jax.random.fold_in(kw['rng'], m)} if kw else {}
      out, batch_stats = fn(params, batch_stats, chunk, **extra)
      outputs.append(out)
    # Example i = m + k·j sits at row j of micro-batch m.
    merged = jax.tree.map(
        lambda *parts: jnp.stack(parts, axis=1).reshape(
            (-1,) + parts[0].shape[1:]), *outputs)
    return merged, batch_stats

  return run


def _put(x, mesh):
  return jax.device_put(x, NamedSharding(mesh, P('data')))


@pytest.mark.parametrize('k', [2, 4])
def test_micro_batched_is_the_two_pass_gradient_cache(mesh8, mesh1, k):
  net = _Embedder()
  x = np.random.RandomState(0).normal(size=(32, 2, 5)).astype(np.float32)
  variables = net.init(jax.random.key(1), x[:, 0], train=True)
  params, stats = variables['params'], variables['batch_stats']
  ref_loss, ref_grads, ref_stats = _literal_gradient_cache(
      net, params, stats, x, k)

  def loss_of(forward, p, xs):
    z, new_stats = forward(p, stats, xs)
    return _ntxent(z), new_stats

  unrolled = _unrolled(functools.partial(_embed, net), k)
  (loss_u, stats_u), grads_u = jax.value_and_grad(
      functools.partial(loss_of, unrolled), has_aux=True)(params, x)
  for mesh in (mesh8, mesh1):
    forward = micro_batches.micro_batched(functools.partial(_embed, net), k,
                                          mesh)
    (loss, new_stats), grads = jax.jit(jax.value_and_grad(
        functools.partial(loss_of, forward), has_aux=True))(
            params, _put(x, mesh))
    for got in ((loss, grads, new_stats), (loss_u, grads_u, stats_u)):
      jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5,
                                     atol=1e-6),
                   got, (ref_loss, ref_grads, ref_stats))
  # Ghost BN is real: the whole batch's BN gives another gradient.
  whole = jax.grad(lambda p: _ntxent(_embed(net, p, stats, x)[0]))(params)
  assert not np.allclose(whole['Dense_0']['kernel'],
                         ref_grads['Dense_0']['kernel'], rtol=1e-3)


def test_a_method_that_wraps_no_forward_is_refused(mesh8, monkeypatch):
  # A 'gradient_cache' method whose forwards skip `accumulated` would
  # silently run the whole batch at once: the step says so while tracing.
  config = load_config('simclr_tiny', accumulation_steps=2)
  method = make_method(config, mesh8, steps_per_epoch=4, total_steps=8)
  monkeypatch.setattr(method, 'accumulated', lambda forward: forward)
  batch = _method_batch(config, mesh8)
  with pytest.raises(ValueError, match=r"^accumulation_steps=2: method "
                     r"'simclr' is 'gradient_cache' but runs no forward "
                     r"through `self.accumulated`"):
    steps.value_and_grad(method, _state(method), {'views': batch['views']},
                         jax.random.key(0))


def test_split_and_merge_are_strided_and_inverse():
  x = jnp.arange(12 * 3).reshape(12, 3)
  parts = micro_batches.split({'a': x}, 3)['a']
  np.testing.assert_array_equal(parts[1], x[1::3])
  np.testing.assert_array_equal(micro_batches.merge(parts), x)


def _method_batch(config, mesh, num_channels=1):
  """A random global batch with every resolution the config asks for."""
  rng = np.random.RandomState(3)
  n, a = config.global_batch_size, config.augment
  views = [(a.num_views, config.dataset.image_size)]
  if a.num_small_views:
    views.append((a.num_small_views, a.small_image_size))
  batch = {'views': tuple(
      _put(rng.uniform(size=(n, v, s, s, num_channels)).astype(np.float32),
           mesh) for v, s in views),
           'label': _put(rng.randint(0, 10, n).astype(np.int32), mesh),
           'index': _put(np.arange(n, dtype=np.int32), mesh)}
  return batch


def _state(method, step=3):
  params, stats, extra = method.init(jax.random.key(0))
  return steps.TrainState(
      step=jnp.asarray(step, jnp.int32), params=params, batch_stats=stats,
      opt_state={}, rng=jax.random.key_data(jax.random.key(5)), extra=extra,
      probe={})


def _average_reference(method, state, batch, rng, k):
  """The gradient of the mean of micro-batch losses, one differentiation."""
  extra0 = method.before_forward(state.params, state.extra, state.step)

  def whole(params):
    stats, extra, total = state.batch_stats, extra0, 0.
    for m in range(k):
      chunk = jax.tree.map(lambda a, m=m: a[m::k], batch)
      loss, aux = method.compute_loss(params, stats, extra, chunk,
                                      jax.random.fold_in(rng, m), state.step)
      stats, extra, total = aux.batch_stats, aux.extra, total + loss / k
    return total, (stats, extra)

  (loss, (stats, extra)), grads = jax.value_and_grad(whole, has_aux=True)(
      state.params)
  return loss, grads, stats, extra


def _accumulated(name, mesh, k, reference, monkeypatch):
  config = load_config(f'{name}_tiny', accumulation_steps=k)
  method = make_method(config, mesh, steps_per_epoch=4, total_steps=8)
  batch = _method_batch(config, mesh)
  batch = {key: batch[key] for key in method.batch_keys()}
  state, rng = _state(method), jax.random.key(7)
  if reference and method.accumulation == 'average':
    return jax.jit(_average_reference, static_argnums=(0, 4))(
        method, state, batch, rng, k)
  if reference:
    monkeypatch.setattr(micro_batches, 'micro_batched', _unrolled)
  (loss, aux), grads = jax.jit(steps.value_and_grad, static_argnums=0)(
      method, state, batch, rng)
  monkeypatch.undo()
  return loss, grads, aux.batch_stats, aux.extra


def _scaled_difference(got, want) -> float:
  """max|got - want| over the leaves of a tree, over max|want| of the tree.

  float32 sums taken in another order differ by ~1e-6 of the tree's scale
  (the largest gradient), whatever an entry's own size: a bias before a
  BatchNorm has a gradient that is 0 up to that rounding.
  """
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(
      np.asarray(a, np.float64) - np.asarray(b, np.float64)))), got, want)
  if not jax.tree.leaves(want):
    return 0.  # SimCLR's empty extra state
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want))
  return max(jax.tree.leaves(diffs)) / max(scale, 1e-30)


# Float32 noise of these tiny networks, measured without accumulation: the
# same step compiled for 8 devices and for 1 differs by up to 5e-5 of the
# gradient's scale (MoCo v3's InfoNCE, SimSiam's normalised cosines), and
# by ~2e-6 between a scan and an unrolled loop on one mesh. Ghost BN moves
# the gradient by more than 1e-3 (asserted), so 1e-4 still tells them apart.
TOLERANCE = 1e-4


def _assert_close(got, want, tolerance, where):
  """Loss, gradients, BN statistics and extra state, each to its scale."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for part, (a, b) in enumerate(zip(got, want)):
    difference = _scaled_difference(a, b)
    assert difference < tolerance, (where, part, difference)


@pytest.mark.parametrize('name', sorted(methods.METHODS))
def test_accumulated_gradient_is_the_whole_batch_with_ghost_bn(
    name, mesh8, mesh1, monkeypatch):
  results = {}
  for mesh in (mesh8, mesh1):
    got = _accumulated(name, mesh, K, False, monkeypatch)
    expected = _accumulated(name, mesh, K, True, monkeypatch)
    _assert_close(got, expected, TOLERANCE, mesh.devices.size)
    results[mesh.devices.size] = got
  _assert_close(results[1], results[8], TOLERANCE, '8 vs 1')
  one_step = _accumulated(name, mesh8, 1, False, monkeypatch)
  ghost = _scaled_difference(one_step[1], results[8][1])  # the gradients
  assert ghost > 10 * TOLERANCE, f'ghost BN moved little: {ghost}'


def test_each_method_declares_its_accumulation():
  kinds = {name: cls.accumulation for name, cls in methods.METHODS.items()}
  assert kinds == {'simclr': 'gradient_cache', 'moco_v2': 'gradient_cache',
                   'moco_v3': 'gradient_cache', 'swav': 'gradient_cache',
                   'byol': 'average', 'simsiam': 'average'}


@pytest.mark.parametrize('overrides, message', [
    ({'accumulation_steps': 0}, 'accumulation_steps=0 must be a positive '
     'divisor of global_batch_size=32'),
    ({'accumulation_steps': 3}, 'accumulation_steps=3 must be a positive '
     'divisor of global_batch_size=32'),
])
def test_bad_accumulation_is_one_line(overrides, message):
  config = load_config('simclr_tiny', **overrides)
  with pytest.raises(ValueError) as e:
    config_schema.validate(config)
  assert str(e.value) == message


def test_micro_batch_must_split_over_the_devices(mesh8):
  with pytest.raises(ValueError, match=r'^global_batch_size=32 / '
                     r'accumulation_steps=8 is not a whole multiple of the '
                     r'device count 8; use a global batch that is a multiple '
                     r'of 64$'):
    parallel.check_batch_divides(32, mesh8, 1, 8)


def test_accumulated_run_resumes_exactly(fashion_mnist_dir, tmp_path):
  make = tiny_factory('simclr_tiny', fashion_mnist_dir,
                      eval_after_training=False)
  assert_resumes_bit_identical(make(accumulation_steps=2), tmp_path)
