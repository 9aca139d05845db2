"""Preemption: a real SIGTERM or SIGINT stops the loop after a step, saved.

The command-line behaviour (exit status, the one line, resuming to the same
bits) is in fault_injection_test.py; two processes in multihost_test.py.
"""

import dataclasses
import os
import signal

import jax
import numpy as np
import pytest

from helpers import restore_state
from helpers import tiny_factory
from jaxssl import checkpoint
from jaxssl import preemption
from jaxssl import train


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('simclr_tiny', fashion_mnist_dir,
                      eval_after_training=False)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_becomes_a_stop_request(signum):
  before = signal.getsignal(signum)
  with preemption.StopRequests() as stop:
    assert not stop.requested and not stop.should_stop()
    os.kill(os.getpid(), signum)
    assert stop.requested and stop.should_stop()
    assert stop.reason() == signal.Signals(signum).name
  assert signal.getsignal(signum) is before


def test_a_second_sigint_interrupts_at_once():
  # What the handler was before depends on the process (an xdist worker
  # may ignore SIGINT); it must be back afterwards, whatever it was.
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    with preemption.StopRequests() as stop:
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.requested
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


def _signalling_at(s: train.Setup, step: int, signum: int) -> train.Setup:
  """`s` whose train step sends `signum` to this process during `step`."""
  calls = []

  def train_step(state, batch):
    calls.append(None)
    if len(calls) == step:
      os.kill(os.getpid(), signum)
    return s.train_step(state, batch)
  return dataclasses.replace(s, train_step=train_step)


@pytest.mark.parametrize('signum, at_step', [(signal.SIGTERM, 3),
                                             (signal.SIGINT, 4)])
def test_stop_saves_that_step_and_resumes_exactly(tiny, tmp_path, signum,
                                                  at_step):
  # checkpoint_every_steps=4: step 3 is saved only because of the signal,
  # step 4 is saved anyway (and not twice).
  config = tiny()
  s = train.setup(config)
  straight = str(tmp_path / 'straight')
  train.train(s, straight)
  workdir = str(tmp_path / 'stopped')
  handler = signal.getsignal(signum)
  with pytest.raises(preemption.Preempted) as stopped:
    train.train(_signalling_at(s, at_step, signum), workdir)
  name = signal.Signals(signum).name
  assert stopped.value.step == at_step
  assert str(stopped.value) == (
      f'stopped by {name} after step {at_step}; its checkpoint is saved in '
      f'{workdir}/checkpoints; rerun the same command to resume from step '
      f'{at_step}')
  assert checkpoint.Checkpointer(workdir, keep=2).latest_step() == at_step
  assert signal.getsignal(signum) is handler  # restored
  resumed = train.train(s, workdir)
  assert int(resumed.step) == config.num_train_steps
  jax.tree.map(np.testing.assert_array_equal,
               restore_state(config, workdir, config.num_train_steps),
               restore_state(config, straight, config.num_train_steps))
