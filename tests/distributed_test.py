"""The multi-process runtime's settings, detection and peer bookkeeping.

Real processes (init, heartbeat, a killed peer) are in multihost_test.py;
here the watchdog thread runs against a real hub on loopback.
"""

import threading

import jax
import pytest

from jaxssl import distributed
from jaxssl import peer_hub

_CLUSTER_VARS = (
    'SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
    'SLURM_LOCALID', 'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE',
    'KUBERNETES_SERVICE_HOST', 'JOB_COMPLETION_INDEX', 'TPU_WORKER_HOSTNAMES',
    'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS',
    distributed.ENV_COORDINATOR_ADDRESS, distributed.ENV_NUM_PROCESSES,
    distributed.ENV_PROCESS_ID)
_SLURM = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]',
          'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}


@pytest.mark.parametrize('environ, expected', [
    ({}, None),
    ({**_SLURM, 'SLURM_NTASKS': '2'}, 'slurm'),
    ({**_SLURM, 'SLURM_NTASKS': '1'}, None),
    ({'SLURM_NTASKS': '4'}, None),  # jax needs all five SLURM variables
    ({'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE': '2'}, 'open_mpi'),
    ({'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE': '1'}, None),
    ({'KUBERNETES_SERVICE_HOST': '10.0.0.1', 'JOB_COMPLETION_INDEX': '3'},
     'kubernetes'),
    ({'KUBERNETES_SERVICE_HOST': '10.0.0.1'}, None),  # a plain pod
    ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1'}, 'cloud_tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'w-0'}, None),
    ({'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.2'}, 'cloud_tpu'),
])
def test_detect_cluster(environ, expected):
  assert distributed.detect_cluster(environ) == expected


@pytest.mark.parametrize('args, environ, expected', [
    ((None, None, None), {}, None),
    (('127.0.0.1:1234', 2, 1), {}, ('127.0.0.1:1234', 2, 1)),
    ((None, None, None), {'JAXSSL_COORDINATOR_ADDRESS': 'h:9',
                          'JAXSSL_NUM_PROCESSES': '4',
                          'JAXSSL_PROCESS_ID': '3'}, ('h:9', 4, 3)),
    (('a:1', None, 0), {'JAXSSL_COORDINATOR_ADDRESS': 'h:9',
                        'JAXSSL_NUM_PROCESSES': '4',
                        'JAXSSL_PROCESS_ID': '3'}, ('a:1', 4, 0)),
])
def test_process_flags_flags_win_over_environment(args, environ, expected):
  assert distributed.process_flags(*args, environ=environ) == expected


@pytest.mark.parametrize('args, environ, message', [
    ((None, 2, None), {}, '--num_processes=2 needs --coordinator_address'),
    ((None, None, 0), {}, '--process_id=0 needs --coordinator_address'),
    (('h:1', None, 0), {}, '--coordinator_address=h:1 needs --num_processes '
                           'and --process_id'),
    (('h:1', 2, None), {}, '--coordinator_address=h:1 needs --num_processes '
                           'and --process_id'),
    (('h', 2, 0), {}, "--coordinator_address='h' must be HOST:PORT"),
    (('h:x', 2, 0), {}, "--coordinator_address='h:x' must be HOST:PORT"),
    (('h:1', 0, 0), {}, '--num_processes=0 must be >= 1'),
    (('h:1', 2, 2), {}, '--process_id=2 must be in [0, 2)'),
    (('h:1', 2, -1), {}, '--process_id=-1 must be in [0, 2)'),
    ((None, None, None), {'JAXSSL_NUM_PROCESSES': 'two'},
     "JAXSSL_NUM_PROCESSES='two' must be an integer"),
])
def test_process_flags_rejects_inconsistent_settings(args, environ, message):
  with pytest.raises(ValueError) as e:
    distributed.process_flags(*args, environ=environ)
  assert str(e.value).startswith(message)
  assert '\n' not in str(e.value)


@pytest.fixture
def no_cluster(monkeypatch):
  """A plain environment; jax.distributed.initialize must not be reached."""
  for name in _CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)

  def must_not_initialize(**kwargs):
    raise AssertionError(f'initialize called with {kwargs}')
  monkeypatch.setattr(jax.distributed, 'initialize', must_not_initialize)
  return monkeypatch


def test_a_single_process_does_not_initialize(no_cluster):
  assert not distributed.maybe_initialize_distributed()
  assert distributed.process_values(5) == [5]
  distributed.finish_distributed()  # nothing to stop


def test_kubernetes_without_its_client_fails_clearly(no_cluster):
  no_cluster.setenv('KUBERNETES_SERVICE_HOST', '10.0.0.1')
  no_cluster.setenv('JOB_COMPLETION_INDEX', '0')
  with pytest.raises(ValueError, match=r"jax\[k8s\]"):
    distributed.maybe_initialize_distributed()


def test_heartbeat_timeout_has_a_floor(no_cluster):
  with pytest.raises(ValueError, match='--heartbeat_timeout=2 must be >= 5'):
    distributed.maybe_initialize_distributed(heartbeat_timeout_seconds=2)


@pytest.mark.parametrize('devices, has_libtpu, expected', [
    ({'0000:00:04.0': ('0x1ae0', '0x0063')}, True, True),  # a v5e chip
    ({'0000:00:04.0': ('0x1ae0', '0x0063')}, False, False),  # no libtpu
    ({'0000:00:05.0': ('0x1ae0', '0x0042')}, True, False),  # gVNIC, no TPU
    ({'0000:00:06.0': ('0x10de', '0x2330')}, True, False),  # an H100
    ({}, True, False),
])
def test_cloud_tpu_vm_is_detected_from_pci_ids_and_libtpu(
    tmp_path, devices, has_libtpu, expected):
  for name, (vendor, device) in devices.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / 'vendor').write_text(vendor + '\n')
    (tmp_path / name / 'device').write_text(device + '\n')
  assert distributed._on_cloud_tpu_vm(  # pylint: disable=protected-access
      str(tmp_path), has_libtpu=has_libtpu) is expected


def test_exit_with_error_in_one_process_is_sys_exit():
  with pytest.raises(SystemExit) as e:
    distributed.exit_with_error('jaxssl: error: boom')
  assert e.value.code == 'jaxssl: error: boom'


def _monitor(process_id=0, num_processes=2):
  return distributed.PeerMonitor(process_id, num_processes,
                                 timeout_seconds=10, now=100.0)


def test_peer_monitor_is_quiet_while_peers_beat():
  monitor = _monitor()
  for t in range(100, 200, 5):
    assert monitor.observe({'beat/0': 'x', 'beat/1': str(t)}, now=t) is None


@pytest.mark.parametrize('entries', [
    {'beat/1': '7'},  # beat frozen at 7
    {},  # never beat at all
])
def test_peer_monitor_names_a_silent_peer_after_the_timeout(entries):
  monitor = _monitor()
  assert monitor.observe(entries, now=100.0) is None
  assert monitor.observe(entries, now=110.0) is None  # exactly the timeout
  reason = monitor.observe(entries, now=111.0)
  assert reason.startswith('lost process 1 of 2: no heartbeat for 11 s')
  assert monitor.lost == 1


def test_peer_monitor_watches_every_peer_but_itself():
  monitor = _monitor(process_id=1, num_processes=3)
  assert monitor.peers == [0, 2]
  assert monitor.observe({'beat/0': '1', 'beat/2': '1'}, now=100.0) is None
  reason = monitor.observe({'beat/0': '2', 'beat/2': '1', 'beat/1': '9'},
                           now=111.0)
  assert reason.startswith('lost process 2 of 3')


def test_peer_monitor_lets_finished_peers_go_and_reports_errors():
  monitor = _monitor(num_processes=3)
  assert monitor.observe({'exit/1': 'left', 'beat/2': '1'}, now=100.0) is None
  assert monitor.observe({'exit/1': 'left', 'beat/2': '2'}, now=500.0) is None
  reason = monitor.observe({'exit/1': 'left', 'exit/2': 'error: disk full'},
                           now=501.0)
  assert reason == 'process 2 of 3 stopped with an error: disk full'


class _FakeWatchdog:
  """Records what the process would tell its peers, then 'exits'."""

  timeout_seconds, interval = 0, 0

  def __init__(self):
    self.published = []

  def wait(self, seconds):
    del seconds

  def leave(self, message, *, publish):
    self.published.append((message, publish))
    raise SystemExit(1)


@pytest.mark.parametrize('error, message', [
    (KeyboardInterrupt(), 'interrupted (Ctrl-C or SIGINT)'),
    (RuntimeError('disk full\ndetails'), 'RuntimeError: disk full'),
])
def test_exit_after_error_tells_the_peers(monkeypatch, error, message):
  watchdog = _FakeWatchdog()
  monkeypatch.setattr(distributed, '_watchdog', watchdog)
  with pytest.raises(SystemExit):
    distributed.exit_after_error(error)
  assert watchdog.published == [(f'jaxssl: error: {message}',
                                 f'error: {message}')]


class _RecordingWatchdog(distributed._Watchdog):  # pylint: disable=protected-access
  """A real watchdog whose `leave` records instead of ending the process."""

  def __init__(self, *args):
    super().__init__(*args)
    self.left = threading.Event()
    self.message = None

  def leave(self, message, *, publish):
    self.message = message
    self.left.set()
    self._stop.set()  # pylint: disable=protected-access  (ends the thread)


def test_watchdog_names_process_0_when_its_hub_dies():
  hub = peer_hub.HubServer('127.0.0.1')
  client = peer_hub.HubClient(['127.0.0.1'], hub.port, hub.token,
                              timeout_seconds=1)
  watchdog = _RecordingWatchdog(client, 1, 2, 5)
  watchdog.start()
  assert not watchdog.left.wait(2)  # process 0 has not beaten yet: quiet
  hub.close()
  assert watchdog.left.wait(15)
  assert watchdog.message.startswith(
      'jaxssl: error: lost process 0 of 2 (it runs the watchdog hub at '
      f'127.0.0.1:{hub.port}): no answer for ')


def test_watchdog_names_a_peer_that_stops_beating():
  hub = peer_hub.HubServer('127.0.0.1')
  try:
    peer = peer_hub.HubClient(['127.0.0.1'], hub.port, hub.token, 1)
    peer.exchange({'beat/1': '0'})
    watchdog = _RecordingWatchdog(
        peer_hub.HubClient(['127.0.0.1'], hub.port, hub.token, 1), 0, 2, 5)
    watchdog.start()
    assert watchdog.left.wait(15)
    assert watchdog.message.startswith(
        'jaxssl: error: lost process 1 of 2: no heartbeat for ')
  finally:
    hub.close()
