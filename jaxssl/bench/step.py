"""jaxssl's jitted train step alone: compile, step time, img/s, FLOPs, MFU.

The step is the trainer's own (`synthetic_setup` builds it as
`jaxssl.train.setup` does) and is fed one synthetic batch of the config's
shape, so only compute is measured. Every case (batch x devices x conv
impl) runs in a fresh subprocess on `--devices` simulated host devices. A
case reports:
- compile time (XLA backend compile during the first call) and first call;
- the median and min of `--steps` timed steps after `--warmup` steps, each
  blocked on; img/s = global batch / median (each image has V views, so
  views/s = V x img/s);
- model FLOPs per step from XLA's cost analysis of the same step with plain
  XLA convs (loops in the matmul convs would be counted once), and the
  analytic count for ResNets (2 x 3 x MACs x views);
- MFU = model FLOPs / median step time / matmul peak of the model's dtype,
  the peak measured in the same process right after the steps;
- peak RSS (and the device's peak where it has allocator stats);
- whether any compile happened after the first call. A recompiling case
  makes the command exit with status 1.

  python -m jaxssl.bench step --config configs/simclr_cifar10.py --batch 64 256
  python -m jaxssl.bench step --config configs/simclr_fashion_mnist.py \\
      --devices 1 8 --conv-impls auto
  python -m jaxssl.bench step --config configs/simclr_tpu.py --batch 8 \\
      --flops-only
"""

import json
import math
import os
import statistics
import sys
import time

from jaxssl.bench import peak as peak_lib

HELP = 'train step: compile, step time, img/s, FLOPs, MFU, memory'
IMPLS = ('auto', 'im2col', 'xla')
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def add_arguments(parser) -> None:
  """Registers the `step` options on `parser`."""
  parser.add_argument('--config', default='configs/simclr_cifar10.py',
                      help='config file (a get_config() module)')
  parser.add_argument('--batch', type=int, nargs='+', default=None,
                      help='global batch sizes (default: the config\'s)')
  parser.add_argument('--devices', type=int, nargs='+', default=[1],
                      help='simulated host device counts (default 1)')
  parser.add_argument('--conv-impls', nargs='+', choices=IMPLS,
                      default=['auto', 'xla'], help='model.conv_impl values')
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
  parser.add_argument('--case-timeout', type=float, default=3600.0)


# ---------------------------------------------------- building the step --


def load_config(path: str, *, batch: int | None = None,
                overrides=(), conv_impl: str | None = None):
  """Loads `path`'s `get_config()` and applies the benchmark overrides.

  Args:
    path: a config file such as `configs/simclr_cifar10.py`.
    batch: new `global_batch_size`, or None.
    overrides: `'dotted.key=value'` strings; values are Python literals,
      else strings.
    conv_impl: new `model.conv_impl`, or None.

  Returns:
    The locked, validated config.
  """
  import ast  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  from jaxssl import config_schema  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f'--config={path!r} is not a file; pass a config such '
                     'as configs/simclr_cifar10.py')
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  items = list(overrides)
  if batch is not None:
    items.append(f'global_batch_size={batch}')
  if conv_impl is not None:
    items.append(f'model.conv_impl={conv_impl!r}')
  for item in items:
    key, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'--set {item!r} must be KEY=VALUE, e.g. '
                       'model.dtype=bfloat16')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise ValueError(f'--set {key}: no such config key')
    node[leaf] = value
  config.lock()
  config_schema.validate(config)
  return config


def synthetic_info(config):
  """The dataset facts a step needs, without reading or preparing data.

  The image shape comes from the tfds builder's static features; the split
  size from its metadata when the dataset is prepared, else a nominal 1000
  steps' worth (it only shapes the learning-rate schedule).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jaxssl import datasets  # pylint: disable=g-import-not-at-top
  name = config.dataset.name
  size = config.dataset.image_size
  nominal = 1000 * config.global_batch_size
  if name == datasets.IMAGE_FOLDER:
    return datasets.DatasetInfo(name, nominal, 1000, (size, size, 3))
  builder = tfds.builder(name, data_dir=datasets.resolve_data_dir(
      config.dataset))
  image_key, label_key = datasets.feature_keys(builder)
  features = builder.info.features
  examples = nominal
  if builder.info.splits:  # Prepared here: its real size.
    examples = datasets.split_num_examples(builder,
                                           config.dataset.train_split)
  return datasets.DatasetInfo(name, examples,
                              features[label_key].num_classes,
                              tuple(features[image_key].shape))


def synthetic_setup(config, mesh):
  """`jaxssl.train.setup` with dataset facts from `synthetic_info`.

  The same method, schedule, optimizer and jitted functions (donation and
  output shardings included) as the trainer's; tests/bench_test.py checks
  that both lower to the same program.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jaxssl import input_pipeline, methods, optim, parallel, steps, train  # pylint: disable=g-import-not-at-top
  parallel.check_batch_divides(config.global_batch_size, mesh,
                               jax.process_count())
  info = synthetic_info(config)
  steps_per_epoch = max(1, input_pipeline.steps_per_epoch(
      config, info.num_train_examples))
  total_steps = train.total_train_steps(config, steps_per_epoch)
  method = methods.get_method_class(config.method)(
      config, mesh=mesh, num_channels=info.image_shape[-1],
      steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  schedule = optim.make_schedule(
      config.optim, global_batch_size=config.global_batch_size,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  optimizer = optim.make_optimizer(config.optim, schedule)
  replicated = parallel.replicated(mesh)
  init_fn = jax.jit(steps.make_init_fn(method, optimizer, config.seed),
                    out_shardings=replicated)
  train_step = jax.jit(steps.make_train_step(method, optimizer, schedule),
                       donate_argnames='state',
                       out_shardings=(replicated, replicated))
  return train.Setup(config, mesh, info, method, steps_per_epoch,
                     total_steps, init_fn, train_step)


def synthetic_batch(config, num_channels: int, mesh, seed: int = 0) -> dict:
  """A global batch shaped like `input_pipeline.pretrain_batches`' output.

  Returns:
    `{'views': (float32 [B, V, S, S, C] in [0, 1),), 'label': int32 [B]}`,
    B = global_batch_size, sharded over 'data'.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxssl import train  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  size = config.dataset.image_size
  shape = (config.global_batch_size, config.augment.num_views, size, size,
           num_channels)
  local = {'views': (rng.random(shape, np.float32),),
           'label': rng.integers(0, 10, config.global_batch_size,
                                 dtype=np.int32)}
  return train.global_batch(local, mesh)


# ------------------------------------------------------------- counting --


def resnet_conv_macs(depth: int, image_size: int, *, in_channels: int,
                     cifar_stem: bool, width_multiplier: int = 1) -> int:
  """Multiply-accumulates of a ResNet v1.5 trunk's convolutions, one image.

  Counted from the architecture table alone (not from the model code):
  stem, then per block its convs and the projection shortcut where the
  shape changes. BatchNorm, ReLU and pooling are not counted.

  Args:
    depth: 18, 34, 50, 101 or 152.
    image_size: input side.
    in_channels: input channels.
    cifar_stem: 3x3 stride-1 stem without max-pool (else 7x7/2 + pool/2).
    width_multiplier: scales every channel count.

  Returns:
    MACs of one forward pass (ResNet-50 at 224: about 4.09e9).

  References:
    He et al., 2016, Table 1 (FLOPs there are multiply-adds).
  """
  from jaxssl.models import resnet  # pylint: disable=g-import-not-at-top
  block, stages = resnet.ARCHITECTURES[depth]
  width = 64 * width_multiplier
  side = image_size
  if cifar_stem:
    macs = side * side * 9 * in_channels * width
  else:
    side = -(-side // 2)
    macs = side * side * 49 * in_channels * width
    side = -(-side // 2)  # 3x3 stride-2 'SAME' max-pool
  channels = width
  for stage, blocks in enumerate(stages):
    filters = width * 2**stage
    for index in range(blocks):
      stride = 2 if stage > 0 and index == 0 else 1
      out_side = (side - 1) // stride + 1
      out_area = out_side * out_side
      if block.expansion == 1:
        out = filters
        macs += out_area * 9 * (channels * filters + filters * filters)
      else:
        out = 4 * filters
        macs += side * side * channels * filters
        macs += out_area * (9 * filters * filters + filters * out)
      if stride != 1 or channels != out:
        macs += out_area * channels * out
      channels, side = out, out_side
  return macs


def analytic_step_flops(config, num_channels: int) -> float | None:
  """2 x 3 x (conv + projection-head MACs) x views per step, or None.

  The factor 3 is the forward and the two backward products; None for
  encoders other than ResNets.
  """
  from jaxssl import models  # pylint: disable=g-import-not-at-top
  name = config.model.encoder
  if not name.startswith('resnet'):
    return None
  size = config.dataset.image_size
  stem = config.model.stem
  cifar = (size <= models.CIFAR_STEM_MAX_IMAGE_SIZE if stem == 'auto'
           else stem == 'cifar')
  macs = resnet_conv_macs(int(name[len('resnet'):]), size,
                          in_channels=num_channels, cifar_stem=cifar,
                          width_multiplier=config.model.width_multiplier)
  head = config.head
  width = models.feature_dim(config.model)
  hidden = head.hidden_dim or width
  dims = [width] + [hidden] * (head.num_layers - 1) + [head.output_dim]
  macs += sum(a * b for a, b in zip(dims[:-1], dims[1:])) * (
      head.num_layers > 0)
  views = config.global_batch_size * config.augment.num_views
  return 2.0 * 3.0 * macs * views


def xla_flops(lowered) -> float:
  """FLOPs of a lowered program by XLA's HLO cost analysis (0 if absent)."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


class CompileCounter:
  """Counts XLA backend compiles in this process (`jax.monitoring`).

  One listener is registered per process, on first use; `count` only
  grows.
  """
  count = 0
  seconds = 0.0
  _registered = False

  @classmethod
  def ensure_registered(cls) -> None:
    if cls._registered:
      return
    from jax import monitoring  # pylint: disable=g-import-not-at-top

    def listener(event, duration_secs, **kwargs):
      del kwargs
      if event == _COMPILE_EVENT:
        cls.count += 1
        cls.seconds += duration_secs

    monitoring.register_event_duration_secs_listener(listener)
    cls._registered = True


def timed_steps(step_fn, state, batch, *, warmup: int, steps: int) -> dict:
  """Calls `state, metrics = step_fn(state, batch)` and times the calls.

  The first call (compile + run) is timed on its own; then `warmup`
  untimed and `steps` timed calls, each blocked on. Compiles are counted
  from the second call on: any is a recompilation.

  Returns:
    `{'first_call_s', 'compile_s', 'step_times_s', 'compiles_after_first',
    'cache_size', 'state', 'metrics'}`; `cache_size` is the jitted
    function's cache size where jax exposes it, else None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  CompileCounter.ensure_registered()
  seconds = CompileCounter.seconds
  start = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  first_call = time.perf_counter() - start
  compile_s = CompileCounter.seconds - seconds
  after_first = CompileCounter.count
  times = []
  for index in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    if index >= warmup:
      times.append(time.perf_counter() - start)
  cache_size = getattr(step_fn, '_cache_size', None)
  return {'first_call_s': first_call, 'compile_s': compile_s,
          'step_times_s': times,
          'compiles_after_first': CompileCounter.count - after_first,
          'cache_size': cache_size() if cache_size else None,
          'state': state, 'metrics': metrics}


# ----------------------------------------------------------------- child --


def _model_flops(case: dict, config, mesh, state, batch, lowered) -> float:
  """XLA's FLOPs of the step with plain XLA convs (the model's FLOPs)."""
  if config.model.conv_impl == 'xla':
    return xla_flops(lowered)
  plain = load_config(case['config'], batch=case['batch'],
                      overrides=case['set'], conv_impl='xla')
  return xla_flops(synthetic_setup(plain, mesh).train_step.lower(state, batch))


def prepare(case: dict):
  """Builds the step of `case`, its state and batch, and counts its FLOPs.

  Args:
    case: `{'config', 'batch', 'devices', 'impl', 'set'}` as in `run`.

  Returns:
    `(setup, state, batch, facts)`: facts is a JSON-able dict with the
    device, shapes, `model_flops` (XLA, plain convs), `flops_impl_xla_count`
    (XLA, this impl) and `analytic_flops` (None for non-ResNets).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jaxssl import parallel  # pylint: disable=g-import-not-at-top
  config = load_config(case['config'], batch=case['batch'],
                       overrides=case['set'], conv_impl=case['impl'])
  if jax.device_count() < case['devices']:
    raise ValueError(f'devices={case["devices"]} but jax sees '
                     f'{jax.device_count()}; on a CPU set XLA_FLAGS='
                     '--xla_force_host_platform_device_count')
  mesh = parallel.make_mesh(jax.devices()[:case['devices']])
  s = synthetic_setup(config, mesh)
  channels = s.info.image_shape[-1]
  device = jax.devices()[0]
  facts = {'device': f'{device.platform}:{device.device_kind}',
           'global_batch_size': config.global_batch_size,
           'views_per_image': config.augment.num_views,
           'image_shape': [config.dataset.image_size] * 2 + [channels],
           'encoder': config.model.encoder, 'dtype': config.model.dtype}
  state = s.init_fn()
  batch = synthetic_batch(config, channels, mesh)
  start = time.perf_counter()
  lowered = s.train_step.lower(state, batch)
  facts['lower_s'] = time.perf_counter() - start
  facts['flops_impl_xla_count'] = xla_flops(lowered)
  facts['model_flops'] = _model_flops(case, config, mesh, state, batch,
                                      lowered)
  facts['analytic_flops'] = analytic_step_flops(config, channels)
  return s, state, batch, facts


def measure_peak(dtype: str, devices, size: int = 0) -> float:
  """Best matmul FLOP/s of `devices` in `dtype` over the default sizes."""
  import jax  # pylint: disable=g-import-not-at-top
  backend = 'cpu' if jax.default_backend() == 'cpu' else 'other'
  sizes = [size] if size else peak_lib.DEFAULT_SIZES[backend]
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
  run = timed_steps(s.train_step, state, batch, warmup=case['warmup'],
                    steps=case['steps'])
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
  stats = s.mesh.devices.flat[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


# ---------------------------------------------------------------- parent --


def summarize(cases: list[dict]) -> dict:
  """Ratios of conv impls and of device counts between `cases`.

  Impls are compared at equal batch and devices, device counts at equal
  batch and impl.

  Returns:
    `{'impl_speedup': [{'batch', 'devices', 'impl', 'vs', 'ratio'}],
    'device_cost': [{'batch', 'impl', 'devices', 'vs_devices',
    'step_time_ratio'}]}`; ratios of img/s (impl) and of median step time
    (more devices over fewest).
  """
  ok = [c for c in cases if c.get('status') == 'ok' and 'median_step_s' in c]
  impl_speedup, device_cost = [], []
  for c in ok:
    for base in ok:
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
  return {'impl_speedup': impl_speedup, 'device_cost': device_cost}


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
  for batch in args.batch or [None]:
    for devices in args.devices:
      for impl in args.conv_impls:
        case = {'config': args.config, 'batch': batch, 'devices': devices,
                'impl': impl, 'set': args.set, 'steps': args.steps,
                'warmup': args.warmup, 'flops_only': args.flops_only,
                'peak_size': args.peak_size}
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


def _case_row(c: dict) -> str:
  head = (f'| {c.get("global_batch_size", c["batch"])} | {c["devices"]} | '
          f'{c["impl"]} |')
  if c['status'] != 'ok':
    return f'{head} {c["status"]}: {c.get("reason", "")} |'
  flops = (f'{_gflop(c["model_flops"])} | {_gflop(c["analytic_flops"])} |')
  if 'median_step_s' not in c:
    return f'{head} - | - | - | - | {flops} - | - | - | - |'
  return (f'{head} {c["compile_s"]:.1f} | {c["median_step_s"] * 1e3:.0f} | '
          f'{c["images_per_s"]:.1f} | {c["views_per_s"]:.1f} | {flops} '
          f'{_gflop(c["model_flops_per_s"])} | '
          f'{_gflop(c["peak_flops_per_s"])} | {100 * c["mfu"]:.0f}% | '
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
      '| MFU | peak RSS (GiB) | recompiled |',
      '|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  lines += [_case_row(c) for c in report['cases']]
  summary = report['summary']
  for s in summary['impl_speedup']:
    lines.append(f'- batch {s["batch"]}, {s["devices"]} device(s): conv '
                 f'{s["impl"]} is {s["ratio"]:.2f}x the img/s of {s["vs"]}')
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
