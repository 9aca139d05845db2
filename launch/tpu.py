#!/usr/bin/env python3
"""One-command Cloud TPU VM pod launches for jaxssl.

  python launch/tpu.py up|down|create|setup|run|stop|logs|ssh|status|delete \
      --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run] ...

`up` is the whole run in one command: create, setup, run, follow worker 0's
log to the end, delete, and start over from create after a spot preemption
(launch/tpu_up.py); `down` deletes the pod if it exists. Every other
subcommand is a thin wrapper over `gcloud compute tpus ...`. `--dry-run`
prints the exact gcloud command lines, one per line, and runs nothing. Each
command is built as an argv list (no local shell) by launch/tpu_commands.py.
The command run on the workers is one string for their shell, so every user
value in it is quoted with `shlex.quote`. Standard library only: this runs on
a laptop without jax. The full recipe is in launch/README.md and
docs/scaling.md.
"""

import argparse
import shlex
import shutil
import subprocess
import sys
import time

import tpu_up
from tpu_commands import (DEFAULT_PYTHON, GCLOUD, check_name, create_commands,
                          delete_commands, logs_commands, run_commands,
                          setup_commands, ssh_commands, status_commands,
                          stop_commands)

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


def _count(value):
  """argparse type for --max-preemptions: a non-negative integer."""
  if value.isdigit():
    return int(value)
  raise argparse.ArgumentTypeError(f'{value!r} is not a non-negative integer')


def _seconds(value):
  """argparse type for --backoff: a non-negative number of seconds."""
  try:
    seconds = float(value)
  except ValueError:
    seconds = -1.0
  if 0 <= seconds < float('inf'):
    return seconds
  raise argparse.ArgumentTypeError(f'{value!r} is not a number of seconds '
                                   '>= 0')


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
      'queued-resources create), which waits for capacity; `up` waits until '
      'it is ACTIVE, after `create` poll `status --queued`')


def _add_setup_flags(parser):
  """--source and --python, for setup and up."""
  parser.add_argument(
      '--source', required=True,
      help='what to pip install: git+https://github.com/ORG/jaxssl[@REF], or '
      'a local .whl/.tar.gz that is first copied to every worker')
  parser.add_argument(
      '--python', default=DEFAULT_PYTHON,
      help=f'interpreter for the venv (>= 3.11; default {DEFAULT_PYTHON}, '
      'apt-installed when missing)')


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


def _add_up_flags(parser):
  """The flags of create, setup and run, and up's own."""
  _add_create_flags(parser)
  _add_setup_flags(parser)
  _add_run_flags(parser)
  parser.add_argument('--keep', action='store_true',
                      help='leave the pod running when the run ends')
  parser.add_argument(
      '--max-preemptions', type=_count, default=5,
      help='how many times to re-create the pod after a preemption and '
      'resume; one more preemption ends up with exit status '
      f'{tpu_up.EXIT_PREEMPTED} (default 5)')
  parser.add_argument(
      '--backoff', type=_seconds, default=60,
      help='seconds to wait before the first re-create; doubled each time, '
      f'at most {tpu_up.BACKOFF_MAX_S} (default 60)')


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage error is one line and exit status 1."""

  def error(self, message):
    sys.exit(_fail(message))


def build_parser():
  """The command line: one subcommand per entry of COMMANDS."""
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU node name')
  common.add_argument('--zone', required=True, help='e.g. us-central2-b')
  common.add_argument('--project', default='',
                      help='GCP project id (default: gcloud config)')
  common.add_argument('--dry-run', action='store_true',
                      help='print the gcloud commands, one per line; run none')
  parser = _Parser(
      prog='tpu.py', description=__doc__.split('\n', 1)[0],
      epilog='See docs/scaling.md for the complete recipe.')
  subparsers = parser.add_subparsers(dest='subcommand', required=True)
  sub = {name: subparsers.add_parser(name, parents=[common],
                                     help=fn.__doc__.split('\n')[0])
         for name, fn in {**tpu_up.JOBS, **COMMANDS}.items()}
  _add_up_flags(sub['up'])
  _add_create_flags(sub['create'])
  _add_setup_flags(sub['setup'])
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


def _fail(message, code=1):
  """Prints one error line on stderr; returns the exit status `code`."""
  print(f'tpu.py: error: {message}', file=sys.stderr)
  return code


def main(argv=None, sleep=time.sleep):
  """Parses `argv`, builds the gcloud commands, prints or runs them.

  Each `*_commands(args)` function (launch/tpu_commands.py) takes the
  parsed flags and returns the list of gcloud argv lists to run in order.

  Args:
    argv: command line without the program name; `sys.argv[1:]` if None.
    sleep: what `up` calls to wait (tests pass one that returns at once).

  Returns:
    The exit code: 0, 1 for bad input, the failing gcloud's exit code, or
    for `up` and `down` the statuses in launch/README.md.
  """
  args = build_parser().parse_args(argv)
  job, commands = None, []
  try:
    check_single_lines(args)
    check_name(args.name)
    if args.subcommand in tpu_up.JOBS:
      job = tpu_up.JOBS[args.subcommand](args, sleep)  # checks every flag
    else:
      commands = COMMANDS[args.subcommand](args)
  except ValueError as e:
    return _fail(str(e))
  if args.dry_run:
    lines = job.dry_run() if job else [shlex.join(a) for a in commands]
    print('\n'.join(lines))
    return 0
  if shutil.which(GCLOUD) is None:
    return _fail(f'{GCLOUD} not found on PATH; install the Google Cloud CLI '
                 '(https://cloud.google.com/sdk/docs/install)')
  return job.run() if job else _run_in_order(commands)


def _run_in_order(commands):
  """Runs gcloud commands, echoed to stderr, until the first failure."""
  for argv in commands:
    print(f'+ {shlex.join(argv)}', file=sys.stderr, flush=True)
    try:
      returncode = subprocess.run(argv, check=False).returncode
    except KeyboardInterrupt:
      return 130
    if returncode:
      return _fail(f'{shlex.join(argv[:5])} failed with exit code '
                   f'{returncode}', returncode)
  return 0


if __name__ == '__main__':
  sys.exit(main())
