#!/usr/bin/env python3
"""One-command Cloud TPU VM pod launches for jaxssl.

  python launch/tpu.py create|setup|run|stop|logs|ssh|status|delete \
      --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run] ...

Every subcommand is a thin wrapper over `gcloud compute tpus ...`; `--dry-run`
prints the exact gcloud command lines, one per line, and runs nothing. Each
command is built as an argv list (no local shell). The command run on the
workers is one string for their shell, so every user value in it is quoted
with `shlex.quote`. Standard library only: this runs on a laptop without jax.

Files in each worker's home directory: `jaxssl-venv/` (made by `setup`; JAX
needs Python >= 3.11, newer than Ubuntu 22.04's 3.10), and, per node NAME,
`jaxssl_NAME_config.py` (copied by `run`), `jaxssl_NAME.log` and `.pid`.
The full recipe is in launch/README.md and docs/scaling.md.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

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


def run_script(args, remote_config):
  """The worker shell script that starts training in the background.

  Args:
    args: parsed `run` flags (workdir, tfds_data_dir, override).
    remote_config: the `--config` value on the workers (file[:arg]).

  Returns:
    One shell command string; every user value in it is shlex-quoted. It
    refuses to start while the previous run's process is alive.
  """
  if not args.workdir.startswith('gs://'):
    raise ValueError(
        f'invalid --workdir {args.workdir!r}: use a gs:// path; the hosts of a '
        'pod share no filesystem and a TPU VM disk vanishes with the VM')
  stem = _file_stem(args)
  train = [f'{VENV}/bin/python', '-m', 'jaxssl.main',
           f'--config={remote_config}', f'--workdir={args.workdir}']
  train += [_override_flag(o) for o in args.override]
  env = []
  if args.tfds_data_dir:
    env.append(f'TFDS_DATA_DIR={shlex.quote(args.tfds_data_dir)}')
  pid_file = shlex.quote(stem + '.pid')
  # A TPU takes one process at a time: refusing beats a crash on startup.
  guard = (f'if test -f {pid_file} && kill -0 "$(cat {pid_file})" 2>/dev/null;'
           f' then echo "jaxssl is already running; use stop" >&2; exit 1; fi;')
  # stdin/stdout/stderr all redirected, so ssh returns at once; $! is the
  # training process (nohup execs it), recorded for `stop`.
  return ' '.join([
      'cd "$HOME";', guard, *env, 'nohup', shlex.join(train),
      f'> {shlex.quote(stem + ".log")} 2>&1 < /dev/null &',
      f'echo $! > {pid_file}'])


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
  if args.queued:
    argv = [*TPUS, 'queued-resources', 'delete', args.name, *_where(args),
            '--force']
  else:
    argv = [*TPUS, 'tpu-vm', 'delete', args.name, *_where(args)]
  if args.quiet:
    argv.append('--quiet')
  return [argv]


COMMANDS = {
    'create': create_commands,
    'setup': setup_commands,
    'run': run_commands,
    'stop': stop_commands,
    'logs': logs_commands,
    'ssh': ssh_commands,
    'status': status_commands,
    'delete': delete_commands,
}


def _lines(value):
  """argparse type for --lines: a non-negative integer."""
  if value.isdigit():
    return int(value)
  raise argparse.ArgumentTypeError(f'{value!r} is not a non-negative integer')


def _worker(value):
  """argparse type for --worker: `all` or a worker index."""
  if value == 'all' or value.isdigit():
    return value
  raise argparse.ArgumentTypeError(f'{value!r} is not "all" or an integer')


def _add_create_flags(parser):
  parser.add_argument('--accelerator-type', required=True,
                      help='slice type, e.g. v4-32, v3-32, v5litepod-16')
  parser.add_argument(
      '--version', default=None,
      help='TPU VM runtime (software) version; default from the accelerator '
      'type: tpu-ubuntu2204-base for v2, v3 and v4; v2-alpha-tpuv5-lite for '
      'v5e (v5litepod-*); v2-alpha-tpuv5 for v5p; v2-alpha-tpuv6e for v6e')
  pricing = parser.add_mutually_exclusive_group()
  pricing.add_argument('--spot', action='store_true',
                       help='spot capacity: cheaper, can be preempted any time')
  pricing.add_argument('--preemptible', action='store_true',
                       help='preemptible capacity (legacy; prefer --spot)')
  parser.add_argument(
      '--queued', action='store_true',
      help='request through a queued resource (gcloud compute tpus '
      'queued-resources create), which waits for capacity; follow it with '
      '`status --queued` until it is ACTIVE')


def _add_run_flags(parser):
  parser.add_argument(
      '--config', required=True,
      help='local config file (optionally FILE.py:ARG); it is copied to every '
      'worker, so it must not import other local files')
  parser.add_argument('--workdir', required=True,
                      help='gs:// directory for checkpoints and metrics; '
                      're-running with the same workdir resumes')
  parser.add_argument('--tfds-data-dir', default='',
                      help='TFDS_DATA_DIR on the workers, e.g. '
                      'gs://BUCKET/tensorflow_datasets')
  parser.add_argument('--override', action='append', default=[],
                      metavar='KEY=VALUE',
                      help='config override, passed as --config.KEY=VALUE; '
                      'repeatable')


def build_parser():
  """The command line: one subcommand per entry of COMMANDS."""
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU node name')
  common.add_argument('--zone', required=True, help='e.g. us-central2-b')
  common.add_argument('--project', default='',
                      help='GCP project id (default: gcloud config)')
  common.add_argument('--dry-run', action='store_true',
                      help='print the gcloud commands, one per line; run none')
  parser = argparse.ArgumentParser(
      prog='tpu.py', description=__doc__.split('\n', 1)[0],
      epilog='See docs/scaling.md for the complete recipe.')
  subparsers = parser.add_subparsers(dest='subcommand', required=True)
  sub = {name: subparsers.add_parser(name, parents=[common],
                                     help=fn.__doc__.split('\n')[0])
         for name, fn in COMMANDS.items()}
  _add_create_flags(sub['create'])
  sub['setup'].add_argument(
      '--source', required=True,
      help='what to pip install: git+https://github.com/ORG/jaxssl[@REF], or '
      'a local .whl/.tar.gz that is first copied to every worker')
  sub['setup'].add_argument(
      '--python', default=DEFAULT_PYTHON,
      help=f'interpreter for the venv (>= 3.11; default {DEFAULT_PYTHON}, '
      'apt-installed when missing)')
  _add_run_flags(sub['run'])
  sub['logs'].add_argument('--worker', type=_worker, default='0')
  sub['logs'].add_argument('--lines', type=_lines, default=100,
                           help='lines of history to print before following')
  sub['ssh'].add_argument('--worker', type=_worker, default='0',
                          help='worker index, or all (only with --command)')
  sub['ssh'].add_argument('--command', dest='remote_command', default=None,
                          help='run this shell command instead of a login '
                          'shell (passed to the workers as is)')
  sub['stop'].add_argument(
      '--grace', type=int, default=120,
      help='seconds to wait after SIGTERM (the run saves a checkpoint) '
      'before SIGKILL')
  sub['status'].add_argument('--queued', action='store_true')
  sub['delete'].add_argument('--queued', action='store_true',
                             help='delete the queued resource and its node')
  sub['delete'].add_argument('--quiet', action='store_true',
                             help='do not ask for confirmation')
  return parser


def check_single_lines(args):
  """Rejects line breaks, so that each printed command is exactly one line."""
  for value in vars(args).values():
    for item in value if isinstance(value, list) else [value]:
      if isinstance(item, str) and ('\n' in item or '\r' in item):
        raise ValueError(f'argument {item!r} contains a line break; '
                         'every value must be a single line')


def _fail(message, code=2):
  print(f'tpu.py: error: {message}', file=sys.stderr)
  return code


def main(argv=None):
  """Parses `argv`, builds the gcloud commands, prints or runs them.

  Each `*_commands(args)` function above takes the parsed flags and returns
  the list of gcloud argv lists to run in order.

  Args:
    argv: command line without the program name; `sys.argv[1:]` if None.

  Returns:
    The exit code: 0, 2 for bad input, or the failing gcloud's exit code.
  """
  args = build_parser().parse_args(argv)
  try:
    check_single_lines(args)
    check_name(args.name)
    commands = COMMANDS[args.subcommand](args)
  except ValueError as e:
    return _fail(str(e))
  if args.dry_run:
    for argv_ in commands:
      print(shlex.join(argv_))
    return 0
  if shutil.which(GCLOUD) is None:
    return _fail(f'{GCLOUD} not found on PATH; install the Google Cloud CLI '
                 '(https://cloud.google.com/sdk/docs/install)')
  for argv_ in commands:
    print(f'+ {shlex.join(argv_)}', file=sys.stderr, flush=True)
    try:
      returncode = subprocess.run(argv_, check=False).returncode
    except KeyboardInterrupt:
      return 130
    if returncode:
      return _fail(f'{shlex.join(argv_[:5])} failed with exit code '
                   f'{returncode}', returncode)
  return 0


if __name__ == '__main__':
  sys.exit(main())
