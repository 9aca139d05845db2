"""Health metrics of an embedding: RankMe, alignment and uniformity.

Pure `jnp` functions of host-gathered features: each takes the whole
evaluation set (the caller gathers features across devices), runs in float32
(or float64 for float64 input under x64) for any input dtype, and is
jit-able with its keyword arguments static. They are metrics, not losses:
use them to compare checkpoints or runs of one method on a fixed sample.
"""

import math

import jax
import jax.numpy as jnp

from jaxssl.losses import numerics

# The number of samples used in the RankMe paper (p. 3), as in the widely
# copied reference `calc_rankme` (`DEFAULT_MAX_SAMPLES = 25_600`).
RANKME_MAX_SAMPLES = 25_600
# The reference `calc_rankme`'s `EPSILON`, "suitable for float32".
RANKME_EPSILON = 1e-7


def _check_matrix(name: str, x) -> None:
  if x.ndim != 2:
    raise ValueError(f'{name} must be 2-D [num_examples, dim], got shape '
                     f'{tuple(x.shape)}.')


def _as_float(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def rankme(embeddings: jax.Array, *, epsilon: float = RANKME_EPSILON,
           max_samples: int | None = RANKME_MAX_SAMPLES) -> jax.Array:
  """RankMe, the smooth effective rank of an embedding matrix.

  `σ = svdvals(Z)` of the raw embeddings (no centring, no normalisation),
  `p_k = σ_k / Σ_j σ_j + ε` and `RankMe = exp(-Σ_k p_k log p_k)`. It lies
  in about `[1, min(N, K)]`: 1 for a rank-1 (collapsed) `Z`, `min(N, K)`
  when all singular values are equal. An all-zero `Z` gives about 1 (the
  sum of singular values is floored at the dtype's `tiny`, where the
  reference divides by zero).

  Only the first `max_samples` rows are used: the cap is a static slice, so
  the caller must pass a fixed sample (for instance the first 25,600
  examples of the evaluation split, in a deterministic order) for values to
  be comparable across checkpoints.

  Args:
    embeddings: `[N, K]` embeddings `Z`, any float dtype.
    epsilon: ε added to every `p_k`; 1e-7 for float32 as in the paper.
    max_samples: keep rows `[:max_samples]`; `None` keeps all rows.

  Returns:
    Scalar float32 RankMe.

  References:
    Garrido et al., "RankMe: Assessing the Downstream Performance of
    Pretrained Self-Supervised Representations by Their Rank", ICML 2023,
    eq. 1; the reference `calc_rankme` (`DEFAULT_MAX_SAMPLES = 25_600`,
    `EPSILON = 1e-7`).
  """
  _check_matrix('embeddings', embeddings)
  if max_samples is not None:
    if max_samples < 1:
      raise ValueError(f'max_samples must be >= 1 or None, got {max_samples}.')
    embeddings = embeddings[:max_samples]
  sigma = jnp.linalg.svdvals(_as_float(embeddings))
  total = jnp.maximum(jnp.sum(sigma), jnp.finfo(sigma.dtype).tiny)
  p = sigma / total + epsilon
  return jnp.exp(-jnp.sum(p * jnp.log(p)))


def alignment(x: jax.Array, y: jax.Array, *, alpha: float = 2) -> jax.Array:
  """Alignment of positive pairs: `mean_i ‖x̂_i − ŷ_i‖₂^α` (lower is better).

  `x` and `y` are L2-normalised here (with `numerics.l2_normalize`'s
  epsilon), so raw features may be passed; the value lies in `[0, 2^α]`.
  The power is applied to the squared distance as `(‖·‖²)^(α/2)`, which
  equals the reference's `norm.pow(alpha)`.

  Args:
    x: `[N, D]` features of the first view, any float dtype.
    y: `[N, D]` features of the second view; row i pairs with row i of `x`.
    alpha: the exponent α > 0, a static Python number (2 in the paper).

  Returns:
    Scalar float32 alignment.

  References:
    Wang & Isola, "Understanding Contrastive Representation Learning through
    Alignment and Uniformity on the Hypersphere", ICML 2020, eq. 4;
    SsnL/align_uniform `align_uniform/__init__.py:align_loss`.
  """
  _check_matrix('x', x)
  if x.shape != y.shape:
    raise ValueError(f'x and y must have the same shape, got {tuple(x.shape)}'
                     f' and {tuple(y.shape)}.')
  sq = jnp.sum(jnp.square(numerics.l2_normalize(x) -
                          numerics.l2_normalize(y)), axis=1)
  return jnp.mean(sq ** (alpha / 2))


def uniformity(x: jax.Array, *, t: float = 2,
               block_size: int = 512) -> jax.Array:
  """Uniformity: `log mean_{i<j} exp(−t ‖x̂_i − x̂_j‖₂²)` (lower is better).

  The mean runs over all `N (N − 1) / 2` distinct pairs, as the reference's
  `torch.pdist`. `x` is L2-normalised here, and the squared distance of
  unit vectors is computed as `max(2 − 2 x̂_i·x̂_j, 0)`: the clip removes
  the small negative values float32 rounding gives for near-identical
  points, so the value lies in `[−4t, 0]` (0 for a collapsed `x`).

  Memory: the pairs are visited in row blocks with `lax.map`; a step holds
  a `[block_size, N]` float32 block of similarities and its mask, so peak
  temporaries are O(block_size · N) rather than O(N²) (512 × 25,600 floats
  ≈ 52 MB per array, instead of 2.6 GB for the full matrix). Each block
  gives a masked log-sum-exp (`-inf` when it has no pair `j > i`); the
  blocks are combined by a final log-sum-exp, so no exponential overflows
  or underflows for any `t`.

  Args:
    x: `[N, D]` features, `N >= 2`, any float dtype.
    t: the temperature t > 0, a static Python number (2 in the paper).
    block_size: rows per block (clipped to `N`); need not divide `N`.

  Returns:
    Scalar float32 uniformity.

  References:
    Wang & Isola, "Understanding Contrastive Representation Learning through
    Alignment and Uniformity on the Hypersphere", ICML 2020, eq. 5;
    SsnL/align_uniform `align_uniform/__init__.py:uniform_loss`.
  """
  _check_matrix('x', x)
  n = x.shape[0]
  if n < 2:
    raise ValueError(f'uniformity needs at least 2 rows, got {n}.')
  if block_size < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}.')
  block_size = min(block_size, n)
  num_blocks = -(-n // block_size)
  h = numerics.l2_normalize(x)
  padded = jnp.pad(h, ((0, num_blocks * block_size - n), (0, 0)))
  cols = jnp.arange(n)

  def block_lse(start):
    rows = jax.lax.dynamic_slice_in_dim(padded, start, block_size)
    sq_dist = jnp.maximum(2.0 - 2.0 * numerics.dot_t(rows, h), 0.0)
    # Padded rows have index >= n, so no column j < n is above them.
    upper = cols[None, :] > (start + jnp.arange(block_size))[:, None]
    return jax.nn.logsumexp(-t * sq_dist, where=upper)

  block_lses = jax.lax.map(block_lse, jnp.arange(num_blocks) * block_size)
  return jax.nn.logsumexp(block_lses) - math.log(n * (n - 1) / 2)
