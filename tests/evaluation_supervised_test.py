"""The paper linear protocol and fine-tuning: the data they train on, one
step against NumPy, 8 devices against 1, and the labelled fractions."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import assert_close_8_vs_1, load_config, tiny_factory
from jaxssl import evaluate
from jaxssl.evaluation import labelled_data
from jaxssl.evaluation import supervised


@pytest.fixture(scope='module')
def tiny(fashion_mnist_dir):
  return tiny_factory('simclr_tiny', fashion_mnist_dir)


def _batches(config, indices, epoch, seed=0, batch_size=64, **processes):
  data = labelled_data.LabelledData(
      config, config.dataset.eval_train_split, indices,
      batch_size=batch_size, **processes)
  return list(data.epoch(epoch, seed))


def test_labelled_data_covers_the_examples_once_per_epoch(tiny):
  config = tiny()
  labels = supervised.split_labels(config, config.dataset.eval_train_split)
  indices = np.arange(0, 1024, 5)  # 205 examples: 3 batches of 64
  epoch0, again, epoch1 = (_batches(config, indices, 0),
                           _batches(config, indices, 0),
                           _batches(config, indices, 1))
  assert len(epoch0) == 3
  for a, b in zip(epoch0, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  seen = np.concatenate([b['label'] for b in epoch0])
  # 192 of the 205 labelled examples, none twice: their labels are a
  # sub-multiset of the subset's.
  counts = np.bincount(labels[indices], minlength=10)
  assert np.all(np.bincount(seen, minlength=10) <= counts)
  order0 = np.concatenate([b['label'] for b in epoch0])
  order1 = np.concatenate([b['label'] for b in epoch1])
  assert not np.array_equal(order0, order1)  # reshuffled every epoch
  image = epoch0[0]['image']
  assert image.shape == (64, 16, 16, 1) and image.dtype == np.float32
  assert 0.0 <= image.min() and image.max() <= 1.0


def test_labelled_batches_do_not_depend_on_the_process_count(tiny):
  # 4 shards: 1, 2 and 4 processes read the same global batches, each
  # process its part, in process order.
  config = tiny(**{'dataset.num_shards': 4})
  indices = np.arange(0, 1024, 3)  # 342 examples: 85-86 a shard, 10 steps
  whole = _batches(config, indices, 1, batch_size=32,
                   process_index=0, process_count=1)
  assert len(whole) == 85 // 8
  for count in (2, 4):
    parts = [_batches(config, indices, 1, batch_size=32, process_index=p,
                      process_count=count) for p in range(count)]
    for step, batch in enumerate(whole):
      for key in ('image', 'label'):
        np.testing.assert_array_equal(
            batch[key], np.concatenate([part[step][key] for part in parts]))
  # Another shard count is another order.
  two = _batches(tiny(**{'dataset.num_shards': 2}), indices, 1,
                 batch_size=32, process_index=0, process_count=1)
  assert not np.array_equal(two[0]['label'], whole[0]['label'])


def test_l2_skips_batch_norm_and_keeps_biases():
  params = {'head': {'kernel': jnp.full((2, 2), 2.0), 'bias': jnp.ones(2)},
            'encoder': {'bn1': {'scale': jnp.full(3, 5.0),
                                'bias': jnp.full(3, 5.0)},
                        'conv1': {'kernel': jnp.ones((1, 3))}}}
  assert float(supervised._l2(params)) == 0.5 * (4 * 4 + 2 + 3)


def test_one_linear_step_is_nesterov_sgd_on_the_head(tiny, mesh8):
  # One step over all 1,024 labelled images (one batch, one epoch): the
  # head moves by -lr (g + m g) from zero, g the gradient of the mean
  # cross-entropy plus wd (kernel, bias) on the frozen features of the
  # step's crops.
  config = tiny()
  spec = evaluate.encoder_spec(config, num_channels=1, step=0)
  encoder, _ = evaluate.build_encoder(spec)
  variables = evaluate.random_encoder_variables(encoder, spec, 0, mesh8)
  recipe = supervised.Recipe(
      finetune=False, num_epochs=1, batch_size=1024, base_learning_rate=0.3,
      lr_scaling='linear', optimizer='nesterov', weight_decay=0.01)
  trained, head, facts = supervised.fit(config, encoder, variables, mesh8,
                                        recipe, num_classes=10)
  assert facts == {'num_labelled': 1024, 'num_epochs': 1,
                   'global_batch_size': 1024, 'num_steps': 1}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trained),
               jax.device_get(variables))  # frozen
  (batch,) = _batches(config, None, 0, batch_size=1024)
  x = np.asarray(encoder.apply(variables, batch['image'], train=False),
                 np.float64)
  y = np.eye(10)[batch['label']]
  # At zero weights the softmax is uniform; wd * w is 0 too.
  g_kernel = x.T @ (np.full_like(y, 0.1) - y) / len(y)
  g_bias = (np.full_like(y, 0.1) - y).mean(0)
  lr = 0.3 * 1024 / 256
  np.testing.assert_allclose(head['kernel'], -lr * 1.9 * g_kernel,
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(head['bias'], -lr * 1.9 * g_bias, rtol=1e-5,
                             atol=1e-8)


@pytest.mark.parametrize('finetune', [False, True])
def test_8_devices_equal_1(tiny, mesh8, mesh1, finetune):
  config = tiny()
  spec = evaluate.encoder_spec(config, num_channels=1, step=0)
  encoder, _ = evaluate.build_encoder(spec)
  recipe = supervised.Recipe(
      finetune=finetune, num_epochs=2, batch_size=128,
      base_learning_rate=0.1, lr_scaling='linear',
      optimizer='lars' if finetune else 'nesterov', weight_decay=1e-4)
  indices = np.arange(0, 1024, 4)
  fitted = []
  for mesh in (mesh8, mesh1):
    variables = evaluate.random_encoder_variables(encoder, spec, 0, mesh)
    trained, head, _ = supervised.fit(config, encoder, variables, mesh,
                                      recipe, num_classes=10, indices=indices)
    fitted.append(jax.device_get((trained, head)))
  jax.tree.map(assert_close_8_vs_1, *fitted)
  if finetune:  # the encoder did move
    assert not np.allclose(fitted[0][0]['params']['conv1']['kernel'],
                           jax.device_get(variables)['params']['conv1'][
                               'kernel'])


def test_labelled_sets_official_for_imagenet_balanced_elsewhere(tiny):
  imagenet = load_config('simclr_tpu')
  for fraction, name in ((0.01, '1pct'), (0.1, '10pct')):
    data, indices = supervised.labelled_set(imagenet, fraction)
    assert indices is None
    assert data.dataset.name == f'imagenet2012_subset/{name}'
    assert data.dataset.eval_train_split == 'train'
  config = tiny()
  data, indices = supervised.labelled_set(config, 0.1)
  assert data is config
  labels = supervised.split_labels(config, config.dataset.eval_train_split)
  counts = np.bincount(labels[indices], minlength=10)
  expected = np.floor(0.1 * np.bincount(labels, minlength=10) + 0.5)
  np.testing.assert_array_equal(counts, np.maximum(1, expected))
  assert supervised.labelled_set(config, 1.0) == (config, None)


def test_fine_tuning_epochs_follow_simclr_v2_unless_set():
  config = ml_collections.ConfigDict(load_config('simclr_tiny').to_dict())
  assert supervised.finetune_recipe(config, 0.01).num_epochs == 60
  assert supervised.finetune_recipe(config, 0.1).num_epochs == 30
  config.finetune.num_epochs = 7
  assert supervised.finetune_recipe(config, 0.01).num_epochs == 7
  recipe = supervised.finetune_recipe(config, 0.01)
  assert (recipe.optimizer, recipe.base_learning_rate, recipe.lr_scaling,
          recipe.weight_decay, recipe.finetune) == ('lars', 0.005, 'sqrt',
                                                    0.0, True)


def test_lars_excludes_the_classifier_as_head_supervised():
  # First step, SimCLR's LARS: v = lr * trust * g. The classifier is
  # excluded (trust 1, no decay); an encoder kernel is adapted.
  recipe = supervised.Recipe(
      finetune=True, num_epochs=1, batch_size=8, base_learning_rate=0.5,
      lr_scaling='none', optimizer='lars', weight_decay=0.1)
  tx = supervised._optimizer(recipe, 0.5)
  params = {'head': {'kernel': jnp.full((2, 2), 3.0), 'bias': jnp.ones(2)},
            'encoder': {'conv1': {'kernel': jnp.full((2, 2), 3.0)}}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['head']['kernel'], -0.25, rtol=1e-6)
  np.testing.assert_allclose(updates['head']['bias'], -0.25, rtol=1e-6)
  g = 0.5 + 0.1 * 3.0  # decayed gradient of the encoder kernel
  trust = 1e-3 * 6.0 / (2 * g)  # eta |w| / |g + wd w|, both 2x2
  np.testing.assert_allclose(updates['encoder']['conv1']['kernel'],
                             -0.5 * trust * g, rtol=1e-5)
