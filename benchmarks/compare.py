"""jaxssl's SimCLR step against the same step in PyTorch, on this machine.

Both sides: ResNet-18 with the CIFAR stem, SimCLR v2's 3-layer head,
NT-Xent (tau 0.5) and a SimCLR LARS update, float32, 2 views of 32x32x3
per image at the same global batch, synthetic data (see
`benchmarks/torch_simclr.py`; jaxssl's side is `configs/simclr_cifar10.py`
through `jaxssl.bench.step`, one simulated device). Each side lives in its
own worker process, built and warmed up once: one per jaxssl conv impl and
one for PyTorch (`torch.set_num_threads(cpu count)`). The parent then runs
`--rounds` rounds; in each, every worker in turn runs `--turn-warmup`
untimed steps, then `--steps` timed ones, while the others wait idle on a
pipe (so they do not compete for cores); the order rotates between rounds.
Medians over all rounds give img/s; the ratio jaxssl / PyTorch is in the
same run, under the same load. The untimed steps measure each side's
steady state: on the 2-core VM of docs/benchmarks.md the first step after
another worker's turn ran up to 1.7x slower for jaxssl and 1.1x for
PyTorch at batch 256 (reported as `turn_warmup_s`).

Run from the repository root (this folder is not part of the installed
package; jaxssl itself must be importable, installed or on PYTHONPATH):

  python -m benchmarks.compare --batch 64 256
  python -m benchmarks.compare --json --batch 64 --rounds 5

PyTorch is listed in `benchmarks/requirements.txt`; without it the command
says how to install it and exits with status 1 (`JAXSSL_BENCH_NO_TORCH=1`
simulates that).
"""

import argparse
import importlib.util
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time

from jaxssl.bench import peak as peak_lib

HIDE_TORCH_ENV = 'JAXSSL_BENCH_NO_TORCH'
INSTALL_HINT = ('pip install -r benchmarks/requirements.txt (or, for the '
                'CPU-only wheel: pip install torch --index-url '
                'https://download.pytorch.org/whl/cpu)')
# The repository root: workers run `-m benchmarks.compare` from there.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_arguments(parser) -> None:
  """Registers the `compare` options on `parser`."""
  parser.add_argument('--batch', type=int, nargs='+', default=[64, 256],
                      help='global batch sizes (default 64 256)')
  parser.add_argument('--config', default='configs/simclr_cifar10.py',
                      help='jaxssl side (must stay the ResNet-18 CIFAR '
                      'recipe to be comparable)')
  parser.add_argument('--conv-impls', nargs='+', default=['auto', 'xla'],
                      choices=('auto', 'cpu', 'xla'),
                      help='jaxssl kernels choices (config key kernels)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=2,
                      help='timed steps per worker per round')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed steps after the first call')
  parser.add_argument('--turn-warmup', type=int, default=1,
                      help='untimed steps at the start of each turn (a '
                      "worker's steps after another worker ran)")
  parser.add_argument('--channels-last', action='store_true',
                      help='PyTorch convs in NHWC memory order')
  parser.add_argument('--settle-s', type=float, default=0.5,
                      help='pause before each worker runs (idle threads '
                      'stop spinning)')
  parser.add_argument('--worker-timeout', type=float, default=3600.0,
                      help='seconds a worker may take to answer')


def torch_missing_reason() -> str | None:
  """Why the PyTorch side cannot run, or None when torch is importable."""
  if os.environ.get(HIDE_TORCH_ENV, '') not in ('', '0'):
    return (f'PyTorch is hidden ({HIDE_TORCH_ENV} is set), so there is '
            f'nothing to compare against; unset it, or install it: '
            f'{INSTALL_HINT}')
  if importlib.util.find_spec('torch') is None:
    return ('PyTorch is not installed (see benchmarks/requirements.txt), so '
            f'there is nothing to compare against: {INSTALL_HINT}')
  return None


# --------------------------------------------------------------- workers --


def _jax_worker(case: dict):
  """Builds the jaxssl step; returns `(ready facts, run_steps, final)`."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxssl.bench import harness  # pylint: disable=g-import-not-at-top
  from jaxssl.bench import step as step_lib  # pylint: disable=g-import-not-at-top
  s, state, batch, facts = step_lib.prepare(
      {'config': case['config'], 'batch': case['batch'], 'devices': 1,
       'impl': case['impl'], 'set': []})
  run = harness.timed_steps(s.train_step, state, batch,
                            warmup=case['warmup'], steps=1)
  holder = {'state': run['state'], 'loss': 0.0}
  compiles = harness.CompileCounter.count
  facts.update(first_call_s=run['first_call_s'], compile_s=run['compile_s'])

  def run_steps(count):
    times = []
    for _ in range(count):
      start = time.perf_counter()
      holder['state'], metrics = s.train_step(holder['state'], batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    holder['loss'] = float(metrics['loss'])
    return times, holder['loss']

  def final():
    return {'compiles_after_first': harness.CompileCounter.count - compiles
            + run['compiles_after_first'],
            'peak_flops_per_s': step_lib.measure_peak('float32',
                                                      s.mesh.devices.flat)}

  return facts, run_steps, final


def _torch_worker(case: dict):
  """Builds the PyTorch step; returns `(ready facts, run_steps, final)`."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_simclr  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  model = torch_simclr.SimCLRStep(channels_last=case['channels_last'])
  views = torch.rand(case['batch'], 2, 3, 32, 32,
                     generator=torch.Generator().manual_seed(0))
  start = time.perf_counter()
  model.step(views)
  first = time.perf_counter() - start
  for _ in range(case['warmup']):
    model.step(views)

  def run_steps(count):
    times, loss = [], 0.0
    for _ in range(count):
      start = time.perf_counter()
      loss = model.step(views)
      times.append(time.perf_counter() - start)
    return times, loss

  facts = {'first_call_s': first, 'torch_version': torch.__version__,
           'threads': torch.get_num_threads(),
           'channels_last': case['channels_last']}
  return facts, run_steps, lambda: {}


def worker_main(case: dict) -> None:
  """Serves `{"steps": k, "warmup": w}` requests, one JSON line each.

  Each request runs w untimed (`turn_warmup_s`) then k timed steps.

  Prints one JSON line when ready, then one per request; on `{"quit":
  true}` or end of input prints a final line with the peak RSS and exits.
  """
  build = _torch_worker if case['side'] == 'torch' else _jax_worker
  facts, run_steps, final = build(case)
  print(json.dumps(dict(facts, status='ready')), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    if request.get('quit'):
      break
    warmup = request.get('warmup', 0)
    times, loss = run_steps(warmup + request['steps'])
    print(json.dumps({'times_s': times[warmup:], 'loss': loss,
                      'turn_warmup_s': times[:warmup]}), flush=True)
  print(json.dumps(dict(final(), peak_rss_bytes=peak_lib.peak_rss_bytes())),
        flush=True)


class Worker:
  """A worker subprocess answering one JSON line per request."""

  def __init__(self, case: dict, timeout_s: float):
    self.case, self.timeout_s = case, timeout_s
    self.stderr = tempfile.TemporaryFile('w+')
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.compare', '--worker',
         json.dumps(case)], cwd=REPO,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
        env=peak_lib.child_env(1), text=True)

  def read(self) -> dict:
    ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
    line = self.proc.stdout.readline() if ready else ''
    if not line:
      self.proc.kill()
      self.proc.wait()
      self.stderr.seek(0)
      tail = [l for l in self.stderr.read().splitlines() if l.strip()][-1:]
      raise RuntimeError(f'{self.case["name"]} worker failed: '
                         f'{(tail or ["no answer in time"])[0][-300:]}')
    return json.loads(line)

  def request(self, message: dict) -> dict:
    self.proc.stdin.write(json.dumps(message) + '\n')
    self.proc.stdin.flush()
    return self.read()

  def close(self) -> dict:
    final = self.request({'quit': True})
    self.proc.wait()
    self.stderr.close()
    return final


# ---------------------------------------------------------------- parent --


def _worker_cases(args, batch: int) -> list[dict]:
  cases = [{'side': 'jax', 'name': f'jaxssl-{impl}', 'impl': impl,
            'config': args.config} for impl in args.conv_impls]
  cases.append({'side': 'torch', 'name': 'pytorch',
                'channels_last': args.channels_last})
  return [dict(c, batch=batch, warmup=args.warmup) for c in cases]


def compare_batch(args, batch: int) -> dict:
  """Starts the workers one after another, then runs rotating rounds."""
  workers, sides = [], {}
  try:
    for case in _worker_cases(args, batch):
      worker = Worker(case, args.worker_timeout)
      workers.append(worker)
      sides[case['name']] = dict(worker.read(), times_s=[], turn_warmup_s=[])
    for round_index in range(args.rounds):
      shift = round_index % len(workers)
      for worker in workers[shift:] + workers[:shift]:
        time.sleep(args.settle_s)
        answer = worker.request({'steps': args.steps,
                                 'warmup': args.turn_warmup})
        side = sides[worker.case['name']]
        side['times_s'] += answer['times_s']
        side['turn_warmup_s'] += answer['turn_warmup_s']
        side['loss'] = answer['loss']
    for worker in workers:
      sides[worker.case['name']].update(worker.close())
  finally:
    for worker in workers:
      if worker.proc.poll() is None:
        worker.proc.kill()
  for side in sides.values():
    side['median_step_s'] = statistics.median(side['times_s'])
    side['images_per_s'] = batch / side['median_step_s']
  return {'batch': batch, 'sides': sides}


def _add_ratios(result: dict) -> None:
  sides = result['sides']
  torch_side = sides['pytorch']
  flops = next(s['model_flops'] for s in sides.values() if 'model_flops' in s)
  peak = next(s['peak_flops_per_s'] for s in sides.values()
              if 'peak_flops_per_s' in s)
  analytic = next(s['analytic_flops'] for s in sides.values()
                  if 'analytic_flops' in s)
  result.update(model_flops=flops, analytic_flops=analytic,
                peak_flops_per_s=peak)
  for side in sides.values():
    side['mfu'] = flops / side['median_step_s'] / peak
    side['mfu_analytic'] = analytic / side['median_step_s'] / peak
    side['ratio_to_pytorch'] = side['images_per_s'] / torch_side[
        'images_per_s']


def run(args) -> dict:
  """Compares every batch size; explains itself when torch is missing."""
  report = {'benchmark': 'compare', 'date': time.strftime('%Y-%m-%d'),
            'machine': peak_lib.machine_info(),
            'config': {k: v for k, v in vars(args).items()
                       if k not in ('command', 'json')}}
  missing = torch_missing_reason()
  if missing:
    return dict(report, ok=False, status='torch-missing', message=missing)
  if args.rounds <= 0 or args.steps <= 0 or args.turn_warmup < 0:
    raise ValueError(f'--rounds={args.rounds} and --steps={args.steps} must '
                     f'be positive, --turn-warmup={args.turn_warmup} >= 0')
  results = []
  for batch in args.batch:
    try:
      result = compare_batch(args, batch)
      _add_ratios(result)
    except RuntimeError as e:
      result = {'batch': batch, 'status': 'error', 'reason': str(e)}
    results.append(result)
  report['results'] = results
  report['machine']['loadavg_end'] = list(os.getloadavg())
  report['ok'] = all('sides' in r and not any(
      s.get('compiles_after_first') for s in r['sides'].values())
                     for r in results)
  report['status'] = 'ok' if report['ok'] else 'failed'
  return report


def format_report(report: dict) -> str:
  """One table row per batch and side, with the ratio to PyTorch."""
  if report.get('status') == 'torch-missing':
    return report['message']
  machine, cfg = report['machine'], report['config']
  lines = [f'SimCLR ResNet-18 CIFAR step, float32, synthetic 32x32x3, '
           f'{cfg["rounds"]} rounds x ({cfg["turn_warmup"]} untimed + '
           f'{cfg["steps"]} timed) steps per side; '
           f'{machine["cpu_count"]} CPUs, load {machine["loadavg"][0]:.1f} -> '
           f'{machine["loadavg_end"][0]:.1f}; {report["date"]}', '',
           '| batch | side | step (ms, median) | img/s | views/s | MFU (XLA) | '
           'MFU (analytic) | x PyTorch | recompiled |',
           '|---:|---|---:|---:|---:|---:|---:|---:|---|']
  for r in report['results']:
    if 'sides' not in r:
      lines.append(f'| {r["batch"]} | error: {r["reason"]} ||||||||')
      continue
    for name, s in r['sides'].items():
      recompiled = ('-' if 'compiles_after_first' not in s else
                    'YES' if s['compiles_after_first'] else 'no')
      lines.append(
          f'| {r["batch"]} | {name} | {s["median_step_s"] * 1e3:.0f} | '
          f'{s["images_per_s"]:.2f} | {2 * s["images_per_s"]:.2f} | '
          f'{100 * s["mfu"]:.0f}% | {100 * s["mfu_analytic"]:.0f}% | '
          f'{s["ratio_to_pytorch"]:.2f} | '
          f'{recompiled} |')
  return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.compare', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--json', action='store_true',
                      help='print the report as JSON, not a table')
  add_arguments(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the comparison (or, with `--worker CASE_JSON`, one worker)."""
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ['--worker']:
    from jaxssl import runtime  # pylint: disable=g-import-not-at-top
    runtime.configure_process()
    worker_main(json.loads(argv[1]))
    return 0
  args = build_parser().parse_args(argv)
  report = run(args)
  print(json.dumps(report, indent=2) if args.json else format_report(report))
  return 0 if report['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
