"""Settings shared by the CPU configs: Fashion-MNIST runs and tiny test runs.

Every `configs/<method>_fashion_mnist.py` and `configs/<method>_tiny.py`
starts from `config_schema.defaults(method)`, applies one preset here, and
then sets what is its own (schedule length, heads, optimizer details, the
method's section). A preset assigns keys that `defaults()` declares; it adds
none, so a config still reads as the full list of its choices:
`python -m jaxssl.main --config=... --config.<key>=...` can override any of
them. docs/results.md has the measurements behind the values.
"""

import ml_collections


def fashion_mnist_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CPU recipe of the Fashion-MNIST configs (and the quickstart).

  - the whole 60,000-image train split at 28 px, cached and fully shuffled,
    global batch 256, a checkpoint every 200 steps, linear eval at the end;
  - SimCLR's CIFAR-style views at colour strength 0.5 and no blur (28 px
    grey images);
  - `small_cnn`: three conv stages and a learned 256-d dense representation;
  - AdamW at lr 1e-3 × B/256, weight decay 1e-6, a quarter-epoch warmup;
  - the linear probe of docs/results.md: 100 epochs at batch 512,
    lr 0.05 × 512/256 = 0.1, no weight decay;
  - kNN and health monitors every 300 steps, and fine-tuning on 1% of the
    labels (SimCLR v2's recipe) against training from scratch on them.

  Args:
    c: `config_schema.defaults(method)`; changed in place.

  Returns:
    `c`.
  """
  c.global_batch_size = 256
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.eval_after_training = True

  c.dataset.name = 'fashion_mnist'
  c.dataset.train_split = 'train'
  c.dataset.eval_train_split = 'train'
  c.dataset.eval_test_split = 'test'
  c.dataset.image_size = 28
  c.dataset.shuffle_buffer = 60_000  # the whole split: a full shuffle
  c.dataset.cache = True

  c.augment.color_strength = 0.5
  c.augment.blur_prob = 0.0

  c.model.encoder = 'small_cnn'

  c.optim.name = 'adamw'
  c.optim.base_learning_rate = 1e-3
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 0.25

  c.linear_eval.num_epochs = 100
  c.linear_eval.batch_size = 512
  c.linear_eval.base_learning_rate = 0.05  # x 512/256 = 0.1
  c.linear_eval.weight_decay = 0.0

  c.eval_every_steps = 300  # kNN and health monitors while pretraining
  c.finetune.fractions = (0.01,)  # 600 labels, and from scratch beside
  c.linear_eval.feature_batch_size = 1024
  return c


def fashion_mnist_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The seconds-long test runs: 8 steps of `tiny_cnn` at 16 px.

  Global batch 32 on 2,048 train images, checkpoints every 4 steps (2 kept),
  a 5-epoch linear probe and kNN on 1,024 / 512 images, health metrics on
  256: every stage of a run, none of its accuracy.

  Args:
    c: `config_schema.defaults(method)`; changed in place.

  Returns:
    `c`.
  """
  c.global_batch_size = 32
  c.num_epochs = 1.0
  c.num_train_steps = 8
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.keep_checkpoints = 2
  c.eval_after_training = True
  c.pictures_after_training = False
  c.eval_every_steps = 0

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

  c.linear_eval.num_epochs = 5
  c.linear_eval.batch_size = 256
  c.linear_eval.base_learning_rate = 0.1
  c.linear_eval.feature_batch_size = 256
  c.health.num_samples = 256
  return c


def imagenet_pod(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """ImageNet-1k pretraining of a ResNet-50 on a pod, as in the papers.

  tfds `imagenet2012` (manual download: see docs/data.md), 224 px views,
  the validation split for the linear probe, run separately with
  `--mode=eval` on the pod rather than after training. Batch, length,
  precision, shuffle buffer and checkpoint cadence are each paper's own.

  Args:
    c: `config_schema.defaults(method)`; changed in place.

  Returns:
    `c`.
  """
  c.log_every_steps = 100
  c.eval_after_training = False  # run --mode=eval separately on the pod

  c.dataset.name = 'imagenet2012'
  c.dataset.train_split = 'train'
  c.dataset.eval_train_split = 'train'
  c.dataset.eval_test_split = 'validation'
  c.dataset.image_size = 224
  c.dataset.cache = False

  c.model.encoder = 'resnet50'
  c.model.width_multiplier = 1
  return c
