"""MoCo v2 on offline Fashion-MNIST on a CPU, then linear eval.

python -m jaxssl.main --config=configs/moco_v2_fashion_mnist.py --workdir=workdirs/moco_v2_fmnist
Expected: about 88.3% linear-probe top-1, about 2.9 points above the same
encoder at random init (85.4%); measured 88.29% in 12m53s on the 2-core
CPU while it was shared with other jobs (docs/results.md).
Measured on 2026-11-22, before issue 15's re-layout (colour jitter,
grayscale, blur and solarize moved into the jitted step: same laws, other
random draws; the fused BatchNorm VJP removed); not re-measured since.
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
