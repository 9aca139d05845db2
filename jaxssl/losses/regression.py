"""Regression losses without negatives: BYOL and SimSiam.

Both compare an online prediction `p` with a target projection `z` that
carries no gradient. They are per-example, so the global-view mean under
`jit` is already exact; `axis_name` only serves callers that run them
inside a `shard_map` island.
"""

import jax
import jax.numpy as jnp

from jaxssl.losses import checks
from jaxssl.losses import numerics


def byol_regression(p: jax.Array, z: jax.Array) -> jax.Array:
  """BYOL's per-example loss `‖l2n(p) - l2n(sg(z))‖² = 2 - 2·cos(p, z)`.

  Args:
    p: `[batch, dim]` online predictions (per-shard or global).
    z: `[batch, dim]` target projections; wrapped in `stop_gradient`.

  Returns:
    `[batch]` float32 losses in `[0, 4]`. A zero vector normalises to zero
    (epsilon 1e-12), so the loss stays finite (1 against a unit vector).

  References:
    Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, eq. 2;
    google-deepmind/deepmind-research `byol/utils/helpers.py:regression_loss`.
  """
  checks.check_embeddings([('p', p), ('z', z)])
  diff = numerics.l2_normalize(p) - numerics.l2_normalize(
      jax.lax.stop_gradient(z))
  return jnp.sum(jnp.square(diff), axis=-1)


def byol_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array,
              *, axis_name: str | None = None) -> jax.Array:
  """BYOL's symmetrised loss `mean(reg(p1, z2) + reg(p2, z1))`.

  Args:
    p1: `[per_device_batch, dim]` online predictions of view 1.
    p2: `[per_device_batch, dim]` online predictions of view 2.
    z1: `[per_device_batch, dim]` target projections of view 1 (no
      gradient).
    z2: `[per_device_batch, dim]` target projections of view 2 (no
      gradient).
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    Scalar float32 loss in `[0, 8]`, averaged over the global batch.

  References:
    google-deepmind/deepmind-research `byol/byol_experiment.py:loss_fn`
    (`repr_loss`).
  """
  checks.check_embeddings([('p1', p1), ('p2', p2), ('z1', z1), ('z2', z2)])
  per_example = byol_regression(p1, z2) + byol_regression(p2, z1)
  return numerics.mean_over_devices(jnp.mean(per_example), axis_name)


def simsiam_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array,
                 *, axis_name: str | None = None) -> jax.Array:
  """SimSiam's symmetric negative cosine `-(cos(p1, sg z2) + cos(p2, sg z1))/2`.

  Args:
    p1: `[per_device_batch, dim]` predictor outputs of view 1.
    p2: `[per_device_batch, dim]` predictor outputs of view 2.
    z1: `[per_device_batch, dim]` projections of view 1 (no gradient).
    z2: `[per_device_batch, dim]` projections of view 2 (no gradient).
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    Scalar float32 loss in `[-1, 1]`, averaged over the global batch. The
    norm floor is `‖x‖ >= 1e-6` (torch's `CosineSimilarity` uses 1e-8);
    they differ only for near-zero vectors.

  References:
    Chen & He, "Exploring Simple Siamese Representation Learning", CVPR
    2021, Algorithm 1; facebookresearch/simsiam `main_simsiam.py`.
  """
  checks.check_embeddings([('p1', p1), ('p2', p2), ('z1', z1), ('z2', z2)])

  def cos(p, z):
    z = jax.lax.stop_gradient(z)
    return jnp.sum(numerics.l2_normalize(p) * numerics.l2_normalize(z), -1)

  per_example = -0.5 * (cos(p1, z2) + cos(p2, z1))
  return numerics.mean_over_devices(jnp.mean(per_example), axis_name)
