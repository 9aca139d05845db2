"""The fast linear protocol: top-k, the classifier fit."""

import jax
import numpy as np
import pytest

from helpers import load_config
from jaxssl.evaluation import linear


@pytest.mark.parametrize('k, expected', [(1, 0.25), (2, 0.75), (3, 1.0)])
def test_topk_accuracy(k, expected):
  logits = np.array([[3., 2., 1.], [1., 3., 2.], [3., 1., 2.], [1., 2., 3.]])
  labels = np.array([0, 2, 1, 1])  # ranks of the labels: 1, 2, 3, 2
  assert linear.topk_accuracy(logits, labels, k) == expected


def test_linear_classifier_separates_separable_data():
  rng = np.random.RandomState(0)
  centers = rng.normal(size=(4, 8)) * 4
  labels = rng.randint(0, 4, size=2000)
  x = (centers[labels] + rng.normal(size=(2000, 8))).astype(np.float32)
  le = load_config('simclr_tiny').linear_eval
  params = linear.train_linear_classifier(x[:1500], labels[:1500], 4, le,
                                            seed=0)
  logits = x[1500:] @ np.asarray(params['kernel']) + np.asarray(
      params['bias'])
  assert linear.topk_accuracy(logits, labels[1500:], 1) > 0.97


def test_classifier_fit_is_deterministic():
  rng = np.random.RandomState(1)
  x = rng.normal(size=(300, 5)).astype(np.float32)
  y = rng.randint(0, 3, size=300)
  le = load_config('simclr_tiny').linear_eval
  a = linear.train_linear_classifier(x, y, 3, le, seed=7)
  b = linear.train_linear_classifier(x, y, 3, le, seed=7)
  jax.tree.map(np.testing.assert_array_equal, a, b)
