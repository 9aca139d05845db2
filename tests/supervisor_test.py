"""The supervisor, with small Python workers that behave like dying ones.

The real thing (a killed process of a two-process run) is in
multihost_test.py; here each exit path is driven exactly.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jaxssl import preemption
from jaxssl import supervisor

# A worker as jaxssl.main's would be: it reports that it is process 1 of 2
# (as after jax.distributed.initialize), then runs BODY.
_PRELUDE = textwrap.dedent("""\
    import os, signal, sys, time
    from jaxssl import supervisor
    supervisor.become_worker()
    supervisor.report_identity(1, 2)
    print('step 1/8 | loss 7.5', flush=True)
    """)
# What a survivor's stderr looks like when process 0 dies in a collective.
_GLOO_ABORT = textwrap.dedent("""\
    sys.stderr.write('a warning of the healthy run\\n'); sys.stderr.flush()
    sys.stderr.write("terminate called after throwing an instance of "
                     "'gloo::EnforceNotMet'\\n  what():  [gloo/transport/tcp/"
                     "pair.cc:534] Connection closed by peer [127.0.0.1]:1\\n"
                     "Fatal Python error: Aborted\\n\\nThread 0x01 (most "
                     "recent call first):\\n  File \\"x.py\\", line 1\\n")
    sys.stderr.flush()
    os.abort()
    """)


def _supervise(capfd, body, **kwargs):
  program = [sys.executable, '-c', _PRELUDE + textwrap.dedent(body)]
  code = supervisor.supervise([], program=program, **kwargs)
  out, err = capfd.readouterr()
  return code, out, err


def test_a_native_abort_after_a_lost_peer_is_one_line(capfd):
  code, out, err = _supervise(capfd, _GLOO_ABORT)
  assert code == supervisor.EXIT_PEER_LOST
  assert 'step 1/8' in out
  assert err.splitlines() == [
      'a warning of the healthy run',
      'jaxssl: error: lost process 0 of 2: a cross-process collective lost '
      'its connection (it was killed, crashed or was preempted); stopping '
      'this process too (restart every process with the same --workdir to '
      'resume from the last checkpoint)']


def test_with_verbosity_the_dump_is_relayed_too(capfd):
  code, _, err = _supervise(capfd, _GLOO_ABORT, hold=False)
  assert code == supervisor.EXIT_PEER_LOST
  assert 'Fatal Python error: Aborted' in err
  assert err.splitlines()[-1].startswith('jaxssl: error: lost process 0 of 2')


def test_an_abort_of_its_own_is_relayed_not_blamed_on_a_peer(capfd):
  code, _, err = _supervise(capfd, """\
      sys.stderr.write('Fatal Python error: Segmentation fault\\n')
      sys.stderr.flush()
      os.kill(os.getpid(), signal.SIGSEGV)
      """)
  assert code == 128 + signal.SIGSEGV
  assert err.splitlines() == ['Fatal Python error: Segmentation fault']


def test_the_watchdogs_own_line_keeps_its_text_and_gets_the_status(capfd):
  line = ('jaxssl: error: lost process 0 of 2: no heartbeat for 21 s (it was '
          'killed, crashed or was preempted); stopping this process too')
  code, _, err = _supervise(capfd, f"""\
      sys.stderr.write('E1206 00:00:00.0 1 client.cc:1] UNAVAILABLE\\n')
      sys.stderr.write({line!r} + '\\n')
      sys.stderr.flush()
      os._exit(1)
      """)
  assert code == supervisor.EXIT_PEER_LOST
  assert err.splitlines() == [line]


def test_held_lines_of_a_healthy_run_are_not_lost(capfd):
  code, _, err = _supervise(capfd, """\
      sys.stderr.write('E1206 00:00:00.0 1 x.cc:1] a harmless error log\\n')
      sys.stderr.write('more\\n')
      """)
  assert code == 0
  assert err.splitlines() == ['E1206 00:00:00.0 1 x.cc:1] a harmless error log',
                              'more']


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_to_the_worker(capfd, tmp_path, signum):
  # The worker makes a file once its handler is in place; a helper process
  # then signals the supervisor (this process), which forwards the signal.
  ready = tmp_path / 'ready'
  program = [sys.executable, '-c', _PRELUDE + textwrap.dedent(f"""\
      signal.signal({int(signum)}, lambda *_: sys.exit({
          preemption.EXIT_PREEMPTED}))
      open({str(ready)!r}, 'w').close()
      time.sleep(60)
      sys.exit(3)
      """)]
  sender = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f"""\
      import os, time
      while not os.path.exists({str(ready)!r}):
        time.sleep(0.05)
      os.kill({os.getpid()}, {int(signum)})
      """)])
  before = signal.getsignal(signum)
  try:
    code = supervisor.supervise([], program=program)
  finally:
    sender.kill()
    sender.wait()
  assert code == preemption.EXIT_PREEMPTED
  assert signal.getsignal(signum) is before
  capfd.readouterr()


# A worker of a three-process run: process 0's asks its supervisor for the
# hub and shares the address through a file (as the broadcast would), each
# reports its identity and beats until the file `crash` appears, then dies
# as a survivor does inside a collective. Like the product's watchdog, the
# beat ignores a hub that stopped answering (process 0 killed before `crash`
# appears); otherwise the worker would die of its own traceback first.
_POD_WORKER = textwrap.dedent("""\
    import json, os, sys, time
    from jaxssl import peer_hub, supervisor
    supervisor.become_worker()
    index, folder = int(sys.argv[1]), sys.argv[2]
    path = lambda name: os.path.join(folder, name)
    if index == 0:
      with open(path('hub.tmp'), 'w') as f:
        json.dump(supervisor.serve_hub('127.0.0.1'), f)
      os.replace(path('hub.tmp'), path('hub'))
    while not os.path.exists(path('hub')):
      time.sleep(0.05)
    port, token = json.load(open(path('hub')))
    hub = peer_hub.HubClient(['127.0.0.1'], port, token, 2.)
    supervisor.report_identity(index, 3, hub, 0.2)
    with open(path(f'pid{index}.tmp'), 'w') as f:
      f.write(str(os.getpid()))
    os.replace(path(f'pid{index}.tmp'), path(f'pid{index}'))
    beat = 0
    while not os.path.exists(path('crash')):
      beat += 1
      try:  # as jaxssl.distributed's watchdog beats: a dead hub is no crash
        hub.exchange({f'beat/{index}': str(beat)})
      except ConnectionError:
        pass
      time.sleep(0.2)
    """) + _GLOO_ABORT


def _start_pod_of_supervisors(folder):
  """Three supervisor processes, each over a `_POD_WORKER`."""
  supervisors = []
  for index in range(3):
    program = [sys.executable, '-c', _POD_WORKER, str(index), str(folder)]
    code = ('import sys\nfrom jaxssl import supervisor\n'
            f'sys.exit(supervisor.supervise([], program={program!r}))')
    supervisors.append(subprocess.Popen(
        [sys.executable, '-c', code], stderr=subprocess.PIPE, text=True))
  for index in range(3):
    _wait_for_file(folder / f'pid{index}')
  return supervisors


def _wait_for_file(path, timeout=60):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f'{path} never appeared'
    time.sleep(0.05)


@pytest.mark.parametrize('victim,how', [(1, 'process'), (0, 'process'),
                                        (2, 'worker')])
def test_three_processes_survivors_name_the_lost_one(tmp_path, victim, how):
  # 'process': the victim's supervisor is killed, its worker dies with it;
  # 'worker': only the worker is killed (as by the OOM killer), and its
  # supervisor says so. Either way the survivors, whose crash output names
  # nobody, agree through the hub on which process was lost.
  supervisors = _start_pod_of_supervisors(tmp_path)
  try:
    if how == 'process':
      supervisors[victim].kill()
    else:
      os.kill(int((tmp_path / f'pid{victim}').read_text()), signal.SIGKILL)
    supervisors[victim].wait(30)
    (tmp_path / 'crash').touch()
    started = time.monotonic()
    survivors = [q for q in range(3) if q != victim]
    codes = [supervisors[q].wait(60) for q in survivors]
    elapsed = time.monotonic() - started
    errs = [supervisors[q].stderr.read() for q in survivors]
  finally:
    for p in supervisors:
      if p.poll() is None:
        p.kill()
      p.wait()
  assert codes == [supervisor.EXIT_PEER_LOST] * 2, errs
  expected = (f'jaxssl: error: lost process {victim} of 3: a cross-process '
              'collective lost its connection (it was killed, crashed or was '
              'preempted); stopping this process too (restart every process '
              'with the same --workdir to resume from the last checkpoint)')
  for err in errs:
    assert err.splitlines() == ['a warning of the healthy run', expected]
  assert elapsed < 10, elapsed  # no survivor waited out the whole wait
