"""Metrics out of the trainer: TensorBoard event files and a progress line.

Only process 0 writes (clu's writer logs only on the other processes). Step
metrics stay on device until a log step, then are fetched together, so the
training loop never blocks on a single step's scalars.
"""

import math
import re
import time
from typing import Any

import jax
import numpy as np
from clu import metric_writers


GUARDED_METRICS = ('loss', 'grad_norm', 'param_norm', 'update_norm')
_KNN_TOP1 = re.compile(r'knn_k\d+_top1')


class NonFiniteLossError(FloatingPointError):
  """A guarded metric became NaN or infinite; the run stops without saving."""


def format_duration(seconds: float) -> str:
  """`1h02m03s`, `4m05s` or `6s`."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{secs:02d}s'
  return f'{minutes}m{secs:02d}s' if minutes else f'{secs}s'


class Reporter:
  """Collects per-step metrics and writes them every `log_every_steps`."""

  def __init__(self, workdir: str, *, total_steps: int,
               global_batch_size: int, start_step: int):
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    self._total = total_steps
    self._batch = global_batch_size
    self._pending: list[dict[str, jax.Array]] = []
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self.last_metrics: dict[str, float] = {}
    self._monitors: dict[str, float] = {}  # the latest `write_monitors`

  def add(self, metrics: dict[str, jax.Array]) -> None:
    """Queues one step's metrics (device arrays; not fetched yet)."""
    self._pending.append(metrics)

  def check_finite(self, step: int) -> None:
    """Raises NonFiniteLossError if a queued guarded metric is not finite.

    The guarded metrics are big_vision's: the loss and the norms of the
    gradient, the parameters and the update (`GUARDED_METRICS`); a step whose
    update blows up can still report a finite loss.
    """
    if not self._pending:
      return
    names = [k for k in GUARDED_METRICS if k in self._pending[0]]
    values = np.asarray(jax.device_get(
        [[m[k] for k in names] for m in self._pending]), np.float64)
    bad_steps, bad_names = np.nonzero(~np.isfinite(values))
    if bad_steps.size:
      first = step - len(values) + int(bad_steps[0]) + 1
      name = names[int(bad_names[0])]
      raise NonFiniteLossError(
          f'non-finite {name} {values[bad_steps[0], bad_names[0]]} at step '
          f'{first}; stopping without saving, the last good checkpoint is '
          'kept (lower the learning rate or check the input data)')

  def write(self, step: int) -> dict[str, float]:
    """Averages the queued metrics, writes them, prints the progress line."""
    self.check_finite(step)
    fetched = jax.device_get(self._pending)
    self._pending = []
    metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    now = time.perf_counter()
    steps = step - self._last_step
    seconds = max(now - self._last_time, 1e-9)
    metrics['steps_per_sec'] = steps / seconds
    metrics['seconds_per_step'] = seconds / max(steps, 1)
    metrics['images_per_sec'] = steps * self._batch / seconds
    self._last_step, self._last_time = step, now
    self._writer.write_scalars(step, metrics)
    self.last_metrics = metrics
    if jax.process_index() == 0:
      print(self.progress_line(step, metrics), flush=True)
    return metrics

  def progress_line(self, step: int, metrics: dict[str, float]) -> str:
    eta = (self._total - step) / max(metrics['steps_per_sec'], 1e-9)
    parts = [f'step {step}/{self._total}', f'loss {metrics["loss"]:.4f}']
    if 'contrast_acc' in metrics:
      parts.append(f'acc {metrics["contrast_acc"]:.3f}')
    if 'online_probe_top1' in metrics:
      parts.append(f'probe {metrics["online_probe_top1"]:.3f}')
    knn = sorted((int(name[5:-5]), value) for name, value in
                 self._monitors.items() if _KNN_TOP1.fullmatch(name))
    if knn:  # the smallest k's latest figure
      parts.append(f'kNN-{knn[0][0]} {knn[0][1]:.3f}')
    parts += [f'lr {metrics["learning_rate"]:.4g}',
              f'{metrics["images_per_sec"]:.0f} img/s',
              f'ETA {format_duration(eta) if math.isfinite(eta) else "?"}']
    return ' | '.join(parts)

  def write_monitors(self, step: int, metrics: dict[str, float]) -> None:
    """Writes the periodic kNN and health metrics and prints them; the
    progress line shows the latest kNN top-1 from then on."""
    self._writer.write_scalars(step, metrics)
    self._monitors = dict(metrics)
    if jax.process_index() == 0:
      parts = [f'{name} {value:.4g}' for name, value in sorted(metrics.items())]
      print(f'monitors at step {step}: ' + ' | '.join(parts), flush=True)
    self._last_time = time.perf_counter()  # not counted as training time

  def write_hparams(self, hparams: dict[str, Any]) -> None:
    self._writer.write_hparams(hparams)

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()


def evaluation_scalars(entry: dict[str, Any]) -> dict[str, float]:
  """One encoder's `evaluate.run` entry as scalars named as the monitors'.

  `linear_<protocol>_top1`, `knn_k<k>_top1` and `_top5`, `rankme`,
  `alignment`, `uniformity`, `finetune_<fraction>_top1`.
  """
  scalars = {f'linear_{protocol}_top1': r['top1']
             for protocol, r in entry['linear'].items()}
  for name, r in (entry['knn'] or {}).items():
    scalars.update({f'knn_{name}_top1': r['top1'],
                    f'knn_{name}_top5': r['top5']})
  scalars.update(entry['health'] or {})
  for fraction, r in (entry.get('finetune') or {}).items():
    scalars[f'finetune_{fraction}_top1'] = r['top1']
  return scalars


def write_scalars(workdir: str, step: int, scalars: dict[str, float]) -> None:
  """Writes `scalars` at `step` to the workdir's TensorBoard events."""
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()
