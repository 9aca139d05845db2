"""Micro-batches of one step: exact gradient accumulation.

A step over a global batch of N examples may run its forwards in k
micro-batches of N/k examples, so that only one micro-batch's activations
are alive at a time. Two ways keep the gradient that of the whole batch:

- **Gradient cache** (`micro_batched`), for losses that couple the examples
  (NT-Xent, InfoNCE against in-batch keys, SwAV's Sinkhorn over the batch,
  batch statistics). The network's forward runs as a `lax.scan` over the
  micro-batches of a `jax.checkpoint`-ed function: the forward pass keeps
  only each micro-batch's embeddings (pass 1); the loss and its gradient
  with respect to all N embeddings are computed once, on the whole batch;
  the scan's backward then re-runs each micro-batch's forward and pulls
  its slice of that embedding gradient back to the parameters, summing
  over micro-batches (pass 2). That is the two-pass method of Gao et al.
  (2021), expressed by JAX's own transposition of a rematerialised scan.
- **Averaging** (`average_value_and_grad`), for per-example losses (BYOL,
  SimSiam): each micro-batch's loss and gradient are taken on their own
  and averaged, one backward per micro-batch and no recompute.

The one difference from a single large step is BatchNorm: its statistics
are those of each micro-batch ("ghost" BN, Hoffer et al. 2017), and the
running averages move once per micro-batch, in micro-batch order, as k
forwards of a PyTorch accumulation loop would move them.

Micro-batch m holds the examples m, m + k, m + 2k, ... of the global batch.
With the batch sharded over D devices in contiguous blocks of N/D, every
device holds N/(kD) examples of every micro-batch, so splitting and
merging move no data between devices, and the micro-batches (hence the
result) do not depend on D: 8 devices equal 1.

References:
  Gao, Zhang, Han, Callan, Scaling Deep Contrastive Learning Batch Size
  under Memory Limited Setup (GradCache), RepL4NLP 2021.
  Hoffer, Hubara, Soudry, Train longer, generalize better, NeurIPS 2017.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxssl import parallel

PyTree = Any
# How a method's step accumulates micro-batches (`base.Method.accumulation`).
ACCUMULATION_KINDS = ('gradient_cache', 'average')


def split(tree: PyTree, k: int) -> PyTree:
  """`[N, ...]` leaves to `[k, N/k, ...]`; row m holds examples m, m+k, ...

  Args:
    tree: leaves batch-first with N a multiple of k (global view).
    k: the number of micro-batches.
  """
  def one(a):
    return jnp.swapaxes(a.reshape((a.shape[0] // k, k) + a.shape[1:]), 0, 1)
  return jax.tree.map(one, tree)


def merge(tree: PyTree) -> PyTree:
  """Inverse of `split`: `[k, N/k, ...]` leaves back to `[N, ...]`."""
  def one(a):
    return jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])
  return jax.tree.map(one, tree)


def _constrain(tree: PyTree, mesh: Mesh | None, spec: P) -> PyTree:
  """Keeps the example axis sharded over `'data'` (no-op without a mesh)."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, spec)
  return jax.tree.map(
      lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def micro_batched(fn: Callable, k: int, mesh: Mesh | None = None
                  ) -> Callable:
  """A forward run in `k` micro-batches, rematerialised (gradient cache).

  Args:
    fn: `(params, batch_stats, inputs, **kw) -> (outputs, batch_stats)`, a
      train-mode forward whose `inputs` and `outputs` are pytrees of
      example-major arrays (`[n, ...]`, global view) and whose outputs
      depend on each example's own inputs and on the batch only through
      BatchNorm statistics. `kw` is `rng=` when the caller passes one.
    k: the number of micro-batches; 1 returns `fn` itself.
    mesh: the training mesh (the example axis stays sharded over its
      `'data'` axis), or None.

  Returns:
    A function with `fn`'s signature and results: outputs `[n, ...]` in the
    input's example order, and the BatchNorm statistics after the k
    micro-batches' updates. A passed `rng` reaches micro-batch m as
    `fold_in(rng, m)`.
  """
  if k == 1:
    return fn
  remat = jax.checkpoint(fn, prevent_cse=False)

  def run(params, batch_stats, inputs, **kw):
    chunks = _constrain(split(inputs, k), mesh, P(None, parallel.DATA_AXIS))

    def body(stats, chunk_and_index):
      chunk, m = chunk_and_index
      chunk = _constrain(chunk, mesh, P(parallel.DATA_AXIS))
      extra_kw = {'rng': jax.random.fold_in(kw['rng'], m)} if kw else {}
      outputs, stats = remat(params, stats, chunk, **extra_kw)
      return stats, outputs

    stats, outputs = jax.lax.scan(body, batch_stats,
                                  (chunks, jnp.arange(k)))
    return _constrain(merge(outputs), mesh, P(parallel.DATA_AXIS)), stats

  return run


def average_value_and_grad(loss_fn: Callable, params: PyTree,
                           batch_stats: PyTree, extra: PyTree,
                           batch: dict[str, Any], rng: jax.Array, k: int,
                           mesh: Mesh | None = None):
  """The loss and gradient of a per-example loss, averaged over micro-batches.

  Args:
    loss_fn: `(params, batch_stats, extra, micro_batch, rng) -> (loss,
      base.Aux)` on one micro-batch, its loss a mean over its examples.
    params: differentiated parameters (replicated).
    batch_stats, extra: threaded from micro-batch to micro-batch.
    batch: the global batch (`views` tuple and `[N]` entries), sharded over
      `'data'`.
    rng: the step key; micro-batch m gets `fold_in(rng, m)`.
    k: the number of micro-batches (> 1).
    mesh: as in `micro_batched`.

  Returns:
    `((loss, aux), grads)` as `jax.value_and_grad(..., has_aux=True)`
    returns them for the whole batch: loss, metrics and gradients the
    means over micro-batches; `aux.features` `[N, ...]` in batch order;
    batch_stats and extra after the last micro-batch.
  """
  chunks = _constrain(split(batch, k), mesh, P(None, parallel.DATA_AXIS))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def body(carry, chunk_and_index):
    stats, extra, grad_sum = carry
    chunk, m = chunk_and_index
    chunk = _constrain(chunk, mesh, P(parallel.DATA_AXIS))
    (loss, aux), grads = grad_fn(params, stats, extra, chunk,
                                 jax.random.fold_in(rng, m))
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    return ((aux.batch_stats, aux.extra, grad_sum),
            (loss, aux.metrics, aux.features))

  zeros = jax.tree.map(jnp.zeros_like, params)
  (stats, extra, grad_sum), (losses, metrics, features) = jax.lax.scan(
      body, (batch_stats, extra, zeros), (chunks, jnp.arange(k)))
  grads = jax.tree.map(lambda g: g / k, grad_sum)
  metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), metrics)
  if features is not None:
    features = _constrain(merge(features), mesh, P(parallel.DATA_AXIS))
  return (jnp.mean(losses), (stats, extra, metrics, features)), grads
