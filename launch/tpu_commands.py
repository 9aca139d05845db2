"""The gcloud command lines behind launch/tpu.py, built and checked.

Each `*_commands(args)` function takes the parsed flags of one subcommand and
returns the list of gcloud argv lists to run in order; a bad value raises a
one-line ValueError naming it. Nothing here runs anything. Standard library
only: this runs on a laptop without jax.

Files in each worker's home directory: `jaxssl-venv/` (made by `setup`; JAX
needs Python >= 3.11, newer than Ubuntu 22.04's 3.10), and, per node NAME,
`jaxssl_NAME_config.py` (copied by `run`), `jaxssl_NAME.log` (the training
output), `.pid` (the training process), `.waiter.pid` and `.exit` (its exit
status, written when it ends).
"""

import os
import re
import shlex

GCLOUD = 'gcloud'
TPUS = [GCLOUD, 'compute', 'tpus']
VENV = 'jaxssl-venv'
DEFAULT_PYTHON = 'python3.11'

# GCP resource ids (RFC 1035): a lowercase letter, then up to 62 lowercase
# letters, digits or hyphens, not ending with a hyphen.
_NAME_RE = re.compile(r'[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?')
_ACCELERATOR_RE = re.compile(r'(v[0-9]+[a-z]*)-([0-9]+)')
_PYTHON_RE = re.compile(r'python3\.[0-9]+')
_OVERRIDE_KEY_RE = re.compile(r'[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*', re.ASCII)
_DIST_FILE_RE = re.compile(r'[A-Za-z0-9_.+-]+\.(?:whl|tar\.gz)')
_CONFIG_RE = re.compile(r'(.+?\.py)(?::(.*))?')

# Runtime (software) versions for JAX, from the Cloud TPU "TPU software
# versions" page: the base images, on which pip installs jax[tpu] and libtpu.
RUNTIME_VERSIONS = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',
}


def check_name(name):
  """Raises a one-line ValueError unless `name` is a valid TPU node name."""
  if not _NAME_RE.fullmatch(name):
    raise ValueError(
        f'invalid TPU name {name!r}: use 1-63 lowercase letters, digits and '
        'hyphens, starting with a letter and not ending with a hyphen')


def default_runtime_version(accelerator_type):
  """The TPU VM runtime version to install JAX on.

  Args:
    accelerator_type: a slice type such as `v4-32` or `v5litepod-16`.

  Returns:
    The runtime version from RUNTIME_VERSIONS for its generation.
  """
  match = _ACCELERATOR_RE.fullmatch(accelerator_type)
  if not match:
    raise ValueError(
        f'invalid --accelerator-type {accelerator_type!r}: expected '
        'GENERATION-SIZE, e.g. v4-32, v3-32, v5litepod-16')
  generation = match.group(1)
  if generation not in RUNTIME_VERSIONS:
    raise ValueError(
        f'no default --version for accelerator type {accelerator_type!r}; '
        f'known generations: {", ".join(RUNTIME_VERSIONS)}; pass --version')
  return RUNTIME_VERSIONS[generation]


def _where(args):
  """The --zone/--project flags every gcloud command gets."""
  flags = [f'--zone={args.zone}']
  if args.project:
    flags.append(f'--project={args.project}')
  return flags


def _ssh(args, worker, remote_command):
  """`gcloud ... ssh` running `remote_command` (a shell string) on workers."""
  argv = [*TPUS, 'tpu-vm', 'ssh', args.name, *_where(args),
          f'--worker={worker}']
  if remote_command is not None:
    argv.append(f'--command={remote_command}')
  return argv


def _scp_to_all(args, local_path, remote_path):
  """`gcloud ... scp` copying one local file to every worker."""
  return [*TPUS, 'tpu-vm', 'scp', local_path,
          f'{args.name}:{remote_path}', *_where(args), '--worker=all']


def _file_stem(args):
  """Prefix of the per-node files in the workers' home directories."""
  return f'jaxssl_{args.name}'


def create_commands(args):
  """Creates the TPU VM (on-demand, spot or preemptible) or queues it."""
  version = args.version or default_runtime_version(args.accelerator_type)
  if args.queued:
    if args.preemptible:
      raise ValueError('--preemptible is not offered for queued resources; '
                       'use --spot with --queued')
    # The queued resource and the node it provisions share the name, so every
    # other subcommand (ssh, scp, delete) addresses the node by --name.
    argv = [*TPUS, 'queued-resources', 'create', args.name,
            f'--node-id={args.name}', *_where(args),
            f'--accelerator-type={args.accelerator_type}',
            f'--runtime-version={version}']
  else:
    argv = [*TPUS, 'tpu-vm', 'create', args.name, *_where(args),
            f'--accelerator-type={args.accelerator_type}',
            f'--version={version}']
  if args.spot:
    argv.append('--spot')
  if args.preemptible:
    argv.append('--preemptible')
  return [argv]


def _install_requirement(source):
  """(local file to copy or None, pip requirement string) for `--source`."""
  if source.startswith(('git+', 'https://', 'http://')):
    return None, f'jaxssl[tpu] @ {source}'
  base = os.path.basename(source)
  if not _DIST_FILE_RE.fullmatch(base):
    raise ValueError(
        f'invalid --source {source!r}: expected git+URL[@REF] or a local '
        '.whl/.tar.gz file (build one with: pip wheel --no-deps -w dist .)')
  if not os.path.isfile(source):
    raise ValueError(f'--source file {source!r} does not exist')
  return source, f'./{base}[tpu]'


def setup_script(python, requirement):
  """The worker shell script that installs jaxssl into `~/jaxssl-venv`.

  Args:
    python: interpreter name, `python3.N`; apt installs it (and its venv
      module) when missing.
    requirement: the pip requirement, quoted here for the remote shell.

  Returns:
    One shell command string, the same for every worker.
  """
  if not _PYTHON_RE.fullmatch(python):
    raise ValueError(f'invalid --python {python!r}: expected e.g. python3.11')
  apt = 'sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600'
  pip = f'{VENV}/bin/python -m pip'
  return '; '.join([
      'set -e',
      'cd "$HOME"',
      # Install the interpreter only when it (or its venv module) is missing.
      f"{python} -c 'import ensurepip, venv' 2>/dev/null || "
      f'{{ {apt} update -q && {apt} install -y -q {python} {python}-venv; }}',
      f'{python} -m venv {VENV}',
      f'{pip} install -q --upgrade pip',
      f'{pip} install --upgrade {shlex.quote(requirement)}',
  ])


def setup_commands(args):
  """Installs jaxssl[tpu] into a fresh virtualenv on every worker."""
  local_file, requirement = _install_requirement(args.source)
  script = setup_script(args.python, requirement)
  commands = []
  if local_file is not None:
    commands.append(_scp_to_all(args, local_file, os.path.basename(local_file)))
  commands.append(_ssh(args, 'all', script))
  return commands


def _override_flag(override):
  """`key=value` -> `--config.key=value`, checking the key."""
  key, sep, value = override.partition('=')
  if not sep or not _OVERRIDE_KEY_RE.fullmatch(key):
    raise ValueError(
        f'invalid --override {override!r}: expected KEY=VALUE with a dotted '
        'config key, e.g. global_batch_size=4096 or optim.base_lr=0.3')
  return f'--config.{key}={value}'


def _files(args):
  """The per-node files in a worker's home directory, quoted for its shell.

  `log` is the training output; `pid` the training process (for `stop`);
  `waiter` the pid of the small shell that waits for it and then writes its
  exit status to `exit`.
  """
  stem = _file_stem(args)
  names = {'log': '.log', 'pid': '.pid', 'waiter': '.waiter.pid',
           'exit': '.exit'}
  return {key: shlex.quote(stem + suffix) for key, suffix in names.items()}


def run_script(args, remote_config):
  """The worker shell script that starts training in the background.

  Args:
    args: parsed `run` flags (workdir, tfds_data_dir, override).
    remote_config: the `--config` value on the workers (file[:arg]).

  Returns:
    One shell command string; every user value in it is shlex-quoted. It
    refuses to start while the previous run's process is alive, and returns
    once the new process has started and its pid is recorded.
  """
  if not args.workdir.startswith('gs://'):
    raise ValueError(
        f'invalid --workdir {args.workdir!r}: use a gs:// path; the hosts of a '
        'pod share no filesystem and a TPU VM disk vanishes with the VM')
  f = _files(args)
  train = [f'{VENV}/bin/python', '-m', 'jaxssl.main',
           f'--config={remote_config}', f'--workdir={args.workdir}']
  train += [_override_flag(o) for o in args.override]
  env = []
  if args.tfds_data_dir:
    env.append(f'TFDS_DATA_DIR={shlex.quote(args.tfds_data_dir)}')
  # A TPU takes one process at a time: refusing beats a crash on startup.
  guard = (f'if test -f {f["pid"]} && kill -0 "$(cat {f["pid"]})" 2>/dev/null;'
           f' then echo "jaxssl is already running; use stop" >&2; exit 1; fi;')
  # The waiter runs the training command (its "$@") in the background,
  # records that process's pid for `stop` (a signal must reach jaxssl, not
  # the shell), waits, and writes the exit status (128+N when killed by
  # signal N): that file is how `up` learns that the run ended, and how.
  waiter = (f'"$@" > {f["log"]} 2>&1 < /dev/null & echo $! > {f["pid"]}; '
            f'wait $!; echo $? > {f["exit"]}')
  # All of nohup's streams redirected, so ssh returns at once.
  return ' '.join([
      'cd "$HOME";', guard, f'rm -f {f["pid"]} {f["exit"]};', *env, 'nohup',
      'sh', '-c', shlex.quote(waiter), 'sh', shlex.join(train),
      f'> /dev/null 2>&1 < /dev/null & echo $! > {f["waiter"]};',
      # Wait (at most 10 s) for the pid, so `stop` right after `run` works.
      f'i=0; while ! test -s {f["pid"]} && [ "$i" -lt 100 ]; do sleep 0.1;',
      'i=$((i + 1)); done;', f'test -s {f["pid"]} ||',
      f'{{ echo "jaxssl did not start; see" ~/{f["log"]} >&2; exit 1; }}'])


def run_commands(args):
  """Copies the config to every worker, then starts training on all of them."""
  match = _CONFIG_RE.fullmatch(args.config)
  if not match:
    raise ValueError(f'invalid --config {args.config!r}: expected a .py file, '
                     'optionally followed by :ARG')
  local_config, config_arg = match.group(1), match.group(2)
  if not os.path.isfile(local_config):
    raise ValueError(f'--config file {local_config!r} does not exist')
  remote_config = f'{_file_stem(args)}_config.py'
  remote_flag = remote_config if config_arg is None else (
      f'{remote_config}:{config_arg}')
  return [_scp_to_all(args, local_config, remote_config),
          _ssh(args, 'all', run_script(args, remote_flag))]


def stop_commands(args):
  """Stops the training process started by `run` on every worker.

  SIGTERM first: every process finishes its step, saves a checkpoint and
  exits (docs/failures.md); a process still alive after --grace seconds is
  killed with SIGKILL (it then resumes from the checkpoint before).
  """
  pid_file = shlex.quote(_file_stem(args) + '.pid')
  script = (f'cd "$HOME"; if test -f {pid_file}; then p="$(cat {pid_file})"; '
            'kill -TERM "$p" 2>/dev/null; i=0; '
            # A zombie (exited, not yet reaped) counts as stopped.
            'while kill -0 "$p" 2>/dev/null && [ "$(ps -o stat= -p "$p" | '
            f'cut -c1)" != Z ] && [ "$i" -lt {args.grace} ]; '
            'do sleep 1; i=$((i + 1)); done; '
            f'kill -KILL "$p" 2>/dev/null; fi; rm -f {pid_file}')
  return [_ssh(args, 'all', script)]


def logs_commands(args):
  """Streams a worker's training log (worker 0 prints the progress)."""
  log_file = shlex.quote(_file_stem(args) + '.log')
  return [_ssh(args, args.worker,
               f'tail -n {args.lines} -F "$HOME"/{log_file}')]


def follow_command(args, lines='+1'):
  """Streams worker 0's log until the run ends (its exit status is written).

  Args:
    args: parsed flags (name, zone, project).
    lines: tail's -n: `+1` from the start, or a count of last lines.

  Returns:
    The gcloud ssh argv. GNU tail's --pid ends the stream once the waiter
    (see run_script) has exited, checking every second, after printing
    everything written before. ssh's keepalive ends it within about two
    minutes when the worker vanishes (preempted), instead of TCP's hours.
  """
  f = _files(args)
  argv = _ssh(args, '0', f'cd "$HOME"; exec tail -n {lines} -s 1 -F '
              f'--pid="$(cat {f["waiter"]})" {f["log"]}')
  return argv[:-1] + ['--ssh-flag=-oServerAliveInterval=30',
                      '--ssh-flag=-oServerAliveCountMax=4', argv[-1]]


def probe_command(args):
  """Asks worker 0 how the run stands.

  Returns:
    The gcloud ssh argv; the remote script prints one line: `exit N` (the
    run ended with status N), `running`, or `gone` (no process and no exit
    status: the VM restarted, or the run never started).
  """
  f = _files(args)
  done = f'echo "exit $(cat {f["exit"]})"'
  # The exit file is read again after the liveness check: the waiter writes
  # it just before it exits.
  return _ssh(args, '0', (
      f'cd "$HOME"; if test -s {f["exit"]}; then {done}; elif kill -0 '
      f'"$(cat {f["waiter"]} 2>/dev/null)" 2>/dev/null; then echo running; '
      f'elif test -s {f["exit"]}; then {done}; else echo gone; fi'))


def describe_command(args, queued):
  """Prints only the state: of the node, or of its queued resource."""
  if queued:
    return [*TPUS, 'queued-resources', 'describe', args.name, *_where(args),
            '--format=value(state.state)']
  return [*TPUS, 'tpu-vm', 'describe', args.name, *_where(args),
          '--format=value(state)']


def delete_command(args, queued, quiet):
  """Deletes the node, or the queued resource together with its node."""
  if queued:
    argv = [*TPUS, 'queued-resources', 'delete', args.name, *_where(args),
            '--force']
  else:
    argv = [*TPUS, 'tpu-vm', 'delete', args.name, *_where(args)]
  return argv + ['--quiet'] if quiet else argv


def ssh_commands(args):
  """Opens a shell on a worker, or runs the user's own --command there."""
  if args.worker == 'all' and args.remote_command is None:
    raise ValueError('--worker=all needs --command; an interactive shell '
                     'opens on one worker')
  return [_ssh(args, args.worker, args.remote_command)]


def status_commands(args):
  """Describes the node (or the queued resource and its state)."""
  kind = 'queued-resources' if args.queued else 'tpu-vm'
  return [[*TPUS, kind, 'describe', args.name, *_where(args)]]


def delete_commands(args):
  """Deletes the TPU VM, or the queued resource together with its node."""
  return [delete_command(args, args.queued, args.quiet)]
