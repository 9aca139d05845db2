"""SimCLR views per second: on-device JAX augmentation vs the tf.data host path.

Both paths make 2 views per image of the same synthetic in-memory uint8
images, with the same recipe (`config_schema.defaults().augment`, blur on
or off), on this machine:
- host: `tf.data` from memory, `augment.simclr_view` per view mapped with
  AUTOTUNE parallelism and deterministic order, batched and prefetched (the
  map of `jaxssl.input_pipeline`, without reading or decoding); each timing
  uses a fresh pipeline warmed by one batch, so nothing is prefetched while
  the device path runs;
- device: `augment_device.simclr_views` jitted on the uint8 batch, already
  on the device, timed to `block_until_ready` (compile time reported apart),
  with the loop `--impl` picks (`auto`: the sequential loop when the run
  has one CPU device, as `python -m jaxssl.bench` has).
Runs alternate (host, device, host, ...) so a change of machine load hits
both; the median of `--repeats` timings counts. Figures are images per
second (each image gives 2 views).

  python -m jaxssl.bench augment                    # 32 and 224 px, blur
  python -m jaxssl.bench augment --sizes 224 --batch 64 --json
  python -m jaxssl.bench augment --sizes 32 --no-blur
  python -m jaxssl.bench augment --sizes 224 --batch 32 --stages
  python -m jaxssl.bench augment --sizes 224 --impl vectorized

`--stages` also times the device path with the recipe's ops switched on
one by one (crop + resize, + flip, + jitter, + grayscale, + blur), to show
where its time goes.
"""

import statistics
import time

from jaxssl.bench import peak

HELP = 'img/s of on-device JAX augmentation vs the tf.data host pipeline'
NUM_VIEWS = 2


def add_arguments(parser) -> None:
  """Registers the `augment` options on `parser`."""
  parser.add_argument('--sizes', type=int, nargs='+', default=[32, 224],
                      help='view sides S (source images are S x S too '
                      'unless --source-size is given)')
  parser.add_argument('--source-size', type=int, default=0,
                      help='side of the source images (0: the view side)')
  parser.add_argument('--blur', action='store_true', default=True,
                      help='SimCLR blur, p = 0.5 (default)')
  parser.add_argument('--no-blur', dest='blur', action='store_false',
                      help='blur_prob = 0 (the CIFAR recipe)')
  parser.add_argument('--batch', type=int, default=128,
                      help='images per batch (both paths)')
  parser.add_argument('--batches', type=int, default=4,
                      help='batches per timing')
  parser.add_argument('--repeats', type=int, default=3,
                      help='alternating timings per path; the median counts')
  parser.add_argument('--impl', default='auto',
                      choices=('auto', 'vectorized', 'sequential'),
                      help="the device path's loop (augment_device.simclr_views"
                      "; 'auto': sequential on a 1-device CPU run)")
  parser.add_argument('--stages', action='store_true',
                      help='also time the device path op by op')


def _images(n: int, side: int):
  import numpy as np
  return np.random.RandomState(0).randint(0, 256, (n, side, side, 3),
                                          np.uint8)


def _host_batches(images, config_augment, out_size: int, batch: int):
  """An endless iterator of host view batches [batch, 2, S, S, 3]."""
  import tensorflow as tf
  from jaxssl import augment

  def views(index, image):
    seeds = [tf.stack([index, tf.constant(v, tf.int64)])
             for v in range(NUM_VIEWS)]
    return tf.stack([augment.simclr_view(image, s, out_size=out_size,
                                         config_augment=config_augment)
                     for s in seeds])

  ds = tf.data.Dataset.from_tensor_slices(images).enumerate().repeat()
  ds = ds.map(tf.autograph.experimental.do_not_convert(views),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _time_host(images, config_augment, out_size: int, batch: int,
               batches: int) -> float:
  # A fresh pipeline per timing, warmed by one batch: a pipeline kept alive
  # across the device timings would prefetch in the background meanwhile.
  iterator = _host_batches(images, config_augment, out_size, batch)
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return time.perf_counter() - start


def _time_device(fn, images, keys) -> float:
  start = time.perf_counter()
  out = None
  for key in keys:
    out = fn(images, key)
  out.block_until_ready()
  return time.perf_counter() - start


# Cumulative device-path stages: the ops switched off until their stage.
STAGES = (
    ('crop + resize', dict(flip=False, color_prob=0.0, grayscale_prob=0.0,
                           blur_prob=0.0)),
    ('+ flip', dict(color_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)),
    ('+ colour jitter', dict(grayscale_prob=0.0, blur_prob=0.0)),
    ('+ grayscale', dict(blur_prob=0.0)),
    ('+ blur', {}),
)


def _device_fn(config_augment, size: int, impl: str):
  import functools
  import jax
  from jaxssl import augment_device
  return jax.jit(functools.partial(augment_device.simclr_views,
                                   num_views=NUM_VIEWS, out_size=size,
                                   config_augment=config_augment, impl=impl))


def measure_stages(size: int, config_augment, device_images,
                   args) -> list[dict]:
  """Device img/s with the recipe's ops added one at a time (median)."""
  import jax
  rows = []
  for name, off in STAGES:
    if name == '+ blur' and not args.blur:
      continue
    cfg = config_augment.copy_and_resolve_references()
    cfg.update(off)
    fn = _device_fn(cfg, size, args.impl)
    fn(device_images, jax.random.key(0)).block_until_ready()
    timings = [_time_device(fn, device_images,
                            [jax.random.key(1000 * r + i)
                             for i in range(args.batches)])
               for r in range(args.repeats)]
    rate = args.batch * args.batches / statistics.median(timings)
    rows.append({'stage': name, 'device_img_s': rate,
                 'ms_per_view': 1e3 / (rate * NUM_VIEWS)})
  return rows


def measure(size: int, args) -> dict:
  """Alternating host and device timings at one view size."""
  import jax
  from jaxssl import config_schema

  config_augment = config_schema.defaults().augment
  config_augment.blur_prob = 0.5 if args.blur else 0.0
  source = args.source_size or size
  images = _images(args.batch, source)
  fn = _device_fn(config_augment, size, args.impl)
  device_images = jax.device_put(images)
  start = time.perf_counter()
  fn(device_images, jax.random.key(0)).block_until_ready()
  compile_s = time.perf_counter() - start
  host_s, device_s = [], []
  for r in range(args.repeats):
    host_s.append(_time_host(images, config_augment, size, args.batch,
                             args.batches))
    keys = [jax.random.key(1000 * r + i) for i in range(args.batches)]
    device_s.append(_time_device(fn, device_images, keys))
  images_per_timing = args.batch * args.batches
  host_rate = images_per_timing / statistics.median(host_s)
  device_rate = images_per_timing / statistics.median(device_s)
  result = {'size': size, 'source_size': source, 'blur': args.blur,
            'batch': args.batch, 'host_img_s': host_rate,
            'device_img_s': device_rate, 'ratio': device_rate / host_rate,
            'device_compile_s': compile_s, 'host_timings_s': host_s,
            'device_timings_s': device_s}
  if args.stages:
    result['stages'] = measure_stages(size, config_augment, device_images,
                                      args)
  return result


def run(args) -> dict:
  """Measures every size; the report's `ok` is False only on bad options."""
  for name in ('batch', 'batches', 'repeats'):
    if getattr(args, name) < 1:
      raise ValueError(f'--{name}={getattr(args, name)} must be >= 1')
  if min(args.sizes) < 1 or args.source_size < 0:
    raise ValueError(f'--sizes={args.sizes} and --source-size='
                     f'{args.source_size} must be positive')
  import jax
  from jaxssl import augment_device
  impl = augment_device.resolve_impl(args.impl)
  machine = peak.machine_info()
  results = [measure(size, args) for size in args.sizes]
  machine['loadavg_after'] = peak.machine_info()['loadavg']
  return {'ok': True, 'machine': machine, 'backend': jax.default_backend(),
          'views_per_image': NUM_VIEWS, 'device_impl': impl,
          'results': results}


def format_report(report: dict) -> str:
  """The table: one row per view size."""
  m = report['machine']
  lines = [f"backend {report['backend']}, {m['cpu_count']} CPUs, load "
           f"{m['loadavg'][0]:.1f} -> {m['loadavg_after'][0]:.1f}; "
           f"{report['views_per_image']} views per image; device loop "
           f"{report['device_impl']}",
           f"{'size':>5} {'source':>6} {'blur':>5} {'batch':>5} "
           f"{'tf.data img/s':>14} {'device img/s':>13} {'ratio':>6} "
           f"{'compile s':>9}"]
  for r in report['results']:
    lines.append(f"{r['size']:>5} {r['source_size']:>6} {str(r['blur']):>5} "
                 f"{r['batch']:>5} {r['host_img_s']:>14.1f} "
                 f"{r['device_img_s']:>13.1f} {r['ratio']:>6.2f} "
                 f"{r['device_compile_s']:>9.1f}")
  for r in report['results']:
    previous = 0.0
    for stage in r.get('stages', ()):
      lines.append(f"  {r['size']} px, {stage['stage']:<16} "
                   f"{stage['device_img_s']:>9.1f} img/s "
                   f"{stage['ms_per_view']:>7.2f} ms/view "
                   f"(+{stage['ms_per_view'] - previous:.2f})")
      previous = stage['ms_per_view']
  return '\n'.join(lines)
