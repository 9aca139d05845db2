"""MoCo v2 on offline Fashion-MNIST on a CPU, then its evaluation.

python -m jaxssl.main --config=configs/moco_v2_fashion_mnist.py --workdir=workdirs/moco_v2_fmnist
Expected: on the 10,000 test images, against the same encoder at random
init, linear 87.48% vs 85.40%, kNN-20 85.77% vs 83.91%, kNN-200 82.69% vs
79.29%, and 77.26% after fine-tuning on 1% of the labels vs 68.97% trained
from scratch on them; pretraining took 8m40s on a 2-core CPU (2026-12-07 at
a75c3a1; docs/results.md has the measured runs, with the paper linear
protocol and 10% of the labels).
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('moco_v2')
  config_presets.fashion_mnist_cpu(c)

  c.num_epochs = 3.0

  c.augment.crop_area = (0.2, 1.0)

  c.model.zero_init_residual = False

  c.head.num_layers = 2
  c.head.hidden_dim = 0
  c.head.output_dim = 128

  c.optim.exclude = 'none'
  c.optim.schedule = 'warmup_cosine'

  c.moco_v2.temperature = 0.2
  c.moco_v2.queue_size = 4096
  c.moco_v2.momentum = 0.99
  c.moco_v2.bn_groups = 8
  return c
