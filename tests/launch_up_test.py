"""Tests for `launch/tpu.py up` and `down`, against a fake gcloud.

tests/fake_gcloud.py simulates a TPU world in a temporary directory: nodes
and queued resources that are created, described, preempted and deleted as
a scenario says, and workers whose home directories run the real remote
scripts (setup, run, the log stream, the probe) with bash, the trainer being
a fake python. `up` runs in this process with an injected sleep, so backoff
and polling cost no time, and every gcloud call is recorded in order.
"""

import fcntl
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'launch'))
import tpu  # noqa: E402  (launch/ is not a package)
import tpu_commands  # noqa: E402
import tpu_up  # noqa: E402

TPU_PY = REPO / 'launch' / 'tpu.py'
FAKE = REPO / 'tests' / 'fake_gcloud.py'
NAME, ZONE, PROJECT = 'simclr-v4', 'us-central2-b', 'my-project'
BASE = [f'--name={NAME}', f'--zone={ZONE}', f'--project={PROJECT}']
SOURCE = 'git+https://example.com/jaxssl@v0.1.0'
WORKDIR = 'gs://bucket/simclr'
CONFIG_NAME = f'jaxssl_{NAME}_config.py'
LIFE = ['create', 'setup', 'scp', 'run', 'follow', 'probe']
CLEANUP = ['describe', 'delete']


def write_script(path, text):
  path.write_text(text)
  path.chmod(0o755)


class World:
  """The fake's directory: scenario in, state and records out."""

  def __init__(self, root, config):
    self.root, self.config = root, config

  def scenario(self, **scenario):
    (self.root / 'scenario.json').write_text(json.dumps(scenario))

  def state(self):
    return json.loads((self.root / 'state.json').read_text())

  def calls(self):
    path = self.root / 'calls.jsonl'
    if not path.exists():
      return []
    return [['gcloud', *json.loads(line)]
            for line in path.read_text().splitlines()]

  def labels(self):
    return [label(argv) for argv in self.calls()]

  def trainers(self, count, timeout=30.0):
    """The first `count` trainer records (preempted ones start late)."""
    path = self.root / 'trainer.jsonl'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if path.exists():
        lines = path.read_text().splitlines()
        if len(lines) >= count:
          return [json.loads(line) for line in lines]
      time.sleep(0.05)
    raise AssertionError(f'fewer than {count} trainer records')

  def end(self):
    """Tells hanging fake trainers that the test is over."""
    with open(self.root / 'lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      path = self.root / 'state.json'
      state = json.loads(path.read_text()) if path.exists() else {}
      state['over'] = True
      (self.root / 'state.json.tmp').write_text(json.dumps(state))
      os.replace(self.root / 'state.json.tmp', path)


def label(argv):
  """A short name for a recorded gcloud call."""
  kind, verb = argv[3], argv[4]
  if verb == 'ssh':
    worker = next(a for a in argv if a.startswith('--worker='))
    command = argv[-1]
    if worker == '--worker=all':
      return 'setup' if 'pip install' in command else 'run'
    return 'follow' if 'tail' in command else 'probe'
  return ('qr-' if kind == 'queued-resources' else '') + verb


@pytest.fixture
def world(tmp_path, monkeypatch):
  root = tmp_path / 'world'
  for folder in ('gcloud-bin', 'remote-bin', 'homes'):
    (root / folder).mkdir(parents=True)
  run_fake = f'exec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE))}'
  write_script(root / 'gcloud-bin' / 'gcloud',
               f'#!/bin/sh\n{run_fake} gcloud "$@"\n')
  write_script(root / 'remote-bin' / 'python3.11',
               f'#!/bin/sh\n{run_fake} python3.11 "$@"\n')
  config = tmp_path / 'my configs' / 'simclr tpu.py'
  config.parent.mkdir()
  config.write_text('def get_config():\n  return None\n')
  monkeypatch.setenv('FAKE_WORLD', str(root))
  monkeypatch.setenv('PATH', f'{root / "gcloud-bin"}{os.pathsep}'
                     f'{os.environ["PATH"]}')
  fake = World(root, config)
  fake.scenario(lives=[{'exit': 0}])
  yield fake
  fake.end()


class Up:
  """What one `up` did: exit status, sleeps, stdout, stderr lines."""

  def __init__(self, code, sleeps, out, err):
    self.code, self.sleeps, self.out = code, sleeps, out
    self.err = err.splitlines()

  def __repr__(self):  # a failing assertion shows what up said
    return '\n'.join(['', *self.err])


def up_flags(world, *flags, workdir=WORKDIR):
  return ['up', *BASE, '--accelerator-type=v4-32', '--spot',
          f'--source={SOURCE}', f'--config={world.config}',
          f'--workdir={workdir}', *flags]


def up(world, capfd, *flags, workdir=WORKDIR):
  sleeps = []
  code = tpu.main(up_flags(world, *flags, workdir=workdir),
                  sleep=sleeps.append)
  out, err = capfd.readouterr()
  return Up(code, sleeps, out, err)


def dry_run(argv):
  """The commands (argv lists) of a --dry-run, and its comment lines."""
  result = subprocess.run([sys.executable, str(TPU_PY), *argv, '--dry-run'],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.rstrip('\n').split('\n')
  return ([shlex.split(line) for line in lines if not line.startswith('#')],
          [line for line in lines if line.startswith('#')])


# ------------------------------------------------- the remote scripts alone


def _args():
  return tpu.build_parser().parse_args(
      ['up', *BASE, '--accelerator-type=v4-32', f'--source={SOURCE}',
       '--config=c.py', f'--workdir={WORKDIR}'])


def _remote(argv, home):
  command = argv[-1][len('--command='):]
  return subprocess.run(['bash', '-c', command], cwd=home, capture_output=True,
                        text=True, timeout=60,
                        env={'HOME': str(home), 'PATH': '/usr/bin:/bin'})


def test_follow_streams_until_the_run_ends_and_probe_reads_its_status(
    tmp_path):
  home = tmp_path / 'home'
  (home / 'jaxssl-venv' / 'bin').mkdir(parents=True)
  # The trainer logs, then waits for `go`, so the run is surely alive at
  # the first probe.
  write_script(home / 'jaxssl-venv' / 'bin' / 'python', (
      '#!/bin/sh\necho "step 1 of $*"\n'
      'while ! test -f go; do sleep 0.05; done\necho "step 2"\nexit 5\n'))
  args = _args()
  start = tpu_commands.run_script(args, CONFIG_NAME)
  assert _remote([f'--command={start}'], home).returncode == 0
  probe = tpu_commands.probe_command(args)
  assert _remote(probe, home).stdout == 'running\n'
  (home / 'go').touch()
  follow = _remote(tpu_commands.follow_command(args), home)
  assert follow.returncode == 0, follow.stderr
  assert follow.stdout == (f'step 1 of -m jaxssl.main --config={CONFIG_NAME} '
                           f'--workdir={WORKDIR}\nstep 2\n')
  assert _remote(probe, home).stdout == 'exit 5\n'


def test_probe_says_gone_when_nothing_ran(tmp_path):
  assert _remote(tpu_commands.probe_command(_args()),
                 tmp_path).stdout == 'gone\n'


# ------------------------------------------------------------- whole runs


def test_success_runs_exactly_the_dry_run_commands(world, capfd):
  expected, _ = dry_run(up_flags(world))
  result = up(world, capfd)
  assert result.code == 0
  assert world.calls() == expected
  assert world.labels() == LIFE + CLEANUP
  assert world.state()['node'] is None  # deleted
  assert result.sleeps == []
  # Worker 0's log streamed to stdout, all of it.
  assert result.out.splitlines()[-3:] == [
      f'fake jaxssl: pod 1 worker 0 step {s}' for s in (1, 2, 3)]
  assert result.err[-1] == 'tpu.py up: the run finished (exit status 0)'
  assert [r['worker'] for r in world.trainers(2)] == [0, 1]


def test_run_failure_deletes_the_pod_and_returns_the_runs_status(world,
                                                                 capfd):
  world.scenario(lives=[{'exit': 1}])
  result = up(world, capfd)
  assert result.code == 1
  # Status 1 is jaxssl's own error, not a preemption: no extra checks.
  assert world.labels() == LIFE + CLEANUP
  assert world.state()['node'] is None
  assert result.err[-1].startswith(
      'tpu.py up: error: the run failed with exit status 1')


def test_keep_leaves_the_pod(world, capfd):
  result = up(world, capfd, '--keep')
  assert result.code == 0
  assert world.labels() == LIFE
  assert world.state()['node']['state'] == 'READY'
  assert any(f'launch/tpu.py down --name={NAME} --zone={ZONE} '
             f'--project={PROJECT}' in line for line in result.err)


def test_preemption_mid_run_recreates_and_resumes(world, capfd):
  world.scenario(lives=[{'preempt': True}, {'exit': 0}])
  result = up(world, capfd)
  assert result.code == 0
  # The stream and the probe fail, describe finds PREEMPTED; delete, wait,
  # and the same create, setup and run again.
  assert world.labels() == (LIFE + ['describe'] + CLEANUP + LIFE + CLEANUP)
  calls = world.calls()
  assert calls[:6] == calls[9:15]  # the very same commands
  assert result.sleeps == [60]
  assert world.state()['lives'] == 2 and world.state()['node'] is None
  records = world.trainers(4)
  assert sorted((r['life'], r['worker']) for r in records) == [
      (1, 0), (1, 1), (2, 0), (2, 1)]
  assert all(r['argv'] == records[0]['argv'] for r in records)
  assert any('recovery 1 of 5' in line for line in result.err)


def test_sigterm_exit_then_preempted_state_counts_as_preemption(world, capfd):
  # jaxssl saves and exits 75 on the preemption's SIGTERM while the node
  # still reads READY; the second describe sees PREEMPTED.
  world.scenario(lives=[{'exit': 75, 'preempt_on_describe': 2}, {'exit': 0}])
  result = up(world, capfd)
  assert result.code == 0
  assert world.labels() == (LIFE + ['describe', 'describe'] + CLEANUP + LIFE
                            + CLEANUP)
  assert result.sleeps == [tpu_up.PREEMPTION_CHECK_S, 60]


def test_exit_75_on_a_healthy_pod_is_the_runs_status(world, capfd):
  world.scenario(lives=[{'exit': 75}])
  result = up(world, capfd)
  assert result.code == 75
  checks = tpu_up.PREEMPTION_CHECKS
  assert world.labels() == LIFE + ['describe'] * checks + CLEANUP
  assert result.sleeps == [tpu_up.PREEMPTION_CHECK_S] * (checks - 1)
  assert world.state()['node'] is None


def test_retries_exhausted_has_its_own_status_and_deletes(world, capfd):
  world.scenario(lives=[{'preempt': True}])
  result = up(world, capfd, '--max-preemptions=2', '--backoff=1000')
  assert result.code == tpu_up.EXIT_PREEMPTED
  assert result.code not in (0, 1, 69, 75)
  assert world.labels() == (LIFE + ['describe'] + CLEANUP) * 3
  assert world.state()['creates'] == 3 and world.state()['node'] is None
  # Doubling from --backoff, capped at BACKOFF_MAX_S.
  assert result.sleeps == [1000, min(2000, tpu_up.BACKOFF_MAX_S)]
  assert 'gave up after 3 preemptions' in result.err[-1]


def test_failed_create_after_a_preemption_is_retried(world, capfd):
  world.scenario(lives=[{'preempt': True}, {'exit': 0}], create_fails=[2])
  result = up(world, capfd)
  assert result.code == 0
  assert world.labels() == (LIFE + ['describe'] + CLEANUP + ['create']
                            + ['describe'] + LIFE + CLEANUP)
  assert result.sleeps == [60, 120]


def test_failed_first_create_deletes_nothing(world, capfd):
  # Someone's pod already has the name: up must not delete it.
  world.scenario(lives=[{'exit': 0}], existing=True)
  result = up(world, capfd)
  assert result.code == tpu_up.EXIT_GCLOUD
  assert world.labels() == ['create']
  assert world.state()['node'] == {'state': 'READY', 'life': 0}
  assert result.err[-1] == ('tpu.py up: error: create failed with exit '
                            'code 1')


def test_failed_setup_on_a_healthy_pod_fails_and_deletes(world, capfd):
  world.scenario(lives=[{'exit': 0, 'pip_exit': 1}])
  result = up(world, capfd)
  assert result.code == tpu_up.EXIT_GCLOUD
  assert world.labels() == (['create', 'setup']
                            + ['describe'] * tpu_up.PREEMPTION_CHECKS
                            + CLEANUP)
  assert world.state()['node'] is None
  assert result.err[-1] == 'tpu.py up: error: setup failed with exit code 1'


def test_dropped_log_stream_reconnects(world, capfd):
  world.scenario(lives=[{'exit': 0, 'drops': 2}])
  result = up(world, capfd)
  assert result.code == 0
  checks = tpu_up.PREEMPTION_CHECKS
  assert world.labels() == (LIFE + ['describe'] * checks + ['follow', 'probe']
                            + CLEANUP)
  # Reconnected, it prints the last lines only.
  follows = [argv for argv in world.calls() if label(argv) == 'follow']
  assert 'tail -n +1 ' in follows[0][-1] and 'tail -n 20 ' in follows[1][-1]
  assert result.sleeps == ([tpu_up.PREEMPTION_CHECK_S] * (checks - 1)
                           + [tpu_up.RECONNECT_S])


def test_log_stream_that_ends_early_is_followed_again(world, capfd):
  # The first stream closes at once while the trainer still runs (it
  # waits for worker 0's third ssh call: the second stream).
  world.scenario(lives=[{'exit': 0, 'cut': 1, 'hold': 3}])
  result = up(world, capfd)
  assert result.code == 0
  assert world.labels() == LIFE + ['follow', 'probe'] + CLEANUP
  assert result.sleeps == [tpu_up.RECONNECT_S]
  assert any('the log stream ended while the run goes on' in line
             for line in result.err)


def test_queued_resource_waits_and_recovers(world, capfd):
  world.scenario(lives=[{'preempt': True}, {'exit': 0}],
                 queue=['WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'])
  result = up(world, capfd, '--queued')
  assert result.code == 0
  waits = ['qr-create', 'qr-describe', 'qr-describe', 'qr-describe']
  life = waits + LIFE[1:]
  # Preempted: the node is gone and the queued resource SUSPENDED.
  assert world.labels() == (life + ['describe', 'qr-describe', 'qr-delete']
                            + life + ['qr-describe', 'qr-delete'])
  assert result.sleeps == [tpu_up.QUEUED_POLL_S] * 2 + [60] + (
      [tpu_up.QUEUED_POLL_S] * 2)
  assert world.state()['qr'] is None and world.state()['node'] is None


HOSTILE = 'it\'s "a" run; $(touch {m}) `touch {m}` && touch {m} | * $HOME'


def test_every_value_reaches_the_trainer_verbatim(world, capfd, tmp_path):
  marker = tmp_path / 'pwned'
  value = HOSTILE.format(m=marker)
  workdir = f'gs://bucket/{value}'
  world.scenario(lives=[{'preempt': True}, {'exit': 0}])
  result = up(world, capfd, f'--tfds-data-dir=gs://tfds/{value}',
              f'--override=loss.tag={value}', workdir=workdir)
  assert result.code == 0
  records = world.trainers(4)
  for record in records:  # both workers, before and after the preemption
    assert record['argv'] == [
        '-m', 'jaxssl.main', f'--config={CONFIG_NAME}', f'--workdir={workdir}',
        f'--config.loss.tag={value}']
    assert record['TFDS_DATA_DIR'] == f'gs://tfds/{value}'
  assert not marker.exists()


# ---------------------------------------------------------------- dry runs


def test_dry_run_prints_the_sequence_and_runs_nothing(world):
  commands, comments = dry_run(up_flags(world))
  assert [label(argv) for argv in commands] == LIFE + CLEANUP
  assert commands[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', NAME,
                         f'--zone={ZONE}', f'--project={PROJECT}',
                         '--accelerator-type=v4-32',
                         '--version=tpu-ubuntu2204-base', '--spot']
  assert commands[-1] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete',
                          NAME, f'--zone={ZONE}', f'--project={PROJECT}',
                          '--quiet']
  # A vanished worker ends the log stream within minutes.
  assert commands[4][9:11] == ['--ssh-flag=-oServerAliveInterval=30',
                               '--ssh-flag=-oServerAliveCountMax=4']
  assert any('at most 5 times' in line for line in comments)
  assert world.calls() == []


def test_dry_run_with_keep_and_queued(world, tmp_path):
  wheel = tmp_path / 'jaxssl-0.1.0-py3-none-any.whl'
  wheel.write_bytes(b'')
  flags = [a if not a.startswith('--source=') else f'--source={wheel}'
           for a in up_flags(world, '--queued', '--keep')]
  commands, comments = dry_run(flags)
  assert [label(argv) for argv in commands] == [
      'qr-create', 'qr-describe', 'scp', 'setup', 'scp', 'run', 'follow',
      'probe']
  assert commands[2][5:7] == [str(wheel), f'{NAME}:{wheel.name}']
  assert any('--keep' in line for line in comments)
  assert world.calls() == []


# -------------------------------------------------------------------- down


def test_down_deletes_a_present_node(world, capfd):
  world.scenario(lives=[{'exit': 0}], existing=True)
  assert tpu.main(['down', *BASE]) == 0
  assert world.labels() == ['qr-describe', 'describe', 'delete']
  assert world.state()['node'] is None
  assert capfd.readouterr().err.splitlines()[-1] == (
      f'tpu.py down: deleted {NAME}')


def test_down_deletes_a_queued_resource_with_its_node(world, capfd):
  tpu.main(['create', *BASE, '--accelerator-type=v4-32', '--spot',
            '--queued'])
  assert world.state()['qr'] is not None
  assert tpu.main(['down', *BASE]) == 0
  assert world.labels() == ['qr-create', 'qr-describe', 'qr-delete']
  assert world.state()['qr'] is None and world.state()['node'] is None


def test_down_without_a_pod_is_one_line_and_success(world, capfd):
  assert tpu.main(['down', *BASE]) == 0
  assert world.labels() == ['qr-describe', 'describe']
  assert capfd.readouterr().err == (
      f'tpu.py down: {NAME} does not exist in {ZONE}; nothing to delete\n')


def test_down_dry_run_runs_nothing(world):
  commands, _ = dry_run(['down', *BASE])
  assert [label(argv) for argv in commands] == [
      'qr-describe', 'qr-delete', 'describe', 'delete']
  assert world.calls() == []


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize('change, needle', [
    ({'--accelerator-type=v4-32': '--accelerator-type=v9z-8'}, "'v9z-8'"),
    ({f'--name={NAME}': '--name=Simclr_V4'}, "'Simclr_V4'"),
    ({f'--workdir={WORKDIR}': None}, 'required: --workdir'),
    ({f'--workdir={WORKDIR}': '--workdir=/tmp/run'}, "'/tmp/run'"),
    ({'--spot': '--max-preemptions=-1'}, "'-1'"),
    ({'--spot': '--backoff=soon'}, "'soon'"),
])
def test_bad_input_is_one_line_before_any_gcloud_call(change, needle, world):
  argv = [change.get(a, a) for a in up_flags(world)]
  result = subprocess.run(
      [sys.executable, str(TPU_PY), *[a for a in argv if a is not None]],
      capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert result.stdout == ''
  assert result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith('tpu.py: error: ')
  assert needle in result.stderr
  assert world.calls() == []


def test_up_runs_as_a_script(world):
  # As the user runs it: imports from launch/ resolve, real exit status.
  result = subprocess.run([sys.executable, str(TPU_PY), *up_flags(world)],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert world.labels() == LIFE + CLEANUP
