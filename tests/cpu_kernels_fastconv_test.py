"""Tests for jaxssl.cpu_kernels.fastconv: values and gradients equal lax.conv's."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl.cpu_kernels import fastconv

# (batch, height, width, in_ch, out_ch, kernel, strides, padding)
CASES = [
    (2, 8, 8, 3, 5, 1, 1, 'SAME'),             # 1x1: a plain matmul
    (3, 9, 7, 4, 6, 1, 2, 'VALID'),            # strided 1x1 shortcut
    (2, 9, 8, 1, 4, 3, 1, 'SAME'),             # Cin = 1, odd x even
    (2, 8, 8, 3, 4, 3, 1, 'VALID'),
    (3, 9, 9, 2, 5, 3, 2, 'SAME'),             # odd size, strided SAME
    (2, 8, 10, 3, 4, 3, 2, 'VALID'),
    (2, 9, 8, 3, 4, 3, 2, ((1, 1), (1, 1))),   # the ResNet's fixed padding
    (2, 8, 8, 3, 6, 3, 1, ((0, 2), (2, 1))),   # asymmetric explicit
    (2, 11, 10, 3, 8, 7, 2, ((3, 3), (3, 3))),  # ImageNet stem
    (2, 7, 6, 8, 4, 3, 1, 'SAME'),             # wide: kh*kw*Cin > Cout
    (3, 6, 6, 8, 3, 3, 1, ((1, 1), (1, 1))),
]
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(case, seed=0, dtype=jnp.float32):
  batch, height, width, cin, cout, k, _, _ = case
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (batch, height, width, cin))
  kernel = rng.uniform(-1, 1, (k, k, cin, cout)) / np.sqrt(k * k * cin)
  return jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)


def _lax_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x, kernel, (strides, strides), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _numpy_conv(x, kernel, strides, padding):
  """float64 direct cross-correlation, from the definition."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  if padding == 'VALID':
    padding = ((0, 0), (0, 0))
  elif padding == 'SAME':
    padding = []
    for size, k in zip(x.shape[1:3], (kh, kw)):
      total = max((-(-size // strides) - 1) * strides + k - size, 0)
      padding.append((total // 2, total - total // 2))
  xp = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h = (xp.shape[1] - kh) // strides + 1
  out_w = (xp.shape[2] - kw) // strides + 1
  y = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
  for i, j in itertools.product(range(out_h), range(out_w)):
    window = xp[:, i * strides:i * strides + kh, j * strides:j * strides + kw]
    y[:, i, j] = np.einsum('bhwc,hwco->bo', window, kernel)
  return y


@pytest.mark.parametrize('case', CASES)
def test_lax_conv_matches_numpy_definition(case):
  # Anchors the reference itself: lax.conv is the definition in float64.
  x, kernel = _inputs(case)
  strides, padding = case[6], case[7]
  np.testing.assert_allclose(
      _lax_conv(x, kernel, strides, padding),
      _numpy_conv(x, kernel, strides, padding), **TOL)


@pytest.mark.parametrize('chunk_bytes', [fastconv.DEFAULT_CHUNK_BYTES, 1])
@pytest.mark.parametrize('impl', ['im2col', 'auto'])
@pytest.mark.parametrize('case', CASES)
def test_values_and_gradients_match_lax_conv(case, impl, chunk_bytes):
  x, kernel = _inputs(case)
  strides, padding = case[6], case[7]
  cotangent = jnp.asarray(np.random.default_rng(1).uniform(
      -1, 1, _lax_conv(x, kernel, strides, padding).shape), jnp.float32)

  def ours(x, kernel):
    return fastconv.conv2d(x, kernel, strides=strides, padding=padding,
                           impl=impl, chunk_bytes=chunk_bytes)

  def reference(x, kernel):
    return _lax_conv(x, kernel, strides, padding)

  def functional(conv):
    return jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) * cotangent),
                            argnums=(0, 1)))

  np.testing.assert_allclose(jax.jit(ours)(x, kernel),
                             reference(x, kernel), **TOL)
  grads, expected = functional(ours)(x, kernel), functional(reference)(
      x, kernel)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize('batch', [4, 5])
def test_tiny_chunks_loop_over_the_batch(batch):
  # chunk_bytes=1 must take the scan path (the loop is what is tested);
  # an odd batch also pads the last chunk.
  case = (batch, 8, 8, 4, 3, 3, 1, 'SAME')
  x, kernel = _inputs(case)

  def loss(x, kernel):
    y = fastconv.conv2d(x, kernel, padding='SAME', impl='im2col',
                        chunk_bytes=1)
    return jnp.sum(jnp.sin(y))

  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel))
  assert 'scan' in jaxpr

  def reference(x, kernel):
    return jnp.sum(jnp.sin(_lax_conv(x, kernel, 1, 'SAME')))

  for got, want in zip(jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel),
                       jax.grad(reference, argnums=(0, 1))(x, kernel)):
    np.testing.assert_allclose(got, want, **TOL)


def _primitives(fn, *args):
  # The printed jaxpr spells out every nested jaxpr (scan, custom_vjp, pjit).
  text = str(jax.make_jaxpr(fn)(*args))
  return {name for name in ('conv_general_dilated', 'dot_general', 'scan')
          if f' {name}[' in text or f' {name} ' in text}


def _grad_fn(impl, strides=1):
  def loss(x, kernel):
    y = fastconv.conv2d(x, kernel, strides=strides, padding='SAME',
                        impl=impl)
    return jnp.sum(y * y)
  return jax.grad(loss, argnums=(0, 1))


@pytest.mark.parametrize('cin,cout,kernel_size,strides', [
    (3, 8, 3, 1), (8, 4, 3, 1), (8, 4, 1, 1), (8, 4, 3, 2)])
def test_im2col_is_conv_free(cin, cout, kernel_size, strides):
  x, kernel = _inputs((2, 8, 8, cin, cout, kernel_size, strides, 'SAME'))
  names = _primitives(_grad_fn('im2col', strides), x, kernel)
  assert 'conv_general_dilated' not in names
  assert 'dot_general' in names


@pytest.mark.parametrize('cin,cout,kernel_size,strides,conv_free', [
    (1, 16, 3, 1, True),   # stem: kh*kw*Cin <= Cout
    (8, 4, 1, 1, True),    # 1x1
    (8, 4, 3, 2, True),    # strided
    (8, 4, 3, 1, True),    # wide 3x3: Winograd (cpu_kernels_winograd_test)
    (8, 4, 5, 1, False),   # wide 5x5: XLA forward and input gradient
])
def test_auto(cin, cout, kernel_size, strides, conv_free):
  x, kernel = _inputs((2, 8, 8, cin, cout, kernel_size, strides, 'SAME'))
  names = _primitives(_grad_fn('auto', strides), x, kernel)
  assert ('conv_general_dilated' not in names) == conv_free
  # The kernel gradient is always a matmul.
  assert 'dot_general' in names


@pytest.mark.parametrize('impl', ['im2col', 'auto'])
@pytest.mark.parametrize('kernel_size,cout', [(3, 4), (3, 40)])
def test_bfloat16_rounds_a_float32_accumulation(impl, kernel_size, cout):
  case = (2, 8, 8, 4, cout, kernel_size, 1, 'SAME')
  x, kernel = _inputs(case, dtype=jnp.bfloat16)
  y = jax.jit(lambda a, b: fastconv.conv2d(a, b, impl=impl))(x, kernel)
  assert y.dtype == jnp.bfloat16
  # float32 result from the same bfloat16 inputs; one bfloat16 rounding.
  want = _lax_conv(x.astype(jnp.float32), kernel.astype(jnp.float32), 1,
                   'SAME')
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2**-8,
                             atol=1e-6)
  grads = jax.grad(lambda a, b: jnp.sum(
      fastconv.conv2d(a, b, impl=impl).astype(jnp.float32)),
                   argnums=(0, 1))(x, kernel)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_sharded_batch_matches_one_device(mesh8):
  case = (16, 8, 8, 4, 3, 3, 1, 'SAME')
  x, kernel = _inputs(case)

  def loss(x, kernel):
    y = fastconv.conv2d(x, kernel, padding='SAME', chunk_bytes=1024)
    return jnp.sum(jnp.cos(y))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  sharded = jax.device_put(x, NamedSharding(mesh8, P('data')))
  got = step(sharded, kernel)
  want = step(x, kernel)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize('kwargs,message', [
    (dict(impl='cudnn'), "unknown conv impl 'cudnn'; known: auto, im2col, xla"),
    (dict(padding='FULL'), "padding='FULL' must be"),
    (dict(padding=((1, 1),)), 'must be two (before, after) pairs'),
    (dict(padding=((-1, 1), (1, 1))), 'non-negative'),
    (dict(strides=0), 'strides=0 must be a positive int'),
    (dict(strides=(1, 2, 1)), 'strides=(1, 2, 1)'),
    (dict(chunk_bytes=0), 'chunk_bytes=0 must be a positive int'),
])
def test_bad_arguments_raise_one_line(kwargs, message):
  x, kernel = _inputs((1, 5, 5, 2, 3, 3, 1, 'SAME'))
  with pytest.raises(ValueError) as error:
    fastconv.conv2d(x, kernel, **kwargs)
  assert message in str(error.value)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('x_shape,kernel_shape,dtype,message', [
    ((1, 5, 5, 2), (3, 3, 4, 3), jnp.float32, 'expected [B, H, W, C]'),
    ((5, 5, 2), (3, 3, 2, 3), jnp.float32, 'expected [B, H, W, C]'),
    ((1, 5, 5, 2), (3, 3, 2, 3), jnp.bfloat16, 'cast both'),
    ((1, 2, 2, 2), (3, 3, 2, 3), jnp.float32, 'output would be empty'),
])
def test_bad_shapes_and_dtypes_raise(x_shape, kernel_shape, dtype, message):
  x = jnp.zeros(x_shape, dtype)
  kernel = jnp.zeros(kernel_shape, jnp.float32)
  with pytest.raises(ValueError) as error:
    fastconv.conv2d(x, kernel, padding='VALID')
  assert message in str(error.value)
