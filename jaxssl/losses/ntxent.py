"""NT-Xent, SimCLR's normalised-temperature cross-entropy (dense version).

Conventions shared with `blockwise.py`. A device holds the per-shard views
`z1, z2: [n, d]` (row i of z1 pairs with row i of z2). The anchors of a
device are its `2n` local rows `[h1; h2]`; the candidates are all
`2N = 2 * n * devices` gathered rows `[h1_all; h2_all]`. For the local row i
at global index `g = offset + i` the self column is `g` (view 1) or `N + g`
(view 2) and the positive column is the other view of the same image.
"""

import jax
import jax.numpy as jnp

from jaxssl.losses import checks
from jaxssl.losses import numerics


class ViewBatch:
  """Normalised local and gathered views plus the column bookkeeping.

  Shared with `blockwise.py`; not part of the public API.
  """

  def __init__(self, z1, z2, axis_name):
    self.h1 = numerics.l2_normalize(z1)
    self.h2 = numerics.l2_normalize(z2)
    self.n = z1.shape[0]
    self.h1_all = numerics.gather_batch(self.h1, axis_name)
    self.h2_all = numerics.gather_batch(self.h2, axis_name)
    self.num_images = self.h1_all.shape[0]
    # Global indices of the local images: SimCLR's `labels_idx`.
    self.rows = jnp.arange(self.n) + numerics.batch_offset(self.n, axis_name)

  @property
  def queries(self):
    return jnp.concatenate([self.h1, self.h2], axis=0)

  @property
  def keys(self):
    return jnp.concatenate([self.h1_all, self.h2_all], axis=0)

  @property
  def self_cols(self):
    return jnp.concatenate([self.rows, self.rows + self.num_images])

  @property
  def positive_cols(self):
    return jnp.concatenate([self.rows + self.num_images, self.rows])


def check_args(z1, z2, temperature) -> float:
  """Validates the NT-Xent inputs; returns the temperature as a float."""
  checks.check_embeddings([('z1', z1), ('z2', z2)])
  return checks.check_temperature(temperature)


def _contrast_metrics(logits_ab, rows, axis_name):
  """SimCLR's `contrast_acc` and `contrast_entropy` over the `ab` logits."""
  logits_ab = jax.lax.stop_gradient(logits_ab)
  acc = jnp.mean((jnp.argmax(logits_ab, axis=1) == rows).astype(jnp.float32))
  prob = jax.nn.softmax(logits_ab, axis=1)
  entropy = -jnp.mean(jnp.sum(prob * jnp.log(prob + 1e-8), axis=1))
  return {
      'contrast_acc': numerics.mean_over_devices(acc, axis_name),
      'contrast_entropy': numerics.mean_over_devices(entropy, axis_name),
  }


def _dense_loss(v: ViewBatch, temperature: float, axis_name):
  """Returns the replicated loss and the local `[2n, 2N]` masked logits."""
  logits = numerics.dot_t(v.queries, v.keys) / temperature
  logits = logits - numerics.LARGE_NUM * jax.nn.one_hot(
      v.self_cols, 2 * v.num_images, dtype=logits.dtype)
  positive = jnp.take_along_axis(logits, v.positive_cols[:, None], axis=1)
  per_anchor = numerics.cross_entropy(logits, positive[:, 0])
  return numerics.mean_over_devices(jnp.mean(per_anchor), axis_name), logits


def nt_xent_with_metrics(z1: jax.Array, z2: jax.Array, temperature: float, *,
                         axis_name: str | None = None):
  """NT-Xent loss plus SimCLR's contrastive accuracy and entropy.

  Args:
    z1: `[per_device_batch, dim]` per-shard projections of view 1 (the
      global batch when `axis_name is None`); any float dtype.
    z2: `[per_device_batch, dim]` projections of view 2; row i pairs with
      row i of `z1`.
    temperature: τ > 0, a static Python float.
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    `(loss, metrics)`: the scalar loss of `nt_xent` and a dict with
    `contrast_acc` (fraction of view-1 anchors whose largest `ab` logit is
    their positive) and `contrast_entropy` (mean entropy of
    `softmax(logits_ab)`, with SimCLR's `log(p + 1e-8)`), both float32
    scalars averaged over the global batch and carrying no gradient.

  References:
    google-research/simclr `tf2/metrics.py:update_pretrain_metrics_train`.
  """
  temperature = check_args(z1, z2, temperature)
  v = ViewBatch(z1, z2, axis_name)
  loss, logits = _dense_loss(v, temperature, axis_name)
  logits_ab = logits[:v.n, v.num_images:]
  return loss, _contrast_metrics(logits_ab, v.rows, axis_name)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float, *,
            axis_name: str | None = None) -> jax.Array:
  """SimCLR's NT-Xent loss over the global batch.

  Each of the `2N` views (N = global batch) is an anchor classified, by
  softmax over cosine similarities / τ, against the other `2N - 1` views; the
  positive is the other view of its image. Returns the paper's L, the mean
  of these `2N` cross-entropies.

  Relation to the official code: google-research/simclr
  `tf2/objective.py:add_contrastive_loss` (rows ordered `[view 1; view 2]`)
  returns `mean(loss_a + loss_b)`, which is `2 * L`. Its gradients, after the
  per-replica averaging of `tf2/run.py`, are those of `2 * L`.

  Embeddings are L2-normalised with an epsilon (`hidden_norm=True`); logits
  and log-sum-exp run in float32 for any input dtype; self-similarity is
  masked by subtracting 1e9. With `axis_name`, both views are gathered from
  every device with a differentiable `all_gather`, so each device's rows get
  gradient from every device's anchors, as in the TF cross-replica concat;
  local labels are offset by `axis_index * per_device_batch`.

  Args:
    z1: `[per_device_batch, dim]` per-shard projections of view 1 (the
      global batch when `axis_name is None`).
    z2: `[per_device_batch, dim]` projections of view 2; row i pairs with
      row i of `z1`.
    temperature: τ > 0, a static Python float (SimCLR: 0.1 ImageNet, 0.5
      CIFAR-10).
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    Scalar float32 L, replicated across `axis_name`.

  References:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020, eq. 1; google-research/simclr
    `tf2/objective.py:add_contrastive_loss`.
  """
  temperature = check_args(z1, z2, temperature)
  return _dense_loss(ViewBatch(z1, z2, axis_name), temperature, axis_name)[0]
