"""3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3).

The CPU path of `fastconv.conv2d(impl='auto')` for wide float32 3x3
convolutions with stride 1 (every 3x3 conv of a ResNet body but the first
of a strided stage). Each 2x2 output tile is computed from a 4x4 input
tile `d` and the 3x3 kernel `g` as (Lavin & Gray, 2016, eq. 8)

  Y = A^T [ (G g G^T) * (B^T d B) ] A

so the 36 multiplies per tile and channel pair of the direct convolution
become 16: the convolution turns into 16 independent matmuls
`[tiles, Cin] @ [Cin, Cout]`, 2.25x fewer FLOPs. B^T and A^T hold only 0
and +-1, so the input and output transforms (and the kernel gradient's
A dY A^T) are adds of strided slices (`_combine`); only the kernel's
G g G^T, and its transpose in the kernel gradient, is a small matmul. The
two gradients are exact algebra of the same form:

  input   dx = the same transform of dy with the kernel flipped and its
               channels swapped (padding 2 - p on each side);
  kernel  dg = G^T [ sum over tiles of (B^T d B)^T (A dY A^T) ] G.

Numerics: F(2x2, 3x3) uses the points 0, 1, -1 only; its float32 error is
a few times that of the direct sum, within 1e-5 of `lax.conv` at unit
scale (tests/winograd_test.py). Only float32 takes this path; bfloat16
convolutions keep `fastconv`'s other products.

Memory: the input tiles are 4x the input activation and the tile products
4x the output. The batch is processed in chunks whose input is about
`chunk_bytes` (`DEFAULT_CHUNK_BYTES`), so the temporaries stay in the
L2/L3 caches; only `x` and the kernel are kept for the backward pass.

References:
  Winograd, 1980, "Arithmetic complexity of computations".
  Lavin & Gray, 2016, "Fast Algorithms for Convolutional Neural Networks",
  arXiv:1509.09308.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxssl.cpu_kernels import batch_chunks

# F(2, 3) transforms (Lavin & Gray, 2016, section 4.1).
_B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
                np.float32)
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
              np.float32)
_A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
# The kernel's 2-D transform over row-major flattened tiles: [16, 9].
_KERNEL_2D = np.kron(_G, _G)
# G applied to a reversed 3-vector is G with rows 0 and 3 swapped, so the
# transform of the spatially flipped kernel is a permutation of the 16.
_FLIPPED = np.array([4 * a + b for a in (3, 1, 2, 0) for b in (3, 1, 2, 0)])
# Input bytes per loop step over the batch. On a 2-core AVX-512 CPU (1 MiB
# L2 per core, 32 MiB L3), 2 MiB ran the ResNet-18 CIFAR step at batch 64
# 4% faster than 1 MiB and 1% faster than 4 MiB.
DEFAULT_CHUNK_BYTES = 2**21

Pads = tuple[tuple[int, int], tuple[int, int]]


class _Plan(NamedTuple):
  """Static choices of one convolution (hashable: a nondiff argument)."""
  pads: Pads
  chunk: int  # Images per loop step; >= batch means no loop.


def supports(kernel_shape: tuple[int, ...], strides: tuple[int, int],
             pads: Pads, dtype) -> bool:
  """Whether `conv3x3` computes this convolution.

  Args:
    kernel_shape: `[kh, kw, Cin, Cout]`.
    strides: `(sh, sw)`.
    pads: `((top, bottom), (left, right))`, explicit.
    dtype: the compute dtype.

  Returns:
    True for a float32 3x3 kernel, stride 1, each pad in 0..2.
  """
  return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1) and
          all(0 <= p <= 2 for pair in pads for p in pair) and
          jnp.dtype(dtype) == jnp.float32)


def _tiling(in_hw, pads: Pads):
  """Returns output (Ho, Wo) and tile counts (nh, nw) = ceil(out / 2)."""
  out = tuple(size + lo + hi - 2 for size, (lo, hi) in zip(in_hw, pads))
  return out, tuple(-(-size // 2) for size in out)


def _combine(parts: list, matrix: np.ndarray) -> list:
  """`matrix @ parts` for a constant matrix of 0 and +-1 entries, as adds."""
  return [functools.reduce(lambda a, b: a + b,
                           [p if w > 0 else -p
                            for w, p in zip(row, parts) if w != 0])
          for row in matrix]


def _transform_2d(grid: list, matrix: np.ndarray) -> list:
  """`matrix @ grid @ matrix^T` of a 2-D list of arrays, as adds.

  `grid[r][c]` for r, c < matrix.shape[1]; returns `[i][j]` for i, j <
  matrix.shape[0]: rows combined first (per column), then columns.
  """
  by_column = [_combine([row[c] for row in grid], matrix)
               for c in range(len(grid[0]))]  # [c][i]
  return [_combine([column[i] for column in by_column], matrix)
          for i in range(matrix.shape[0])]


def _input_tiles(x: jax.Array, pads: Pads) -> list[jax.Array]:
  """`B^T d B` of every 4x4 input tile: 16 arrays `[B*nh*nw, C]`.

  Position 4 i + j of the list (the order of `kron(B^T, B^T)`) holds entry
  (i, j) of every tile. B^T has entries 0 and +-1 only, so the transform is
  adds of strided slices, rows then columns (at most 4 terms, no less exact
  than the [16, 16] matrix). The 16 stay separate arrays, each its own
  matmul operand: stacking them into one `[16, T, C]` operand was a copy
  that cost XLA:CPU a sixth of the ResNet-18 step.
  """
  batch, height, width, channels = x.shape
  (out_h, out_w), (nh, nw) = _tiling((height, width), pads)
  # Pad past the output's far edge so that every tile is whole.
  x = jnp.pad(x, ((0, 0), (pads[0][0], pads[0][1] + 2 * nh - out_h),
                  (pads[1][0], pads[1][1] + 2 * nw - out_w), (0, 0)))
  rows = [x[:, k:k + 2 * nh - 1:2] for k in range(4)]
  tiles = []
  for transformed in _combine(rows, _B_T):
    tiles += _combine([transformed[:, :, k:k + 2 * nw - 1:2]
                       for k in range(4)], _B_T)
  return [tile.reshape(batch * nh * nw, channels) for tile in tiles]


def _output_from_tiles(products: list[jax.Array], batch: int, in_hw,
                       pads: Pads) -> jax.Array:
  """`A^T m A` of 16 tile products `[B*nh*nw, O]`: `[B, Ho, Wo, O]`.

  A^T has entries 0 and +-1, so the transform is adds, as in `_input_tiles`.
  """
  (out_h, out_w), (nh, nw) = _tiling(in_hw, pads)
  channels = products[0].shape[-1]
  m = [p.reshape(batch, nh, nw, channels) for p in products]
  out = _transform_2d([m[4 * i:4 * i + 4] for i in range(4)], _A_T)
  out = jnp.stack([jnp.stack(row) for row in out])  # [2, 2, B, nh, nw, O]
  out = out.transpose(2, 3, 0, 4, 1, 5)  # [B, nh, 2, nw, 2, O]
  return out.reshape(batch, 2 * nh, 2 * nw, channels)[:, :out_h, :out_w]


def _output_tiles_transposed(dy: jax.Array, in_hw,
                             pads: Pads) -> list[jax.Array]:
  """Transpose of `_output_from_tiles`: `A dY A^T` per tile, 16 x `[T, O]`.

  A has entries 0 and +-1: adds of the 4 strided parts of `dy`.
  """
  (out_h, out_w), (nh, nw) = _tiling(in_hw, pads)
  batch, channels = dy.shape[0], dy.shape[-1]
  dy = jnp.pad(dy, ((0, 0), (0, 2 * nh - out_h), (0, 2 * nw - out_w),
                    (0, 0)))
  dy = dy.reshape(batch, nh, 2, nw, 2, channels)
  tiles = _transform_2d([[dy[:, :, r, :, s] for s in range(2)]
                         for r in range(2)], _A_T.T)
  return [tile.reshape(batch * nh * nw, channels)
          for row in tiles for tile in row]


def _kernel_tiles(kernel: jax.Array) -> jax.Array:
  """`G g G^T` of a `[3, 3, Cin, Cout]` kernel: `[16, Cin, Cout]`."""
  # One [16, 9] @ [9, Cin*Cout] product: no transpose of the kernel.
  flat = jnp.dot(_KERNEL_2D, kernel.reshape(9, -1))
  return flat.reshape((16,) + kernel.shape[2:])


def _tiled_conv(x: jax.Array, kernel_tiles: jax.Array, pads: Pads,
                transposed: bool = False) -> jax.Array:
  """Correlation with the kernel whose tiles are `kernel_tiles`.

  `transposed`: contract the tiles' last axis (`x` has Cout channels and the
  result Cin), as the input gradient does.
  """
  products = [
      lax.dot_general(tile, kernel_tiles[p], (((1,), (1 if transposed else 0,)),
                                              ((), ())))
      for p, tile in enumerate(_input_tiles(x, pads))]
  return _output_from_tiles(products, x.shape[0], x.shape[1:3], pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, kernel: jax.Array, plan: _Plan) -> jax.Array:
  kernel_tiles = _kernel_tiles(kernel)
  return batch_chunks.map_chunks(
      lambda xs: _tiled_conv(xs, kernel_tiles, plan.pads), x, plan.chunk)


def _conv_fwd(x, kernel, plan):
  return _conv(x, kernel, plan), (x, kernel)


def _conv_bwd(plan, residuals, dy):
  x, kernel = residuals
  # Input gradient: the correlation of dy with the flipped, transposed
  # kernel, padded by 2 - p, which gives back the input's size.
  flipped = _kernel_tiles(kernel)[_FLIPPED]
  back_pads = tuple((2 - lo, 2 - hi) for lo, hi in plan.pads)
  dx = batch_chunks.map_chunks(
      lambda dys: _tiled_conv(dys, flipped, back_pads, transposed=True), dy,
      plan.chunk)

  def kernel_tiles_grad(xs, dys):  # [16, Cin, Cout]
    return jnp.stack([
        lax.dot_general(a, b, (((0,), (0,)), ((), ()))) for a, b in zip(
            _input_tiles(xs, plan.pads),
            _output_tiles_transposed(dys, xs.shape[1:3], plan.pads))])

  if plan.chunk >= x.shape[0]:
    dtiles = kernel_tiles_grad(x, dy)
  else:
    dtiles, _ = lax.scan(
        lambda total, xs: (total + kernel_tiles_grad(*xs), None),
        jnp.zeros((16,) + kernel.shape[2:], jnp.float32),
        (batch_chunks.split(x, plan.chunk), batch_chunks.split(dy, plan.chunk)))
  dkernel = jnp.dot(_KERNEL_2D.T, dtiles.reshape(16, -1))
  return dx, dkernel.reshape(kernel.shape)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array, pads: Pads,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> jax.Array:
  """Cross-correlation of `x` with a 3x3 kernel, stride 1, by F(2x2, 3x3).

  Same values and gradients as `lax.conv_general_dilated(x, kernel, (1, 1),
  pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))` up to float32
  rounding. Callers check `supports(...)` first (`fastconv.conv2d` does).

  Args:
    x: `[batch, height, width, Cin]` float32, global or per-shard.
    kernel: `[3, 3, Cin, Cout]` float32 (HWIO).
    pads: explicit `((top, bottom), (left, right))`, each in 0..2.
    chunk_bytes: input bytes per loop step over the batch (> 0).

  Returns:
    `[batch, out_height, out_width, Cout]` float32.
  """
  if not supports(kernel.shape, (1, 1), pads, x.dtype):
    raise ValueError(
        f'winograd.conv3x3 got kernel{tuple(kernel.shape)}, pads {pads}, '
        f'dtype {x.dtype}; it needs a 3x3 float32 kernel and pads in 0..2')
  per_image = x[0].size * x.dtype.itemsize
  chunk = batch_chunks.images_per_step(x.shape[0], chunk_bytes // per_image)
  return _conv(x, kernel, _Plan(tuple(map(tuple, pads)), chunk))
