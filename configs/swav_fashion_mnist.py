"""SwAV on offline Fashion-MNIST on a CPU, then its evaluation.

python -m jaxssl.main --config=configs/swav_fashion_mnist.py --workdir=workdirs/swav_fmnist
Expected: on the 10,000 test images, against the same encoder at random
init, linear 87.65% vs 85.40%, kNN-20 85.21% vs 83.91%, kNN-200 82.12% vs
79.29%, and 75.12% after fine-tuning on 1% of the labels vs 68.97% trained
from scratch on them; pretraining took 10m24s (with a test suite beside it)
on a 2-core CPU (2026-12-07 at a75c3a1; docs/results.md has the measured
runs, with the paper linear protocol and 10% of the labels).
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('swav')
  config_presets.fashion_mnist_cpu(c)

  c.num_epochs = 2.5

  c.model.zero_init_residual = False

  c.head.num_layers = 2
  c.head.hidden_dim = 0  # = 256, the encoder's feature dimension
  c.head.output_dim = 128

  c.optim.exclude = 'none'

  c.swav.num_prototypes = 64
  c.swav.temperature = 0.1
  c.swav.epsilon = 0.05
  c.swav.freeze_prototypes_niters = 100
  c.swav.queue_length = 0
  c.swav.epoch_queue_starts = 0.0
  return c
