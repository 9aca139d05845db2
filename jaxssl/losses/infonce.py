"""InfoNCE losses of MoCo v2 (with a queue) and MoCo v3 (symmetric, no queue).

Keys come from a momentum encoder and never carry gradient: every key path
here is wrapped in `stop_gradient`, as the official code computes keys under
`torch.no_grad()` and gathers them with a no-grad `concat_all_gather`.
"""

import jax
import jax.numpy as jnp

from jaxssl.losses import checks
from jaxssl.losses import numerics


def moco_v2_infonce(q: jax.Array, k: jax.Array, queue: jax.Array,
                    temperature: float, *,
                    axis_name: str | None = None) -> jax.Array:
  """MoCo v2's InfoNCE: each query against its key (index 0) and the queue.

  `logits = [q·k, q·queueᵀ] / τ`, label 0, cross-entropy averaged over the
  global batch. The negatives are only the queue (the current batch's keys
  join it after the step, see `moco_enqueue`). `q` and `k` are
  L2-normalised here, as the official encoders' outputs are; the queue is
  used as stored (it holds normalised keys).

  Args:
    q: `[per_device_batch, dim]` per-shard query projections (global batch
      when `axis_name is None`).
    k: `[per_device_batch, dim]` key projections (momentum encoder); no
      gradient flows into them.
    queue: `[K, dim]` replicated negatives, identical on every device; no
      gradient flows into it.
    temperature: τ > 0 (0.07 for MoCo v1, 0.2 for MoCo v2), static.
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    Scalar float32 loss, replicated across `axis_name`.

  References:
    He et al., "Momentum Contrast for Unsupervised Visual Representation
    Learning", CVPR 2020; Chen et al., "Improved Baselines with Momentum
    Contrastive Learning", 2020; facebookresearch/moco
    `moco/builder.py:MoCo.forward`.
  """
  checks.check_embeddings([('q', q), ('k', k)])
  checks.check_width(queue, q.shape[1], 'queue', 'a [K, dim] queue')
  temperature = checks.check_temperature(temperature)
  q = numerics.l2_normalize(q)
  k = jax.lax.stop_gradient(numerics.l2_normalize(k))
  queue = jax.lax.stop_gradient(queue).astype(jnp.float32)
  positive = jnp.sum(q * k, axis=1, keepdims=True)
  negatives = numerics.dot_t(q, queue)
  logits = jnp.concatenate([positive, negatives], axis=1) / temperature
  per_query = numerics.cross_entropy(logits, logits[:, 0])
  return numerics.mean_over_devices(jnp.mean(per_query), axis_name)


def moco_enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array, *,
                 axis_name: str | None = None):
  """Writes the global batch of keys into the queue and advances the pointer.

  The keys of every device are gathered (no gradient) in device order,
  which is the global batch order, L2-normalised, and written at rows
  `[ptr, ptr + N_global)`; then `ptr = (ptr + N_global) % K`. Every device
  computes the identical queue, so inside `jax.shard_map` the outputs may
  use `out_specs=P()`. Outside `shard_map`, call it with the global keys and
  `axis_name=None`: the result is the same.

  Args:
    queue: `[K, dim]` replicated queue; `K` must be a multiple of N_global.
    ptr: int32 scalar, replicated; a multiple of N_global in `[0, K)`.
    keys: `[per_device_batch, dim]` per-shard keys (global batch when
      `axis_name is None`).
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    `(queue, ptr)`: the updated `[K, dim]` queue (dtype of `queue`) and the
    int32 pointer.

  References:
    facebookresearch/moco `moco/builder.py:MoCo._dequeue_and_enqueue`
    (which asserts `K % batch_size == 0`).
  """
  checks.check_embeddings([('keys', keys)])
  checks.check_width(queue, keys.shape[1], 'queue', 'a [K, dim] queue')
  global_batch = keys.shape[0] * numerics.axis_size(axis_name)
  if queue.shape[0] % global_batch:
    raise ValueError(
        f'queue length K={queue.shape[0]} is not a multiple of the global '
        f'batch {global_batch}; use a multiple of {global_batch}')
  keys = jax.lax.stop_gradient(numerics.l2_normalize(keys))
  if axis_name is not None:
    # 'invarying': the gathered keys are the same on every device, so the
    # queue stays replicated (out_specs=P()).
    keys = jax.lax.all_gather(keys, axis_name, tiled=True, to='invarying')
  ptr = jnp.asarray(ptr, jnp.int32)
  queue = jax.lax.dynamic_update_slice_in_dim(
      queue, keys.astype(queue.dtype), ptr, axis=0)
  return queue, (ptr + global_batch) % queue.shape[0]


def _moco_v3_ctr(q, k, temperature, axis_name):
  """One direction of MoCo v3: local queries against all gathered keys."""
  q = numerics.l2_normalize(q)
  k = numerics.l2_normalize(jax.lax.stop_gradient(k))
  k_all = numerics.gather_batch(k, axis_name)
  logits = numerics.dot_t(q, k_all) / temperature
  labels = jnp.arange(q.shape[0]) + numerics.batch_offset(q.shape[0], axis_name)
  positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.mean(numerics.cross_entropy(logits, positive)) * (2 * temperature)


def moco_v3_infonce(q1: jax.Array, q2: jax.Array, k1: jax.Array,
                    k2: jax.Array, temperature: float, *,
                    axis_name: str | None = None) -> jax.Array:
  """MoCo v3's symmetric InfoNCE `ctr(q1, k2) + ctr(q2, k1)`.

  `ctr(q, k)`: with normalised q and keys gathered from every device under
  `stop_gradient`, `logits = q·k_allᵀ / τ` and the label of local row i is
  `i + per_device_batch * axis_index` (its own image's key). The
  cross-entropy, averaged over the global batch, is multiplied by `2τ` as
  facebookresearch/moco-v3 does. Upstream does not explain that factor (it
  was asked in moco-v3 issue #31); its effect is to cancel the explicit 1/τ
  that the logits put into the gradient (`dCE/dq = (p - y)·k_all / τ`). It
  doubles the loss value at τ = 1; keep it when comparing loss curves or
  learning rates with the official runs.

  Args:
    q1: `[per_device_batch, dim]` per-shard predictor outputs for view 1
      (global batch when `axis_name is None`).
    q2: `[per_device_batch, dim]` predictor outputs for view 2.
    k1: `[per_device_batch, dim]` momentum-encoder outputs for view 1; no
      gradient flows into them.
    k2: `[per_device_batch, dim]` momentum-encoder outputs for view 2.
    temperature: τ > 0 (1.0 for ResNet, 0.2 for ViT), static.
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    Scalar float32 loss, replicated across `axis_name`.

  References:
    Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision
    Transformers", ICCV 2021; facebookresearch/moco-v3
    `moco/builder.py:MoCo.contrastive_loss`.
  """
  checks.check_embeddings([('q1', q1), ('q2', q2), ('k1', k1), ('k2', k2)])
  temperature = checks.check_temperature(temperature)
  loss = (_moco_v3_ctr(q1, k2, temperature, axis_name) +
          _moco_v3_ctr(q2, k1, temperature, axis_name))
  return numerics.mean_over_devices(loss, axis_name)
