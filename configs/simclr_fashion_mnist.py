"""The CPU quickstart: SimCLR on offline Fashion-MNIST, then its evaluation.

python -m jaxssl.main --config=configs/simclr_fashion_mnist.py --workdir=workdirs/quickstart
Expected: on the 10,000 test images, against the same encoder at random
init, linear 87.76% vs 85.40%, kNN-20 86.00% vs 83.91%, kNN-200 82.82% vs
79.29%, and 76.73% after fine-tuning on 1% of the labels vs 68.97% trained
from scratch on them; 7m52s on a 2-core CPU from a fresh clone, virtualenv
and dataset preparation included (2026-12-07 at 7b2d5d9;
docs/results.md has the measured runs).

Run by `bash launch/local.sh quickstart`, which installs the data and the
environment first. Differences from the ImageNet recipe, each measured on
Fashion-MNIST within this CPU budget (docs/results.md):
- `small_cnn` (three conv stages and a learned 256-d dense representation)
  instead of a ResNet: 28 px grayscale images and about 7 minutes of CPU;
- AdamW (lr 1e-3 at batch 256) instead of LARS: over 2-3 epochs it reaches
  a better probe than LARS at any learning rate we tried;
- temperature 0.2 (0.5 in the CIFAR recipe), colour strength 0.5, no blur
  (images <= 32 px, as SimCLR's CIFAR recipe), 2-layer projection head.
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('simclr')
  config_presets.fashion_mnist_cpu(c)

  c.num_epochs = 2.5

  c.head.num_layers = 2
  c.head.hidden_dim = 0  # = 256, the encoder's feature dimension
  c.head.output_dim = 128

  c.simclr.temperature = 0.2
  return c
