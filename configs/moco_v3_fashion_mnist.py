"""MoCo v3 on offline Fashion-MNIST on a CPU, then its evaluation.

python -m jaxssl.main --config=configs/moco_v3_fashion_mnist.py --workdir=workdirs/moco_v3_fmnist
Expected: on the 10,000 test images, against the same encoder at random
init, linear 87.94% vs 85.40%, kNN-20 85.92% vs 83.91%, kNN-200 82.89% vs
79.29%, and 77.17% after fine-tuning on 1% of the labels vs 68.97% trained
from scratch on them; pretraining took 8m53s on a 2-core CPU (2026-12-07 at
a75c3a1; docs/results.md has the measured runs, with the paper linear
protocol and 10% of the labels).

Differences from the ImageNet recipe (configs/moco_v3_tpu.py), for ten
minutes of CPU: `small_cnn` with a 256-d dense representation, the SimCLR
CPU views with crop area 0.2-1, AdamW (lr 1e-3) instead of LARS, 512-d
projector and predictor hidden layers, τ = 0.2, and base momentum 0.98
(0.99 in the paper) so the key encoder moves within 819 steps; chosen by
a sweep (docs/results.md).
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('moco_v3')
  config_presets.fashion_mnist_cpu(c)

  c.num_epochs = 3.5

  c.augment.crop_area = (0.2, 1.0)

  c.head.num_layers = 2
  c.head.hidden_dim = 512
  c.head.output_dim = 128

  c.optim.exclude = 'ndim'
  c.optim.schedule = 'warmup_cosine'

  c.moco_v3.temperature = 0.2
  c.moco_v3.base_momentum = 0.98
  c.moco_v3.predictor_hidden_dim = 512
  c.moco_v3.predictor_num_layers = 2
  return c
