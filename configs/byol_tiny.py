"""A tiny BYOL run for tests and smoke checks: seconds on a 2-core CPU.

python -m jaxssl.main --config=configs/byol_tiny.py --workdir=/tmp/jaxssl_byol_tiny
Expected: finishes in about a minute; the numbers mean nothing (8 steps of a
2-layer CNN on 2,048 Fashion-MNIST images), only that every stage runs:
online and target forwards, the EMA, checkpoints, export and linear eval.
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('byol')
  config_presets.fashion_mnist_tiny(c)

  c.head.num_layers = 2  # BYOL projector: Linear-BN-ReLU-Linear
  c.head.hidden_dim = 32
  c.head.output_dim = 16

  c.optim.name = 'lars'
  c.optim.lars_variant = 'after'  # BYOL: lr applied after momentum
  c.optim.exclude = 'bias_and_norm'
  c.optim.base_learning_rate = 0.2
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1.5e-6
  c.optim.warmup_epochs = 0.0

  # A low base so that the target visibly moves within 8 steps.
  c.byol.base_ema = 0.9
  c.byol.predictor_hidden_dim = 32
  return c
