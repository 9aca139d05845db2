"""The multi-process runtime: start, watch and stop the processes of a run.

A multi-host run starts the same program once per host.
`maybe_initialize_distributed` connects the processes through JAX's
coordination service and starts a watchdog thread in each: every process
publishes a heartbeat counter in a small key-value hub that process 0 serves
(`jaxssl.peer_hub`; JAX's own store has no public client), and a process
whose peer stops beating (killed, crashed, preempted) or reports an error
exits with one line naming that peer, instead of waiting forever inside a
collective. See docs/scaling.md.
"""

import glob
import importlib.util
import os
import sys
import threading
import time
from typing import Mapping, NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxssl import peer_hub
from jaxssl import supervisor

# Environment equivalents of the --coordinator_address, --num_processes and
# --process_id flags (the flags win).
ENV_COORDINATOR_ADDRESS = 'JAXSSL_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAXSSL_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAXSSL_PROCESS_ID'
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 20
MIN_HEARTBEAT_TIMEOUT_SECONDS = 5
# JAX's own heartbeat ends a process abruptly (abort, no message of ours);
# it is set this many times longer than the watchdog's, as a backstop.
_JAX_HEARTBEAT_FACTOR = 2
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS',
               'SLURM_PROCID', 'SLURM_LOCALID')  # what jax's detection reads
# PCI ids of Cloud TPU chips: Google's vendor id and the TPU device ids
# (v2/v3, v4, v5p, v5e, v6e, 7x). Other Google devices (gVNIC) share the vendor.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = frozenset(
    {'0x0027', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076'})
_LEFT = 'left'
_ERROR = 'error: '


def process_values(value: int) -> list[int]:
  """Every process's `value`, in process order.

  A collective in a multi-process run: every process must call it.

  Args:
    value: an int32-sized integer of this process.

  Returns:
    `[value of process 0, value of process 1, ...]`.
  """
  if jax.process_count() == 1:
    return [int(value)]
  gathered = multihost_utils.process_allgather(np.int32(value))
  return [int(v) for v in np.asarray(gathered).reshape(-1)]


def detect_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
  """Names the multi-process cluster this process was started in, or None.

  Only environments that `jax.distributed.initialize()` configures by itself
  count: SLURM steps with more than one task, Open MPI with more than one
  rank, Kubernetes indexed Jobs (and JobSets), Cloud TPU VMs and GKE TPU or
  multi-slice jobs.

  Args:
    environ: the environment variables to inspect.
  """
  if (all(v in environ for v in _SLURM_VARS)
      and _int(environ, 'SLURM_NTASKS') > 1):
    return 'slurm'
  if ('OMPI_MCA_orte_hnp_uri' in environ
      and _int(environ, 'OMPI_COMM_WORLD_SIZE') > 1):
    return 'open_mpi'
  if 'KUBERNETES_SERVICE_HOST' in environ and 'JOB_COMPLETION_INDEX' in environ:
    return 'kubernetes'
  if (',' in environ.get('TPU_WORKER_HOSTNAMES', '')
      or ',' in environ.get('TPU_PROCESS_ADDRESSES', '')
      or environ.get('MEGASCALE_COORDINATOR_ADDRESS')):
    return 'cloud_tpu'
  if environ is os.environ and _on_cloud_tpu_vm():
    return 'cloud_tpu'
  return None


def _int(environ: Mapping[str, str], name: str, default: int = 1) -> int:
  value = environ.get(name)
  if value is None:
    return default
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} must be an integer') from None


def _on_cloud_tpu_vm(pci_devices: str = '/sys/bus/pci/devices',
                     has_libtpu: bool | None = None) -> bool:
  """Whether this is a Cloud TPU VM: TPU chips on the PCI bus, and libtpu.

  The same two signals that jax's TPU backend checks at import, read from
  sysfs and the installed packages (no network, no private jax module).

  Args:
    pci_devices: the sysfs folder of PCI devices (a test passes a fake one).
    has_libtpu: whether libtpu is installed; looked up when None.
  """
  if has_libtpu is None:
    has_libtpu = importlib.util.find_spec('libtpu') is not None
  if not has_libtpu:
    return False
  for device in glob.glob(os.path.join(pci_devices, '*')):
    try:
      with open(os.path.join(device, 'vendor')) as f:
        vendor = f.read().strip()
      with open(os.path.join(device, 'device')) as f:
        device_id = f.read().strip()
    except OSError:
      continue
    if vendor == _GOOGLE_PCI_VENDOR and device_id in _TPU_PCI_DEVICES:
      return True
  return False


def process_flags(coordinator_address: str | None, num_processes: int | None,
                  process_id: int | None,
                  environ: Mapping[str, str] = os.environ
                  ) -> tuple[str, int, int] | None:
  """The explicit multi-process settings: flags, else JAXSSL_* variables.

  Args:
    coordinator_address: `host:port` of process 0, or None.
    num_processes: the number of processes, or None.
    process_id: this process, in [0, num_processes), or None.
    environ: where the JAXSSL_COORDINATOR_ADDRESS, JAXSSL_NUM_PROCESSES and
      JAXSSL_PROCESS_ID fallbacks are read.

  Returns:
    `(coordinator_address, num_processes, process_id)`, or None when none
    of the three is given.

  Raises:
    ValueError: one line naming the missing or bad setting.
  """
  address = coordinator_address or environ.get(ENV_COORDINATOR_ADDRESS) or None
  count = num_processes
  if count is None and environ.get(ENV_NUM_PROCESSES):
    count = _int(environ, ENV_NUM_PROCESSES)
  index = process_id
  if index is None and environ.get(ENV_PROCESS_ID):
    index = _int(environ, ENV_PROCESS_ID)
  if address is None and count is None and index is None:
    return None
  if address is None:
    given = (f'--num_processes={count}' if count is not None
             else f'--process_id={index}')
    raise ValueError(f'{given} needs --coordinator_address=HOST:PORT of '
                     f'process 0 (or {ENV_COORDINATOR_ADDRESS})')
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'--coordinator_address={address!r} must be HOST:PORT, '
                     'e.g. 10.0.0.1:1234 or 127.0.0.1:1234')
  if count is None or index is None:
    raise ValueError(f'--coordinator_address={address} needs --num_processes '
                     f'and --process_id (or {ENV_NUM_PROCESSES} and '
                     f'{ENV_PROCESS_ID})')
  if count < 1:
    raise ValueError(f'--num_processes={count} must be >= 1')
  if not 0 <= index < count:
    raise ValueError(f'--process_id={index} must be in [0, {count}) for '
                     f'--num_processes={count}')
  return address, count, index


def maybe_initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None,
    process_id: int | None = None, *,
    heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
) -> bool:
  """Starts JAX's multi-controller runtime when this is one of many processes.

  Explicit settings (arguments, else JAXSSL_* variables; see
  `process_flags`) win; otherwise a cluster from `detect_cluster` lets
  `jax.distributed.initialize()` find the rest. A single process with no
  cluster environment does nothing. After initialising, a watchdog thread
  ends this process with a one-line error within about
  `heartbeat_timeout_seconds` of a peer dying or failing.

  Args:
    coordinator_address: `host:port` of process 0, or None.
    num_processes: the number of processes, or None.
    process_id: this process, or None.
    heartbeat_timeout_seconds: how long a silent peer is tolerated.

  Returns:
    Whether the distributed runtime was initialised.
  """
  if heartbeat_timeout_seconds < MIN_HEARTBEAT_TIMEOUT_SECONDS:
    raise ValueError(f'--heartbeat_timeout={heartbeat_timeout_seconds} must '
                     f'be >= {MIN_HEARTBEAT_TIMEOUT_SECONDS} (seconds)')
  explicit = process_flags(coordinator_address, num_processes, process_id)
  cluster = None if explicit else detect_cluster()
  if explicit is None and cluster is None:
    return False
  if cluster == 'kubernetes':
    _check_kubernetes_client()
  address, count, index = explicit or (None, None, None)
  jax.distributed.initialize(
      coordinator_address=address, num_processes=count, process_id=index,
      heartbeat_timeout_seconds=_JAX_HEARTBEAT_FACTOR
      * heartbeat_timeout_seconds)
  _start_watchdog(heartbeat_timeout_seconds,
                  address.rpartition(':')[0] if address else None)
  return True


def _check_kubernetes_client() -> None:
  if importlib.util.find_spec('kubernetes') is None:
    raise ValueError(
        'a Kubernetes indexed Job was detected (JOB_COMPLETION_INDEX is set) '
        "but jax needs the kubernetes package to find its peers: pip install "
        "'jax[k8s]', or pass --coordinator_address, --num_processes and "
        '--process_id')


class PeerMonitor:
  """Decides from the watchdog's key-value entries whether to stop.

  Pure bookkeeping (no I/O, time passed in), so it is tested without
  processes. Entries of the hub (`jaxssl.peer_hub`): `beat/<q>` holds
  process q's heartbeat counter, `exit/<q>` says that q left, either
  `'left'` (finished, or stopping because of another process) or
  `'error: <message>'`.
  """

  def __init__(self, process_id: int, num_processes: int,
               timeout_seconds: float, now: float):
    """Starts watching every other process as of `now` (monotonic seconds)."""
    self.num_processes = num_processes
    self.timeout_seconds = timeout_seconds
    self.peers = [q for q in range(num_processes) if q != process_id]
    self._beats: dict[int, str | None] = {q: None for q in self.peers}
    self._changed = {q: now for q in self.peers}
    self.lost: int | None = None

  def observe(self, entries: Mapping[str, str], now: float) -> str | None:
    """Returns why this process must stop, or None while all peers are well.

    Args:
      entries: the current `{relative key: value}` of the store.
      now: monotonic seconds; a peer whose counter has not changed for more
        than `timeout_seconds` is lost.
    """
    n = self.num_processes
    for q in self.peers:
      state = entries.get(f'exit/{q}')
      if state == _LEFT:
        continue
      if state is not None:
        return (f'process {q} of {n} stopped with an error: '
                f'{state.removeprefix(_ERROR)}')
      beat = entries.get(f'beat/{q}')
      if beat != self._beats[q]:
        self._beats[q], self._changed[q] = beat, now
      elif now - self._changed[q] > self.timeout_seconds:
        self.lost = q
        return (f'lost process {q} of {n}: no heartbeat for '
                f'{now - self._changed[q]:.0f} s (it was killed, crashed or '
                'was preempted)')
    return None


class _Watchdog:
  """The heartbeat thread of one process; see the module docstring."""

  def __init__(self, client: peer_hub.HubClient, process_id: int,
               num_processes: int, timeout_seconds: float):
    self._client = client
    self._id = process_id
    self.timeout_seconds = timeout_seconds
    self.interval = _beat_interval(timeout_seconds)
    self._monitor = PeerMonitor(process_id, num_processes, timeout_seconds,
                                time.monotonic())
    self._stop = threading.Event()
    self._leaving = threading.Lock()
    self._thread = threading.Thread(target=self._run, name='jaxssl-watchdog',
                                    daemon=True)

  def start(self) -> None:
    self._publish('beat', '0')
    self._thread.start()

  def _publish(self, kind: str, value: str) -> dict[str, str]:
    """Sets this process's `kind/<id>` entry; returns every entry."""
    return self._client.exchange({f'{kind}/{self._id}': value})

  def _entries(self) -> dict[str, str]:
    return self._client.exchange({})

  def _run(self) -> None:
    beat, last_answer = 0, time.monotonic()
    while not self._stop.wait(self.interval):
      beat += 1
      now = time.monotonic()
      try:
        entries = self._publish('beat', str(beat))
      except ConnectionError as e:
        # Only process 0's death silences the hub itself.
        if now - last_answer > self.timeout_seconds:
          self.leave(
              f'jaxssl: error: lost process 0 of '
              f'{self._monitor.num_processes} (it runs the watchdog hub at '
              f'{self._client.address}): no answer for '
              f'{now - last_answer:.0f} s ({_first_line(e)})', publish=None)
        continue
      last_answer = now
      reason = self._monitor.observe(entries, now)
      if reason and not self._stop.is_set():
        self.leave(f'jaxssl: error: {reason}; stopping this process too '
                   '(restart every process with the same --workdir to resume '
                   'from the last checkpoint)', publish=_LEFT)

  def stop(self) -> None:
    """Tells the peers this process finished, and ends the thread."""
    self._stop.set()
    self._thread.join()
    self._publish('exit', _LEFT)

  def wait(self, seconds: float) -> None:
    """Sleeps up to `seconds`; the thread may end the process meanwhile."""
    self._thread.join(seconds)

  def leave(self, message: str, *, publish: str | None) -> NoReturn:
    """Prints `message`, tells the peers, and ends the process (exit 1).

    JAX's shutdown barrier is skipped on purpose: it would wait for peers
    that may be stuck in a collective.
    """
    with self._leaving:
      sys.stdout.flush()
      print(message, file=sys.stderr, flush=True)
      try:
        if publish is not None:
          self._publish('exit', publish)
          self._linger()
      finally:
        os._exit(1)  # pylint: disable=protected-access

  def _linger(self) -> None:
    """Process 0 hosts the store: keeps it up until the peers have read it."""
    if self._id != 0:
      return
    waiting = set(self._monitor.peers) - {self._monitor.lost}
    deadline = time.monotonic() + 2 * self.interval + 1
    while waiting and time.monotonic() < deadline:
      entries = self._entries()
      waiting = {q for q in waiting if f'exit/{q}' not in entries}
      time.sleep(0.1)


_watchdog: _Watchdog | None = None
_hub: peer_hub.HubServer | None = None  # process 0 when unsupervised


def _beat_interval(timeout_seconds: float) -> float:
  """Seconds between heartbeats (and the hub's answer timeout)."""
  return max(1.0, timeout_seconds / 10)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _start_watchdog(timeout_seconds: float,
                    coordinator_host: str | None) -> None:
  """Starts the hub (process 0) and this process's heartbeat thread.

  A collective: every process calls it right after initialising.
  """
  global _watchdog, _hub
  interval = _beat_interval(timeout_seconds)
  _hub, client = peer_hub.share_hub(coordinator_host, timeout_seconds=interval,
                                    serve=supervisor.serve_hub)
  supervisor.report_identity(jax.process_index(), jax.process_count(),
                             client, interval)
  _watchdog = _Watchdog(client, jax.process_index(), jax.process_count(),
                        timeout_seconds)
  _watchdog.start()


def finish_distributed() -> None:
  """Marks this process as finished for its peers; call at a normal end."""
  global _watchdog
  if _watchdog is not None:
    _watchdog.stop()
    _watchdog = None


def exit_with_error(message: str) -> NoReturn:
  """Ends the process with `message` (one line) on stderr and exit code 1.

  In a multi-process run the peers are told first, so each stops with
  `process <id> of <n> stopped with an error: ...` instead of waiting.

  Args:
    message: the line to print, e.g. `'jaxssl: error: ...'`.
  """
  if _watchdog is None:
    sys.exit(message)
  _watchdog.leave(message,
                  publish=_ERROR + message.removeprefix('jaxssl: error: '))


def exit_after_error(error: BaseException) -> None:
  """Ends a multi-process run after an unexpected error; else returns.

  A failed collective (a `JaxRuntimeError`) usually means that a peer died:
  the watchdog is given its timeout to name the peer and end the process.
  Otherwise (any other exception, Ctrl-C) the traceback is printed and the
  peers are told, rather than leaving them waiting in a collective.

  Args:
    error: the exception that ended the run in this process.
  """
  if _watchdog is None:
    return
  if isinstance(error, KeyboardInterrupt):
    exit_with_error('jaxssl: error: interrupted (Ctrl-C or SIGINT)')
  if isinstance(error, jax.errors.JaxRuntimeError):
    _watchdog.wait(_watchdog.timeout_seconds + 3 * _watchdog.interval)
  else:
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exception(error)
  exit_with_error(f'jaxssl: error: {type(error).__name__}: '
                  f'{_first_line(error)}')
