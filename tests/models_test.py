"""Tests for jaxssl.models: the encoder registry, the ResNets, the small CPU
encoders and `model.input_normalization` (statistics, wrapping, export).

Big models are only traced (`jax.eval_shape`, `jax.make_jaxpr`); parameter
counts are checked against a from-first-principles count and against the
torchvision numbers (total minus the 1000-way fc layer).
"""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import model_config
from jaxssl import config_schema
from jaxssl import evaluate
from jaxssl import models
from jaxssl.models import heads, resnet

# RBG keys: threefry (jax_threefry_partitionable) takes seconds to compile
# per random op on CPU; the tests need init values, not a particular stream.
_KEY = jax.random.key(0, impl='rbg')

_ENCODERS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
             'small_cnn', 'tiny_cnn')
_RESNETS = {  # depth: (bottleneck?, blocks per stage), He et al. Table 1.
    18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


@functools.lru_cache(maxsize=None)
def _traced(name, width=1, stem='auto', dtype='float32', image_size=32):
  """(encoder, abstract output, abstract variables); traced once per key."""
  encoder = models.make_encoder(
      model_config(encoder=name, width_multiplier=width, stem=stem, dtype=dtype),
      image_size=image_size)
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  out, variables = jax.eval_shape(
      lambda x: encoder.init_with_output(_KEY, x, train=True), x)
  return encoder, out, variables


def _abstract_variables(encoder, batch, image_size, channels=3):
  x = jax.ShapeDtypeStruct((batch, image_size, image_size, channels),
                           jnp.float32)
  return jax.eval_shape(
      lambda x: encoder.init(_KEY, x, train=True), x), x


def _paths(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def _expected_feature_dim(name, width):
  if name.startswith('resnet'):
    bottleneck, _ = _RESNETS[int(name[len('resnet'):])]
    return 512 * (4 if bottleneck else 1) * width
  return {'small_cnn': 256, 'tiny_cnn': 16}[name] * width


def test_registry_names():
  assert tuple(models.ENCODERS) == _ENCODERS


def test_unknown_encoder_error_is_one_line_listing_known_names():
  message = ("unknown encoder 'resnt50'; known: " + ', '.join(_ENCODERS))
  with pytest.raises(ValueError) as error:
    models.make_encoder(model_config(encoder='resnt50'), image_size=32)
  assert str(error.value) == message
  with pytest.raises(ValueError, match="unknown encoder 'resnt50'"):
    models.feature_dim(model_config(encoder='resnt50'))


@pytest.mark.parametrize('name', _ENCODERS)
@pytest.mark.parametrize('width,stem', [(1, 'auto'), (2, 'imagenet')])
def test_output_shape_and_feature_dim(name, width, stem):
  _, out, _ = _traced(name, width, stem)
  expected = _expected_feature_dim(name, width)
  config = model_config(encoder=name, width_multiplier=width, stem=stem)
  assert models.feature_dim(config) == expected
  assert out.shape == (2, expected) and out.dtype == jnp.float32


@pytest.mark.parametrize('name,image_size', [('tiny_cnn', 8),
                                              ('small_cnn', 12)])
def test_forward_runs_and_updates_batch_stats(name, image_size):
  encoder = models.make_encoder(model_config(encoder=name), image_size=image_size)
  x = np.random.default_rng(1).normal(
      size=(4, image_size, image_size, 3)).astype(np.float32)

  @jax.jit
  def init_and_apply(x):
    variables = encoder.init(_KEY, x, train=True)
    return variables, encoder.apply(variables, x, train=True,
                                    mutable=['batch_stats'])

  variables, (out, updates) = init_and_apply(x)
  assert out.shape == (4, encoder.feature_dim)
  assert np.all(np.isfinite(out)) and np.std(out) > 0
  before, after = _paths(variables['batch_stats']), _paths(
      updates['batch_stats'])
  assert before.keys() == after.keys()
  assert all(not np.allclose(before[k], after[k]) for k in before)


def _conv_params(cin, cout, k):
  return k * k * cin * cout


def _resnet_param_count(depth, width, cifar_stem, in_channels=3):
  """Conv kernels plus BN gamma/beta, counted from the architecture."""
  bottleneck, stages = _RESNETS[depth]
  base = 64 * width
  count = _conv_params(in_channels, base, 3 if cifar_stem else 7) + 2 * base
  channels = base
  for stage, blocks in enumerate(stages):
    filters = base * 2**stage
    out = 4 * filters if bottleneck else filters
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      if bottleneck:
        count += (_conv_params(channels, filters, 1) +
                  _conv_params(filters, filters, 3) +
                  _conv_params(filters, out, 1) + 2 * (2 * filters + out))
      else:
        count += (_conv_params(channels, filters, 3) +
                  _conv_params(filters, filters, 3) + 2 * 2 * filters)
      if stride != 1 or channels != out:
        count += _conv_params(channels, out, 1) + 2 * out
      channels = out
  return count


def _param_count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('depth,torchvision_minus_fc', [
    (18, 11_689_512 - (512 * 1000 + 1000)),
    (50, 25_557_032 - (2048 * 1000 + 1000)),
])
def test_param_count_matches_torchvision_without_fc(depth,
                                                    torchvision_minus_fc):
  assert torchvision_minus_fc == {18: 11_176_512, 50: 23_508_032}[depth]
  assert _resnet_param_count(depth, 1, False) == torchvision_minus_fc
  encoder = models.make_encoder(
      model_config(encoder=f'resnet{depth}', stem='imagenet'), image_size=224)
  variables, _ = _abstract_variables(encoder, 1, 224)
  assert _param_count(variables['params']) == torchvision_minus_fc


@pytest.mark.parametrize('depth', sorted(_RESNETS))
@pytest.mark.parametrize('width,stem', [(1, 'auto'), (2, 'imagenet')])
def test_param_count_from_first_principles(depth, width, stem):
  _, _, variables = _traced(f'resnet{depth}', width, stem)
  expected = _resnet_param_count(depth, width, cifar_stem=stem == 'auto')
  assert _param_count(variables['params']) == expected
  # BN running averages: as many as BN gamma/beta.
  assert _param_count(variables['batch_stats']) == sum(
      int(np.prod(v.shape)) for k, v in _paths(variables['params']).items()
      if 'bn' in k[-2])


def _bn_scale_inits(encoder, image_size):
  """{BN path: its gamma initializer}, recorded while tracing `init`."""
  scale_inits = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, models.BatchNorm):
      scale_inits[context.module.path] = context.module.scale_init
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _abstract_variables(encoder, 2, image_size)
  return scale_inits


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('zero_init_residual', [True, False])
def test_zero_init_gamma_exactly_on_last_bn_of_each_block(depth,
                                                          zero_init_residual):
  # Tracing only: the gamma initializers are evaluated outside the trace,
  # so no ResNet has to be compiled.
  encoder = models.make_encoder(
      model_config(encoder=f'resnet{depth}', zero_init_residual=zero_init_residual),
      image_size=8)
  scale_inits = _bn_scale_inits(encoder, 8)
  gammas = {path: np.asarray(init(_KEY, (5,), jnp.float32))
            for path, init in scale_inits.items()}
  zero = {path for path, gamma in gammas.items() if np.all(gamma == 0)}
  assert all(np.all(gammas[path] == 1) for path in gammas.keys() - zero)
  bottleneck, stages = _RESNETS[depth]
  last_bn = 'bn3' if bottleneck else 'bn2'
  expected = {(f'stage{s + 1}_block{b}', last_bn)
              for s, n in enumerate(stages) for b in range(n)}
  assert len(expected) == sum(stages)
  assert expected <= gammas.keys()
  assert zero == (expected if zero_init_residual else set())


@pytest.mark.parametrize('block_cls,last_bn', [
    (resnet.BasicBlock, 'bn2'), (resnet.BottleneckBlock, 'bn3')])
@pytest.mark.parametrize('zero_init_residual', [True, False])
def test_zero_init_block_starts_as_relu_of_shortcut(block_cls, last_bn,
                                                    zero_init_residual):
  block = block_cls(filters=2, strides=1,
                    zero_init_residual=zero_init_residual)
  x = np.random.default_rng(1).normal(
      size=(4, 3, 3, 2 * block.expansion)).astype(np.float32)

  @jax.jit
  def init_and_apply(x):
    variables = block.init(_KEY, x, train=True)
    return variables, block.apply(variables, x, train=True,
                                  mutable=['batch_stats'])[0]

  variables, out = init_and_apply(x)
  gamma = variables['params'][last_bn]['scale']
  np.testing.assert_array_equal(gamma, 0.0 if zero_init_residual else 1.0)
  # Identity shortcut here, so a zero-init block is exactly relu(x).
  assert np.array_equal(out, np.maximum(x, 0)) == zero_init_residual


@pytest.mark.parametrize('name', _ENCODERS)
def test_convs_have_no_bias_and_only_bn_has_1d_params(name):
  _, _, variables = _traced(name)
  for path, leaf in _paths(variables['params']).items():
    if 'bn' in path[-2]:
      assert path[-1] in ('scale', 'bias') and leaf.ndim == 1, path
    elif path[-2] == 'fc':  # small_cnn's bias-free dense representation
      assert name == 'small_cnn' and path[-1] == 'kernel', path
      assert leaf.ndim == 2, path
    else:
      assert path[-1] == 'kernel' and leaf.ndim == 4, path
      assert 'conv' in path[-2], path


def _intermediate_shapes(encoder, image_size):
  variables, x = _abstract_variables(encoder, 1, image_size)
  _, state = jax.eval_shape(
      lambda v, x: encoder.apply(v, x, train=False,
                                 capture_intermediates=True,
                                 mutable=['intermediates']), variables, x)
  return variables, state['intermediates']


@pytest.mark.parametrize('stem,image_size,cifar', [
    ('auto', 32, True), ('auto', 28, True), ('auto', 33, False),
    ('auto', 64, False), ('imagenet', 32, False), ('cifar', 64, True)])
def test_stem_choice(stem, image_size, cifar):
  encoder = models.make_encoder(model_config(stem=stem, width_multiplier=2),
                                image_size=image_size)
  variables, inter = _intermediate_shapes(encoder, image_size)
  kernel = variables['params']['stem_conv']['kernel']
  assert kernel.shape == ((3, 3, 3, 128) if cifar else (7, 7, 3, 128))
  # The CIFAR stem keeps the resolution (stride 1, no max-pool); the
  # ImageNet stem divides it by 4 (stride-2 conv, stride-2 max-pool).
  side = inter['stage1_block0']['__call__'][0].shape[1]
  assert side == (image_size if cifar else -(-image_size // 4))


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'small_cnn',
                                  'tiny_cnn'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_compute_dtype_params_float32_output_float32(name, dtype):
  encoder, _, variables = _traced(name, dtype=dtype)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: encoder.apply(
      v, x, train=True, mutable=['batch_stats']))(variables, x)
  convs = [eqn for eqn in _all_eqns(jaxpr.jaxpr)
           if eqn.primitive.name == 'conv_general_dilated']
  assert convs
  expected = jnp.dtype(jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32)
  assert models.compute_dtype(model_config(dtype=dtype)) == expected
  for eqn in convs:
    assert [v.aval.dtype for v in eqn.invars] == [expected, expected]
    assert eqn.outvars[0].aval.dtype == expected
  # Outputs: the features, then the updated batch_stats.
  assert all(aval.dtype == jnp.float32 for aval in jaxpr.out_avals)


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


@pytest.mark.parametrize('overrides,image_size,message', [
    (dict(stem='imagenet'), 31, 'image_size=31 is too small'),
    (dict(stem='auto'), 7, 'image_size=7 is too small'),
    (dict(encoder='small_cnn'), 3, 'image_size=3 is too small'),
    (dict(), 0, 'image_size=0 must be a positive integer'),
    (dict(dtype='float16'),
     32, "unknown dtype 'float16'; known: bfloat16, float32"),
    (dict(stem='big'), 32, "unknown model.stem 'big'; known: auto, imagenet"),
    (dict(width_multiplier=0), 32, 'width_multiplier=0 must be a positive'),
    (dict(bn_momentum=1.0), 32, r'bn_momentum=1.0 must be in \[0, 1\)'),
    (dict(bn_epsilon=0.0), 32, 'bn_epsilon=0.0 must be positive'),
])
def test_make_encoder_rejects_bad_values(overrides, image_size, message):
  with pytest.raises(ValueError, match=message):
    models.make_encoder(model_config(**overrides), image_size=image_size)
  if image_size == 32:  # Config-only errors are found without an image.
    with pytest.raises(ValueError, match=message):
      models.validate_model_config(model_config(**overrides))


def test_bn_groups_must_divide_batch():
  encoder = models.make_encoder(model_config(encoder='tiny_cnn'), image_size=8,
                                bn_groups=3)
  with pytest.raises(ValueError, match='not divisible by num_groups=3'):
    _abstract_variables(encoder, 4, 8)
  with pytest.raises(ValueError, match='bn_groups=0 must be a positive'):
    models.make_encoder(model_config(), image_size=32, bn_groups=0)


@pytest.mark.parametrize('bn_groups', [1, 8])
def test_encoder_on_8_devices_equals_single_device(mesh8, mesh1, bn_groups):
  """Train-mode forward, BN statistics and gradients of the global view."""
  encoder = models.make_encoder(model_config(encoder='tiny_cnn'), image_size=8,
                                bn_groups=bn_groups)
  rng = np.random.default_rng(0)
  # Per-shard offsets make per-device BN statistics differ from global ones.
  x = (rng.normal(size=(16, 8, 8, 3)) +
       np.repeat(np.arange(8.0), 2)[:, None, None, None]).astype(np.float32)
  variables = jax.jit(lambda x: encoder.init(_KEY, x,
                                             train=True))(x)

  def loss(params, batch_stats, x):
    out, updates = encoder.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True,
        mutable=['batch_stats'])
    return jnp.mean(out**2), (out, updates['batch_stats'])

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  results = []
  for mesh in (mesh8, mesh1):
    xs = jax.device_put(x, NamedSharding(mesh, P('data')))
    results.append(step(variables['params'], variables['batch_stats'], xs))
  (l8, (out8, stats8)), grads8 = results[0]
  (l1, (out1, stats1)), grads1 = results[1]
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  np.testing.assert_allclose(out8, out1, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               (stats8, grads8), (stats1, grads1))
  # Control: grouped statistics give a different forward on this data.
  other = models.make_encoder(model_config(encoder='tiny_cnn'), image_size=8,
                              bn_groups=9 - bn_groups)
  out_other = jax.jit(lambda v, x: other.apply(
      v, x, train=True, mutable=['batch_stats'])[0])(variables, x)
  assert np.abs(np.asarray(out_other) - np.asarray(out1)).max() > 1e-2


def _weight_decay_excluded(path):
  """jaxssl.optim's rule: a 'bn'/'norm' path component, or a 'bias' leaf."""
  return path[-1] == 'bias' or any(
      'bn' in str(c).lower() or 'norm' in str(c).lower() for c in path)


def _all_model_params():
  for name in _ENCODERS:
    yield name, _traced(name)[2]['params']
  x = jax.ShapeDtypeStruct((4, 16), jnp.float32)
  head_modules = {
      'projection_head': heads.ProjectionHead(num_layers=3, output_dim=8),
      'byol': heads.MLPHead(32, 8),
      'moco_v2': heads.MLPHead(32, 8, use_bn=False, output_bias=True),
      'moco_v3': heads.MLPHead(32, 8, hidden_bias=False, last_bn=True,
                               last_bn_affine=False),
      'moco_v3_affine_last_bn': heads.MLPHead(32, 8, last_bn=True),
      'swav': heads.MLPHead(32, 8, output_bias=True),
  }
  for name, head in head_modules.items():
    yield name, jax.eval_shape(
        lambda x, head=head: head.init(_KEY, x, train=True),
        x)['params']
  yield 'prototypes', jax.eval_shape(
      heads.Prototypes(10).init, _KEY, x)['params']


def test_weight_decay_rule_selects_exactly_the_1d_params():
  for name, params in _all_model_params():
    for path, leaf in _paths(params).items():
      assert _weight_decay_excluded(path) == (leaf.ndim == 1), (name, path)


def test_heads_and_encoders_compose_under_bfloat16():
  encoder = models.make_encoder(model_config(encoder='tiny_cnn', dtype='bfloat16'),
                                image_size=8)
  head = heads.ProjectionHead(num_layers=2, output_dim=4, dtype=jnp.bfloat16)

  class Model(nn.Module):
    encoder: nn.Module
    head: nn.Module

    def __call__(self, x, train):
      return self.head(self.encoder(x, train), train)

  model = Model(encoder, head)
  x = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(_KEY, x, train=True), x)
  out = jax.eval_shape(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats'])[0], variables, x)
  assert out.shape == (4, 4) and out.dtype == jnp.float32


# The official constants, typed in from the sources: BYOL
# `utils/dataset.py:normalize_images`, MoCo `main_moco.py`, SwAV
# `src/multicropdataset.py` (std 0.228 for red).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWAV_STD = (0.228, 0.224, 0.225)


def normalization_config(normalization='none', encoder='tiny_cnn'):
  config = config_schema.defaults().model
  config.encoder = encoder
  config.input_normalization = normalization
  return config


def random_images(shape, seed=0):
  return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_default_is_none_and_the_plain_encoder():
  config = normalization_config()
  assert config_schema.defaults().model.input_normalization == 'none'
  encoder = models.make_encoder(config, image_size=16)
  assert not isinstance(encoder, models.NormalizedEncoder)


@pytest.mark.parametrize('name,mean,std', [
    ('imagenet', IMAGENET_MEAN, IMAGENET_STD),
    ('swav', IMAGENET_MEAN, SWAV_STD),
])
def test_statistics(name, mean, std):
  assert models.input_statistics(name, 3) == (mean, std)
  grey_mean, grey_std = models.input_statistics(name, 1)
  np.testing.assert_allclose(grey_mean, [np.mean(np.float64(mean))],
                             rtol=1e-12)
  np.testing.assert_allclose(grey_std, [np.mean(np.float64(std))],
                             rtol=1e-12)


@pytest.mark.parametrize('name,mean,std', [
    ('imagenet', IMAGENET_MEAN, IMAGENET_STD),
    ('swav', IMAGENET_MEAN, SWAV_STD),
])
@pytest.mark.parametrize('channels', [1, 3])
def test_normalized_encoder_equals_encoder_of_normalized_pixels(
    name, mean, std, channels):
  x = random_images((4, 16, 16, channels))
  if channels == 1:
    mean, std = (np.mean(mean),), (np.mean(std),)
  expected_input = (x.astype(np.float64) - np.array(mean)) / np.array(std)
  plain = models.make_encoder(normalization_config(), image_size=16)
  wrapped = models.make_encoder(normalization_config(name), image_size=16)
  assert isinstance(wrapped, models.NormalizedEncoder)
  variables = plain.init(_KEY, jnp.asarray(x), train=False)
  wrapped_variables = wrapped.init(_KEY, jnp.asarray(x), train=False)
  # Same tree, same initial values: the normalisation is not a parameter.
  assert (jax.tree.structure(variables)
          == jax.tree.structure(wrapped_variables))
  for a, b in zip(jax.tree.leaves(variables),
                  jax.tree.leaves(wrapped_variables)):
    np.testing.assert_array_equal(a, b)
  got = wrapped.apply(variables, jnp.asarray(x), train=False)
  want = plain.apply(variables, jnp.asarray(expected_input, jnp.float32),
                     train=False)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
  # Training mode updates the same BatchNorm statistics.
  _, updates = wrapped.apply(variables, jnp.asarray(x), train=True,
                             mutable=['batch_stats'])
  _, plain_updates = plain.apply(variables,
                                 jnp.asarray(expected_input, jnp.float32),
                                 train=True, mutable=['batch_stats'])
  assert (jax.tree.structure(updates) == jax.tree.structure(plain_updates))


def test_wrapper_forwards_encoder_properties():
  plain = models.make_encoder(normalization_config(encoder='resnet18'),
                              image_size=32)
  wrapped = models.make_encoder(normalization_config('imagenet', 'resnet18'),
                                image_size=32)
  assert wrapped.feature_dim == plain.feature_dim == 512
  assert wrapped.min_image_size == plain.min_image_size


def test_exported_encoder_spec_carries_the_normalization():
  config = normalization_config('swav')
  spec = {'model': config.to_dict(), 'image_size': 16, 'num_channels': 3}
  encoder, abstract = evaluate.build_encoder(spec)
  assert isinstance(encoder, models.NormalizedEncoder)
  assert encoder.normalization == 'swav'
  plain, plain_abstract = evaluate.build_encoder(
      {**spec, 'model': normalization_config().to_dict()})
  assert (jax.tree.structure(abstract) == jax.tree.structure(plain_abstract))


def test_bad_names():
  with pytest.raises(ValueError, match=r"unknown model.input_normalization "
                     r"'imagnet'; known: none, imagenet, swav"):
    models.make_encoder(normalization_config('imagnet'), image_size=16)
  with pytest.raises(ValueError, match="'none' has no statistics"):
    models.input_statistics('none', 3)
  with pytest.raises(ValueError, match='num_channels=4 must be 1 or 3'):
    models.input_statistics('imagenet', 4)
