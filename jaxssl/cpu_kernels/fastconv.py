"""2-D convolution whose CPU gradients are matrix products (im2col + VJP).

On CPU, XLA (jax 0.10) runs a convolution and its input gradient through
YNNPACK, near matmul speed once channels are wide, but it computes the
kernel gradient as a convolution over the batch that first transposes both
operands; for many images of few pixels (28 px at batch 512) that product
alone is 2-5x slower than the forward. Thin convolutions (1x1, strided,
or few input channels as in the stem) are slow in all three products.
This module writes the products as `dot_general`s over im2col patches:

  forward   y  = patches(x) @ W            [M, kh*kw*Cin] @ [kh*kw*Cin, Cout]
  kernel    dW = patches(x)^T @ dy         [kh*kw*Cin, M] @ [M, Cout]
  input     dx = col2im(dy @ W^T)          [M, Cout] @ [Cout, kh*kw*Cin]

with M = batch * out_height * out_width. `patches` is kh*kw strided slices
of the padded input concatenated on the channel axis; `col2im`, its exact
transpose, pads (with interior padding for strides) and sums kh*kw slices.

Implementations (`impl`):
  'im2col': all three products as above.
  'xla': `lax.conv_general_dilated` and its XLA gradients.
  'auto': thin convolutions (1x1, strided, or kh*kw*Cin <= Cout) as
    'im2col'; wide float32 3x3 stride-1 convolutions (the bulk of a
    ResNet) by Winograd's F(2x2, 3x3) in all three products
    (`jaxssl/cpu_kernels/winograd.py`, 2.25x fewer multiplies); other wide
    ones with XLA's forward and input gradient and the kernel gradient as a
    matmul: the fastest combination measured on CPU (docs/benchmarks.md).
    Nothing here looks at the backend: `jaxssl.cpu_kernels.select_factories`
    decides, once per run, whether encoders use this module at all.

Memory: the patches are kh*kw times the input activation (9x for 3x3), and
`dy @ W^T` is as large. Neither is kept between forward and backward (the
backward rebuilds the patches from `x`). Where the patches are larger than
the output (kh*kw*Cin > Cout), the batch is processed in chunks of about
`chunk_bytes` of patches by a `lax.scan`, which keeps them in cache and
bounds the extra memory to a few MB per conv. Unchunked convs have patches
no larger than their output, so they at most double its transient memory.
"""

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxssl.cpu_kernels import batch_chunks, winograd

IMPLS = ('auto', 'im2col', 'xla')
# Patches per loop step: small enough to stay in the L2/L3 caches, large
# enough for thousand-row matmuls. Measured on a 2-core AVX-512 CPU.
DEFAULT_CHUNK_BYTES = 2**20
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')

Padding = str | Sequence[tuple[int, int]]
Pads = tuple[tuple[int, int], tuple[int, int]]


class _Plan(NamedTuple):
  """Static choices of one im2col convolution (hashable: a nondiff arg)."""
  strides: tuple[int, int]
  pads: Pads
  matmul_data: bool  # Forward and input gradient as matmuls (else XLA).
  chunk: int  # Images per loop step; >= batch means no loop.


def _strides_pair(strides: int | Sequence[int]) -> tuple[int, int]:
  pair = (strides, strides) if isinstance(strides, int) else tuple(strides)
  if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
    raise ValueError(
        f'strides={strides!r} must be a positive int or a pair of them')
  return pair


def _explicit_pads(padding: Padding, in_hw: tuple[int, int],
                   kernel_hw: tuple[int, int],
                   strides: tuple[int, int]) -> Pads:
  """Resolves 'SAME' / 'VALID' / explicit pairs into ((pt, pb), (pl, pr))."""
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise ValueError(
          f"padding={padding!r} must be 'SAME', 'VALID' or "
          '((top, bottom), (left, right))')
    pairs = lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in pairs)
  try:
    pads = tuple(tuple(p) for p in padding)
  except TypeError:
    pads = ()
  if (len(pads) != 2 or any(len(p) != 2 for p in pads) or
      not all(isinstance(v, int) and v >= 0 for p in pads for v in p)):
    raise ValueError(
        f'padding={padding!r} must be two (before, after) pairs of '
        "non-negative ints, 'SAME' or 'VALID'")
  return pads


def _out_size(size: int, kernel: int, stride: int,
              pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - kernel) // stride + 1


def _patches(x: jax.Array, kernel_hw: tuple[int, int],
             strides: tuple[int, int], pads: Pads) -> jax.Array:
  """Returns `[B, Ho, Wo, kh*kw*C]`, channel blocks ordered (i, j, c)."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  batch, height, width, channels = x.shape
  out_h = _out_size(height, kh, sh, pads[0])
  out_w = _out_size(width, kw, sw, pads[1])
  if any(pads[0] + pads[1]):
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  blocks = [
      lax.slice(x, (0, i, j, 0),
                (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1,
                 channels), (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)]
  return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=-1)


def _col2im(dpatches: jax.Array, in_shape: tuple[int, ...],
            kernel_hw: tuple[int, int], strides: tuple[int, int],
            pads: Pads) -> jax.Array:
  """Transpose of `_patches`: adds each channel block back onto `x`."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  _, height, width, channels = in_shape
  _, out_h, out_w, _ = dpatches.shape
  zero = jnp.zeros((), dpatches.dtype)
  total = None
  for index in range(kh * kw):
    i, j = divmod(index, kw)
    block = dpatches[..., index * channels:(index + 1) * channels]
    # Offsets in unpadded coordinates: a negative low edge crops the
    # padding, interior padding spreads a strided block back out.
    low_h, low_w = i - pads[0][0], j - pads[1][0]
    high_h = height - low_h - ((out_h - 1) * sh + 1)
    high_w = width - low_w - ((out_w - 1) * sw + 1)
    placed = lax.pad(block, zero, ((0, 0, 0), (low_h, high_h, sh - 1),
                                   (low_w, high_w, sw - 1), (0, 0, 0)))
    total = placed if total is None else total + placed
  return total


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int],
            out_dtype) -> jax.Array:
  # Accumulate in float32 (bfloat16 inputs), then round once, as lax.conv.
  out = lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                        preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _xla_conv(x: jax.Array, kernel: jax.Array, plan: _Plan) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, plan.strides, plan.pads,
                                  dimension_numbers=_DIMENSIONS)


def _forward_rows(x, kernel, plan):
  kh, kw, cin, cout = kernel.shape
  patches = _patches(x, (kh, kw), plan.strides, plan.pads)
  rows = patches.reshape(-1, kh * kw * cin)
  y = _matmul(rows, kernel.reshape(kh * kw * cin, cout), (1, 0), x.dtype)
  return y.reshape(patches.shape[:3] + (cout,))


def _backward_rows(x, kernel, dy, plan):
  """Returns `(dx or None, dkernel)`, dkernel float32 `[kh*kw*Cin, Cout]`."""
  kh, kw, cin, cout = kernel.shape
  dy_rows = dy.reshape(-1, cout)
  patches = _patches(x, (kh, kw), plan.strides, plan.pads)
  dkernel = _matmul(patches.reshape(-1, kh * kw * cin), dy_rows, (0, 0),
                    jnp.float32)
  if not plan.matmul_data:
    return None, dkernel
  drows = _matmul(dy_rows, kernel.reshape(kh * kw * cin, cout), (1, 1),
                  x.dtype)
  dx = _col2im(drows.reshape(patches.shape), x.shape, (kh, kw),
               plan.strides, plan.pads)
  return dx, dkernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, kernel: jax.Array, plan: _Plan) -> jax.Array:
  if not plan.matmul_data:
    return _xla_conv(x, kernel, plan)
  return batch_chunks.map_chunks(
      lambda xc: _forward_rows(xc, kernel, plan), x, plan.chunk)


def _conv_fwd(x, kernel, plan):
  # Keep x, not the patches: kh*kw times smaller between forward and
  # backward, and rebuilding the patches is cheap data movement.
  return _conv(x, kernel, plan), (x, kernel)


def _conv_bwd(plan, residuals, dy):
  x, kernel = residuals
  if plan.chunk >= x.shape[0]:
    dx, dkernel = _backward_rows(x, kernel, dy, plan)
  else:
    def body(dkernel_sum, xs):
      dx, dkernel = _backward_rows(xs[0], kernel, xs[1], plan)
      return dkernel_sum + dkernel, dx
    dkernel, dxs = lax.scan(
        body, jnp.zeros((kernel.size // kernel.shape[-1], kernel.shape[-1]),
                        jnp.float32),
        (batch_chunks.split(x, plan.chunk),
         batch_chunks.split(dy, plan.chunk)))
    dx = None if dxs is None else batch_chunks.merge(dxs, x.shape[0])
  if dx is None:
    dx = jax.vjp(lambda a: _xla_conv(a, kernel, plan), x)[1](dy)[0]
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _chunk_size(batch: int, kernel_shape: tuple[int, ...],
                out_hw: tuple[int, int], itemsize: int, matmul_data: bool,
                chunk_bytes: int) -> int:
  """Images per loop step (`batch`: no loop).

  A forward-and-input-gradient loop pays only where the patches outgrow the
  output (kh*kw*Cin > Cout); a kernel-gradient-only loop always does. Each
  step adds its float32 kernel gradient to the running sum, so a chunk's
  patches are kept at least 4x the kernel. A divisor of the batch avoids
  padding it.
  """
  kh, kw, cin, cout = kernel_shape
  if matmul_data and kh * kw * cin <= cout:
    return batch
  per_image = out_hw[0] * out_hw[1] * kh * kw * cin * itemsize
  target = max(chunk_bytes, 4 * 4 * kh * kw * cin * cout)
  most = max(2, target // per_image)
  return batch_chunks.images_per_step(batch, most)


def conv2d(x: jax.Array, kernel: jax.Array, *,
           strides: int | Sequence[int] = 1, padding: Padding = 'SAME',
           impl: str = 'auto',
           chunk_bytes: int | None = None) -> jax.Array:
  """2-D convolution (cross-correlation, as `lax.conv_general_dilated`).

  Same values and gradients as `lax.conv_general_dilated(x, kernel, strides,
  padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))` up to float
  rounding; see the module docstring for what each `impl` computes. Matmuls
  take bfloat16 inputs with float32 accumulation and round the result to
  the input dtype; the kernel gradient is summed in float32.

  Args:
    x: `[batch, height, width, in_channels]` (NHWC), global or per-shard.
    kernel: `[kh, kw, in_channels, out_channels]` (HWIO, Flax's layout), same
      dtype as `x`.
    strides: stride along height and width, an int or a pair.
    padding: 'SAME', 'VALID' or explicit `((top, bottom), (left, right))`.
    impl: 'auto' (im2col matmuls or Winograd by shape, see the module
      docstring), 'im2col' (every product a matmul) or 'xla'.
    chunk_bytes: patches per loop step of the im2col paths, input bytes
      per loop step of the Winograd path; None: each path's measured
      default (`DEFAULT_CHUNK_BYTES`, `winograd.DEFAULT_CHUNK_BYTES`).

  Returns:
    `[batch, out_height, out_width, out_channels]` in the dtype of `x`.

  References:
    Chellapilla et al., 2006, "High performance convolutional neural
    networks for document processing" (unrolling convolutions to matmuls).
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; known: {', '.join(IMPLS)}")
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(
        f'conv2d got x{tuple(x.shape)} and kernel{tuple(kernel.shape)}; '
        'expected [B, H, W, C] and [kh, kw, C, out]')
  if x.dtype != kernel.dtype:
    raise ValueError(
        f'conv2d got x of dtype {x.dtype} and kernel of dtype '
        f'{kernel.dtype}; cast both to the compute dtype')
  if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or
                                  chunk_bytes <= 0):
    raise ValueError(
        f'chunk_bytes={chunk_bytes!r} must be a positive int or None')
  strides = _strides_pair(strides)
  kh, kw, cin, cout = kernel.shape
  pads = _explicit_pads(padding, tuple(x.shape[1:3]), (kh, kw), strides)
  out_hw = tuple(_out_size(n, k, s, p) for n, k, s, p in
                 zip(x.shape[1:3], (kh, kw), strides, pads))
  if min(out_hw) <= 0:
    raise ValueError(
        f'conv2d output would be empty: input {tuple(x.shape[1:3])}, kernel '
        f'{(kh, kw)}, padding {pads}; pad more or use a smaller kernel')
  if impl == 'xla':
    return lax.conv_general_dilated(x, kernel, strides, pads,
                                    dimension_numbers=_DIMENSIONS)
  matmul_data = (impl == 'im2col' or kh * kw == 1 or strides != (1, 1) or
                 kh * kw * cin <= cout)
  if (impl == 'auto' and not matmul_data and
      winograd.supports(kernel.shape, strides, pads, x.dtype)):
    return winograd.conv3x3(x, kernel, pads,
                            chunk_bytes or winograd.DEFAULT_CHUNK_BYTES)
  chunk = _chunk_size(x.shape[0], kernel.shape, out_hw, x.dtype.itemsize,
                      matmul_data, chunk_bytes or DEFAULT_CHUNK_BYTES)
  return _conv(x, kernel, _Plan(strides, pads, matmul_data, chunk))
