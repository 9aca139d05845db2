"""The command line: one-line errors before compiling, export, eval, preview."""

import os
import subprocess
import sys

import pytest
from etils import epath

from helpers import load_config
from jaxssl import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jaxssl(*args, data_dir):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.run(
      [sys.executable, '-m', 'jaxssl.main', '--config=configs/simclr_tiny.py',
       f'--config.dataset.data_dir={data_dir}', *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('flag, message', [
    ('--config.global_batch_size=36',
     'jaxssl: error: global_batch_size=36 is not divisible by the device '
     'count 8; use a multiple of 8'),
    ('--config.simclr.temperature=0',
     'jaxssl: error: simclr.temperature=0.0 must be > 0'),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, fashion_mnist_dir,
                                                  flag, message):
  workdir = tmp_path / 'run'
  result = _jaxssl(f'--workdir={workdir}', flag, data_dir=fashion_mnist_dir)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == message
  assert not (workdir / 'checkpoints').exists()


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
