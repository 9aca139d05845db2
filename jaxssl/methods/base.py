"""The method interface: what a self-supervised method plugs into the trainer.

A method owns its networks, its extra state (EMA targets, queues,
prototypes), its loss and its post-update rule. `jaxssl.steps` wires a method
to an optax optimizer in one pure step function; `jaxssl.train` runs it. All
of a method's state lives in the one `TrainState` pytree, so checkpoints and
exact resume cover it.
"""

import abc
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from jaxssl import cpu_kernels
from jaxssl import models

PyTree = Any
Metrics = dict[str, jax.Array]


class Method(abc.ABC):
  """Base class of the pretraining methods registered in `METHODS`.

  Subclasses set `name` and implement `default_config`, `build_networks`,
  `init` and `loss_fn`; the defaults of `process_grads` and `post_update` do
  nothing.
  """

  name: str = ''

  def __init__(self, config: ml_collections.ConfigDict, *, mesh: Mesh,
               num_channels: int, steps_per_epoch: int, total_steps: int,
               factories: cpu_kernels.Factories | None = None):
    """Builds the method's networks.

    Args:
      config: the full, validated run config.
      mesh: the training mesh; loss islands run `jax.shard_map` over its
        `'data'` axis.
      num_channels: channels of the input images (1 or 3).
      steps_per_epoch: optimizer steps per epoch of the train split (for
        schedules stated in epochs: EMA momentum, queue start, freezing).
      total_steps: optimizer steps of the whole run.
      factories: the encoders' conv and norm factories, picked once by the
        trainer (`cpu_kernels.select_factories`); None: XLA's ops.
    """
    self.config = config
    self.mesh = mesh
    self.num_channels = num_channels
    self.image_size = config.dataset.image_size
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps
    self.factories = factories

  def make_encoder(self, *, bn_groups: int = 1):
    """`models.make_encoder` for this run's images and `factories`."""
    layers = {} if self.factories is None else {
        'conv': self.factories.conv, 'norm': self.factories.norm}
    return models.make_encoder(self.config.model, image_size=self.image_size,
                               bn_groups=bn_groups, **layers)

  @property
  def fixed_lr_mask(self):
    """None, or `params -> bool pytree` of the leaves the optimizer keeps
    at the peak learning rate instead of the schedule (SimSiam's
    `--fix-pred-lr`); see `optim.make_optimizer`."""
    return None

  @classmethod
  @abc.abstractmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """Returns the method's own config section, every key declared."""

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for method-specific bad values (default: none)."""

  @property
  @abc.abstractmethod
  def encoder(self) -> nn.Module:
    """The backbone whose variables are exported for evaluation."""

  @abc.abstractmethod
  def init(self, rng: jax.Array) -> tuple[PyTree, PyTree, PyTree]:
    """Returns `(params, batch_stats, extra)` at step 0.

    Args:
      rng: a typed PRNG key, identical on every process.
    """

  @abc.abstractmethod
  def loss_fn(self, params: PyTree, batch_stats: PyTree, extra: PyTree,
              batch: dict[str, Any], rng: jax.Array, step: jax.Array
              ) -> tuple[jax.Array, tuple[PyTree, PyTree, Metrics]]:
    """Computes the loss in the global view.

    Args:
      params: trainable parameters (differentiated).
      batch_stats: BatchNorm statistics.
      extra: the method's extra state.
      batch: the global batch, sharded over `'data'`: `views` is a tuple of
        `[global_batch, V, H, W, C]` arrays (one per crop resolution),
        `label` is `[global_batch]`.
      rng: this step's key (`fold_in(base_key, step)`).
      step: the step count before this update.

    Returns:
      `(loss, (new_batch_stats, new_extra, metrics))`, the loss a replicated
      float32 scalar and the metrics replicated scalars.
    """

  def process_grads(self, grads: PyTree, extra: PyTree,
                    step: jax.Array) -> PyTree:
    """Edits gradients before the optimizer (e.g. SwAV prototype freezing)."""
    del extra, step
    return grads

  def post_update(self, params: PyTree, extra: PyTree,
                  step: jax.Array) -> tuple[PyTree, PyTree]:
    """Applies post-optimizer rules: EMA targets, prototype normalisation.

    Args:
      params: the parameters after this step's optimizer update.
      extra: the extra state returned by `loss_fn`.
      step: the step count after this update.

    Returns:
      `(params, extra)`, possibly edited.
    """
    del step
    return params, extra

  def encoder_variables(self, params: PyTree, batch_stats: PyTree) -> PyTree:
    """Returns `{'params', 'batch_stats'}` of the encoder alone."""
    return {'params': params['encoder'],
            'batch_stats': batch_stats.get('encoder', {})}
