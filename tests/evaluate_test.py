"""Linear-probe pieces: top-k, the classifier fit, encoder specs and loading."""

import jax
import numpy as np
import pytest

from helpers import load_config
from jaxssl import encoder_export
from jaxssl import evaluate
from jaxssl import parallel


@pytest.mark.parametrize('k, expected', [(1, 0.25), (2, 0.75), (3, 1.0)])
def test_topk_accuracy(k, expected):
  logits = np.array([[3., 2., 1.], [1., 3., 2.], [3., 1., 2.], [1., 2., 3.]])
  labels = np.array([0, 2, 1, 1])  # ranks of the labels: 1, 2, 3, 2
  assert evaluate.topk_accuracy(logits, labels, k) == expected


def test_linear_classifier_separates_separable_data():
  rng = np.random.RandomState(0)
  centers = rng.normal(size=(4, 8)) * 4
  labels = rng.randint(0, 4, size=2000)
  x = (centers[labels] + rng.normal(size=(2000, 8))).astype(np.float32)
  le = load_config('simclr_tiny').linear_eval
  params = evaluate.train_linear_classifier(x[:1500], labels[:1500], 4, le,
                                            seed=0)
  logits = x[1500:] @ np.asarray(params['kernel']) + np.asarray(
      params['bias'])
  assert evaluate.topk_accuracy(logits, labels[1500:], 1) > 0.97


def test_classifier_fit_is_deterministic():
  rng = np.random.RandomState(1)
  x = rng.normal(size=(300, 5)).astype(np.float32)
  y = rng.randint(0, 3, size=300)
  le = load_config('simclr_tiny').linear_eval
  a = evaluate.train_linear_classifier(x, y, 3, le, seed=7)
  b = evaluate.train_linear_classifier(x, y, 3, le, seed=7)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_round_trip_and_spec(tmp_path, mesh8):
  config = load_config('simclr_tiny')
  spec = evaluate.encoder_spec(config, num_channels=1, step=12)
  encoder, abstract = evaluate.build_encoder(spec)
  variables = evaluate.random_encoder_variables(encoder, spec, 3, mesh8)
  encoder_export.export_encoder(str(tmp_path / 'export'), variables, spec)
  loaded_spec, _, loaded = evaluate.load_encoder(str(tmp_path / 'export'),
                                                 mesh8)
  assert loaded_spec == spec
  assert jax.tree.structure(loaded) == jax.tree.structure(abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
               jax.device_get(variables))
  leaf = jax.tree.leaves(loaded)[0]
  assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh8), leaf.ndim)


@pytest.mark.parametrize('export_with,load_with', [('cpu', 'xla'),
                                                   ('xla', 'cpu')])
def test_export_loads_and_runs_with_the_other_kernels(tmp_path, mesh1,
                                                      export_with, load_with):
  config = load_config('simclr_tiny')
  spec = evaluate.encoder_spec(config, num_channels=1, step=3)
  assert 'conv_impl' not in spec['model'] and 'kernels' not in spec['model']
  encoder, _ = evaluate.build_encoder(spec, kernels=export_with)
  size = spec['image_size']
  x = np.random.default_rng(0).random((8, size, size, 1)).astype(np.float32)
  variables = evaluate.random_encoder_variables(encoder, spec, 3, mesh1)
  # Non-trivial running statistics: one training-mode pass updates them.
  _, updates = encoder.apply(variables, x, train=True,
                             mutable=['batch_stats'])
  variables = dict(variables, batch_stats=updates['batch_stats'])
  encoder_export.export_encoder(str(tmp_path / 'export'), variables, spec)
  _, loaded_encoder, loaded = evaluate.load_encoder(
      str(tmp_path / 'export'), mesh1, kernels=load_with)
  assert loaded_encoder.conv is not encoder.conv  # the other implementation
  np.testing.assert_allclose(
      loaded_encoder.apply(loaded, x, train=False),
      encoder.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      loaded_encoder.apply(loaded, x, train=True, mutable=['batch_stats'])[0],
      encoder.apply(variables, x, train=True, mutable=['batch_stats'])[0],
      rtol=1e-5, atol=1e-5)


def test_old_spec_with_conv_impl_builds_the_same_encoder():
  spec = evaluate.encoder_spec(load_config('simclr_tiny'), num_channels=1,
                               step=0)
  old = dict(spec, model=dict(spec['model'], conv_impl='im2col'))
  (new_encoder, new_abstract), (old_encoder, old_abstract) = (
      evaluate.build_encoder(spec), evaluate.build_encoder(old))
  assert old_encoder == new_encoder
  assert jax.tree.map(lambda a: a.shape, old_abstract) == jax.tree.map(
      lambda a: a.shape, new_abstract)


def test_missing_export_gives_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoints under'):
    evaluate.load_encoder(str(tmp_path / 'nothing'), parallel.make_mesh())


def test_feature_batch_must_divide_devices(mesh8):
  config = load_config('simclr_tiny', **{'linear_eval.feature_batch_size': 100})
  with pytest.raises(ValueError, match='feature_batch_size=100 must be '
                     'divisible by the device count 8'):
    evaluate.check_eval_config(config, mesh8)


def test_format_results_table():
  r = {'top1': 0.8812, 'top5': 0.9971, 'num_train': 60000, 'num_test': 10000,
       'feature_dim': 128}
  table = evaluate.format_results({
      'dataset': 'fashion_mnist', 'encoder': r,
      'random_init': dict(r, top1=0.8433),
      'spec': {'method': 'simclr', 'step': 700}})
  lines = table.splitlines()
  assert lines[0].startswith('linear eval on fashion_mnist: 60000 train')
  assert '88.12%' in lines[2] and 'simclr (step 700)' in lines[2]
  assert '84.33%' in lines[3] and 'random init' in lines[3]
