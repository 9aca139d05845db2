"""MoCo v3 recipe: ResNet-50 on ImageNet, global batch 4096, 100 epochs.

python -m jaxssl.main --config=configs/moco_v3_tpu.py --workdir=gs://BUCKET/moco_v3_r50
Expected: linear-eval top-1 68.9% after 100 epochs: the paper's figure
(facebookresearch/moco-v3 CONFIG.md, ResNet-50 table; Chen, Xie & He 2021),
not measured here. Launch on a pod with launch/tpu.py (docs/scaling.md).

Hyper-parameters are moco-v3's ResNet-50 100-epoch command (`main_moco.py
--moco-m-cos --crop-min=.2` with its defaults): LARS with the learning rate
applied after momentum, parameters with ndim <= 1 excluded from weight
decay and adaptation, lr 0.6 x B/256 = 9.6, 10 warmup epochs then cosine,
weight decay 1e-6, temperature 1.0 (loss x 2τ), momentum encoder from
m0 = 0.99 on the cosine schedule, projector 2048-4096-256 (last BN without
affine), predictor 256-4096-256, SyncBN (global statistics per view),
`zero_init_residual=True`, the BYOL-style views with crop scale 0.2,
ImageNet mean/std normalisation, mixed precision (bf16 here).

CONFIG.md's other ResNet-50 presets: 300 epochs (72.8%): num_epochs = 300,
optim.base_learning_rate = 0.3; 1000 epochs (74.6%): num_epochs = 1000,
optim.base_learning_rate = 0.3, optim.weight_decay = 1.5e-6,
moco_v3.base_momentum = 0.996.
"""

from jaxssl import augment
from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('moco_v3')
  config_presets.imagenet_pod(c)

  c.global_batch_size = 4096
  c.num_epochs = 100.0
  c.checkpoint_every_steps = 1251  # about 4 epochs

  c.dataset.shuffle_buffer = 40_960

  c.augment.update(augment.recipe_defaults('moco_v3'))

  c.model.dtype = 'bfloat16'
  c.model.input_normalization = 'imagenet'
  c.model.zero_init_residual = True
  # PyTorch BatchNorm: momentum 0.1 (0.9 here), eps 1e-5.
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5

  c.head.num_layers = 2  # projector Linear(4096)-BN-ReLU-Linear(256)-BN
  c.head.hidden_dim = 4096
  c.head.output_dim = 256

  c.optim.name = 'lars'
  c.optim.lars_variant = 'after'
  c.optim.exclude = 'ndim'
  c.optim.base_learning_rate = 0.6  # x 4096/256 = 9.6
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-6
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.trust_coefficient = 1e-3
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_epochs = 10.0
  c.optim.warmup_start_lr = 0.0
  c.optim.final_lr = 0.0

  c.moco_v3.temperature = 1.0
  c.moco_v3.base_momentum = 0.99
  c.moco_v3.predictor_hidden_dim = 4096
  c.moco_v3.predictor_num_layers = 2

  # moco-v3's main_lincls.py: SGD momentum 0.9, lr 0.1 x B/256 (B = 1024),
  # no weight decay, 90 epochs with cosine.
  # The paper's own protocol beside the fast one (--mode=eval on the pod).
  c.linear_eval.protocols = ('fast', 'paper')
  c.linear_eval.num_epochs = 90
  c.linear_eval.batch_size = 1024
  c.linear_eval.base_learning_rate = 0.1
  c.linear_eval.lr_scaling = 'linear'
  c.linear_eval.weight_decay = 0.0
  c.linear_eval.nesterov = False
  c.linear_eval.feature_batch_size = 4096
  return c
