"""SwAV: Sinkhorn-Knopp codes and the swapped-prediction loss.

Scores are `[n, K]` (samples x prototypes), the cosine similarities
`l2n(z) · l2n(C)ᵀ`. The official `distributed_sinkhorn` works on the
transpose `Q = exp(scores/ε)ᵀ` (`[K, B]`); the functions here keep samples
on rows and sum along the matching axes. Sample sums stay local to a device
and per-prototype sums are `psum`'d, exactly as the official code's
`all_reduce`s. Everything runs in float32 under `stop_gradient`: the codes
are targets, as under the official `torch.no_grad()`.
"""

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxssl.losses import checks
from jaxssl.losses import numerics


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x, axis_name):
  return x if axis_name is None else jax.lax.pmax(x, axis_name)


def _check_sinkhorn(scores, epsilon, num_iters):
  if scores.ndim != 2:
    raise ValueError(
        f'scores has shape {tuple(scores.shape)}; expected a 2-D '
        f'[per_device_batch, num_prototypes] array')
  checks.check_temperature(epsilon, 'epsilon')
  checks.check_positive_int(num_iters, 'num_iters')


def sinkhorn(scores: jax.Array, epsilon: float = 0.05, num_iters: int = 3,
             axis_name: str | None = None) -> jax.Array:
  """SwAV's `distributed_sinkhorn`: equipartitioned soft codes.

  Computes `Q = exp(scores/ε)`, divides by its global total, then
  `num_iters` times divides each prototype column by its global sum (psum)
  and by K, and each sample row by its local sum and by B (B = global
  sample count); returns `B·Q`. Before `exp` the global maximum is
  subtracted (`pmax`): a global constant, which the first normalisation
  removes exactly, so the result is the official one while `exp` cannot
  overflow. It can still underflow to an all-zero prototype for very small
  ε or widely spread scores (0/0 = NaN); use `sinkhorn_log` there.

  Args:
    scores: `[per_device_batch, K]` per-shard prototype scores (global rows
      when `axis_name is None`); any float dtype, computed in float32.
    epsilon: ε > 0, the entropic regularisation (official 0.05), static.
    num_iters: Sinkhorn iterations (official 3), static.
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    `[per_device_batch, K]` float32 codes, each row summing to 1, without
    gradient.

  References:
    Caron et al., "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments", NeurIPS 2020, Sec. 3.1; facebookresearch/swav
    `main_swav.py:distributed_sinkhorn`.
  """
  _check_sinkhorn(scores, epsilon, num_iters)
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  num_samples = scores.shape[0] * numerics.axis_size(axis_name)
  num_protos = scores.shape[1]
  shift = _pmax(jnp.max(scores), axis_name)
  q = jnp.exp((scores - shift) / epsilon)
  q = q / _psum(jnp.sum(q), axis_name)
  for _ in range(num_iters):
    q = q / _psum(jnp.sum(q, axis=0, keepdims=True), axis_name) / num_protos
    q = q / jnp.sum(q, axis=1, keepdims=True) / num_samples
  return q * num_samples


def _global_lse_over_samples(log_q, axis_name):
  """`[1, K]` log of each prototype's sum over every device's samples."""
  peak = _pmax(jnp.max(log_q, axis=0, keepdims=True), axis_name)
  total = _psum(jnp.sum(jnp.exp(log_q - peak), axis=0, keepdims=True),
                axis_name)
  return peak + jnp.log(total)


def sinkhorn_log(scores: jax.Array, epsilon: float = 0.05,
                 num_iters: int = 3,
                 axis_name: str | None = None) -> jax.Array:
  """`sinkhorn` in the log domain: the same codes, finite for any scores.

  Each normalisation subtracts a log-sum-exp instead of dividing by a sum,
  so neither overflow nor underflow to an all-zero prototype can occur
  (e.g. scores of ±50 at ε = 0.05, where `exp(1000)` overflows: a known
  SwAV NaN source, facebookresearch/swav#67, #88). Where `sinkhorn` is
  finite both agree to float32 rounding. The official first division by the
  total is a global constant that the first prototype normalisation
  absorbs, so it is skipped.

  Args:
    scores: `[per_device_batch, K]` per-shard prototype scores.
    epsilon: ε > 0, static.
    num_iters: Sinkhorn iterations, static.
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    `[per_device_batch, K]` float32 codes, rows summing to 1, no gradient.

  References:
    Cuturi, "Sinkhorn Distances", NeurIPS 2013; Peyré & Cuturi,
    "Computational Optimal Transport", 2019, Sec. 4.4 (log-domain
    stabilisation); facebookresearch/swav `main_swav.py:distributed_sinkhorn`.
  """
  _check_sinkhorn(scores, epsilon, num_iters)
  log_q = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  log_samples = math.log(scores.shape[0] * numerics.axis_size(axis_name))
  log_protos = math.log(scores.shape[1])
  for _ in range(num_iters):
    log_q = log_q - _global_lse_over_samples(log_q, axis_name) - log_protos
    log_q = (log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) -
             log_samples)
  return jnp.exp(log_q + log_samples)


_SINKHORN = {False: sinkhorn, True: sinkhorn_log}


def _check_swav(scores, crops_for_assign, queue_scores):
  """Validates crop lists; returns `(n_crops, crops_for_assign)`."""
  if not isinstance(scores, (list, tuple)):
    raise ValueError(
        f'scores must be a list or tuple of per-crop [n, K] arrays; got '
        f'{type(scores).__name__}')
  if len(scores) < 2:
    raise ValueError(
        f'scores has length {len(scores)}; SwAV needs >= 2 crops')
  checks.check_embeddings([(f'scores[{i}]', s) for i, s in enumerate(scores)])
  crops = tuple(crops_for_assign)
  bad = [c for c in crops if isinstance(c, bool) or
         not isinstance(c, numbers.Integral) or not 0 <= c < len(scores)]
  if not crops or bad or len(set(crops)) != len(crops):
    raise ValueError(
        f'crops_for_assign={crops_for_assign!r} must be distinct crop '
        f'indices in [0, {len(scores)})')
  if queue_scores is not None:
    if len(queue_scores) != len(crops):
      raise ValueError(
          f'queue_scores has {len(queue_scores)} entries; expected one per '
          f'crop in crops_for_assign={crops}')
    for i, qs in enumerate(queue_scores):
      checks.check_width(qs, scores[0].shape[1], f'queue_scores[{i}]',
                         'a [queue_rows, K] score array')
  return len(scores), crops


def swav_loss(scores: Sequence[jax.Array], *,
              crops_for_assign: Sequence[int] = (0, 1),
              temperature: float = 0.1, epsilon: float = 0.05,
              num_iters: int = 3,
              queue_scores: Sequence[jax.Array] | None = None,
              log_domain: bool = False,
              axis_name: str | None = None) -> jax.Array:
  """SwAV's swapped-prediction loss over any number of crops.

  For each assigned crop `a`, codes `q_a = sinkhorn(scores[a])` (no
  gradient); every other crop `v` predicts them with
  `log_softmax(scores[v] / temperature)`. The official averaging:
  `loss = mean_a [ Σ_{v≠a} mean_b CE(q_a, scores[v]) ] / (n_crops − 1)`,
  then averaged over devices (DDP's gradient mean).

  With a queue, `queue_scores[i]` (the queued embeddings of assigned crop
  `crops_for_assign[i]` scored with the current prototypes) are prepended
  to that crop's Sinkhorn input, so they shape the equipartition, but only
  the codes of the current batch (the last `n` rows) are used.

  Args:
    scores: per-crop `[per_device_batch, K]` per-shard prototype scores
      (global rows when `axis_name is None`), all the same shape, in crop
      order (e.g. 2 x 224 px then 6 x 96 px).
    crops_for_assign: indices of the crops whose codes are targets.
    temperature: softmax temperature of the predictions (official 0.1).
    epsilon: Sinkhorn ε (official 0.05).
    num_iters: Sinkhorn iterations (official 3).
    queue_scores: optional, one `[queue_rows_per_device, K]` array per
      assigned crop (the device's slice of the queue).
    log_domain: use `sinkhorn_log` instead of `sinkhorn`.
    axis_name: the mesh axis inside `jax.shard_map`, or `None`.

  Returns:
    Scalar float32 loss, replicated across `axis_name`.

  References:
    Caron et al., NeurIPS 2020, eq. 1-2; facebookresearch/swav
    `main_swav.py:train`.
  """
  n_crops, crops = _check_swav(scores, crops_for_assign, queue_scores)
  temperature = checks.check_temperature(temperature)
  batch = scores[0].shape[0]
  log_probs = [jax.nn.log_softmax(s.astype(jnp.float32) / temperature, axis=1)
               for s in scores]
  loss = 0.0
  for i, crop in enumerate(crops):
    out = scores[crop]
    if queue_scores is not None:
      out = jnp.concatenate([queue_scores[i].astype(out.dtype), out], axis=0)
    codes = _SINKHORN[bool(log_domain)](
        out, epsilon, num_iters, axis_name)[-batch:]
    subloss = sum(-jnp.mean(jnp.sum(codes * log_probs[v], axis=1))
                  for v in range(n_crops) if v != crop)
    loss = loss + subloss / (n_crops - 1)
  return numerics.mean_over_devices(loss / len(crops), axis_name)
