"""SimSiam recipe: ResNet-50 on ImageNet, global batch 512, 100 epochs.

python -m jaxssl.main --config=configs/simsiam_tpu.py --workdir=gs://BUCKET/simsiam_r50
Expected: linear-eval top-1 68.1% after 100 epochs: the paper's figure
(Chen & He 2021, Table 4, with the predictor at a fixed learning rate), not
measured here; the official README reports 68.1% for this command. Launch
on a pod with launch/tpu.py (docs/scaling.md).

Hyper-parameters are facebookresearch/simsiam's README ImageNet command:
SGD with momentum 0.9, lr 0.05 x B/256 = 0.1, weight decay 1e-4 on every
parameter, cosine decay per epoch and no warmup, a 3-layer projector of
width 2048 (Linear-BN-ReLU twice, then Linear-BN without affine), a
2048 -> 512 -> 2048 predictor, MoCo v2's views (torchvision crop 0.2-1,
colour jitter 0.4/0.4/0.4/0.1 with p = 0.8, grey p = 0.2, blur p = 0.5,
flip) and ImageNet mean/std normalisation. Difference: the README keeps the
predictor at the initial lr (--fix-pred-lr); here it follows the cosine
with the rest (docs/methods.md; the paper's Table 1 has both settings).
"""

from jaxssl import augment
from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('simsiam')
  config_presets.imagenet_pod(c)

  c.global_batch_size = 512
  c.num_epochs = 100.0
  c.checkpoint_every_steps = 5004  # about 2 epochs

  c.dataset.shuffle_buffer = 10_000

  c.augment.update(augment.recipe_defaults('moco_v2'))

  c.model.dtype = 'bfloat16'
  c.model.input_normalization = 'imagenet'
  # torch BatchNorm: running = 0.9 running + 0.1 batch, eps 1e-5.
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5
  c.model.zero_init_residual = True  # as the official builder.py

  c.head.num_layers = 3
  c.head.hidden_dim = 0  # = 2048, the ResNet-50 feature dimension
  c.head.output_dim = 2048

  c.optim.name = 'sgd'
  c.optim.exclude = 'none'  # torch SGD decays every parameter
  c.optim.base_learning_rate = 0.05  # x 512/256 = 0.1
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-4
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.schedule = 'cosine_per_epoch'
  c.optim.warmup_epochs = 0.0
  c.optim.final_lr = 0.0

  c.simsiam.predictor_hidden_dim = 512

  # The official main_lincls.py: LARS, batch 4096, lr 0.02 x B/256 = 0.32,
  # 90 epochs, no weight decay; jaxssl's probe is Nesterov SGD (docs).
  # The paper's own protocol beside the fast one (--mode=eval on the pod).
  c.linear_eval.protocols = ('fast', 'paper')
  c.linear_eval.num_epochs = 90
  c.linear_eval.batch_size = 4096
  c.linear_eval.base_learning_rate = 0.02
  c.linear_eval.lr_scaling = 'linear'
  c.linear_eval.weight_decay = 0.0
  c.linear_eval.feature_batch_size = 4096
  return c
