"""A tiny SwAV run for tests and smoke checks: seconds on a 2-core CPU.

python -m jaxssl.main --config=configs/swav_tiny.py --workdir=/tmp/jaxssl_swav_tiny
Expected: finishes in about a minute; the numbers mean nothing (8 steps of a
2-layer CNN on 2,048 Fashion-MNIST images), only that every stage runs:
multi-crop (2 x 16 px + 2 x 8 px crops, SwAV's augmentation recipe),
frozen prototypes for 2 steps, a 64-row queue that starts at once and is
in use from step 3 on, export and linear evaluation.
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('swav')
  config_presets.fashion_mnist_tiny(c)

  c.augment.recipe = 'swav'
  c.augment.crop_sampler = 'torchvision'
  c.augment.resize_method = 'bilinear'
  c.augment.crop_area = (0.14, 1.0)
  c.augment.num_small_views = 2  # multi-crop: 2 x 16 px + 2 x 8 px
  c.augment.small_image_size = 8
  c.augment.small_crop_area = (0.05, 0.14)

  c.model.zero_init_residual = False
  c.model.input_normalization = 'swav'

  c.head.num_layers = 2
  c.head.hidden_dim = 32
  c.head.output_dim = 16

  c.optim.name = 'lars'
  c.optim.lars_variant = 'larc'
  c.optim.exclude = 'none'
  c.optim.base_learning_rate = 0.3
  c.optim.lr_scaling = 'none'
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 0.0
  c.optim.final_lr = 0.0003

  c.swav.num_prototypes = 10
  c.swav.freeze_prototypes_niters = 2
  c.swav.queue_length = 64  # two global batches
  c.swav.epoch_queue_starts = 0.0
  return c
