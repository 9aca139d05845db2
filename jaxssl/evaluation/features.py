"""Frozen-encoder features of dataset splits and of host images.

Every function is a collective in a multi-process run (each process calls
it with the same arguments) and returns global NumPy arrays, the same on
every process. The encoder runs with `train=False` (BatchNorm in inference
mode), sharded over the mesh's `'data'` axis.
"""

import functools
from typing import Any, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxssl import input_pipeline
from jaxssl import parallel

PyTree = Any


@functools.lru_cache(maxsize=4)
def _apply_fn(encoder: nn.Module):
  """The jitted inference-mode forward of `encoder` (one per module)."""
  return jax.jit(lambda v, x: encoder.apply(v, x, train=False))


def extract_features(encoder: nn.Module, variables: PyTree,
                     batches: Iterator[dict[str, np.ndarray]], mesh: Mesh
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Frozen-encoder features of every (unpadded) example, on every process.

  Args:
    encoder: the backbone; run with `train=False`.
    variables: its `{'params', 'batch_stats'}`.
    batches: this process's `{'image', 'label', 'mask'}` batches.
    mesh: the batch is sharded over its `'data'` axis.

  Returns:
    `(features [N, feature_dim] float32, labels [N] int32)`, global: the
    examples of process 0's batches first, then process 1's, ... (for
    `split_features`, the split's order whatever the process count).
  """
  sharding = parallel.batch_sharding(mesh)
  apply = _apply_fn(encoder)
  processes = jax.process_count()
  features, labels = [[] for _ in range(processes)], [[] for _ in
                                                      range(processes)]
  for local in batches:
    batch = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), local)
    feats = apply(variables, batch['image'])
    gathered = multihost_utils.process_allgather(
        {'f': feats, 'y': batch['label'], 'm': batch['mask']}, tiled=True)
    # The global batch is process 0's local batch, then process 1's, ...
    per_process = jax.tree.map(
        lambda x: np.asarray(x).reshape(processes, -1, *x.shape[1:]), gathered)
    for q in range(processes):
      keep = per_process['m'][q].astype(bool)
      features[q].append(per_process['f'][q].astype(np.float32)[keep])
      labels[q].append(per_process['y'][q].astype(np.int32)[keep])
  return (np.concatenate(sum(features, [])), np.concatenate(sum(labels, [])))


def split_features(config: ml_collections.ConfigDict, encoder: nn.Module,
                   variables: PyTree, mesh: Mesh, split: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """`extract_features` of the centre crops of `split`; every process reads."""
  batches = input_pipeline.eval_batches(
      config, split,
      batch_size=config.linear_eval.feature_batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count())
  return extract_features(encoder, variables, batches, mesh)


def features_of_images(encoder: nn.Module, variables: PyTree,
                        images: np.ndarray, mesh: Mesh) -> np.ndarray:
  """Features `[N, D]` of host images `[N, S, S, C]` that are identical on
  every process, computed sharded over the mesh."""
  pad = -len(images) % mesh.devices.size
  padded = np.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
  sharded = jax.make_array_from_callback(
      padded.shape, parallel.batch_sharding(mesh), lambda i: padded[i])
  feats = _apply_fn(encoder)(variables, sharded)
  gathered = multihost_utils.process_allgather(feats, tiled=True)
  return np.asarray(gathered, np.float32)[:len(images)]
