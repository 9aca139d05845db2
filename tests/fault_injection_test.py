"""Fault injection: a tiny run, killed again and again, ends bit-identical.

`python -m jaxssl.main` runs as a user would run it and is stopped with
SIGKILL (no warning: at random moments and once inside a checkpoint write)
or SIGTERM (a preemption: at random moments and once inside a checkpoint
write); each restart resumes from the newest complete checkpoint, and the
last one finishes the run. The final state must equal, bit for bit, the
state of one uninterrupted run. The moments come from a seeded generator,
so a failure can be replayed; every process shares one compilation cache.
"""

import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from helpers import restore_state
from helpers import tiny_factory
from jaxssl import checkpoint
from jaxssl import preemption
from jaxssl import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = {'eval_after_training': False, 'num_train_steps': 12,
       'checkpoint_every_steps': 2, 'log_every_steps': 1,
       'keep_checkpoints': 2}
STEP_TIMEOUT_S = 300  # a cold start compiles on a busy 2-core machine


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('simclr_tiny', fashion_mnist_dir, **RUN)


@pytest.fixture(scope='module')
def uninterrupted(tiny, tmp_path_factory):
  """The final state of one run that nothing interrupts."""
  config = tiny()
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  train.train(train.setup(config), workdir)
  return restore_state(config, workdir, config.num_train_steps)


class _Run:
  """Starts and restarts the CLI on one workdir, logs in numbered files."""

  def __init__(self, workdir: epath.Path, data_dir: str):
    self.workdir = workdir
    self.checkpoints = workdir / 'checkpoints'
    self.data_dir = data_dir
    self.starts = 0

  def start(self) -> subprocess.Popen:
    self.starts += 1
    cache = jax.config.jax_compilation_cache_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAXSSL_')}
    env.update(XLA_FLAGS='--xla_force_host_platform_device_count=8',
               JAX_PLATFORMS='cpu',
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               **({'JAX_COMPILATION_CACHE_DIR': cache} if cache else {}))
    command = [sys.executable, '-m', 'jaxssl.main',
               '--config=configs/simclr_tiny.py', f'--workdir={self.workdir}',
               f'--config.dataset.data_dir={self.data_dir}',
               *(f'--config.{k}={v}' for k, v in RUN.items())]
    with open(self.log('out'), 'w') as out, open(self.log('err'), 'w') as err:
      return subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                              stderr=err)

  def log(self, kind: str) -> epath.Path:
    return self.workdir.parent / f'{kind}{self.starts}'

  def latest_step(self) -> int:
    return checkpoint.Checkpointer(str(self.workdir), keep=2).latest_step() or 0

  def wait_for_step(self, process, step: int) -> None:
    """Returns once the progress line of `step` (or a later one) is out."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
      done = re.findall(r'^step (\d+)/', self.log('out').read_text(), re.M)
      if done and int(done[-1]) >= step:
        return
      time.sleep(0.01)
    raise AssertionError(f'step {step} never came: '
                         f'{self.log("err").read_text()[-2000:]}')

  def signal_during_a_write(self, process, signum: int) -> bool:
    """Sends `signum` while orbax writes a checkpoint (a temporary folder).

    Returns:
      Whether the temporary folder was still there after the signal, that
      is, whether the signal certainly landed inside the write.
    """
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
      if self.checkpoints.exists() and self._writing():
        process.send_signal(signum)
        return self._writing()
      time.sleep(0.001)
    raise AssertionError('no checkpoint write was seen')

  def _writing(self) -> bool:
    return any('tmp' in p.name for p in self.checkpoints.iterdir())


def _resumed_from(run: _Run) -> int:
  found = re.search(r'resuming from step (\d+)|from scratch',
                    run.log('out').read_text())
  assert found, run.log('err').read_text()[-2000:]
  return int(found.group(1) or 0)


def _finish(run: _Run, uninterrupted, config) -> None:
  expected_start = run.latest_step()
  process = run.start()
  assert process.wait(STEP_TIMEOUT_S + 120) == 0, run.log('err').read_text()
  assert _resumed_from(run) == expected_start
  final = restore_state(config, str(run.workdir), config.num_train_steps)
  jax.tree.map(np.testing.assert_array_equal, final, uninterrupted)


def test_sigkill_at_random_moments_resumes_bit_identical(
    tiny, uninterrupted, tmp_path, fashion_mnist_dir):
  rng = random.Random(8)
  run = _Run(tmp_path / 'run', fashion_mnist_dir)
  landed_in_write = []
  for kill in range(3):
    before = run.latest_step()
    process = run.start()
    if kill == 1:
      run.wait_for_step(process, before + 1)
      landed_in_write.append(run.signal_during_a_write(process,
                                                       signal.SIGKILL))
    else:
      run.wait_for_step(process, rng.randint(before + 1, 9))
      time.sleep(rng.uniform(0, 0.5))
      process.send_signal(signal.SIGKILL)
    assert process.wait(60) == -signal.SIGKILL
    assert _resumed_from(run) == before
  assert landed_in_write == [True]
  _finish(run, uninterrupted, tiny())


def test_sigterm_at_random_moments_saves_and_resumes_bit_identical(
    tiny, uninterrupted, tmp_path, fashion_mnist_dir):
  rng = random.Random(15)
  run = _Run(tmp_path / 'run', fashion_mnist_dir)
  for stop in range(2):
    before = run.latest_step()
    process = run.start()
    if stop == 0:
      run.wait_for_step(process, before + 1)
      assert run.signal_during_a_write(process, signal.SIGTERM)
    else:
      run.wait_for_step(process, rng.randint(before + 1, 10))
      time.sleep(rng.uniform(0, 0.5))
      process.send_signal(signal.SIGTERM)
    assert process.wait(120) == preemption.EXIT_PREEMPTED
    err = run.log('err').read_text()
    assert 'Traceback' not in err
    saved = run.latest_step()
    assert saved > before
    assert err.strip().splitlines()[-1] == (
        f'jaxssl: stopped by SIGTERM after step {saved}; its checkpoint is '
        f'saved in {run.checkpoints}; rerun the same command to resume from '
        f'step {saved}')
    assert _resumed_from(run) == before
  _finish(run, uninterrupted, tiny())
