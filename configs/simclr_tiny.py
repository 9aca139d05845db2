"""A tiny SimCLR run for tests and smoke checks: seconds on a 2-core CPU.

python -m jaxssl.main --config=configs/simclr_tiny.py --workdir=/tmp/jaxssl_tiny
Expected: finishes in about a minute; the numbers mean nothing (8 steps of a
2-layer CNN on 2,048 Fashion-MNIST images), only that every stage runs.
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('simclr')
  config_presets.fashion_mnist_tiny(c)

  c.head.num_layers = 2
  c.head.hidden_dim = 32
  c.head.output_dim = 16

  c.optim.base_learning_rate = 0.3
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 0.0

  c.simclr.temperature = 0.5
  return c
