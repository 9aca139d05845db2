"""Tests for jaxssl.losses.nt_xent and nt_xent_with_metrics.

Expected values come from a float64 NumPy implementation of the SimCLR
paper's eq. 1 (explicit exclusion of k = i, no masking constant) and
gradients from central finite differences of it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxssl import losses


def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def np_nt_xent(z1, z2, tau):
  """Paper eq. 1: mean over 2N anchors of -log softmax over the 2N-1 others."""
  h = _np_normalize(np.concatenate([z1, z2]).astype(np.float64))
  views = h.shape[0]
  num_images = views // 2
  sim = h @ h.T / tau
  total = 0.0
  for i in range(views):
    others = np.delete(sim[i], i)
    peak = others.max()
    lse = peak + np.log(np.sum(np.exp(others - peak)))
    total += lse - sim[i, (i + num_images) % views]
  return total / views


def np_metrics(z1, z2, tau):
  """SimCLR tf2/metrics.py over logits_ab = h1 h2ᵀ / τ."""
  logits = _np_normalize(np.float64(z1)) @ _np_normalize(np.float64(z2)).T / tau
  acc = np.mean(np.argmax(logits, axis=1) == np.arange(len(z1)))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  return acc, -np.mean(np.sum(p * np.log(p + 1e-8), axis=1))


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


def assert_close(actual, expected, rtol=1e-5):
  expected = np.asarray(expected, np.float64)
  atol = rtol * 0.1 * max(np.max(np.abs(expected)), 1e-30)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=rtol, atol=atol)


def _pair(seed, n, d, noise=None):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d)).astype(np.float32)
  if noise is None:
    return z1, rng.normal(size=(n, d)).astype(np.float32)
  return z1, (z1 + noise * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize('n,d,tau', [(4, 3, 0.1), (6, 8, 0.5), (5, 16, 1.0)])
def test_value_and_grad_match_paper_formula(n, d, tau):
  z1, z2 = _pair(n * d, n, d)
  loss, (g1, g2) = jax.jit(jax.value_and_grad(
      functools.partial(losses.nt_xent, temperature=tau), argnums=(0, 1)))(
          z1, z2)
  assert loss.dtype == jnp.float32
  assert_close(loss, np_nt_xent(z1, z2, tau))
  assert_close(g1, numeric_grad(lambda x: np_nt_xent(x, z2, tau), z1))
  assert_close(g2, numeric_grad(lambda x: np_nt_xent(z1, x, tau), z2))


def test_official_add_contrastive_loss_is_twice_l():
  """The TF code's mean(loss_a + loss_b), written from its logits, is 2L."""
  z1, z2 = _pair(3, 5, 4)
  tau = 0.2
  h1, h2 = _np_normalize(np.float64(z1)), _np_normalize(np.float64(z2))
  n = len(h1)
  mask = np.eye(n) * 1e9
  logits_a = np.concatenate([h1 @ h2.T / tau, h1 @ h1.T / tau - mask], 1)
  logits_b = np.concatenate([h2 @ h1.T / tau, h2 @ h2.T / tau - mask], 1)

  def ce(logits):
    peak = logits.max(1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(logits - peak).sum(1))
    return lse - logits[np.arange(n), np.arange(n)]

  official = np.mean(ce(logits_a) + ce(logits_b))
  assert_close(2 * jax.jit(functools.partial(
      losses.nt_xent, temperature=tau))(z1, z2), official)


@pytest.mark.parametrize('noise', [0.3, 3.0])
def test_metrics_match_simclr(noise):
  z1, z2 = _pair(7, 12, 6, noise=noise)
  loss, metrics = jax.jit(functools.partial(
      losses.nt_xent_with_metrics, temperature=0.1))(z1, z2)
  acc, entropy = np_metrics(z1, z2, 0.1)
  assert_close(loss, np_nt_xent(z1, z2, 0.1))
  assert_close(metrics['contrast_acc'], acc)
  assert_close(metrics['contrast_entropy'], entropy)


def _sharded(fn, mesh, **kwargs):
  return jax.shard_map(functools.partial(fn, axis_name='data', **kwargs),
                       mesh=mesh, in_specs=P('data'), out_specs=P())


@pytest.mark.parametrize('per_device,tau', [(1, 0.1), (3, 0.5)])
def test_sharded_equals_single_device(mesh8, per_device, tau):
  z1, z2 = _pair(11, 8 * per_device, 5)
  single = jax.jit(jax.value_and_grad(
      functools.partial(losses.nt_xent, temperature=tau), argnums=(0, 1)))
  sharded = jax.jit(jax.value_and_grad(
      _sharded(losses.nt_xent, mesh8, temperature=tau), argnums=(0, 1)))
  loss, grads = single(z1, z2)
  loss8, grads8 = sharded(z1, z2)
  assert_close(loss8, loss)
  for g8, g in zip(grads8, grads):
    assert_close(g8, g)
  assert_close(loss8, np_nt_xent(z1, z2, tau))


def test_sharded_gradient_flows_through_gather(mesh8):
  """Device 0's rows get gradient from other devices' anchors (TF semantics).

  If the gather were stop-gradient'd, d(loss)/d(z) would lose the terms in
  which a row acts as a negative of another device's anchor.
  """
  z1, z2 = _pair(12, 16, 4)
  sharded = _sharded(losses.nt_xent, mesh8, temperature=0.1)
  g8 = jax.jit(jax.grad(sharded))(z1, z2)
  expected = numeric_grad(lambda x: np_nt_xent(x, z2, 0.1), z1)
  assert_close(g8, expected)


def test_sharded_metrics_equal_single_device(mesh8):
  z1, z2 = _pair(13, 16, 6, noise=1.0)
  fn = jax.shard_map(
      functools.partial(losses.nt_xent_with_metrics, temperature=0.1,
                        axis_name='data'),
      mesh=mesh8, in_specs=P('data'), out_specs=P())
  loss8, metrics8 = jax.jit(fn)(z1, z2)
  loss, metrics = jax.jit(functools.partial(
      losses.nt_xent_with_metrics, temperature=0.1))(z1, z2)
  assert_close(loss8, loss)
  for key in ('contrast_acc', 'contrast_entropy'):
    assert_close(metrics8[key], metrics[key])


def test_zero_vectors_are_finite():
  z1, z2 = _pair(14, 6, 4)
  z1[2] = 0.0
  z2[:] = 0.0
  loss, grads = jax.jit(jax.value_and_grad(
      functools.partial(losses.nt_xent, temperature=0.1), argnums=(0, 1)))(
          z1, z2)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert_close(loss, np_nt_xent(z1, z2, 0.1))


def test_bfloat16_inputs_use_float32_logits():
  z1, z2 = _pair(15, 8, 16)
  b1, b2 = jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)
  loss, metrics = jax.jit(functools.partial(
      losses.nt_xent_with_metrics, temperature=0.1))(b1, b2)
  assert loss.dtype == jnp.float32
  assert metrics['contrast_entropy'].dtype == jnp.float32
  # Float32 logits of the bf16-rounded inputs: a bf16 logit path would be
  # off by ~1e-2 here.
  rounded = np.asarray(b1, np.float32), np.asarray(b2, np.float32)
  assert_close(loss, np_nt_xent(*rounded, 0.1))
  grad = jax.jit(jax.grad(functools.partial(
      losses.nt_xent, temperature=0.1)))(b1, b2)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(
      np.asarray(grad, np.float32)))
