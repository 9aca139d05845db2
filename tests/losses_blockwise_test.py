"""Tests for jaxssl.losses.nt_xent_blockwise(_with_metrics).

Blockwise must equal dense `nt_xent` in value and gradients for any block
size (dividing the batch or not), on one device and inside shard_map, and
its compiled temporary memory must grow linearly, not quadratically.
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


def np_nt_xent(z1, z2, tau):
  """Paper eq. 1 in float64, vectorised; self excluded by deletion."""
  h = np.concatenate([z1, z2]).astype(np.float64)
  h /= np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-6)
  views = len(h)
  sim = h @ h.T / tau
  others = sim[~np.eye(views, dtype=bool)].reshape(views, views - 1)
  peak = others.max(1)
  lse = peak + np.log(np.exp(others - peak[:, None]).sum(1))
  positive = sim[np.arange(views), (np.arange(views) + views // 2) % views]
  return np.mean(lse - positive)


def _pair(seed, n, d, noise=None):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d)).astype(np.float32)
  if noise is None:
    return z1, rng.normal(size=(n, d)).astype(np.float32)
  return z1, (z1 + noise * rng.normal(size=(n, d))).astype(np.float32)


def _value_and_grad(fn, **kwargs):
  return jax.jit(jax.value_and_grad(functools.partial(fn, **kwargs),
                                    argnums=(0, 1)))


# 12 images: 24 anchors and keys. 5 and 7 divide neither; 1 is the extreme;
# 24 is one block; 100 exceeds the batch.
@pytest.mark.parametrize('block_size', [1, 5, 7, 8, 24, 100])
def test_blockwise_equals_dense(block_size):
  z1, z2 = _pair(block_size, 12, 6)
  loss, grads = _value_and_grad(losses.nt_xent, temperature=0.1)(z1, z2)
  loss_b, grads_b = _value_and_grad(
      losses.nt_xent_blockwise, temperature=0.1, block_size=block_size)(
          z1, z2)
  assert_close(loss_b, loss)
  for gb, g in zip(grads_b, grads):
    assert_close(gb, g)
  assert_close(loss_b, np_nt_xent(z1, z2, 0.1))


@pytest.mark.parametrize('block_size,tau', [(3, 0.1), (5, 0.5), (64, 0.2)])
def test_sharded_blockwise_equals_single_device_dense(mesh8, block_size, tau):
  z1, z2 = _pair(21, 24, 5)
  sharded = jax.shard_map(
      functools.partial(losses.nt_xent_blockwise, temperature=tau,
                        block_size=block_size, axis_name='data'),
      mesh=mesh8, in_specs=P('data'), out_specs=P())
  loss8, grads8 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(z1, z2)
  loss, grads = _value_and_grad(losses.nt_xent, temperature=tau)(z1, z2)
  assert_close(loss8, loss)
  for g8, g in zip(grads8, grads):
    assert_close(g8, g)


@pytest.mark.parametrize('block_size,noise', [(4, 0.5), (7, 2.0), (50, 1.0)])
def test_streamed_metrics_equal_dense(block_size, noise):
  z1, z2 = _pair(31, 20, 6, noise=noise)
  loss, metrics = jax.jit(functools.partial(
      losses.nt_xent_with_metrics, temperature=0.1))(z1, z2)
  loss_b, metrics_b = jax.jit(functools.partial(
      losses.nt_xent_blockwise_with_metrics, temperature=0.1,
      block_size=block_size))(z1, z2)
  assert_close(loss_b, loss)
  assert metrics_b['contrast_acc'] == metrics['contrast_acc']
  assert 0.0 < float(metrics['contrast_acc']) < 1.0  # the case is not trivial
  assert_close(metrics_b['contrast_entropy'], metrics['contrast_entropy'])


def test_streamed_metrics_sharded(mesh8):
  z1, z2 = _pair(32, 16, 6, noise=1.0)
  fn = jax.shard_map(
      functools.partial(losses.nt_xent_blockwise_with_metrics,
                        temperature=0.1, block_size=3, axis_name='data'),
      mesh=mesh8, in_specs=P('data'), out_specs=P())
  loss8, metrics8 = jax.jit(fn)(z1, z2)
  loss, metrics = jax.jit(functools.partial(
      losses.nt_xent_with_metrics, temperature=0.1))(z1, z2)
  assert_close(loss8, loss)
  for key in metrics:
    assert_close(metrics8[key], metrics[key])


def test_zero_vectors_and_bfloat16_are_finite():
  z1, z2 = _pair(33, 10, 8)
  z1[0] = 0.0
  b1, b2 = jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)
  loss, grads = _value_and_grad(
      losses.nt_xent_blockwise, temperature=0.1, block_size=3)(b1, b2)
  assert loss.dtype == jnp.float32
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
  rounded = np.asarray(b1, np.float32), np.asarray(b2, np.float32)
  assert_close(loss, np_nt_xent(*rounded, 0.1))


@pytest.mark.parametrize('views', [4096, 16384])
def test_temporary_memory_is_linear_in_views(views):
  """XLA's buffer assignment for fwd+bwd: no [views, views] buffer.

  Dense needs two `views²` float32 buffers (128 MiB at 4096 views); the
  bound below is a few `[views, dim]` arrays plus a few tiles.
  """
  dim, block = 128, 256
  z = jnp.zeros((views // 2, dim), jnp.float32)
  fn = _value_and_grad(losses.nt_xent_blockwise, temperature=0.1,
                       block_size=block)
  temp = fn.lower(z, z).compile().memory_analysis().temp_size_in_bytes
  assert temp < 8 * views * dim * 4 + 8 * block * block * 4


def test_dense_memory_bound_is_meaningful():
  """The bound above rejects the dense loss, so the test can fail."""
  views, dim, block = 4096, 128, 256
  z = jnp.zeros((views // 2, dim), jnp.float32)
  fn = _value_and_grad(losses.nt_xent, temperature=0.1)
  temp = fn.lower(z, z).compile().memory_analysis().temp_size_in_bytes
  assert temp > 8 * views * dim * 4 + 8 * block * block * 4
