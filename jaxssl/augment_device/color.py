"""tf.image's colour ops in closed form, on channels-first views.

Saturation and hue are closed forms of tf.image's HSV round trips (no
conversion to HSV and back); grayscale uses tf.image's luma weights. The
random order of the four jitter ops is a `lax.switch` at each position: a
real branch in `augment_device`'s sequential loop, and under vmap (its
vectorised loop) all four ops computed and the drawn one selected.

References:
  TensorFlow `adjust_saturation_op.cc`, `adjust_hue_op.cc`;
  google-research/simclr `data_util.color_jitter_rand`.
"""

import jax
import jax.numpy as jnp
import numpy as np

GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale

def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """`tf.image.adjust_contrast` of a [C, H, W] image: scale about each
  channel's spatial mean."""
  mean = jnp.mean(image, axis=(1, 2), keepdims=True)
  return (image - mean) * factor + mean


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
  """`tf.image.adjust_saturation`, in closed form.

  TF converts to HSV, sets s' = min(s * factor, 1) and converts back; with
  hue and value kept, every channel's distance to the value (the max) scales
  by s' / s = min(factor, v / (v - min)). TF takes s = 0 where v <= 0.

  Args:
    image: float32 [3, H, W] RGB (channels first).
    factor: float32 scalar >= 0.

  Returns:
    float32 [3, H, W].
  """
  value = jnp.maximum(jnp.maximum(image[0], image[1]), image[2])
  chroma = value - jnp.minimum(jnp.minimum(image[0], image[1]), image[2])
  ratio = value / jnp.where(chroma > 0, chroma, 1.0)
  scale = jnp.where((value > 0) & (chroma > 0), jnp.minimum(factor, ratio), 0.0)
  return value - (value - image) * scale


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
  """`tf.image.adjust_hue`: rotate the HSV hue by `delta` turns.

  Args:
    image: float32 [3, H, W] RGB (channels first).
    delta: float32 scalar in [-1, 1].

  Returns:
    float32 [3, H, W], with each pixel's max, min and chroma kept.
  """
  r, g, b = image[0], image[1], image[2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  low = jnp.minimum(jnp.minimum(r, g), b)
  chroma = value - low
  inverse = 1.0 / jnp.where(chroma > 0, chroma, 1.0)
  # Hue in sixths of a turn, wrapped to [0, 6) with floor: XLA's CPU float
  # remainder is a scalar library call, 30 times slower.
  hue = jnp.where(value == r, (g - b) * inverse,
                  jnp.where(value == g, (b - r) * inverse + 2,
                            (r - g) * inverse + 4)) + 6 * delta
  hue = hue - 6 * jnp.floor(hue / 6)
  # The hexcone: each channel's share of the chroma is piecewise linear in
  # the hue, clip(slope * |hue - centre| + offset, 0, 1). Broadcasting over
  # channels, not stacking them: XLA's CPU concatenate fusion is 20x slower.
  centre = jnp.array([3.0, 2.0, 4.0])[:, None, None]
  slope = jnp.array([1.0, -1.0, -1.0])[:, None, None]
  offset = jnp.array([-1.0, 2.0, 2.0])[:, None, None]
  share = jnp.clip(slope * jnp.abs(hue - centre) + offset, 0.0, 1.0)
  return low + chroma * share


def to_grayscale(image: jax.Array) -> jax.Array:
  """`tf.image.rgb_to_grayscale` of [3, H, W], tiled back to 3 channels
  (elementwise, so no bfloat16 dot on accelerators)."""
  w0, w1, w2 = (np.float32(w) for w in GRAYSCALE_WEIGHTS)
  gray = image[0] * w0 + image[1] * w1 + image[2] * w2
  return jnp.broadcast_to(gray, image.shape)

def color_jitter(image: jax.Array, params: dict, *,
                 brightness: str) -> jax.Array:
  """Brightness, contrast, saturation, hue in `params['order']`, clipped.

  Saturation and hue are the identity for C=1, as on the host.

  Args:
    image: float32 [C, H, W] (channels first), one view.
    params: from `sample_view_params` (order and the four op parameters).
    brightness: 'multiplicative' (v2) or 'additive' (v1).

  Returns:
    float32 [C, H, W] in [0, 1].
  """
  if brightness == 'multiplicative':
    bright = lambda x: x * params['brightness']
  else:
    bright = lambda x: x + params['brightness']
  ops = [bright, lambda x: adjust_contrast(x, params['contrast'])]
  if image.shape[0] == 3:
    ops += [lambda x: adjust_saturation(x, params['saturation']),
            lambda x: adjust_hue(x, params['hue'])]
  else:
    ops += [lambda x: x, lambda x: x]

  def apply_op(position, image):
    # Under vmap the switch becomes a select over the four ops.
    image = jax.lax.switch(params['order'][position], ops, image)
    return jnp.clip(image, 0.0, 1.0)

  # A loop, not four unrolled positions: its carry is materialised. Unrolled,
  # XLA fuses each position into the next and recomputes every earlier one
  # once per channel read, 3^k times at position k (20x slower on CPU).
  return jax.lax.fori_loop(0, 4, apply_op, image)

