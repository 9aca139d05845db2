"""Tests for jaxssl.schedules: LR rules, LR schedules, EMA momentum schedules.

Expected values come from float64 numpy re-statements of each official
schedule (SimCLR TF1, BYOL, MoCo v2/v3, SwAV) or from hand computation.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxssl import schedules

IMAGENET_TRAIN = 1281167
# float32 schedules: relative accuracy, plus an absolute floor (a billionth of
# the peak) for the values within a few steps of a zero-floor cosine's end.
RTOL = 1e-5
ATOL_PER_PEAK = 1e-9


def _config(**overrides):
  values = dict(
      name='lars', lars_variant='simclr', exclude='bias_and_norm',
      base_learning_rate=0.3, lr_scaling='linear', weight_decay=1e-6,
      momentum=0.9, nesterov=False, trust_coefficient=1e-3,
      schedule='warmup_cosine', warmup_epochs=10., warmup_start_lr=0.,
      final_lr=0.)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _evaluate(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


# ---------------------------------------------------------------- LR rules


@pytest.mark.parametrize('rule, base, batch, expected', [
    ('linear', 0.3, 4096, 4.8),            # SimCLR v1 README
    ('sqrt', 0.075, 4096, 4.8),            # SimCLR v2 README
    ('linear', 0.2, 512, 0.4),             # BYOL 1000-epoch preset
    ('sqrt', 0.075, 256, 1.2),
    ('none', 4.8, 4096, 4.8),              # SwAV absolute
    ('none', 0.03, 256, 0.03),             # MoCo v2 absolute
])
def test_peak_learning_rate(rule, base, batch, expected):
  cfg = _config(lr_scaling=rule, base_learning_rate=base)
  assert schedules.peak_learning_rate(cfg, batch) == pytest.approx(
      expected, rel=1e-12)


@pytest.mark.parametrize('overrides, batch, match', [
    (dict(lr_scaling='quadratic'), 256,
     r"^unknown lr_scaling 'quadratic'; known: linear, none, sqrt$"),
    (dict(base_learning_rate=0.), 256, r'^base_learning_rate=0.0 must be'),
    (dict(base_learning_rate=-0.1), 256, r'^base_learning_rate=-0.1 must be'),
    ({}, 0, r'^global_batch_size=0 must be a positive integer$'),
])
def test_peak_learning_rate_errors(overrides, batch, match):
  with pytest.raises(ValueError, match=match) as err:
    schedules.peak_learning_rate(_config(**overrides), batch)
  assert '\n' not in str(err.value)


# ------------------------------------------------- official references


def _simclr_reference(step, *, base, rule, batch, epochs, warmup_epochs):
  """google-research/simclr model_util.learning_rate_schedule, float64."""
  scaled = base * batch / 256. if rule == 'linear' else base * math.sqrt(batch)
  warmup = int(round(warmup_epochs * IMAGENET_TRAIN // batch))
  total = IMAGENET_TRAIN * epochs // batch + 1
  if step < warmup:
    return step / warmup * scaled
  decay_step = min(step - warmup, total - warmup)   # tf cosine_decay clamp
  return scaled * 0.5 * (1 + math.cos(math.pi * decay_step / (total - warmup)))


def _byol_reference(step, *, base, batch, epochs, warmup_epochs):
  """deepmind-research/byol utils/schedules.learning_schedule, float64."""
  scaled = base * batch / 256.
  warmup = warmup_epochs * IMAGENET_TRAIN // batch
  total = epochs * IMAGENET_TRAIN // batch
  if step < warmup:
    return step / warmup * scaled
  s = min(step - warmup, total - warmup)
  return scaled * 0.5 * (1 + math.cos(math.pi * s / (total - warmup)))


def _moco_v3_reference(step, *, base, batch, epochs, warmup_epochs, iters):
  """facebookresearch/moco-v3 adjust_learning_rate at epoch + i / iters."""
  lr = base * batch / 256
  epoch = step / iters
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return lr * 0.5 * (1. + math.cos(
      math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def _swav_cosine_reference(step, *, base, final, epochs, warmup_epochs, iters):
  """facebookresearch/swav main_swav cosine part (t counted after warmup)."""
  t = step - iters * warmup_epochs
  return final + 0.5 * (base - final) * (
      1 + math.cos(math.pi * t / (iters * (epochs - warmup_epochs))))


def _probe_steps(warmup, total):
  return sorted({0, 1, max(warmup - 1, 0), warmup, warmup + 1,
                 (warmup + total) // 2, total - 1, total, total + 57})


@pytest.mark.parametrize('rule, base, batch, epochs', [
    ('sqrt', 0.075, 4096, 100),    # SimCLR v2 README recipe
    ('linear', 0.3, 4096, 100),    # SimCLR v1 recipe
    ('linear', 0.3, 1024, 90),
])
def test_warmup_cosine_matches_simclr(rule, base, batch, epochs):
  cfg = _config(lr_scaling=rule, base_learning_rate=base, warmup_epochs=10.)
  total = IMAGENET_TRAIN * epochs // batch + 1
  schedule = schedules.make_schedule(
      cfg, global_batch_size=batch, steps_per_epoch=IMAGENET_TRAIN / batch,
      total_steps=total)
  warmup = 10 * IMAGENET_TRAIN // batch
  steps = _probe_steps(warmup, total)
  expected = [_simclr_reference(s, base=base, rule=rule, batch=batch,
                                epochs=epochs, warmup_epochs=10) for s in steps]
  peak = schedules.peak_learning_rate(cfg, batch)
  np.testing.assert_allclose(_evaluate(schedule, steps), expected, rtol=RTOL,
                             atol=ATOL_PER_PEAK * peak)


def test_simclr_warmup_end_and_last_step_by_hand():
  # 10 epochs at B=4096: 12811670 // 4096 = 3127 warmup steps; peak 4.8.
  total = IMAGENET_TRAIN * 100 // 4096 + 1
  assert total == 31279
  schedule = schedules.make_schedule(
      _config(lr_scaling='sqrt', base_learning_rate=0.075),
      global_batch_size=4096, steps_per_epoch=IMAGENET_TRAIN / 4096,
      total_steps=total)
  assert float(schedule(3126)) == pytest.approx(4.8 * 3126 / 3127, rel=RTOL)
  assert float(schedule(3127)) == pytest.approx(4.8, rel=RTOL)
  assert float(schedule(total)) == pytest.approx(0., abs=1e-6)
  assert float(schedule(0)) == 0.


@pytest.mark.parametrize('base, epochs', [(0.2, 1000), (0.45, 100)])
def test_warmup_cosine_matches_byol(base, epochs):
  batch = 4096
  total = epochs * IMAGENET_TRAIN // batch
  schedule = schedules.make_schedule(
      _config(base_learning_rate=base), global_batch_size=batch,
      steps_per_epoch=IMAGENET_TRAIN / batch, total_steps=total)
  warmup = 10 * IMAGENET_TRAIN // batch
  steps = _probe_steps(warmup, total)
  expected = [_byol_reference(s, base=base, batch=batch, epochs=epochs,
                              warmup_epochs=10) for s in steps]
  np.testing.assert_allclose(_evaluate(schedule, steps), expected, rtol=RTOL,
                             atol=ATOL_PER_PEAK * base * batch / 256)


def test_warmup_cosine_matches_moco_v3():
  batch, epochs, iters = 4096, 100, IMAGENET_TRAIN // 4096
  schedule = schedules.make_schedule(
      _config(base_learning_rate=0.6), global_batch_size=batch,
      steps_per_epoch=iters, total_steps=epochs * iters)
  steps = _probe_steps(10 * iters, epochs * iters)[:-1]   # within the run
  expected = [_moco_v3_reference(s, base=0.6, batch=batch, epochs=epochs,
                                 warmup_epochs=10, iters=iters) for s in steps]
  np.testing.assert_allclose(_evaluate(schedule, steps), expected, rtol=RTOL,
                             atol=ATOL_PER_PEAK * 9.6)


def test_swav_warmup_start_and_cosine_floor():
  iters, epochs, warmup_epochs = IMAGENET_TRAIN // 4096, 800, 10
  total, warmup = iters * epochs, iters * warmup_epochs
  cfg = _config(lr_scaling='none', base_learning_rate=4.8, warmup_start_lr=0.3,
                final_lr=0.0048, weight_decay=1e-6)
  schedule = schedules.make_schedule(
      cfg, global_batch_size=4096, steps_per_epoch=iters, total_steps=total)
  # Warmup: linear from the absolute start 0.3 to the absolute peak 4.8.
  ramp_steps = [0, 1, warmup // 2, warmup - 1]
  ramp = [0.3 + (4.8 - 0.3) * s / warmup for s in ramp_steps]
  np.testing.assert_allclose(_evaluate(schedule, ramp_steps), ramp, rtol=RTOL)
  # After warmup: exactly SwAV's cosine with floor final_lr.
  cos_steps = [warmup, warmup + 1, (warmup + total) // 2, total - 1]
  cosine = [_swav_cosine_reference(s, base=4.8, final=0.0048, epochs=epochs,
                                   warmup_epochs=warmup_epochs, iters=iters)
            for s in cos_steps]
  np.testing.assert_allclose(_evaluate(schedule, cos_steps), cosine,
                             rtol=RTOL)
  assert float(schedule(total)) == pytest.approx(0.0048, rel=RTOL)
  assert float(schedule(total + 1000)) == pytest.approx(0.0048, rel=RTOL)


@pytest.mark.parametrize('steps_per_epoch, num_epochs', [
    (5004, 200),   # MoCo v2 ImageNet: 1281167 // 256 steps, 200 epochs
    (7, 10),
])
def test_cosine_per_epoch_matches_moco_v2(steps_per_epoch, num_epochs):
  cfg = _config(lr_scaling='none', base_learning_rate=0.03,
                schedule='cosine_per_epoch', warmup_epochs=0.)
  total = steps_per_epoch * num_epochs
  schedule = schedules.make_schedule(
      cfg, global_batch_size=256, steps_per_epoch=steps_per_epoch,
      total_steps=total)
  spe = steps_per_epoch
  steps = [0, 1, spe - 1, spe, spe + 1, 3 * spe - 1, 3 * spe,
           (num_epochs // 2) * spe, total - 1]
  expected = [0.03 * 0.5 * (1. + math.cos(math.pi * (s // spe) / num_epochs))
              for s in steps]
  np.testing.assert_allclose(_evaluate(schedule, steps), expected, rtol=RTOL,
                             atol=ATOL_PER_PEAK * 0.03)


def test_cosine_per_epoch_fractional_steps_per_epoch():
  # 2.5 steps per epoch: step s lies in epoch floor(s / 2.5).
  cfg = _config(lr_scaling='none', base_learning_rate=1.,
                schedule='cosine_per_epoch', warmup_epochs=0.)
  schedule = schedules.make_schedule(
      cfg, global_batch_size=256, steps_per_epoch=2.5, total_steps=25)
  steps = np.arange(25)
  expected = 0.5 * (1. + np.cos(np.pi * np.floor(steps / 2.5) / 10.))
  np.testing.assert_allclose(_evaluate(schedule, steps), expected, rtol=RTOL,
                             atol=ATOL_PER_PEAK)


def test_linear_eval_schedule_without_warmup():
  # SimCLR linear eval: 0.1 * B / 256, cosine from the first step to 0.
  cfg = _config(base_learning_rate=0.1, warmup_epochs=0.)
  schedule = schedules.make_schedule(
      cfg, global_batch_size=4096, steps_per_epoch=10, total_steps=100)
  assert float(schedule(0)) == pytest.approx(1.6, rel=RTOL)
  assert float(schedule(50)) == pytest.approx(0.8, rel=RTOL)
  assert float(schedule(25)) == pytest.approx(
      0.8 * (1 + math.cos(math.pi / 4)), rel=RTOL)
  assert float(schedule(100)) == pytest.approx(0., abs=1e-6)


def test_constant_schedule():
  schedule = schedules.make_schedule(
      _config(schedule='constant', warmup_epochs=0.), global_batch_size=512,
      steps_per_epoch=10, total_steps=100)
  assert _evaluate(schedule, [0, 50, 100, 1000]).tolist() == pytest.approx(
      [0.6] * 4, rel=RTOL)


@pytest.mark.parametrize('name', ['warmup_cosine', 'cosine_per_epoch'])
def test_schedule_is_jittable(name):
  cfg = _config(schedule=name,
                warmup_epochs=2. if name == 'warmup_cosine' else 0.)
  schedule = schedules.make_schedule(
      cfg, global_batch_size=256, steps_per_epoch=10, total_steps=100)
  jitted = jax.jit(schedule)
  for step in [0, 7, 20, 21, 63, 99, 100]:
    traced = float(jitted(jnp.asarray(step, jnp.int32)))
    assert traced == pytest.approx(float(schedule(step)), rel=RTOL)
    assert jitted(jnp.asarray(step, jnp.int32)).dtype == jnp.float32


@pytest.mark.parametrize('overrides, kwargs, match', [
    (dict(schedule='step'), {},
     r"^unknown schedule 'step'; known: constant, cosine_per_epoch, "
     r'warmup_cosine$'),
    (dict(warmup_epochs=10.), dict(total_steps=100),
     r'^warmup of 100 steps \(warmup_epochs=10.0\) must be shorter than '
     r'total_steps=100$'),
    (dict(warmup_epochs=-1.), {}, r'^warmup_epochs=-1.0 must be >= 0$'),
    (dict(schedule='cosine_per_epoch', warmup_epochs=1.), {},
     r"^warmup_epochs=1.0 is not supported by schedule 'cosine_per_epoch'"),
    (dict(schedule='constant', warmup_epochs=0., final_lr=0.1), {},
     r"^final_lr=0.1 is unused by schedule 'constant'"),
    (dict(final_lr=-0.1), {}, r'^final_lr=-0.1 must be in \[0, peak'),
    (dict(final_lr=5.), {}, r'^final_lr=5.0 must be in \[0, peak'),
    (dict(warmup_start_lr=-1.), {}, r'^warmup_start_lr=-1.0 must be in'),
    ({}, dict(steps_per_epoch=0), r'^steps_per_epoch=0 must be positive$'),
    ({}, dict(total_steps=0), r'^total_steps=0 must be a positive integer$'),
    ({}, dict(total_steps=1000.), r'^total_steps=1000.0 must be a positive'),
])
def test_make_schedule_errors(overrides, kwargs, match):
  args = dict(global_batch_size=256, steps_per_epoch=10, total_steps=1000)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match) as err:
    schedules.make_schedule(_config(**overrides), **args)
  assert '\n' not in str(err.value)


# ------------------------------------------------------ EMA momentum


@pytest.mark.parametrize('base, total', [(0.996, 1000), (0.99, 31200)])
def test_ema_momentum_schedule_matches_formula(base, total):
  schedule = schedules.ema_momentum_schedule(base, total)
  steps = [0, 1, total // 4, total // 2, total - 1, total, 2 * total]
  expected = [1 - (1 - base) * (math.cos(math.pi * min(k, total) / total) + 1)
              / 2 for k in steps]
  np.testing.assert_allclose(_evaluate(schedule, steps), expected, rtol=1e-7)


def test_ema_momentum_schedule_by_hand():
  schedule = schedules.ema_momentum_schedule(0.996, 1000)
  assert float(schedule(0)) == pytest.approx(0.996, rel=1e-7)
  assert float(schedule(500)) == pytest.approx(0.998, rel=1e-7)
  assert float(schedule(1000)) == 1.
  assert float(schedule(5000)) == 1.


def test_ema_momentum_schedule_matches_moco_v3_per_iteration():
  # moco-v3 adjust_moco_momentum at epoch + i / iters.
  iters, epochs, base = 312, 100, 0.99
  schedule = schedules.ema_momentum_schedule(base, iters * epochs)
  for step in [0, 155, 312 * 37 + 11, 312 * 100 - 1]:
    epoch = step / iters
    expected = 1. - 0.5 * (1. + math.cos(math.pi * epoch / epochs)) * (1 - base)
    assert float(jax.jit(schedule)(step)) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize('base, total, match', [
    (1.5, 100, r'^EMA base momentum 1.5 must be in \[0, 1\]$'),
    (-0.1, 100, r'^EMA base momentum -0.1 must be in \[0, 1\]$'),
    (0.99, 0, r'^total_steps=0 must be a positive integer$'),
])
def test_ema_momentum_schedule_errors(base, total, match):
  with pytest.raises(ValueError, match=match):
    schedules.ema_momentum_schedule(base, total)
