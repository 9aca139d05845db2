"""Blockwise NT-Xent: `nt_xent`'s value and gradients in O(block²) memory.

The dense loss materialises `[2n, 2N]` logits (64 GiB at 131,072 views).
Here the only per-anchor state is its log-sum-exp over the masked candidate
row, streamed over `[block, block]` tiles: an outer loop over anchor blocks,
an inner `lax.scan` over key blocks. A custom VJP saves only that LSE and
recomputes each tile in the backward pass (the flash-attention recipe), so
peak memory is O(block² + (n + N)·dim) for any batch. The positive logit is
a per-row dot product and needs no tiles.

Block sizes that do not divide the anchor or key count are padded with zero
rows; padded keys are masked and padded anchors carry zero cotangent.
"""

import functools

import jax
import jax.numpy as jnp

from jaxssl.losses import checks
from jaxssl.losses import numerics
from jaxssl.losses import ntxent

_FLOOR = float(jnp.finfo(jnp.float32).min)


def _to_blocks(x: jax.Array, block: int, fill) -> jax.Array:
  """Pads the leading axis of `x` to a multiple of `block`, then splits it."""
  count = x.shape[0]
  num_blocks = -(-count // block)
  pad = num_blocks * block - count
  if pad:
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    x = jnp.pad(x, widths, constant_values=fill)
  return x.reshape((num_blocks, block) + x.shape[1:])


def _row_init(q_blk: jax.Array, value, dtype=None) -> jax.Array:
  """`[block]` scan carry filled with `value`.

  Built with `full_like` so that inside `shard_map` it varies over the same
  mesh axes as the anchors, as `lax.scan` requires of carries.
  """
  return jnp.full_like(q_blk[:, 0], value, dtype=dtype)


class _Tiling:
  """Static tile geometry for `[num_q, d]` anchors against `[num_k, d]` keys."""

  def __init__(self, num_q: int, num_k: int, block_size: int):
    self.num_q, self.num_k = num_q, num_k
    self.bq, self.bk = min(block_size, num_q), min(block_size, num_k)
    self.num_k_blocks = -(-num_k // self.bk)
    self.keys_padded = self.num_k_blocks * self.bk != num_k

  def col_ids(self) -> jax.Array:
    """`[num_k_blocks, bk]` global column index of every key slot."""
    return jnp.arange(self.num_k_blocks * self.bk).reshape(-1, self.bk)

  def logits(self, q_blk, k_blk, cols, self_blk, temperature):
    """Masked `[bq, bk]` logits tile, exactly as the dense loss builds them."""
    logits = numerics.dot_t(q_blk, k_blk) / temperature
    is_self = cols[None, :] == self_blk[:, None]
    logits = logits - numerics.LARGE_NUM * is_self.astype(logits.dtype)
    if self.keys_padded:
      logits = jnp.where(cols[None, :] < self.num_k, logits,
                         -numerics.LARGE_NUM)
    return logits


def _lse_forward(queries, keys, self_cols, temperature, block_size):
  """Streams `[num_q]` row log-sum-exps of the masked logits."""
  t = _Tiling(queries.shape[0], keys.shape[0], block_size)
  k_blocks, cols = _to_blocks(keys, t.bk, 0), t.col_ids()

  def anchor_block(xs):
    q_blk, self_blk = xs

    def step(carry, ys):
      run_max, run_sum = carry
      logits = t.logits(q_blk, ys[0], ys[1], self_blk, temperature)
      new_max = jnp.maximum(run_max, jnp.max(logits, axis=1))
      run_sum = (run_sum * jnp.exp(run_max - new_max) +
                 jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1))
      return (new_max, run_sum), None

    init = _row_init(q_blk, _FLOOR), _row_init(q_blk, 0.0)
    (run_max, run_sum), _ = jax.lax.scan(step, init, (k_blocks, cols))
    return run_max + jnp.log(run_sum)

  lse = jax.lax.map(anchor_block, (_to_blocks(queries, t.bq, 0),
                                   _to_blocks(self_cols, t.bq, -1)))
  return lse.reshape(-1)[:t.num_q]


def _lse_backward(queries, keys, self_cols, lse, cotangent, temperature,
                  block_size):
  """Recomputes each tile to return `(d queries, d keys)`.

  With `p = exp(logits - lse)`, the row LSE has `d lse_r / d q_r = Σ_c p_rc
  k_c / τ` and `d lse_r / d k_c = p_rc q_r / τ`. Masked and padded entries
  have `p = 0`, as in the dense softmax.
  """
  t = _Tiling(queries.shape[0], keys.shape[0], block_size)
  k_blocks, cols = _to_blocks(keys, t.bk, 0), t.col_ids()
  steps = jnp.arange(t.num_k_blocks)

  def anchor_block(d_keys, xs):
    q_blk, self_blk, lse_blk, ct_blk = xs

    def step(carry, ys):
      d_q, d_keys = carry
      k_blk, col_blk, j = ys
      logits = t.logits(q_blk, k_blk, col_blk, self_blk, temperature)
      weights = jnp.exp(logits - lse_blk[:, None]) * ct_blk[:, None]
      d_q = d_q + jnp.einsum('qk,kd->qd', weights, k_blk,
                             precision=numerics.MATMUL_PRECISION)
      # In-place accumulation into the carried key gradient (no [2N, d] copy
      # per anchor block).
      d_keys = d_keys.at[j].add(jnp.einsum(
          'qk,qd->kd', weights, q_blk, precision=numerics.MATMUL_PRECISION))
      return (d_q, d_keys), None

    init = (jnp.zeros_like(q_blk), d_keys)
    (d_q, d_keys), _ = jax.lax.scan(step, init, (k_blocks, cols, steps))
    return d_keys, d_q

  xs = (_to_blocks(queries, t.bq, 0), _to_blocks(self_cols, t.bq, -1),
        _to_blocks(lse, t.bq, 0), _to_blocks(cotangent / temperature, t.bq, 0))
  d_keys, d_q = jax.lax.scan(anchor_block, jnp.zeros_like(k_blocks), xs)
  d_q = d_q.reshape(-1, queries.shape[1])[:t.num_q]
  return d_q, d_keys.reshape(-1, keys.shape[1])[:t.num_k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _masked_lse(queries, keys, self_cols, temperature, block_size):
  return _lse_forward(queries, keys, self_cols, temperature, block_size)


def _masked_lse_fwd(queries, keys, self_cols, temperature, block_size):
  lse = _lse_forward(queries, keys, self_cols, temperature, block_size)
  return lse, (queries, keys, self_cols, lse)


def _masked_lse_bwd(temperature, block_size, residuals, cotangent):
  queries, keys, self_cols, lse = residuals
  d_q, d_k = _lse_backward(queries, keys, self_cols, lse, cotangent,
                           temperature, block_size)
  return d_q, d_k, None


_masked_lse.defvjp(_masked_lse_fwd, _masked_lse_bwd)


def _streamed_metrics(v, temperature, block_size, axis_name):
  """SimCLR's `contrast_acc` / `contrast_entropy` over tiles of `logits_ab`.

  Two forward-only passes over the `[n, N]` view-1 x view-2 logits (a
  quarter of the loss tiles each): the first finds each row's LSE and first
  argmax, the second sums `p log(p + 1e-8)` exactly as SimCLR does.
  """
  h1, h2_all = jax.lax.stop_gradient((v.h1, v.h2_all))
  t = _Tiling(v.n, v.num_images, block_size)
  k_blocks, cols = _to_blocks(h2_all, t.bk, 0), t.col_ids()
  no_self = jnp.full((t.bq,), -1)

  def stats(q_blk):
    def step(carry, ys):
      run_max, run_sum, arg = carry
      logits = t.logits(q_blk, ys[0], ys[1], no_self, temperature)
      blk_max = jnp.max(logits, axis=1)
      blk_arg = jnp.take(ys[1], jnp.argmax(logits, axis=1))
      arg = jnp.where(blk_max > run_max, blk_arg, arg)  # first max wins
      new_max = jnp.maximum(run_max, blk_max)
      run_sum = (run_sum * jnp.exp(run_max - new_max) +
                 jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1))
      return (new_max, run_sum, arg), None

    init = (_row_init(q_blk, _FLOOR), _row_init(q_blk, 0.0),
            _row_init(q_blk, 0, jnp.int32))
    (run_max, run_sum, arg), _ = jax.lax.scan(step, init, (k_blocks, cols))
    lse = run_max + jnp.log(run_sum)

    def entropy_step(total, ys):
      logits = t.logits(q_blk, ys[0], ys[1], no_self, temperature)
      prob = jnp.exp(logits - lse[:, None])
      return total - jnp.sum(prob * jnp.log(prob + 1e-8), axis=1), None

    entropy, _ = jax.lax.scan(entropy_step, _row_init(q_blk, 0.0),
                              (k_blocks, cols))
    return arg, entropy

  arg, entropy = jax.lax.map(stats, _to_blocks(h1, t.bq, 0))
  hit = (arg.reshape(-1)[:v.n] == v.rows).astype(jnp.float32)
  return {
      'contrast_acc': numerics.mean_over_devices(jnp.mean(hit), axis_name),
      'contrast_entropy': numerics.mean_over_devices(
          jnp.mean(entropy.reshape(-1)[:v.n]), axis_name),
  }


def _blockwise_loss(v, temperature, block_size, axis_name):
  lse = _masked_lse(v.queries, v.keys, v.self_cols, temperature, block_size)
  # Both anchors of image i share the positive logit h1_i . h2_i / τ.
  positive = jnp.sum(v.h1 * v.h2) / temperature
  local = (jnp.sum(lse) - 2.0 * positive) / (2 * v.n)
  return numerics.mean_over_devices(local, axis_name)


def nt_xent_blockwise(z1: jax.Array, z2: jax.Array, temperature: float, *,
                      block_size: int,
                      axis_name: str | None = None) -> jax.Array:
  """`nt_xent` computed in `[block_size, block_size]` tiles.

  Same value and gradients as `nt_xent` (up to float32 summation order),
  including the differentiable cross-device gather; see `nt_xent` for the
  definition and its relation to the official `add_contrastive_loss` (2L).
  Peak memory is O(block_size² + (per_device_batch + N_global)·dim) instead
  of O(per_device_batch · N_global).

  Args:
    z1: `[per_device_batch, dim]` per-shard projections of view 1 (the
      global batch when `axis_name is None`).
    z2: `[per_device_batch, dim]` projections of view 2.
    temperature: τ > 0, a static Python float.
    block_size: tile side, for anchors and keys; any positive int (it need
      not divide the batch). 512 to 2048 suits CPUs.
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    Scalar float32 L, replicated across `axis_name`.

  References:
    Chen et al., ICML 2020, eq. 1; Dao et al., "FlashAttention", NeurIPS
    2022 (tiling with recomputation); Milakov & Gimelshein, "Online
    normalizer calculation for softmax", 2018.
  """
  temperature = ntxent.check_args(z1, z2, temperature)
  block_size = checks.check_positive_int(block_size, 'block_size')
  v = ntxent.ViewBatch(z1, z2, axis_name)
  return _blockwise_loss(v, temperature, block_size, axis_name)


def nt_xent_blockwise_with_metrics(z1: jax.Array, z2: jax.Array,
                                   temperature: float, *, block_size: int,
                                   axis_name: str | None = None):
  """`nt_xent_blockwise` plus SimCLR's two monitors, streamed.

  Args and the loss are as in `nt_xent_blockwise`. The metrics cost two
  extra forward passes over a quarter of the tiles (about 50% more forward
  work, no extra backward work) and match `nt_xent_with_metrics`.

  Returns:
    `(loss, {'contrast_acc', 'contrast_entropy'})`, all float32 scalars
    replicated across `axis_name`; the metrics carry no gradient.

  References:
    google-research/simclr `tf2/metrics.py:update_pretrain_metrics_train`.
  """
  temperature = ntxent.check_args(z1, z2, temperature)
  block_size = checks.check_positive_int(block_size, 'block_size')
  v = ntxent.ViewBatch(z1, z2, axis_name)
  loss = _blockwise_loss(v, temperature, block_size, axis_name)
  return loss, _streamed_metrics(v, temperature, block_size, axis_name)
