"""Tests of jaxssl/methods/base.py: the Method interface and the registry.

Covers: the registry (a dict of classes, unknown names listed), the batch
entries a method declares, the EMA timings run by the base class, a TEST
DOUBLE method that needs labels and keeps a per-example table indexed by
dataset position, trained through the real trainer (8 devices equal 1
device, exact resume, the indices are the examples' split positions), and
the import rule of the method modules.
"""

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import assert_resumes_bit_identical, make_method
from helpers import restore_state, set_overrides
from jaxssl import config_presets
from jaxssl import config_schema
from jaxssl import losses
from jaxssl import methods
from jaxssl import models
from jaxssl import train
from jaxssl.methods import base
from jaxssl.methods import common
from jaxssl.models import heads

METHODS_DIR = pathlib.Path(__file__).parent.parent / 'jaxssl' / 'methods'


class BankDouble(base.Method):
  """A test double: an online label probe and a per-example memory bank.

  `extra['bank']` `[num_train_examples, dim]` holds each example's last
  (momentum-mixed) normalised projection at its split position
  `batch['index']`; `extra['seen_label']` the label seen there (-1 before).
  Loss: pull both views towards the bank row (no gradient into the bank)
  plus a cross-entropy probe on stop-gradient features, which needs labels.
  """

  name = 'bank_double'
  needs_labels = True
  needs_example_index = True

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.bank_momentum = 0.5
    return c

  def __init__(self, config, run):
    super().__init__(config, run)
    self._encoder = self.make_encoder()
    self.net = common.SiameseNet(
        encoder=self._encoder,
        projector=heads.MLPHead(self.head_hidden_dim(),
                                config.head.output_dim,
                                num_layers=config.head.num_layers))
    self.probe = nn.Dense(run.num_classes)

  @property
  def encoder(self):
    return self._encoder

  def init(self, rng):
    net_key, probe_key, bank_key = jax.random.split(rng, 3)
    x = jnp.zeros((2, self.image_size, self.image_size, self.num_channels))
    variables = self.net.init(net_key, x, train=True)
    dim = models.feature_dim(self.config.model)
    params = dict(variables['params'],
                  probe=self.probe.init(probe_key, jnp.zeros((1, dim)))['params'])
    n = self.run.num_train_examples
    bank = jax.random.normal(bank_key, (n, self.config.head.output_dim))
    extra = {'bank': losses.l2_normalize(bank),
             'seen_label': jnp.full((n,), -1, jnp.int32)}
    return params, variables['batch_stats'], extra

  def compute_loss(self, params, batch_stats, extra, batch, rng, step):
    del rng, step
    assert set(batch) == {'views', 'label', 'index'}, sorted(batch)
    net_params = {k: v for k, v in params.items() if k != 'probe'}
    (e1, e2), batch_stats = common.forward_each_view(
        self.net, net_params, batch_stats, batch['views'][0])
    index = batch['index']
    rows = jax.lax.stop_gradient(extra['bank'][index])
    pull = -0.5 * (jnp.mean(jnp.sum(common.l2_normalize(e1.projection) * rows,
                                    -1))
                   + jnp.mean(jnp.sum(common.l2_normalize(e2.projection)
                                      * rows, -1)))
    logits = self.probe.apply({'params': params['probe']},
                              jax.lax.stop_gradient(e1.features))
    probe = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']))
    m = self.config.bank_double.bank_momentum
    new_rows = common.l2_normalize(m * rows + (1 - m) * jax.lax.stop_gradient(
        0.5 * (common.l2_normalize(e1.projection)
               + common.l2_normalize(e2.projection))))
    extra = {'bank': extra['bank'].at[index].set(new_rows),
             'seen_label': extra['seen_label'].at[index].set(batch['label'])}
    loss = pull + probe
    metrics = {'loss': loss, 'probe_loss': probe}
    return loss, base.Aux(batch_stats, extra, metrics, e1.features[:, None])


class EmaDouble(base.Method):
  """A minimal method with an EMA target of `params['w']`: its loss is 0."""

  name = 'ema_double'

  def __init__(self, timing):
    self.ema = common.EmaTarget(
        parts=('w',), momentum=lambda count: 0.5 + 0.1 * count,
        timing=timing)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict()

  @property
  def encoder(self):
    return None

  def init(self, rng):
    del rng
    params = {'w': jnp.ones((3,))}
    return params, {}, {'target': {'params': {'w': jnp.zeros((3,))},
                                   'batch_stats': {}}}

  def compute_loss(self, params, batch_stats, extra, batch, rng, step):
    return jnp.sum(params['w']) * 0.0, base.Aux(batch_stats, extra, {})


@pytest.fixture
def registered(monkeypatch):
  """The registry with the test double added (removed after the test)."""
  monkeypatch.setitem(methods.METHODS, 'bank_double', BankDouble)


def _double_config(data_dir, **overrides):
  c = config_schema.defaults('bank_double')
  config_presets.fashion_mnist_tiny(c)
  c.dataset.data_dir = data_dir
  c.head.num_layers = 2
  c.head.hidden_dim = 32
  c.head.output_dim = 16
  c.optim.name = 'adamw'
  c.optim.base_learning_rate = 1e-3
  c.optim.lr_scaling = 'none'
  c.optim.warmup_epochs = 0.0
  c.eval_after_training = False
  return set_overrides(c, overrides)


def test_registry_is_a_dict_of_classes():
  assert all(isinstance(cls, type) and issubclass(cls, base.Method)
             for cls in methods.METHODS.values())
  for name, cls in methods.METHODS.items():
    assert methods.get_method_class(name) is cls and cls.name == name
  with pytest.raises(ValueError, match="unknown method 'simclrr'; known: "
                     'byol, moco_v2, moco_v3, simclr, simsiam, swav'):
    methods.get_method_class('simclrr')


def test_batch_keys_follow_the_declarations():
  assert methods.METHODS['simclr'].batch_keys() == ('views',)
  assert BankDouble.batch_keys() == ('views', 'label', 'index')

  class LabelsOnly(BankDouble):
    needs_example_index = False

  assert LabelsOnly.batch_keys() == ('views', 'label')


@pytest.mark.parametrize('timing', common.EMA_TIMINGS)
def test_the_base_class_moves_the_ema_target_at_its_timing(timing):
  method = EmaDouble(timing)
  params, stats, extra = method.init(None)
  _, aux = method.loss_fn(params, stats, extra, {}, None, jnp.int32(2))
  moved_params, after = method.post_update(params, aux.extra, jnp.int32(3))
  assert moved_params is params
  # The momentum is m(count before this update) = m(2) = 0.7 either way.
  expected = np.full((3,), 0.3, np.float32)
  if timing == 'before_forward':
    np.testing.assert_allclose(aux.extra['target']['params']['w'], expected,
                               rtol=1e-6)
    np.testing.assert_array_equal(after['target']['params']['w'], expected)
  else:
    np.testing.assert_array_equal(aux.extra['target']['params']['w'],
                                  np.zeros(3))
    np.testing.assert_allclose(after['target']['params']['w'], expected,
                               rtol=1e-6)


def test_unknown_ema_timing_is_one_line():
  with pytest.raises(ValueError, match="EMA timing 'after_forward' is not "
                     'one of before_forward, after_update'):
    common.EmaTarget(parts=('encoder',), momentum=lambda c: c,
                     timing='after_forward')


def test_double_gives_the_same_loss_gradients_and_table_on_8_devices(
    registered, mesh1, mesh8):
  config = _double_config('')
  m1 = make_method(config, mesh1, num_train_examples=64)
  m8 = make_method(config, mesh8, num_train_examples=64)
  params, stats, extra = m1.init(jax.random.key(0))
  rs = np.random.RandomState(0)
  batch = {'views': (jnp.asarray(rs.uniform(size=(16, 2, 16, 16, 1)),
                                 jnp.float32),),
           'label': jnp.asarray(rs.randint(0, 10, 16), jnp.int32),
           'index': jnp.asarray(rs.permutation(64)[:16], jnp.int32)}

  def run(method, batch):
    def fn(p):
      return method.loss_fn(p, stats, extra, batch, None, 0)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  sharded = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh8, P('data'))), batch)
  (loss1, aux1), grads1 = run(m1, batch)
  (loss8, aux8), grads8 = run(m8, sharded)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), grads8, grads1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               aux8.extra, aux1.extra)
  seen = np.asarray(aux1.extra['seen_label'])
  np.testing.assert_array_equal(seen[np.asarray(batch['index'])],
                                batch['label'])
  assert np.sum(seen >= 0) == 16


def test_double_trains_through_the_trainer_with_real_indices(
    registered, fashion_mnist_dir, tmp_path):
  config = _double_config(fashion_mnist_dir)
  workdir = str(tmp_path / 'double')
  assert train.run(config, workdir)['step'] == 8
  state = restore_state(config, workdir, 8)
  seen = np.asarray(state.extra['seen_label'])
  visited = np.flatnonzero(seen >= 0)
  # 8 steps of 32 within the first epoch (64 steps): 256 distinct examples.
  assert len(visited) == 8 * config.global_batch_size
  builder = tfds.builder('fashion_mnist', data_dir=fashion_mnist_dir)
  labels = np.concatenate([b['label'] for b in tfds.as_numpy(
      builder.as_dataset(split=config.dataset.train_split,
                         shuffle_files=False).batch(4096))])
  # Each table row is at the example's position in the split.
  np.testing.assert_array_equal(seen[visited], labels[visited])
  assert np.all(np.isfinite(state.extra['bank']))


def test_double_resumes_exactly(registered, fashion_mnist_dir, tmp_path):
  assert_resumes_bit_identical(_double_config(fashion_mnist_dir), tmp_path)


def _imported_modules(path: pathlib.Path) -> set[str]:
  modules = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      modules.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      modules.update(f'{node.module}.{alias.name}' for alias in node.names)
  return modules


@pytest.mark.parametrize('name', sorted(methods.METHODS))
def test_a_method_imports_only_base_common_losses_and_models(name):
  allowed = ('jaxssl.losses', 'jaxssl.models', 'jaxssl.methods.base',
             'jaxssl.methods.common')
  own = [m for m in _imported_modules(METHODS_DIR / f'{name}.py')
         if m.startswith('jaxssl')]
  assert own, name
  bad = [m for m in own
         if not any(m == a or m.startswith(a + '.') for a in allowed)]
  assert not bad, f'{name}.py imports {bad}'
