"""The supervisor, with small Python workers that behave like dying ones.

The real thing (a killed process of a two-process run) is in
multihost_test.py; here each exit path is driven exactly.
"""

import os
import signal
import subprocess
import sys
import textwrap

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
