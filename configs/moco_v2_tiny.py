"""A tiny MoCo v2 run for tests and smoke checks: seconds on a 2-core CPU.

python -m jaxssl.main --config=configs/moco_v2_tiny.py --workdir=/tmp/jaxssl_moco_v2_tiny
Expected: finishes in about a minute; the numbers mean nothing (8 steps of a
2-layer CNN on 2,048 Fashion-MNIST images), only that every stage runs. The
queue holds 4 batches, so it wraps around within the 8 steps.
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('moco_v2')
  config_presets.fashion_mnist_tiny(c)

  c.augment.crop_area = (0.2, 1.0)

  c.model.zero_init_residual = False

  c.head.num_layers = 2
  c.head.hidden_dim = 32
  c.head.output_dim = 16

  c.optim.name = 'sgd'
  c.optim.exclude = 'none'
  c.optim.base_learning_rate = 0.03
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine_per_epoch'
  c.optim.warmup_epochs = 0.0

  c.moco_v2.temperature = 0.2
  c.moco_v2.queue_size = 128
  c.moco_v2.momentum = 0.99
  c.moco_v2.bn_groups = 8  # per-device BN on 8 devices, split BN on 1
  return c
