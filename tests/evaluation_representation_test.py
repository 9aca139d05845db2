"""Tests for jaxssl.evaluation.representation (RankMe, alignment, uniformity).

Expected values come from float64 NumPy implementations written from the
formulas (RankMe eq. 1 with `np.linalg.svd`; explicit pairwise distances
over `np.triu_indices` for uniformity, not the `2 − 2a·b` identity used by
the code). Every function runs under `jax.jit`.

Float32 tolerances are derived from the unit roundoff `U = 2**-24`: a dot
product or sum of `m` terms bounded by 1 in magnitude carries an absolute
error of at most about `m·U`, which the bounds below scale by the size of
each computation, with a margin of 2.
"""

import functools
import math

import jax
import numpy as np
import pytest

from jaxssl.evaluation import representation

U = 2.0 ** -24  # float32 unit roundoff


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_rankme(z, epsilon=1e-7):
  """RankMe eq. 1 in float64; also returns p for the tolerance."""
  sigma = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
  p = sigma / sigma.sum() + epsilon
  return np.exp(-np.sum(p * np.log(p))), p


def np_alignment(x, y, alpha):
  return np.mean(np.linalg.norm(_np_normalize(x) - _np_normalize(y),
                                axis=1) ** alpha)


def np_uniformity(x, t):
  """torch.pdist semantics: all pairs i < j, explicit differences."""
  h = _np_normalize(x)
  i, j = np.triu_indices(len(h), k=1)
  sq = np.sum((h[i] - h[j]) ** 2, axis=1)
  return np.log(np.mean(np.exp(-t * sq)))


def _jit(fn, **kwargs):
  return jax.jit(functools.partial(fn, **kwargs))


def _gaussian(seed, n, d, anisotropic=False):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, d))
  if anisotropic:  # a spread spectrum, so RankMe is far from min(n, d)
    z *= np.geomspace(1.0, 1e-2, d)
  return z.astype(np.float32)


# ---------------------------------------------------------------- RankMe


def _rankme_rtol(p):
  # A backward-stable float32 SVD moves each p_k by at most ~min(n, k)·U;
  # d(entropy) = −Σ (1 + ln p_k) dp_k, and RankMe's relative error equals
  # the entropy's absolute error.
  return 2 * len(p) * (len(p) * U) * (1 + np.max(np.abs(np.log(p))))


@pytest.mark.parametrize('n,k', [(64, 16), (10, 40), (300, 32), (5, 5)])
@pytest.mark.parametrize('scale', [1e-3, 1.0, 1e3])
def test_rankme_matches_float64_formula(n, k, scale):
  z = _gaussian(n * k, n, k, anisotropic=True) * np.float32(scale)
  expected, p = np_rankme(z)
  actual = _jit(representation.rankme)(z)
  assert actual.dtype == np.float32
  np.testing.assert_allclose(float(actual), expected, rtol=_rankme_rtol(p))


def test_rankme_is_not_centred():
  """Raw Z: a constant offset changes RankMe (centring would not)."""
  z = _gaussian(1, 200, 8)
  shifted = z + np.float32(5.0)
  rankme = _jit(representation.rankme)
  expected, p = np_rankme(shifted)
  np.testing.assert_allclose(float(rankme(shifted)), expected,
                             rtol=_rankme_rtol(p))
  assert float(rankme(shifted)) < float(rankme(z)) - 1.0


def test_rankme_uses_only_the_first_max_samples_rows():
  z = _gaussian(2, 120, 12, anisotropic=True)
  tail = np.full((30, 12), np.nan, np.float32)  # must never be read
  capped = _jit(representation.rankme, max_samples=120)(
      np.concatenate([z, tail]))
  expected, p = np_rankme(z)
  np.testing.assert_allclose(float(capped), expected, rtol=_rankme_rtol(p))
  assert float(_jit(representation.rankme, max_samples=None)(z)) == float(
      _jit(representation.rankme)(z))


# For a collapsed Z the SVD's backward error E (‖E‖ ≤ c·U·σ_1, generous
# c = 100) leaves spurious σ_k ≤ 100·U·σ_1 by Weyl, so each spurious p_k is
# at most q = 100·U + 1e-7 < 1e-5 and adds at most q·ln(1/q) to the entropy.
# The dominant p_1 ≤ 1 + ε contributes at least −ε, so RankMe ≥ 1 − 1e-6.
def _spurious_entropy_bound(num_spurious):
  q = 1e-5
  return num_spurious * q * math.log(1 / q)


@pytest.mark.parametrize('kind', ['identical_rows', 'rank_one'])
def test_rankme_of_collapsed_embeddings_is_one(kind):
  rng = np.random.default_rng(3)
  v = rng.normal(size=(1, 32))
  weights = np.ones((100, 1)) if kind == 'identical_rows' else rng.normal(
      size=(100, 1))
  z = (weights * v).astype(np.float32)
  value = float(_jit(representation.rankme)(z))
  assert 1 - 1e-6 <= value <= math.exp(_spurious_entropy_bound(31))


def test_rankme_of_zero_embeddings_is_finite_and_one():
  value = float(_jit(representation.rankme)(np.zeros((10, 4), np.float32)))
  # p_k = ε for all 4 values: exp(−4ε ln ε) ≈ 1 + 6.4e-6.
  np.testing.assert_allclose(value, math.exp(-4e-7 * math.log(1e-7)),
                             rtol=4 * U)


@pytest.mark.parametrize('rank', [2, 5])
def test_rankme_of_rank_r_embeddings_is_at_most_r(rank):
  rng = np.random.default_rng(rank)
  z = (rng.normal(size=(200, rank)) @ rng.normal(size=(rank, 24))).astype(
      np.float32)
  value = float(_jit(representation.rankme)(z))
  # Entropy ≤ ln(rank) over the r true values plus the spurious bound.
  assert value <= rank * math.exp(_spurious_entropy_bound(24 - rank))
  assert value > 1.5  # and clearly more than collapsed


def test_rankme_of_isotropic_gaussian_is_close_to_k():
  n, k, t = 4096, 32, 4.0
  z = _gaussian(4, n, k)
  # Davidson–Szarek: σ(Z) ⊂ [√n − √k − t, √n + √k + t] except with
  # probability ≤ 2·exp(−t²/2) ≈ 7e-4. Shannon entropy ≥ Rényi-2 entropy,
  # so exp(H) ≥ 1/Σp² = (Σσ)²/Σσ² ≥ k·4ab/(a + b)² (Pólya–Szegő for
  # σ ∈ [a, b]); ε perturbs H by ≤ k·ε·(1 + ln(1/ε)) < 1e-4.
  a = math.sqrt(n) - math.sqrt(k) - t
  b = math.sqrt(n) + math.sqrt(k) + t
  lower = k * 4 * a * b / (a + b) ** 2 * (1 - 1e-4)
  value = float(_jit(representation.rankme)(z))
  assert lower <= value <= k * (1 + 1e-4)
  assert lower > 0.95 * k  # the bound itself is informative


def test_rankme_rejects_bad_arguments():
  with pytest.raises(ValueError, match='2-D'):
    representation.rankme(np.zeros((4,), np.float32))
  with pytest.raises(ValueError, match='max_samples'):
    representation.rankme(np.ones((4, 2), np.float32), max_samples=0)


# ------------------------------------------------------------- alignment


@pytest.mark.parametrize('n,d', [(64, 8), (7, 3), (33, 128)])
@pytest.mark.parametrize('alpha', [1, 2, 3])
def test_alignment_matches_float64_formula(n, d, alpha):
  x = _gaussian(n, n, d)
  y = (x + _gaussian(n + 1, n, d)).astype(np.float32)
  # Normalisation and the squared distance each err by ≲ (d + 6)·U
  # relative, scaled by α/2 under the power; the mean adds ≤ n·U.
  rtol = 2 * (alpha * (d + 6) + n) * U
  actual = _jit(representation.alignment, alpha=alpha)(x, y)
  assert actual.dtype == np.float32
  np.testing.assert_allclose(float(actual), np_alignment(x, y, alpha),
                             rtol=rtol)


def test_alignment_normalises_inside():
  x, y = _gaussian(5, 16, 6), _gaussian(6, 16, 6)
  align = _jit(representation.alignment)
  scales = np.random.default_rng(7).uniform(0.1, 10, size=(16, 1))
  np.testing.assert_allclose(float(align(x * np.float32(3), y * scales)),
                             float(align(x, y)), rtol=2 * (2 * 12 + 16) * U)


def test_alignment_of_identical_and_antipodal_pairs():
  x = _gaussian(8, 20, 5)
  align = _jit(representation.alignment, alpha=2)
  # XLA may round the two normalisations differently (it does on CPU), so
  # x̂ − ŷ is 0 up to 2(d + 6)·U per unit vector, squared.
  assert 0.0 <= float(align(x, x)) <= (2 * 11 * U) ** 2
  # ‖x̂ − (−x̂)‖² = 4 up to the normalisation error (≲ (d + 6)·U relative).
  np.testing.assert_allclose(float(align(x, -x)), 4.0, rtol=2 * 11 * U)


def test_alignment_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='same shape'):
    representation.alignment(np.ones((4, 2), np.float32),
                             np.ones((3, 2), np.float32))


# ------------------------------------------------------------ uniformity


def _uniformity_atol(n, d, t):
  # |error of 2 − 2a·b| ≤ 2(d + 8)·U for unit a, b; log-mean-exp is
  # 1-Lipschitz in its exponents (scaled by t); summing n terms per row and
  # the final log-sum-exp add ≤ n·U.
  return 2 * (2 * t * (d + 8) + n) * U


@pytest.mark.parametrize('n,d,block_size', [
    (7, 3, 3), (50, 8, 16), (33, 5, 64), (12, 4, 1), (40, 16, 40)])
@pytest.mark.parametrize('t', [0.5, 2.0, 10.0])
def test_uniformity_matches_float64_pdist(n, d, block_size, t):
  x = _gaussian(n * d, n, d)
  actual = _jit(representation.uniformity, t=t, block_size=block_size)(x)
  assert actual.dtype == np.float32
  np.testing.assert_allclose(float(actual), np_uniformity(x, t),
                             rtol=0, atol=_uniformity_atol(n, d, t))


def test_uniformity_does_not_depend_on_block_size():
  x = _gaussian(9, 45, 6)
  values = [float(_jit(representation.uniformity, block_size=b)(x))
            for b in (1, 4, 7, 45, 512)]
  np.testing.assert_allclose(values, values[0], rtol=0,
                             atol=_uniformity_atol(45, 6, 2.0))


def test_uniformity_normalises_inside():
  x = _gaussian(10, 30, 4)
  scales = np.random.default_rng(11).uniform(0.1, 10, size=(30, 1))
  uniform = _jit(representation.uniformity, block_size=8)
  np.testing.assert_allclose(float(uniform(x * scales)), float(uniform(x)),
                             rtol=0, atol=_uniformity_atol(30, 4, 2.0))


def test_uniformity_of_collapsed_points_is_zero_and_spread_is_lower():
  v = _gaussian(12, 1, 16)
  collapsed = np.repeat(v, 64, axis=0) * np.linspace(
      0.5, 2.0, 64, dtype=np.float32)[:, None]  # one direction, any norm
  uniform = _jit(representation.uniformity, block_size=24)
  value = float(uniform(collapsed))
  # All distances are 0 up to 2(d + 8)·U (clipped at 0 from below).
  assert abs(value) <= _uniformity_atol(64, 16, 2.0)
  spread = float(uniform(_gaussian(13, 64, 16)))
  # Random directions in 16-D have ‖x̂_i − x̂_j‖² ≈ 2, so about −4.
  assert spread < -3.0
  assert spread < value


def test_uniformity_is_bounded_below_by_antipodal_pairs():
  """Two antipodal points: the single pair has ‖·‖² = 4, so −4t."""
  x = np.array([[1.0, 2.0], [-1.0, -2.0]], np.float32)
  np.testing.assert_allclose(
      float(_jit(representation.uniformity, t=2.0)(x)), -8.0,
      rtol=0, atol=_uniformity_atol(2, 2, 2.0))


def test_uniformity_rejects_bad_arguments():
  with pytest.raises(ValueError, match='at least 2 rows'):
    representation.uniformity(np.ones((1, 3), np.float32))
  with pytest.raises(ValueError, match='block_size'):
    representation.uniformity(np.ones((4, 3), np.float32), block_size=0)
