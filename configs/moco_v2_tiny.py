"""A tiny MoCo v2 run for tests and smoke checks: seconds on a 2-core CPU.

python -m jaxssl.main --config=configs/moco_v2_tiny.py --workdir=/tmp/jaxssl_moco_v2_tiny
Expected: finishes in about a minute; the numbers mean nothing (8 steps of a
2-layer CNN on 2,048 Fashion-MNIST images), only that every stage runs. The
queue holds 4 batches, so it wraps around within the 8 steps.
"""

from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('moco_v2')
  c.global_batch_size = 32
  c.num_epochs = 1.0
  c.num_train_steps = 8
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.keep_checkpoints = 2
  c.eval_after_training = True

  c.dataset.name = 'fashion_mnist'
  c.dataset.train_split = 'train[:2048]'
  c.dataset.eval_train_split = 'train[:1024]'
  c.dataset.eval_test_split = 'test[:512]'
  c.dataset.image_size = 16
  c.dataset.shuffle_buffer = 512
  c.dataset.cache = True

  c.augment.crop_area = (0.2, 1.0)
  c.augment.color_strength = 0.5
  c.augment.blur_prob = 0.0

  c.model.encoder = 'tiny_cnn'
  c.model.dtype = 'float32'
  c.model.zero_init_residual = False

  c.head.num_layers = 2
  c.head.hidden_dim = 32
  c.head.output_dim = 16

  c.optim.name = 'sgd'
  c.optim.exclude = 'none'
  c.optim.base_learning_rate = 0.03
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine_per_epoch'
  c.optim.warmup_epochs = 0.0

  c.moco_v2.temperature = 0.2
  c.moco_v2.queue_size = 128
  c.moco_v2.momentum = 0.99
  c.moco_v2.bn_groups = 8  # per-device BN on 8 devices, split BN on 1

  c.linear_eval.num_epochs = 5
  c.linear_eval.batch_size = 256
  c.linear_eval.base_learning_rate = 0.1
  c.linear_eval.feature_batch_size = 256
  return c
