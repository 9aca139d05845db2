"""Tests for MoCo v2 (queue) and MoCo v3 InfoNCE and the MoCo queue update.

References are float64 NumPy transcriptions of the formulas in
facebookresearch/moco `builder.py` and facebookresearch/moco-v3
`builder.py`; gradients are central finite differences with keys held
fixed (they come from the no-grad momentum encoder).
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


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _ce(logits, labels):
  peak = logits.max(1, keepdims=True)
  lse = peak[:, 0] + np.log(np.exp(logits - peak).sum(1))
  return lse - logits[np.arange(len(logits)), labels]


def np_moco_v2(q, k, queue, tau):
  q, k = _normalize(q), _normalize(k)
  l_pos = np.einsum('nc,nc->n', q, k)[:, None]
  l_neg = q @ np.asarray(queue, np.float64).T
  logits = np.concatenate([l_pos, l_neg], 1) / tau
  return np.mean(_ce(logits, np.zeros(len(q), int)))


def np_moco_v3(q1, q2, k1, k2, tau):
  def ctr(q, k):
    logits = _normalize(q) @ _normalize(k).T / tau
    return np.mean(_ce(logits, np.arange(len(q)))) * 2 * tau
  return ctr(q1, k2) + ctr(q2, k1)


def np_enqueue(queue, ptr, keys):
  """`_dequeue_and_enqueue` on a `[K, d]` queue (the official is `[d, K]`)."""
  queue = queue.copy()
  batch = len(keys)
  assert len(queue) % batch == 0
  queue[ptr:ptr + batch] = _normalize(keys)
  return queue, (ptr + batch) % len(queue)


def _arrays(seed, shapes):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=s).astype(np.float32) for s in shapes]


def _queue(seed, size, d):
  return _normalize(_arrays(seed, [(size, d)])[0]).astype(np.float32)


@pytest.mark.parametrize('n,d,size,tau', [(4, 5, 12, 0.2), (6, 8, 30, 0.07)])
def test_moco_v2_matches_official_formula(n, d, size, tau):
  q, k = _arrays(n, [(n, d), (n, d)])
  queue = _queue(1, size, d)
  fn = jax.jit(jax.value_and_grad(functools.partial(
      losses.moco_v2_infonce, temperature=tau), argnums=(0, 1, 2)))
  loss, (gq, gk, gqueue) = fn(q, k, queue)
  assert_close(loss, np_moco_v2(q, k, queue, tau))
  assert_close(gq, numeric_grad(lambda x: np_moco_v2(x, k, queue, tau), q))
  assert not np.any(gk) and not np.any(gqueue)  # keys and queue: no gradient


def test_moco_v2_sharded_equals_single_device(mesh8):
  q, k = _arrays(2, [(16, 6), (16, 6)])
  queue = _queue(3, 32, 6)
  single = jax.jit(jax.value_and_grad(functools.partial(
      losses.moco_v2_infonce, temperature=0.2)))
  sharded = jax.shard_map(
      functools.partial(losses.moco_v2_infonce, temperature=0.2,
                        axis_name='data'),
      mesh=mesh8, in_specs=(P('data'), P('data'), P()), out_specs=P())
  loss, grad = single(q, k, queue)
  loss8, grad8 = jax.jit(jax.value_and_grad(sharded))(q, k, queue)
  assert_close(loss8, loss)
  assert_close(grad8, grad)


@pytest.mark.parametrize('per_device', [1, 2])
def test_moco_enqueue_wraps_like_official(mesh8, per_device):
  """Several steps over a queue of 3 global batches: the pointer wraps."""
  d, global_batch = 4, 8 * per_device
  size = 3 * global_batch
  queue = _queue(4, size, d)
  ref_queue, ref_ptr = np.asarray(queue, np.float64), 0
  enqueue = jax.jit(losses.moco_enqueue)
  enqueue8 = jax.jit(jax.shard_map(
      functools.partial(losses.moco_enqueue, axis_name='data'), mesh=mesh8,
      in_specs=(P(), P(), P('data')), out_specs=(P(), P())))
  state = state8 = (jnp.asarray(queue), jnp.int32(0))
  ptrs = []
  for step in range(5):
    keys = _arrays(10 + step, [(global_batch, d)])[0]
    state = enqueue(*state, keys)
    state8 = enqueue8(*state8, keys)
    ref_queue, ref_ptr = np_enqueue(ref_queue, ref_ptr, keys)
    assert_close(state[0], ref_queue)
    np.testing.assert_array_equal(state8[0], state[0])
    assert int(state[1]) == int(state8[1]) == ref_ptr
    ptrs.append(ref_ptr)
  assert ptrs == [global_batch, 2 * global_batch, 0, global_batch,
                  2 * global_batch]


def test_moco_enqueue_keeps_queue_dtype():
  queue = jnp.zeros((8, 4), jnp.bfloat16)
  keys = _arrays(5, [(4, 4)])[0]
  new_queue, ptr = jax.jit(losses.moco_enqueue)(queue, jnp.int32(4), keys)
  assert new_queue.dtype == jnp.bfloat16 and ptr.dtype == jnp.int32
  assert int(ptr) == 0
  assert not np.any(np.asarray(new_queue[:4], np.float32))
  assert_close(np.asarray(new_queue[4:], np.float32),
               _normalize(keys), rtol=1e-2)  # bfloat16 storage


@pytest.mark.parametrize('n,d,tau', [(4, 5, 1.0), (5, 3, 0.2)])
def test_moco_v3_matches_official_formula(n, d, tau):
  q1, q2, k1, k2 = _arrays(n + d, [(n, d)] * 4)
  fn = jax.jit(jax.value_and_grad(functools.partial(
      losses.moco_v3_infonce, temperature=tau), argnums=(0, 1, 2, 3)))
  loss, (g1, g2, gk1, gk2) = fn(q1, q2, k1, k2)
  assert_close(loss, np_moco_v3(q1, q2, k1, k2, tau))
  assert_close(g1, numeric_grad(lambda x: np_moco_v3(x, q2, k1, k2, tau), q1))
  assert_close(g2, numeric_grad(lambda x: np_moco_v3(q1, x, k1, k2, tau), q2))
  assert not np.any(gk1) and not np.any(gk2)


def test_moco_v3_scale_factor_is_two_tau():
  """At τ = 1 the loss is exactly twice the plain symmetric cross-entropy."""
  q1, q2, k1, k2 = _arrays(9, [(4, 6)] * 4)
  plain = np_moco_v3(q1, q2, k1, k2, 1.0) / 2.0
  assert_close(jax.jit(functools.partial(
      losses.moco_v3_infonce, temperature=1.0))(q1, q2, k1, k2), 2 * plain)


@pytest.mark.parametrize('per_device', [1, 3])
def test_moco_v3_sharded_equals_single_device(mesh8, per_device):
  arrays = _arrays(per_device, [(8 * per_device, 5)] * 4)
  single = jax.jit(jax.value_and_grad(functools.partial(
      losses.moco_v3_infonce, temperature=0.2), argnums=(0, 1, 2, 3)))
  sharded = jax.shard_map(
      functools.partial(losses.moco_v3_infonce, temperature=0.2,
                        axis_name='data'),
      mesh=mesh8, in_specs=P('data'), out_specs=P())
  loss, grads = single(*arrays)
  loss8, grads8 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(
      *arrays)
  assert_close(loss8, loss)
  for g8, g in zip(grads8, grads):
    assert_close(g8, g)
  assert_close(loss8, np_moco_v3(*arrays, 0.2))


def test_zero_vectors_and_bfloat16_are_finite():
  q, k = _arrays(20, [(4, 8), (4, 8)])
  q[0] = 0.0
  k[1] = 0.0
  queue = _queue(21, 8, 8)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, q, k)]
  v2 = jax.jit(functools.partial(losses.moco_v2_infonce, temperature=0.2))(
      bf[0], bf[1], jnp.asarray(queue, jnp.bfloat16))
  v3 = jax.jit(functools.partial(losses.moco_v3_infonce, temperature=0.2))(
      *bf)
  for loss in (v2, v3):
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
  rounded = [np.asarray(x, np.float32) for x in bf]
  assert_close(v3, np_moco_v3(*rounded, 0.2))
