"""The sections of the accelerator check: commands, sizes, time caps, figures.

Each section is one `python -m jaxssl.bench ... --json` command (or the
environment probe of `device_check`), with its sizes on the GPU and its
tiny sizes for the CPU dry run, a time cap, and a function that keeps the
headline figures of its report. `{case_timeout}` in a command is replaced
by the section's time limit less a margin, so a bench that runs its cases
in children stops them itself and still prints its report.
"""

import dataclasses
from typing import Callable

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Section:
  """One command of the check.

  Attributes:
    name: the report's key.
    argv: arguments after `python` on the accelerator.
    dry_argv: the same with tiny sizes, for the CPU dry run.
    cap_s: its time limit on the accelerator (the budget may cut it).
    min_s: the least time worth starting it with; the budget keeps this
      much for every later section.
    figures: the headline figures of its JSON report.
    problem: why its report counts as failed, or None.
  """
  name: str
  argv: tuple[str, ...]
  dry_argv: tuple[str, ...]
  cap_s: float
  min_s: float
  figures: Callable[[dict], dict]
  problem: Callable[[dict], str | None]


def pick(record: dict, keys, scale: dict | None = None) -> dict:
  """`{key: record[key]}` for the keys present and not None, some scaled.

  `scale` renames and divides: `{'peak_bytes': ('peak_gib', GIB)}`.
  """
  out = {}
  for key in keys:
    if record.get(key) is not None:
      out[key] = record[key]
  for key, (name, divisor) in (scale or {}).items():
    if record.get(key) is not None:
      out[name] = record[key] / divisor
  return out


def _report_ok(report: dict) -> str | None:
  return None if report.get('ok', True) else 'the report says ok=false'


# ------------------------------------------------------------------ peak --


def _peak_figures(report: dict) -> dict:
  result = report['result']
  return {'device': result.get('device'),
          'tflop_per_s': {dtype: value / 1e12 for dtype, value in
                          result.get('peak_flops_per_s', {}).items()},
          'sizes': sorted({r['size'] for r in result.get('results', [])})}


def _peak_problem(report: dict) -> str | None:
  result = report['result']
  return (None if result['status'] == 'ok'
          else f'peak: {result.get("reason", result["status"])}')


# ------------------------------------------------------------------ step --

_STEP_KEYS = ('status', 'device', 'encoder', 'dtype', 'kernels_resolved',
              'global_batch_size', 'views_per_image', 'image_shape',
              'images_per_s', 'median_step_s', 'min_step_s', 'compile_s',
              'first_call_s', 'mfu', 'mfu_analytic', 'loss', 'recompiled')


def _step_figures(report: dict) -> dict:
  (case,) = report['cases']
  return pick(case, _STEP_KEYS, {
      'model_flops': ('model_tflop_per_step', 1e12),
      'peak_flops_per_s': ('peak_tflop_per_s', 1e12),
      'device_peak_bytes': ('device_peak_gib', GIB),
      'peak_rss_bytes': ('peak_rss_gib', GIB)})


def _step_problem(report: dict) -> str | None:
  for case in report['cases']:
    if case['status'] != 'ok':
      return f'step: {case.get("reason", case["status"])}'
    if case.get('recompiled'):
      return 'step: recompiled after the first call'
  return _report_ok(report)


# ---------------------------------------------------------------- losses --


def _losses_figures(report: dict) -> dict:
  rows = []
  for case in report['cases']:
    row = pick(case, ('views', 'impl', 'block_size', 'status', 'reason',
                      'min_s', 'compile_s'),
               {'device_peak_bytes': ('device_peak_gib', GIB),
                'peak_rss_bytes': ('peak_rss_gib', GIB),
                'xla_temp_bytes': ('xla_temp_gib', GIB)})
    rows.append(row)
  return {'device': report['idle'].get('device'), 'cases': rows}


def _losses_problem(report: dict) -> str | None:
  # A case skipped because XLA's plan cannot fit (dense at 131,072 views)
  # is a finding, not a failure.
  for case in [report['idle']] + report['cases']:
    if case['status'] not in ('ok', 'skipped'):
      return (f'losses {case["impl"]} at {case["views"]} views: '
              f'{case.get("reason", case["status"])}')
  return None


# --------------------------------------------------------------- augment --


def _augment_figures(report: dict) -> dict:
  (row,) = report['results']
  return dict(pick(report, ('backend', 'recipe', 'views_per_image')),
              **pick(row, ('size', 'batch', 'channels', 'device_img_s',
                           'device_compile_s')))


# ----------------------------------------------------------------- train --


def _train_figures(report: dict) -> dict:
  return pick(report, (
      'device', 'encoder', 'dtype', 'kernels_resolved', 'global_batch_size',
      'image_size', 'steps', 'first_call_s', 'compile_s', 'images_per_s',
      'first_loss', 'last_loss', 'losses', 'compiles_after_first'), {
          'device_peak_bytes': ('device_peak_gib', GIB),
          'peak_rss_bytes': ('peak_rss_gib', GIB)})


# --------------------------------------------------------------- the list --

_BENCH = ('-m', 'jaxssl.bench')
_TABLE = ('--dataset-facts', 'table')  # no tfds on the accelerator machine
# The dry run swaps each encoder for tiny_cnn: it checks the plumbing (every
# command, option and report field) in seconds, not the models.
_TINY_STEP = ('--set', 'model.encoder=tiny_cnn', '--steps', '1', '--warmup',
              '0', '--peak-size', '128', '--kernels', 'xla')
_LOSSES = ('--repeats', '3', '--repeat-budget-s', '10', '--case-timeout',
           '60')
_DRY_LOSSES = ('--views', '256', '--repeats', '1')


def sections() -> list[Section]:
  """The check's sections, most important first (the budget cuts the tail)."""
  env = Section('env', ('-m', 'benchmarks.device_check', '--probe-env'),
                ('-m', 'benchmarks.device_check', '--probe-env'), 60, 10,
                lambda report: report, lambda report: None)
  step50 = ('step', '--json', '--config', 'configs/simclr_tpu.py') + _TABLE
  step18 = ('step', '--json', '--config', 'configs/simclr_cifar10.py') + _TABLE
  losses = ('losses', '--json')
  augment = ('augment', '--json', '--recipe', 'simclr', '--halves', 'device')
  train = ('train', '--json', '--config', 'configs/simclr_fashion_mnist.py',
           '--set', 'optim.warmup_epochs=0.05') + _TABLE
  return [
      env,
      Section('peak', _BENCH + ('peak', '--json'),
              _BENCH + ('peak', '--json', '--sizes', '128', '--repeats', '2',
                        '--min-time-s', '0.01'),
              60, 20, _peak_figures, _peak_problem),
      Section('step_resnet50_224_bf16',
              _BENCH + step50 + ('--batch', '256', '--kernels', 'xla',
                                 '--steps', '10', '--warmup', '2',
                                 '--case-timeout', '{case_timeout}'),
              _BENCH + step50 + ('--batch', '2', '--set',
                                 'dataset.image_size=32') + _TINY_STEP,
              200, 60, _step_figures, _step_problem),
      Section('step_resnet18_cifar',
              _BENCH + step18 + ('--batch', '512', '--kernels', 'xla',
                                 '--steps', '10', '--warmup', '2',
                                 '--case-timeout', '{case_timeout}'),
              _BENCH + step18 + ('--batch', '2') + _TINY_STEP,
              120, 30, _step_figures, _step_problem),
      Section('losses_block8192',
              _BENCH + losses + ('--views', '8192', '32768', '131072',
                                 '--block-size', '8192') + _LOSSES,
              _BENCH + losses + ('--block-size', '64') + _DRY_LOSSES,
              90, 20, _losses_figures, _losses_problem),
      Section('augment_224',
              _BENCH + augment + ('--sizes', '224', '--batch', '256',
                                  '--batches', '4', '--repeats', '3'),
              _BENCH + augment + ('--sizes', '32', '--batch', '4',
                                  '--batches', '1', '--repeats', '1'),
              60, 15, _augment_figures, _report_ok),
      Section('train_quickstart',
              _BENCH + train + ('--steps', '300', '--log-every', '50'),
              _BENCH + train + ('--batch', '8', '--steps', '4',
                                '--log-every', '2', '--set',
                                'model.encoder=tiny_cnn', '--set',
                                'dataset.image_size=16'),
              90, 20, _train_figures, _report_ok),
      Section('losses_block4096',
              _BENCH + losses + ('--views', '8192', '32768', '131072',
                                 '--block-size', '4096', '--impls',
                                 'blockwise') + _LOSSES,
              _BENCH + losses + ('--block-size', '32', '--impls',
                                 'blockwise') + _DRY_LOSSES,
              60, 15, _losses_figures, _losses_problem),
  ]
