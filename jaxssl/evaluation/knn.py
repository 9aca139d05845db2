"""Weighted cosine kNN classifier of a frozen encoder (InstDisc / DINO).

For a query q and the training features f_j (the bank), both L2-normalised,
s_j = q · f_j; over the k bank rows with the largest s_j each neighbour
votes for its label with weight exp(s_j / T):

  score_c = Σ_{j ∈ top-k} 1[y_j = c] · exp(s_j / T),

and the classes ranked by score (descending) give top-1 and top-5.

Memory. The bank is scanned in blocks of `block_size` rows with a running
top-k merge, so a `[Q, N]` similarity matrix is never built: one device
holds its bank shard plus O(Q · (block_size + k)) for the merge. With
`axis_name` the bank is sharded over devices (queries replicated); each
device's top-k is all-gathered (`[P, Q, k]`) and merged once more, so every
device ends with the same global top-k.

Ties. `jax.lax.top_k` puts the lower index first and every merge puts
earlier bank rows (and lower devices) first, so equal similarities resolve
to the lower global bank row, as a stable descending sort would; equal class
scores resolve to the lower class index.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxssl import parallel
from jaxssl.losses import numerics


def _check_k(k, num_rows: int) -> None:
  """Raises a one-line ValueError unless 1 <= k <= num_rows."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'k={k!r} must be a positive integer')
  if k > num_rows:
    raise ValueError(
        f'k={k} exceeds the bank size {num_rows}; k must be between 1 and '
        f'the number of bank (train) features')


def _check_positive(**values) -> None:
  """Raises a one-line ValueError naming the first value that is not > 0."""
  for name, value in values.items():
    if not value > 0:
      raise ValueError(f'{name}={value!r} must be positive')


def _top_k(sims: jax.Array, labels: jax.Array, k: int):
  """The k largest `sims` per row (descending) and their `labels`."""
  top, idx = jax.lax.top_k(sims, k)
  return top, jnp.take_along_axis(labels, idx, axis=1)


def _bank_blocks(bank, bank_labels, bank_mask, block: int):
  """`(features [B, block, D], labels [B, block], valid [B, block])`.

  Rows added to reach a multiple of `block` are zero and invalid.
  """
  n = bank.shape[0]
  valid = jnp.ones((n,), bool) if bank_mask is None else bank_mask.astype(bool)
  pad = -n % block
  if pad:
    bank = jnp.pad(bank, ((0, pad), (0, 0)))
    bank_labels = jnp.pad(bank_labels, (0, pad), constant_values=-1)
    valid = jnp.pad(valid, (0, pad))
  num_blocks = (n + pad) // block
  return (bank.reshape(num_blocks, block, bank.shape[1]),
          bank_labels.astype(jnp.int32).reshape(num_blocks, block),
          valid.reshape(num_blocks, block))


def _scan_bank(q, blocks, k: int, axis_name):
  """This device's top-k `(sims, labels)` `[Q, k]`: a running merge."""
  def step(carry, block):
    features, labels, valid = block
    sims = numerics.dot_t(q, numerics.l2_normalize(features))
    sims = jnp.where(valid[None, :], sims, -jnp.inf)
    labels = jnp.broadcast_to(labels[None, :], sims.shape)
    return _top_k(jnp.concatenate([carry[0], sims], axis=1),
                  jnp.concatenate([carry[1], labels], axis=1), k), None

  init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
          jnp.full((q.shape[0], k), -1, jnp.int32))
  if axis_name is not None:  # The carry varies over devices, as the bank.
    init = jax.lax.pcast(init, (axis_name,), to='varying')
  return jax.lax.scan(step, init, blocks)[0]


def _merge_over_devices(sims, labels, k: int, axis_name: str):
  """The global top-k from every device's `[Q, k]`, replicated."""
  # [P, Q, k] in device order -> [Q, P * k]: lower devices first on ties.
  gathered = [jnp.moveaxis(jax.lax.all_gather(x, axis_name), 0, 1)
              .reshape(x.shape[0], -1) for x in (sims, labels)]
  # Every device now holds the same merge; `pmax` of equal values is exact
  # and types it invariant, so `out_specs=P()` passes `check_vma` (jax 0.10
  # has no public `all_gather_invariant`). It reduces only [Q, k].
  return jax.lax.pmax(_top_k(*gathered, k), axis_name)


def knn_neighbors(queries: jax.Array, bank: jax.Array, bank_labels: jax.Array,
                  *, k: int, block_size: int,
                  bank_mask: jax.Array | None = None,
                  axis_name: str | None = None):
  """Cosine similarities and labels of each query's k nearest bank rows.

  Queries and bank rows are L2-normalised in float32 with an epsilon of
  1e-12 on the squared norm (a zero vector stays zero, similarity 0);
  similarities are float32 products at full precision. The bank is scanned
  in blocks of `block_size` rows (`jax.lax.scan`), merging each block's
  similarities into a running top-k, so memory is O(Q · (block_size + k))
  besides the inputs (plus a padded copy of the bank when `block_size` does
  not divide its rows; `knn_accuracy` pads on the host instead). Invalid
  rows (`bank_mask` False, or that padding) get similarity -inf and are
  never selected while k valid rows exist; should fewer exist, the missing
  neighbours come back as similarity -inf and label -1 (no vote in
  `weighted_votes`).

  Args:
    queries: `[Q, D]` query features, any float dtype; the same on every
      device (replicated) when `axis_name` is given.
    bank: `[N, D]` bank (train) features; per-shard `[N / P, D]` with
      `axis_name`, the global bank otherwise.
    bank_labels: `[N]` int labels of `bank` (per-shard like `bank`).
    k: number of neighbours, a static int in [1, global bank rows].
    block_size: bank rows per scan step (clamped to the local bank size).
    bank_mask: optional `[N]` bool, False for padding rows (per-shard like
      `bank`); all rows are valid when None.
    axis_name: the mesh axis the bank is sharded over, inside
      `jax.shard_map` with `in_specs=(P(), P(axis), P(axis), P(axis))` and
      `out_specs=P()`; None for the global view.

  Returns:
    `(sims [Q, k] float32, labels [Q, k] int32)`: the global top-k sorted by
    decreasing similarity (ties: lower bank row first), replicated across
    `axis_name`.

  Raises:
    ValueError: k is not in [1, global bank rows] or block_size < 1 (at
      trace time, so before any compile).

  References:
    Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination", CVPR 2018 (`lemniscate.pytorch` `test.py:kNN`); Caron et
    al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV
    2021 (`dino` `eval_knn.py:knn_classifier`).
  """
  n = bank.shape[0]
  _check_k(k, n * numerics.axis_size(axis_name))
  _check_positive(block_size=block_size)
  blocks = _bank_blocks(bank, bank_labels, bank_mask, min(block_size, n))
  sims, labels = _scan_bank(numerics.l2_normalize(queries), blocks, k,
                            axis_name)
  if axis_name is None:
    return sims, labels
  return _merge_over_devices(sims, labels, k, axis_name)


def weighted_votes(sims: jax.Array, labels: jax.Array, *, temperature: float,
                   num_classes: int) -> jax.Array:
  """Class scores Σ_j 1[labels_j = c] · exp(sims_j / T) over the neighbours.

  Args:
    sims: `[Q, k]` cosine similarities of the neighbours (from
      `knn_neighbors`; the first k' columns give the k'-NN scores).
    labels: `[Q, k]` int labels; neighbours labelled outside
      `[0, num_classes)` (such as -1, missing) do not vote.
    temperature: T > 0, a static Python float (DINO and InstDisc: 0.07).
    num_classes: number of classes C.

  Returns:
    `[Q, C]` float32 scores (DINO's `probs` before its top-k).

  References:
    Caron et al. 2021, `dino` `eval_knn.py:knn_classifier`
    (`distances.div_(T).exp_()`, summed per class).
  """
  _check_positive(temperature=temperature, num_classes=num_classes)
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  weights = jnp.where(valid, jnp.exp(sims.astype(jnp.float32) / temperature),
                      0.0)
  rows = jnp.arange(labels.shape[0])[:, None]
  scores = jnp.zeros((labels.shape[0], num_classes), jnp.float32)
  return scores.at[rows, jnp.where(valid, labels, num_classes)].add(
      weights, mode='drop')


def knn_scores(queries: jax.Array, bank: jax.Array, bank_labels: jax.Array,
               *, k: int, temperature: float, num_classes: int,
               block_size: int, bank_mask: jax.Array | None = None,
               axis_name: str | None = None) -> jax.Array:
  """Weighted kNN class scores: `knn_neighbors` then `weighted_votes`.

  Args:
    queries: `[Q, D]` query features (replicated with `axis_name`).
    bank: `[N, D]` bank features; per-shard with `axis_name`, else global.
    bank_labels: `[N]` int labels in `[0, num_classes)`, sharded like `bank`.
    k: number of neighbours (InstDisc 200; DINO 20 and 200).
    temperature: T > 0 (InstDisc and DINO: 0.07).
    num_classes: number of classes C.
    block_size: bank rows per scan step; memory is O(Q · (block_size + k)).
    bank_mask: optional `[N]` bool, False for padding rows.
    axis_name: the mesh axis of the bank inside `jax.shard_map`, or None.

  Returns:
    `[Q, C]` float32 scores, replicated across `axis_name`.

  References:
    Wu et al. 2018 (InstDisc, `test.py:kNN`); Caron et al. 2021 (DINO,
    `eval_knn.py:knn_classifier`).
  """
  _check_positive(temperature=temperature, num_classes=num_classes)
  sims, labels = knn_neighbors(queries, bank, bank_labels, k=k,
                               block_size=block_size, bank_mask=bank_mask,
                               axis_name=axis_name)
  return weighted_votes(sims, labels, temperature=temperature,
                        num_classes=num_classes)


def _hits(sims, labels, targets, *, ks, temperature, num_classes):
  """`[len(ks), Q, 2]` bool: (top-1 hit, top-5 hit) of each k's scores."""
  out = []
  for k in ks:
    scores = weighted_votes(sims[:, :k], labels[:, :k],
                            temperature=temperature, num_classes=num_classes)
    _, top = jax.lax.top_k(scores, min(5, num_classes))
    hit = top == targets[:, None]
    out.append(jnp.stack([hit[:, 0], jnp.any(hit, axis=1)], axis=1))
  return jnp.stack(out)


@functools.lru_cache(maxsize=8)
def _eval_fn(mesh: Mesh, ks: tuple[int, ...], temperature: float,
             num_classes: int, block_size: int):
  """Jitted `(queries, targets, bank, labels, mask) -> hits` on `mesh`."""
  axis = parallel.DATA_AXIS

  def local(queries, bank, labels, mask):
    return knn_neighbors(queries, bank, labels, k=max(ks),
                         block_size=block_size, bank_mask=mask,
                         axis_name=axis)

  neighbors = jax.shard_map(local, mesh=mesh, out_specs=P(),
                            in_specs=(P(), P(axis), P(axis), P(axis)))

  def run(queries, targets, bank, labels, mask):
    sims, top_labels = neighbors(queries, bank, labels, mask)
    return _hits(sims, top_labels, targets, ks=ks, temperature=temperature,
                 num_classes=num_classes)

  return jax.jit(run, out_shardings=parallel.replicated(mesh))


def _put(array: np.ndarray, sharding) -> jax.Array:
  """A global host array (identical on every process) placed on `sharding`."""
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: array[index])


def _place_bank(mesh: Mesh, features: np.ndarray, labels: np.ndarray,
                block_size: int):
  """The bank padded to P × (a multiple of `block_size`) rows, sharded.

  Padding rows are zero features, label -1 and mask False. Returns
  `(bank, labels, mask, block)`, block being the per-device block size.
  """
  devices = mesh.devices.size
  n = features.shape[0]
  # The block is the same on any mesh, so each similarity is the same
  # product of the same shapes: near-ties break alike on 8 devices and 1.
  block = block_size
  per_device = -(-(-(-n // devices)) // block) * block
  pad = per_device * devices - n
  bank = np.pad(np.asarray(features, np.float32), ((0, pad), (0, 0)))
  bank_labels = np.pad(np.asarray(labels, np.int32), (0, pad),
                       constant_values=-1)
  mask = np.arange(n + pad) < n
  sharding = parallel.batch_sharding(mesh)
  return (_put(bank, sharding), _put(bank_labels, sharding),
          _put(mask, sharding), block)


def _check_inputs(train_features, train_labels, test_features, test_labels,
                  ks, num_classes) -> None:
  """One-line ValueErrors for shapes, labels and ks (before any compile)."""
  if train_features.ndim != 2 or test_features.ndim != 2 or (
      train_features.shape[1] != test_features.shape[1]):
    raise ValueError(
        f'features must be [N, D] with one D; got train '
        f'{train_features.shape} and test {test_features.shape}')
  for name, feats, labels in (('train', train_features, train_labels),
                              ('test', test_features, test_labels)):
    if labels.shape != feats.shape[:1] or not len(labels):
      raise ValueError(f'{name}_labels has shape {labels.shape}; expected '
                       f'({feats.shape[0]},) with at least one example')
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(
          f'{name}_labels span [{labels.min()}, {labels.max()}]; must be in '
          f'[0, num_classes={num_classes})')
  if not ks:
    raise ValueError('ks=() must name at least one k')
  for k in ks:
    _check_k(k, train_features.shape[0])


def _query_hits(run, mesh: Mesh, features: np.ndarray, labels: np.ndarray,
                query_block: int, bank) -> np.ndarray:
  """`run`'s hits for every query, `query_block` replicated rows per call.

  The last block is zero-padded (target -1) to the same shape, so `run`
  compiles once; padded rows are dropped. Returns `[len(ks), Q, 2]` bool.
  """
  replicated = parallel.replicated(mesh)
  rows = min(query_block, features.shape[0])
  hits = []
  for start in range(0, features.shape[0], rows):
    queries = np.asarray(features[start:start + rows], np.float32)
    targets = np.asarray(labels[start:start + rows], np.int32)
    real, pad = len(queries), rows - len(queries)
    queries = np.pad(queries, ((0, pad), (0, 0)))
    targets = np.pad(targets, (0, pad), constant_values=-1)
    out = run(_put(queries, replicated), _put(targets, replicated), *bank)
    hits.append(np.asarray(out.addressable_data(0))[:, :real])
  return np.concatenate(hits, axis=1)


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, *,
                 mesh: Mesh, num_classes: int,
                 ks: Sequence[int] = (20, 200), temperature: float = 0.07,
                 block_size: int = 4096, query_block: int = 1024
                 ) -> dict[str, float]:
  """Weighted kNN top-1 and top-5 accuracy of the test set, as fractions.

  The bank (train features) is padded to P × a multiple of the block (P =
  mesh devices; padding rows are masked out) and sharded over the mesh's
  `'data'` axis; test queries are replicated, `query_block` at a time (the
  last block zero-padded, so one compile serves all). The top-max(ks)
  neighbours are found once per query block; each k scores its first k.
  Per device and call, memory is the bank shard (⌈N / P⌉ rows rounded up
  to a multiple of block_size, float32) plus
  O(query_block · (block_size + P · max(ks) + num_classes)) words.
  Top-5 ranks the min(5, num_classes) best classes (so with fewer than 5
  classes it is 1); class-score ties go to the lower class index.

  Args:
    train_features: `[N, D]` global bank features, identical on every
      process (as `jaxssl.evaluation.features.extract_features` returns them).
    train_labels: `[N]` int labels in `[0, num_classes)`, global.
    test_features: `[Q, D]` global query features.
    test_labels: `[Q]` int labels in `[0, num_classes)`, global.
    mesh: the 1-D `'data'` mesh (`jaxssl.parallel.make_mesh`).
    num_classes: number of classes C.
    ks: neighbour counts, each in [1, N] (DINO: 20 and 200).
    temperature: T > 0 (InstDisc and DINO: 0.07).
    block_size: bank rows per scan step on a device. Each device's shard
      is padded to a multiple of it; as every similarity then comes from a
      product of the same shapes on any mesh, near-ties break alike and the
      result is the same on any number of devices.
    query_block: test queries per device call.

  Returns:
    `{'knn_k{k}_top1': float, 'knn_k{k}_top5': float}` for each k in `ks`,
    accuracies in [0, 1] over the Q test examples; equal on every process.

  Raises:
    ValueError: bad shapes, labels outside [0, num_classes), a k outside
      [1, N], or a non-positive temperature, block_size or query_block;
      one line each, before anything is compiled.

  References:
    Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination", CVPR 2018; Caron et al., "Emerging Properties in
    Self-Supervised Vision Transformers", ICCV 2021, `eval_knn.py`.
  """
  arrays = [np.asarray(x) for x in (train_features, train_labels,
                                    test_features, test_labels)]
  ks = tuple(int(k) if isinstance(k, np.integer) else k for k in ks)
  _check_positive(temperature=temperature, num_classes=num_classes,
                  block_size=block_size, query_block=query_block)
  _check_inputs(*arrays, ks, num_classes)
  *bank, block = _place_bank(mesh, arrays[0], arrays[1], block_size)
  run = _eval_fn(mesh, ks, float(temperature), int(num_classes), block)
  hits = _query_hits(run, mesh, arrays[2], arrays[3], query_block, bank)
  result = {}
  for i, k in enumerate(ks):
    result[f'knn_k{k}_top1'] = float(np.mean(hits[i, :, 0]))
    result[f'knn_k{k}_top5'] = float(np.mean(hits[i, :, 1]))
  return result
