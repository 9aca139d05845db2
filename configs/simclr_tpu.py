"""SimCLR v2 recipe: ResNet-50 on ImageNet, global batch 4096, 100 epochs.

python -m jaxssl.main --config=configs/simclr_tpu.py --workdir=gs://BUCKET/simclr_r50
Expected: linear-eval top-1 about 64.5% after 100 epochs (google-research/
simclr README, its 90-epoch augmented linear eval); about 6 h on 32 TPU v3
cores (README). Launch on a pod with launch/tpu.py (docs/scaling.md).

Hyper-parameters are the README's v2 ImageNet command: LARS with lr
0.075·sqrt(B) = 4.8, weight decay 1e-6 (as asked for this recipe; the v2
README uses 1e-4), temperature 0.1, 10 warmup epochs then cosine to 0,
3-layer projection head, global BatchNorm, colour strength 1.0, blur p=0.5.
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('simclr')
  config_presets.imagenet_pod(c)

  c.global_batch_size = 4096
  c.num_epochs = 100.0
  c.checkpoint_every_steps = 1251  # about 4 epochs

  c.dataset.shuffle_buffer = 40_960  # 10 x the global batch, as SimCLR

  c.augment.color_strength = 1.0
  c.augment.blur_prob = 0.5

  c.model.dtype = 'bfloat16'

  c.head.num_layers = 3
  c.head.hidden_dim = 0  # = 2048, the ResNet-50 feature dimension
  c.head.output_dim = 128

  c.optim.base_learning_rate = 0.075
  c.optim.lr_scaling = 'sqrt'
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10.0

  c.simclr.temperature = 0.1

  # The paper's own protocol beside the fast one (--mode=eval on the pod).
  c.linear_eval.protocols = ('fast', 'paper')
  c.linear_eval.num_epochs = 90
  c.linear_eval.batch_size = 4096
  c.linear_eval.base_learning_rate = 0.1
  c.linear_eval.weight_decay = 1e-6
  c.linear_eval.feature_batch_size = 4096
  # SimCLR v2's semi-supervised results: the official 1% and 10% lists.
  c.finetune.fractions = (0.01, 0.1)
  return c
