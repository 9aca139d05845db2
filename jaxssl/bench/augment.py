"""Views per second of each half of a recipe: host crops and device colour.

Every recipe is split in two (`jaxssl.augment`): the host half
(`augment.host.crop_view`: random resized crop of the original image,
resize, flip) runs in tf.data, the device half (`augment.device.
finish_views`: jitter, grayscale, blur, solarize) inside the jitted step.
This times both on synthetic in-memory uint8 images, with the recipe's
official parameters (`augment.recipe_defaults`) or the quickstart's
(`--recipe quickstart`: configs/simclr_fashion_mnist.py, 28 px grey):
- host: `tf.data` from memory, one `crop_view` per view mapped with
  AUTOTUNE parallelism and deterministic order, batched and prefetched (the
  map of `jaxssl.input_pipeline`, without reading or decoding); a fresh
  pipeline per timing, warmed by one batch;
- device: `finish_views` jitted on the host's views, already on the device,
  timed to `block_until_ready` (compile time reported apart).
Runs alternate (host, device, host, ...) so a change of machine load hits
both; the median of `--repeats` timings counts. Figures are images per
second (each image gives `num_views` views); the two halves run
concurrently in training, so the slower one bounds the input rate.
`--halves device` times the device half alone on uniform float32 views of
the host half's shape, without importing TensorFlow (its cost does not
depend on the pixel values: no branch in it reads them); the host figures
are then None.

  python -m jaxssl.bench augment                          # quickstart, 28 px
  python -m jaxssl.bench augment --recipe byol --sizes 224 --batch 32
  python -m jaxssl.bench augment --recipe simclr --sizes 32 224 --json
  python -m jaxssl.bench augment --recipe simclr --sizes 224 --halves device
"""

import statistics
import time

from jaxssl.bench import peak

HELP = 'img/s of the host (crop) and device (colour, blur) augmentation'
RECIPES = ('quickstart', 'simclr', 'byol', 'moco_v2', 'moco_v3', 'swav')
HALVES = ('host', 'device')


def add_arguments(parser) -> None:
  """Registers the `augment` options on `parser`."""
  parser.add_argument('--recipe', default='quickstart', choices=RECIPES,
                      help="a recipe at its official values, or 'quickstart'"
                      ' (configs/simclr_fashion_mnist.py)')
  parser.add_argument('--sizes', type=int, nargs='+', default=[28],
                      help='view sides S (source images are S x S too '
                      'unless --source-size is given)')
  parser.add_argument('--source-size', type=int, default=0,
                      help='side of the source images (0: the view side)')
  parser.add_argument('--channels', type=int, default=0, choices=(0, 1, 3),
                      help='source channels (0: 1 for quickstart, else 3)')
  parser.add_argument('--batch', type=int, default=256,
                      help='images per batch (both halves)')
  parser.add_argument('--batches', type=int, default=4,
                      help='batches per timing')
  parser.add_argument('--repeats', type=int, default=3,
                      help='alternating timings per half; the median counts')
  parser.add_argument('--halves', nargs='+', choices=HALVES,
                      default=list(HALVES),
                      help='halves to time (device alone: no TensorFlow)')


def recipe_config(recipe: str):
  """`config.augment` of `recipe` (global views only: one crop size)."""
  from jaxssl import config_presets
  from jaxssl import config_schema
  from jaxssl.augment import recipes
  config = config_schema.defaults('simclr')
  if recipe == 'quickstart':
    config_presets.fashion_mnist_cpu(config)
  else:
    config.augment.update(recipes.recipe_defaults(recipe))
    config.augment.num_small_views = 0
  return config.augment


def _host_batches(images, config_augment, out_size: int, batch: int):
  """An endless iterator of host view batches [batch, V, S, S, C]."""
  import tensorflow as tf
  from jaxssl.augment import host

  def views(index, image):
    return tf.stack([host.crop_view(
        image, tf.stack([index, tf.constant(v, tf.int64)]), view_index=v,
        out_size=out_size, config_augment=config_augment)
                     for v in range(config_augment.num_views)])

  ds = tf.data.Dataset.from_tensor_slices(images).enumerate().repeat()
  ds = ds.map(tf.autograph.experimental.do_not_convert(views),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _time_host(images, config_augment, out_size: int, batch: int,
               batches: int) -> float:
  iterator = _host_batches(images, config_augment, out_size, batch)
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return time.perf_counter() - start


def _time_device(fn, views, keys) -> float:
  start = time.perf_counter()
  out = None
  for key in keys:
    out = fn(views, key)
  out[0].block_until_ready()
  return time.perf_counter() - start


def _device_input(images, config_augment, size: int, args):
  """The device half's input: host views, or uniform ones without tf.data."""
  import numpy as np
  if 'host' in args.halves:
    return next(_host_batches(images, config_augment, size, args.batch))
  shape = (args.batch, config_augment.num_views, size, size,
           images.shape[-1])
  return np.random.default_rng(0).random(shape, np.float32)


def measure(size: int, args) -> dict:
  """Alternating host and device timings at one view size."""
  import jax
  import numpy as np
  from jaxssl.augment import device
  config_augment = recipe_config(args.recipe)
  channels = args.channels or (1 if args.recipe == 'quickstart' else 3)
  source = args.source_size or size
  images = np.random.RandomState(0).randint(
      0, 256, (args.batch, source, source, channels), np.uint8)
  views = (jax.device_put(_device_input(images, config_augment, size,
                                        args)),)
  fn = jax.jit(lambda v, k: device.finish_views(v, k, config_augment))
  start = time.perf_counter()
  fn(views, jax.random.key(0))[0].block_until_ready()
  compile_s = time.perf_counter() - start
  host_s, device_s = [], []
  for r in range(args.repeats):
    if 'host' in args.halves:
      host_s.append(_time_host(images, config_augment, size, args.batch,
                               args.batches))
    if 'device' in args.halves:
      keys = [jax.random.key(1000 * r + i) for i in range(args.batches)]
      device_s.append(_time_device(fn, views, keys))
  images_per_timing = args.batch * args.batches
  rates = [images_per_timing / statistics.median(times) if times else None
           for times in (host_s, device_s)]
  return {'size': size, 'source_size': source, 'channels': channels,
          'batch': args.batch, 'host_img_s': rates[0],
          'device_img_s': rates[1],
          'combined_img_s': min(r for r in rates if r is not None),
          'device_compile_s': compile_s, 'host_timings_s': host_s,
          'device_timings_s': device_s}


def run(args) -> dict:
  """Measures every size; the report's `ok` is False only on bad options."""
  for name in ('batch', 'batches', 'repeats'):
    if getattr(args, name) < 1:
      raise ValueError(f'--{name}={getattr(args, name)} must be >= 1')
  if not args.halves:
    raise ValueError('--halves needs host, device or both')
  if min(args.sizes) < 1 or args.source_size < 0:
    raise ValueError(f'--sizes={args.sizes} and --source-size='
                     f'{args.source_size} must be positive')
  import jax
  machine = peak.machine_info()
  results = [measure(size, args) for size in args.sizes]
  machine['loadavg_after'] = peak.machine_info()['loadavg']
  return {'ok': True, 'machine': machine, 'backend': jax.default_backend(),
          'recipe': args.recipe,
          'views_per_image': recipe_config(args.recipe).num_views,
          'results': results}


def format_report(report: dict) -> str:
  """The table: one row per view size."""
  m = report['machine']
  lines = [f"backend {report['backend']}, {m['cpu_count']} CPUs, load "
           f"{m['loadavg'][0]:.1f} -> {m['loadavg_after'][0]:.1f}; recipe "
           f"{report['recipe']}, {report['views_per_image']} views per image",
           f"{'size':>5} {'source':>6} {'C':>2} {'batch':>5} "
           f"{'host img/s':>11} {'device img/s':>13} {'compile s':>9}"]
  for r in report['results']:
    host, dev = (f'{r[k]:.1f}' if r[k] is not None else '-'
                 for k in ('host_img_s', 'device_img_s'))
    lines.append(f"{r['size']:>5} {r['source_size']:>6} {r['channels']:>2} "
                 f"{r['batch']:>5} {host:>11} {dev:>13} "
                 f"{r['device_compile_s']:>9.1f}")
  return '\n'.join(lines)
