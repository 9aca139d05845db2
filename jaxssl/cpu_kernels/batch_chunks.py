"""Splitting a batch into equal loop steps, for cache-sized matmul operands.

The CPU convolution paths (`fastconv`, `winograd`) build temporaries several
times larger than their input (im2col patches, Winograd tiles) and process
the batch in chunks of a few images by `lax.map` / `lax.scan`, so that each
chunk's temporaries stay in the L2/L3 caches. Pure shape helpers; nothing
here calls a collective, and the batch may be global or per-shard.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def images_per_step(batch: int, most: int) -> int:
  """Images per loop step, at most `most` (`batch`: no loop).

  Prefers a divisor of `batch` (no padding) unless it is less than half of
  `most`; otherwise splits evenly and pads the last step.

  Args:
    batch: leading size of the arrays to loop over (>= 1).
    most: the largest chunk the caller wants (clipped to >= 1).

  Returns:
    An int in [1, batch].
  """
  most = max(1, most)
  if most >= batch:
    return batch
  divisor = max(d for d in range(1, most + 1) if batch % d == 0)
  if 2 * divisor >= most:
    return divisor
  return -(-batch // -(-batch // most))


def split(x: jax.Array, chunk: int) -> jax.Array:
  """Reshapes `[B, ...]` to `[n, chunk, ...]`, zero-padding B up to n*chunk."""
  batch = x.shape[0]
  count = -(-batch // chunk)
  if count * chunk != batch:
    x = jnp.pad(x, ((0, count * chunk - batch),) + ((0, 0),) * (x.ndim - 1))
  return x.reshape((count, chunk) + x.shape[1:])


def merge(x: jax.Array, batch: int) -> jax.Array:
  """Inverse of `split`: `[n, chunk, ...]` to `[batch, ...]`."""
  return x.reshape((-1,) + x.shape[2:])[:batch]


def map_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array,
               chunk: int) -> jax.Array:
  """`fn` over `x` in loop steps of `chunk` images (`fn(x)` if it fits).

  `fn` maps `[n, ...]` to `[n, ...]` image by image, so the zero images
  that pad the last step are dropped from the result.
  """
  if chunk >= x.shape[0]:
    return fn(x)
  return merge(lax.map(fn, split(x, chunk)), x.shape[0])
