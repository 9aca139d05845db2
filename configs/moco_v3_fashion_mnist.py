"""MoCo v3 on offline Fashion-MNIST on a CPU, then linear eval.

python -m jaxssl.main --config=configs/moco_v3_fashion_mnist.py --workdir=workdirs/moco_v3_fmnist
Expected: about 87.2% linear-probe top-1, about 1.9 points above the same
encoder at random init (85.4%): short of the 2-point goal of issue 4;
measured 87.24% in 18m38s on the 2-core CPU while it was shared with other
jobs (docs/results.md).
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('moco_v3')
  config_presets.fashion_mnist_cpu(c)

  c.num_epochs = 2.0

  c.augment.crop_area = (0.2, 1.0)

  c.head.num_layers = 2
  c.head.hidden_dim = 512
  c.head.output_dim = 128

  c.optim.exclude = 'ndim'
  c.optim.schedule = 'warmup_cosine'

  c.moco_v3.temperature = 0.2
  c.moco_v3.base_momentum = 0.99
  c.moco_v3.predictor_hidden_dim = 512
  c.moco_v3.predictor_num_layers = 2
  return c
