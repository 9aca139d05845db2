"""BYOL recipe: ResNet-50 on ImageNet, global batch 4096, 1000 epochs.

python -m jaxssl.main --config=configs/byol_tpu.py --workdir=gs://BUCKET/byol_r50
Expected: linear-eval top-1 74.3% after 1000 epochs: the paper's figure
(Grill et al. 2020, Table 1), not measured here; the official README
reports 74.0-74.5% after about 8 h on 512 TPU v3 cores. Launch on a pod with
launch/tpu.py (docs/scaling.md).

Hyper-parameters are google-deepmind/deepmind-research `byol/` 1000-epoch
presets: LARS with the learning rate applied after momentum ('after'),
biases and BatchNorm parameters excluded from weight decay and adaptation,
lr 0.2 x B/256 = 3.2, 10 warmup epochs then cosine to 0, weight decay
1.5e-6, target EMA base 0.996 on the cosine schedule, projector and
predictor 4096 -> 256 (Linear-BN-ReLU-Linear), the asymmetric BYOL views
(blur p = 1.0 / 0.1, solarize p = 0 / 0.2, colour jitter 0.4/0.4/0.2/0.1
with p = 0.8) and ImageNet mean/std normalisation.

The official 300-epoch preset (72.5% in the paper's Figure 3 ablations):
num_epochs = 300, optim.base_learning_rate = 0.3, optim.weight_decay = 1e-6,
byol.base_ema = 0.99. The 100-epoch one: 0.45, 1e-6, 0.99.
"""

from jaxssl import augment
from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('byol')
  config_presets.imagenet_pod(c)

  c.global_batch_size = 4096
  c.num_epochs = 1000.0
  c.checkpoint_every_steps = 1251  # about 4 epochs

  c.dataset.shuffle_buffer = 40_960

  c.augment.update(augment.recipe_defaults('byol'))

  c.model.dtype = 'bfloat16'
  c.model.input_normalization = 'imagenet'
  # Haiku's BatchNorm defaults in the official ResNet: decay 0.9, eps 1e-5.
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5

  c.head.num_layers = 2  # projector Linear(4096)-BN-ReLU-Linear(256)
  c.head.hidden_dim = 4096
  c.head.output_dim = 256

  c.optim.name = 'lars'
  c.optim.lars_variant = 'after'
  c.optim.exclude = 'bias_and_norm'
  c.optim.base_learning_rate = 0.2  # x 4096/256 = 3.2
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1.5e-6
  c.optim.momentum = 0.9
  c.optim.trust_coefficient = 1e-3
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_epochs = 10.0
  c.optim.final_lr = 0.0

  c.byol.base_ema = 0.996
  c.byol.predictor_hidden_dim = 4096

  # The official linear eval: 80 epochs of Nesterov SGD, base lr 0.2 x B/256
  # (swept in the paper), no weight decay.
  # The paper's own protocol beside the fast one (--mode=eval on the pod).
  c.linear_eval.protocols = ('fast', 'paper')
  c.linear_eval.num_epochs = 80
  c.linear_eval.batch_size = 1024
  c.linear_eval.base_learning_rate = 0.2
  c.linear_eval.lr_scaling = 'linear'
  c.linear_eval.weight_decay = 0.0
  c.linear_eval.nesterov = True
  c.linear_eval.feature_batch_size = 4096
  return c
