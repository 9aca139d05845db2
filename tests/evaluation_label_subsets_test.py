"""Tests for jaxssl.evaluation.label_subsets.

No index list is hard-coded: expected subsets come from the documented
rule (per-class counts) and from invariances of the draw (determinism,
nesting, interleaving and appending examples, other processes).
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxssl.evaluation import label_subsets

# Deliberately imbalanced, with ties of the rounding rule at 1% and 10%.
CLASS_SIZES = {0: 1, 1: 3, 2: 25, 3: 49, 4: 50, 5: 250, 6: 251, 9: 1000}


def _labels(seed=0, sizes=None):
  """Labels with `sizes[c]` examples of class c, in a shuffled order."""
  sizes = CLASS_SIZES if sizes is None else sizes
  labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
  return np.random.default_rng(seed).permutation(labels)


def _per_class(labels, indices):
  return label_subsets.subset_summary(labels, indices)['per_class']


def test_subset_is_deterministic_and_ignores_global_state():
  labels = _labels()
  np.random.seed(1)
  first = label_subsets.balanced_subset(labels, 0.1, seed=3)
  np.random.seed(2)
  np.random.default_rng().normal(size=10)
  second = label_subsets.balanced_subset(labels, 0.1, seed=3)
  np.testing.assert_array_equal(first, second)
  assert first.dtype == np.int64
  assert np.all(np.diff(first) > 0)  # sorted and unique
  assert 0 <= first[0] and first[-1] < len(labels)


def test_subset_is_identical_in_another_process():
  labels = _labels()
  code = ('import sys, numpy as np\n'
          'from jaxssl.evaluation import label_subsets\n'
          'labels = np.array(sys.argv[1].split(","), np.int64)\n'
          'print(",".join(map(str, label_subsets.balanced_subset('
          'labels, 0.1, seed=5))))\n')
  env = dict(os.environ, PYTHONHASHSEED='123')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, '-c', code, ','.join(map(str, labels))],
      env=env, cwd=root, capture_output=True, text=True, check=True).stdout
  here = label_subsets.balanced_subset(labels, 0.1, seed=5)
  np.testing.assert_array_equal(np.array(out.split(','), np.int64), here)


@pytest.mark.parametrize('fraction', [0.01, 0.1, 0.5, 0.9])
def test_per_class_counts_follow_the_rounding_rule(fraction):
  labels = _labels()
  indices = label_subsets.balanced_subset(labels, fraction, seed=0)
  expected = {c: max(1, math.floor(fraction * n + 0.5))
              for c, n in CLASS_SIZES.items()}
  assert _per_class(labels, indices) == expected
  assert len(indices) == sum(expected.values())


def test_rounding_rule_ties_and_minimum():
  assert label_subsets.class_count(0.01, 250) == 3  # 2.5 rounds up
  assert label_subsets.class_count(0.1, 25) == 3  # 2.5 rounds up
  assert label_subsets.class_count(0.5, 3) == 2  # 1.5 rounds up
  assert label_subsets.class_count(0.01, 251) == 3  # 2.51
  assert label_subsets.class_count(0.01, 249) == 2  # 2.49
  assert label_subsets.class_count(0.01, 49) == 1  # 0.49 -> 0 -> at least 1
  assert label_subsets.class_count(0.01, 1) == 1
  assert label_subsets.class_count(1.0, 251) == 251


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_subsets_are_nested_for_one_seed(seed):
  labels = _labels(seed)
  subsets = [label_subsets.balanced_subset(labels, f, seed=seed)
             for f in (0.01, 0.1, 0.5, 1.0)]
  for small, large in zip(subsets, subsets[1:]):
    assert len(small) < len(large)
    assert np.all(np.isin(small, large))


def test_fraction_one_returns_every_index():
  labels = _labels()
  np.testing.assert_array_equal(label_subsets.balanced_subset(labels, 1.0),
                                np.arange(len(labels)))
  np.testing.assert_array_equal(label_subsets.balanced_subset(labels, 1),
                                np.arange(len(labels)))


def test_seed_changes_the_subset_but_not_its_counts():
  labels = _labels()
  a = label_subsets.balanced_subset(labels, 0.1, seed=0)
  b = label_subsets.balanced_subset(labels, 0.1, seed=1)
  assert not np.array_equal(a, b)
  assert _per_class(labels, a) == _per_class(labels, b)


def test_draws_are_one_permutation_per_class_in_label_order():
  """The documented draw, written as an independent loop."""
  labels = _labels(4)
  rng = np.random.Generator(np.random.PCG64(7))
  expected = []
  for c in sorted(CLASS_SIZES):
    members = np.flatnonzero(labels == c)
    keep = max(1, math.floor(0.1 * len(members) + 0.5))
    expected.extend(members[rng.permutation(len(members))[:keep]])
  np.testing.assert_array_equal(
      label_subsets.balanced_subset(labels, 0.1, seed=7), np.sort(expected))


def _class_ranks(labels, indices):
  """Each chosen example as (label, rank among its class in index order)."""
  rank = np.zeros(len(labels), np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank[members] = np.arange(len(members))
  return {(int(labels[i]), int(rank[i])) for i in indices}


def test_choice_depends_only_on_class_and_within_class_rank():
  """Interleaving the classes differently, keeping each class's order,
  selects the same (class, rank) examples."""
  blocked = np.sort(_labels())
  interleaved = _labels(9)
  a = label_subsets.balanced_subset(blocked, 0.1, seed=2)
  b = label_subsets.balanced_subset(interleaved, 0.1, seed=2)
  assert _class_ranks(blocked, a) == _class_ranks(interleaved, b)
  assert not np.array_equal(a, b)  # the positions themselves differ


def test_appending_a_new_largest_class_keeps_existing_choices():
  labels = _labels()
  extended = np.concatenate([labels, np.full(40, 20)])
  a = label_subsets.balanced_subset(labels, 0.1, seed=6)
  b = label_subsets.balanced_subset(extended, 0.1, seed=6)
  np.testing.assert_array_equal(b[b < len(labels)], a)
  assert np.sum(b >= len(labels)) == 4


@pytest.mark.parametrize('dtype', [np.int32, np.int64, np.uint16])
def test_label_dtype_and_container_do_not_matter(dtype):
  labels = _labels()
  expected = label_subsets.balanced_subset(labels, 0.1, seed=8)
  np.testing.assert_array_equal(
      label_subsets.balanced_subset(labels.astype(dtype), 0.1, seed=8),
      expected)
  np.testing.assert_array_equal(
      label_subsets.balanced_subset(labels.tolist(), 0.1, seed=8), expected)


@pytest.mark.parametrize('fraction', [0, 0.0, -0.1, 1.5, 1.0000001,
                                      float('nan'), float('inf'), '0.1',
                                      None, True])
def test_bad_fraction_raises_one_line(fraction):
  with pytest.raises(ValueError) as error:
    label_subsets.balanced_subset(_labels(), fraction)
  message = str(error.value)
  assert '\n' not in message
  assert repr(fraction) in message and '(0, 1]' in message


@pytest.mark.parametrize('labels', [np.zeros((4, 2), np.int64),
                                    np.array([0.0, 1.0])])
def test_bad_labels_raise(labels):
  with pytest.raises(ValueError, match='1-D integer'):
    label_subsets.balanced_subset(labels, 0.1)


def test_empty_labels_give_an_empty_subset():
  indices = label_subsets.balanced_subset(np.zeros((0,), np.int64), 0.1)
  assert indices.shape == (0,) and indices.dtype == np.int64


def test_subset_summary_counts_every_class():
  labels = np.array([3, 1, 3, 3, 7, 1])
  summary = label_subsets.subset_summary(labels, np.array([0, 2, 5]))
  assert summary == {'total': 3, 'per_class': {1: 1, 3: 2, 7: 0}}
  assert all(type(k) is int and type(v) is int
             for k, v in summary['per_class'].items())
