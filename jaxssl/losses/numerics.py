"""Numerical conventions shared by every loss.

- Embeddings are L2-normalised in float32 (or wider) with an epsilon, so a
  zero vector stays finite and bfloat16 activations give float32 logits.
- Self-similarity is masked by subtracting `LARGE_NUM`, never with `-inf`.
- Inside a `shard_map` island the global batch is rebuilt with a tiled
  `all_gather` over the named axis; with `axis_name=None` the input already is
  the global batch.
"""

import jax
import jax.numpy as jnp

# SimCLR's mask constant: finite, so masked logits keep finite gradients.
LARGE_NUM = 1e9

# Full float32 products on every backend (TPU's default would drop to bf16
# passes, which the logits/LSE-in-float32 convention forbids).
MATMUL_PRECISION = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, axis: int = -1,
                 epsilon: float = 1e-12) -> jax.Array:
  """L2-normalises `x` along `axis`, computing in at least float32.

  Args:
    x: array of any float dtype; bfloat16 and float16 are promoted.
    axis: the feature axis.
    epsilon: floor on the squared norm, so zero vectors map to zero.

  Returns:
    `x * rsqrt(max(sum(x**2), epsilon))`, float32 (or float64 for float64
    input).

  References:
    google-deepmind/deepmind-research `byol/utils/helpers.py:l2_normalize`;
    SimCLR's `hidden_norm=True` (`tf.math.l2_normalize`, same epsilon).
  """
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sum_sq, epsilon))


def dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b.T` in float32 at full precision: `[m, d], [n, d] -> [m, n]`."""
  return jnp.einsum('md,nd->mn', a, b, precision=MATMUL_PRECISION,
                    preferred_element_type=jnp.float32)


def gather_batch(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Concatenates the per-device batches of `x` in device order.

  Args:
    x: `[per_device_batch, ...]`, per-shard.
    axis_name: mesh axis to gather over, or `None` (then `x` is returned).

  Returns:
    `[global_batch, ...]`. The gather is differentiable: its transpose is a
    reduce-scatter, so each device's rows receive gradient from every
    device's loss (SimCLR semantics). Wrap `x` in `stop_gradient` for the
    MoCo convention.
  """
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, tiled=True)


def batch_offset(per_device_batch: int, axis_name: str | None):
  """Global index of this device's first row (`axis_index * batch`)."""
  if axis_name is None:
    return 0
  return jax.lax.axis_index(axis_name) * per_device_batch


def axis_size(axis_name: str | None) -> int:
  """Number of devices along `axis_name` (1 for `None`), a Python int."""
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def mean_over_devices(x: jax.Array, axis_name: str | None) -> jax.Array:
  """`pmean` over `axis_name`, or identity; returns a replicated value."""
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def cross_entropy(logits: jax.Array, label_logits: jax.Array) -> jax.Array:
  """Per-row softmax cross-entropy `logsumexp(logits) - logits[label]`.

  Args:
    logits: `[rows, classes]` float32.
    label_logits: `[rows]`, the logit of each row's label.

  Returns:
    `[rows]` float32.
  """
  return jax.nn.logsumexp(logits, axis=-1) - label_logits
