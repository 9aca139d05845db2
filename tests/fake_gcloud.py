"""A fake `gcloud compute tpus ...` over a tiny simulated TPU world.

tests/launch_up_test.py puts a `gcloud` that runs this file first on PATH.
The world is a directory ($FAKE_WORLD):

  scenario.json   what will happen, written by the test:
      workers        workers per pod (default 2)
      lives          one entry per created pod (the last one repeats):
                     {"exit": N}: the trainer prints three lines, exits N;
                     {"preempt": true}: the first ssh to worker 0 (the log
                       stream) finds the pod preempted; the trainers hang
                       until the pod is deleted;
                     "preempt_on_describe": K: the K-th node describe of
                       this pod finds it preempted;
                     "pip_exit": N: pip (setup) exits N;
                     "drops": K: the first K ssh calls to worker 0 fail
                       with 255 while the pod stays READY;
                     "cut": K: the K calls after those end at once with
                       status 0 (a stream that closed early);
                     "hold": K: the trainer exits only once worker 0 has
                       had K ssh calls.
      create_fails   1-based numbers of the create calls that fail
      existing       a node of that name exists before the test
      queue          the states a queued resource goes through (its last
                     one repeats; default ["ACTIVE"])
  state.json      the world now (node, queued resource, counters)
  calls.jsonl     every gcloud argv, one JSON list a line
  trainer.jsonl   every trainer start: life, worker, argv, TFDS_DATA_DIR
  homes/L/wI      worker I's home directory in the L-th pod

`ssh --command=C` runs C for real with bash in each worker's home, so the
remote scripts of launch/tpu_commands.py are exercised as on a TPU VM; the
venv that setup makes holds a fake python that runs this file as the
trainer. Modes: `fake_gcloud.py gcloud ARGS`, `... python ARGS` (the venv's
python: pip and jaxssl.main), `... python3.11 ARGS` (makes that venv).
"""

import contextlib
import fcntl
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

WORLD = pathlib.Path(os.environ['FAKE_WORLD'])
SSH_TIMEOUT_S = 60  # a hung remote command fails the test, not the run


@contextlib.contextmanager
def world():
  """The world's state, locked; changes are saved on exit."""
  with open(WORLD / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    path = WORLD / 'state.json'
    state = json.loads(path.read_text()) if path.exists() else {
        'node': None, 'qr': None, 'lives': 0, 'creates': 0,
        'describes': 0, 'worker0_ssh': 0}
    if not path.exists() and scenario().get('existing'):
      state['node'] = {'state': 'READY', 'life': 0}  # someone else's pod
    try:
      yield state
    finally:  # also when a command fails (sys.exit) after changing it
      # Replaced whole, so that the trainers' unlocked reads see old or new.
      tmp = WORLD / 'state.json.tmp'
      tmp.write_text(json.dumps(state))
      os.replace(tmp, path)


def scenario():
  return json.loads((WORLD / 'scenario.json').read_text())


def life_spec(life):
  lives = scenario()['lives']
  return lives[min(life, len(lives)) - 1]


def fail(message, code=1):
  print(f'ERROR: (gcloud) {message}', file=sys.stderr)
  sys.exit(code)


def new_life(state):
  """A fresh pod: READY, with empty worker homes."""
  state['lives'] += 1
  state['node'] = {'state': 'READY', 'life': state['lives']}
  state['describes'] = state['worker0_ssh'] = 0
  for worker in range(scenario().get('workers', 2)):
    (WORLD / 'homes' / str(state['lives']) / f'w{worker}').mkdir(parents=True)


def preempt(state):
  """A queued resource's node is deleted; a plain node turns PREEMPTED."""
  if state['qr'] is not None:
    state['node'], state['qr']['states'] = None, ['SUSPENDED']
  else:
    state['node']['state'] = 'PREEMPTED'


def create(state, kind):
  state['creates'] += 1
  if state['creates'] in scenario().get('create_fails', []):
    fail('RESOURCE_EXHAUSTED: no more capacity in the zone')
  if state['node'] is not None or state['qr'] is not None:
    fail('ALREADY_EXISTS: the resource already exists')
  if kind == 'queued-resources':
    state['qr'] = {'states': list(scenario().get('queue', ['ACTIVE']))}
  else:
    new_life(state)


def describe(state, kind):
  if kind == 'queued-resources':
    if state['qr'] is None:
      fail('NOT_FOUND: queued resource not found')
    states = state['qr']['states']
    current = states.pop(0) if len(states) > 1 else states[0]
    if current == 'ACTIVE' and state['node'] is None:
      new_life(state)
    print(current)
    return
  if state['node'] is not None:
    state['describes'] += 1
    spec = life_spec(state['node']['life'])
    if spec.get('preempt_on_describe') == state['describes']:
      preempt(state)
  if state['node'] is None:
    fail('NOT_FOUND: Resource was not found')
  print(state['node']['state'])


def delete(state, kind):
  if kind == 'queued-resources':
    if state['qr'] is None:
      fail('NOT_FOUND: queued resource not found')
    state['qr'] = None
  elif state['node'] is None:
    fail('NOT_FOUND: Resource was not found')
  state['node'] = None


def homes(state, worker):
  """The home directories `--worker=` names, in the current pod."""
  base = WORLD / 'homes' / str(state['node']['life'])
  count = scenario().get('workers', 2)
  return [base / f'w{w}' for w in
          (range(count) if worker == 'all' else [int(worker)])]


def connect(state, worker):
  """The homes to run in, or exits 255 as ssh does without a host."""
  node = state['node']
  if node is not None and node['state'] == 'READY' and worker == '0':
    state['worker0_ssh'] += 1
    spec, call = life_spec(node['life']), state['worker0_ssh']
    drops = spec.get('drops', 0)
    if call <= drops:
      fail('ssh: Connection reset by peer', 255)
    if call <= drops + spec.get('cut', 0):
      sys.exit(0)
    if spec.get('preempt') and call == drops + 1:
      preempt(state)
  if state['node'] is None or state['node']['state'] != 'READY':
    fail('ssh: connect to host 10.0.0.2 port 22: Connection timed out', 255)
  return state['node']['life'], homes(state, worker)


def run_remote(command, home, life, worker):
  """Runs one remote command in `home` as the worker's login shell would."""
  env = {'HOME': str(home), 'PATH': f'{WORLD / "remote-bin"}:/usr/bin:/bin',
         'FAKE_WORLD': str(WORLD), 'FAKE_LIFE': str(life),
         'FAKE_WORKER': str(worker)}
  proc = subprocess.Popen(['bash', '-c', command], cwd=home, env=env,
                          start_new_session=True)
  try:
    return proc.wait(timeout=SSH_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return 124


def gcloud(argv):
  """`gcloud compute tpus KIND VERB NAME ...`."""
  with open(WORLD / 'calls.jsonl', 'a') as f:
    f.write(json.dumps(argv) + '\n')
  assert argv[:2] == ['compute', 'tpus'], argv
  kind, verb = argv[2:4]
  flags = dict(a[2:].split('=', 1) for a in argv if a.startswith('--')
               and '=' in a)
  handlers = {'create': create, 'describe': describe, 'delete': delete}
  if verb in handlers:
    with world() as state:
      handlers[verb](state, kind)
    return 0
  with world() as state:
    life, targets = connect(state, flags.get('worker', '0'))
  if verb == 'scp':
    source, destination = argv[4], argv[5].split(':', 1)[1]
    for home in targets:
      shutil.copy(source, home / destination)
    return 0
  assert verb == 'ssh', argv
  codes = [run_remote(flags['command'], home, life, int(home.name[1:]))
           for home in targets]
  return next((c for c in codes if c), 0)


def state_now():
  """The world's state, read without the lock (it is replaced whole)."""
  return json.loads((WORLD / 'state.json').read_text())


def trainer(argv):
  """The venv's python: `-m pip ...` (setup) or `-m jaxssl.main ...`."""
  life, worker = int(os.environ['FAKE_LIFE']), int(os.environ['FAKE_WORKER'])
  spec = life_spec(life)
  if argv[:2] == ['-m', 'pip']:
    return spec.get('pip_exit', 0)
  with world():  # the lock, for the record file
    with open(WORLD / 'trainer.jsonl', 'a') as f:
      f.write(json.dumps({
          'life': life, 'worker': worker, 'argv': argv,
          'TFDS_DATA_DIR': os.environ.get('TFDS_DATA_DIR')}) + '\n')
  for step in (1, 2, 3):
    print(f'fake jaxssl: pod {life} worker {worker} step {step}', flush=True)
  while state_now()['worker0_ssh'] < spec.get('hold', 0):
    time.sleep(0.05)
  if 'exit' in spec:
    return spec['exit']
  # Preempted: hang like a process on a dead VM until the pod is deleted.
  deadline = time.monotonic() + SSH_TIMEOUT_S
  while time.monotonic() < deadline:
    state = state_now()
    node = state['node']
    if state.get('over') or node is None or node['life'] != life:
      break
    time.sleep(0.05)
  return 137


def python311(argv):
  """The system python3.11: has venv; `-m venv DIR` makes a fake venv."""
  if argv[:2] == ['-m', 'venv']:
    venv_bin = pathlib.Path(argv[2]) / 'bin'
    venv_bin.mkdir(parents=True, exist_ok=True)
    python = venv_bin / 'python'
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} '
                      f'{shlex.quote(os.path.abspath(__file__))} python "$@"\n')
    python.chmod(0o755)
  return 0


if __name__ == '__main__':
  MODES = {'gcloud': gcloud, 'python': trainer, 'python3.11': python311}
  sys.exit(MODES[sys.argv[1]](sys.argv[2:]))
