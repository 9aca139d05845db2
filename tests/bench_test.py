"""Tests of `python -m jaxssl.bench peak|step|input|compare`.

The subcommands run end to end on tiny sizes (simclr_tiny, a few steps);
the checks are on the report's fields and signs, never on speed. FLOP
counts are checked against architecture tables written out here, and the
PyTorch side of `compare` against jaxssl's parameter count and a float64
NT-Xent.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import losses
from jaxssl.bench import compare
from jaxssl.bench import flops as flops_lib
from jaxssl.bench import harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'simclr_tiny.py')
CIFAR = os.path.join(REPO, 'configs', 'simclr_cifar10.py')


def bench(*argv, env=None, timeout=600):
  """Runs `python -m jaxssl.bench ARGV` from the repo root."""
  return subprocess.run([sys.executable, '-m', 'jaxssl.bench', *argv],
                        cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, **(env or {})), timeout=timeout)


def positive(value) -> bool:
  return isinstance(value, (int, float)) and value > 0


# ------------------------------------------------------------------ peak --


def test_peak_json_reports_positive_flops():
  proc = bench('peak', '--json', '--sizes', '128', '--repeats', '2',
               '--min-time-s', '0.01')
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout)
  assert report['ok'] and report['benchmark'] == 'peak'
  assert positive(report['result']['peak_flops_per_s']['float32'])


# ------------------------------------------------------------------ step --


@pytest.fixture(scope='module')
def step_report():
  """One `step --json` run: batch 8 of simclr_tiny on 1 and 2 devices."""
  proc = bench('step', '--json', '--config', TINY, '--batch', '8',
               '--devices', '1', '2', '--kernels', 'xla', '--steps', '2',
               '--warmup', '0', '--peak-size', '128')
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout)


@pytest.mark.parametrize('field', [
    'compile_s', 'first_call_s', 'median_step_s', 'min_step_s',
    'images_per_s', 'views_per_s', 'model_flops', 'model_flops_per_s',
    'peak_flops_per_s', 'mfu', 'peak_rss_bytes'])
def test_step_fields_are_positive(step_report, field):
  assert [c['devices'] for c in step_report['cases']] == [1, 2]
  for case in step_report['cases']:
    assert case['status'] == 'ok', case
    assert positive(case[field]), (field, case[field])


def test_step_does_not_recompile_and_ratios(step_report):
  assert step_report['ok']
  for case in step_report['cases']:
    assert case['compiles_after_first'] == 0
    assert case['jit_cache_size'] in (None, 1)
    assert not case['recompiled'] and case['loss_finite']
    assert case['images_per_s'] == pytest.approx(8 / case['median_step_s'])
    assert case['mfu'] == pytest.approx(
        case['model_flops'] / case['median_step_s']
        / case['peak_flops_per_s'])
  (cost,) = step_report['summary']['device_cost']
  assert (cost['devices'], cost['vs_devices']) == (2, 1)
  assert positive(cost['step_time_ratio'])


def test_timed_steps_counts_recompiles():
  """A jitted step compiles once; a fresh jit per call is caught."""
  def body(state, batch):
    return state + batch, {'loss': jnp.sum(state)}

  jitted = jax.jit(body)
  steady = harness.timed_steps(jitted, jnp.zeros(3), jnp.ones(3),
                               warmup=1, steps=2)
  assert steady['compiles_after_first'] == 0
  assert steady['cache_size'] in (None, 1)
  assert len(steady['step_times_s']) == 2

  def recompiling(state, batch):
    return jax.jit(lambda s, b: body(s, b))(state, batch)

  churn = harness.timed_steps(recompiling, jnp.zeros(3), jnp.ones(3),
                              warmup=1, steps=2)
  assert churn['compiles_after_first'] >= 3


# ----------------------------------------------------------------- flops --


def _resnet18_cifar_macs(side: int, channels: int) -> int:
  """He et al. Table 1's ResNet-18 with a 3x3 stride-1 stem, layer by layer."""
  layers = [(side, 3, channels, 64)]  # (output side, kernel, in, out)
  in_ch = 64
  for stage, out_ch in enumerate((64, 128, 256, 512)):
    if stage:
      side //= 2
    layers += [(side, 3, in_ch, out_ch), (side, 3, out_ch, out_ch),
               (side, 3, out_ch, out_ch), (side, 3, out_ch, out_ch)]
    if in_ch != out_ch:
      layers.append((side, 1, in_ch, out_ch))
    in_ch = out_ch
  return sum(s * s * k * k * i * o for s, k, i, o in layers)


@pytest.mark.parametrize('side,channels', [(32, 3), (16, 1)])
def test_resnet18_cifar_macs_match_layer_table(side, channels):
  assert flops_lib.resnet_conv_macs(
      18, side, in_channels=channels, cifar_stem=True) == (
          _resnet18_cifar_macs(side, channels))


@pytest.mark.parametrize('depth,gmacs', [(18, 1.81), (50, 4.09)])
def test_imagenet_resnet_macs_match_published(depth, gmacs):
  # torchvision's model table (ResNet v1.5, 224 px): 1.81 and 4.09 GMACs,
  # its 1000-way fc (<= 2M MACs) included; within rounding of 2 digits.
  macs = flops_lib.resnet_conv_macs(depth, 224, in_channels=3,
                                    cifar_stem=False)
  assert macs / 1e9 == pytest.approx(gmacs, abs=0.006)


def test_analytic_flops_match_xla_on_resnet18(mesh1):
  """XLA's count of a ResNet-18 step at 256 px is within 5% of 6 x MACs.

  Lowering only (no compile), so the image can be large enough for the
  'SAME' padding to matter little: XLA counts only the kernel taps that
  fall inside the image (at side s, ((3s - 2) / 3s)^2 of a 3x3 conv's
  taps: about 2% fewer MACs over this trunk, 15% at 32 px), and adds
  BatchNorm, ReLU, loss and LARS elementwise work (about 1%).
  """
  config = harness.load_config(CIFAR, batch=8, kernels='xla',
                               overrides=['dataset.image_size=256'])
  s = harness.synthetic_setup(config, mesh1)
  state = jax.eval_shape(s.init_fn)
  batch = harness.synthetic_batch(config, 3, mesh1)
  xla = flops_lib.xla_flops(s.train_step.lower(state, batch))
  analytic = flops_lib.analytic_step_flops(config, 3)
  assert 0.95 <= xla / analytic <= 1.05, (xla, analytic)


# ----------------------------------------------------------------- input --


@pytest.fixture(scope='module')
def input_report(fashion_mnist_dir):
  proc = bench('input', '--json', '--config', TINY, '--batch', '16',
               '--batches', '2', '--warmup', '0', '--steps', '2', '--set',
               f'dataset.data_dir={fashion_mnist_dir!r}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout)


@pytest.mark.parametrize('field', [
    'first_batch_s', 'input_images_per_s', 'step_images_per_s',
    'input_over_step', 'fed_images_per_s', 'fed_over_step'])
def test_input_fields_are_positive(input_report, field):
  assert input_report['ok'] and input_report['result']['status'] == 'ok'
  assert positive(input_report['result'][field])


def test_input_ratio_is_pipeline_over_step(input_report):
  r = input_report['result']
  assert not r['recompiled']
  assert r['input_over_step'] == pytest.approx(
      r['input_images_per_s'] / r['step_images_per_s'])


def test_synthetic_setup_lowers_to_the_trainers_program(
    input_report, fashion_mnist_dir, mesh1):
  """`harness.synthetic_setup` builds the same step as `train.setup`."""
  del input_report  # Prepared the dataset in fashion_mnist_dir.
  from jaxssl import train  # pylint: disable=g-import-not-at-top
  config = harness.load_config(
      TINY, batch=8, overrides=[f'dataset.data_dir={fashion_mnist_dir!r}'])
  ours, theirs = harness.synthetic_setup(config, mesh1), train.setup(
      config, mesh1)
  assert ours.steps_per_epoch == theirs.steps_per_epoch
  state = jax.eval_shape(theirs.init_fn)
  batch = harness.synthetic_batch(config, 1, mesh1)
  assert (ours.train_step.lower(state, batch).as_text()
          == theirs.train_step.lower(state, batch).as_text())


# --------------------------------------------------------------- compare --


HIDE_TORCH = ("import sys; sys.modules['torch'] = None; "
              'from jaxssl.bench.__main__ import main; '
              "sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize('how', ['uninstalled', 'env'])
@pytest.mark.parametrize('as_json', [False, True])
def test_compare_explains_missing_torch(how, as_json):
  argv = ['compare'] + (['--json'] if as_json else [])
  if how == 'uninstalled':
    proc = subprocess.run([sys.executable, '-c', HIDE_TORCH, *argv],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  else:
    proc = bench(*argv, env={compare.HIDE_TORCH_ENV: '1'}, timeout=120)
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  message = (json.loads(proc.stdout)['message'] if as_json
             else proc.stdout)
  assert 'jaxssl[bench]' in message and 'PyTorch' in message


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
  from jaxssl.bench import torch_simclr  # pylint: disable=g-import-not-at-top
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
