"""The command line: one-line errors before compiling, export, eval, preview."""

import json
import os
import re
import subprocess
import sys

import pytest
from etils import epath

from helpers import load_config
from jaxssl import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jaxssl(*args, data_dir):
  """Runs the CLI on configs/simclr_tiny.py (or an `args` `--config=`)."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  config = [a for a in args if a.startswith('--config=')]
  args = [a for a in args if not a.startswith('--config=')]
  return subprocess.run(
      [sys.executable, '-m', 'jaxssl.main',
       *(config or ['--config=configs/simclr_tiny.py']),
       f'--config.dataset.data_dir={data_dir}', *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _misspelt_config_file(tmp_path):
  path = tmp_path / 'misspelt.py'
  path.write_text(
      'import importlib.util\n'
      f'_spec = importlib.util.spec_from_file_location("t", "{REPO}/configs/'
      'simclr_tiny.py")\n'
      '_m = importlib.util.module_from_spec(_spec)\n'
      '_spec.loader.exec_module(_m)\n'
      'def get_config():\n'
      '  c = _m.get_config()\n'
      '  c.optim.base_learing_rate = 5.0\n'
      '  return c\n')
  return f'--config={path}'


# (extra arguments, the one line on stderr); {tmp} is the test's tmp_path.
BAD_INPUTS = [
    (['--config.global_batch_size=36'],
     'global_batch_size=36 is not divisible by the device count 8; use a '
     'multiple of 8'),
    (['--config.simclr.temperature=0'], 'simclr.temperature=0.0 must be > 0'),
    (['--config.optim.base_learing_rate=5'],
     '--config.optim.base_learing_rate: the config declares no key '
     'optim.base_learing_rate; closest declared key: '
     'optim.base_learning_rate'),
    (['--config.zzzq=1'], '--config.zzzq: the config declares no key zzzq; '
     'closest declared key: global_batch_size'),
    (['--config.optim.zzzzz=1'], '--config.optim.zzzzz: the config declares '
     'no key optim.zzzzz; closest declared key: optim.name'),
    (['--config.seed=abc'],
     "bad command line: flag --config.seed=abc: invalid literal for int() "
     "with base 10: 'abc'"),
    (['MISSPELT_FILE'],
     'config key optim.base_learing_rate is not declared (closest declared '
     'key: optim.base_learning_rate); config files may only set the keys of '
     'config_schema.defaults'),
    (['--config.dataset.image_size=100000'],
     'dataset.image_size=100000 must be in 1 .. 4096'),
    (['--config.global_batch_size=4096'],
     'global_batch_size=4096 is larger than the 2048 examples of '
     "dataset.train_split='train[:2048]'; use a smaller batch or a larger "
     'split'),
    (['--config.dataset.eval_test_split=nosuch'],
     "dataset.eval_test_split: bad split 'nosuch' for dataset "
     "'fashion_mnist' (Unknown split 'nosuch'. Should be one of ['train', "
     "'test'].); known splits: train, test"),
    (['--workdir={tmp}/file'],
     '--workdir={tmp}/file is a file; give a directory (it is created if '
     'missing)'),
    (['--workdir={tmp}/file/run'],
     '--workdir={tmp}/file/run is under the file {tmp}/file; give a '
     'directory (it is created if missing)'),
    (['--mode=preview', '--out={tmp}/missing/views.png'],
     '--out={tmp}/missing/views.png: the folder {tmp}/missing does not '
     'exist; create it first'),
    (['--mode=preview', '--out={tmp}'],
     '--out={tmp} is a directory; give a file name'),
    # Evaluation settings, checked before pretraining or evaluating.
    (["--config.linear_eval.protocols=('fast','papr')"],
     "linear_eval.protocols=('fast', 'papr') must be a non-empty tuple of "
     "distinct protocols from 'fast', 'paper'"),
    (['--config.finetune.fractions=(0.01,1.5)'],
     'finetune.fractions=(0.01, 1.5) must be a tuple of numbers in (0, 1], '
     'e.g. (0.01, 0.1)'),
    (['--config.knn_eval.ks=(0,20)'],
     'knn_eval.ks=(0, 20) must be a non-empty tuple of positive integers, '
     'e.g. (20, 200)'),
    (['--config.knn_eval.ks=(20,5000)'],
     'knn_eval.ks=(20, 5000) has a k above the 1024 images of '
     "dataset.eval_train_split='train[:1024]'; use ks <= 1024"),
    (['--mode=eval', '--source={tmp}/nothing'],
     'no encoder in {tmp}/nothing: no exported encoder (a spec file there '
     'or in its export/) and no checkpoints under {tmp}/nothing/checkpoints'),
]


@pytest.fixture(scope='module')
def prepared_data(fashion_mnist_dir):
  """The data_dir with Fashion-MNIST prepared, so no test sees tfds' logs."""
  from jaxssl import datasets  # pylint: disable=g-import-not-at-top
  datasets.dataset_info(load_config(
      'simclr_tiny', **{'dataset.data_dir': fashion_mnist_dir}).dataset)
  return fashion_mnist_dir


@pytest.mark.parametrize('args, message', BAD_INPUTS,
                         ids=[' '.join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, prepared_data,
                                                  args, message):
  (tmp_path / 'file').write_text('not a directory')
  before = sorted(p.name for p in tmp_path.iterdir())
  workdir = tmp_path / 'run'
  args = [_misspelt_config_file(tmp_path) if a == 'MISSPELT_FILE'
          else a.format(tmp=tmp_path) for a in args]
  result = _jaxssl(f'--workdir={workdir}', *args, data_dir=prepared_data)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines() == [
      'jaxssl: error: ' + message.format(tmp=tmp_path)]
  after = sorted(p.name for p in tmp_path.iterdir()
                 if p.name != 'misspelt.py')
  assert after == before  # no workdir, no export, no picture


def test_a_queue_larger_than_memory_is_one_line_before_compiling(
    tmp_path, prepared_data):
  # 2**32 keys of the tiny config's projection: terabytes on any machine.
  workdir = tmp_path / 'run'
  result = _jaxssl('--config=configs/moco_v2_tiny.py', f'--workdir={workdir}',
                   '--config.moco_v2.queue_size=4294967296',
                   data_dir=prepared_data)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, lines
  assert re.fullmatch(
      r'jaxssl: error: moco_v2\.queue_size=4294967296 needs \d+\.\d GiB on '
      r'each device \(queue \[4294967296, \d+\] float32 and logits \[\d+, '
      r'4294967297\]\), more than the \d+\.\d GiB one device has; use a '
      r'smaller value', lines[0]), lines[0]
  assert not workdir.exists()


def test_export_and_eval_modes(tmp_path, fashion_mnist_dir):
  workdir = str(tmp_path / 'run')
  train.run(load_config('simclr_tiny', eval_after_training=False,
                        **{'dataset.data_dir': fashion_mnist_dir}), workdir)
  (epath.Path(workdir) / 'export').rmtree()
  result = _jaxssl('--mode=export', f'--workdir={workdir}',
                   data_dir=fashion_mnist_dir)
  assert result.returncode == 0, result.stderr
  assert f'exported the encoder at step 8 to {workdir}/export' in result.stdout
  result = _jaxssl('--mode=eval', f'--workdir={tmp_path}/elsewhere',
                   f'--source={workdir}/export',
                   '--config.linear_eval.random_init_baseline=False',
                   data_dir=fashion_mnist_dir)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert any(line.startswith('simclr (step 8)') for line in lines)
  assert not any(line.startswith('random init') for line in lines)
  written = json.loads((tmp_path / 'elsewhere' / 'evaluation.json').read_text())
  assert written['spec']['step'] == 8 and written['random_init'] is None
  assert 0 < written['encoder']['linear']['fast']['top1'] <= 1
  # The pictures of any workdir, its encoder read from the checkpoint.
  (epath.Path(workdir) / 'export').rmtree()
  result = _jaxssl('--mode=pictures', f'--workdir={workdir}',
                   data_dir=fashion_mnist_dir)
  assert result.returncode == 0, result.stderr
  for name in ('knn_retrieval.png', 'training_curves.png'):
    assert f'wrote {workdir}/{name}' in result.stdout
    assert (epath.Path(workdir) / name).read_bytes()[:4] == b'\x89PNG'


def test_preview_writes_a_png(tmp_path, fashion_mnist_dir):
  out = tmp_path / 'views.png'
  result = _jaxssl('--mode=preview', f'--out={out}',
                   data_dir=fashion_mnist_dir)
  assert result.returncode == 0, result.stderr
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('script', ['jaxssl-pretrain', 'jaxssl-eval',
                                    'jaxssl-export'])
def test_console_scripts_are_installed(script):
  path = os.path.join(os.path.dirname(sys.executable), script)
  assert os.path.exists(path), f'{script} missing: pip install -e .'
  result = subprocess.run([path, '--helpfull'], capture_output=True,
                          text=True, timeout=120)
  # absl prints the flags of jaxssl.main and exits (with status 1).
  assert '--workdir: Run directory' in result.stdout + result.stderr
  assert 'Traceback' not in result.stderr
