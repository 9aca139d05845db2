"""The accelerator check: jaxssl's benchmarks on one GPU, one JSON report.

For the rare lease of a GPU machine (docs/benchmarks.md, "Accelerator
check"): in under 8 minutes of wall time it runs, each as its own
subprocess with its own time limit, the environment probe, `bench peak`,
`bench step` of SimCLR ResNet-50 bf16 at 224 px and of the ResNet-18
CIFAR recipe, `bench losses` at the GPU block sizes (8192, then 4096),
`bench augment` of the device half at 224 px and `bench train` (the
quickstart's step for 300 steps on synthetic data). Sections and sizes:
`benchmarks/device_check_sections.py`.

  bash benchmarks/device_check.sh fetch-wheels  # here: the missing wheels
  bash benchmarks/device_check.sh               # there (docs: the run call)
  bash benchmarks/device_check.sh --dry-run     # tiny sizes on this CPU

It prints ONE JSON object: the device, jax's version, and per section its
figures, wall time and error (None when it passed). A failing or timed-out
section loses only itself; a section starts only if the budget
(`--budget-s`) still holds its least useful time and that of every later
section, so the whole stays within the budget. With `--out DIR` (default
`$OUT` when set) it also writes `device_check.json` (the same object) and
`device_check_raw.json` (each section's full bench report, command and
stderr tail).

TensorFlow, tfds and clu are not installed on the accelerator machine; every
section runs with `benchmarks/import_guard` on its path, which makes them
absent here too and logs any attempt (`blocked_imports` in the report), so
the CPU dry run (`--dry-run` or `DEVICE_CHECK_DRY_RUN=1`: tiny sizes,
`JAX_PLATFORMS=cpu`, a 600 s budget) proves the path needs none of them.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks import device_check_sections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD_DIR = os.path.join(REPO, 'benchmarks', 'import_guard')
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu')
# What the sections import beyond the standard library (ml_collections is
# the one the accelerator machine lacks: device_check.sh installs it).
REQUIRED_MODULES = ('jax', 'flax', 'optax', 'numpy', 'ml_collections',
                    'absl', 'yaml')
VERSIONS = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'flax', 'optax', 'chex',
            'ml_collections', 'numpy')
DEVICE_BUDGET_S = 450.0  # of the 8 minutes: start-up and the report
DRY_BUDGET_S = 600.0  # a loaded CI machine must not cut the dry run
CASE_TIMEOUT_MARGIN_S = 15.0


def probe_env() -> dict:
  """The device, versions and missing modules, as seen by a fresh process."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  stats = devices[0].memory_stats() or {}
  versions = {}
  for name in VERSIONS:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  report = {'device': devices[0].device_kind,
            'platform': devices[0].platform, 'device_count': len(devices),
            'jax_version': jax.__version__,
            'python': platform.python_version(), 'versions': versions,
            'missing_modules': [m for m in REQUIRED_MODULES
                                if importlib.util.find_spec(m) is None]}
  if 'bytes_limit' in stats:
    report['memory_limit_gib'] = stats['bytes_limit'] / 2**30
  return report


def section_env(dry_run: bool, log_path: str) -> dict:
  """The sections' environment: the guard first on the path, no prealloc."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (GUARD_DIR, REPO, env.get('PYTHONPATH')) if p)
  env['JAXSSL_BLOCKED_IMPORTS'] = ','.join(BLOCKED)
  env['JAXSSL_BLOCKED_IMPORTS_LOG'] = log_path
  # One process at a time, each measuring its own peak: none may reserve
  # 75% of the GPU up front.
  env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env['PYTHONUNBUFFERED'] = '1'
  if dry_run:
    env['JAX_PLATFORMS'] = 'cpu'
    # One CPU device, as the accelerator machine has one GPU (the tests'
    # conftest asks for 8).
    env['XLA_FLAGS'] = ' '.join(
        f for f in env.get('XLA_FLAGS', '').split()
        if not f.startswith('--xla_force_host_platform_device_count'))
  return env


def _kill_group(proc: subprocess.Popen) -> None:
  """Kills the section and every process it started (bench children)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


def run_command(argv: list[str], env: dict, limit_s: float) -> dict:
  """Runs `python ARGV` in its own process group, at most `limit_s`.

  Returns:
    `{'returncode', 'stdout', 'stderr_tail', 'timed_out', 'wall_s'}`.
  """
  start = time.monotonic()
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    proc = subprocess.Popen([sys.executable] + argv, cwd=REPO, env=env,
                            stdout=out, stderr=err, text=True,
                            start_new_session=True)
    timed_out = False
    try:
      proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
      timed_out = True
    # A bench leaves no child behind when it exits, but a killed one may.
    _kill_group(proc)
    out.seek(0)
    err.seek(0)
    return {'returncode': proc.returncode, 'stdout': out.read(),
            'stderr_tail': err.read()[-3000:], 'timed_out': timed_out,
            'wall_s': time.monotonic() - start}


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1][-300:] if lines else 'no output'


def run_section(section, argv: list[str], env: dict, limit_s: float):
  """Runs one section; returns `(compact entry, raw entry)`."""
  done = run_command(argv, env, limit_s)
  entry = {'wall_s': round(done['wall_s'], 2), 'limit_s': round(limit_s),
           'error': None, 'figures': {}}
  raw = {'command': ' '.join(['python'] + argv),
         'returncode': done['returncode'],
         'stderr_tail': done['stderr_tail'], 'report': None}
  try:
    report = json.loads(done['stdout'])
  except ValueError:
    report = None
  if report is None:
    entry['error'] = (f'killed at its {limit_s:.0f} s limit'
                      if done['timed_out'] else
                      f'exit {done["returncode"]}, no JSON: '
                      f'{_last_line(done["stderr_tail"])}')
    return entry, raw
  raw['report'] = report
  try:
    entry['figures'] = section.figures(report)
    entry['error'] = section.problem(report)
  except (KeyError, TypeError, ValueError) as e:
    entry['error'] = f'unexpected report: {type(e).__name__}: {e}'
  return entry, raw


def run_all(chosen, *, dry_run: bool, budget_s: float, env: dict):
  """Runs `chosen` sections in order within `budget_s`; compact and raw."""
  start = time.monotonic()
  compact, raw = {}, {}
  for index, section in enumerate(chosen):
    left = budget_s - (time.monotonic() - start)
    reserve = sum(s.min_s for s in chosen[index + 1:])
    limit = left - reserve if dry_run else min(section.cap_s, left - reserve)
    if limit < section.min_s:
      compact[section.name] = {
          'wall_s': 0.0, 'limit_s': 0, 'figures': {},
          'error': f'not run: {left:.0f} s of the {budget_s:.0f} s budget '
                   'left, kept for later sections'}
      continue
    argv = [a.replace('{case_timeout}',
                      str(int(max(limit - CASE_TIMEOUT_MARGIN_S, 1))))
            for a in (section.dry_argv if dry_run else section.argv)]
    compact[section.name], raw[section.name] = run_section(
        section, argv, env, limit)
    print(f'device_check: {section.name}: '
          f'{compact[section.name]["error"] or "ok"} '
          f'({compact[section.name]["wall_s"]:.0f} s)', file=sys.stderr,
          flush=True)
  return compact, raw


def _git_commit() -> str | None:
  """git's HEAD, else `$DEVICE_CHECK_COMMIT` (a copied tree may lack .git)."""
  try:
    done = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO,
                          capture_output=True, text=True, timeout=10,
                          check=False)
    commit = done.stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    commit = ''
  return commit or os.environ.get('DEVICE_CHECK_COMMIT') or None


def _blocked_attempts(log_path: str) -> list[str]:
  try:
    with open(log_path, encoding='utf-8') as f:
      return sorted({line.split()[-1] for line in f if line.strip()})
  except OSError:
    return []


def build_report(args, compact: dict, blocked: list[str],
                 wall_s: float) -> dict:
  """The one JSON object: device and versions first, then the sections."""
  env = compact.get('env', {}).get('figures', {})
  errors = [name for name, entry in compact.items() if entry['error']]
  return {
      'check': 'jaxssl device_check',
      'mode': 'dry_run' if args.dry_run else 'device',
      'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
      'commit': _git_commit(),
      'device': env.get('device'), 'platform': env.get('platform'),
      'jax_version': env.get('jax_version'),
      'budget_s': args.budget_s, 'wall_s': round(wall_s, 2),
      'ok': not errors and not blocked, 'failed_sections': errors,
      'blocked_imports': blocked, 'sections': compact}


def _write(out_dir: str, report: dict, raw: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  for name, obj in (('device_check.json', report),
                    ('device_check_raw.json', dict(report, sections=raw))):
    with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=1)
      f.write('\n')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.device_check', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dry-run', action='store_true',
                      default=os.environ.get('DEVICE_CHECK_DRY_RUN') == '1',
                      help='tiny sizes on CPU (also DEVICE_CHECK_DRY_RUN=1)')
  parser.add_argument('--budget-s', type=float, default=0.0,
                      help=f'wall-time budget of all sections (0: '
                      f'{DEVICE_BUDGET_S:.0f}, dry run {DRY_BUDGET_S:.0f})')
  parser.add_argument('--only', nargs='+', default=None, metavar='SECTION',
                      help='run these sections only (names as in the report)')
  parser.add_argument('--out', default=os.environ.get('OUT', ''),
                      help='folder for device_check.json and '
                      'device_check_raw.json (default: $OUT when set)')
  parser.add_argument('--probe-env', action='store_true',
                      help=argparse.SUPPRESS)  # the env section's child
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.probe_env:
    print(json.dumps(probe_env()))
    return 0
  args.budget_s = args.budget_s or (DRY_BUDGET_S if args.dry_run
                                    else DEVICE_BUDGET_S)
  chosen = device_check_sections.sections()
  if args.only:
    unknown = set(args.only) - {s.name for s in chosen}
    if unknown:
      raise SystemExit(f'--only: no section {sorted(unknown)}; known: '
                       f'{[s.name for s in chosen]}')
    chosen = [s for s in chosen if s.name in args.only]
  start = time.monotonic()
  with tempfile.TemporaryDirectory() as tmp:
    log_path = os.path.join(tmp, 'blocked_imports.log')
    compact, raw = run_all(chosen, dry_run=args.dry_run,
                           budget_s=args.budget_s,
                           env=section_env(args.dry_run, log_path))
    blocked = _blocked_attempts(log_path)
  report = build_report(args, compact, blocked, time.monotonic() - start)
  if args.out:
    _write(args.out, report, raw)
  print(json.dumps(report, indent=1))
  return 0 if report['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
