"""MoCo v2 recipe: ResNet-50 on ImageNet, global batch 256, 200 epochs.

python -m jaxssl.main --config=configs/moco_v2_tpu.py --workdir=gs://BUCKET/moco_v2_r50
Expected: linear-eval top-1 67.5% after 200 epochs: the paper's figure
(Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning,
Table 1; facebookresearch/moco README), not measured here. Launch on a pod
slice with launch/tpu.py (docs/scaling.md).

Hyper-parameters are facebookresearch/moco's v2 command (`--lr 0.03
--batch-size 256 --mlp --moco-t 0.2 --aug-plus --cos`, 8 GPUs): SGD with
momentum 0.9 and weight decay 1e-4 on every parameter, lr 0.03 x B/256,
cosine evaluated once per epoch, queue K = 65536, key momentum 0.999,
temperature 0.2, MLP head 2048-2048-128 (Linear-ReLU-Linear, no BN), the
`aug_plus` views, ImageNet mean/std normalisation, torchvision ResNet-50
(no zero-init of the last BN in each block). Shuffle-BN statistics come
from groups of 32 images, as the official per-GPU batch on 8 GPUs:
`bn_groups = B / 32`, whatever the device count.
"""

from jaxssl import augment
from jaxssl import config_presets
from jaxssl import config_schema

# Images per BatchNorm group: the official per-GPU batch (256 on 8 GPUs).
_PER_GROUP_BATCH = 32


def get_config():
  c = config_schema.defaults('moco_v2')
  config_presets.imagenet_pod(c)

  c.global_batch_size = 256
  c.num_epochs = 200.0
  c.checkpoint_every_steps = 5004  # 1 epoch

  c.dataset.shuffle_buffer = 10_000

  c.augment.update(augment.recipe_defaults('moco_v2'))

  c.model.dtype = 'float32'  # the official run is fp32
  c.model.input_normalization = 'imagenet'
  c.model.zero_init_residual = False  # torchvision's default in moco
  # PyTorch BatchNorm: momentum 0.1 (0.9 here), eps 1e-5.
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5

  c.head.num_layers = 2  # Linear(2048)-ReLU-Linear(128)
  c.head.hidden_dim = 0  # = 2048, the ResNet-50 feature dimension
  c.head.output_dim = 128

  c.optim.name = 'sgd'
  c.optim.exclude = 'none'  # weight decay on BN and biases too
  c.optim.base_learning_rate = 0.03  # x B/256
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-4
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.schedule = 'cosine_per_epoch'
  c.optim.warmup_epochs = 0.0
  c.optim.final_lr = 0.0

  c.moco_v2.temperature = 0.2
  c.moco_v2.queue_size = 65536
  c.moco_v2.momentum = 0.999
  c.moco_v2.bn_groups = c.global_batch_size // _PER_GROUP_BATCH
  c.moco_v2.shuffle_bn = True

  # The official main_lincls.py: SGD momentum 0.9, lr 30 at batch 256, no
  # weight decay, 100 epochs (step decay at 60 and 80 there; this trainer's
  # linear eval uses its own schedule on frozen features).
  # The paper's own protocol beside the fast one (--mode=eval on the pod).
  c.linear_eval.protocols = ('fast', 'paper')
  c.linear_eval.num_epochs = 100
  c.linear_eval.batch_size = 256
  c.linear_eval.base_learning_rate = 30.0
  c.linear_eval.lr_scaling = 'linear'
  c.linear_eval.weight_decay = 0.0
  c.linear_eval.nesterov = False
  c.linear_eval.feature_batch_size = 1024
  return c
