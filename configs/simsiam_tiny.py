"""A tiny SimSiam run for tests and smoke checks: seconds on a 2-core CPU.

python -m jaxssl.main --config=configs/simsiam_tiny.py --workdir=/tmp/jaxssl_simsiam_tiny
Expected: finishes in about a minute; the numbers mean nothing (8 steps of a
2-layer CNN on 2,048 Fashion-MNIST images), only that every stage runs.
"""

from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('simsiam')
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

  c.augment.color_strength = 0.5
  c.augment.blur_prob = 0.0

  c.model.encoder = 'tiny_cnn'
  c.model.dtype = 'float32'

  c.head.num_layers = 3  # SimSiam projector: 2 x (Linear-BN-ReLU), Linear-BN
  c.head.hidden_dim = 0  # = 16, the encoder's feature dimension
  c.head.output_dim = 32

  c.optim.name = 'sgd'
  c.optim.exclude = 'none'  # torch SGD decays every parameter
  c.optim.base_learning_rate = 0.05
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine_per_epoch'
  c.optim.warmup_epochs = 0.0

  c.simsiam.predictor_hidden_dim = 8

  c.linear_eval.num_epochs = 5
  c.linear_eval.batch_size = 256
  c.linear_eval.base_learning_rate = 0.1
  c.linear_eval.feature_batch_size = 256
  return c
