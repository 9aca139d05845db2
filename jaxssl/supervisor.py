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

A crash output names no process, so the supervisors tell each other their
workers' fates through the watchdog hub, which process 0's supervisor
serves (`jaxssl.peer_fates`): the worker and its supervisor share a control
socket, over which process 0's worker asks for the hub
(`serve_hub`) and every worker says which process of how many it is and
where the hub is (`report_identity`).

Single-process runs are not supervised. `-v` (any verbosity) relays
everything, dumps included.
"""

import ctypes
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxssl import peer_fates
from jaxssl import peer_hub

# EX_UNAVAILABLE of BSD's sysexits.h: a service (here, a peer) went away.
EXIT_PEER_LOST = 69
HOLD_SECONDS = 30
_CRASH_BYTES = 1 << 16  # how much crash output is kept to look for causes
ENV_SUPERVISOR_PID = 'JAXSSL_SUPERVISOR_PID'
_ENV_CONTROL_FD = 'JAXSSL_SUPERVISOR_FD'
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
_OWN_LOST_LINE_RE = re.compile(rb'jaxssl: error: lost process (\d+) ')
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


_control: socket.socket | None = None  # the worker's end


def _worker_control() -> socket.socket | None:
  """The worker's end of the control socket, or None when unsupervised."""
  global _control
  fd = os.environ.get(_ENV_CONTROL_FD)
  if _control is None and fd is not None and is_worker():
    try:
      _control = socket.socket(fileno=int(fd))
    except OSError:
      return None
  return _control


def serve_hub(bind_host: str) -> tuple[int, str] | None:
  """Has the supervisor serve the watchdog hub (`peer_hub.share_hub`'s serve).

  Args:
    bind_host: the address to listen on.

  Returns:
    The hub's `(port, token)`, or None when this process is unsupervised.
  """
  control = _worker_control()
  if control is None:
    return None
  control.sendall(b'hub ' + json.dumps(bind_host).encode() + b'\n')
  reply = control.makefile('rb').readline().split()
  if len(reply) != 2:
    return None  # the supervisor could not serve it: this process will
  return int(reply[0]), reply[1].decode()


def report_identity(process_index: int, process_count: int,
                    hub: peer_hub.HubClient | None = None,
                    beat_interval: float = 1.) -> None:
  """Tells the supervisor (if any) which process of how many this is.

  Args:
    process_index: this process.
    process_count: the number of processes.
    hub: this process's connection to the run's watchdog hub, whose address
      the supervisor then uses to learn its peers' fates.
    beat_interval: seconds between the workers' heartbeats.
  """
  control = _worker_control()
  if control is None:
    return
  address = [hub.hosts, hub.port, hub.token] if hub is not None else None
  record = [process_index, process_count, address, beat_interval]
  try:
    control.sendall(b'identity ' + json.dumps(record).encode() + b'\n')
  except OSError:
    pass


class _Control:
  """The supervisor's end of the control socket, answered by a thread."""

  def __init__(self, end: socket.socket):
    self.server: peer_hub.HubServer | None = None
    self.identity: tuple[int, int] | None = None
    self.hub: peer_hub.HubClient | None = None
    self.beat_interval = 1.
    self._end = end
    self._thread = threading.Thread(target=self._run, name='jaxssl-control',
                                    daemon=True)
    self._thread.start()

  def join(self) -> None:
    """Waits briefly for the requests of a worker that has ended."""
    self._thread.join(2.)

  def tell_fate(self, fate: str | None, *, lost: list[int] | None) -> None:
    """Publishes the worker's fate (None: already published) for the peers.

    The supervisor that serves the hub then keeps it up until the peers
    that were not lost have concluded too.
    """
    if self.hub is None or self.identity is None:
      return
    index, count = self.identity
    if fate is not None:
      peer_fates.publish(self.hub, {f'fate/{index}': fate,
                                    f'done/{index}': '1'})
    if self.server is not None:
      peer_fates.linger(self.hub, index, count, lost)

  def _run(self) -> None:
    with self._end.makefile('rb') as requests:
      for line in requests:
        kind, _, body = line.partition(b' ')
        try:
          self._answer(kind, json.loads(body))
        except (ValueError, TypeError, OSError):
          if kind == b'hub':  # the worker serves the hub itself then
            self._end.sendall(b'\n')

  def _answer(self, kind: bytes, body) -> None:
    if kind == b'hub':
      self.server = peer_hub.HubServer(str(body))
      self._end.sendall(f'{self.server.port} {self.server.token}\n'.encode())
    elif kind == b'identity':
      index, count, address, self.beat_interval = body
      if address is not None:
        hosts, port, token = address
        self.hub = peer_hub.HubClient(hosts, int(port), str(token),
                                      timeout_seconds=2.)
      self.identity = int(index), int(count)


def shows_peer_loss(crash: bytes) -> bool:
  """Whether native crash output shows a broken cross-process connection."""
  return any(sign in crash for sign in _PEER_SIGNS)


def lost_peer_line(process_index: int, process_count: int, crash: bytes,
                   lost: list[int] | None = None) -> str | None:
  """The one line for a worker that died with `crash` as its last output.

  Args:
    process_index: the dead worker's process index.
    process_count: the number of processes of the run.
    crash: the native crash output (from its first line).
    lost: the lost processes, when the peers' fates told them
      (`jaxssl.peer_fates`); otherwise they are inferred where possible: the
      other process of two, process 0 when the coordination service broke.

  Returns:
    `'jaxssl: error: lost process <q> of <n>: ...'`, or None when `crash`
    shows no broken connection (a crash of this process's own).
  """
  if not shows_peer_loss(crash):
    return None
  n = process_count
  leader = any(sign in crash for sign in _LEADER_SIGNS)
  if lost is None and n == 2:
    lost = [1 - process_index]
  elif lost is None and leader and process_index != 0:
    lost = [0]
  if not lost:
    peer = f'a peer process of {n} (which one is not known here)'
  elif len(lost) == 1:
    peer = f'process {lost[0]} of {n}'
  else:
    peer = f"processes {', '.join(map(str, lost))} of {n}"
  where = ('a cross-process collective lost its connection'
           if b'gloo' in crash or not leader
           else 'its connection to the coordination service broke')
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
  ours, theirs = socket.socketpair()
  env = dict(os.environ, **{ENV_SUPERVISOR_PID: str(os.getpid()),
                            _ENV_CONTROL_FD: str(theirs.fileno())})
  child = subprocess.Popen(
      [*(program or [sys.executable, '-m', 'jaxssl.main']), *worker_args],
      env=env, stderr=subprocess.PIPE, pass_fds=(theirs.fileno(),),
      process_group=0)
  theirs.close()
  control = _Control(ours)
  forward = lambda signum, frame: child.send_signal(signum)
  previous = {signum: signal.signal(signum, forward)
              for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    own, held, crash = _relay(child, hold)
    returncode = child.wait()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  control.join()
  return _conclude(returncode, own, held, crash, control)


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
              control: _Control) -> int:
  """The exit status, after printing held output or the lost-peer line."""
  abnormal = returncode < 0 or returncode > 2 and returncode not in (
      EXIT_PEER_LOST, 75)
  named = _OWN_LOST_LINE_RE.match(own)
  if named:  # the worker's watchdog named the peer
    control.tell_fate(peer_fates.PEER, lost=[int(named[1])])
    return EXIT_PEER_LOST
  if own or not abnormal or control.identity is None:
    sys.stderr.buffer.write(b'' if own else held)
    sys.stderr.flush()
    return 128 - returncode if returncode < 0 else returncode
  index, count = control.identity
  if not shows_peer_loss(crash):  # this worker's own death, not a peer's
    control.tell_fate(peer_fates.OWN, lost=None)
    sys.stderr.buffer.write(held)
    sys.stderr.flush()
    return 128 - returncode if returncode < 0 else returncode
  lost = None
  if control.hub is not None:
    lost = peer_fates.judge_lost(control.hub, index, count,
                                 control.beat_interval)
  print(lost_peer_line(index, count, crash, lost), file=sys.stderr,
        flush=True)
  control.tell_fate(None, lost=lost)
  return EXIT_PEER_LOST
