"""Device memory of the train step, from XLA's compiled program; no run.

For each global batch x `accumulation_steps` case the trainer's own step
(`harness.synthetic_setup`) is lowered on abstract inputs and compiled in a
fresh subprocess, and XLA's memory analysis of the executable is reported:
arguments (state and batch), outputs, aliased (donated) bytes, and temporaries
(activations, gradients, workspaces). The step's peak is taken as
arguments + outputs - aliased + temporaries: what the device must hold while
the step runs. Nothing is allocated but the small state, so batches far
beyond this machine's memory can be sized.

With `--budget-gib`, each k doubles the batch from the first `--batch`
until the peak passes the budget, and the report names the largest global
batch that fits, per k: what exact gradient accumulation
(`jaxssl.methods.micro_batches`) buys on a given device.

  python -m jaxssl.bench memory --config configs/simclr_cifar10.py \\
      --batch 256 1024 --accumulation-steps 1 8
  python -m jaxssl.bench memory --config configs/simclr_cifar10.py \\
      --batch 256 --accumulation-steps 1 8 64 --budget-gib 16
"""

import json
import sys
import time

from jaxssl.bench import harness
from jaxssl.bench import peak as peak_lib

HELP = 'train step device memory (XLA, compile only) per batch and k'
GIB = 2 ** 30
MIB = 2 ** 20


def add_arguments(parser) -> None:
  """Registers the `memory` options on `parser`."""
  parser.add_argument('--config', default='configs/simclr_cifar10.py')
  parser.add_argument('--batch', type=int, nargs='+', default=[256],
                      help='global batch sizes (with --budget-gib: the '
                      'first is where the doubling starts)')
  parser.add_argument('--accumulation-steps', type=int, nargs='+',
                      default=[1], help='micro-batches per step (k)')
  parser.add_argument('--budget-gib', type=float, default=0.,
                      help='> 0: find the largest batch under this peak')
  parser.add_argument('--max-batch', type=int, default=1 << 20,
                      help='where the doubling stops')
  parser.add_argument('--set', action='append', default=[],
                      metavar='KEY=VALUE', help='config override')
  parser.add_argument('--kernels', default='xla',
                      help='encoder ops (XLA\'s by default: the CPU kernels '
                      'are for speed on a CPU, not what accelerators run)')
  parser.add_argument('--dataset-facts', choices=harness.FACTS,
                      default='auto')
  parser.add_argument('--case-timeout', type=float, default=1800.0)


def measure(case: dict) -> dict:
  """Lowers and compiles one case in this process; XLA's memory figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from jaxssl import parallel  # pylint: disable=g-import-not-at-top
  overrides = list(case['set']) + [
      f'accumulation_steps={case["accumulation_steps"]}']
  config = harness.load_config(case['config'], batch=case['batch'],
                               overrides=overrides, kernels=case['kernels'])
  mesh = parallel.make_mesh(jax.devices()[:1])
  s = harness.synthetic_setup(config, mesh, case['dataset_facts'])
  n, size = config.global_batch_size, config.dataset.image_size
  data = NamedSharding(mesh, P(parallel.DATA_AXIS))
  views = jax.ShapeDtypeStruct(
      (n, config.augment.num_views, size, size, s.info.image_shape[-1]),
      jnp.float32, sharding=data)
  index = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data)
  batch = {'views': (views,), 'label': index, 'index': index}
  start = time.perf_counter()
  compiled = s.train_step.lower(s.init_fn(), batch).compile()
  analysis = compiled.memory_analysis()
  figures = {key: int(getattr(analysis, f'{key}_size_in_bytes'))
             for key in ('argument', 'output', 'alias', 'temp')}
  peak = (figures['argument'] + figures['output'] - figures['alias']
          + figures['temp'])
  device = jax.devices()[0]
  return dict(case, status='ok', global_batch_size=n,
              device=f'{device.platform}:{device.device_kind}',
              encoder=config.model.encoder,
              image_shape=[size, size, s.info.image_shape[-1]],
              views_per_image=config.augment.num_views,
              compile_s=time.perf_counter() - start,
              peak_bytes=peak, **{f'{k}_bytes': v for k, v in figures.items()})


def _case(args, batch: int, k: int) -> dict:
  case = {'config': args.config, 'batch': batch, 'accumulation_steps': k,
          'set': args.set, 'kernels': args.kernels,
          'dataset_facts': args.dataset_facts}
  return peak_lib.run_child('jaxssl.bench.memory', case, devices=1,
                            timeout_s=args.case_timeout)


def _largest_under(args, k: int, cases: list) -> int:
  """Doubles the batch from `--batch[0]` while the peak fits; 0 if none."""
  budget, batch, best = args.budget_gib * GIB, args.batch[0], 0
  while batch <= args.max_batch:
    case = _case(args, batch, k)
    cases.append(case)
    if case['status'] != 'ok' or case['peak_bytes'] > budget:
      break
    best, batch = batch, batch * 2
  return best


def run(args) -> dict:
  """Every batch x k case (or the doubling per k) in its own subprocess."""
  if min(args.accumulation_steps) < 1 or min(args.batch) < 1:
    raise ValueError(f'--batch={args.batch} and --accumulation-steps='
                     f'{args.accumulation_steps} must be positive')
  report = {'benchmark': 'memory', 'date': time.strftime('%Y-%m-%d'),
            'machine': peak_lib.machine_info(),
            'config': {k: v for k, v in vars(args).items()
                       if k not in ('command', 'json')}}
  cases, largest = [], {}
  for k in args.accumulation_steps:
    if args.budget_gib > 0:
      largest[str(k)] = _largest_under(args, k, cases)
    else:
      cases += [_case(args, batch, k) for batch in args.batch]
  report.update(cases=cases, largest_batch_under_budget=largest,
                ok=all(c['status'] == 'ok' for c in cases))
  return report


def format_report(report: dict) -> str:
  """Markdown table of the cases, then the largest batches that fit."""
  cfg = report['config']
  first = next((c for c in report['cases'] if c['status'] == 'ok'), {})
  lines = [f'Train step memory of {cfg["config"]} ({first.get("encoder")}, '
           f'images {first.get("image_shape")} x '
           f'{first.get("views_per_image")} views), XLA memory analysis on '
           f'{first.get("device")}, kernels {cfg["kernels"]}; '
           f'{report["date"]}', '',
           '| batch | k | micro-batch | peak (MiB) | temporaries (MiB) | '
           'arguments (MiB) | compile (s) |', '|---:|---:|---:|---:|---:|'
           '---:|---:|']
  for c in report['cases']:
    if c['status'] != 'ok':
      lines.append(f'| {c["batch"]} | {c["accumulation_steps"]} | - | '
                   f'{c["status"]}: {c.get("reason", "")} | | | |')
      continue
    k = c['accumulation_steps']
    lines.append(
        f'| {c["global_batch_size"]} | {k} | {c["global_batch_size"] // k} | '
        f'{c["peak_bytes"] / MIB:.1f} | {c["temp_bytes"] / MIB:.1f} | '
        f'{c["argument_bytes"] / MIB:.1f} | {c["compile_s"]:.0f} |')
  for k, batch in report['largest_batch_under_budget'].items():
    lines.append(f'- k = {k}: the largest global batch under '
                 f'{cfg["budget_gib"]:g} GiB is {batch or "none tried"}')
  return '\n'.join(lines)


if __name__ == '__main__':
  from jaxssl import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_process()
  print(json.dumps(measure(json.loads(sys.argv[1]))))
