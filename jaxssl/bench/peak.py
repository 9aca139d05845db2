"""Measured matmul FLOP/s of the current devices: the roofline of `step`.

A batched matmul `[D, n, n] @ [D, n, n]` is sharded over D devices (one
`n x n` product per device, all at once), so the figure is the aggregate
peak of the devices a step runs on. Simulated CPU devices share the host's
cores, so on a CPU the figure is the machine's peak whatever D is. Each size
is timed `--repeats` times after a warm-up call, each timing over enough
back-to-back calls to hide dispatch; the best time counts (a peak is a
best case). The report keeps the best size per dtype.

  python -m jaxssl.bench peak                     # float32 and bfloat16
  python -m jaxssl.bench peak --json --sizes 2048 --devices 8

`machine_info()` and `run_child()` are shared with the other subcommands.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HELP = 'matmul FLOP/s of the current devices (float32, bfloat16)'
DTYPES = ('float32', 'bfloat16')
# Sizes per backend: large enough that a product takes milliseconds.
DEFAULT_SIZES = {'cpu': (1024, 2048), 'other': (4096, 8192)}


def add_arguments(parser) -> None:
  """Registers the `peak` options on `parser`."""
  parser.add_argument('--dtypes', nargs='+', choices=DTYPES,
                      default=list(DTYPES))
  parser.add_argument('--sizes', type=int, nargs='+', default=None,
                      help='matrix sides n (default: 1024 2048 on CPU, '
                      '4096 8192 on accelerators)')
  parser.add_argument('--repeats', type=int, default=5,
                      help='timings per size; the best counts')
  parser.add_argument('--min-time-s', type=float, default=0.2,
                      help='calls per timing are chosen to last this long')
  parser.add_argument('--devices', type=int, default=0,
                      help='simulated host devices (0: as the platform has)')


def machine_info() -> dict:
  """Host facts every report carries (no jax import)."""
  return {'platform': platform.platform(), 'processor': platform.processor(),
          'cpu_count': os.cpu_count(), 'loadavg': list(os.getloadavg())}


def peak_rss_bytes() -> int:
  """This process's peak resident memory (VmHWM; ru_maxrss off Linux)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  import resource  # pylint: disable=g-import-not-at-top
  scale = 1 if sys.platform == 'darwin' else 1024  # macOS reports bytes
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child_env(devices: int) -> dict:
  """Environment of a benchmark child on `devices` simulated host devices.

  Args:
    devices: value for `--xla_force_host_platform_device_count`; 0 keeps
      the inherited `XLA_FLAGS`.
  """
  env = dict(os.environ)
  package_root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (package_root, env.get('PYTHONPATH')) if p)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  if devices:
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    flags.append(f'--xla_force_host_platform_device_count={devices}')
    env['XLA_FLAGS'] = ' '.join(flags)
  return env


def run_child(module: str, case: dict, *, devices: int,
              timeout_s: float) -> dict:
  """Runs `python -m <module> <case json>`; returns its last stdout line.

  The child prints one JSON object as its last line. A failure or a
  timeout comes back as `dict(case, status='error', reason=...)`.
  """
  cmd = [sys.executable, '-m', module, json.dumps(case)]
  start = time.monotonic()
  with tempfile.TemporaryFile('w+') as err:
    try:
      done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err,
                            env=child_env(devices), text=True,
                            timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
      return dict(case, status='error',
                  reason=f'killed: time above {timeout_s:.0f} s')
    err.seek(0)
    err_tail = [line for line in err.read().strip().splitlines()
                if line.strip()][-1:]
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    return dict(case, status='error',
                reason=(err_tail or ['no output'])[0][-300:])
  return dict(json.loads(lines[-1]), wall_s=time.monotonic() - start)


def matmul_flops_per_s(dtype: str, size: int, *, repeats: int = 5,
                       min_time_s: float = 0.2, devices=None) -> dict:
  """Best FLOP/s of one `[size, size]` product per device, all devices at once.

  Args:
    dtype: 'float32' or 'bfloat16' (inputs; accumulation as XLA chooses,
      the output in `dtype`).
    size: matrix side n.
    repeats: timings; the best counts.
    min_time_s: each timing runs enough calls to last about this long.
    devices: the devices to use (default: all local devices).

  Returns:
    `{'dtype', 'size', 'devices', 'flops_per_s', 'best_s'}`, `best_s` the
    time of one call (one product on every device).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxssl import parallel  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES or size <= 0 or repeats <= 0:
    raise ValueError(f'dtype={dtype!r}, size={size}, repeats={repeats}: '
                     f'dtype must be one of {DTYPES}, size and repeats > 0')
  mesh = parallel.make_mesh(devices)
  count = mesh.devices.size
  sharding = parallel.batch_sharding(mesh)
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (count, size, size),
                                           jnp.dtype(dtype)), sharding)
          for k in keys)
  product = jax.jit(lambda x, y: jnp.einsum('dij,djk->dik', x, y),
                    out_shardings=sharding)
  jax.block_until_ready(product(a, b))
  start = time.perf_counter()
  jax.block_until_ready(product(a, b))
  calls = max(1, int(min_time_s / max(time.perf_counter() - start, 1e-6)))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    outs = [product(a, b) for _ in range(calls)]
    jax.block_until_ready(outs)
    best = min(best, (time.perf_counter() - start) / calls)
    del outs
  return {'dtype': dtype, 'size': size, 'devices': count,
          'flops_per_s': 2.0 * size**3 * count / best, 'best_s': best}


def measure(case: dict) -> dict:
  """Measures every dtype and size of `case` in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  sizes = case['sizes'] or DEFAULT_SIZES[
      'cpu' if device.platform == 'cpu' else 'other']
  results = [matmul_flops_per_s(dtype, size, repeats=case['repeats'],
                                min_time_s=case['min_time_s'])
             for dtype in case['dtypes'] for size in sizes]
  best = {}
  for r in results:
    if r['flops_per_s'] > best.get(r['dtype'], {}).get('flops_per_s', 0):
      best[r['dtype']] = r
  return {'status': 'ok', 'device': f'{device.platform}:{device.device_kind}',
          'device_count': jax.device_count(), 'results': results,
          'peak_flops_per_s': {d: r['flops_per_s'] for d, r in best.items()}}


def run(args) -> dict:
  """Measures the peak in a child process (so `--devices` can apply)."""
  case = {'dtypes': args.dtypes, 'sizes': args.sizes,
          'repeats': args.repeats, 'min_time_s': args.min_time_s}
  report = {'benchmark': 'peak', 'date': time.strftime('%Y-%m-%d'),
            'machine': machine_info(), 'config': case}
  report['result'] = run_child('jaxssl.bench.peak', case,
                               devices=args.devices, timeout_s=1800)
  report['machine']['loadavg_end'] = list(os.getloadavg())
  report['ok'] = report['result']['status'] == 'ok'
  return report


def format_report(report: dict) -> str:
  """One row per dtype and size, the best of each dtype marked."""
  result, machine = report['result'], report['machine']
  head = (f'Matmul peak, {report["date"]}; {machine["cpu_count"]} CPUs, load '
          f'{machine["loadavg"][0]:.1f} -> {machine["loadavg_end"][0]:.1f}')
  if result['status'] != 'ok':
    return f'{head}\nerror: {result.get("reason")}'
  lines = [f'{head}; device {result["device"]} x{result["device_count"]}',
           '', '| dtype | n | devices | time per product (ms) | GFLOP/s |',
           '|---|---:|---:|---:|---:|']
  for r in result['results']:
    star = ' (best)' if (result['peak_flops_per_s'][r['dtype']]
                         == r['flops_per_s']) else ''
    lines.append(f'| {r["dtype"]} | {r["size"]} | {r["devices"]} | '
                 f'{r["best_s"] * 1e3:.2f} | '
                 f'{r["flops_per_s"] / 1e9:.1f}{star} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(json.dumps(measure(json.loads(sys.argv[1]))))
