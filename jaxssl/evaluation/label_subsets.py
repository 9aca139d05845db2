"""Class-balanced labelled subsets for semi-supervised fine-tuning.

The 1% / 10% protocols of SimCLR, SwAV, Barlow Twins and VICReg use fixed
ImageNet lists; on other datasets the closest convention is a per-class
balanced subset drawn with a fixed seed (fixmatch `create_split.py`,
solo-learn's stratified split). `balanced_subset` draws one such subset in
NumPy on the host, identically on every process, so each host can compute
it without communication.
"""

import math

import numpy as np


def _check_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer)
                              or labels.size == 0):
    raise ValueError(f'labels must be a 1-D integer array, got shape '
                     f'{labels.shape} and dtype {labels.dtype}.')
  return labels.astype(np.int64)


def _check_fraction(fraction) -> float:
  ok = (isinstance(fraction, (int, float, np.integer, np.floating))
        and not isinstance(fraction, bool) and 0 < fraction <= 1)
  if not ok:
    raise ValueError(f'fraction must be a number in (0, 1], got '
                     f'{fraction!r}.')
  return float(fraction)


def class_count(fraction: float, num_examples: int) -> int:
  """Examples kept from a class of `num_examples` at `fraction`.

  `max(1, floor(fraction * num_examples + 0.5))`: rounding half up in
  float64, at least one per class present, and all of them at fraction 1.
  """
  return max(1, math.floor(_check_fraction(fraction) * num_examples + 0.5))


def balanced_subset(labels: np.ndarray, fraction: float, *,
                    seed: int = 0) -> np.ndarray:
  """Indices of a class-balanced fraction of a labelled set.

  For each class present, in ascending label order, one permutation of
  that class's example indices (in ascending index order) is drawn from a
  single `np.random.Generator(np.random.PCG64(seed))`, and its first
  `class_count(fraction, n_c)` entries are kept:
  `max(1, floor(fraction * n_c + 0.5))`, i.e. rounded half up with at
  least one example per class. The draws depend only on the class sizes,
  never on `fraction`, so for one seed the subsets are nested (the 1%
  subset lies inside the 10% subset), and the result depends only on
  `(labels, fraction, seed)`: identical on every process and run (not on
  NumPy's global state). NumPy keeps `Generator` streams stable in
  practice but does not promise them across versions (NEP 19); pin NumPy
  to reproduce a subset exactly.

  Args:
    labels: `[N]` integer class labels of the full training set, in the
      dataset's fixed example order.
    fraction: the labelled fraction, in (0, 1] (0.01 or 0.1); 1.0 keeps
      every example.
    seed: the subset seed; report results over several seeds (≥ 3).

  Returns:
    `[M]` sorted int64 indices into `labels`.

  Raises:
    ValueError: `fraction` is not a number in (0, 1], or `labels` is not a
      1-D integer array.

  References:
    google-research/fixmatch `scripts/create_split.py` (balanced labelled
    split per seed); solo-learn `solo/data/classification_dataloader.py`
    (stratified `train_test_split` with a fixed seed).
  """
  fraction = _check_fraction(fraction)
  labels = _check_labels(labels)
  rng = np.random.Generator(np.random.PCG64(seed))
  # A stable sort groups each class's indices, ascending, by ascending label.
  by_class = np.argsort(labels, kind='stable')
  _, starts, sizes = np.unique(labels[by_class], return_index=True,
                               return_counts=True)
  chosen = [np.zeros((0,), np.int64)]
  for start, size in zip(starts, sizes):
    members = by_class[start:start + size]
    order = rng.permutation(size)
    chosen.append(members[order[:class_count(fraction, size)]])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def subset_summary(labels: np.ndarray, indices: np.ndarray) -> dict:
  """Counts of a subset for logging.

  Args:
    labels: `[N]` integer labels of the full set.
    indices: `[M]` indices into `labels`, e.g. from `balanced_subset`.

  Returns:
    `{'total': M, 'per_class': {label: count}}` with plain Python ints, for
    every label present in `labels` (0 when the subset has none of it).
  """
  labels = _check_labels(labels)
  picked = labels[np.asarray(indices, np.int64)]
  return {
      'total': int(picked.size),
      'per_class': {int(c): int(np.sum(picked == c))
                    for c in np.unique(labels)},
  }
