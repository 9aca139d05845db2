"""SimCLR on CIFAR-10: ResNet-18 with the CIFAR stem (the README recipe).

python -m jaxssl.main --config=configs/simclr_cifar10.py --workdir=workdirs/simclr_cifar10
Expected: about 91% linear-eval top-1 after 1000 epochs (google-research/
simclr README: "around 91%" with ResNet-18, "not very well tuned"; see
google-research/simclr#90). Needs a GPU or TPU; on a 2-core CPU one epoch
takes hours. Needs the tfds `cifar10` dataset (downloaded by tfds, or
prepared under TFDS_DATA_DIR).

README command: --train_batch_size=512 --train_epochs=1000
--learning_rate=1.0 (linear scaling: 2.0 at B=512) --weight_decay=1e-4
--temperature=0.5 --image_size=32 --resnet_depth=18 --use_blur=False
--color_jitter_strength=0.5.
"""

from jaxssl import config_schema


def get_config():
  c = config_schema.defaults('simclr')
  c.global_batch_size = 512
  c.num_epochs = 1000.0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 970  # about 10 epochs
  c.eval_after_training = True

  c.dataset.name = 'cifar10'
  c.dataset.train_split = 'train'
  c.dataset.eval_train_split = 'train'
  c.dataset.eval_test_split = 'test'
  c.dataset.image_size = 32
  c.dataset.shuffle_buffer = 25_600  # 50 x the batch for <= 32 px, as SimCLR
  c.dataset.cache = True

  c.augment.color_strength = 0.5
  c.augment.blur_prob = 0.0

  c.model.encoder = 'resnet18'
  c.model.stem = 'cifar'

  c.head.num_layers = 3
  c.head.hidden_dim = 0
  c.head.output_dim = 128

  c.optim.base_learning_rate = 1.0
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 10.0

  c.simclr.temperature = 0.5

  c.linear_eval.num_epochs = 100
  c.linear_eval.batch_size = 512
  c.linear_eval.base_learning_rate = 0.1
  c.linear_eval.weight_decay = 0.0
  c.linear_eval.feature_batch_size = 1000
  return c
