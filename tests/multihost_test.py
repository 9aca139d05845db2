"""A simulated pod: real processes on 127.0.0.1, 2 or 4 CPU devices each.

Covers: 2 processes × 4 devices train like 1 process × 8 devices at the same
global batch and seed (losses and parameters); each process reads only its
half of the train split; a 2-process checkpoint resumes in a 1-process run
and continues like an uninterrupted one; killing any process of two or
three, or an error in one, stops the others within 60 s with one line that
names the lost process; SIGTERM to either or both stops both after the same
step, saved; each process draws the same labelled fraction for fine-tuning.

The processes run `python -m jaxssl.main` exactly as a user would; the
1-process twins run in this (8-device) test process.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import load_config
from jaxssl import checkpoint
from jaxssl import datasets
from jaxssl import distributed
from jaxssl import evaluate
from jaxssl import input_pipeline
from jaxssl import parallel
from jaxssl import preemption
from jaxssl import supervisor
from jaxssl import train
from jaxssl.evaluation import supervised

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fixing the shard count makes the data order that of any process count.
POD = {'dataset.num_shards': 2, 'log_every_steps': 1,
       'eval_after_training': False}
STARTUP_TIMEOUT_S = 420  # two processes compiling on a busy 2-core machine
PEER_EXIT_BOUND_S = 60  # the specification


@pytest.fixture(scope='module')
def data_dir(fashion_mnist_dir):
  """Prepares Fashion-MNIST once here, before processes race to do it."""
  datasets.get_builder(load_config(
      'simclr_tiny', **{'dataset.data_dir': fashion_mnist_dir}).dataset)
  return fashion_mnist_dir


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_pod(workdir, data_dir, logs, overrides, per_process=None, *,
               count=2, devices=4):
  """Starts `count` processes of `jaxssl.main` × `devices`; returns Popens."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAXSSL_')}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  # Process 0 gets the flags, the others the equivalent JAXSSL_* variables.
  settings = [([f'--coordinator_address=127.0.0.1:{port}',
                f'--num_processes={count}', '--process_id=0'], {})]
  settings += [([], {distributed.ENV_COORDINATOR_ADDRESS: f'127.0.0.1:{port}',
                     distributed.ENV_NUM_PROCESSES: str(count),
                     distributed.ENV_PROCESS_ID: str(q)})
               for q in range(1, count)]
  processes = []
  for i, (process_args, process_env) in enumerate(settings):
    args = [f'--config.{k}={v}' for k, v in {**POD, **overrides}.items()]
    args += (per_process or {}).get(i, [])
    command = [sys.executable, '-m', 'jaxssl.main',
               '--config=configs/simclr_tiny.py', f'--workdir={workdir}',
               f'--config.dataset.data_dir={data_dir}', *args, *process_args]
    with open(logs / f'out{i}', 'w') as out, open(logs / f'err{i}', 'w') as err:
      processes.append(subprocess.Popen(command, cwd=REPO,
                                        env={**env, **process_env},
                                        stdout=out, stderr=err))
  return processes


def _wait_all(processes, timeout):
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(max(1, deadline - time.monotonic())) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()


def _read(logs, name):
  return (logs / name).read_text()


def _event_losses(workdir) -> dict[int, float]:
  """`{step: loss}` from the TensorBoard event files in `workdir`."""
  losses = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents*'))):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag == 'loss':
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def _assert_close(actual, expected):
  """float32 twins: rtol 1e-5 and atol 1e-5 × the reference's max |value|."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected),
                  strict=True):
    e = np.asarray(e, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=1e-5,
                               atol=1e-5 * max(np.max(np.abs(e)), 1e-30))


def test_two_processes_train_like_one_and_resume_on_one(data_dir, mesh8,
                                                        tmp_path):
  # Cross-process all-reduces (gloo) sum in another order than the in-process
  # CPU collectives, so the twins agree to float32 rounding, not bitwise.
  overrides = {'num_train_steps': 6, 'checkpoint_every_steps': 2,
               'keep_checkpoints': 3}
  pod_dir = tmp_path / 'pod'
  codes = _wait_all(_start_pod(pod_dir, data_dir, tmp_path, overrides),
                    STARTUP_TIMEOUT_S)
  assert codes == [0, 0], _read(tmp_path, 'err0') + _read(tmp_path, 'err1')
  out0, out1 = _read(tmp_path, 'out0'), _read(tmp_path, 'out1')
  assert 'step 6/6 | loss' in out0 and '2 process(es)' in out0
  assert f'exported the encoder at step 6 to {pod_dir}/export' in out0
  # Only process 0 speaks and writes summaries.
  assert 'step ' not in out1 and 'exported' not in out1
  assert len(glob.glob(str(pod_dir / 'events.out.tfevents*'))) == 1

  config = load_config('simclr_tiny', **{'dataset.data_dir': data_dir,
                                         **POD, **overrides})
  s = train.setup(config, mesh8)
  single_dir = tmp_path / 'single'
  single = train.train(s, str(single_dir))
  pod_losses, single_losses = _event_losses(pod_dir), _event_losses(single_dir)
  assert sorted(pod_losses) == list(range(1, 7))
  _assert_close([pod_losses[k] for k in range(1, 7)],
                [single_losses[k] for k in range(1, 7)])
  abstract = checkpoint.abstract_with_sharding(
      jax.eval_shape(s.init_fn), parallel.replicated(mesh8))
  pod_final = checkpoint.Checkpointer(str(pod_dir), keep=3).restore(6, abstract)
  _assert_close(jax.device_get(pod_final.params), jax.device_get(single.params))

  # Resume the pod's step-2 checkpoint with 1 process × 8 devices.
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(pod_dir / 'checkpoints', resumed_dir / 'checkpoints')
  for step in (4, 6):
    shutil.rmtree(resumed_dir / 'checkpoints' / str(step))
  resumed = train.train(s, str(resumed_dir))
  resumed_losses = _event_losses(resumed_dir)
  assert sorted(resumed_losses) == [3, 4, 5, 6]
  _assert_close([resumed_losses[k] for k in range(3, 7)],
                [single_losses[k] for k in range(3, 7)])
  assert int(resumed.step) == 6
  _assert_close(jax.device_get(resumed.params), jax.device_get(single.params))
  _assert_close(jax.device_get(resumed.opt_state),
                jax.device_get(single.opt_state))


# Every evaluation of `--mode=eval`, each short.
EVAL = {'linear_eval.protocols': ('fast', 'paper'),
        'linear_eval.paper_num_epochs': 2, 'finetune.fractions': (0.1,),
        'finetune.num_epochs': 2, 'linear_eval.random_init_baseline': False}


def _numbers(tree, path=''):
  """`{path: number}` of every number in a JSON-like tree."""
  if isinstance(tree, dict):
    return {p: v for k, x in tree.items()
            for p, v in _numbers(x, f'{path}/{k}').items()}
  return {path: tree} if isinstance(tree, (int, float)) else {}


def test_two_processes_evaluate_like_one(data_dir, mesh8, tmp_path):
  # Linear (fast and paper), kNN, health and fine-tuning on 10% of the
  # labels of one encoder, by a 2-process pod and by 1 process.
  config = load_config('simclr_tiny', **{'dataset.data_dir': data_dir,
                                         **POD, **EVAL})
  workdir = tmp_path / 'run'
  train.train(train.setup(config, mesh8), str(workdir))
  single = json.loads(json.dumps(evaluate.run(config, str(workdir), mesh8)))
  mode = {0: ['--mode=eval'], 1: ['--mode=eval']}
  codes = _wait_all(_start_pod(workdir, data_dir, tmp_path, EVAL, mode),
                    STARTUP_TIMEOUT_S)
  assert codes == [0, 0], _read(tmp_path, 'err0') + _read(tmp_path, 'err1')
  assert 'linear-paper' in _read(tmp_path, 'out0')
  assert 'evaluation on' not in _read(tmp_path, 'out1')  # process 0 speaks
  pod = json.loads((workdir / 'evaluation.json').read_text())
  got, want = _numbers(pod['encoder']), _numbers(single['encoder'])
  assert set(got) == set(want) and '/finetune/0.1/top1' in want, got
  # The pod sums gradients over gloo, in another order than one process:
  # float32 rounding, far below one test image (1/512 = 0.002), so every
  # accuracy must be the same.
  for path, value in want.items():
    assert got[path] == pytest.approx(value, rel=1e-4, abs=1e-6), path


@pytest.mark.parametrize('cache', [True, False])
def test_each_process_reads_only_its_half(data_dir, monkeypatch, cache):
  config = load_config('simclr_tiny', **{'dataset.data_dir': data_dir,
                                         'dataset.cache': cache, **POD})
  read = []
  get_builder = datasets.get_builder

  def spying_get_builder(dataset_config):
    builder = get_builder(dataset_config)
    as_dataset = builder.as_dataset

    def recording_as_dataset(*args, split=None, **kwargs):
      read.append(str(split))
      return as_dataset(*args, split=split, **kwargs)
    monkeypatch.setattr(builder, 'as_dataset', recording_as_dataset)
    return builder
  monkeypatch.setattr(datasets, 'get_builder', spying_get_builder)

  halves = tfds.even_splits(config.dataset.train_split, n=2)
  local = []
  for p in range(2):
    read.clear()
    batches = input_pipeline.pretrain_batches(config, process_index=p,
                                              process_count=2)
    local.append(next(batches))
    assert read == [str(halves[p])]
    assert local[p]['views'][0].shape[0] == config.global_batch_size // 2
  whole = next(input_pipeline.pretrain_batches(config))
  np.testing.assert_array_equal(
      np.concatenate([b['views'][0] for b in local]), whole['views'][0])
  np.testing.assert_array_equal(
      np.concatenate([b['label'] for b in local]), whole['label'])


def _wait_for(path, text, processes, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if text in path.read_text():
      return
    if any(p.poll() is not None for p in processes):
      break
    time.sleep(0.2)
  raise AssertionError(f'{text!r} never appeared in {path}: '
                       f'{path.read_text()[-2000:]}')


# Three processes × 2 devices share a global batch of 24 in 3 shards.
_THREE = {'num_train_steps': 100_000, 'global_batch_size': 24,
          'dataset.num_shards': 3}


@pytest.mark.parametrize('count,victim', [(3, 1), (2, 0)])
def test_a_killed_process_stops_its_peers_within_60s(data_dir, tmp_path,
                                                     count, victim):
  # Whichever process dies, and wherever the survivors are (their watchdog,
  # or a collective that aborts natively), each survivor's supervisor ends
  # it with one line naming the lost process, and no dump. Of three, the
  # survivors' crash output names nobody: their supervisors agree on the
  # lost one through the hub (jaxssl.peer_fates); of two, process 0's death
  # also takes the hub with it.
  overrides = _THREE if count == 3 else {'num_train_steps': 100_000}
  processes = _start_pod(tmp_path / 'run', data_dir, tmp_path, overrides,
                         count=count, devices=2 if count == 3 else 4)
  survivors = [q for q in range(count) if q != victim]
  try:
    _wait_for(tmp_path / 'out0', 'step 2/', processes, STARTUP_TIMEOUT_S)
    before = {q: _read(tmp_path, f'err{q}') for q in survivors}
    processes[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    codes = [processes[q].wait(PEER_EXIT_BOUND_S + 30) for q in survivors]
    elapsed = time.monotonic() - killed
  finally:
    _wait_all(processes, 1)
  errs = {q: _read(tmp_path, f'err{q}') for q in survivors}
  assert elapsed < PEER_EXIT_BOUND_S, (codes, elapsed, errs)
  assert codes == [supervisor.EXIT_PEER_LOST] * len(survivors), errs
  for q, err in errs.items():
    assert err.startswith(before[q])
    (line,) = err[len(before[q]):].strip().splitlines()
    assert line.startswith(f'jaxssl: error: lost process {victim} of '
                           f'{count}: '), err
    assert line.endswith('restart every process with the same --workdir to '
                         'resume from the last checkpoint)')
    for dump in ('Fatal Python error', 'terminate called', 'Traceback'):
      assert dump not in err


def _stop_pod(workdir, data_dir, logs, signalled, at_step):
  """Starts a pod, sends SIGTERM to `signalled` once `at_step` is out.

  Returns:
    The pod's exit codes and stderr texts.
  """
  # Many steps, rare checkpoints: only the signal ends the run, and only
  # the stop saves. The same settings on restart (they fix the schedule).
  processes = _start_pod(workdir, data_dir, logs,
                         {'num_train_steps': 100_000,
                          'checkpoint_every_steps': 1000})
  try:
    _wait_for(logs / 'out0', f'step {at_step}/', processes, STARTUP_TIMEOUT_S)
    for q in signalled:
      processes[q].send_signal(signal.SIGTERM)
    codes = [p.wait(PEER_EXIT_BOUND_S) for p in processes]
  finally:
    _wait_all(processes, 1)
  return codes, [_read(logs, f'err{q}') for q in range(2)]


def test_sigterm_stops_both_processes_after_the_same_step(data_dir, tmp_path):
  # The signal may reach one process only (the first run) or both (the
  # restart): the per-step agreement stops both after the same step, and
  # both save it; the restart resumes there. One pod per case, two in all.
  workdir = tmp_path / 'run'
  saved = 0
  for attempt, signalled in enumerate([(1,), (0, 1)]):
    codes, errs = _stop_pod(workdir, data_dir, tmp_path, signalled,
                            at_step=saved + 2)
    assert codes == [preemption.EXIT_PREEMPTED] * 2, (signalled, errs)
    if attempt:
      assert f'resuming from step {saved}' in _read(tmp_path, 'out0')
    step = checkpoint.Checkpointer(str(workdir), keep=2).latest_step()
    assert step >= saved + 2
    for q, err in enumerate(errs):
      why = 'SIGTERM' if q in signalled else 'a signal sent to another process'
      assert err.strip().splitlines()[-1] == (
          f'jaxssl: stopped by {why} after step {step}; its checkpoint is '
          f'saved in {workdir}/checkpoints; rerun the same command to resume '
          f'from step {step}'), err
      assert 'Traceback' not in err
    saved = step


def test_an_error_in_one_process_stops_the_other(data_dir, tmp_path):
  # Only process 1 gets a batch its 8 devices cannot split; process 0 goes on
  # to the first collective and would wait there forever.
  processes = _start_pod(tmp_path / 'run', data_dir, tmp_path,
                         {'num_train_steps': 4},
                         per_process={1: ['--config.global_batch_size=36']})
  codes = _wait_all(processes, STARTUP_TIMEOUT_S)
  expected = ('global_batch_size=36 is not divisible by the device count 8 '
              '(2 processes); use a multiple of 8')
  err0, err1 = _read(tmp_path, 'err0'), _read(tmp_path, 'err1')
  assert codes == [1, 1], err0 + err1
  assert err1.strip().splitlines()[-1] == f'jaxssl: error: {expected}'
  assert err0.strip().splitlines()[-1].startswith(
      f'jaxssl: error: process 1 of 2 stopped with an error: {expected}')


# Each process of a 2-process run draws the labelled fraction by itself.
_SUBSET = '''
import hashlib, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
sys.path.insert(0, 'tests')
from helpers import load_config
from jaxssl.evaluation import supervised
config = load_config('simclr_tiny', **{'dataset.data_dir': sys.argv[3]})
_, indices = supervised.labelled_set(config, 0.1)
print(jax.process_index(), hashlib.sha256(indices.tobytes()).hexdigest())
'''


def test_label_fractions_are_the_same_in_every_process(data_dir):
  address = f'127.0.0.1:{_free_port()}'
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAXSSL_')}
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  processes = [subprocess.Popen(
      [sys.executable, '-c', _SUBSET, address, str(q), data_dir], cwd=REPO,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for q in (0, 1)]
  try:
    outs = [p.communicate(timeout=STARTUP_TIMEOUT_S) for p in processes]
  finally:
    _wait_all(processes, 1)
  config = load_config('simclr_tiny', **{'dataset.data_dir': data_dir})
  _, indices = supervised.labelled_set(config, 0.1)
  digest = hashlib.sha256(indices.tobytes()).hexdigest()
  assert [out.split() for out, _ in outs] == [['0', digest], ['1', digest]], (
      [err[-2000:] for _, err in outs])
