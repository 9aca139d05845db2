"""jaxssl's jitted train step alone: compile, step time, img/s, FLOPs, MFU.

The step is the trainer's own (`synthetic_setup` builds it as
`jaxssl.train.setup` does) and is fed one synthetic batch of the config's
shape, so only compute is measured. Every case (batch x devices x
kernels, `jaxssl.cpu_kernels`) runs in a fresh subprocess on `--devices` simulated host devices. A
case reports:
- compile time (XLA backend compile during the first call) and first call;
- the median and min of `--steps` timed steps after `--warmup` steps, each
  blocked on; img/s = global batch / median (each image has V views, so
  views/s = V x img/s);
- model FLOPs per step from XLA's cost analysis of the same step with plain
  XLA convs (loops in the matmul convs would be counted once), and the
  analytic count for ResNets (2 x 3 x MACs x views);
- MFU = model FLOPs / median step time / matmul peak of the model's dtype,
  the peak measured in the same process right after the steps; reported
  with XLA's FLOPs (which skip kernel taps on padding) and, for ResNets,
  with the analytic (published-style) count;
- peak RSS (and the device's peak where it has allocator stats);
- whether any compile happened after the first call. A recompiling case
  makes the command exit with status 1.

  python -m jaxssl.bench step --config configs/simclr_cifar10.py --batch 64 256
  python -m jaxssl.bench step --config configs/simclr_cifar10.py --batch 256 \\
      --kernels xla --accumulation-steps 1 4   # k micro-batches vs k = 1
  python -m jaxssl.bench step --config configs/simclr_fashion_mnist.py \\
      --devices 1 8 --kernels auto
  python -m jaxssl.bench step --config configs/simclr_tpu.py --batch 8 \\
      --flops-only
"""

import itertools
import json
import math
import os
import statistics
import sys
import time

from jaxssl.bench import flops as flops_lib
from jaxssl.bench import harness
from jaxssl.bench import peak as peak_lib

HELP = 'train step: compile, step time, img/s, FLOPs, MFU, memory'
KERNELS = ('auto', 'cpu', 'xla')  # jaxssl.cpu_kernels.KERNELS


def add_arguments(parser) -> None:
  """Registers the `step` options on `parser`."""
  parser.add_argument('--config', default='configs/simclr_cifar10.py',
                      help='config file (a get_config() module)')
  parser.add_argument('--batch', type=int, nargs='+', default=None,
                      help='global batch sizes (default: the config\'s)')
  parser.add_argument('--devices', type=int, nargs='+', default=[1],
                      help='simulated host device counts (default 1)')
  parser.add_argument('--kernels', nargs='+', choices=KERNELS,
                      default=['auto', 'xla'],
                      help='encoder ops (config key kernels): auto, the '
                      'CPU kernels (cpu) or XLA\'s (xla)')
  parser.add_argument('--accumulation-steps', type=int, nargs='+',
                      default=[1], help='micro-batches per step (config key '
                      'accumulation_steps); each k is compared with k = 1')
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed steps after the first call')
  parser.add_argument('--set', action='append', default=[],
                      metavar='KEY=VALUE',
                      help='config override, e.g. model.dtype=bfloat16')
  parser.add_argument('--flops-only', action='store_true',
                      help='count FLOPs without compiling or running')
  parser.add_argument('--peak-size', type=int, default=0,
                      help='matmul side of the peak measurement (0: the '
                      'peak subcommand default)')
  parser.add_argument('--dataset-facts', choices=harness.FACTS,
                      default='auto',
                      help='image shape and classes of the synthetic data: '
                      'tfds (the builder\'s features), table (harness.'
                      'KNOWN_DATASETS, no TensorFlow import) or auto (tfds '
                      'where installed)')
  parser.add_argument('--case-timeout', type=float, default=3600.0)


# ----------------------------------------------------------------- child --


def _model_flops(case: dict, config, mesh, state, batch, lowered) -> float:
  """XLA's FLOPs of the step with plain XLA convs (the model's FLOPs).

  Counted on the k = 1 program: XLA's cost analysis counts a loop body
  once, so a step with `accumulation_steps` > 1 (a scan over micro-batches)
  would be undercounted, and its recomputed forward is overhead, not model
  work (as rematerialisation is not counted in MFU). Lowering only: the
  k = 1 program need not fit in memory.
  """
  if config.kernels == 'xla' and config.accumulation_steps == 1:
    return flops_lib.xla_flops(lowered)
  plain = harness.load_config(
      case['config'], batch=case['batch'],
      overrides=list(case['set']) + ['accumulation_steps=1'], kernels='xla')
  facts = case.get('dataset_facts', 'auto')
  step_fn = harness.synthetic_setup(plain, mesh, facts).train_step
  return flops_lib.xla_flops(step_fn.lower(state, batch))


def prepare(case: dict):
  """Builds the step of `case`, its state and batch, and counts its FLOPs.

  Args:
    case: `{'config', 'batch', 'devices', 'impl', 'set'}` as in `run`;
      'impl' is the `kernels` choice; an optional 'dataset_facts'
      (`harness.synthetic_info`'s `facts`, default 'auto').

  Returns:
    `(setup, state, batch, facts)`: facts is a JSON-able dict with the
    device, shapes, `model_flops` (XLA, plain convs), `flops_impl_xla_count`
    (XLA, this impl) and `analytic_flops` (None for non-ResNets).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jaxssl import parallel  # pylint: disable=g-import-not-at-top
  config = harness.load_config(case['config'], batch=case['batch'],
                               overrides=case['set'], kernels=case['impl'])
  if jax.device_count() < case['devices']:
    raise ValueError(f'devices={case["devices"]} but jax sees '
                     f'{jax.device_count()}; on a CPU set XLA_FLAGS='
                     '--xla_force_host_platform_device_count')
  mesh = parallel.make_mesh(jax.devices()[:case['devices']])
  s = harness.synthetic_setup(config, mesh,
                              case.get('dataset_facts', 'auto'))
  channels = s.info.image_shape[-1]
  device = jax.devices()[0]
  facts = {'device': f'{device.platform}:{device.device_kind}',
           'global_batch_size': config.global_batch_size,
           'views_per_image': config.augment.num_views,
           'image_shape': [config.dataset.image_size] * 2 + [channels],
           'encoder': config.model.encoder, 'dtype': config.model.dtype,
           'kernels_resolved': s.factories.name}
  state = s.init_fn()
  batch = harness.synthetic_batch(config, channels, mesh)
  start = time.perf_counter()
  lowered = s.train_step.lower(state, batch)
  facts['lower_s'] = time.perf_counter() - start
  facts['flops_impl_xla_count'] = flops_lib.xla_flops(lowered)
  facts['model_flops'] = _model_flops(case, config, mesh, state, batch,
                                      lowered)
  facts['analytic_flops'] = flops_lib.analytic_step_flops(config,
                                                          channels)
  return s, state, batch, facts


def measure_peak(dtype: str, devices, size: int = 0) -> float:
  """Best matmul FLOP/s of `devices` in `dtype` over the default sizes."""
  import jax  # pylint: disable=g-import-not-at-top
  backend = 'cpu' if jax.default_backend() == 'cpu' else 'other'
  sizes = [size] if size else peak_lib.DEFAULT_SIZES[backend]
  devices = list(devices)  # Used once per size: a flat iterator would run dry.
  return max(peak_lib.matmul_flops_per_s(dtype, n, repeats=3,
                                         devices=devices)['flops_per_s']
             for n in sizes)


def measure(case: dict) -> dict:
  """Builds, compiles and times one case in this process."""
  s, state, batch, facts = prepare(case)
  config = s.config
  out = dict(case, status='ok', **facts)
  if case['flops_only']:
    return out
  run = harness.timed_steps(s.train_step, state, batch,
                            warmup=case['warmup'], steps=case['steps'])
  times = run['step_times_s']
  median = statistics.median(times)
  loss = float(run['metrics']['loss'])
  del run['state']
  peak = measure_peak(config.model.dtype, s.mesh.devices.flat,
                      case['peak_size'])
  flops_per_s = out['model_flops'] / median
  out.update(
      first_call_s=run['first_call_s'], compile_s=run['compile_s'],
      step_times_s=times, median_step_s=median, min_step_s=min(times),
      images_per_s=config.global_batch_size / median,
      views_per_s=config.global_batch_size * config.augment.num_views
      / median,
      model_flops_per_s=flops_per_s, peak_flops_per_s=peak,
      peak_dtype=config.model.dtype, mfu=flops_per_s / peak,
      loss=loss, loss_finite=math.isfinite(loss),
      compiles_after_first=run['compiles_after_first'],
      jit_cache_size=run['cache_size'],
      recompiled=bool(run['compiles_after_first']) or (
          run['cache_size'] not in (None, 1)),
      peak_rss_bytes=peak_lib.peak_rss_bytes())
  if out['analytic_flops']:
    # The conventional count (padding taps included, as in published
    # FLOPs); XLA's leaves out taps on padding, 15% fewer at 32 px.
    out['mfu_analytic'] = out['analytic_flops'] / median / peak
  stats = s.mesh.devices.flat[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


# ---------------------------------------------------------------- parent --


def summarize(cases: list[dict]) -> dict:
  """Ratios of conv impls, device counts and accumulation between `cases`.

  Impls are compared at equal batch, devices and k, device counts at equal
  batch, impl and k, k > 1 against k = 1 at equal batch, devices and impl.

  Returns:
    `{'impl_speedup': [{'batch', 'devices', 'impl', 'vs', 'ratio'}],
    'device_cost': [{'batch', 'impl', 'devices', 'vs_devices',
    'step_time_ratio'}], 'accumulation': [{'batch', 'devices', 'impl', 'k',
    'step_time_ratio', 'peak_rss_ratio', 'device_peak_ratio'}]}`; ratios of
    img/s (impl), of median step time (more devices over fewest; k over 1)
    and of peak memory (k over 1; the device's where it reports one).
  """
  ok = [dict(c, accumulation_steps=c.get('accumulation_steps', 1))
        for c in cases if c.get('status') == 'ok' and 'median_step_s' in c]
  impl_speedup, device_cost = [], []
  accumulation = _accumulation_ratios(ok)
  for c in ok:
    for base in ok:
      if base['accumulation_steps'] != c['accumulation_steps']:
        continue
      same_run = (c['global_batch_size'] == base['global_batch_size']
                  and c['devices'] == base['devices'])
      if same_run and base['impl'] == 'xla' and c['impl'] != 'xla':
        impl_speedup.append({
            'batch': c['global_batch_size'], 'devices': c['devices'],
            'impl': c['impl'], 'vs': 'xla',
            'ratio': c['images_per_s'] / base['images_per_s']})
      same_prog = (c['global_batch_size'] == base['global_batch_size']
                   and c['impl'] == base['impl'])
      fewest = min(o['devices'] for o in ok
                   if o['global_batch_size'] == c['global_batch_size']
                   and o['impl'] == c['impl'])
      if same_prog and base['devices'] == fewest < c['devices']:
        device_cost.append({
            'batch': c['global_batch_size'], 'impl': c['impl'],
            'devices': c['devices'], 'vs_devices': fewest,
            'step_time_ratio': c['median_step_s'] / base['median_step_s']})
  return {'impl_speedup': impl_speedup, 'device_cost': device_cost,
          'accumulation': accumulation}


def _accumulation_ratios(ok: list[dict]) -> list[dict]:
  """Step time and peak memory of each k > 1 case over its k = 1 twin."""
  ratios = []
  for c in ok:
    for base in ok:
      twin = all(c[key] == base[key]
                 for key in ('global_batch_size', 'devices', 'impl'))
      if twin and base['accumulation_steps'] == 1 < c['accumulation_steps']:
        ratios.append({
            'batch': c['global_batch_size'], 'devices': c['devices'],
            'impl': c['impl'], 'k': c['accumulation_steps'],
            'step_time_ratio': c['median_step_s'] / base['median_step_s'],
            'peak_rss_ratio': c['peak_rss_bytes'] / base['peak_rss_bytes'],
            'device_peak_ratio': (
                c['device_peak_bytes'] / base['device_peak_bytes']
                if 'device_peak_bytes' in base else None)})
  return ratios


def run(args) -> dict:
  """Runs every batch x devices x impl case in its own subprocess."""
  if args.steps <= 0 or args.warmup < 0 or min(args.devices) <= 0:
    raise ValueError(f'--steps={args.steps} must be > 0, --warmup='
                     f'{args.warmup} >= 0 and --devices={args.devices} > 0')
  report = {'benchmark': 'step', 'date': time.strftime('%Y-%m-%d'),
            'machine': peak_lib.machine_info(),
            'config': {k: v for k, v in vars(args).items()
                       if k not in ('command', 'json')}}
  cases = []
  if min(args.accumulation_steps) < 1:
    raise ValueError(f'--accumulation-steps={args.accumulation_steps} must '
                     'be positive')
  for batch, devices, impl, k in itertools.product(
      args.batch or [None], args.devices, args.kernels,
      args.accumulation_steps):
    case = {'config': args.config, 'batch': batch, 'devices': devices,
            'impl': impl, 'accumulation_steps': k,
            'set': args.set + [f'accumulation_steps={k}'],
            'steps': args.steps, 'warmup': args.warmup,
            'flops_only': args.flops_only, 'peak_size': args.peak_size,
            'dataset_facts': args.dataset_facts}
    cases.append(peak_lib.run_child('jaxssl.bench.step', case,
                                    devices=devices,
                                    timeout_s=args.case_timeout))
  report['cases'] = cases
  report['summary'] = summarize(cases)
  report['machine']['loadavg_end'] = list(os.getloadavg())
  report['ok'] = all(c['status'] == 'ok' and not c.get('recompiled')
                     for c in cases)
  return report


def _gflop(value) -> str:
  return '-' if value is None else f'{value / 1e9:.1f}'


def _percent(c: dict, key: str) -> str:
  return f'{100 * c[key]:.0f}%' if key in c else '-'


def _case_row(c: dict) -> str:
  conv = c['impl']
  if c.get('kernels_resolved', conv) != conv:
    conv = f'{conv} (= {c["kernels_resolved"]})'
  batch = c.get('global_batch_size', c['batch'])
  if c.get('accumulation_steps', 1) > 1:
    batch = f'{batch} (k={c["accumulation_steps"]})'
  head = (f'| {batch} | {c["devices"]} | '
          f'{conv} |')
  if c['status'] != 'ok':
    return f'{head} {c["status"]}: {c.get("reason", "")} |'
  flops = (f'{_gflop(c["model_flops"])} | {_gflop(c["analytic_flops"])} |')
  if 'median_step_s' not in c:
    return f'{head} - | - | - | - | {flops} - | - | - | - | - | - |'
  return (f'{head} {c["compile_s"]:.1f} | {c["median_step_s"] * 1e3:.0f} | '
          f'{c["images_per_s"]:.1f} | {c["views_per_s"]:.1f} | {flops} '
          f'{_gflop(c["model_flops_per_s"])} | '
          f'{_gflop(c["peak_flops_per_s"])} | {_percent(c, "mfu")} | '
          f'{_percent(c, "mfu_analytic")} | '
          f'{c["peak_rss_bytes"] / 2**30:.2f} | '
          f'{"RECOMPILED" if c["recompiled"] else "no"} |')


def format_report(report: dict) -> str:
  """Markdown table of the cases, then the impl and device ratios."""
  machine, cfg = report['machine'], report['config']
  first = next((c for c in report['cases'] if c['status'] == 'ok'), {})
  lines = [
      f'Train step of {cfg["config"]} ({first.get("encoder", "?")}, '
      f'{first.get("dtype", "?")}, images {first.get("image_shape", "?")} x '
      f'{first.get("views_per_image", "?")} views), synthetic batch; device '
      f'{first.get("device", "?")}; {machine["cpu_count"]} CPUs, load '
      f'{machine["loadavg"][0]:.1f} -> {machine["loadavg_end"][0]:.1f}; '
      f'{report["date"]}; median of {cfg["steps"]} steps',
      '',
      '| batch | devices | conv | compile (s) | step (ms) | img/s | views/s '
      '| GFLOP/step (XLA) | GFLOP/step (analytic) | GFLOP/s | peak GFLOP/s '
      '| MFU (XLA) | MFU (analytic) | peak RSS (GiB) | recompiled |',
      '|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:'
      '|---|']
  lines += [_case_row(c) for c in report['cases']]
  summary = report['summary']
  for s in summary['impl_speedup']:
    lines.append(f'- batch {s["batch"]}, {s["devices"]} device(s): conv '
                 f'{s["impl"]} is {s["ratio"]:.2f}x the img/s of {s["vs"]}')
  for s in summary.get('accumulation', []):
    device = ('' if s['device_peak_ratio'] is None else
              f', device peak {s["device_peak_ratio"]:.2f}x')
    lines.append(f'- batch {s["batch"]}, {s["devices"]} device(s), conv '
                 f'{s["impl"]}: k = {s["k"]} micro-batches take '
                 f'{s["step_time_ratio"]:.2f}x the step time of k = 1, peak '
                 f'RSS {s["peak_rss_ratio"]:.2f}x{device}')
  for s in summary['device_cost']:
    lines.append(f'- batch {s["batch"]}, conv {s["impl"]}: a step on '
                 f'{s["devices"]} devices takes {s["step_time_ratio"]:.2f}x '
                 f'the time on {s["vs_devices"]}')
  if not report['ok']:
    lines.append('FAILED: a case errored or recompiled after its first call')
  return '\n'.join(lines)


if __name__ == '__main__':
  from jaxssl import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_process()
  print(json.dumps(measure(json.loads(sys.argv[1]))))
