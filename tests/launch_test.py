"""Tests for launch/: TPU pod dry-runs, shell quoting, and the SLURM template.

launch/tpu.py runs as a subprocess, as a user would run it. Expected command
lines are written out by hand from the gcloud reference. The remote shell
strings are also executed locally (bash and sh), in a temporary HOME with a
fake interpreter that records its argv, to prove that hostile values arrive
as single, uninterpreted arguments.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_PY = REPO / 'launch' / 'tpu.py'
SBATCH = REPO / 'launch' / 'slurm_gpu.sbatch'

NAME, ZONE, PROJECT = 'simclr-v4', 'us-central2-b', 'my-project'
WHERE = ['--zone=us-central2-b', '--project=my-project']
BASE = ['--name', NAME, '--zone', ZONE, '--project', PROJECT]
TPU_VM = ['gcloud', 'compute', 'tpus', 'tpu-vm']
QUEUED = ['gcloud', 'compute', 'tpus', 'queued-resources']
SSH_ALL = TPU_VM + ['ssh', NAME] + WHERE + ['--worker=all']
SHELLS = [s for s in ('bash', 'sh') if shutil.which(s)]

HOSTILE = [
    'two words',
    'x; touch {marker}',
    '$(touch {marker})',
    '`touch {marker}`',
    'it\'s "quoted" \\ too',
    'a && touch {marker} || touch {marker} | cat > {marker}',
    'glob * ? [a]',
    'tab\tand unicode \u2028 line separator',
    '$HOME ${PATH} ~',
]


def tpu(*args, env=None):
  """Runs launch/tpu.py; returns the CompletedProcess."""
  return subprocess.run([sys.executable, str(TPU_PY), *args], env=env,
                        capture_output=True, text=True, timeout=60)


def dry(*args):
  """The commands a --dry-run prints, each split back into its argv."""
  result = tpu(*args, '--dry-run')
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.rstrip('\n').split('\n')]


def remote(argv):
  """The --command=... string of a gcloud ssh argv."""
  assert argv[-1].startswith('--command='), argv
  return argv[-1][len('--command='):]


def write_script(path, text):
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / 'my configs' / 'simclr tpu.py'
  path.parent.mkdir()
  path.write_text('def get_config():\n  return None\n')
  return path


@pytest.fixture
def fake_home(tmp_path):
  """A HOME whose jaxssl-venv/bin/python appends its argv and env to a file."""
  home = tmp_path / 'home'
  (home / 'jaxssl-venv' / 'bin').mkdir(parents=True)
  record = tmp_path / 'record.jsonl'
  fake = write_script(tmp_path / 'fake_python', (
      f'#!{sys.executable}\n'
      'import json, os, sys\n'
      f'with open({str(record)!r}, "a") as f:\n'
      '  f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),\n'
      '      "TFDS_DATA_DIR": os.environ.get("TFDS_DATA_DIR")}) + "\\n")\n'))
  shutil.copy(fake, home / 'jaxssl-venv' / 'bin' / 'python')
  return home, record, fake


def read_records(record, count=1, timeout=10.0):
  """Waits for `count` records (the training process runs in background)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if record.exists():
      lines = record.read_text().splitlines()
      if len(lines) >= count:
        return [json.loads(line) for line in lines]
    time.sleep(0.05)
  raise AssertionError(f'no {count} record(s) in {record}')


def run_remote(shell, script, home, path_prefix=()):
  env = {'HOME': str(home), 'PATH': os.pathsep.join(
      [*map(str, path_prefix), '/usr/bin', '/bin'])}
  return subprocess.run([shutil.which(shell), '-c', script], cwd=home, env=env,
                        capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------- exact commands


def test_create_v4_32_spot():
  assert dry('create', *BASE, '--accelerator-type=v4-32', '--spot') == [
      TPU_VM + ['create', NAME] + WHERE + [
          '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base',
          '--spot']]


@pytest.mark.parametrize('accelerator_type, version', [
    ('v3-32', 'tpu-ubuntu2204-base'),
    ('v4-8', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-32', 'v2-alpha-tpuv5'),
    ('v6e-16', 'v2-alpha-tpuv6e'),
])
def test_create_default_runtime_version(accelerator_type, version):
  # The Cloud TPU "TPU software versions" table for JAX.
  (argv,) = dry('create', *BASE, f'--accelerator-type={accelerator_type}')
  assert argv[-2:] == [f'--accelerator-type={accelerator_type}',
                       f'--version={version}']


@pytest.mark.parametrize('flags, tail', [
    ([], ['--version=tpu-ubuntu2204-base']),
    (['--preemptible'], ['--version=tpu-ubuntu2204-base', '--preemptible']),
    (['--version=tpu-vm-base'], ['--version=tpu-vm-base']),
])
def test_create_on_demand_preemptible_and_explicit_version(flags, tail):
  assert dry('create', *BASE, '--accelerator-type=v4-32', *flags) == [
      TPU_VM + ['create', NAME] + WHERE + ['--accelerator-type=v4-32'] + tail]


def test_create_queued_spot():
  assert dry('create', *BASE, '--accelerator-type=v4-32', '--spot',
             '--queued') == [
      QUEUED + ['create', NAME, f'--node-id={NAME}'] + WHERE + [
          '--accelerator-type=v4-32',
          '--runtime-version=tpu-ubuntu2204-base', '--spot']]


def test_project_is_optional():
  (argv,) = dry('delete', '--name', NAME, '--zone', ZONE)
  assert argv == TPU_VM + ['delete', NAME, '--zone=us-central2-b']


@pytest.mark.parametrize('flags, expected', [
    ([], TPU_VM + ['delete', NAME] + WHERE),
    (['--quiet'], TPU_VM + ['delete', NAME] + WHERE + ['--quiet']),
    (['--queued', '--quiet'],
     QUEUED + ['delete', NAME] + WHERE + ['--force', '--quiet']),
])
def test_delete(flags, expected):
  assert dry('delete', *BASE, *flags) == [expected]


@pytest.mark.parametrize('flags, kind', [([], TPU_VM),
                                         (['--queued'], QUEUED)])
def test_status(flags, kind):
  assert dry('status', *BASE, *flags) == [kind + ['describe', NAME] + WHERE]


def test_setup_from_git():
  source = 'git+https://github.com/ORG/jaxssl@v0.1.0'
  (argv,) = dry('setup', *BASE, f'--source={source}')
  assert argv[:-1] == SSH_ALL
  assert 'jaxssl[tpu] @ git+https://github.com/ORG/jaxssl@v0.1.0' in (
      shlex.split(remote(argv)))


def test_setup_from_local_wheel(tmp_path):
  wheel = tmp_path / 'dist dir' / 'jaxssl-0.1.0-py3-none-any.whl'
  wheel.parent.mkdir()
  wheel.write_bytes(b'')
  scp, ssh = dry('setup', *BASE, f'--source={wheel}')
  assert scp == TPU_VM + ['scp', str(wheel), f'{NAME}:{wheel.name}'] + WHERE + [
      '--worker=all']
  assert ssh[:-1] == SSH_ALL
  assert './jaxssl-0.1.0-py3-none-any.whl[tpu]' in shlex.split(remote(ssh))


def test_run_v4_32(config_file):
  scp, ssh = dry('run', *BASE, f'--config={config_file}',
                 '--workdir=gs://bucket/simclr',
                 '--tfds-data-dir=gs://bucket/tensorflow_datasets',
                 '--override=global_batch_size=4096',
                 '--override=optim.base_lr=0.3')
  config = f'jaxssl_{NAME}_config.py'
  assert scp == TPU_VM + ['scp', str(config_file), f'{NAME}:{config}'] + (
      WHERE + ['--worker=all'])
  assert ssh[:-1] == SSH_ALL
  tokens = shlex.split(remote(ssh))
  start = tokens.index('nohup')
  assert tokens[start - 1] == 'TFDS_DATA_DIR=gs://bucket/tensorflow_datasets'
  # nohup sh -c WAITER sh TRAIN...: the waiter runs "$@" into the log.
  assert tokens[start + 1:start + 3] == ['sh', '-c']
  assert shlex.split(tokens[start + 3])[:4] == [
      '$@', '>', f'jaxssl_{NAME}.log', '2>&1']
  assert tokens[start + 4:start + 12] == [
      'sh', 'jaxssl-venv/bin/python', '-m', 'jaxssl.main', f'--config={config}',
      '--workdir=gs://bucket/simclr', '--config.global_batch_size=4096',
      '--config.optim.base_lr=0.3']
  assert tokens[start + 12:start + 14] == ['>', '/dev/null']


def test_run_keeps_config_argument(config_file):
  _, ssh = dry('run', *BASE, f'--config={config_file}:cifar10',
               '--workdir=gs://b/w')
  assert f'--config=jaxssl_{NAME}_config.py:cifar10' in shlex.split(
      remote(ssh))


@pytest.mark.parametrize('flags, worker, command', [
    ([], '0', f'tail -n 100 -F "$HOME"/jaxssl_{NAME}.log'),
    (['--worker=3', '--lines=0'], '3',
     f'tail -n 0 -F "$HOME"/jaxssl_{NAME}.log'),
])
def test_logs(flags, worker, command):
  assert dry('logs', *BASE, *flags) == [
      TPU_VM + ['ssh', NAME] + WHERE + [f'--worker={worker}',
                                        f'--command={command}']]


@pytest.mark.parametrize('flags, tail', [
    ([], ['--worker=0']),
    (['--worker=2'], ['--worker=2']),
    (['--worker=all', '--command=nproc; uptime'],
     ['--worker=all', '--command=nproc; uptime']),
])
def test_ssh(flags, tail):
  assert dry('ssh', *BASE, *flags) == [TPU_VM + ['ssh', NAME] + WHERE + tail]


def test_stop_targets_all_workers():
  (argv,) = dry('stop', *BASE)
  assert argv[:-1] == SSH_ALL


# ------------------------------------------------ quoting and remote scripts


@pytest.mark.parametrize('value', HOSTILE)
def test_printed_lines_round_trip_hostile_values(value, config_file, tmp_path):
  value = value.replace('{marker}', str(tmp_path / 'pwned'))
  project = f'my-project {value}'
  _, ssh = dry('run', '--name', NAME, '--zone', ZONE, '--project', project,
               f'--config={config_file}', '--workdir=gs://b/w',
               f'--override=loss.tag={value}')
  assert f'--project={project}' in ssh
  assert f'--config.loss.tag={value}' in shlex.split(remote(ssh))
  assert not (tmp_path / 'pwned').exists()


@pytest.mark.parametrize('shell', SHELLS)
@pytest.mark.parametrize('value', HOSTILE)
def test_run_script_passes_hostile_values_verbatim(shell, value, fake_home,
                                                   config_file, tmp_path):
  home, record, _ = fake_home
  marker = tmp_path / 'pwned'
  value = value.replace('{marker}', str(marker))
  workdir = f'gs://bucket/run {value}'
  tfds_dir = f'gs://bucket/tfds {value}'
  _, ssh = dry('run', *BASE, f'--config={config_file}:arg {value}',
               f'--workdir={workdir}', f'--tfds-data-dir={tfds_dir}',
               f'--override=loss.tag={value}', '--override=seed=7')
  result = run_remote(shell, remote(ssh), home)
  assert result.returncode == 0, result.stderr
  (call,) = read_records(record)
  assert call['argv'] == [
      '-m', 'jaxssl.main', f'--config=jaxssl_{NAME}_config.py:arg {value}',
      f'--workdir={workdir}', f'--config.loss.tag={value}', '--config.seed=7']
  assert call['TFDS_DATA_DIR'] == tfds_dir
  assert call['cwd'] == str(home)
  assert (home / f'jaxssl_{NAME}.pid').read_text().strip().isdigit()
  assert (home / f'jaxssl_{NAME}.log').exists()
  assert not marker.exists()


def test_run_script_without_tfds_data_dir_sets_nothing(fake_home, config_file):
  home, record, _ = fake_home
  _, ssh = dry('run', *BASE, f'--config={config_file}', '--workdir=gs://b/w')
  assert run_remote('sh', remote(ssh), home).returncode == 0
  (call,) = read_records(record)
  assert call['TFDS_DATA_DIR'] is None


def test_run_script_refuses_while_training_runs(fake_home, config_file):
  home, record, _ = fake_home
  # The pid of a live process (this test) stands for a running trainer.
  (home / f'jaxssl_{NAME}.pid').write_text(f'{os.getpid()}\n')
  _, ssh = dry('run', *BASE, f'--config={config_file}', '--workdir=gs://b/w')
  result = run_remote('sh', remote(ssh), home)
  assert result.returncode == 1
  assert 'already running' in result.stderr
  assert not record.exists()


def wait_for_text(path, timeout=10.0):
  """The contents of `path` once it is non-empty (written in background)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.exists() and path.read_text():
      return path.read_text()
    time.sleep(0.05)
  raise AssertionError(f'{path} stayed empty')


def fake_trainer(home, body):
  """Makes the venv's python a shell script: `body` plays jaxssl."""
  write_script(home / 'jaxssl-venv' / 'bin' / 'python', f'#!/bin/sh\n{body}')


@pytest.mark.parametrize('shell', SHELLS)
@pytest.mark.parametrize('status', [0, 3, 75])
def test_run_script_records_the_exit_status(shell, status, fake_home,
                                            config_file):
  home, _, _ = fake_home
  fake_trainer(home, f'echo "training $*"\nexit {status}\n')
  _, ssh = dry('run', *BASE, f'--config={config_file}', '--workdir=gs://b/w')
  assert run_remote(shell, remote(ssh), home).returncode == 0
  assert wait_for_text(home / f'jaxssl_{NAME}.exit') == f'{status}\n'
  assert (home / f'jaxssl_{NAME}.log').read_text() == (
      f'training -m jaxssl.main --config=jaxssl_{NAME}_config.py '
      '--workdir=gs://b/w\n')


def test_run_script_clears_the_previous_exit_status(fake_home, config_file):
  home, _, _ = fake_home
  (home / f'jaxssl_{NAME}.exit').write_text('1\n')  # a run before this one
  fake_trainer(home, 'exec sleep 60\n')
  _, ssh = dry('run', *BASE, f'--config={config_file}', '--workdir=gs://b/w')
  assert run_remote('sh', remote(ssh), home).returncode == 0
  pid = int((home / f'jaxssl_{NAME}.pid').read_text())
  try:
    assert not (home / f'jaxssl_{NAME}.exit').exists()
  finally:
    os.kill(pid, 9)
  assert wait_for_text(home / f'jaxssl_{NAME}.exit') == '137\n'  # 128 + 9


def test_stop_reaches_the_training_process_not_the_waiter(fake_home,
                                                         config_file):
  home, _, _ = fake_home
  fake_trainer(home, 'echo $$ > trainer.pid\nexec sleep 60\n')
  _, ssh = dry('run', *BASE, f'--config={config_file}', '--workdir=gs://b/w')
  assert run_remote('sh', remote(ssh), home).returncode == 0
  trainer_pid = wait_for_text(home / 'trainer.pid')
  assert (home / f'jaxssl_{NAME}.pid').read_text() == trainer_pid
  (stop,) = dry('stop', *BASE, '--grace=10')
  assert run_remote('sh', remote(stop), home).returncode == 0
  assert wait_for_text(home / f'jaxssl_{NAME}.exit') == '143\n'  # 128 + 15


def test_stop_script_kills_the_recorded_process(tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  sleeper = subprocess.Popen(['sleep', '60'])
  try:
    (home / f'jaxssl_{NAME}.pid').write_text(f'{sleeper.pid}\n')
    (argv,) = dry('stop', *BASE)
    assert run_remote('sh', remote(argv), home).returncode == 0
    assert sleeper.wait(timeout=10) == -15  # SIGTERM
    assert not (home / f'jaxssl_{NAME}.pid').exists()
  finally:
    if sleeper.poll() is None:
      sleeper.kill()


def test_stop_script_kills_a_process_that_outlives_the_grace(tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  ready = tmp_path / 'ready'
  stubborn = subprocess.Popen(
      [sys.executable, '-c', 'import signal, sys, time; '
       'signal.signal(signal.SIGTERM, signal.SIG_IGN); '
       'open(sys.argv[1], "w").close(); time.sleep(60)', str(ready)])
  try:
    while not ready.exists():  # the SIGTERM handler is in place
      time.sleep(0.05)
    (home / f'jaxssl_{NAME}.pid').write_text(f'{stubborn.pid}\n')
    (argv,) = dry('stop', *BASE, '--grace=2')
    assert run_remote('sh', remote(argv), home).returncode == 0
    assert stubborn.wait(timeout=10) == -9  # SIGKILL, after the SIGTERM
    assert not (home / f'jaxssl_{NAME}.pid').exists()
  finally:
    if stubborn.poll() is None:
      stubborn.kill()


def _fake_python311(tmp_path, fake_python, has_venv):
  """A bin dir with python3.11 (makes venvs from the fake) and a fake sudo."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  write_script(bin_dir / 'python3.11', (
      '#!/bin/sh\n'
      f'if [ "$1" = -c ]; then exit {0 if has_venv else 1}; fi\n'
      'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
      f'  mkdir -p "$3/bin" && cp {shlex.quote(str(fake_python))} '
      '"$3/bin/python"\n'
      'fi\n'))
  write_script(bin_dir / 'sudo', (
      '#!/bin/sh\n'
      f'echo "$*" >> {shlex.quote(str(tmp_path / "sudo.log"))}\n'))
  return bin_dir


@pytest.mark.parametrize('shell', SHELLS)
@pytest.mark.parametrize('value', HOSTILE)
def test_setup_script_passes_hostile_source_verbatim(shell, value, fake_home,
                                                     tmp_path):
  home, record, fake_python = fake_home
  shutil.rmtree(home / 'jaxssl-venv')  # setup must create it
  marker = tmp_path / 'pwned'
  value = value.replace('{marker}', str(marker))
  source = f'git+https://example.com/jaxssl@{value}'
  (ssh,) = dry('setup', *BASE, f'--source={source}')
  bin_dir = _fake_python311(tmp_path, fake_python, has_venv=True)
  result = run_remote(shell, remote(ssh), home, [bin_dir])
  assert result.returncode == 0, result.stderr
  upgrade_pip, install = read_records(record, count=2)
  assert upgrade_pip['argv'] == ['-m', 'pip', 'install', '-q', '--upgrade',
                                 'pip']
  assert install['argv'] == ['-m', 'pip', 'install', '--upgrade',
                             f'jaxssl[tpu] @ {source}']
  assert not (tmp_path / 'sudo.log').exists()  # python3.11 was there
  assert not marker.exists()


def test_setup_script_installs_missing_python_with_apt(fake_home, tmp_path):
  home, record, fake_python = fake_home
  (ssh,) = dry('setup', *BASE, '--source=git+https://example.com/jaxssl')
  bin_dir = _fake_python311(tmp_path, fake_python, has_venv=False)
  assert run_remote('bash', remote(ssh), home, [bin_dir]).returncode == 0
  update, install = (tmp_path / 'sudo.log').read_text().splitlines()
  assert update.split()[-2:] == ['update', '-q']
  assert install.split()[-5:] == ['install', '-y', '-q', 'python3.11',
                                  'python3.11-venv']
  assert len(read_records(record, count=2)) == 2


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize('name', [
    'My-TPU', 'two words', 'tpu;reboot', '$(id)', '`id`', '-tpu', 'tpu-',
    '1tpu', 'tpu_v4', 'a' * 64, "it's", ''])
def test_invalid_names_fail_with_one_line(name):
  for args in (['create', '--accelerator-type=v4-32'], ['delete'], ['logs']):
    result = tpu(*args, f'--name={name}', '--zone', ZONE, '--dry-run')
    assert result.returncode == 1
    assert result.stdout == ''
    assert result.stderr.count('\n') == 1, result.stderr
    assert repr(name) in result.stderr


@pytest.mark.parametrize('args, needle', [
    (['create', '--accelerator-type=v4-32', '--project=a\nb'], "'a\\nb'"),
    (['run', '--config=CONFIG', '--workdir=gs://b/w', '--override=k=a\rb'],
     "'k=a\\rb'"),
    (['create', '--accelerator-type=v4_32'], "'v4_32'"),
    (['create', '--accelerator-type=v9z-8'], "'v9z-8'"),
    (['create', '--accelerator-type=v4-32', '--queued', '--preemptible'],
     '--spot'),
    (['setup', '--source=jaxssl'], "'jaxssl'"),
    (['setup', '--source=/no/such/jaxssl-0.1.0-py3-none-any.whl'],
     'does not exist'),
    (['setup', '--source=git+https://x/y', '--python=python3; id'],
     "'python3; id'"),
    (['run', '--config=CONFIG', '--workdir=/tmp/run'], "'/tmp/run'"),
    (['run', '--config=CONFIG', '--workdir=gs://b/w', '--override=lr'],
     "'lr'"),
    (['run', '--config=CONFIG', '--workdir=gs://b/w', '--override=a b=1'],
     "'a b=1'"),
    (['run', '--config=CONFIG', '--workdir=gs://b/w', '--override=$(id)=1'],
     "'$(id)=1'"),
    (['run', '--config=/no/such/config.py', '--workdir=gs://b/w'],
     "'/no/such/config.py'"),
    (['run', '--config=config.yaml', '--workdir=gs://b/w'], "'config.yaml'"),
    (['ssh', '--worker=all'], '--command'),
    # argparse's own errors: one line too, not usage plus a line.
    (['run', '--config=CONFIG'], 'required: --workdir'),
    (['logs', '--lines=x'], "'x' is not a non-negative integer"),
    (['create', '--accelerator-type=v4-32', '--spot', '--preemptible'],
     'not allowed with argument --spot'),
])
def test_bad_values_fail_with_one_line(args, needle, config_file):
  args = [a.replace('CONFIG', str(config_file)) for a in args]
  result = tpu(args[0], *BASE, *args[1:], '--dry-run')
  assert result.returncode == 1
  assert result.stdout == ''
  assert result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith('tpu.py: error: ')
  assert needle in result.stderr


# ----------------------------------------------- dry-run vs. real execution


@pytest.fixture
def fake_gcloud(tmp_path):
  """PATH with a gcloud that records its argv (exit code from $FAKE_RC)."""
  bin_dir = tmp_path / 'gcloud-bin'
  bin_dir.mkdir()
  calls = tmp_path / 'gcloud-calls.jsonl'
  write_script(bin_dir / 'gcloud', (
      f'#!{sys.executable}\n'
      'import json, os, sys\n'
      f'with open({str(calls)!r}, "a") as f:\n'
      '  f.write(json.dumps(sys.argv[1:]) + "\\n")\n'
      'sys.exit(int(os.environ.get("FAKE_RC", "0")))\n'))
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  return env, calls


def _every_subcommand(config_file, tmp_path):
  wheel = tmp_path / 'jaxssl-0.1.0.tar.gz'
  wheel.write_bytes(b'')
  return [
      ['create', '--accelerator-type=v4-32', '--spot'],
      ['create', '--accelerator-type=v4-32', '--spot', '--queued'],
      ['setup', '--source=git+https://example.com/jaxssl'],
      ['setup', f'--source={wheel}'],
      ['run', f'--config={config_file}', '--workdir=gs://b/w $(id)',
       '--override=seed=1; id'],
      ['stop'], ['logs'], ['ssh'], ['status'], ['delete', '--quiet'],
  ]


def test_dry_run_executes_nothing(fake_gcloud, config_file, tmp_path):
  env, calls = fake_gcloud
  for args in _every_subcommand(config_file, tmp_path):
    result = tpu(*args, *BASE, '--dry-run', env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('gcloud ')
  assert not calls.exists()


def test_real_run_executes_exactly_the_dry_run_commands(fake_gcloud,
                                                        config_file, tmp_path):
  env, calls = fake_gcloud
  for args in _every_subcommand(config_file, tmp_path):
    expected = [argv[1:] for argv in dry(*args, *BASE)]
    if calls.exists():
      calls.unlink()
    result = tpu(*args, *BASE, env=env)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in calls.read_text().splitlines()] == (
        expected)


def test_failing_gcloud_stops_and_returns_its_exit_code(fake_gcloud,
                                                        config_file):
  env, calls = fake_gcloud
  result = tpu('run', *BASE, f'--config={config_file}', '--workdir=gs://b/w',
               env=dict(env, FAKE_RC='3'))
  assert result.returncode == 3
  assert len(calls.read_text().splitlines()) == 1  # scp ran, ssh did not
  assert 'exit code 3' in result.stderr.splitlines()[-1]


def test_missing_gcloud_is_reported(tmp_path):
  result = tpu('status', *BASE, env=dict(os.environ, PATH=str(tmp_path)))
  assert result.returncode == 1
  assert 'gcloud not found on PATH' in result.stderr


# ------------------------------------------------------------ SLURM template


def test_sbatch_parses():
  result = subprocess.run(['bash', '-n', str(SBATCH)], capture_output=True,
                          text=True, timeout=30)
  assert result.returncode == 0, result.stderr


def test_sbatch_runs_one_task_per_gpu():
  directives = dict(
      re.findall(r'^#SBATCH --([a-z-]+)(?:=(\S+))?', SBATCH.read_text(), re.M))
  # JAX's SLURM detection gives each process the GPU SLURM_LOCALID, and needs
  # every GPU of the node visible to every task.
  assert directives['ntasks-per-node'] == directives['gpus-per-node']
  assert 'gpus-per-task' not in directives and 'gpu-bind' not in directives


def _fake_srun(tmp_path):
  bin_dir = tmp_path / 'srun-bin'
  bin_dir.mkdir()
  record = tmp_path / 'srun.json'
  write_script(bin_dir / 'srun', (
      f'#!{sys.executable}\n'
      'import json, os, sys\n'
      f'with open({str(record)!r}, "w") as f:\n'
      '  json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)\n'))
  return bin_dir, record


@pytest.mark.parametrize('value', HOSTILE)
def test_sbatch_passes_values_to_srun_verbatim(value, tmp_path):
  bin_dir, record = _fake_srun(tmp_path)
  marker = tmp_path / 'pwned'
  value = value.replace('{marker}', str(marker))
  env = {'PATH': f'{bin_dir}{os.pathsep}/usr/bin:/bin', 'HOME': str(tmp_path),
         'CONFIG': f'configs/{value}.py', 'WORKDIR': f'/shared/{value}',
         'TFDS_DATA_DIR': f'/data/{value}'}
  result = subprocess.run(['bash', str(SBATCH), f'--config.loss.tag={value}'],
                          env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  call = json.loads(record.read_text())
  assert call['argv'] == [
      '--kill-on-bad-exit=1', 'python', '-m', 'jaxssl.main',
      f'--config=configs/{value}.py', f'--workdir=/shared/{value}',
      f'--config.loss.tag={value}']
  assert call['env']['TFDS_DATA_DIR'] == f'/data/{value}'
  assert call['env']['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9'
  assert not marker.exists()


@pytest.mark.parametrize('missing', ['CONFIG', 'WORKDIR'])
def test_sbatch_requires_config_and_workdir(missing, tmp_path):
  bin_dir, record = _fake_srun(tmp_path)
  env = {'PATH': f'{bin_dir}{os.pathsep}/usr/bin:/bin',
         'CONFIG': 'c.py', 'WORKDIR': '/shared/w'}
  del env[missing]
  result = subprocess.run(['bash', str(SBATCH)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode != 0
  assert missing in result.stderr
  assert not record.exists()


# ------------------------------------------------------------ documentation


def _documented_tpu_commands(path):
  """`python launch/tpu.py ...` commands in a markdown file, $TPU expanded."""
  text = path.read_text().replace('\\\n', ' ')
  tpu_flags = re.search(r'^TPU="([^"]*)"$', text, re.M).group(1)
  return [shlex.split(line.replace('$TPU', tpu_flags), comments=True)
          for line in text.splitlines()
          if line.startswith('python launch/tpu.py ')]


@pytest.mark.parametrize('doc', ['launch/README.md', 'docs/scaling.md'])
def test_documented_commands_dry_run(doc, tmp_path):
  # The docs run from a checkout holding the config and a freshly built wheel.
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'simclr_tpu.py').write_text('')
  (tmp_path / 'dist').mkdir()
  (tmp_path / 'dist' / 'jaxssl-0.1.0-py3-none-any.whl').write_bytes(b'')
  commands = _documented_tpu_commands(REPO / doc)
  assert {argv[2] for argv in commands} >= {'up', 'create', 'setup', 'run',
                                            'delete'}
  for argv in commands:
    result = subprocess.run([sys.executable, str(TPU_PY), *argv[2:],
                             '--dry-run'], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, (argv, result.stderr)


def test_documented_create_output_is_current():
  text = (REPO / 'docs' / 'scaling.md').read_text()
  documented = re.search(r'^gcloud compute tpus tpu-vm create .*$', text,
                         re.M).group(0)
  (printed,) = dry('create', '--name=simclr-v4', '--zone=us-central2-b',
                   '--project=my-ssl-project', '--accelerator-type=v4-32',
                   '--spot')
  assert shlex.split(documented) == printed
