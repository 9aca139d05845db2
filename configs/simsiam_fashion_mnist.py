"""SimSiam on offline Fashion-MNIST on a CPU, then linear eval.

python -m jaxssl.main --config=configs/simsiam_fashion_mnist.py --workdir=workdirs/simsiam_fmnist
Expected: 88.01% linear-probe top-1, 2.61 points above the same encoder at
random init (85.40%), in 10m28s on the 2-core CPU (docs/results.md; seeds
spread by about 0.4 point; 87.51% before the Winograd convolutions, which
change float32 rounding only).
Measured on 2026-11-22, before issue 15's re-layout (colour jitter,
grayscale, blur and solarize moved into the jitted step: same laws, other
random draws; the fused BatchNorm VJP removed); not re-measured since.

Differences from the ImageNet recipe (configs/simsiam_tpu.py), for ten
minutes of CPU: `small_cnn` with a 256-d dense representation, the SimCLR
CPU views with crop area 0.2-1, AdamW instead of SGD, and a 2-layer 256-d
projector with a 64-d predictor bottleneck (the paper's 2048/512 ratio is
kept at 4:1 by 256/64). The predictor keeps the peak learning rate, as the
official recipe (`simsiam.fix_predictor_lr`).
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('simsiam')
  config_presets.fashion_mnist_cpu(c)

  c.num_epochs = 5.0
  c.augment.crop_area = (0.2, 1.0)

  c.model.zero_init_residual = False

  c.head.num_layers = 2
  c.head.hidden_dim = 0  # = 256, the encoder's feature dimension
  c.head.output_dim = 256

  c.optim.exclude = 'none'

  c.simsiam.predictor_hidden_dim = 64
  return c
