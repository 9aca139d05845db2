"""Tests for SwAV: Sinkhorn (standard and log-domain) and the swapped loss.

The reference Sinkhorn is a float64 NumPy transcription of the official
`distributed_sinkhorn` (K x B orientation, no max subtraction); the
reference loss follows `main_swav.py:train`'s loops and averaging.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxssl import losses


def assert_close(actual, expected, rtol=1e-5):
  expected = np.asarray(expected, np.float64)
  atol = rtol * 0.1 * max(np.max(np.abs(expected)), 1e-30)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=rtol, atol=atol)


def numeric_grad(f, x, h=1e-6):
  x = np.array(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    saved = x[idx]
    x[idx] = saved + h
    up = f(x)
    x[idx] = saved - h
    down = f(x)
    x[idx] = saved
    grad[idx] = (up - down) / (2 * h)
  return grad


def np_sinkhorn(out, epsilon=0.05, iters=3, dtype=np.float64):
  """Official distributed_sinkhorn on one process (world_size 1)."""
  with np.errstate(over='ignore', invalid='ignore'):
    q = np.exp(np.asarray(out, dtype) / dtype(epsilon)).T
    num_protos, num_samples = q.shape
    q /= np.sum(q)
    for _ in range(iters):
      q /= np.sum(q, axis=1, keepdims=True)
      q /= num_protos
      q /= np.sum(q, axis=0, keepdims=True)
      q /= num_samples
    return (q * num_samples).T


def np_sinkhorn_log(out, epsilon=0.05, iters=3):
  """The same iteration with every division done as a float64 LSE."""
  def lse(x, axis):
    peak = x.max(axis=axis, keepdims=True)
    return peak + np.log(np.exp(x - peak).sum(axis=axis, keepdims=True))
  log_q = np.asarray(out, np.float64) / epsilon
  num_samples, num_protos = log_q.shape
  log_q -= lse(log_q.ravel(), 0)
  for _ in range(iters):
    log_q -= lse(log_q, 0) + np.log(num_protos)
    log_q -= lse(log_q, 1) + np.log(num_samples)
  return np.exp(log_q + np.log(num_samples))


def np_log_softmax(x):
  x = x - x.max(1, keepdims=True)
  return x - np.log(np.exp(x).sum(1, keepdims=True))


def np_swav(scores, codes_from, crops_for_assign=(0, 1), temperature=0.1,
            queue=None):
  """main_swav.py's loss; codes come from `codes_from` (held fixed)."""
  n_crops, batch = len(scores), len(scores[0])
  loss = 0.0
  for i, crop in enumerate(crops_for_assign):
    out = np.float64(codes_from[crop])
    if queue is not None:
      out = np.concatenate([queue[i], out])
    q = np_sinkhorn(out)[-batch:]
    subloss = 0.0
    for v in np.delete(np.arange(n_crops), crop):
      x = np.float64(scores[v]) / temperature
      subloss -= np.mean(np.sum(q * np_log_softmax(x), axis=1))
    loss += subloss / (n_crops - 1)
  return loss / len(crops_for_assign)


def _scores(seed, shape, crops=1):
  """Cosine-like scores in [-1, 1]."""
  rng = np.random.default_rng(seed)
  return [np.tanh(rng.normal(size=shape)).astype(np.float32)
          for _ in range(crops)]


SINKHORNS = {'sinkhorn': losses.sinkhorn, 'sinkhorn_log': losses.sinkhorn_log}


@pytest.mark.parametrize('name', sorted(SINKHORNS))
@pytest.mark.parametrize('epsilon,iters', [(0.05, 3), (0.1, 1), (0.5, 5)])
def test_sinkhorn_matches_official(name, epsilon, iters):
  scores = _scores(int(epsilon * 100) + iters, (12, 7))[0]
  fn = jax.jit(functools.partial(SINKHORNS[name], epsilon=epsilon,
                                 num_iters=iters))
  codes = fn(scores)
  assert codes.dtype == jnp.float32 and codes.shape == (12, 7)
  assert_close(codes, np_sinkhorn(scores, epsilon, iters))
  assert_close(codes.sum(1), np.ones(12))


@pytest.mark.parametrize('name', sorted(SINKHORNS))
def test_sharded_sinkhorn_equals_single_device(mesh8, name):
  scores = _scores(5, (24, 6))[0]
  single = jax.jit(SINKHORNS[name])(scores)
  sharded = jax.jit(jax.shard_map(
      functools.partial(SINKHORNS[name], axis_name='data'), mesh=mesh8,
      in_specs=P('data'), out_specs=P('data')))(scores)
  assert_close(sharded, single)
  assert_close(sharded, np_sinkhorn(scores))


def test_log_domain_finite_where_official_overflows():
  rng = np.random.default_rng(6)
  scores = rng.choice([-50.0, 50.0], size=(16, 10)).astype(np.float32)
  scores[:, 3] = -50.0  # a prototype that no sample likes
  official32 = np_sinkhorn(scores, dtype=np.float32)
  assert not np.all(np.isfinite(official32))  # the failure being fixed
  codes = jax.jit(losses.sinkhorn_log)(scores)
  assert np.all(np.isfinite(codes))
  assert_close(codes.sum(1), np.ones(16))
  assert_close(codes, np_sinkhorn_log(scores))
  assert not np.all(np.isfinite(jax.jit(losses.sinkhorn)(scores)))


def test_sinkhorn_bfloat16_input():
  scores = _scores(7, (8, 5))[0]
  codes = jax.jit(losses.sinkhorn)(jnp.asarray(scores, jnp.bfloat16))
  assert codes.dtype == jnp.float32
  rounded = np.asarray(jnp.asarray(scores, jnp.bfloat16), np.float32)
  assert_close(codes, np_sinkhorn(rounded))


@pytest.mark.parametrize('crops,assign', [(2, (0, 1)), (4, (0, 1)), (3, (1,))])
def test_swav_loss_matches_official(crops, assign):
  scores = _scores(crops, (6, 5), crops)
  fn = jax.jit(jax.value_and_grad(functools.partial(
      losses.swav_loss, crops_for_assign=assign)))
  loss, grads = fn(scores)
  assert_close(loss, np_swav(scores, scores, assign))
  for c in range(crops):
    def ref(x, c=c):
      moved = list(scores)
      moved[c] = x
      return np_swav(moved, scores, assign)  # codes held fixed
    assert_close(grads[c], numeric_grad(ref, scores[c]))


def test_swav_queue_joins_sinkhorn_only():
  scores = _scores(8, (6, 5), 3)
  queue = _scores(9, (10, 5), 2)
  fn = jax.jit(functools.partial(losses.swav_loss, queue_scores=queue))
  loss = fn(scores)
  assert_close(loss, np_swav(scores, scores, queue=queue))
  no_queue = jax.jit(losses.swav_loss)(scores)
  assert abs(float(loss) - float(no_queue)) > 1e-4  # the queue matters


@pytest.mark.parametrize('log_domain', [False, True])
def test_sharded_swav_equals_single_device(mesh8, log_domain):
  scores = _scores(10, (16, 6), 4)
  queue = _scores(11, (24, 6), 2)
  kwargs = dict(crops_for_assign=(0, 1), log_domain=log_domain)
  single = jax.jit(jax.value_and_grad(functools.partial(
      losses.swav_loss, **kwargs)))
  sharded = jax.shard_map(
      lambda s, q: losses.swav_loss(s, queue_scores=q, axis_name='data',
                                    **kwargs),
      mesh=mesh8, in_specs=(P('data'), P('data')), out_specs=P())
  loss, grads = single(scores, queue_scores=queue)
  loss8, grads8 = jax.jit(jax.value_and_grad(sharded))(scores, queue)
  assert_close(loss8, loss)
  for g8, g in zip(grads8, grads):
    assert_close(g8, g)
  assert_close(loss8, np_swav(scores, scores, queue=queue))
