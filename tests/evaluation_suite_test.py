"""What `--mode=eval` measures: the fixed health sample, and one encoder's
evaluations on 8 devices against 1, on real Fashion-MNIST."""

import numpy as np
import pytest

from helpers import assert_evaluation, tiny_factory
from jaxssl import encoder_export
from jaxssl import evaluate
from jaxssl import input_pipeline
from jaxssl.evaluation import representation
from jaxssl.evaluation import suite


@pytest.fixture
def tiny(fashion_mnist_dir):
  return tiny_factory('simclr_tiny', fashion_mnist_dir)


def test_the_health_sample_is_fixed_whatever_the_batching(tiny):
  config = tiny()
  whole = np.concatenate(list(suite.health_batches(config, 12, 12)))
  pieces = np.concatenate(list(suite.health_batches(config, 12, 5)))
  again = np.concatenate(list(suite.health_batches(config, 12, 12)))
  size = config.dataset.image_size
  assert whole.shape == (12, 3, size, size, 1)
  np.testing.assert_array_equal(whole, pieces)
  np.testing.assert_array_equal(whole, again)
  # The centre crops are the evaluation's own, of the first test images.
  first = next(input_pipeline.eval_batches(
      config, config.dataset.eval_test_split, batch_size=12))
  np.testing.assert_array_equal(whole[:, 0], first['image'])
  # Two different augmented views, each unlike the centre crop.
  for a, b in ((0, 1), (0, 2), (1, 2)):
    assert np.abs(whole[:, a] - whole[:, b]).max(axis=(1, 2, 3)).min() > 0.01
  assert 0.0 <= whole.min() and whole.max() <= 1.0


def test_health_metrics_are_those_of_the_sample_features():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(50, 3, 6)).astype(np.float32)
  got = suite.health_metrics(features)
  assert got == {
      'rankme': float(representation.rankme(features[:, 0])),
      'alignment': float(representation.alignment(features[:, 1],
                                                  features[:, 2])),
      'uniformity': float(representation.uniformity(features[:, 0]))}


def test_one_encoder_on_8_devices_equals_1(tiny, mesh8, mesh1):
  config = tiny(**{'knn_eval.ks': (5, 50), 'health.num_samples': 40,
                   'linear_eval.num_epochs': 2})
  spec = evaluate.encoder_spec(config, num_channels=1, step=0)
  encoder, _ = evaluate.build_encoder(spec)
  results = []
  for mesh in (mesh8, mesh1):
    variables = evaluate.random_encoder_variables(encoder, spec, 0, mesh)
    results.append(suite.evaluate_encoder(config, encoder, variables, mesh,
                                          num_classes=10))
  eight, one = results
  assert_evaluation(dict(eight, knn={'k20': eight['knn']['k5'],
                                     'k200': eight['knn']['k50']}))
  assert eight['knn'] == one['knn']  # fractions of the same 512 votes
  assert eight['linear'] == one['linear']
  for name, value in eight['health'].items():
    np.testing.assert_allclose(value, one['health'][name], rtol=1e-5,
                               atol=1e-6, err_msg=name)


def test_every_evaluation_of_an_export_in_one_table(tiny, mesh8, tmp_path,
                                                   capsys):
  # Both linear protocols and fine-tuning on 10% of the labels, for the
  # encoder and (from scratch) for its random init, through --mode=eval's
  # entry point.
  config = tiny(**{'linear_eval.protocols': ('fast', 'paper'),
                   'linear_eval.num_epochs': 2, 'finetune.fractions': (0.1,),
                   'finetune.num_epochs': 2, 'finetune.batch_size': 64,
                   'knn_eval.enabled': False, 'health.enabled': False})
  spec = evaluate.encoder_spec(config, num_channels=1, step=3)
  encoder, _ = evaluate.build_encoder(spec)
  variables = evaluate.random_encoder_variables(encoder, spec, 7, mesh8)
  encoder_export.export_encoder(str(tmp_path / 'export'), variables, spec)
  results = evaluate.run(config, str(tmp_path / 'export'), mesh8)
  for entry in (results['encoder'], results['random_init']):
    assert list(entry['linear']) == ['fast', 'paper']
    ft = entry['finetune']['0.1']
    assert (ft['num_labelled'], ft['num_epochs'], ft['global_batch_size'],
            ft['num_steps']) == (104, 2, 64, 2)
    for r in (*entry['linear'].values(), ft):
      assert 0.0 < r['top1'] <= r['top5'] <= 1.0
  (header,) = [line.split() for line in capsys.readouterr().out.splitlines()
               if line.startswith('encoder ')]
  assert header == ['encoder', 'linear-fast', 'top-5', 'linear-paper',
                    'top-5', 'FT-10%']
