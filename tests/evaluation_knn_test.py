"""Tests for jaxssl.evaluation.knn, the weighted cosine kNN classifier.

Expected values come from a float64 NumPy implementation of the InstDisc /
DINO formula over the full similarity matrix (stable descending argsort, so
ties go to the lower index, as the module documents).
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import assert_close_8_vs_1
from jaxssl.evaluation import knn


def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.maximum(np.sum(x * x, axis=1, keepdims=True), 1e-12))


def np_knn(queries, bank, labels, k, tau, num_classes):
  """`(top sims [Q, k], top labels [Q, k], scores [Q, C], all sims [Q, N])`."""
  sims = np_normalize(queries) @ np_normalize(bank).T
  order = np.argsort(-sims, axis=1, kind='stable')[:, :k]
  top = np.take_along_axis(sims, order, axis=1)
  scores = np.zeros((len(queries), num_classes))
  for i in range(len(queries)):
    np.add.at(scores[i], labels[order[i]], np.exp(top[i] / tau))
  return top, labels[order], scores, sims


def np_accuracy(scores, targets):
  """(top-1, top-5) as fractions; top-5 ranks min(5, C) classes."""
  top = min(5, scores.shape[1])
  ranked = np.argsort(-scores, axis=1, kind='stable')[:, :top]
  hits = ranked == targets[:, None]
  return np.mean(hits[:, 0]), np.mean(np.any(hits, axis=1))


def assert_unambiguous(sims, k, scores=None):
  """The test's premise: no float32-sized near-ties decide the answer."""
  ordered = -np.sort(-sims, axis=1)
  if k < sims.shape[1]:
    assert np.min(ordered[:, k - 1] - ordered[:, k]) > 1e-5
  if scores is not None:
    for row in scores:
      voted = np.sort(row[row > 0])
      assert np.all(np.diff(voted) > 1e-4 * voted[1:])


def _data(seed, n, q, d, num_classes, spread=0.0):
  """Random features (class centres scaled by `spread`) and labels."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, d))
  y_bank = rng.integers(0, num_classes, n)
  y_query = rng.integers(0, num_classes, q)
  bank = spread * centres[y_bank] + rng.normal(size=(n, d))
  queries = spread * centres[y_query] + rng.normal(size=(q, d))
  return (bank.astype(np.float32), y_bank.astype(np.int32),
          queries.astype(np.float32), y_query.astype(np.int32))


def _global(**kwargs):
  """Jitted global-view `(sims, labels, scores)`."""
  def run(queries, bank, labels, mask=None):
    neighbours = knn.knn_neighbors(
        queries, bank, labels, k=kwargs['k'],
        block_size=kwargs['block_size'], bank_mask=mask)
    return (*neighbours, knn.knn_scores(queries, bank, labels,
                                        bank_mask=mask, **kwargs))
  return jax.jit(run)


def _sharded(mesh, **kwargs):
  """Jitted shard_map of `(sims, labels, scores)`: bank over 'data'."""
  def run(queries, bank, labels, mask):
    neighbours = knn.knn_neighbors(
        queries, bank, labels, k=kwargs['k'],
        block_size=kwargs['block_size'], bank_mask=mask, axis_name='data')
    return (*neighbours, knn.knn_scores(queries, bank, labels, bank_mask=mask,
                                        axis_name='data', **kwargs))
  return jax.jit(jax.shard_map(
      run, mesh=mesh, in_specs=(P(), P('data'), P('data'), P('data')),
      out_specs=P()))


@pytest.mark.parametrize('k,tau,block_size', [
    (5, 0.07, 8),    # 8 does not divide 37
    (20, 0.1, 8),    # k > block_size
    (37, 0.5, 64),   # k = N; block_size > N
    (3, 0.07, 1),
])
def test_matches_numpy(k, tau, block_size):
  bank, y_bank, queries, _ = _data(k, 37, 9, 6, 5)
  top, top_labels, scores, sims = np_knn(queries, bank, y_bank, k, tau, 5)
  assert_unambiguous(sims, k)
  out = _global(k=k, temperature=tau, num_classes=5, block_size=block_size)(
      queries, bank, y_bank)
  np.testing.assert_allclose(out[0], top, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(out[1], top_labels)
  np.testing.assert_allclose(out[2], scores, rtol=1e-5, atol=0)


def test_blocked_equals_unblocked():
  bank, y_bank, queries, _ = _data(1, 50, 7, 5, 4)
  kwargs = dict(k=7, temperature=0.07, num_classes=4)
  blocked = _global(block_size=3, **kwargs)(queries, bank, y_bank)
  whole = _global(block_size=50, **kwargs)(queries, bank, y_bank)
  np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(blocked[1], whole[1])
  np.testing.assert_allclose(blocked[2], whole[2], rtol=1e-6, atol=0)


@pytest.mark.parametrize('n', [40, 37])
def test_sharded_equals_single_device(mesh8, mesh1, n):
  """Bank padded to 40 rows (masked); 5 rows a device, k = 7 > 5."""
  bank, y_bank, queries, _ = _data(n, n, 6, 5, 4)
  pad = 40 - n
  padded = (np.pad(bank, ((0, pad), (0, 0))), np.pad(y_bank, (0, pad)),
            np.arange(40) < n)
  kwargs = dict(k=7, temperature=0.07, num_classes=4, block_size=2)
  out8 = _sharded(mesh8, **kwargs)(queries, *padded)
  out1 = _sharded(mesh1, **kwargs)(queries, *padded)
  assert_close_8_vs_1(out8[0], out1[0])
  np.testing.assert_array_equal(out8[1], out1[1])
  assert_close_8_vs_1(out8[2], out1[2])
  np.testing.assert_array_equal(np.argsort(-out8[2], axis=1, kind='stable'),
                                np.argsort(-out1[2], axis=1, kind='stable'))
  _, top_labels, scores, sims = np_knn(queries, bank, y_bank, 7, 0.07, 4)
  assert_unambiguous(sims, 7)
  np.testing.assert_array_equal(out8[1], top_labels)
  np.testing.assert_allclose(out8[2], scores, rtol=1e-5, atol=0)


def test_masked_rows_never_vote():
  """Masked rows equal to the queries (similarity 1) with an unused label."""
  bank, y_bank, queries, _ = _data(2, 20, 4, 6, 3)
  y_bank = np.minimum(y_bank, 2)  # class 3 is only on the masked rows
  bank_pad = np.concatenate([bank[:10], queries, bank[10:]])
  y_pad = np.concatenate([y_bank[:10], np.full(4, 3, np.int32), y_bank[10:]])
  mask = np.arange(24) < 24
  mask[10:14] = False
  kwargs = dict(k=5, temperature=0.07, num_classes=4, block_size=6)
  out = _global(**kwargs)(queries, bank_pad, y_pad, mask)
  clean = _global(**kwargs)(queries, bank, y_bank, np.ones(20, bool))
  assert np.all(np.asarray(out[2])[:, 3] == 0)
  np.testing.assert_array_equal(out[1], clean[1])
  np.testing.assert_allclose(out[2], clean[2], rtol=1e-6, atol=0)


def test_driver_padding_never_votes(mesh8):
  """9 bank rows on 8 devices, 1-row blocks: 7 zero padding rows whose
  similarity 0 beats every real one (all about -1); a padding vote (label
  -1) would leave all scores 0, hence class 0, at k = 1."""
  rng = np.random.default_rng(3)
  bank = np.concatenate([-np.ones((9, 1)), 0.1 * rng.normal(size=(9, 3))], 1)
  queries = np.concatenate([np.ones((5, 1)), 0.1 * rng.normal(size=(5, 3))], 1)
  result = knn.knn_accuracy(
      bank, np.ones(9, np.int32), queries, np.ones(5, np.int32), mesh=mesh8,
      num_classes=2, ks=(1, 9), temperature=0.07, block_size=1)
  assert result == {'knn_k1_top1': 1.0, 'knn_k1_top5': 1.0,
                    'knn_k9_top1': 1.0, 'knn_k9_top5': 1.0}


def test_accuracy_matches_numpy(mesh8, mesh1):
  """45 bank rows (padded on 8 devices), 23 queries in blocks of 8; the
  top-10 neighbours are found once and k = 3 uses the first 3."""
  bank, y_bank, queries, y_query = _data(7, 45, 23, 8, 10, spread=0.8)
  kwargs = dict(num_classes=10, ks=(3, 10), temperature=0.1, block_size=4,
                query_block=8)
  result8 = knn.knn_accuracy(bank, y_bank, queries, y_query, mesh=mesh8,
                             **kwargs)
  result1 = knn.knn_accuracy(bank, y_bank, queries, y_query, mesh=mesh1,
                             **kwargs)
  assert result8 == result1
  expected = {}
  for k in (3, 10):
    _, _, scores, sims = np_knn(queries, bank, y_bank, k, 0.1, 10)
    assert_unambiguous(sims, k, scores)
    top1, top5 = np_accuracy(scores, y_query)
    expected[f'knn_k{k}_top1'], expected[f'knn_k{k}_top5'] = top1, top5
  assert result8 == pytest.approx(expected, rel=1e-12)
  # Premise: non-trivial figures, and k = 3 and k = 10 rank differently.
  assert 0 < expected['knn_k3_top1'] < expected['knn_k3_top5'] < 1
  assert expected['knn_k3_top1'] != expected['knn_k10_top1']


def test_separable_set_is_perfect(mesh8):
  """4 well-separated classes (top-5 ranks all 4 classes)."""
  rng = np.random.default_rng(5)
  y_bank, y_query = np.repeat(np.arange(4), 6), np.arange(8) % 4
  bank = np.eye(4)[y_bank] + 0.05 * rng.normal(size=(24, 4))
  queries = np.eye(4)[y_query] + 0.05 * rng.normal(size=(8, 4))
  result = knn.knn_accuracy(bank, y_bank, queries, y_query, mesh=mesh8,
                            num_classes=4, ks=(1, 6))
  assert set(result.values()) == {1.0}


@pytest.mark.parametrize('change,message', [
    (dict(ks=(20,)), 'k=20 exceeds the bank size 10; k must be between 1'),
    (dict(ks=(0,)), 'k=0 must be a positive integer'),
    (dict(temperature=0.0), 'temperature=0.0 must be positive'),
    (dict(num_classes=2), r'train_labels span \[0, 2\]; must be in'),
])
def test_bad_arguments_raise_one_line(change, message):
  """Raised before anything is placed or compiled (mesh=None)."""
  bank, y_bank, queries, y_query = _data(6, 10, 3, 4, 3)
  y_bank[0] = 2
  kwargs = {**dict(mesh=None, num_classes=3, ks=(5,)), **change}
  with pytest.raises(ValueError, match=message) as info:
    knn.knn_accuracy(bank, y_bank, queries, y_query, **kwargs)
  assert '\n' not in str(info.value)


def test_pure_function_rejects_k_above_bank_at_trace_time():
  bank, y_bank, queries, _ = _data(7, 10, 3, 4, 3)
  fn = jax.jit(functools.partial(knn.knn_scores, k=11, temperature=0.07,
                                 num_classes=3, block_size=4))
  with pytest.raises(ValueError, match='k=11 exceeds the bank size 10'):
    fn(queries, bank, y_bank)


@pytest.mark.parametrize('mesh_name', ['mesh8', 'mesh1'])
def test_exact_ties_go_to_the_lower_row_and_the_lower_class(request,
                                                            mesh_name):
  # Rows 3 and 11 (on different devices of 8) are the same vector, labelled
  # 1 and 2, and the query is that vector: both neighbours are at cosine 1.
  mesh = request.getfixturevalue(mesh_name)
  rng = np.random.default_rng(5)
  bank = rng.normal(size=(16, 4)).astype(np.float32)
  bank[11] = bank[3]
  labels = rng.integers(3, 6, size=16).astype(np.int32)
  labels[3], labels[11] = 1, 2
  query = bank[3:4]
  run = functools.partial(knn.knn_accuracy, bank, labels, query, mesh=mesh,
                          num_classes=6, temperature=0.07, block_size=2)
  # k = 1: row 3 (label 1) comes first; k = 2: classes 1 and 2 tie on
  # their votes, and class 1 (the lower) ranks first.
  assert run(np.array([1], np.int32), ks=(1, 2)) == {
      'knn_k1_top1': 1.0, 'knn_k1_top5': 1.0, 'knn_k2_top1': 1.0,
      'knn_k2_top5': 1.0}
  # (Top-5 of label 2 holds at k = 1 too: the classes without votes tie
  # at 0 and rank by index, 0 and 2 before 3, 4, 5.)
  assert run(np.array([2], np.int32), ks=(1, 2)) == {
      'knn_k1_top1': 0.0, 'knn_k1_top5': 1.0, 'knn_k2_top1': 0.0,
      'knn_k2_top5': 1.0}
