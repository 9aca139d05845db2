"""The supervisor: one line, not an abort dump, when a peer process dies.

In a multi-process run a dead peer can end the survivors inside native code:
gloo throws from a collective whose connection broke, and JAX's coordination
client aborts when process 0 (which hosts the coordination service) is gone.
Either way the process dies by SIGABRT with a 40 to 60 line dump (`terminate
called after throwing an instance of 'gloo::EnforceNotMet'`, `Fatal Python
error: Aborted`, thread stacks), and which of the crash paths fires first is a
race. No Python code runs after such an abort, so the command line of a
multi-process run (`jaxssl.main`) does not train itself: it starts the same
command again as a worker child, and `supervise` stays in front of it:

- stdout is the child's own (progress lines pass straight through);
- stderr is relayed line by line, except that from the first line that looks
  like native crash output (a glog error line, `terminate called`, `Fatal
  Python error`) lines are held back: if the child lives on for
  `HOLD_SECONDS`, they are relayed after all;
- SIGTERM and SIGINT are forwarded to the child (the worker then saves and
  stops, see `jaxssl.preemption`); the child runs in its own process group,
  so a Ctrl-C reaches it once, and it dies with the supervisor (Linux
  `PR_SET_PDEATHSIG`), so killing the supervisor kills the process;
- when the child dies abnormally and its held output shows a broken
  cross-process connection, the held lines are dropped and one line naming
  the lost peer is printed; the exit status is then `EXIT_PEER_LOST`, as
  it is when the worker's own watchdog names the lost peer.

Single-process runs are not supervised. `-v` (any verbosity) relays
everything, dumps included.
"""

import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time

# EX_UNAVAILABLE of BSD's sysexits.h: a service (here, a peer) went away.
EXIT_PEER_LOST = 69
HOLD_SECONDS = 30
_CRASH_BYTES = 1 << 16  # how much crash output is kept to look for causes
ENV_SUPERVISOR_PID = 'JAXSSL_SUPERVISOR_PID'
_ENV_IDENTITY_FD = 'JAXSSL_SUPERVISOR_FD'
_PR_SET_PDEATHSIG = 1
# The first line of native crash output: glog E/F lines, C++ terminate,
# CPython's fatal error handler.
_CRASH_LINE = re.compile(
    rb'^([EF]\d{4} |terminate called|Fatal Python error|\*\*\* )')
# Native messages that mean a connection to another process broke.
_PEER_SIGNS = (b'gloo', b'Connection closed by peer', b'Connection reset',
               b'leader task', b'coordination service', b'UNAVAILABLE',
               b'heartbeat')
_LEADER_SIGNS = (b'leader task', b'coordination service')
_OWN_LOST_LINE = b'jaxssl: error: lost process '
_RESTART = ('stopping this process too (restart every process with the same '
            '--workdir to resume from the last checkpoint)')


def is_worker() -> bool:
  """Whether this process is the worker child of a supervisor."""
  return os.environ.get(ENV_SUPERVISOR_PID) == str(os.getppid())


def become_worker() -> None:
  """Makes this worker die with its supervisor (Linux); call first thing."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):
    return  # not Linux: an orphaned worker is left to the watchdog
  if not is_worker():  # the supervisor died before prctl took effect
    os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access


def report_identity(process_index: int, process_count: int) -> None:
  """Tells the supervisor (if any) which process of how many this is."""
  fd = os.environ.get(_ENV_IDENTITY_FD)
  if fd is None or not is_worker():
    return
  try:
    os.write(int(fd), f'{process_index} {process_count}\n'.encode())
    os.close(int(fd))
  except OSError:
    pass


def lost_peer_line(process_index: int, process_count: int,
                   crash: bytes) -> str | None:
  """The one line for a worker that died with `crash` as its last output.

  Args:
    process_index: the dead worker's process index.
    process_count: the number of processes of the run.
    crash: the native crash output (from its first line).

  Returns:
    `'jaxssl: error: lost process <q> of <n>: ...'`, or None when `crash`
    shows no broken connection (a crash of this process's own).
  """
  if not any(sign in crash for sign in _PEER_SIGNS):
    return None
  n = process_count
  leader = any(sign in crash for sign in _LEADER_SIGNS)
  if n == 2:
    peer = f'process {1 - process_index} of {n}'
  elif leader and process_index != 0:
    peer = f'process 0 of {n}'
  else:
    peer = f'a peer process of {n} (which one is not known here)'
  where = ('its connection to the coordination service broke' if leader
           else 'a cross-process collective lost its connection')
  return (f'jaxssl: error: lost {peer}: {where} (it was killed, crashed or '
          f'was preempted); {_RESTART}')


def supervise(worker_args: list[str], *, hold: bool = True,
              program: list[str] | None = None) -> int:
  """Runs `python -m jaxssl.main <worker_args>` as a worker; see module doc.

  Args:
    worker_args: the command-line arguments of the worker.
    hold: hold back native crash output (False with `-v`).
    program: the worker program (tests); default `python -m jaxssl.main`.

  Returns:
    The exit status for this process: the worker's own, `EXIT_PEER_LOST`
    after a lost peer, or 128 + the signal that killed the worker.
  """
  identity_read, identity_write = os.pipe()
  env = dict(os.environ, **{ENV_SUPERVISOR_PID: str(os.getpid()),
                            _ENV_IDENTITY_FD: str(identity_write)})
  child = subprocess.Popen(
      [*(program or [sys.executable, '-m', 'jaxssl.main']), *worker_args],
      env=env,
      stderr=subprocess.PIPE, pass_fds=(identity_write,), process_group=0)
  os.close(identity_write)
  forward = lambda signum, frame: child.send_signal(signum)
  previous = {signum: signal.signal(signum, forward)
              for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    own, held, crash = _relay(child, hold)
    returncode = child.wait()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  identity = os.read(identity_read, 64).split()
  os.close(identity_read)
  return _conclude(returncode, own, held, crash, identity)


def _relay(child: subprocess.Popen, hold: bool) -> tuple[bytes, bytes, bytes]:
  """Copies the child's stderr until it closes.

  Returns:
    The last `jaxssl: error:` line relayed, the output still held, and the
    crash output seen (from the first crash-like line; relayed or held).
  """
  fd = child.stderr.fileno()
  pending, held, crash, held_since, own = b'', b'', b'', 0., b''
  while True:
    ready, _, _ = select.select([fd], [], [], 1.0)
    chunk = os.read(fd, 65536) if ready else None
    if chunk == b'':
      return own, held + pending, crash + pending
    lines = (pending + (chunk or b'')).split(b'\n')
    pending = lines.pop()
    for line in lines:
      line += b'\n'
      ours = line.startswith(b'jaxssl: ')  # the worker's own one-liners
      if not ours and (crash or _CRASH_LINE.match(line)):
        crash = (crash + line)[-_CRASH_BYTES:]
        if hold:
          held, held_since = held + line, time.monotonic()
          continue
      if line.startswith(b'jaxssl: error: '):
        own = line
      sys.stderr.buffer.write(line)
    sys.stderr.flush()
    if held and time.monotonic() - held_since > HOLD_SECONDS:
      sys.stderr.buffer.write(held)  # the child lived on: not a crash
      sys.stderr.flush()
      held, crash = b'', b''


def _conclude(returncode: int, own: bytes, held: bytes, crash: bytes,
              identity: list[bytes]) -> int:
  """The exit status, after printing held output or the lost-peer line."""
  if own.startswith(_OWN_LOST_LINE):
    return EXIT_PEER_LOST  # the worker's watchdog already named the peer
  if own:
    return returncode  # the worker said why in one line; the rest is noise
  abnormal = returncode < 0 or returncode > 2 and returncode not in (
      EXIT_PEER_LOST, 75)
  line = None
  if abnormal and len(identity) == 2:
    line = lost_peer_line(int(identity[0]), int(identity[1]), crash)
  if line is not None:
    print(line, file=sys.stderr, flush=True)
    return EXIT_PEER_LOST
  sys.stderr.buffer.write(held)
  sys.stderr.flush()
  return 128 - returncode if returncode < 0 else returncode
