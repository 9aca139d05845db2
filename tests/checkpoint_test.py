"""Checkpoint integrity: checksums on save, fallback past a damaged newest step.

One tiny run (checkpoints at steps 4 and 8) is copied for each test; step 8
of the copy is damaged the way a pod's storage or a killed writer damages
files, and the restore must skip it with a one-line warning, restore step 4
bit for bit, and set step 8 aside (never delete it).
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import restore_state, tiny_factory
from jaxssl import checkpoint
from jaxssl import encoder_export
from jaxssl import evaluate
from jaxssl import parallel
from jaxssl import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('simclr_tiny', fashion_mnist_dir,
                      eval_after_training=False)


@pytest.fixture(scope='module')
def trained(tiny, tmp_path_factory):
  """A finished tiny run with checkpoints 4 and 8, and their states."""
  workdir = str(tmp_path_factory.mktemp('ckpt') / 'run')
  train.run(tiny(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']
  return workdir, {step: restore_state(tiny(), workdir, step)
                   for step in (4, 8)}


def _data_files(step_dir):
  return glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'),
                   recursive=True)


def _truncate(step_dir):
  for name in _data_files(step_dir):
    with open(name, 'r+b') as f:
      f.truncate(os.path.getsize(name) // 2)


def _zero_fill(step_dir):
  for name in _data_files(step_dir):
    size = os.path.getsize(name)
    with open(name, 'wb') as f:
      f.write(b'\0' * size)


def _flip_a_byte(step_dir):
  for name in _data_files(step_dir):
    with open(name, 'rb') as f:
      data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    with open(name, 'wb') as f:
      f.write(bytes(data))


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)


def _wrong_checksum(step_dir):
  """A readable step whose arrays differ from what was saved."""
  path = os.path.join(step_dir, 'meta', 'metadata')
  with open(path) as f:
    meta = json.load(f)
  key = 'params/encoder/conv1/kernel'
  assert key in meta['checksums']
  meta['checksums'][key] ^= 1
  _write(path, json.dumps(meta))


DAMAGE = {
    'deleted meta item': lambda d: shutil.rmtree(os.path.join(d, 'meta')),
    'deleted array directories': lambda d: [
        shutil.rmtree(p) for p in glob.glob(
            os.path.join(d, 'state', '**', 'd'), recursive=True)],
    'truncated array files': _truncate,
    'zero-filled array files': _zero_fill,
    'flipped byte in array files': _flip_a_byte,
    'garbage JSON meta': lambda d: _write(os.path.join(d, 'meta', 'metadata'),
                                          '{"config": [1, 2'),
    'empty sharding file': lambda d: _write(
        os.path.join(d, 'state', '_sharding'), ''),
    'checksum mismatch': _wrong_checksum,
}

REASONS = {
    'deleted meta item': 'its meta is unreadable',
    'deleted array directories': 'is unreadable',
    'truncated array files': 'is unreadable',
    'zero-filled array files': 'is unreadable',
    'flipped byte in array files': 'is unreadable',
    'garbage JSON meta': 'its meta is unreadable (JSONDecodeError',
    'empty sharding file': 'its array metadata is unreadable',
    'checksum mismatch': 'checksum mismatch in params/encoder/conv1/kernel',
}


def _copy(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained[0], workdir)
  return workdir


def _restore(tiny, workdir):
  s = train.setup(tiny())
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  try:
    state, start = train.restore_or_init(s, ckpt)
  finally:
    ckpt.close()
  return jax.device_get(state), start


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_damaged_newest_step_falls_back_to_the_previous_good_one(
    tiny, trained, tmp_path, capsys, kind):
  workdir = _copy(trained, tmp_path)
  DAMAGE[kind](os.path.join(workdir, 'checkpoints', '8'))
  state, start = _restore(tiny, workdir)
  assert start == 4
  _assert_same(state, trained[1][4])
  warnings = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith('jaxssl: warning: skipping')]
  assert len(warnings) == 1
  assert warnings[0].startswith(
      f'jaxssl: warning: skipping checkpoint step 8 in {workdir}/checkpoints: ')
  assert REASONS[kind] in warnings[0]
  # Set aside, not deleted; the next run saves a fresh step 8.
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', '8'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4']


def test_left_over_temporary_directory_is_ignored(tiny, trained, tmp_path,
                                                  capsys):
  workdir = _copy(trained, tmp_path)
  partial = os.path.join(workdir, 'checkpoints',
                         '12.orbax-checkpoint-tmp-1234')
  shutil.copytree(os.path.join(workdir, 'checkpoints', '8'), partial)
  os.remove(os.path.join(partial, 'commit_success.txt'))
  _truncate(partial)
  state, start = _restore(tiny, workdir)
  assert start == 8
  _assert_same(state, trained[1][8])
  assert 'skipping' not in capsys.readouterr().err


def test_no_good_step_is_one_line_and_leaves_the_files(tiny, trained,
                                                       tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in ('4', '8'):
    _zero_fill(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(ValueError) as error:
    _restore(tiny, workdir)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(f'no usable checkpoint in {workdir}/checkpoints '
                            '(step 8: ')
  assert '; step 4: ' in message and 'the files are left as they are' in message
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_damaged'))


@pytest.mark.parametrize('kind', ['flipped byte in array files',
                                  'checksum mismatch', 'garbage JSON meta',
                                  'deleted array directories'])
def test_eval_and_export_read_the_newest_intact_encoder(trained, tmp_path,
                                                       capsys, kind):
  # --mode=eval and --mode=export on a workdir read the encoder from the
  # checkpoints (prefer_export=False is the export's path): they skip a
  # damaged newest step as the trainer does, but move nothing.
  workdir = _copy(trained, tmp_path)
  DAMAGE[kind](os.path.join(workdir, 'checkpoints', '8'))
  spec, _, variables = evaluate.load_encoder(
      workdir, parallel.make_mesh(), prefer_export=False)
  assert spec['step'] == 4
  state = trained[1][4]
  _assert_same(jax.device_get(variables),
               {'params': state.params['encoder'],
                'batch_stats': state.batch_stats['encoder']})
  warnings = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith('jaxssl: warning: ')]
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(
      f'jaxssl: warning: skipping checkpoint step 8 in {workdir}/checkpoints: ')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']


def test_eval_of_a_workdir_without_an_intact_step_is_one_line(trained,
                                                              tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in ('4', '8'):
    _wrong_checksum(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(ValueError) as error:
    evaluate.load_encoder(workdir, parallel.make_mesh(), prefer_export=False)
  assert str(error.value) == (
      f'no usable checkpoint in {workdir}/checkpoints (step 8: checksum '
      'mismatch in params/encoder/conv1/kernel; step 4: checksum mismatch in '
      'params/encoder/conv1/kernel)')


def test_checksums_are_recorded_for_every_array(trained):
  workdir, states = trained
  with open(os.path.join(workdir, 'checkpoints', '8', 'meta',
                         'metadata')) as f:
    saved = json.load(f)['checksums']
  assert saved == checkpoint.array_checksums(states[8])
  assert len(saved) == len(jax.tree.leaves(states[8]))
  assert saved != checkpoint.array_checksums(states[4])


def test_a_non_finite_state_is_never_saved(trained, tmp_path):
  state = jax.device_get(trained[1][8])
  bad = state.replace(params=jax.tree.map(
      lambda x: np.full_like(x, np.nan), state.params))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run'), keep=2)
  with pytest.raises(checkpoint.NonFiniteStateError,
                     match=r'^the state at step 9 is not finite: params/'
                     r'\S+ holds NaN or infinity; not saved, the last good '
                     'checkpoint in'):
    ckpt.save(9, bad, {'config': {}})
  ckpt.wait()
  assert ckpt.latest_step() is None
  ckpt.close()


def _export_process(workdir, data_dir):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.Popen(
      [sys.executable, '-m', 'jaxssl.main', '--mode=export',
       '--config=configs/simclr_tiny.py', f'--workdir={workdir}',
       f'--config.dataset.data_dir={data_dir}'],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(process, ready, timeout=300.0):
  """SIGKILLs `process` as soon as `ready()` (polled every 2 ms) holds."""
  deadline = time.monotonic() + timeout
  while not ready():
    assert process.poll() is None, process.stderr.read().decode()
    assert time.monotonic() < deadline
    time.sleep(0.002)
  process.send_signal(signal.SIGKILL)
  process.wait()


def test_a_killed_export_leaves_the_old_or_the_new_one(trained, tmp_path,
                                                       fashion_mnist_dir):
  workdir = _copy(trained, tmp_path)
  export = os.path.join(workdir, 'export')
  spec = encoder_export.read_export_spec(export)
  state = trained[1][8]
  expected = {'params': state.params['encoder'],
              'batch_stats': state.batch_stats['encoder']}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          expected)
  _assert_same(encoder_export.load_exported_variables(export, abstract), expected)
  # A real SIGKILL while orbax writes the new export (the window lasts as
  # long as the write).
  _kill_when(_export_process(workdir, fashion_mnist_dir),
             lambda: bool(glob.glob(export + '.incoming*')))
  assert encoder_export.read_export_spec(export) == spec
  _assert_same(encoder_export.load_exported_variables(export, abstract), expected)
  # A kill after the new export is complete and before the swap: that
  # window is microseconds long, too short to hit with a signal every time
  # (a fresh-clone run missed it once), so the test makes what such a kill
  # leaves on disk: a complete `export.incoming` beside the old export.
  shutil.rmtree(export + '.incoming', ignore_errors=True)
  shutil.copytree(export, export + '.incoming')
  assert encoder_export.read_export_spec(export) == spec
  _assert_same(encoder_export.load_exported_variables(export, abstract), expected)
  # The next export completes and cleans up what the killed ones left.
  process = _export_process(workdir, fashion_mnist_dir)
  assert process.wait() == 0, process.stderr.read().decode()
  _assert_same(encoder_export.load_exported_variables(export, abstract), expected)
  assert sorted(os.listdir(workdir)) == sorted(
      os.listdir(trained[0]))


def test_a_restart_that_changes_the_seed_is_refused(tiny, trained, tmp_path,
                                                    capsys):
  workdir = _copy(trained, tmp_path)
  with pytest.raises(ValueError, match=r'^seed was 0 at checkpoint step 8 and '
                     r'is 1 now: resuming would silently change'):
    train.run(tiny(seed=1), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']
  # Harmless keys resume; the flag accepts a guarded change.
  assert train.run(tiny(log_every_steps=1), workdir)['step'] == 8
  assert train.run(tiny(seed=1), workdir,
                   allow_config_change=True)['step'] == 8
  assert 'resuming anyway (--allow_config_change)' in capsys.readouterr().err
