"""Tests of `python -m jaxssl.bench peak|step|augment|train|input|memory`.

The subcommands run end to end on tiny sizes (simclr_tiny, a few steps);
the checks are on the report's fields and signs, never on speed. FLOP
counts are checked against architecture tables written out here. The
PyTorch comparison (benchmarks/compare.py) is tested in
benchmarks_compare_test.py.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxssl.bench import flops as flops_lib
from jaxssl.bench import harness
from jaxssl.bench import memory
from jaxssl.bench import step as step_lib
from jaxssl.bench import synthetic_train

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


def test_step_compares_each_k_with_one():
  # summarize() on hand-made cases: each k > 1 against its k = 1 twin only.
  def case(k, batch, seconds, rss):
    return {'status': 'ok', 'global_batch_size': batch, 'devices': 1,
            'impl': 'xla', 'accumulation_steps': k, 'median_step_s': seconds,
            'peak_rss_bytes': rss, 'images_per_s': batch / seconds}
  summary = step_lib.summarize([case(1, 64, 1.0, 400), case(4, 64, 1.5, 100),
                                case(4, 128, 3.0, 200)])
  (ratio,) = summary['accumulation']
  assert (ratio['batch'], ratio['k']) == (64, 4)
  assert ratio['step_time_ratio'] == pytest.approx(1.5)
  assert ratio['peak_rss_ratio'] == pytest.approx(0.25)
  assert ratio['device_peak_ratio'] is None
  assert summary['impl_speedup'] == [] and summary['device_cost'] == []


def test_step_with_micro_batches_counts_the_model_flops_of_one_step():
  proc = bench('step', '--json', '--config', TINY, '--batch', '8',
               '--kernels', 'xla', '--accumulation-steps', '1', '2',
               '--steps', '1', '--warmup', '0', '--peak-size', '128')
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout)
  one, two = report['cases']
  assert (one['accumulation_steps'], two['accumulation_steps']) == (1, 2)
  # The scan's body would be counted once: the k = 1 program is counted.
  assert two['model_flops'] == one['model_flops'] > 0
  assert two['flops_impl_xla_count'] < one['flops_impl_xla_count']
  (ratio,) = report['summary']['accumulation']
  assert ratio['k'] == 2 and positive(ratio['step_time_ratio'])


# ---------------------------------------------------------------- memory --


def test_memory_of_micro_batches_is_smaller():
  proc = bench('memory', '--json', '--config', TINY, '--batch', '64',
               '--accumulation-steps', '1', '4')
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout)
  one, four = report['cases']
  assert (one['accumulation_steps'], four['accumulation_steps']) == (1, 4)
  for c in (one, four):
    assert c['status'] == 'ok' and c['global_batch_size'] == 64
    assert c['peak_bytes'] == (c['argument_bytes'] + c['output_bytes']
                               - c['alias_bytes'] + c['temp_bytes'])
  # Activations of 16 examples at a time, not 64.
  assert four['temp_bytes'] < 0.5 * one['temp_bytes']


def test_memory_budget_doubles_until_the_peak_passes_it(monkeypatch):
  # The doubling alone, on a made-up peak of 1 MiB per example per k.
  def fake_case(args, batch, k):
    return {'status': 'ok', 'batch': batch, 'accumulation_steps': k,
            'peak_bytes': batch * memory.MIB // k}
  monkeypatch.setattr(memory, '_case', fake_case)
  args = type('Args', (), dict(
      batch=[8], accumulation_steps=[1, 4], budget_gib=0.1, max_batch=4096,
      config='c', set=[], kernels='xla', dataset_facts='table',
      case_timeout=1.))()
  report = memory.run(args)
  # 0.1 GiB = 102.4 MiB: 64 examples fit at k = 1, 256 at k = 4.
  assert report['largest_batch_under_budget'] == {'1': 64, '4': 256}
  assert [c['batch'] for c in report['cases']] == [8, 16, 32, 64, 128, 8, 16,
                                                   32, 64, 128, 256, 512]


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


# --------------------------------------------------------------- augment --
@pytest.mark.parametrize('recipe,channels', [('quickstart', 1),
                                             ('byol', 3)])
def test_augment_times_both_halves(recipe, channels):
  proc = bench('augment', '--json', '--recipe', recipe, '--sizes', '12',
               '--source-size', '20', '--batch', '4', '--batches', '1',
               '--repeats', '1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert report['ok'] and report['recipe'] == recipe
  (row,) = report['results']
  assert (row['size'], row['source_size'], row['channels']) == (12, 20,
                                                                 channels)
  for field in ('host_img_s', 'device_img_s', 'device_compile_s'):
    assert positive(row[field]), field
  assert row['combined_img_s'] == min(row['host_img_s'], row['device_img_s'])


def test_augment_device_half_alone_reports_no_host_figures():
  proc = bench('augment', '--json', '--recipe', 'simclr', '--sizes', '12',
               '--batch', '4', '--batches', '1', '--repeats', '1',
               '--halves', 'device')
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(proc.stdout)['results']
  assert row['host_img_s'] is None and row['host_timings_s'] == []
  assert positive(row['device_img_s'])
  assert row['combined_img_s'] == row['device_img_s']


# ----------------------------------------------------------------- train --


def test_train_runs_the_step_on_synthetic_data():
  proc = bench('train', '--json', '--config', TINY, '--batch', '8',
               '--steps', '4', '--log-every', '2', '--dataset-facts',
               'table')
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert report['ok'] and report['compiles_after_first'] == 0
  assert [step for step, _ in report['losses']] == [1, 2, 4]
  assert report['loss_finite']
  for field in ('first_call_s', 'images_per_s', 'peak_rss_bytes'):
    assert positive(report[field]), field


def test_synthetic_pool_views_share_their_image():
  config = harness.load_config(TINY, batch=4)
  pool = synthetic_train.synthetic_pool(config, 1, 2)
  assert len(pool) == 2
  (views,) = pool[1]['views']
  assert views.shape == (4, 2, 16, 16, 1) and views.dtype == 'float32'
  assert 0.0 <= views.min() and views.max() <= 1.0
  # Two views of one image differ by at most the view noise.
  assert abs(views[:, 0] - views[:, 1]).max() <= synthetic_train.VIEW_NOISE
  assert list(pool[1]['index']) == [4, 5, 6, 7]


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


# --------------------------------------------------------- dataset facts --


@pytest.mark.parametrize('name', sorted(harness.KNOWN_DATASETS))
def test_known_datasets_table_matches_tfds(name, tmp_path):
  """The no-TensorFlow facts are tfds's own (image shape and classes)."""
  config = harness.load_config(TINY, overrides=[
      f'dataset.name={name!r}', f'dataset.data_dir={str(tmp_path)!r}'])
  table = harness.synthetic_info(config, 'table')
  from_tfds = harness.synthetic_info(config, 'tfds')
  assert (table.image_shape, table.num_classes) == (
      from_tfds.image_shape, from_tfds.num_classes)
  # Unprepared here, so both take the nominal split size.
  assert table == from_tfds


def test_unknown_dataset_without_tfds_is_a_one_line_error():
  config = harness.load_config(TINY, overrides=["dataset.name='mnist'"])
  with pytest.raises(ValueError, match='KNOWN_DATASETS'):
    harness.synthetic_info(config, 'table')
