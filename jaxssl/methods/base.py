"""The method interface: what a self-supervised method plugs into the trainer.

A method owns its networks, its extra state (EMA targets, queues,
prototypes, per-example tables), its loss and its post-update rule.
`jaxssl.steps` wires a method to an optax optimizer in one pure step
function; `jaxssl.train` runs it. All of a method's state lives in the one
`TrainState` pytree, so checkpoints and exact resume cover it.

What the trainer gives a method is one `RunInfo`; what the step passes it is
the batch entries named by `batch_keys()`: `views` always, `label` for a
method with `needs_labels`, `index` (each example's position in the train
split) for one with `needs_example_index`, so per-example state (a memory
bank, cluster assignments) is a `[num_train_examples, ...]` array in
`extra` indexed by `batch['index']`.
"""

import abc
import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from jaxssl import cpu_kernels
from jaxssl import models
from jaxssl.methods import common
from jaxssl.methods import micro_batches

PyTree = Any
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """The run facts a method is built from, resolved by the trainer.

  Attributes:
    mesh: the training mesh; loss islands run over its `'data'` axis.
    global_batch_size: images per view per step, all processes together.
    image_size: side of the (global) views.
    num_channels: channels of the input images (1 or 3).
    num_classes: label classes of the dataset (for label-using methods).
    num_train_examples: size of the train split (per-example tables).
    steps_per_epoch: optimizer steps per epoch (schedules in epochs).
    total_steps: optimizer steps of the whole run.
    factories: the encoders' conv and norm factories, picked once by the
      trainer (`cpu_kernels.select_factories`); None: XLA's ops.
    device_memory_bytes: memory of one device (`runtime.
      device_memory_bytes`), for size checks made before compiling; 0:
      unknown, no check.
    accumulation_steps: micro-batches per step (`jaxssl.methods.
      micro_batches`); BatchNorm groups are sized for one micro-batch.
  """
  mesh: Mesh
  global_batch_size: int
  image_size: int
  num_channels: int
  num_classes: int
  num_train_examples: int
  steps_per_epoch: int
  total_steps: int
  factories: cpu_kernels.Factories | None = None
  device_memory_bytes: int = 0
  accumulation_steps: int = 1

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def micro_batch_size(self) -> int:
    """Examples of one forward: `global_batch_size / accumulation_steps`."""
    return self.global_batch_size // self.accumulation_steps

  @classmethod
  def for_config(cls, config: ml_collections.ConfigDict, *, mesh: Mesh,
                 num_channels: int, steps_per_epoch: int, total_steps: int,
                 num_classes: int = 0, num_train_examples: int = 0,
                 factories: cpu_kernels.Factories | None = None,
                 device_memory_bytes: int = 0) -> 'RunInfo':
    """A RunInfo taking the batch and image size from `config`."""
    return cls(mesh=mesh, global_batch_size=config.global_batch_size,
               image_size=config.dataset.image_size,
               num_channels=num_channels, num_classes=num_classes,
               num_train_examples=num_train_examples,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               factories=factories, device_memory_bytes=device_memory_bytes,
               accumulation_steps=config.accumulation_steps)


class Aux(NamedTuple):
  """What `loss_fn` returns beside the loss.

  Attributes:
    batch_stats: the new BatchNorm statistics.
    extra: the new extra state.
    metrics: replicated float32 scalars.
    features: `[global_batch, V, feature_dim]` online-encoder features of
      the V views the online probe trains on (`jaxssl.online_probe`), or
      None (the probe is then refused while the step is traced, before
      anything compiles). Each method names
      its views: SimCLR both (TF2's `head_supervised`), BYOL view 1 (its
      `classif_loss`), MoCo v2 the queries' view, the others every global
      view.
  """
  batch_stats: PyTree
  extra: PyTree
  metrics: Metrics
  features: jax.Array | None = None


class Method(abc.ABC):
  """Base class of the pretraining methods registered in `METHODS`.

  Subclasses set `name` and implement `default_config`, `encoder`, `init`
  and `compute_loss`. A method with an EMA target sets `self.ema` (a
  `common.EmaTarget`) in `__init__` and keeps the target state in
  `extra['target']`; the base class moves it at the official timing:
  `loss_fn` before the forward, `post_update` after the optimizer update.
  """

  name: str = ''
  needs_labels: bool = False
  needs_example_index: bool = False
  # How `accumulation_steps` > 1 keeps the whole batch's gradient
  # (`micro_batches.ACCUMULATION_KINDS`): 'gradient_cache' for a loss that
  # couples examples (the method wraps its forwards in `accumulated`),
  # 'average' for a mean of per-example terms (the step averages the
  # micro-batches' gradients).
  accumulation: str = 'gradient_cache'

  def __init__(self, config: ml_collections.ConfigDict, run: RunInfo):
    """Builds the method's networks from the run config and `run`."""
    self.config = config
    self.run = run
    self.mesh = run.mesh
    self.num_channels = run.num_channels
    self.image_size = run.image_size
    self.steps_per_epoch = run.steps_per_epoch
    self.total_steps = run.total_steps
    self.factories = run.factories
    self.ema: common.EmaTarget | None = None
    self.accumulated_forwards = 0
    if self.accumulation not in micro_batches.ACCUMULATION_KINDS:
      raise ValueError(f'{type(self).__name__}.accumulation='
                       f'{self.accumulation!r} is not one of '
                       f'{", ".join(micro_batches.ACCUMULATION_KINDS)}')

  def accumulated(self, forward):
    """`forward` run in the step's micro-batches (gradient cache).

    A 'gradient_cache' method wraps each train-mode forward with it; with
    `accumulation_steps` = 1, or for an 'average' method (whose step
    already sees one micro-batch), `forward` itself is returned.

    Args:
      forward: `(params, batch_stats, inputs, **kw) -> (outputs,
        batch_stats)`, inputs and outputs example-major (see
        `micro_batches.micro_batched`).
    """
    k = (self.run.accumulation_steps
         if self.accumulation == 'gradient_cache' else 1)
    self.accumulated_forwards += 1  # counted while the step is traced
    return micro_batches.micro_batched(forward, k, self.mesh)

  @classmethod
  def batch_keys(cls) -> tuple[str, ...]:
    """The batch entries the step passes to `loss_fn`."""
    return (('views',) + (('label',) if cls.needs_labels else ())
            + (('index',) if cls.needs_example_index else ()))

  def make_encoder(self, *, bn_groups: int = 1):
    """`models.make_encoder` for this run's images and `factories`."""
    layers = {} if self.factories is None else {
        'conv': self.factories.conv, 'norm': self.factories.norm}
    return models.make_encoder(self.config.model, image_size=self.image_size,
                               bn_groups=bn_groups, **layers)

  def head_hidden_dim(self) -> int:
    """`head.hidden_dim`, or the encoder's feature dimension if 0."""
    return (self.config.head.hidden_dim
            or models.feature_dim(self.config.model))

  def resolved(self) -> dict[str, Any]:
    """The config sentinels this method resolved, `{'key': value}`."""
    return {'head.hidden_dim': self.head_hidden_dim()}

  @property
  def fixed_lr_mask(self):
    """None, or `params -> bool pytree` of the leaves the optimizer keeps
    at the peak learning rate (SimSiam's `--fix-pred-lr`)."""
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
    """Returns `(params, batch_stats, extra)` at step 0 from a typed key
    identical on every process."""

  @abc.abstractmethod
  def compute_loss(self, params: PyTree, batch_stats: PyTree, extra: PyTree,
                   batch: dict[str, Any], rng: jax.Array, step: jax.Array
                   ) -> tuple[jax.Array, Aux]:
    """The method's loss in the global view (see `loss_fn`); an EMA target
    in `extra['target']` has already moved if its timing is
    'before_forward'."""

  def loss_fn(self, params: PyTree, batch_stats: PyTree, extra: PyTree,
              batch: dict[str, Any], rng: jax.Array, step: jax.Array
              ) -> tuple[jax.Array, Aux]:
    """Moves a 'before_forward' EMA target, then `compute_loss`.

    Args:
      params: trainable parameters (differentiated).
      batch_stats: BatchNorm statistics.
      extra: the method's extra state.
      batch: the global batch, sharded over `'data'`, with `batch_keys()`:
        `views` a tuple of `[global_batch, V, H, W, C]` arrays (one per
        crop resolution), `label` and `index` `[global_batch]` int32.
      rng: this step's key (`fold_in(base_key, step)`).
      step: the number of updates applied before this one.

    Returns:
      `(loss, Aux)`, the loss a replicated float32 scalar.
    """
    extra = self.before_forward(params, extra, step)
    return self.compute_loss(params, batch_stats, extra, batch, rng, step)

  def before_forward(self, params: PyTree, extra: PyTree,
                     step: jax.Array) -> PyTree:
    """Moves a 'before_forward' EMA target (once per step); returns extra."""
    if self.ema is not None and self.ema.timing == 'before_forward':
      extra = dict(extra, target=self.ema.update(extra['target'], params,
                                                 step))
    return extra

  def process_grads(self, grads: PyTree, extra: PyTree,
                    step: jax.Array) -> PyTree:
    """Edits gradients before the optimizer (e.g. SwAV prototype freezing)."""
    del extra, step
    return grads

  def post_update(self, params: PyTree, extra: PyTree,
                  step: jax.Array) -> tuple[PyTree, PyTree]:
    """Moves an 'after_update' EMA target, then `after_update`.

    Args:
      params: the parameters after this step's optimizer update.
      extra: the extra state returned by `loss_fn`.
      step: the number of updates applied, this one included.

    Returns:
      `(params, extra)`, possibly edited.
    """
    if self.ema is not None and self.ema.timing == 'after_update':
      # The momentum is that of the count before this update (BYOL's
      # `global_step` when the target moves).
      extra = dict(extra, target=self.ema.update(extra['target'], params,
                                                 step - 1))
    return self.after_update(params, extra, step)

  def after_update(self, params: PyTree, extra: PyTree,
                   step: jax.Array) -> tuple[PyTree, PyTree]:
    """Hook for post-optimizer rules (prototype normalisation); default
    none. Arguments as in `post_update`."""
    del step
    return params, extra

  def encoder_variables(self, params: PyTree, batch_stats: PyTree) -> PyTree:
    """Returns `{'params', 'batch_stats'}` of the encoder alone."""
    return {'params': params['encoder'],
            'batch_stats': batch_stats.get('encoder', {})}
