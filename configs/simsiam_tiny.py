"""A tiny SimSiam run for tests and smoke checks: seconds on a 2-core CPU.

python -m jaxssl.main --config=configs/simsiam_tiny.py --workdir=/tmp/jaxssl_simsiam_tiny
Expected: finishes in about a minute; the numbers mean nothing (8 steps of a
2-layer CNN on 2,048 Fashion-MNIST images), only that every stage runs.
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('simsiam')
  config_presets.fashion_mnist_tiny(c)

  c.head.num_layers = 3  # SimSiam projector: 2 x (Linear-BN-ReLU), Linear-BN
  c.head.hidden_dim = 0  # = 16, the encoder's feature dimension
  c.head.output_dim = 32

  c.optim.name = 'sgd'
  c.optim.exclude = 'none'  # torch SGD decays every parameter
  c.optim.base_learning_rate = 0.05
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine_per_epoch'
  c.optim.warmup_epochs = 0.0

  c.simsiam.predictor_hidden_dim = 8
  return c
