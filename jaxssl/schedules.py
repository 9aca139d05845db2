"""Learning-rate rules, learning-rate schedules and EMA momentum schedules.

Every schedule is an `optax.Schedule`: a pure function of the optimizer step
count (a Python int or a traced int32) returning a float32 scalar, so it runs
inside the jitted train step and is restored with the optimizer state.

The `optim_config` read here is `config.optim` (see `jaxssl/optim.py` for the
full key list); this module uses `base_learning_rate`, `lr_scaling`,
`schedule`, `warmup_epochs`, `warmup_start_lr` and `final_lr`.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Why floor: SimCLR and BYOL both compute `warmup_epochs * N // B`; a small
# slack keeps products such as 0.29 * 100 from flooring to 28.
_FLOOR_SLACK = 1e-6


def _scale_linear(base: float, global_batch_size: int) -> float:
  return base * global_batch_size / 256.


def _scale_sqrt(base: float, global_batch_size: int) -> float:
  return base * math.sqrt(global_batch_size)


def _scale_none(base: float, global_batch_size: int) -> float:
  del global_batch_size
  return base


LR_SCALINGS: dict[str, Callable[[float, int], float]] = {
    'linear': _scale_linear,
    'sqrt': _scale_sqrt,
    'none': _scale_none,
}


def _lookup(registry: dict, name: str, what: str):
  if name not in registry:
    raise ValueError(
        f"unknown {what} '{name}'; known: {', '.join(sorted(registry))}")
  return registry[name]


def peak_learning_rate(optim_config, global_batch_size: int) -> float:
  """Returns the peak learning rate after the batch-size scaling rule.

  Args:
    optim_config: `config.optim`; reads `base_learning_rate` and
      `lr_scaling` ('linear' = base * B / 256, 'sqrt' = base * sqrt(B),
      'none' = base as an absolute value, as in SwAV).
    global_batch_size: images per step, summed over all processes (B).

  Returns:
    The learning rate reached at the end of warmup, a Python float.

  References:
    Chen et al., A Simple Framework for Contrastive Learning of Visual
    Representations, 2020, appendix B.1 (linear and square-root scaling);
    google-research/simclr `model_util.learning_rate_schedule`.
  """
  scale = _lookup(LR_SCALINGS, optim_config.lr_scaling, 'lr_scaling')
  base = optim_config.base_learning_rate
  if not base > 0:
    raise ValueError(f'base_learning_rate={base} must be positive')
  if global_batch_size <= 0:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be a positive integer')
  return float(scale(base, global_batch_size))


def _half_cosine(progress: jax.Array) -> jax.Array:
  """Returns `(1 + cos(pi * progress)) / 2` for progress in [0, 1], float32.

  Computed as `cos(pi * progress / 2) ** 2`: the same value without the
  float32 cancellation of `1 + cos` near the end of a run.
  """
  return jnp.square(jnp.cos(0.5 * jnp.pi * progress))


def _warmup_cosine(peak, *, warmup_steps, steps_per_epoch, total_steps,
                   warmup_start_lr, final_lr) -> optax.Schedule:
  del steps_per_epoch
  decay_steps = total_steps - warmup_steps

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    ramp = warmup_start_lr + (peak - warmup_start_lr) * step / max(
        warmup_steps, 1)
    # Why clip: past total_steps the rate stays at the floor, as TF's
    # cosine_decay clamps its step (SimCLR, BYOL).
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0., 1.)
    cosine = final_lr + (peak - final_lr) * _half_cosine(progress)
    return jnp.where(step < warmup_steps, ramp, cosine).astype(jnp.float32)

  return schedule


def _cosine_per_epoch(peak, *, warmup_steps, steps_per_epoch, total_steps,
                      warmup_start_lr, final_lr) -> optax.Schedule:
  del warmup_steps, warmup_start_lr  # Rejected when non-zero (no warmup).
  num_epochs = total_steps / steps_per_epoch
  # First step of every epoch after the first, computed in float64 on the
  # host so a fractional steps_per_epoch never rounds a step into the wrong
  # epoch under float32.
  epoch_starts = np.ceil(
      np.arange(1, math.ceil(num_epochs)) * steps_per_epoch - _FLOOR_SLACK)
  epoch_starts = jnp.asarray(epoch_starts, jnp.int32)

  def schedule(count):
    step = jnp.asarray(count, jnp.int32)
    epoch = jnp.sum(step >= epoch_starts).astype(jnp.float32)
    progress = jnp.minimum(epoch / num_epochs, 1.)
    lr = final_lr + (peak - final_lr) * _half_cosine(progress)
    return lr.astype(jnp.float32)

  return schedule


def _constant(peak, *, warmup_steps, steps_per_epoch, total_steps,
              warmup_start_lr, final_lr) -> optax.Schedule:
  del warmup_steps, steps_per_epoch, total_steps, warmup_start_lr, final_lr

  def schedule(count):
    del count
    return jnp.asarray(peak, jnp.float32)

  return schedule


SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    'warmup_cosine': _warmup_cosine,
    'cosine_per_epoch': _cosine_per_epoch,
    'constant': _constant,
}


def _check_schedule_args(optim_config, steps_per_epoch, total_steps,
                         warmup_steps, peak):
  """Raises ValueError for inconsistent schedule settings."""
  name = optim_config.schedule
  if not steps_per_epoch > 0:
    raise ValueError(f'steps_per_epoch={steps_per_epoch} must be positive')
  if not (isinstance(total_steps, (int, np.integer)) and total_steps > 0):
    raise ValueError(f'total_steps={total_steps} must be a positive integer')
  if optim_config.warmup_epochs < 0:
    raise ValueError(
        f'warmup_epochs={optim_config.warmup_epochs} must be >= 0')
  if name != 'warmup_cosine' and optim_config.warmup_epochs:
    raise ValueError(
        f'warmup_epochs={optim_config.warmup_epochs} is not supported by '
        f"schedule '{name}'; use 0 or schedule 'warmup_cosine'")
  if warmup_steps >= total_steps:
    raise ValueError(
        f'warmup of {warmup_steps} steps (warmup_epochs='
        f'{optim_config.warmup_epochs}) must be shorter than total_steps='
        f'{total_steps}')
  if not 0 <= optim_config.warmup_start_lr <= peak:
    raise ValueError(
        f'warmup_start_lr={optim_config.warmup_start_lr} must be in '
        f'[0, peak learning rate {peak}]')
  if not 0 <= optim_config.final_lr <= peak:
    raise ValueError(
        f'final_lr={optim_config.final_lr} must be in [0, peak learning '
        f'rate {peak}]')
  if name == 'constant' and optim_config.final_lr:
    raise ValueError(
        f"final_lr={optim_config.final_lr} is unused by schedule 'constant'; "
        'set it to 0')


def make_schedule(optim_config, *, global_batch_size: int,
                  steps_per_epoch: float, total_steps: int) -> optax.Schedule:
  """Returns the learning-rate schedule of a recipe, as a function of step.

  Schedules (`optim_config.schedule`):
    * 'warmup_cosine' (SimCLR, BYOL, MoCo v3, SwAV, linear eval): linear from
      `warmup_start_lr` to the peak over `W = floor(warmup_epochs *
      steps_per_epoch)` steps, `lr(t) = start + (peak - start) * t / W`, then
      `final_lr + (peak - final_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2`,
      constant at `final_lr` after `T = total_steps`.
    * 'cosine_per_epoch' (MoCo v2): `final_lr + (peak - final_lr) * (1 +
      cos(pi * e / E)) / 2` with `e = floor(t / steps_per_epoch)` the epoch
      and `E = total_steps / steps_per_epoch`; constant within an epoch.
    * 'constant': the peak at every step.
  `warmup_start_lr` and `final_lr` are absolute rates (not batch-scaled), as
  SwAV's `start_warmup` and `final_lr`.

  Args:
    optim_config: `config.optim`.
    global_batch_size: images per step, summed over all processes.
    steps_per_epoch: optimizer steps per epoch; may be fractional
      (`N / B`), which reproduces SimCLR's `warmup_epochs * N // B`.
    total_steps: length of the run in steps (T); SimCLR uses
      `N * epochs // B + 1`, BYOL `epochs * N // B`.

  Returns:
    A jit-friendly `optax.Schedule` mapping an int step to a float32 rate.

  References:
    google-research/simclr `model_util.learning_rate_schedule`;
    deepmind-research/byol `utils/schedules.py:learning_schedule`;
    facebookresearch/swav `main_swav.py` (warmup start and cosine floor; its
    `np.linspace` ramp reaches the peak one step earlier, at W - 1);
    facebookresearch/moco `main_moco.py:adjust_learning_rate` (`--cos`);
    facebookresearch/moco-v3 `main_moco.py:adjust_learning_rate`.
  """
  build = _lookup(SCHEDULES, optim_config.schedule, 'schedule')
  peak = peak_learning_rate(optim_config, global_batch_size)
  warmup_steps = int(
      math.floor(optim_config.warmup_epochs * steps_per_epoch + _FLOOR_SLACK))
  _check_schedule_args(optim_config, steps_per_epoch, total_steps,
                       warmup_steps, peak)
  return build(
      peak, warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      warmup_start_lr=float(optim_config.warmup_start_lr),
      final_lr=float(optim_config.final_lr))


def ema_momentum_schedule(base: float, total_steps: int) -> optax.Schedule:
  """Returns the cosine EMA momentum schedule of BYOL and MoCo v3.

  `tau(k) = 1 - (1 - base) * (cos(pi * min(k, K) / K) + 1) / 2`: `base` at
  step 0, rising to 1 at step K and staying there.

  Args:
    base: momentum at step 0, in [0, 1] (BYOL 0.996, MoCo v3 0.99).
    total_steps: K, the step at which the momentum reaches 1.

  Returns:
    A jit-friendly `optax.Schedule` mapping an int step to a float32 tau.

  References:
    Grill et al., Bootstrap Your Own Latent, 2020, section 3.2;
    deepmind-research/byol `utils/schedules.py:target_ema`;
    facebookresearch/moco-v3 `main_moco.py:adjust_moco_momentum`.
  """
  if not 0 <= base <= 1:
    raise ValueError(f'EMA base momentum {base} must be in [0, 1]')
  if not (isinstance(total_steps, (int, np.integer)) and total_steps > 0):
    raise ValueError(f'total_steps={total_steps} must be a positive integer')

  def schedule(count):
    step = jnp.minimum(jnp.asarray(count, jnp.float32), total_steps)
    return (1. - (1. - base) * _half_cosine(step / total_steps)).astype(
        jnp.float32)

  return schedule
