"""Tests for jaxssl.cpu_kernels: `select_factories` and the CPU encoders.

An encoder built from the CPU factories has the same variables as one built
from XLA's ops and computes the same features and parameter gradients; the
choice depends on the backend, the process's device count and the user's
`kernels` only.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import model_config
from jaxssl import cpu_kernels
from jaxssl import models
from jaxssl.cpu_kernels import winograd
from jaxssl.models import layers

_KEY = jax.random.key(0, impl='rbg')  # fast init on CPU


@pytest.mark.parametrize('kernels,local_devices,backend,expected', [
    ('auto', 1, 'cpu', 'cpu'),   # one CPU device: the CPU kernels
    ('auto', 8, 'cpu', 'xla'),   # simulated devices sharing the cores
    ('auto', 1, 'gpu', 'xla'),   # TPU and GPU keep XLA's ops
    ('auto', 1, 'tpu', 'xla'),
    ('cpu', 8, 'cpu', 'cpu'),    # an explicit choice is kept
    ('xla', 1, 'cpu', 'xla'),
])
def test_select_factories(kernels, local_devices, backend, expected):
  factories = cpu_kernels.select_factories(
      kernels, backend=backend, local_devices=local_devices)
  assert factories.name == expected
  assert factories.conv is (cpu_kernels.CpuConv if expected == 'cpu'
                            else layers.Conv)
  assert factories.norm is layers.BatchNorm
  assert factories.describe().startswith(f'kernels: {expected} ({kernels}')


def test_auto_follows_this_process_device_count():
  # conftest gives this process 8 CPU devices.
  assert cpu_kernels.select_factories().name == 'xla'


@pytest.mark.parametrize('kernels,local_devices,message', [
    ('cudnn', 1, "unknown kernels 'cudnn'; known: auto, cpu, xla"),
    ('auto', 0, 'local_devices=0 must be an int >= 1'),
    ('auto', True, 'local_devices=True must be an int >= 1'),
])
def test_select_factories_bad_arguments(kernels, local_devices, message):
  with pytest.raises(ValueError, match=message):
    cpu_kernels.select_factories(kernels, local_devices=local_devices)


def test_xla_factories_trace_plain_convolutions():
  # Off a 1-device CPU the encoder is exactly XLA's: no matmul convolution.
  factories = cpu_kernels.select_factories(backend='gpu', local_devices=1)
  encoder = models.make_encoder(model_config(encoder='tiny_cnn'), image_size=8,
                                conv=factories.conv, norm=factories.norm)
  x = jnp.ones((2, 8, 8, 3))
  variables = encoder.init(_KEY, x, train=False)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: encoder.apply(
      {**variables, 'params': p}, x, train=True,
      mutable=['batch_stats'])[0].sum()))(variables['params']))
  assert 'conv_general_dilated' in jaxpr
  assert 'dot_general' not in jaxpr and 'custom_vjp' not in jaxpr


def test_models_package_has_no_backend_check():
  root = pathlib.Path(models.__file__).parent
  for path in root.glob('*.py'):
    text = path.read_text()
    for needle in ('default_backend', 'conv_impl'):
      assert needle not in text, (path.name, needle)
    imports = [line for line in text.splitlines()
               if line.startswith(('import ', 'from '))]
    assert not [line for line in imports if 'cpu_kernels' in line], path


def test_cpu_encoder_trains_like_xla(monkeypatch):
  # The CPU kernels run im2col matmuls and Winograd; a ResNet-18's features
  # and every parameter gradient equal those of XLA's ops. (SmallCNN is not compared here: its BatchNorms over 4
  # images amplify float32 rounding to ~1e-4 for every implementation
  # against XLA's, im2col included; its convolutions are covered op by op
  # in cpu_kernels_fastconv_test and cpu_kernels_winograd_test.)
  image_size = 16
  winograd_calls = []
  original = winograd.conv3x3
  monkeypatch.setattr(winograd, 'conv3x3', lambda *args: (
      winograd_calls.append(args[1].shape), original(*args))[1])
  config = model_config(encoder='resnet18', width_multiplier=1)
  cpu = cpu_kernels.select_factories('cpu')
  fast = models.make_encoder(config, image_size=image_size, conv=cpu.conv,
                             norm=cpu.norm)
  reference = models.make_encoder(config, image_size=image_size)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (4, image_size, image_size, 3)),
                  jnp.float32)
  variables = reference.init(_KEY, x, train=True)
  assert jax.tree.structure(fast.init(_KEY, x, train=True)) == (
      jax.tree.structure(variables))
  cotangent = jnp.asarray(rng.uniform(
      -1, 1, (4, models.feature_dim(config))), jnp.float32)

  def features_and_grads(encoder_module):
    def loss(params):
      out, _ = encoder_module.apply(
          {**variables, 'params': params}, x, train=True,
          mutable=['batch_stats'])
      return jnp.sum(out * cotangent), out

    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  (fast_grads, fast_out), (ref_grads, ref_out) = (
      features_and_grads(fast), features_and_grads(reference))
  assert winograd_calls  # the Winograd path ran in the CPU encoder
  np.testing.assert_allclose(fast_out, ref_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(fast_grads),
                       jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
