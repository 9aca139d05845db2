"""Tests of the accelerator check (benchmarks/device_check.py).

The dry run executes every section with tiny sizes on this CPU, through
`benchmarks/device_check.sh` as on the GPU machine, with TensorFlow, tfds
and clu made absent by `benchmarks/import_guard` in every process; the
report must hold every section with finite figures, no error and no
attempt to import them. The orchestration (time limits, the budget,
killing a section's children, reading reports) is tested on stand-in
sections; the GPU sizes are checked to parse, since only a GPU runs them.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks import device_check
from benchmarks import device_check_sections
from jaxssl.bench import __main__ as bench_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = [s.name for s in device_check_sections.sections()]


def finite_numbers(value, path='') -> list[str]:
  """Paths of the non-finite numbers (and Nones) anywhere in `value`."""
  if isinstance(value, dict):
    return [p for k, v in value.items()
            for p in finite_numbers(v, f'{path}.{k}')]
  if isinstance(value, list):
    return [p for i, v in enumerate(value)
            for p in finite_numbers(v, f'{path}[{i}]')]
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return [path]
  return []


# --------------------------------------------------------------- dry run --


def test_dry_run(tmp_path):
  """One dry run through the shell wrapper, checked four ways.

  One test, not four sharing a fixture: under xdist each worker would run
  the dry run again.
  """
  proc = subprocess.run(
      ['bash', os.path.join(REPO, 'benchmarks', 'device_check.sh'),
       '--dry-run', '--out', str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=1200,
      env=dict(os.environ, PYTHON=sys.executable))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  check_every_section_has_finite_figures(report)
  check_nothing_imported_tensorflow_tfds_or_clu(report)
  check_headline_figures(report['sections'])
  check_written_reports(report, tmp_path)


def check_every_section_has_finite_figures(report):
  assert report['mode'] == 'dry_run' and report['ok']
  assert report['failed_sections'] == []
  assert list(report['sections']) == SECTIONS
  for name, entry in report['sections'].items():
    assert entry['error'] is None, (name, entry['error'])
    assert entry['figures'], name
    assert finite_numbers(entry['figures']) == [], name
    assert entry['wall_s'] > 0, name
  assert report['device'] == 'cpu' and report['platform'] == 'cpu'
  assert report['jax_version'] == report['sections']['env']['figures'][
      'versions']['jax']


def check_nothing_imported_tensorflow_tfds_or_clu(report):
  # The guard logs every attempt, from every section and bench child; it
  # does log them (test_import_guard_blocks_and_logs), so none were made.
  assert report['blocked_imports'] == []
  assert report['sections']['env']['figures']['missing_modules'] == []


def check_headline_figures(sections):
  figures = {name: entry['figures'] for name, entry in sections.items()}
  assert set(figures['peak']['tflop_per_s']) == {'float32', 'bfloat16'}
  for name in ('step_resnet50_224_bf16', 'step_resnet18_cifar'):
    step = figures[name]
    assert step['status'] == 'ok' and not step['recompiled']
    for key in ('images_per_s', 'mfu', 'compile_s', 'model_tflop_per_step'):
      assert step[key] > 0, (name, key)
  assert figures['step_resnet50_224_bf16']['dtype'] == 'bfloat16'
  for name in ('losses_block8192', 'losses_block4096'):
    for case in figures[name]['cases']:
      assert case['status'] == 'ok' and case['min_s'] > 0, (name, case)
  assert [c['impl'] for c in figures['losses_block8192']['cases']] == [
      'dense', 'blockwise']
  assert figures['augment_224']['device_img_s'] > 0
  train = figures['train_quickstart']
  assert train['compiles_after_first'] == 0 and train['images_per_s'] > 0
  assert [step for step, _ in train['losses']] == [1, 2, 4]


def check_written_reports(report, out):
  with open(out / 'device_check.json', encoding='utf-8') as f:
    assert json.load(f) == report
  with open(out / 'device_check_raw.json', encoding='utf-8') as f:
    raw = json.load(f)
  assert list(raw['sections']) == SECTIONS
  step = raw['sections']['step_resnet50_224_bf16']
  assert step['command'].startswith('python -m jaxssl.bench step --json')
  assert step['report']['cases'][0]['status'] == 'ok'


# ------------------------------------------------------ the GPU commands --


@pytest.mark.parametrize('section', device_check_sections.sections(),
                         ids=lambda s: s.name)
def test_gpu_commands_parse(section):
  """The sizes only a GPU runs are valid options of their commands."""
  argv = [a.replace('{case_timeout}', '100') for a in section.argv]
  assert argv[0] == '-m'
  if argv[1] == 'benchmarks.device_check':
    device_check.build_parser().parse_args(argv[2:])
    return
  assert argv[1] == 'jaxssl.bench'
  args = bench_main.build_parser().parse_args(argv[2:])
  assert args.json
  if hasattr(args, 'config'):
    assert os.path.isfile(os.path.join(REPO, args.config))
  if hasattr(args, 'dataset_facts'):
    assert args.dataset_facts == 'table'  # no tfds on the GPU machine


# -------------------------------------------------------- orchestration --


def stand_in(name, code, *, cap_s=60.0, min_s=0.0,
             problem=device_check_sections._report_ok):
  """A section that runs `python -c CODE` and keeps its whole report."""
  return device_check_sections.Section(
      name, ('-c', code), ('-c', code), cap_s, min_s, lambda r: r, problem)


def run_stand_ins(sections, budget_s=300.0):
  env = device_check.section_env(False, os.devnull)
  compact, _ = device_check.run_all(sections, dry_run=False,
                                    budget_s=budget_s, env=env)
  return compact


def test_a_section_killed_at_its_limit_loses_only_itself():
  compact = run_stand_ins([
      stand_in('slow', 'import time; time.sleep(600)', cap_s=1.0),
      stand_in('fine', 'import json; print(json.dumps({"x": 1.5}))')])
  assert compact['slow']['error'] == 'killed at its 1 s limit'
  assert compact['fine']['error'] is None
  assert compact['fine']['figures'] == {'x': 1.5}


def test_killing_a_section_kills_the_processes_it_started(tmp_path):
  pid_file = tmp_path / 'pid'
  code = ('import subprocess, sys, time; '
          'p = subprocess.Popen([sys.executable, "-c", '
          '"import time; time.sleep(600)"]); '
          f'open({str(pid_file)!r}, "w").write(str(p.pid)); '
          'time.sleep(600)')
  compact = run_stand_ins([stand_in('parent', code, cap_s=5.0)])
  assert compact['parent']['error'] == 'killed at its 5 s limit'
  pid = int(pid_file.read_text())
  for _ in range(100):  # SIGKILL is delivered asynchronously
    if not _alive(pid):
      break
    time.sleep(0.1)
  assert not _alive(pid)


def _alive(pid: int) -> bool:
  """True if `pid` runs (a zombie left for its reaper does not)."""
  try:
    with open(f'/proc/{pid}/status', encoding='utf-8') as f:
      return not any(line.startswith('State:') and 'Z' in line.split()[1]
                     for line in f)
  except FileNotFoundError:
    return False


def test_the_budget_keeps_the_least_time_of_later_sections():
  compact = run_stand_ins([
      stand_in('first', 'print("{}")', min_s=50.0),
      stand_in('second', 'print("{}")', min_s=55.0)], budget_s=100.0)
  # 100 s less the 55 s kept for 'second' leaves 45 s, under 'first''s 50.
  assert compact['first']['error'].startswith('not run: ')
  assert compact['second']['error'] is None


def test_failed_reports_and_missing_json_are_errors():
  compact = run_stand_ins([
      stand_in('not_ok', 'print(\'{"ok": false}\')'),
      stand_in('crash', 'import sys; print("boom", file=sys.stderr); '
               'sys.exit(3)'),
      stand_in('odd', 'print("{}")',
               problem=lambda report: report['missing_key'])])
  assert compact['not_ok']['error'] == 'the report says ok=false'
  assert compact['crash']['error'] == 'exit 3, no JSON: boom'
  assert compact['odd']['error'] == (
      "unexpected report: KeyError: 'missing_key'")


def test_import_guard_blocks_and_logs(tmp_path):
  log = tmp_path / 'blocked.log'
  env = device_check.section_env(True, str(log))
  code = ('import jaxssl.bench.step\n'
          'for name in ("tensorflow", "tensorflow_datasets.core", "clu"):\n'
          '  try:\n'
          '    __import__(name)\n'
          '  except ModuleNotFoundError as e:\n'
          '    print(e.name)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path),
                        env=env, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # A submodule's import fails at its blocked parent, as if not installed.
  assert proc.stdout.split() == ['tensorflow', 'tensorflow_datasets', 'clu']
  assert device_check._blocked_attempts(str(log)) == [
      'clu', 'tensorflow', 'tensorflow_datasets']
