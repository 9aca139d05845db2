"""The pictures of a run: nearest training neighbours of a few test images
(the retrieval grid) and the training curves.

The first `num_queries` images of `dataset.eval_test_split` are the
queries; the bank is the first `bank_size` images of
`dataset.eval_train_split`; all are centre crops, embedded by the frozen
encoder and compared by cosine similarity. Every process reads the same
images and gets the same neighbours. The bank is read twice (features,
then the few neighbour images), so host memory holds only its features.
"""

import os
import tempfile
from typing import Any, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from jax.sharding import Mesh

from jaxssl import datasets
from jaxssl.augment import host
from jaxssl.evaluation import pictures
from jaxssl.evaluation import features
from jaxssl.losses import numerics

PyTree = Any


class Neighbours(NamedTuple):
  """Queries and their nearest bank images, best first.

  Attributes:
    query_images: float32 `[Q, S, S, C]` in [0, 1].
    query_labels: int32 `[Q]`.
    images: float32 `[Q, K, S, S, C]`.
    labels: int32 `[Q, K]`.
    similarities: float32 `[Q, K]` cosine similarities, decreasing.
  """
  query_images: np.ndarray
  query_labels: np.ndarray
  images: np.ndarray
  labels: np.ndarray
  similarities: np.ndarray


def centre_crops(config: ml_collections.ConfigDict, split: str, count: int,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`(images [b, S, S, C], labels [b])` of the first `count` of `split`,
  centre-cropped as for evaluation, in the split's fixed order."""
  builder = datasets.get_builder(config.dataset)
  image_key, label_key = datasets.feature_keys(builder)
  size = config.dataset.image_size
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.take(count).map(lambda e: (host.center_crop(e[image_key],
                                                      out_size=size),
                                     e[label_key]))
  for images, labels in tfds.as_numpy(ds.batch(batch_size)):
    yield images, labels.astype(np.int32)


def nearest_neighbours(config: ml_collections.ConfigDict, encoder: nn.Module,
                       variables: PyTree, mesh: Mesh, *, num_queries: int = 8,
                       k: int = 8, bank_size: int = 10_000) -> Neighbours:
  """The k nearest bank images of each query (see the module docstring).

  Args:
    config: the run config (dataset.*, linear_eval.feature_batch_size).
    encoder: the backbone, run with `train=False`.
    variables: its `{'params', 'batch_stats'}`, replicated on `mesh`.
    mesh: the device mesh.
    num_queries: queries from the start of the test split.
    k: neighbours per query (at most the bank's size).
    bank_size: bank images from the start of the train split.

  Returns:
    `Neighbours`; ties go to the earlier bank image.
  """
  batch = config.linear_eval.feature_batch_size
  embed = lambda x: features.features_of_images(encoder, variables, x, mesh)
  queries, query_labels = next(centre_crops(
      config, config.dataset.eval_test_split, num_queries, num_queries))
  bank = [(embed(x), y) for x, y in centre_crops(
      config, config.dataset.eval_train_split, bank_size, batch)]
  bank_features = np.concatenate([f for f, _ in bank])
  bank_labels = np.concatenate([y for _, y in bank])
  if not 1 <= k <= len(bank_labels):
    raise ValueError(f'k={k} must be in [1, {len(bank_labels)}] (the bank)')
  sims = numerics.dot_t(numerics.l2_normalize(jnp.asarray(embed(queries))),
                        numerics.l2_normalize(jnp.asarray(bank_features)))
  top, index = jax.lax.top_k(sims, k)
  index = np.asarray(index)
  wanted = {int(i) for i in index.ravel()}
  found = {}
  start = 0
  for images, _ in centre_crops(config, config.dataset.eval_train_split,
                                max(wanted) + 1, batch):
    for i in range(start, start + len(images)):
      if i in wanted:
        found[i] = images[i - start]
    start += len(images)
  return Neighbours(queries, query_labels,
                    np.stack([[found[int(i)] for i in row] for row in index]),
                    bank_labels[index], np.asarray(top))


CURVES_FILE = 'training_curves.png'
RETRIEVAL_FILE = 'knn_retrieval.png'


def write_pictures(config: ml_collections.ConfigDict, workdir: str,
                   encoder: nn.Module, variables: PyTree, mesh: Mesh, *,
                   title: str) -> list[str]:
  """Writes the run's training curves and retrieval grid into `workdir`.

  A collective in a multi-process run (the neighbours' features); only
  process 0 writes. The curves need the workdir's TensorBoard events and
  are skipped (with a note) when it has none, as for an exported encoder.

  Args:
    config: the run config.
    workdir: the run directory (local, or any `etils.epath` path).
    encoder, variables: the frozen encoder (`evaluate.load_encoder`).
    mesh: the device mesh.
    title: the curves' title, e.g. `'simclr (step 585)'`.

  Returns:
    The paths written (on process 0; [] elsewhere).
  """
  neighbours = nearest_neighbours(config, encoder, variables, mesh)
  if jax.process_index() != 0:
    return []
  builder = datasets.get_builder(config.dataset)
  _, label_key = datasets.feature_keys(builder)
  names = getattr(builder.info.features[label_key], 'names', None)
  folder = epath.Path(workdir)
  written = [str(folder / RETRIEVAL_FILE)]
  _write_png(written[0], lambda path: pictures.retrieval_grid(
      *neighbours[:4], path, class_names=names))
  try:
    scalars = pictures.read_scalars(workdir)
  except FileNotFoundError:
    print(f'jaxssl: no TensorBoard events in {workdir}: no {CURVES_FILE}',
          flush=True)
    return written
  written.append(str(folder / CURVES_FILE))
  _write_png(written[1], lambda path: pictures.plot_training_curves(
      scalars, path, title=title))
  return written


def _write_png(destination: str, write) -> None:
  """`write(local path)`, then a copy to `destination` if it is remote."""
  if '://' not in destination:
    write(destination)
    return
  with tempfile.TemporaryDirectory() as folder:
    local = os.path.join(folder, os.path.basename(destination))
    write(local)
    epath.Path(destination).write_bytes(epath.Path(local).read_bytes())
