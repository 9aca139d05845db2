"""Pure step factories. `jaxssl.train` jits them, in one place.

The train state is one pytree, and all of it is checkpointed: step, params,
BatchNorm statistics, optimizer state, the base PRNG key, the method's
extra state (EMA targets, queues) and the online probe's state.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from jaxssl import online_probe
from jaxssl.augment import device
from jaxssl.methods import base
from jaxssl.methods import micro_batches

PyTree = Any
# fold_in constant of the device augmentation's key, apart from the key the
# method's loss_fn receives (which stays what it is without it).
AUGMENT_STREAM = 0x617567  # 'aug'
# fold_in constant of the online probe's init key, apart from the method's.
PROBE_STREAM = 0x70726f  # 'pro'


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly.

  Attributes:
    step: int32 scalar, the number of updates applied.
    params: trainable parameters (replicated).
    batch_stats: BatchNorm running statistics (replicated).
    opt_state: optax state (replicated).
    rng: uint32 `[2]` raw key data of the base key (`jax.random.key_data`),
      kept raw so that checkpoints hold plain arrays.
    extra: the method's extra state (`{}` for SimCLR).
    probe: the online probe's `{'params', 'opt_state'}`
      (`jaxssl.online_probe`), or `{}` without one.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array
  extra: PyTree
  probe: PyTree


def make_init_fn(method: base.Method, optimizer: optax.GradientTransformation,
                 seed: int, probe: online_probe.OnlineProbe | None = None
                 ) -> Callable[[], TrainState]:
  """Returns `() -> TrainState` at step 0; identical on every process.

  The probe's key is folded from the seed's key apart from the method's, so
  the method starts the same with or without a probe.
  """

  def init() -> TrainState:
    key = jax.random.key(seed)
    init_key, base_key = jax.random.split(key)
    params, batch_stats, extra = method.init(init_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=optimizer.init(params), rng=jax.random.key_data(base_key),
        extra=extra,
        probe={} if probe is None else probe.init(
            jax.random.fold_in(key, PROBE_STREAM)))

  return init


def make_train_step(method: base.Method,
                    optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    probe: online_probe.OnlineProbe | None = None):
  """Returns the pure `(state, batch) -> (state, metrics)` update.

  Args:
    method: the pretraining method (loss, extra state, post-update rule).
    optimizer: the optax transformation built for `schedule`.
    schedule: the learning-rate schedule, for the `learning_rate` metric.
    probe: the online probe, trained on the method's `Aux.features` and
      the batch's `label` after the method's own gradient is taken; None:
      no probe.

  The per-step key is `fold_in(base_key, step)`, so a resumed run uses the
  keys an uninterrupted run would. The batch's views are the host's crops;
  their colour, grayscale, blur and solarize steps run here, before the
  loss, keyed by `fold_in(step key, AUGMENT_STREAM)`
  (`augment.device.finish_views`). The method sees only the batch entries
  it declares (`method.batch_keys()`); the labels reach the probe only.
  Metrics are replicated float32 scalars. With `accumulation_steps` > 1
  the gradient is still the whole batch's (`value_and_grad`).
  """

  def train_step(state: TrainState, batch: dict[str, Any]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = dict(batch, views=device.finish_views(
        batch['views'], jax.random.fold_in(rng, AUGMENT_STREAM),
        method.config.augment))
    labels = batch.get('label')
    batch = {key: batch[key] for key in method.batch_keys()}

    (loss, aux), grads = value_and_grad(method, state, batch, rng)
    batch_stats, extra, metrics = aux.batch_stats, aux.extra, aux.metrics
    grads = method.process_grads(grads, extra, state.step)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    params, extra = method.post_update(params, extra, step)
    probe_state = state.probe
    if probe is not None:
      probe_state, probe_metrics = probe.step(state.probe, aux.features,
                                              labels)
      metrics = dict(metrics, **probe_metrics)
    metrics = dict(metrics, loss=loss,
                   learning_rate=schedule(state.step),
                   grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params),
                   update_norm=optax.tree.norm(updates))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    new_state = state.replace(step=step, params=params,
                              batch_stats=batch_stats, opt_state=opt_state,
                              extra=extra, probe=probe_state)
    return new_state, metrics

  return train_step


def value_and_grad(method: base.Method, state: TrainState,
                   batch: dict[str, Any], rng: jax.Array):
  """The method's loss, `Aux` and gradient for the whole global batch.

  With `accumulation_steps` k > 1, a 'gradient_cache' method runs its
  forwards in k micro-batches itself (`base.Method.accumulated`), and an
  'average' method's loss is taken per micro-batch, its gradients averaged
  (`micro_batches.average_value_and_grad`; its 'before_forward' EMA target
  moves once, before the first).

  Args:
    method: the pretraining method.
    state: the state before the step (its params are differentiated).
    batch: the global batch with `method.batch_keys()`.
    rng: this step's key.

  Returns:
    `((loss, aux), grads)`, as `jax.value_and_grad(has_aux=True)`.
  """
  k = method.run.accumulation_steps
  if k == 1 or method.accumulation == 'gradient_cache':
    def loss_fn(params):
      return method.loss_fn(params, state.batch_stats, state.extra, batch,
                            rng, state.step)
    before = method.accumulated_forwards
    result = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if k > 1 and method.accumulated_forwards == before:
      raise ValueError(
          f'accumulation_steps={k}: method {method.name!r} is '
          "'gradient_cache' but runs no forward through "
          "`self.accumulated`; wrap its forwards, or declare accumulation = "
          "'average' for a per-example loss (docs/adding-a-method.md)")
    return result

  def micro_loss(params, batch_stats, extra, micro_batch, micro_rng):
    return method.compute_loss(params, batch_stats, extra, micro_batch,
                               micro_rng, state.step)

  extra = method.before_forward(state.params, state.extra, state.step)
  (loss, (stats, extra, metrics, features)), grads = (
      micro_batches.average_value_and_grad(
          micro_loss, state.params, state.batch_stats, extra, batch, rng, k,
          method.mesh))
  return (loss, base.Aux(stats, extra, metrics, features)), grads
