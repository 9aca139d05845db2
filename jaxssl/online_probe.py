"""The online linear probe: a classifier trained on frozen features while
the encoder pretrains.

A `Dense(num_classes)` (kernel N(0, 0.01), bias 0) on
`stop_gradient(encoder features)` of the views the method embeds with its
online encoder (`base.Aux.features`), trained jointly with the method from
the labels that come with each batch; the labels are tiled over the views
(SimCLR TF2's `concat([l, l])`). Nothing flows back into the encoder: the
method's parameters, and every update of them, are bit-identical with the
probe on or off (tested). Its training accuracy on each batch is the
`online_probe_top1` metric.

Its parameters and optimizer state are the train state's `probe` entry,
checkpointed with the rest. It follows the run's optimizer and learning
rate schedule, excluded from weight decay and from the trust ratio, and its
kernel's L2 penalty `optim.weight_decay · Σ w² / 2` is added to its loss:
SimCLR TF2's `head_supervised` exactly (excluded by name from LARS, its
decay added by `add_weight_decay(adjust_per_optimizer=True)`).

Differences from other official monitors: BYOL's classifier sits inside
the online parameters, so LARS adapts and decays its kernel (not its bias),
and it trains on view 1 only; solo-learn and lightly give it its own
parameter group with no weight decay.

References:
  google-research/simclr `tf2/model.py` (`lineareval_while_pretraining`,
  `head_supervised`), `tf2/run.py`; deepmind-research/byol
  `byol_experiment.py` (`classif_loss`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxssl import optim

PyTree = Any
# SimCLR's supervised head: RandomNormal(stddev=0.01), bias zero.
_KERNEL_INIT = nn.initializers.normal(stddev=0.01)


class OnlineProbe:
  """The probe's init, loss and update, for `jaxssl.steps`."""

  def __init__(self, config: ml_collections.ConfigDict, *, feature_dim: int,
               num_classes: int, schedule: optax.Schedule):
    """Builds the probe of a run.

    Args:
      config: the run config (`optim` gives the optimizer and its weight
        decay).
      feature_dim: the encoder's feature dimension D.
      num_classes: the dataset's number of classes C.
      schedule: the run's learning rate schedule.
    """
    if num_classes < 1:
      raise ValueError(f'online_probe.enabled=True needs labels; the dataset '
                       f'has num_classes={num_classes}')
    self.feature_dim = feature_dim
    self.num_classes = num_classes
    self.weight_decay = config.optim.weight_decay
    self.optimizer = optim.make_excluded_optimizer(config.optim, schedule)

  def init(self, rng: jax.Array) -> PyTree:
    """`{'params': {'kernel' [D, C], 'bias' [C]}, 'opt_state'}` at step 0."""
    params = {'kernel': _KERNEL_INIT(rng, (self.feature_dim,
                                           self.num_classes), jnp.float32),
              'bias': jnp.zeros((self.num_classes,), jnp.float32)}
    return {'params': params, 'opt_state': self.optimizer.init(params)}

  def loss(self, params: PyTree, features: jax.Array, labels: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of the probe plus its kernel's L2 penalty.

    Args:
      params: the probe's `{'kernel', 'bias'}`.
      features: `[N, V, D]` encoder features of V views (global batch,
        sharded over `'data'`); the gradient stops here.
      labels: `[N]` int32 labels, the same for each view.

    Returns:
      `(loss, metrics)`: the mean cross-entropy over the N·V rows plus
      `weight_decay · Σ kernel² / 2`, and `{'online_probe_loss' (the
      cross-entropy), 'online_probe_top1'}`, replicated scalars.
    """
    n, v, d = features.shape
    x = jax.lax.stop_gradient(features).reshape(n * v, d).astype(jnp.float32)
    y = jnp.repeat(labels[:, None], v, axis=1).reshape(n * v)
    logits = jnp.dot(x, params['kernel'],
                     precision=jax.lax.Precision.HIGHEST) + params['bias']
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
        logits, y).mean()
    penalty = self.weight_decay * 0.5 * jnp.sum(jnp.square(params['kernel']))
    top1 = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return cross_entropy + penalty, {'online_probe_loss': cross_entropy,
                                     'online_probe_top1': top1}

  def step(self, probe: PyTree, features: jax.Array, labels: jax.Array
           ) -> tuple[PyTree, dict[str, jax.Array]]:
    """One update of the probe state; returns `(probe, metrics)`.

    Raises:
      ValueError: the method gave no features (`base.Aux.features` None),
        while the step is traced, so before anything compiles.
    """
    if features is None:
      raise ValueError('the method returns no features for the online probe '
                       '(base.Aux.features); set online_probe.enabled=False')
    grads, metrics = jax.grad(self.loss, has_aux=True)(
        probe['params'], features, labels)
    updates, opt_state = self.optimizer.update(grads, probe['opt_state'],
                                               probe['params'])
    return {'params': optax.apply_updates(probe['params'], updates),
            'opt_state': opt_state}, metrics
