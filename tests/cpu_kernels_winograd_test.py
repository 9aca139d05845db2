"""Tests for jaxssl.cpu_kernels.winograd: F(2x2, 3x3) equals lax.conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxssl.cpu_kernels import batch_chunks, fastconv, winograd

TOL = dict(rtol=1e-5, atol=1e-5)
# (batch, height, width, in_ch, out_ch, pads)
CASES = [
    (2, 8, 8, 8, 4, ((1, 1), (1, 1))),    # SAME, even size
    (3, 9, 7, 5, 6, ((1, 1), (1, 1))),    # odd sizes: a partial last tile
    (2, 8, 10, 4, 4, ((0, 0), (0, 0))),   # VALID
    (2, 7, 8, 3, 5, ((0, 2), (2, 1))),    # asymmetric explicit pads
    (1, 3, 3, 1, 2, ((0, 0), (0, 0))),    # a single output pixel, Cin = 1
]


def _inputs(batch, height, width, cin, cout, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (batch, height, width, cin))
  kernel = rng.uniform(-1, 1, (3, 3, cin, cout)) / np.sqrt(9 * cin)
  return jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)


def _lax_conv(x, kernel, pads):
  return lax.conv_general_dilated(x, kernel, (1, 1), pads,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _check_values_and_gradients(conv, x, kernel, pads):
  want = _lax_conv(x, kernel, pads)
  cotangent = jnp.asarray(
      np.random.default_rng(1).uniform(-1, 1, want.shape), jnp.float32)

  def grads(fn):
    return jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b) * cotangent),
                            argnums=(0, 1)))(x, kernel)

  np.testing.assert_allclose(jax.jit(conv)(x, kernel), want, **TOL)
  for got, expected in zip(grads(conv),
                           grads(lambda a, b: _lax_conv(a, b, pads))):
    np.testing.assert_allclose(got, expected, **TOL)


@pytest.mark.parametrize('chunk_bytes', [2**20, 1])
@pytest.mark.parametrize('case', CASES)
def test_values_and_gradients_match_lax_conv(case, chunk_bytes):
  *shape, pads = case
  x, kernel = _inputs(*shape)
  _check_values_and_gradients(
      lambda a, b: winograd.conv3x3(a, b, pads, chunk_bytes), x, kernel, pads)


def _float64_same_conv(x, kernel, dy):
  """Output, input and kernel gradients of a SAME 3x3 conv, in float64."""
  x, kernel, dy = (np.asarray(a, np.float64) for a in (x, kernel, dy))
  height, width = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dyp = np.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(xp[:, i:i + height, j:j + width] @ kernel[i, j]
          for i in range(3) for j in range(3))
  dx = sum(dyp[:, 2 - i:2 - i + height, 2 - j:2 - j + width] @ kernel[i, j].T
           for i in range(3) for j in range(3))
  dkernel = np.stack([np.stack([
      np.einsum('bhwc,bhwo->co', xp[:, i:i + height, j:j + width], dy)
      for j in range(3)]) for i in range(3)])
  return y, dx, dkernel


@pytest.mark.parametrize('shape', [(2, 16, 16, 32, 32), (2, 32, 32, 64, 64)])
def test_as_accurate_as_xla_at_resnet_widths(shape):
  # Over hundreds of terms float32 rounding alone exceeds 1e-5 (XLA's own
  # kernel gradient is off by ~1e-5 here), so both are measured against
  # float64: Winograd's error is at most twice XLA's, in all three.
  x, kernel = _inputs(*shape)
  dy = jnp.asarray(np.random.default_rng(1).uniform(
      -1, 1, shape[:3] + (shape[4],)), jnp.float32)
  pads = ((1, 1), (1, 1))
  truth = _float64_same_conv(x, kernel, dy)

  def errors(conv):
    y, vjp = jax.vjp(jax.jit(conv), x, kernel)
    return [np.abs(np.asarray(got, np.float64) - want).max()
            for got, want in zip((y,) + vjp(dy), truth)]

  ours = errors(lambda a, b: winograd.conv3x3(a, b, pads, 2**20))
  xla = errors(lambda a, b: _lax_conv(a, b, pads))
  # The float64 reference is the same convolution (errors are rounding)
  # and the comparison measures real rounding.
  assert max(xla) < 1e-3 and xla[2] > 1e-6, xla
  for got, bound in zip(ours, xla):
    assert got <= 2 * bound, (ours, xla)


def test_uneven_chunks_pad_the_last_one():
  # 5 images in chunks of 2: three loop steps, the last padded with zeros.
  x, kernel = _inputs(5, 6, 6, 4, 3)
  pads = ((1, 1), (1, 1))
  per_image = 6 * 6 * 4 * 4

  def conv(a, b):
    return winograd.conv3x3(a, b, pads, 2 * per_image)

  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda a, b: jnp.sum(conv(a, b)), argnums=(0, 1)))(x, kernel))
  assert ' scan[' in jaxpr or ' scan ' in jaxpr
  _check_values_and_gradients(conv, x, kernel, pads)


def test_flattened_transforms_are_the_papers():
  # Y = A^T [(G g G^T) * (B^T d B)] A on one tile, in float64, is the
  # 2x2 valid correlation of a 4x4 tile with a 3x3 kernel.
  rng = np.random.default_rng(0)
  tile, kernel = rng.normal(size=(4, 4)), rng.normal(size=(3, 3))
  product = (winograd._G @ kernel @ winograd._G.T) * (
      winograd._B_T @ tile @ winograd._B_T.T)
  direct = np.array([[np.sum(tile[i:i + 3, j:j + 3] * kernel)
                      for j in range(2)] for i in range(2)])
  np.testing.assert_allclose(winograd._A_T @ product @ winograd._A_T.T,
                             direct, rtol=1e-6)
  flat = np.kron(winograd._A_T, winograd._A_T) @ (
      (winograd._G @ kernel @ winograd._G.T).reshape(16) *
      (np.kron(winograd._B_T, winograd._B_T) @ tile.reshape(16)))
  np.testing.assert_allclose(flat.reshape(2, 2), direct, rtol=1e-6)


def test_flipped_kernel_tiles_are_a_permutation():
  _, kernel = _inputs(1, 3, 3, 2, 3)
  np.testing.assert_allclose(
      winograd._kernel_tiles(jnp.flip(kernel, (0, 1))),
      winograd._kernel_tiles(kernel)[winograd._FLIPPED], rtol=1e-6,
      atol=1e-8)  # Same terms summed in another order: float32 rounding.


@pytest.mark.parametrize('kernel_shape,strides,pads,dtype,expected', [
    ((3, 3, 8, 4), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),
    ((3, 3, 8, 4), (1, 1), ((0, 2), (2, 0)), jnp.float32, True),
    ((3, 3, 8, 4), (1, 1), ((3, 3), (1, 1)), jnp.float32, False),
    ((3, 3, 8, 4), (2, 2), ((1, 1), (1, 1)), jnp.float32, False),
    ((5, 5, 8, 4), (1, 1), ((2, 2), (2, 2)), jnp.float32, False),
    ((3, 3, 8, 4), (1, 1), ((1, 1), (1, 1)), jnp.bfloat16, False),
])
def test_supports(kernel_shape, strides, pads, dtype, expected):
  assert winograd.supports(kernel_shape, strides, pads, dtype) == expected


@pytest.mark.parametrize('dtype,used', [(jnp.float32, True),
                                        (jnp.bfloat16, False)])
def test_auto_takes_winograd_for_wide_float32_3x3(monkeypatch, dtype, used):
  calls = []
  original = winograd.conv3x3

  def spy(*args):
    calls.append(args[2])
    return original(*args)

  monkeypatch.setattr(winograd, 'conv3x3', spy)
  x, kernel = _inputs(2, 8, 8, 8, 4)
  fastconv.conv2d(x.astype(dtype), kernel.astype(dtype), impl='auto')
  fastconv.conv2d(x, kernel, impl='im2col')  # explicit: never Winograd
  fastconv.conv2d(x, kernel, strides=2, impl='auto')  # strided: im2col
  assert calls == ([((1, 1), (1, 1))] if used else [])


def test_bad_kernel_raises_one_line():
  x, kernel = _inputs(1, 5, 5, 2, 3)
  with pytest.raises(ValueError) as error:
    winograd.conv3x3(x, kernel, ((3, 1), (1, 1)), 2**20)
  message = str(error.value)
  assert 'pads ((3, 1), (1, 1))' in message and 'pads in 0..2' in message
  assert '\n' not in message


@pytest.mark.parametrize('batch,most,expected', [
    (8, 16, 8),   # fits: no loop
    (8, 4, 4),    # a divisor
    (12, 5, 4),   # the largest divisor <= 5
    (13, 4, 4),   # prime: even split, 4 steps of 4, the last padded
    (7, 1, 1),
    (7, 0, 1),    # clipped to one image
])
def test_images_per_step(batch, most, expected):
  assert batch_chunks.images_per_step(batch, most) == expected


def test_split_and_merge_round_trip():
  x = jnp.arange(5 * 3, dtype=jnp.float32).reshape(5, 3)
  parts = batch_chunks.split(x, 2)
  assert parts.shape == (3, 2, 3)
  np.testing.assert_array_equal(parts[-1, 1], np.zeros(3))
  np.testing.assert_array_equal(batch_chunks.merge(parts, 5), x)


def test_map_chunks_drops_the_padding():
  x = jnp.arange(5 * 3, dtype=jnp.float32).reshape(5, 3)
  for chunk in (2, 5, 8):
    np.testing.assert_array_equal(
        batch_chunks.map_chunks(lambda a: 2 * a + 1, x, chunk), 2 * x + 1)
