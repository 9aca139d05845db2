"""A tiny MoCo v3 run for tests and smoke checks: seconds on a 2-core CPU.

python -m jaxssl.main --config=configs/moco_v3_tiny.py --workdir=/tmp/jaxssl_moco_v3_tiny
Expected: finishes in about a minute; the numbers mean nothing (8 steps of a
2-layer CNN on 2,048 Fashion-MNIST images), only that every stage runs.
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('moco_v3')
  config_presets.fashion_mnist_tiny(c)

  c.augment.crop_area = (0.2, 1.0)

  c.head.num_layers = 2
  c.head.hidden_dim = 32
  c.head.output_dim = 16

  c.optim.name = 'lars'
  c.optim.lars_variant = 'after'
  c.optim.exclude = 'ndim'
  c.optim.base_learning_rate = 0.6
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-6
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_epochs = 0.0

  c.moco_v3.temperature = 1.0
  c.moco_v3.base_momentum = 0.99
  c.moco_v3.predictor_hidden_dim = 32
  c.moco_v3.predictor_num_layers = 2
  return c
