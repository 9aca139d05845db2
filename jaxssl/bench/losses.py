"""NT-Xent forward+backward: time and peak process memory, dense vs blockwise.

Every case runs in a fresh Python subprocess, so its peak resident memory
(VmHWM) is its own: jax import, compilation, inputs, and one jitted
`value_and_grad` of the loss. An idle jax process is measured the same way
as the baseline. The parent samples each child's RSS and kills it past the
memory limit or the time limit. Before running, a child asks XLA how much
temporary memory the compiled program plans and skips the run if it cannot
fit (dense at 131,072 views plans about 128 GiB).

  python -m jaxssl.bench losses                      # 8k, 32k, 131k views
  python -m jaxssl.bench losses --budget-gib 4       # + largest that fits
  python -m jaxssl.bench losses --json --views 8192 --repeats 5

`--budget-gib` searches, per implementation, the largest number of views
whose peak RSS stays within the budget: doubling from `--search-start`,
then bisection, each probe a subprocess capped by `--probe-timeout`.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HELP = 'NT-Xent forward+backward time and peak memory, dense vs blockwise'
IMPLS = ('dense', 'blockwise')
GIB = 2**30


def add_arguments(parser) -> None:
  """Registers the `losses` options on `parser`."""
  parser.add_argument('--views', type=int, nargs='+',
                      default=[8192, 32768, 131072],
                      help='views per case, 2 x global batch (default: '
                      '8192 32768 131072)')
  parser.add_argument('--dim', type=int, default=128, help='embedding dim')
  parser.add_argument('--block-size', type=int, default=512,
                      help='blockwise tile side (default 512)')
  parser.add_argument('--temperature', type=float, default=0.1)
  parser.add_argument('--impls', nargs='+', choices=IMPLS,
                      default=list(IMPLS))
  parser.add_argument('--repeats', type=int, default=3,
                      help='timed runs after one warm-up run')
  parser.add_argument('--repeat-budget-s', type=float, default=120.0,
                      help='stop repeating once the timed runs of a case '
                      'exceed this many seconds (at least one run)')
  parser.add_argument('--max-rss-gib', type=float, default=None,
                      help='kill a case above this RSS (default: 80%% of '
                      'MemAvailable)')
  parser.add_argument('--case-timeout', type=float, default=3600.0,
                      help='seconds before a case is killed')
  parser.add_argument('--budget-gib', type=float, default=None,
                      help='also search the largest views within this peak '
                      'RSS')
  parser.add_argument('--search-start', type=int, default=8192)
  parser.add_argument('--search-max-views', type=int, default=1 << 21)
  parser.add_argument('--search-ratio', type=float, default=1.125,
                      help='stop bisecting when fail/fit views <= this')
  parser.add_argument('--probe-timeout', type=float, default=600.0,
                      help='seconds per search probe (compile + one run)')


# ----------------------------------------------------------------- child --


def _proc_status_bytes(field: str) -> int | None:
  """`VmRSS`/`VmHWM` of this process in bytes, or None off Linux."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _peak_rss_bytes() -> int:
  peak = _proc_status_bytes('VmHWM')
  if peak is None:
    import resource  # pylint: disable=g-import-not-at-top
    scale = 1 if sys.platform == 'darwin' else 1024  # macOS reports bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  return peak


def _planned_excess(memory, device, limit_bytes: int) -> str | None:
  """Why XLA's buffer plan cannot fit, or None.

  On CPU the plan (temporaries + outputs) adds to the current RSS and is
  compared with `limit_bytes`; on an accelerator the plan plus the inputs
  is compared with the device's own allocator limit.
  """
  planned = memory.temp_size_in_bytes + memory.output_size_in_bytes
  stats = device.memory_stats() or {}
  if 'bytes_limit' in stats:
    planned += memory.argument_size_in_bytes
    limit, where = stats['bytes_limit'], 'device'
  else:
    planned += _proc_status_bytes('VmRSS') or 0
    limit, where = limit_bytes, 'host'
  if planned <= limit:
    return None
  return (f'XLA plans {planned / GIB:.1f} GiB > {where} limit '
          f'{limit / GIB:.1f} GiB')


def _loss_fn(case):
  from jaxssl import losses  # pylint: disable=g-import-not-at-top
  if case['impl'] == 'dense':
    return lambda z1, z2: losses.nt_xent(z1, z2, case['temperature'])
  return lambda z1, z2: losses.nt_xent_blockwise(
      z1, z2, case['temperature'], block_size=case['block_size'])


def measure(case: dict) -> dict:
  """Runs one case in this process and returns its measurements."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.zeros(())))
  out = dict(case, device=f'{device.platform}:{device.device_kind}',
             rss_after_init_bytes=_proc_status_bytes('VmRSS'))
  if case['impl'] == 'idle':
    return dict(out, status='ok', peak_rss_bytes=_peak_rss_bytes())
  key1, key2 = jax.random.split(jax.random.key(0))
  shape = (case['views'] // 2, case['dim'])
  z1 = jax.random.normal(key1, shape, jnp.float32)
  z2 = jax.random.normal(key2, shape, jnp.float32)
  fn = jax.jit(jax.value_and_grad(_loss_fn(case), argnums=(0, 1)))
  start = time.perf_counter()
  compiled = fn.lower(z1, z2).compile()
  out['compile_s'] = time.perf_counter() - start
  memory = compiled.memory_analysis()
  if memory is not None:
    out['xla_temp_bytes'] = int(memory.temp_size_in_bytes)
    too_big = _planned_excess(memory, device, case['limit_bytes'])
    if too_big:
      return dict(out, status='skipped', reason=too_big)
  start = time.perf_counter()
  loss, _ = jax.block_until_ready(compiled(z1, z2))
  out['first_run_s'] = time.perf_counter() - start
  times = []
  # Large cases take minutes per run; the budget keeps the suite bounded.
  while len(times) < case['repeats'] and (
      not times or sum(times) < case['repeat_budget_s']):
    start = time.perf_counter()
    jax.block_until_ready(compiled(z1, z2))
    times.append(time.perf_counter() - start)
  out.update(status='ok', loss=float(loss), times_s=times,
             peak_rss_bytes=_peak_rss_bytes())
  if times:
    out['min_s'] = min(times)
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


# ---------------------------------------------------------------- parent --


def _child_rss_bytes(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def run_case(case: dict, *, timeout_s: float, kill_bytes: int) -> dict:
  """Runs `measure(case)` in a fresh subprocess, policing RSS and time."""
  package_root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (package_root, env.get('PYTHONPATH')) if p)
  cmd = [sys.executable, '-m', 'jaxssl.bench.losses', json.dumps(case)]
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
    start, observed, verdict = time.monotonic(), 0, None
    while proc.poll() is None:
      observed = max(observed, _child_rss_bytes(proc.pid))
      if observed > kill_bytes:
        verdict = f'killed: RSS above {kill_bytes / GIB:.2f} GiB'
      elif time.monotonic() - start > timeout_s:
        verdict = f'killed: time above {timeout_s:.0f} s'
      if verdict:
        proc.kill()
        proc.wait()
        break
      time.sleep(0.05)
    wall = time.monotonic() - start
    out.seek(0)
    err.seek(0)
    lines = out.read().strip().splitlines()
    err_tail = err.read().strip().splitlines()[-1:]
  if verdict:
    return dict(case, status=verdict.split(':')[0], reason=verdict,
                wall_s=wall, observed_peak_rss_bytes=observed)
  if proc.returncode or not lines:
    return dict(case, status='error', wall_s=wall,
                reason=(err_tail or ['no output'])[0][-300:])
  return dict(json.loads(lines[-1]), wall_s=wall,
              observed_peak_rss_bytes=observed)


def search_largest(probe, *, start: int, max_views: int,
                   ratio: float) -> dict:
  """Largest even `views` with `probe(views)[0]` true, assuming monotonicity.

  Doubles from `start` while probes fit (halves first if `start` does not),
  then bisects until `first_failing / largest_fitting <= ratio`.

  Args:
    probe: `views -> (fits, record)`.
    start: first views to probe.
    max_views: never probe above this.
    ratio: bisection stopping ratio (> 1).

  Returns:
    `{'largest_fitting_views', 'first_failing_views', 'probes'}`; either
    bound may be None (nothing fitted, or the cap was reached).
  """
  records, fit, fail = [], None, None

  def try_views(views):
    fits, record = probe(views)
    records.append(record)
    return fits

  views = start
  while fit is None and views >= 2:
    if try_views(views):
      fit = views
    else:
      fail, views = views, views // 2 // 2 * 2
  while fit is not None and fail is None and fit * 2 <= max_views:
    if try_views(fit * 2):
      fit *= 2
    else:
      fail = fit * 2
  while fit is not None and fail is not None and fail > ratio * fit:
    mid = (fit + fail) // 4 * 2
    if mid in (fit, fail):
      break
    if try_views(mid):
      fit = mid
    else:
      fail = mid
  return {'largest_fitting_views': fit, 'first_failing_views': fail,
          'probes': records}


def _default_kill_bytes() -> int:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(int(line.split()[1]) * 1024 * 0.8)
  except OSError:
    pass
  return 16 * GIB


def _base_case(args, impl, views, repeats, limit_bytes):
  return {'impl': impl, 'views': views, 'dim': args.dim,
          'block_size': args.block_size, 'temperature': args.temperature,
          'repeats': repeats, 'repeat_budget_s': args.repeat_budget_s,
          'limit_bytes': limit_bytes}


def run(args) -> dict:
  """Runs the idle baseline, the cases and the optional budget search."""
  kill_bytes = int(args.max_rss_gib * GIB) if args.max_rss_gib else (
      _default_kill_bytes())
  report = {
      'benchmark': 'losses', 'date': time.strftime('%Y-%m-%d'),
      'machine': {'platform': platform.platform(),
                  'processor': platform.processor(),
                  'cpu_count': os.cpu_count(),
                  'loadavg_start': list(os.getloadavg())},
      'config': {k: v for k, v in vars(args).items() if k != 'command'},
  }
  report['idle'] = run_case(_base_case(args, 'idle', 0, 0, kill_bytes),
                            timeout_s=args.case_timeout, kill_bytes=kill_bytes)
  report['cases'] = [
      run_case(_base_case(args, impl, views, args.repeats, kill_bytes),
               timeout_s=args.case_timeout, kill_bytes=kill_bytes)
      for views in args.views for impl in args.impls]
  if args.budget_gib:
    budget = int(args.budget_gib * GIB)
    report['budget_search'] = []
    for impl in args.impls:
      def probe(views, impl=impl):
        record = run_case(_base_case(args, impl, views, 0, budget),
                          timeout_s=args.probe_timeout, kill_bytes=budget)
        fits = (record['status'] == 'ok' and
                record['peak_rss_bytes'] <= budget)
        return fits, record
      result = search_largest(probe, start=args.search_start,
                              max_views=args.search_max_views,
                              ratio=args.search_ratio)
      report['budget_search'].append(dict(result, impl=impl,
                                           budget_gib=args.budget_gib))
  report['machine']['loadavg_end'] = list(os.getloadavg())
  return report


# ---------------------------------------------------------------- report --


def _gib(num_bytes) -> str:
  return '-' if num_bytes is None else f'{num_bytes / GIB:.2f}'


def _case_row(case) -> str:
  head = f'| {case["views"]:>7} | {case["impl"]:<9} |'
  if case['status'] != 'ok':
    return f'{head} {case["status"]}: {case.get("reason", "")} ||||||'
  best = case.get('min_s', case['first_run_s'])
  return (f'{head} {best:8.4f} | {len(case["times_s"])} | '
          f'{case["first_run_s"]:8.4f} | '
          f'{case["compile_s"]:6.2f} | {_gib(case["peak_rss_bytes"])} | '
          f'{_gib(case.get("xla_temp_bytes"))} |')


def _search_line(result) -> str:
  fit, fail = result['largest_fitting_views'], result['first_failing_views']
  last = {r['views']: r for r in result['probes']}.get(fail, {})
  why = last.get('reason') or (
      f'peak {_gib(last.get("peak_rss_bytes"))} GiB' if last else
      'search cap reached')
  return (f'- {result["impl"]}: largest fitting {fit} views; first failing '
          f'{fail} ({why})')


def format_report(report: dict) -> str:
  """Markdown table of the cases, the idle baseline and the budget search."""
  cfg, machine = report['config'], report['machine']
  idle = report['idle']
  lines = [
      f'NT-Xent forward+backward, dim {cfg["dim"]}, τ {cfg["temperature"]}, '
      f'block {cfg["block_size"]}, float32, device '
      f'{idle.get("device", "?")}; {machine["cpu_count"]} CPUs, load '
      f'{machine["loadavg_start"][0]:.1f} -> {machine["loadavg_end"][0]:.1f}; '
      f'{report["date"]}',
      f'Idle jax process peak RSS: {_gib(idle.get("peak_rss_bytes"))} GiB',
      '',
      '| views | impl | time (s, min) | runs | first run (s) | compile (s) '
      '| peak RSS (GiB) | XLA temp (GiB) |',
      '|---:|---|---:|---:|---:|---:|---:|---:|',
  ]
  lines += [_case_row(case) for case in report['cases']]
  if report.get('budget_search'):
    lines += ['', f'Largest views within {cfg["budget_gib"]} GiB peak RSS '
              f'(probe cap {cfg["probe_timeout"]:.0f} s):']
    lines += [_search_line(result) for result in report['budget_search']]
  return '\n'.join(lines)


if __name__ == '__main__':
  print(json.dumps(measure(json.loads(sys.argv[1]))))
