"""Input pipeline img/s against the train step's consumption.

In one subprocess, for one config:
1. the pipeline alone: `input_pipeline.pretrain_batches(config)` (read,
   decode, crop + resize + flip V views, batch: the host half of the
   augmentation) timed over `--batches` batches after
   `--warmup` batches (the first batch, which prepares and caches the
   split, is reported on its own);
2. the step alone: the trainer's jitted step on a synthetic batch of the
   same shape (`jaxssl.bench.harness`), median of `--steps` steps; the
   step includes the device half of the augmentation (colour, grayscale,
   blur, solarize: `augment.device.finish_views`);
3. the two together, as the trainer runs them: `--steps` steps, each fed
   the next pipeline batch (the pipeline prefetches on its own threads).
img/s counts images (each with V views) per second. The pipeline keeps up
when (1) is comfortably above (2); (3) against (2) is what starving costs.
On a CPU "device" the pipeline and the step share the same cores, so (3)
is below min((1), (2)) even when neither starves the other.

  python -m jaxssl.bench input --config configs/simclr_fashion_mnist.py
  python -m jaxssl.bench input --json --batches 50 --set dataset.data_dir=/d
"""

import json
import os
import statistics
import sys
import time

from jaxssl.bench import peak as peak_lib
from jaxssl.bench import harness

HELP = 'input pipeline img/s against the train step\'s consumption'


def add_arguments(parser) -> None:
  """Registers the `input` options on `parser`."""
  parser.add_argument('--config', default='configs/simclr_fashion_mnist.py')
  parser.add_argument('--batch', type=int, default=None,
                      help='global batch size (default: the config\'s)')
  parser.add_argument('--batches', type=int, default=30,
                      help='timed pipeline batches')
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed pipeline batches after the first')
  parser.add_argument('--steps', type=int, default=10,
                      help='timed steps, alone and fed (0: pipeline only)')
  parser.add_argument('--devices', type=int, default=1,
                      help='simulated host devices of the step')
  parser.add_argument('--set', action='append', default=[],
                      metavar='KEY=VALUE', help='config override')
  parser.add_argument('--case-timeout', type=float, default=3600.0)


def time_batches(batches, count: int) -> list[float]:
  """Seconds to draw each of the next `count` items of `batches`."""
  times = []
  for _ in range(count):
    start = time.perf_counter()
    next(batches)
    times.append(time.perf_counter() - start)
  return times


def _fed_steps(s, state, batches, count: int) -> tuple[list[float], object]:
  """Times `count` trainer-style steps, each on the next pipeline batch."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxssl import train  # pylint: disable=g-import-not-at-top
  times = []
  for _ in range(count):
    start = time.perf_counter()
    state, metrics = s.train_step(state, train.global_batch(next(batches),
                                                            s.mesh))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return times, state


def measure(case: dict) -> dict:
  """Runs the pipeline, the step and the fed step in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxssl import input_pipeline, parallel  # pylint: disable=g-import-not-at-top
  config = harness.load_config(case['config'], batch=case['batch'],
                               overrides=case['set'])
  batch_size = config.global_batch_size
  out = dict(case, status='ok', global_batch_size=batch_size,
             views_per_image=config.augment.num_views,
             image_size=config.dataset.image_size,
             dataset=config.dataset.name)
  start = time.perf_counter()
  batches = input_pipeline.pretrain_batches(config)
  next(batches)
  out['first_batch_s'] = time.perf_counter() - start
  time_batches(batches, case['warmup'])
  times = time_batches(batches, case['batches'])
  out.update(batch_times_s=times,
             input_images_per_s=batch_size * len(times) / sum(times))
  if case['steps']:
    mesh = parallel.make_mesh(jax.devices()[:case['devices']])
    s = harness.synthetic_setup(config, mesh)
    synthetic = harness.synthetic_batch(config, s.info.image_shape[-1], mesh)
    run = harness.timed_steps(s.train_step, s.init_fn(), synthetic,
                              warmup=1, steps=case['steps'])
    step_s = statistics.median(run['step_times_s'])
    fed_times, _ = _fed_steps(s, run['state'], batches, case['steps'])
    fed_s = statistics.median(fed_times)
    out.update(step_times_s=run['step_times_s'],
               step_images_per_s=batch_size / step_s,
               input_over_step=out['input_images_per_s'] * step_s
               / batch_size,
               fed_step_times_s=fed_times,
               fed_images_per_s=batch_size / fed_s,
               fed_over_step=step_s / fed_s,
               recompiled=bool(run['compiles_after_first']))
  out['peak_rss_bytes'] = peak_lib.peak_rss_bytes()
  return out


def run(args) -> dict:
  """Runs `measure` in a subprocess on `--devices` simulated devices."""
  if args.batches <= 0 or args.warmup < 0 or args.steps < 0:
    raise ValueError(f'--batches={args.batches} must be > 0, --warmup='
                     f'{args.warmup} and --steps={args.steps} >= 0')
  case = {'config': args.config, 'batch': args.batch,
          'batches': args.batches, 'warmup': args.warmup,
          'steps': args.steps, 'devices': args.devices, 'set': args.set}
  report = {'benchmark': 'input', 'date': time.strftime('%Y-%m-%d'),
            'machine': peak_lib.machine_info(), 'config': case}
  report['result'] = peak_lib.run_child('jaxssl.bench.input', case,
                                        devices=args.devices,
                                        timeout_s=args.case_timeout)
  report['machine']['loadavg_end'] = list(os.getloadavg())
  result = report['result']
  report['ok'] = result['status'] == 'ok' and not result.get('recompiled')
  return report


def format_report(report: dict) -> str:
  """The three rates and their ratios, one line each."""
  r, machine = report['result'], report['machine']
  head = (f'Input pipeline of {report["config"]["config"]}, {report["date"]}; '
          f'{machine["cpu_count"]} CPUs, load {machine["loadavg"][0]:.1f} -> '
          f'{machine["loadavg_end"][0]:.1f}')
  if r['status'] != 'ok':
    return f'{head}\nerror: {r.get("reason")}'
  lines = [
      f'{head}; {r["dataset"]}, batch {r["global_batch_size"]} x '
      f'{r["views_per_image"]} views of {r["image_size"]} px',
      f'- first batch (prepare, cache, start): {r["first_batch_s"]:.1f} s',
      f'- pipeline alone: {r["input_images_per_s"]:.0f} img/s over '
      f'{len(r["batch_times_s"])} batches']
  if 'step_images_per_s' in r:
    lines += [
        f'- step alone (synthetic batch): {r["step_images_per_s"]:.0f} img/s'
        f' (median of {len(r["step_times_s"])})',
        f'- pipeline / step: {r["input_over_step"]:.2f}x',
        f'- step fed by the pipeline: {r["fed_images_per_s"]:.0f} img/s, '
        f'{r["fed_over_step"]:.2f}x the step alone',
        f'- recompiled: {"YES" if r["recompiled"] else "no"}']
  return '\n'.join(lines)


if __name__ == '__main__':
  from jaxssl import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_process()
  print(json.dumps(measure(json.loads(sys.argv[1]))))
