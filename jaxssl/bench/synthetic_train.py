"""A short training run of the trainer's step on synthetic data.

The step is the trainer's own (`harness.synthetic_setup`: method, schedule,
optimizer, donation), run for `--steps` steps as `jaxssl.train.train` runs
it: each step gets the next host batch, assembled with
`step_setup.global_batch`, and the loss is read back only at log steps.
What it leaves out is what needs TensorFlow or files: the tf.data
pipeline (a pool of `--pool` synthetic batches is cycled instead),
TensorBoard, checkpoints and the evaluation. So it runs where TensorFlow
is not installed (the accelerator check) and tells whether the loss falls.

The synthetic images carry a signal a contrastive method can learn: each
image is uniform noise and each of its views is that image plus 10%
independent noise (the step's device half of the augmentation then
colours them as in training). Reported: the loss at the first, every
`--log-every`-th and the last step, the first call's time (compile +
run), img/s over the steps after the first (host-to-device copies
included), recompiles after the first step, peak memory.

  python -m jaxssl.bench train --config configs/simclr_fashion_mnist.py
  python -m jaxssl.bench train --steps 300 --dataset-facts table --json
"""

import math
import time

from jaxssl.bench import harness
from jaxssl.bench import peak as peak_lib

HELP = "the trainer's step for N steps on synthetic data: loss, img/s"
VIEW_NOISE = 0.1  # each view = its image + this much uniform noise


def add_arguments(parser) -> None:
  """Registers the `train` options on `parser`."""
  parser.add_argument('--config', default='configs/simclr_fashion_mnist.py')
  parser.add_argument('--batch', type=int, default=None,
                      help='global batch size (default: the config\'s)')
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--log-every', type=int, default=0,
                      help='read the loss every N steps (0: steps // 10)')
  parser.add_argument('--pool', type=int, default=8,
                      help='distinct synthetic batches, cycled')
  parser.add_argument('--devices', type=int, default=1,
                      help='devices of the mesh (the first N)')
  parser.add_argument('--set', action='append', default=[],
                      metavar='KEY=VALUE', help='config override')
  parser.add_argument('--dataset-facts', choices=harness.FACTS,
                      default='auto',
                      help='see `step --help` (table: no TensorFlow import)')


def synthetic_pool(config, num_channels: int, count: int, seed: int = 0):
  """`count` host batches shaped like `input_pipeline.pretrain_batches`'.

  Returns:
    A list of `{'views': (float32 [B, V, S, S, C] in [0, 1],), 'label':
    int32 [B], 'index': int32 [B]}`; the V views of an image share its
    noise image (see the module docstring).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  b, v = config.global_batch_size, config.augment.num_views
  size = config.dataset.image_size
  pool = []
  for k in range(count):
    images = rng.random((b, 1, size, size, num_channels), np.float32)
    noise = rng.random((b, v, size, size, num_channels), np.float32)
    views = (1 - VIEW_NOISE) * images + VIEW_NOISE * noise
    pool.append({'views': (views.astype(np.float32),),
                 'label': rng.integers(0, 10, b, dtype=np.int32),
                 'index': np.arange(k * b, (k + 1) * b, dtype=np.int32)})
  return pool


def _loop(s, state, pool, steps: int, log_every: int) -> dict:
  """Runs steps 2..`steps`; returns the logged losses and the wall time."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxssl import step_setup  # pylint: disable=g-import-not-at-top
  losses = []
  start = time.perf_counter()
  metrics = None
  for step in range(2, steps + 1):
    batch = step_setup.global_batch(pool[(step - 1) % len(pool)], s.mesh)
    state, metrics = s.train_step(state, batch)
    if step % log_every == 0 or step == steps:
      # Reading the loss waits for the step, as the trainer's log does.
      losses.append([step, float(metrics['loss'])])
  if metrics is not None:
    jax.block_until_ready(metrics)
  return {'losses': losses, 'wall_s': time.perf_counter() - start}


def run(args) -> dict:
  """Builds the step, runs `--steps` steps and reports the loss and rate."""
  if args.steps < 2 or args.pool < 1 or args.log_every < 0:
    raise ValueError(f'--steps={args.steps} must be >= 2, --pool='
                     f'{args.pool} >= 1 and --log-every={args.log_every} '
                     '>= 0')
  import jax  # pylint: disable=g-import-not-at-top
  from jaxssl import parallel  # pylint: disable=g-import-not-at-top
  from jaxssl import step_setup  # pylint: disable=g-import-not-at-top
  config = harness.load_config(args.config, batch=args.batch,
                               overrides=args.set)
  mesh = parallel.make_mesh(jax.devices()[:args.devices])
  s = harness.synthetic_setup(config, mesh, args.dataset_facts)
  pool = synthetic_pool(config, s.info.image_shape[-1], args.pool)
  harness.CompileCounter.ensure_registered()
  seconds_before = harness.CompileCounter.seconds
  start = time.perf_counter()
  state, metrics = s.train_step(s.init_fn(),
                                step_setup.global_batch(pool[0], mesh))
  first_loss = float(metrics['loss'])
  first_call_s = time.perf_counter() - start  # init + step: compile + run
  compile_s = harness.CompileCounter.seconds - seconds_before
  compiles = harness.CompileCounter.count
  log_every = args.log_every or max(1, args.steps // 10)
  loop = _loop(s, state, pool, args.steps, log_every)
  losses = [[1, first_loss]] + loop['losses']
  device = jax.devices()[0]
  report = {
      'benchmark': 'train', 'date': time.strftime('%Y-%m-%d'),
      'machine': peak_lib.machine_info(),
      'config': {k: v for k, v in vars(args).items()
                 if k not in ('command', 'json')},
      'device': f'{device.platform}:{device.device_kind}',
      'encoder': config.model.encoder, 'dtype': config.model.dtype,
      'kernels_resolved': s.factories.name,
      'global_batch_size': config.global_batch_size,
      'views_per_image': config.augment.num_views,
      'image_size': config.dataset.image_size,
      'steps': args.steps, 'first_call_s': first_call_s,
      'compile_s': compile_s, 'losses': losses,
      'first_loss': losses[0][1], 'last_loss': losses[-1][1],
      'loop_s': loop['wall_s'],
      'images_per_s': config.global_batch_size * (args.steps - 1)
                      / loop['wall_s'],
      'compiles_after_first': harness.CompileCounter.count - compiles,
      'peak_rss_bytes': peak_lib.peak_rss_bytes()}
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    report['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  report['loss_finite'] = all(math.isfinite(l) for _, l in losses)
  report['ok'] = report['loss_finite'] and not report['compiles_after_first']
  return report


def format_report(report: dict) -> str:
  """One line of facts, the loss curve, the rate."""
  r = report
  lines = [
      f"{r['config']['config']} on {r['device']}: {r['encoder']} "
      f"({r['dtype']}, kernels {r['kernels_resolved']}), batch "
      f"{r['global_batch_size']} x {r['views_per_image']} views of "
      f"{r['image_size']} px, {r['steps']} steps on synthetic data; "
      f"{r['date']}",
      f"- first call (compile + run): {r['first_call_s']:.1f} s "
      f"(XLA compile {r['compile_s']:.1f} s)",
      f"- steps 2..{r['steps']}: {r['images_per_s']:.0f} img/s",
      '- loss: ' + ', '.join(f'{step}: {loss:.4f}'
                             for step, loss in r['losses']),
      f"- recompiled after the first step: "
      f"{'YES' if r['compiles_after_first'] else 'no'}"]
  if not r['ok']:
    lines.append('FAILED: a non-finite loss or a recompiling step')
  return '\n'.join(lines)
