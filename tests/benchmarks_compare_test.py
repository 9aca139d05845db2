"""Tests of benchmarks/compare.py and benchmarks/torch_simclr.py.

`python -m benchmarks.compare` explains a missing PyTorch; its worker
protocol runs on simclr_tiny; the ratios are checked on fixed numbers; the
PyTorch step is checked against jaxssl's parameter count and a float64
NT-Xent (skipped without torch). No check is on speed.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import compare
from jaxssl import losses
from jaxssl.bench import harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'simclr_tiny.py')
CIFAR = os.path.join(REPO, 'configs', 'simclr_cifar10.py')


def positive(value) -> bool:
  return isinstance(value, (int, float)) and value > 0



HIDE_TORCH = ("import sys; sys.modules['torch'] = None; "
              'from benchmarks.compare import main; '
              "sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize('how', ['uninstalled', 'env'])
@pytest.mark.parametrize('as_json', [False, True])
def test_compare_explains_missing_torch(how, as_json):
  argv = ['--json'] if as_json else []
  if how == 'uninstalled':
    proc = subprocess.run([sys.executable, '-c', HIDE_TORCH, *argv],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  else:
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.compare', *argv], cwd=REPO,
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, **{compare.HIDE_TORCH_ENV: '1'}))
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  message = (json.loads(proc.stdout)['message'] if as_json
             else proc.stdout)
  assert 'benchmarks/requirements.txt' in message and 'PyTorch' in message


def test_compare_ratios_and_mfu():
  result = {'batch': 64, 'sides': {
      'jaxssl-auto': {'median_step_s': 2.0, 'images_per_s': 32.0,
                      'model_flops': 3e11, 'analytic_flops': 4.5e11,
                      'peak_flops_per_s': 3e11},
      'pytorch': {'median_step_s': 1.0, 'images_per_s': 64.0}}}
  compare._add_ratios(result)  # pylint: disable=protected-access
  sides = result['sides']
  assert sides['jaxssl-auto']['ratio_to_pytorch'] == 0.5
  assert sides['pytorch']['ratio_to_pytorch'] == 1.0
  assert sides['jaxssl-auto']['mfu'] == pytest.approx(0.5)
  assert sides['pytorch']['mfu'] == pytest.approx(1.0)
  assert sides['pytorch']['mfu_analytic'] == pytest.approx(1.5)


def test_compare_jax_worker_serves_steps():
  """The jaxssl worker protocol on simclr_tiny: ready, steps, final."""
  worker = compare.Worker({'side': 'jax', 'name': 'jaxssl-xla', 'impl': 'xla',
                           'config': TINY, 'batch': 8, 'warmup': 0},
                          timeout_s=600)
  try:
    ready = worker.read()
    answer = worker.request({'steps': 2})
    warmed = worker.request({'steps': 1, 'warmup': 2})
    final = worker.close()
  finally:
    if worker.proc.poll() is None:
      worker.proc.kill()
  assert ready['status'] == 'ready' and positive(ready['model_flops'])
  assert len(answer['times_s']) == 2 and all(map(positive, answer['times_s']))
  assert answer['turn_warmup_s'] == []
  assert len(warmed['times_s']) == 1 and len(warmed['turn_warmup_s']) == 2
  assert all(map(positive, warmed['times_s'] + warmed['turn_warmup_s']))
  assert final['compiles_after_first'] == 0
  assert positive(final['peak_flops_per_s'])
  assert positive(final['peak_rss_bytes'])


@pytest.fixture(scope='module')
def torch_step():
  pytest.importorskip('torch')
  from benchmarks import torch_simclr  # pylint: disable=g-import-not-at-top
  return torch_simclr, torch_simclr.SimCLRStep()


def test_torch_model_has_jaxssls_parameters(torch_step, mesh1):
  _, step = torch_step
  config = harness.load_config(CIFAR, batch=8)
  state = jax.eval_shape(harness.synthetic_setup(config, mesh1).init_fn)
  count = lambda tree: sum(int(np.prod(x.shape))
                           for x in jax.tree.leaves(tree))
  trainable = sum(p.numel() for p in step.net.parameters() if p.requires_grad)
  running = sum(b.numel() for name, b in step.net.named_buffers()
                if name.endswith(('running_mean', 'running_var')))
  assert trainable == count(state.params)
  assert running == count(state.batch_stats)


def _nt_xent_float64(z1, z2, temperature):
  """The paper's L: mean over 2N anchors of -log softmax at the positive."""
  h = np.concatenate([z1, z2]).astype(np.float64)
  h /= np.linalg.norm(h, axis=1, keepdims=True)
  logits = h @ h.T / temperature
  np.fill_diagonal(logits, -np.inf)
  n = len(z1)
  positive_col = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
  log_z = np.log(np.exp(logits).sum(axis=1))
  return float(np.mean(log_z - logits[np.arange(2 * n), positive_col]))


@pytest.mark.parametrize('n,dim,temperature', [(4, 8, 0.5), (16, 128, 0.1)])
def test_torch_nt_xent_matches_jaxssl(torch_step, n, dim, temperature):
  import torch  # pylint: disable=g-import-not-at-top
  torch_simclr, _ = torch_step
  rng = np.random.default_rng(n)
  z1 = rng.normal(size=(n, dim)).astype(np.float32)
  z2 = rng.normal(size=(n, dim)).astype(np.float32)
  expected = 2.0 * _nt_xent_float64(z1, z2, temperature)
  theirs = float(torch_simclr.nt_xent(torch.from_numpy(z1),
                                      torch.from_numpy(z2), temperature))
  ours = 2.0 * float(losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2),
                                    temperature))
  assert theirs == pytest.approx(expected, rel=1e-5)
  assert ours == pytest.approx(expected, rel=1e-5)
  assert theirs == pytest.approx(ours, rel=1e-5)
