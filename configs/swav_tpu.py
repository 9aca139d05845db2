"""SwAV recipe: ResNet-50 on ImageNet, global batch 4096, multi-crop, 800 epochs.

python -m jaxssl.main --config=configs/swav_tpu.py --workdir=gs://BUCKET/swav_r50
Expected: linear-eval top-1 75.3% after 800 epochs (paper figure, Caron et
al. 2020, Table 1 and the facebookresearch/swav README; not measured here).
Launch on a pod with launch/tpu.py (docs/scaling.md).

Hyper-parameters are facebookresearch/swav `scripts/swav_800ep_pretrain.sh`
(64 GPUs x 64 images) with `main_swav.py`'s defaults:
- multi-crop 2 x 224 px (crop area 0.14-1) + 6 x 96 px (0.05-0.14), codes
  from crops 0 and 1, torchvision-style views (colour jitter 0.8/0.8/0.8/
  0.2 with p 0.8, grayscale p 0.2, blur p 0.5 on every crop), mean/std
  normalisation with SwAV's std 0.228;
- projection head 2048 -> 2048 BN ReLU -> 128, L2 norm, 3000 prototypes,
  temperature 0.1, Sinkhorn epsilon 0.05 with 3 iterations;
- SGD momentum 0.9 wrapped in apex LARC (trust coefficient 0.001, clip
  False, nothing excluded), lr linear from 0.3 to 4.8 over 10 epochs then
  cosine to 0.0048, weight decay 1e-6, no gradient clipping;
- prototypes frozen for 313 iterations (about one epoch at B = 4096);
- apex SyncBN in groups of 8 GPUs = 512 examples per BN group;
- no queue: the script sets `queue_length 0` (3840 starting at epoch 15 is
  the batch-256 recipe; at B = 4096 it would truncate to 0 anyway, being
  shorter than one global batch);
- mixed precision (apex O1 there, bfloat16 compute here; Sinkhorn and the
  loss run in float32).
Linear evaluation follows `eval_linear.py`: 100 epochs, batch 256, lr 0.3,
weight decay 1e-6, no Nesterov; it trains on precomputed centre-crop
features, where the official one augments with random crops.
"""

from jaxssl import config_presets
from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('swav')
  config_presets.imagenet_pod(c)

  c.global_batch_size = 4096
  c.num_epochs = 800.0
  c.checkpoint_every_steps = 1248  # about 4 epochs of 312 steps

  c.dataset.shuffle_buffer = 40_960

  c.augment.recipe = 'swav'
  c.augment.num_views = 2
  c.augment.crop_sampler = 'torchvision'
  c.augment.crop_area = (0.14, 1.0)
  c.augment.crop_aspect = (3 / 4, 4 / 3)
  c.augment.resize_method = 'bilinear'
  c.augment.flip = True
  c.augment.color_jitter = (0.8, 0.8, 0.8, 0.2)
  c.augment.color_prob = 0.8
  c.augment.grayscale_prob = 0.2
  c.augment.blur_prob = 0.5  # every crop, the small ones included
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.view_blur_probs = ()
  c.augment.view_solarize_probs = ()
  c.augment.num_small_views = 6
  c.augment.small_image_size = 96
  c.augment.small_crop_area = (0.05, 0.14)

  c.model.dtype = 'bfloat16'
  c.model.zero_init_residual = False  # src/resnet50.py default
  c.model.input_normalization = 'swav'

  c.head.num_layers = 2
  c.head.hidden_dim = 2048  # hidden_mlp
  c.head.output_dim = 128  # feat_dim

  c.optim.name = 'lars'
  c.optim.lars_variant = 'larc'
  c.optim.exclude = 'none'
  c.optim.base_learning_rate = 4.8
  c.optim.lr_scaling = 'none'  # 4.8 is the lr at B = 4096
  c.optim.weight_decay = 1e-6
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.trust_coefficient = 1e-3
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_epochs = 10.0
  c.optim.warmup_start_lr = 0.3
  c.optim.final_lr = 0.0048

  c.swav.num_prototypes = 3000
  c.swav.temperature = 0.1
  c.swav.epsilon = 0.05
  c.swav.sinkhorn_iterations = 3
  c.swav.crops_for_assign = (0, 1)
  c.swav.freeze_prototypes_niters = 313
  c.swav.queue_length = 0
  c.swav.epoch_queue_starts = 15.0
  c.swav.bn_examples_per_group = 512  # 8 GPUs x 64 images

  # The paper's own protocol beside the fast one (--mode=eval on the pod).
  c.linear_eval.protocols = ('fast', 'paper')
  c.linear_eval.num_epochs = 100
  c.linear_eval.batch_size = 256
  c.linear_eval.base_learning_rate = 0.3
  c.linear_eval.lr_scaling = 'linear'  # x 256/256
  c.linear_eval.weight_decay = 1e-6
  c.linear_eval.nesterov = False
  c.linear_eval.standardize = False
  c.linear_eval.feature_batch_size = 4096
  return c
