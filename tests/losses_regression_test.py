"""Tests for BYOL's regression loss and SimSiam's negative cosine.

References use the cosine formula `p·z / (‖p‖‖z‖)` in float64 (not the
difference-of-normalised-vectors form the implementation uses), and
finite-difference gradients with the targets held fixed.
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


def np_cos(p, z):
  p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
  return np.sum(p * z, 1) / (np.linalg.norm(p, axis=1) *
                             np.linalg.norm(z, axis=1))


def np_byol(p1, p2, z1, z2):
  return np.mean((2 - 2 * np_cos(p1, z2)) + (2 - 2 * np_cos(p2, z1)))


def np_simsiam(p1, p2, z1, z2):
  return -0.5 * (np.mean(np_cos(p1, z2)) + np.mean(np_cos(p2, z1)))


def _arrays(seed, n, d):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(n, d)).astype(np.float32) for _ in range(4)]


REFERENCES = {
    'byol_loss': (losses.byol_loss, np_byol),
    'simsiam_loss': (losses.simsiam_loss, np_simsiam),
}


@pytest.mark.parametrize('name', sorted(REFERENCES))
@pytest.mark.parametrize('n,d', [(3, 4), (6, 16)])
def test_symmetric_losses_match_formula(name, n, d):
  fn, reference = REFERENCES[name]
  p1, p2, z1, z2 = _arrays(n * d, n, d)
  loss, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(
      p1, p2, z1, z2)
  assert loss.dtype == jnp.float32
  assert_close(loss, reference(p1, p2, z1, z2))
  assert_close(grads[0], numeric_grad(
      lambda x: reference(x, p2, z1, z2), p1))
  assert_close(grads[1], numeric_grad(
      lambda x: reference(p1, x, z1, z2), p2))
  assert not np.any(grads[2]) and not np.any(grads[3])  # stop_gradient


def test_byol_regression_per_example():
  p, _, z, _ = _arrays(1, 5, 7)
  per_example = jax.jit(losses.byol_regression)(p, z)
  assert per_example.shape == (5,)
  assert_close(per_example, 2 - 2 * np_cos(p, z))
  assert_close(jax.jit(losses.byol_regression)(p, -3.0 * p), np.full(5, 4.0))


@pytest.mark.parametrize('name', sorted(REFERENCES))
def test_sharded_equals_single_device(mesh8, name):
  fn = REFERENCES[name][0]
  arrays = _arrays(2, 16, 5)
  single = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
  sharded = jax.shard_map(functools.partial(fn, axis_name='data'),
                          mesh=mesh8, in_specs=P('data'), out_specs=P())
  loss, grads = single(*arrays)
  loss8, grads8 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(*arrays)
  assert_close(loss8, loss)
  for g8, g in zip(grads8, grads):
    assert_close(g8, g)


@pytest.mark.parametrize('name', sorted(REFERENCES))
def test_zero_vectors_and_bfloat16_are_finite(name):
  fn = REFERENCES[name][0]
  arrays = _arrays(3, 4, 8)
  arrays[0][1] = 0.0
  arrays[3][2] = 0.0
  bf = [jnp.asarray(x, jnp.bfloat16) for x in arrays]
  loss, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(*bf)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
