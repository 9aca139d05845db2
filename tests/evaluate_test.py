"""`--mode=eval`'s own pieces: encoder specs and loading, checks, the table."""

import jax
import numpy as np
import pytest

from helpers import load_config
from jaxssl import encoder_export
from jaxssl import evaluate
from jaxssl import parallel


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
  with pytest.raises(FileNotFoundError, match='no encoder in .*: no exported encoder'):
    evaluate.load_encoder(str(tmp_path / 'nothing'), parallel.make_mesh())


def test_feature_batch_must_divide_devices(mesh8):
  config = load_config('simclr_tiny', **{'linear_eval.feature_batch_size': 100})
  with pytest.raises(ValueError, match='feature_batch_size=100 must be '
                     'divisible by the device count 8'):
    evaluate.check_eval_config(config, mesh8)


def _entry(linear_top1, knn_top1):
  return {'num_train': 60000, 'num_test': 10000, 'feature_dim': 128,
          'linear': {'fast': {'top1': linear_top1, 'top5': 0.9971}},
          'knn': {'k20': {'top1': knn_top1, 'top5': 0.99},
                  'k200': {'top1': knn_top1 - 0.01, 'top5': 0.99}},
          'health': {'rankme': 45.25, 'alignment': 0.5123,
                     'uniformity': -3.1049},
          'finetune': None}


def test_format_results_table():
  table = evaluate.format_results({
      'dataset': 'fashion_mnist', 'encoder': _entry(0.8812, 0.8544),
      'random_init': _entry(0.8433, 0.7911),
      'spec': {'method': 'simclr', 'step': 700},
      'settings': {'knn_temperature': 0.07, 'health_num_samples': 4096}})
  lines = table.splitlines()
  assert lines[0].startswith('evaluation on fashion_mnist: 60000 train')
  assert lines[1].split() == ['encoder', 'linear-fast', 'top-5', 'kNN-20',
                              'kNN-200', 'RankMe', 'align', 'uniform']
  assert lines[2].split()[:3] == ['simclr', '(step', '700)']
  assert lines[2].split()[3:] == ['88.12%', '99.71%', '85.44%', '84.44%',
                                  '45.2', '0.512', '-3.105']
  assert 'random init' in lines[3] and '84.33%' in lines[3]
  assert '79.11%' in lines[3]
  assert lines[4] == (
      'linear-fast: top-1 and top-5 of those linear protocols '
      '(docs/evaluation.md); kNN-k: top-1 of cosine kNN, votes exp(cos / '
      '0.07); RankMe, alignment, uniformity (t = 2): the first 4096 test '
      'images')


def test_format_results_with_both_protocols_and_fine_tuning():
  entry = dict(_entry(0.8812, 0.8544), knn=None, health=None)
  entry['linear']['paper'] = {'top1': 0.871, 'top5': 0.99}
  entry['finetune'] = {'0.01': {'top1': 0.7512}, '0.1': {'top1': 0.8321}}
  scratch = dict(entry, finetune={'0.01': {'top1': 0.6011},
                                  '0.1': {'top1': 0.7922}})
  table = evaluate.format_results({
      'dataset': 'd', 'encoder': entry, 'random_init': scratch,
      'spec': {'method': 'simclr', 'step': 5}})
  lines = table.splitlines()
  assert lines[1].split() == ['encoder', 'linear-fast', 'top-5',
                              'linear-paper', 'top-5', 'FT-1%', 'FT-10%']
  assert lines[2].split()[-4:] == ['87.10%', '99.00%', '75.12%', '83.21%']
  assert lines[3].split()[-2:] == ['60.11%', '79.22%']
  assert lines[4].startswith('linear-fast, linear-paper: top-1 and top-5')
  assert lines[4].endswith('FT-x%: top-1 after fine-tuning every layer on '
                           'x% of the train labels (the random-init row: '
                           'the same training from scratch)')


def test_format_results_without_knn_or_health():
  entry = dict(_entry(0.5, 0.5), knn=None, health=None)
  table = evaluate.format_results({
      'dataset': 'd', 'encoder': entry, 'random_init': None,
      'spec': {'method': 'byol', 'step': 1}})
  assert table.splitlines()[1].split() == ['encoder', 'linear-fast', 'top-5']
  assert len(table.splitlines()) == 4


def test_knn_k_above_the_train_split_is_refused_before_compiling(
    mesh8, fashion_mnist_dir):
  config = load_config('simclr_tiny', **{'knn_eval.ks': (20, 2000),
                                         'dataset.data_dir': fashion_mnist_dir})
  with pytest.raises(ValueError, match=r'knn_eval.ks=\(20, 2000\) has a k '
                     r'above the 1024 images of dataset.eval_train_split'):
    evaluate.check_eval_config(config, mesh8)
