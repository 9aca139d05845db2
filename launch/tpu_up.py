"""`up` and `down`: a whole TPU pod run, through spot preemptions.

`up` creates the pod, installs jaxssl (setup), starts the run on every
worker, follows worker 0's log until the run ends, reads the run's exit
status, and deletes the pod (unless --keep). When the pod is preempted on
the way (describe finds no node, or one in a state of LOST_STATES), it
deletes what is left, waits (exponential backoff), and starts over from
create with the same --workdir, where jaxssl resumes from its newest
checkpoint; at most --max-preemptions times.

`down` deletes the pod, or the queued resource that holds it.

The commands come from launch/tpu_commands.py; `sleep` is injected so that
tests run the whole state machine without waiting. Standard library only.
"""

import re
import shlex
import subprocess
import sys
import time

import tpu_commands as tc

# up's exit statuses besides the run's own (0, 1, 69, 75, 128+N).
EXIT_GCLOUD = 2  # a gcloud step failed, and the pod was not preempted
EXIT_PREEMPTED = 3  # preempted more often than --max-preemptions allows
EXIT_INTERRUPTED = 130  # Ctrl-C

LOST_STATES = ('PREEMPTED', 'TERMINATED', 'DELETING')
QUEUE_FAILED_STATES = ('FAILED', 'SUSPENDING', 'SUSPENDED')
# jaxssl's statuses for SIGTERM (75) and a lost peer (69), and kills (>128):
# what a preemption does to a run while the node may still read READY.
RESUMABLE_STATUSES = (69, 75)
PREEMPTION_CHECKS = 4  # describes, PREEMPTION_CHECK_S apart, before
PREEMPTION_CHECK_S = 30  # such a status counts as the run's own
QUEUED_POLL_S = 30
BACKOFF_MAX_S = 1800
RECONNECTS = 5  # times the log stream may drop in a row on a healthy pod
RECONNECT_S = 10
_PROBE_RE = re.compile(r'exit ([0-9]+)|running|gone')


class GcloudError(Exception):
  """A gcloud command failed for a reason other than a missing resource."""


def _call(argv, capture=False):
  """Runs one gcloud command.

  Args:
    argv: the command.
    capture: keep stdout and stderr (describe, probe) instead of letting
      them through to the user.

  Returns:
    (exit status, stdout, stderr); the streams are '' unless captured.
  """
  pipe = subprocess.PIPE if capture else None
  result = subprocess.run(argv, check=False, text=True, stdout=pipe,
                          stderr=pipe)
  return result.returncode, result.stdout or '', result.stderr or ''


def _last_line(text):
  """The last line of a command's output, for one-line messages."""
  lines = text.strip().splitlines()
  return lines[-1] if lines else '(no output)'


def _state(argv):
  """Runs a describe command; returns the state, or None if there is none.

  Raises:
    GcloudError: describe failed otherwise (credentials, network).
  """
  code, out, err = _call(argv, capture=True)
  if code == 0:
    return out.strip() or 'UNKNOWN'
  if 'NOT_FOUND' in err or 'was not found' in err:
    return None
  raise GcloudError(f'{shlex.join(argv[:5])} failed with exit code {code}: '
                    f'{_last_line(err)}')


def _down_command(args):
  """The `tpu.py down` line that deletes this pod, for messages."""
  flags = [f'--name={args.name}', f'--zone={args.zone}']
  if args.project:
    flags.append(f'--project={args.project}')
  return shlex.join(['python', 'launch/tpu.py', 'down', *flags])


class Up:
  """Creates the pod, runs to the end and deletes it; resumes on preemption.

  The state machine of one `tpu.py up`, from create to delete.

  Args:
    args: the parsed `up` flags.
    sleep: called with a number of seconds for every wait.

  Raises:
    ValueError: a bad flag value, before anything runs.
  """

  def __init__(self, args, sleep=time.sleep):
    self.args, self.sleep = args, sleep
    self.plan = {
        'create': tc.create_commands(args),
        'setup': tc.setup_commands(args),
        'run': tc.run_commands(args),
        'follow': tc.follow_command(args),
        'probe': tc.probe_command(args),
        'describe': tc.describe_command(args, queued=False),
        # What delete deletes: the queued resource, when there is one.
        'owner': tc.describe_command(args, args.queued),
        'delete': tc.delete_command(args, args.queued, quiet=True),
    }
    self.created = False  # never delete a pod that this up did not create
    self.recovering = False

  def dry_run(self):
    """The commands of a run without preemption, then comment lines."""
    plan, args = self.plan, self.args
    commands = [*plan['create'], *([plan['owner']] if args.queued else []),
                *plan['setup'], *plan['run'], plan['follow'], plan['probe']]
    if not args.keep:
      commands += [plan['owner'], plan['delete']]
    lines = [shlex.join(argv) for argv in commands]
    if args.keep:
      lines.append(f'# --keep: the pod stays; delete it with: '
                   f'{_down_command(args)}')
    return lines + [
        '# A failed step, a dropped log stream, or exit status 69, 75 or '
        'above 128 is checked with:',
        f'#   {shlex.join(plan["describe"])}',
        f'# No pod, or {", ".join(LOST_STATES)}: up deletes it, waits '
        f'{args.backoff:g} s (doubling, at most {BACKOFF_MAX_S} s) and '
        'starts again from create, same --workdir; at most '
        f'{args.max_preemptions} times.']

  def say(self, message):
    """One status line on stderr."""
    print(f'tpu.py up: {message}', file=sys.stderr, flush=True)

  def run(self):
    """Runs the pod's whole life. Returns up's exit status."""
    recoveries, args = 0, self.args
    try:
      while True:
        kind, detail = self.attempt()
        if kind != 'lost':
          break
        self.say(detail)
        if recoveries == args.max_preemptions:
          kind = 'exhausted'
          break
        recoveries += 1
        delay = min(args.backoff * 2 ** (recoveries - 1), BACKOFF_MAX_S)
        self.say(f'recovery {recoveries} of {args.max_preemptions}: delete, '
                 f'wait {delay:g} s, create again; the run resumes from the '
                 f'newest checkpoint in {args.workdir}')
        self.delete()
        self.sleep(delay)
        self.recovering = True
    except GcloudError as e:
      kind, detail = 'failed', str(e)
    except KeyboardInterrupt:
      self.say(f'interrupted; {args.name} is left as it is; delete it with: '
               f'{_down_command(args)}')
      return EXIT_INTERRUPTED
    return self.finish(kind, detail, recoveries)

  def finish(self, kind, detail, recoveries):
    """Deletes the pod unless --keep, then prints the verdict line."""
    args = self.args
    code = {'exit': detail, 'failed': EXIT_GCLOUD,
            'exhausted': EXIT_PREEMPTED}[kind]
    if self.created and args.keep:
      self.say(f'--keep: {args.name} stays; delete it with: '
               f'{_down_command(args)}')
    elif self.created:
      try:
        self.delete()
      except (GcloudError, KeyboardInterrupt) as e:
        self.say(f'error: {args.name} may still exist ({str(e) or "Ctrl-C"})'
                 f'; delete it with: {_down_command(args)}')
        code = code or EXIT_GCLOUD
    if kind == 'exit' and detail == 0:
      self.say('the run finished (exit status 0)')
    elif kind == 'exit':
      self.say(f'error: the run failed with exit status {detail} (its log is '
               f'above; docs/failures.md lists the statuses)')
    elif kind == 'failed':
      self.say(f'error: {detail}')
    else:
      self.say(f'error: gave up after {recoveries + 1} preemptions (or '
               f'failed re-creates); --max-preemptions='
               f'{args.max_preemptions}; the same command resumes the run '
               f'from {args.workdir}')
    return code

  def attempt(self):
    """One life of the pod: create, setup, run, follow to the end.

    Returns:
      (kind, detail): ('exit', the run's status); ('lost', why) when the pod
      was preempted, or could not be created again after a preemption; or
      ('failed', why) when a step failed on a pod that was not preempted.
    """
    lost = self.create()
    if lost:
      return lost
    for step, doing in (('setup', 'installing jaxssl on every worker'),
                        ('run', 'starting the run on every worker')):
      self.say(f'{step}: {doing}')
      code = self.steps(self.plan[step])
      if code:
        return self.failed(f'{step} failed with exit code {code}')
    return self.follow()

  def steps(self, commands):
    """Runs commands in order; returns the first nonzero status, or 0."""
    for argv in commands:
      code = _call(argv)[0]
      if code:
        return code
    return 0

  def failed(self, why):
    """(kind, detail) for a failed step: 'lost' if the pod was preempted."""
    preempted = self.preempted()
    if preempted:
      return 'lost', f'{why}: {preempted}'
    return 'failed', why

  def preempted(self):
    """Describes the node up to PREEMPTION_CHECKS times.

    Returns:
      Why the pod counts as preempted, or None if it stayed up.
    """
    for check in range(PREEMPTION_CHECKS):
      if check:
        self.sleep(PREEMPTION_CHECK_S)
      try:
        state = _state(self.plan['describe'])
      except GcloudError as e:
        self.say(f'cannot tell whether {self.args.name} was preempted: {e}')
        continue
      if state is None or state in LOST_STATES:
        return f'{self.args.name} was preempted (state {state or "gone"})'
      self.say(f'{self.args.name} is {state} (check {check + 1} of '
               f'{PREEMPTION_CHECKS})')
    return None

  def create(self):
    """Creates the pod; returns attempt()'s (kind, detail) if that failed."""
    args = self.args
    pricing = ('spot' if args.spot else 'preemptible' if args.preemptible
               else 'on-demand') + (', queued' if args.queued else '')
    self.say(f'create: {args.name}, {args.accelerator_type} ({pricing}) in '
             f'{args.zone}')
    code = self.steps(self.plan['create'])
    # After a preemption, capacity may be short for a while: a failed create
    # is retried like a preemption. The first one is the user's to fix.
    kind = 'lost' if self.recovering else 'failed'
    if code:
      return kind, f'create failed with exit code {code}'
    self.created = True
    while args.queued:
      state = _state(self.plan['owner'])
      if state == 'ACTIVE':
        break
      if state is None or state in QUEUE_FAILED_STATES:
        return kind, f'the queued resource {args.name} is {state or "gone"}'
      self.say(f'the queued resource {args.name} is {state}; checking again '
               f'in {QUEUED_POLL_S} s')
      self.sleep(QUEUED_POLL_S)
    return None

  def follow(self):
    """Streams worker 0's log until the run ends; returns (kind, detail)."""
    follow, drops = self.plan['follow'], 0
    while True:
      self.say("following worker 0's log until the run ends")
      _call(follow)
      code, out, err = _call(self.plan['probe'], capture=True)
      match = _PROBE_RE.fullmatch(_last_line(out)) if code == 0 else None
      if match and match.group(1) is not None:
        return self.ended(int(match.group(1)))
      if match and match.group(0) == 'gone':
        return self.failed('the run on worker 0 ended without an exit status')
      if match:  # running: the stream ended early, but ssh works
        drops, why = 0, 'the log stream ended while the run goes on'
      else:
        preempted = self.preempted()
        if preempted:
          return 'lost', f'worker 0 did not answer: {preempted}'
        drops += 1
        if drops > RECONNECTS:
          return 'failed', (f'worker 0 did not answer {drops} times in a '
                            f'row: {_last_line(err)}')
        why = f'worker 0 did not answer ({_last_line(err)})'
      self.say(f'{why}; following again in {RECONNECT_S} s')
      self.sleep(RECONNECT_S)
      follow = tc.follow_command(self.args, lines='20')  # not all again

  def ended(self, status):
    """(kind, detail) for a run that ended with `status`."""
    self.say(f'the run ended with exit status {status}')
    if status in RESUMABLE_STATUSES or status > 128:
      preempted = self.preempted()
      if preempted:
        return 'lost', f'exit status {status}: {preempted}'
    return 'exit', status

  def delete(self):
    """Deletes the pod (with its queued resource) if it exists.

    Raises:
      GcloudError: describe or delete failed.
    """
    while True:
      state = _state(self.plan['owner'])
      if state is None:
        self.say(f'{self.args.name} is already gone')
        return
      if state != 'DELETING':
        break
      # Deleting a node that Cloud TPU is deleting fails: wait for it.
      self.say(f'{self.args.name} is being deleted; checking again in '
               f'{QUEUED_POLL_S} s')
      self.sleep(QUEUED_POLL_S)
    self.say(f'deleting {self.args.name} (state {state})')
    code = _call(self.plan['delete'])[0]
    if code:
      raise GcloudError(f'delete failed with exit code {code}')


class Down:
  """Deletes the pod (or its queued resource) if it exists; idempotent.

  The queued resource NAME if there is one (its node goes with it), else
  the node NAME if there is one; no pod at all is success.

  Args:
    args: the parsed `down` flags.
    sleep: unused; the same signature as Up.
  """

  def __init__(self, args, sleep=time.sleep):
    del sleep
    self.args = args
    self.plan = [(tc.describe_command(args, queued),
                  tc.delete_command(args, queued, quiet=True))
                 for queued in (True, False)]

  def dry_run(self):
    """Both describe/delete pairs, with the condition as comments."""
    (describe_qr, delete_qr), (describe_node, delete_node) = self.plan
    return [shlex.join(describe_qr), '# if the queued resource exists:',
            shlex.join(delete_qr), '# else:', shlex.join(describe_node),
            '# if the node exists:', shlex.join(delete_node)]

  def run(self):
    """Returns 0 when nothing is left, EXIT_GCLOUD when gcloud failed."""
    name = self.args.name
    try:
      for (describe, delete), what in zip(self.plan,
                                          ('queued resource', 'TPU VM')):
        state = _state(describe)
        if state is None:
          continue
        print(f'tpu.py down: deleting the {what} {name} (state {state})',
              file=sys.stderr, flush=True)
        code = _call(delete)[0]
        if code:
          raise GcloudError(f'delete failed with exit code {code}')
        print(f'tpu.py down: deleted {name}', file=sys.stderr)
        return 0
    except GcloudError as e:
      print(f'tpu.py down: error: {e}', file=sys.stderr)
      return EXIT_GCLOUD
    except KeyboardInterrupt:
      return EXIT_INTERRUPTED
    print(f'tpu.py down: {name} does not exist in {self.args.zone}; nothing '
          'to delete', file=sys.stderr)
    return 0


JOBS = {'up': Up, 'down': Down}
