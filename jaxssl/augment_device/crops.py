"""Crop boxes and the crop + bicubic resize as banded matrix products.

The box has the law of `tf.image.sample_distorted_bounding_box` as SimCLR
calls it (100 vectorised attempts, first valid one, else the whole image);
crop and resize are one product `Ry @ image @ Rxᵀ` with per-example [out, H]
and [out, W] bicubic matrices (bicubic, as the host and the official code;
in matrix form it costs what bilinear costs), so there is no gather and no
dynamic shape. Products run at HIGHEST precision so that TPUs and GPUs do
not round pixels to bfloat16 or TF32.

References:
  TensorFlow `sample_distorted_bounding_box_op.cc`, `resize_bicubic_op.cc`;
  google-research/simclr `data_util.distorted_bounding_box_crop`.
"""

import jax
import jax.numpy as jnp
import numpy as np

MAX_CROP_ATTEMPTS = 100  # SimCLR's max_attempts
MIN_OBJECT_COVERED = 0.1  # SimCLR's min_object_covered (whole-image box)
KEYS_CUBIC_A = -0.5  # tf.image.resize BICUBIC with half-pixel centres
CUBIC_TABLE_SIZE = 1024  # TF looks the cubic weights up in this table
HIGHEST = jax.lax.Precision.HIGHEST
BLOCK = 32  # output rows per block of the banded products

def _rint(x: jax.Array) -> jax.Array:
  """C's lrintf: round half to even, as an int32."""
  return jnp.round(x).astype(jnp.int32)


def sample_crop_box(key: jax.Array, *, height: int, width: int,
                    area_range=(0.08, 1.0),
                    aspect_range=(3 / 4, 4 / 3)) -> jax.Array:
  """Samples a crop box with the law of TF's `sample_distorted_bounding_box`.

  Per attempt: aspect `a ~ U[aspect_range]` (width / height); the height is
  an integer uniform between `rint(sqrt(min_area / a))` and the largest
  height that fits; width `rint(h a)`, nudged by one row if rounding left
  the area range; the offsets are uniform in `[0, H - h)` and `[0, W - w)`
  (TF never touches the far edge with a partial crop). An attempt is valid
  if its area is in range and covers at least `MIN_OBJECT_COVERED` of the
  image. The first valid one of `MAX_CROP_ATTEMPTS` is kept, else the whole
  image.

  Args:
    key: PRNG key of one view.
    height: H of the source image (static).
    width: W of the source image (static).
    area_range: bounds of the crop area as a fraction of H * W.
    aspect_range: bounds of width / height.

  Returns:
    int32 [4]: `(y, x, h, w)`, the crop's top-left corner and size.

  References:
    TensorFlow `sample_distorted_bounding_box_op.cc` (`GenerateRandomCrop`);
    google-research/simclr `data_util.distorted_bounding_box_crop`.
  """
  k_aspect, k_h, k_y, k_x = jax.random.split(key, 4)
  n = MAX_CROP_ATTEMPTS
  # TF computes the area bounds in float32 from the relative ones.
  min_area = np.float32(area_range[0]) * np.float32(width) * np.float32(height)
  max_area = np.float32(area_range[1]) * np.float32(width) * np.float32(height)
  lo, hi = np.float32(aspect_range[0]), np.float32(aspect_range[1])
  aspect = jax.random.uniform(k_aspect, (n,)) * (hi - lo) + lo
  h = _rint(jnp.sqrt(min_area / aspect))
  max_h = _rint(jnp.sqrt(max_area / aspect))
  # The largest height whose rounded width still fits.
  fit_h = jnp.floor((width + 0.5) / aspect).astype(jnp.int32)
  fit_h = jnp.where(_rint(fit_h * aspect) > width, fit_h - 1, fit_h)
  max_h = jnp.where(_rint(max_h * aspect) > width, fit_h, max_h)
  max_h = jnp.minimum(max_h, height)
  h = jnp.minimum(h, max_h)
  h = h + jax.random.randint(k_h, (n,), 0, jnp.maximum(max_h - h + 1, 1))
  w = _rint(h * aspect)
  # TF's one-row corrections of rounding errors, larger first.
  h = jnp.where((w * h).astype(jnp.float32) < min_area, h + 1, h)
  w = _rint(h * aspect)
  h = jnp.where((w * h).astype(jnp.float32) > max_area, h - 1, h)
  w = _rint(h * aspect)
  area = (w * h).astype(jnp.float32)
  covered = area / np.float32(width * height)
  valid = ((area >= min_area) & (area <= max_area) & (w <= width)
           & (h <= height) & (w > 0) & (h > 0)
           & (covered >= np.float32(MIN_OBJECT_COVERED)))
  y = jax.random.randint(k_y, (n,), 0, jnp.maximum(height - h, 1))
  x = jax.random.randint(k_x, (n,), 0, jnp.maximum(width - w, 1))
  first = jnp.argmax(valid)
  box = jnp.stack([y[first], x[first], h[first], w[first]])
  whole = jnp.array([0, 0, height, width], jnp.int32)
  return jnp.where(valid.any(), box, whole)


def _keys_cubic(x: jax.Array) -> jax.Array:
  """Keys' cubic convolution kernel (a = -0.5) at distances x >= 0."""
  a = KEYS_CUBIC_A
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return jnp.where(x <= 1, near, jnp.where(x < 2, far, 0.0))


def _resize_centres(length: jax.Array, rows: jax.Array, out_size: int):
  """Source coordinate of output rows, split as TF does: (floor, frac)."""
  scale = length.astype(jnp.float32) / np.float32(out_size)
  centre = (rows.astype(jnp.float32) + 0.5) * scale - 0.5
  base = jnp.floor(centre)
  frac = jnp.round((centre - base) * CUBIC_TABLE_SIZE) / CUBIC_TABLE_SIZE
  return base, frac


def _resize_weights(start, length, rows, pos, *, out_size):
  """Bicubic weights of output `rows` [T] on source positions `pos` [L]."""
  base, frac = _resize_centres(length, rows, out_size)
  offset = (pos - start).astype(jnp.float32)
  weights = _keys_cubic(jnp.abs(offset[None, :] - base[:, None]
                                - frac[:, None]))
  inside = (offset >= 0) & (offset < length.astype(jnp.float32))
  weights = jnp.where(inside[None, :], weights, 0.0)
  total = jnp.sum(weights, axis=1, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)


def resize_matrix(start: jax.Array, length: jax.Array, *, in_size: int,
                  out_size: int) -> jax.Array:
  """Bicubic resize of the span [start, start + length) as a dense matrix.

  Row i holds the weights of `tf.image.resize(..., BICUBIC)` (half-pixel
  centres, Keys a = -0.5, no antialiasing) for output pixel i of the
  cropped span: taps outside the span get weight 0 and the row is
  renormalised, as TF does at borders. The fractional offset is rounded to
  TF's 1/1024 table. Same-size, whole-span resizes give the identity.

  Args:
    start: int32 scalar, first source pixel of the span.
    length: int32 scalar, its length (>= 1).
    in_size: source length (static).
    out_size: output length (static).

  Returns:
    float32 [out_size, in_size].

  References:
    TensorFlow `resize_bicubic_op.cc` (`GetWeightsAndIndices`).
  """
  return _resize_weights(start, length, jnp.arange(out_size),
                         jnp.arange(in_size), out_size=out_size)

def banded_apply(image: jax.Array, weights_fn, first_tap_fn, *, out_size: int,
                 window: int) -> jax.Array:
  """`W @ image` along axis 1 for a banded W, in blocks of `BLOCK` rows.

  Row i of W is zero outside `[first_tap_fn(i), first_tap_fn(i) + window -
  BLOCK + 1)` and the first taps do not decrease with i, so each block of
  rows needs only a `window`-row slice of the image: the product costs
  `window / H` of the dense one (about 1/6 for a 224 px resize, 1/4 for its
  blur). A window as large as the image gives the dense product.

  Args:
    image: float32 [C, H, W] (channels first).
    weights_fn: `(rows int32 [T], positions int32 [L]) -> float32 [T, L]`,
      the entries of W.
    first_tap_fn: `rows int32 [T] -> int32 [T]`, the first source row with
      a nonzero weight (or any lower bound of it).
    out_size: rows of W (static).
    window: source rows per block (static).

  Returns:
    float32 [C, out_size, W].
  """
  in_size = image.shape[1]
  if window >= in_size:
    weights = weights_fn(jnp.arange(out_size), jnp.arange(in_size))
    return jnp.einsum('op,cpw->cow', weights, image, precision=HIGHEST)
  num_blocks = -(-out_size // BLOCK)
  rows = jnp.arange(num_blocks * BLOCK).reshape(num_blocks, BLOCK)
  starts = jnp.clip(first_tap_fn(rows[:, 0]), 0, in_size - window)
  weights = jax.vmap(weights_fn)(rows, starts[:, None] + jnp.arange(window))
  blocks = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(
      image, s, window, axis=1))(starts)
  out = jnp.einsum('btl,bclw->cbtw', weights, blocks, precision=HIGHEST)
  return out.reshape(image.shape[0], -1, image.shape[2])[:, :out_size]


def swap(image: jax.Array) -> jax.Array:
  return jnp.swapaxes(image, 1, 2)


def resize_crop(image: jax.Array, box: jax.Array, *,
                out_size: int) -> jax.Array:
  """Crops `box` and resizes it bicubically to a square, as banded products.

  Args:
    image: float32 [C, H, W] (channels first).
    box: int32 [4], `(y, x, h, w)`.
    out_size: side of the output (static).

  Returns:
    float32 [C, out_size, out_size], not clipped.
  """
  y, x, h, w = box

  def resize_rows(image, start, length):
    in_size = image.shape[1]
    # Up to `BLOCK - 1` steps of at most in_size / out_size, 4 taps, slack.
    window = int((BLOCK - 1) * in_size / out_size) + 6
    weights = lambda rows, pos: _resize_weights(start, length, rows, pos,
                                                out_size=out_size)
    first = lambda rows: (start - 1 + _resize_centres(length, rows, out_size)[0]
                          ).astype(jnp.int32)
    return banded_apply(image, weights, first, out_size=out_size,
                        window=window)

  return swap(resize_rows(swap(resize_rows(image, y, h)), x, w))

