"""Momentum (key) encoders shared by MoCo v2 and MoCo v3.

A MoCo method has an online network (encoder, projector and, for v3, a
predictor) trained by the optimizer, and a key network with the same encoder
and projector whose parameters follow the online ones by momentum. The key
network is not trained: its parameters and its own BatchNorm statistics live
in the method's `extra` state, so checkpoints and exact resume cover them.

When the update happens. The official code updates the key parameters at the
start of each forward, before the keys are computed, with the query
parameters of that moment (the ones the previous optimizer step produced):
`θk ← m·θk + (1 − m)·θq`. jaxssl does the same inside `loss_fn`, on
`stop_gradient(params)`, and returns the new key parameters in the new
`extra`. The values are those of the official order: the update of step t
reads exactly the parameters that step t differentiates. Only parameters
move by momentum; the key network's BatchNorm statistics come from its own
train-mode forwards.

References:
  He et al., Momentum Contrast for Unsupervised Visual Representation
  Learning, CVPR 2020, eq. (2); facebookresearch/moco
  `moco/builder.py:_momentum_update_key_encoder`; facebookresearch/moco-v3
  `moco/builder.py:_update_momentum_encoder`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxssl import optim

PyTree = Any

# The parts of the online parameters that the key network mirrors.
KEY_PARTS = ('encoder', 'projector')


class MomentumNet(nn.Module):
  """Encoder, then projector, then (optionally) a predictor.

  The online network and the key network are the same module; the key
  network is applied without the predictor (and without its parameters).
  Submodules, hence parameter subtrees: `encoder`, `projector`, `predictor`.
  """

  encoder: nn.Module
  projector: nn.Module
  predictor: nn.Module | None = None

  def __call__(self, x: jax.Array, *, train: bool,
               predict: bool = False) -> jax.Array:
    """Returns `[B, dim]` float32 projections (predictions if `predict`).

    Args:
      x: `[B, H, W, C]` images, the global batch.
      train: BatchNorm uses and updates batch statistics.
      predict: also apply the predictor.
    """
    z = self.projector(self.encoder(x, train=train), train=train)
    if predict:
      if self.predictor is None:
        raise ValueError('predict=True needs a network built with a predictor')
      z = self.predictor(z, train=train)
    return z


def forward(net: nn.Module, params: PyTree, batch_stats: PyTree,
            x: jax.Array, **kwargs) -> tuple[jax.Array, PyTree]:
  """Applies `net` in train mode; returns `(output, new_batch_stats)`.

  Args:
    net: a `MomentumNet`.
    params: its parameters.
    batch_stats: its BatchNorm statistics.
    x: `[B, H, W, C]` images, the global batch.
    **kwargs: forwarded to the module call (`predict`).
  """
  out, mutated = net.apply({'params': params, 'batch_stats': batch_stats}, x,
                           train=True, mutable=['batch_stats'], **kwargs)
  return out, mutated['batch_stats']


def key_part(tree: PyTree) -> PyTree:
  """The encoder and projector subtrees that the key network mirrors."""
  return {name: tree[name] for name in KEY_PARTS if name in tree}


def copy_tree(tree: PyTree) -> PyTree:
  """A copy of every leaf, so the key state never aliases online buffers."""
  return jax.tree.map(jnp.copy, tree)


def momentum_update(key_params: PyTree, online_params: PyTree,
                    momentum) -> PyTree:
  """MoCo's key update `θk ← m·θk + (1 − m)·θq`, with no gradient into θq.

  Args:
    key_params: the key network's parameters (replicated).
    online_params: the online parameters with the same structure.
    momentum: m, a float or a float32 scalar (possibly traced).

  Returns:
    The new key parameters.

  References:
    He et al., 2020, eq. (2); facebookresearch/moco `moco/builder.py`.
  """
  return optim.ema_update(key_params, jax.lax.stop_gradient(online_params),
                          momentum)


def resolve_bn_groups(bn_groups: int, mesh: Mesh, global_batch_size: int,
                      key: str) -> int:
  """The number of BatchNorm groups: `bn_groups`, or the device count if 0.

  Args:
    bn_groups: the configured value; 0 means one group per device.
    mesh: the training mesh.
    global_batch_size: images per view per step; must be a multiple.
    key: the config key, for the error message.

  Raises:
    ValueError: if the resolved count does not divide the global batch.
  """
  groups = bn_groups or mesh.devices.size
  if global_batch_size % groups:
    raise ValueError(
        f'{key}={bn_groups} gives {groups} BatchNorm groups, which do not '
        f'divide global_batch_size={global_batch_size}; use a divisor of it')
  return groups


def contrast_accuracy(q: jax.Array, positives: jax.Array,
                      negatives: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Monitors: mean positive cosine and how often the positive wins.

  Args:
    q: `[N, dim]` queries, the global batch.
    positives: `[N, dim]` each query's own key.
    negatives: `[M, dim]` keys that compete with every positive (MoCo v2's
      queue); for in-batch negatives use `in_batch_accuracy`.

  Returns:
    `(positive_cosine, contrast_acc)`: the mean cosine of each query with
    its key, and the fraction of queries whose positive beats every
    negative.
  """
  q, positives, negatives = (_unit(q), _unit(positives), _unit(negatives))
  pos = jnp.sum(q * positives, axis=1)
  neg = jnp.max(q @ negatives.T, axis=1)
  return jnp.mean(pos), jnp.mean((pos > neg).astype(jnp.float32))


def in_batch_accuracy(q: jax.Array, k: jax.Array) -> tuple[jax.Array,
                                                           jax.Array]:
  """Monitors for in-batch negatives: the key of image i against all keys.

  Args:
    q: `[N, dim]` queries, the global batch.
    k: `[N, dim]` keys; row i is query i's positive, the others negatives.

  Returns:
    `(positive_cosine, contrast_acc)` as in `contrast_accuracy`.
  """
  q, k = _unit(q), _unit(k)
  sims = q @ k.T
  pos = jnp.diagonal(sims)
  neg = jnp.max(jnp.where(jnp.eye(q.shape[0], dtype=bool), -1e9, sims),
                axis=1)
  return jnp.mean(pos), jnp.mean((pos > neg).astype(jnp.float32))


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True),
                                       1e-12))
