"""The one declaration of every config key, and the start-up checks on them.

Each file in `configs/` calls `defaults(method)` and then sets the values of
its recipe, so every run's config declares every key (and is locked by
`jaxssl.main`). Code reads keys directly; nothing is read with a default deep
in the code. `validate(config)` runs before anything is built or compiled and
raises a one-line `ValueError` naming the bad value and what is allowed.
"""

import difflib
import math

import ml_collections

from jaxssl import cpu_kernels
from jaxssl import methods
from jaxssl import models
from jaxssl.augment import recipes


# Larger views overflow the int32 pixel counts of the crop sampler and of
# XLA's index arithmetic (100000 px failed inside jit).
MAX_IMAGE_SIZE = 4096


def defaults(method: str = 'simclr') -> ml_collections.ConfigDict:
  """Returns a config with every key declared, at SimCLR-style defaults.

  Args:
    method: registry name of the pretraining method; its own section
      (`config.<method>`) comes from the method's `default_config()`.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = method
  c.global_batch_size = 256  # images per step, all processes together
  # Micro-batches per step: the forwards run on global_batch_size /
  # accumulation_steps examples at a time, the gradient stays the whole
  # batch's (jaxssl.methods.micro_batches; BatchNorm per micro-batch).
  c.accumulation_steps = 1
  c.num_epochs = 100.0  # pretraining length in epochs of the train split
  c.num_train_steps = -1  # > 0 overrides num_epochs (smoke runs, tests)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_after_training = False  # linear evaluation at the end of `train`
  # > 0: every this many steps, kNN and health metrics of the encoder on
  # the eval splits (as --mode=eval's), logged; 0: off.
  c.eval_every_steps = 0
  # Write training_curves.png and knn_retrieval.png into the workdir at the
  # end of `train` (any workdir: --mode=pictures).
  c.pictures_after_training = True
  # Encoder ops, a runtime choice (not saved with exported encoders):
  # 'auto' = jaxssl.cpu_kernels on a 1-device CPU process, else XLA's ops;
  # 'cpu' | 'xla' force one (jaxssl.cpu_kernels.select_factories).
  c.kernels = 'auto'

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'fashion_mnist'  # tfds name, or 'image_folder'
  c.dataset.data_dir = ''  # '' = $TFDS_DATA_DIR or the tfds default
  c.dataset.image_folder = ''  # root holding <split>/<class>/<image> files
  c.dataset.train_split = 'train'
  c.dataset.eval_train_split = 'train'  # linear-probe training split
  c.dataset.eval_test_split = 'test'  # linear-probe report split
  c.dataset.image_size = 224  # side of every view and eval crop
  c.dataset.shuffle_buffer = 10_000
  c.dataset.cache = False  # keep the decoded train split in host memory
  c.dataset.num_shards = 0  # contiguous parts of the split; 0 = processes

  c.augment = ml_collections.ConfigDict()
  # SimCLR's recipe; augment.recipe_defaults(name) gives the other recipes'
  # official values (docs/data.md has the table).
  c.augment.recipe = 'simclr'  # simclr | byol | moco_v2 | moco_v3 | swav
  c.augment.num_views = 2  # global crops per image
  c.augment.crop_sampler = 'tf'  # 'tf' | 'byol' | 'torchvision'
  c.augment.crop_area = (0.08, 1.0)
  c.augment.crop_aspect = (3 / 4, 4 / 3)
  c.augment.resize_method = 'bicubic'  # 'bicubic' | 'bilinear'
  c.augment.flip = True
  c.augment.color_strength = 1.0  # SimCLR's s, used when color_jitter = ()
  c.augment.color_jitter = ()  # (b, c, s, h); () = (.8s, .8s, .8s, .2s)
  c.augment.color_prob = 0.8
  c.augment.grayscale_prob = 0.2
  c.augment.brightness = 'multiplicative'  # SimCLR v2; 'additive' = v1
  c.augment.blur_prob = 0.5  # 0 disables (CIFAR recipe)
  c.augment.view_blur_probs = ()  # per view; () = blur_prob for every view
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.view_solarize_probs = ()  # per view; () = never
  c.augment.num_small_views = 0  # multi-crop small crops per image (SwAV)
  c.augment.small_image_size = 96
  c.augment.small_crop_area = (0.05, 0.14)

  c.model = ml_collections.ConfigDict()
  c.model.encoder = 'resnet50'
  c.model.width_multiplier = 1
  c.model.stem = 'auto'  # 'auto' = CIFAR stem iff image_size <= 32
  c.model.dtype = 'float32'  # compute dtype; params stay float32
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5
  c.model.zero_init_residual = True
  # mean/std normalisation as the encoder's first op: 'none' (SimCLR feeds
  # [0, 1] pixels) | 'imagenet' (BYOL, MoCo) | 'swav' (std 0.228)
  c.model.input_normalization = 'none'

  c.head = ml_collections.ConfigDict()
  c.head.num_layers = 3  # SimCLR v2 projection head
  c.head.hidden_dim = 0  # 0 = the encoder's feature dimension
  c.head.output_dim = 128

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'lars'
  c.optim.lars_variant = 'simclr'  # lr inside the momentum buffer
  c.optim.exclude = 'bias_and_norm'
  c.optim.base_learning_rate = 0.075
  c.optim.lr_scaling = 'sqrt'  # 'linear' (x B/256) | 'sqrt' (x sqrt B)
  c.optim.weight_decay = 1e-6
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.trust_coefficient = 1e-3
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_epochs = 10.0
  c.optim.warmup_start_lr = 0.0
  c.optim.final_lr = 0.0

  # Linear evaluation: 'fast' (fixed centre-crop features) and/or 'paper'
  # (SimCLR's: augmented crops through the frozen encoder every epoch);
  # both use the keys below (docs/evaluation.md).
  c.linear_eval = ml_collections.ConfigDict()
  c.linear_eval.protocols = ('fast',)
  c.linear_eval.num_epochs = 90
  c.linear_eval.paper_num_epochs = 0  # 'paper': 0 = num_epochs
  c.linear_eval.batch_size = 1024
  c.linear_eval.base_learning_rate = 0.1
  c.linear_eval.lr_scaling = 'linear'
  c.linear_eval.weight_decay = 0.0
  c.linear_eval.momentum = 0.9
  c.linear_eval.nesterov = True
  c.linear_eval.feature_batch_size = 1024
  c.linear_eval.standardize = True  # 'fast': per-dim mean/std of features
  c.linear_eval.random_init_baseline = True

  # Weighted cosine kNN on frozen features (InstDisc, DINO `eval_knn.py`):
  # votes exp(cos / T) from the k nearest train features.
  c.knn_eval = ml_collections.ConfigDict()
  c.knn_eval.enabled = True
  c.knn_eval.ks = (20, 200)
  c.knn_eval.temperature = 0.07
  c.knn_eval.block_size = 4096  # train features per device scan step

  # RankMe, alignment and uniformity (t = 2) of the first num_samples images
  # of dataset.eval_test_split, at each evaluation.
  c.health = ml_collections.ConfigDict()
  c.health.enabled = True
  c.health.num_samples = 4096

  # A linear classifier trained during pretraining on stop-gradient encoder
  # features and the batch labels (jaxssl.online_probe); its train top-1
  # is logged as online_probe_top1.
  c.online_probe = ml_collections.ConfigDict()
  c.online_probe.enabled = True

  # Fine-tuning the whole encoder on class-balanced fractions of
  # dataset.eval_train_split's labels in --mode=eval (and after training);
  # the random-init row is the same training from scratch. SimCLR v2's
  # recipe: LARS, 0.005 · sqrt(B), no weight decay, no warmup.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.fractions = ()  # e.g. (0.01, 0.1); () = off
  c.finetune.num_epochs = 0  # 0: 60 below a 10% fraction, else 30
  c.finetune.batch_size = 1024
  c.finetune.optimizer = 'lars'  # 'lars' | 'nesterov'
  c.finetune.base_learning_rate = 0.005
  c.finetune.lr_scaling = 'sqrt'
  c.finetune.weight_decay = 0.0
  c.finetune.momentum = 0.9
  c.finetune.subset_seed = 0  # which examples of each class are labelled

  c[method] = methods.get_method_class(method).default_config()
  return c


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _check_choice(name: str, value, allowed) -> None:
  _require(value in allowed,
           f'{name}={value!r} is not allowed; choose one of '
           f'{", ".join(map(repr, allowed))}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every value that can be checked without data or devices.

  Raises:
    ValueError: one line naming the bad key, its value and what is allowed.
  """
  methods.get_method_class(config.method)  # unknown method -> ValueError
  _require(config.method in config,
           f'config has no section {config.method!r} for method='
           f'{config.method!r}; build it with config_schema.defaults('
           f'{config.method!r})')
  check_declared_keys(config)
  _require(config.global_batch_size > 0,
           f'global_batch_size={config.global_batch_size} must be positive')
  _require(config.accumulation_steps > 0
           and config.global_batch_size % config.accumulation_steps == 0,
           f'accumulation_steps={config.accumulation_steps} must be a '
           f'positive divisor of global_batch_size='
           f'{config.global_batch_size}')
  _require(config.num_train_steps > 0 or config.num_epochs > 0,
           f'num_epochs={config.num_epochs} must be positive when '
           f'num_train_steps={config.num_train_steps} is not set')
  for key in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    _require(config[key] > 0, f'{key}={config[key]} must be positive')
  for key in ('image_size',):
    _require(0 < config.dataset[key] <= MAX_IMAGE_SIZE,
             f'dataset.{key}={config.dataset[key]} must be in 1 .. '
             f'{MAX_IMAGE_SIZE}')
  _require(0 < config.augment.small_image_size <= MAX_IMAGE_SIZE,
           f'augment.small_image_size={config.augment.small_image_size} must '
           f'be in 1 .. {MAX_IMAGE_SIZE}')
  _require(config.dataset.num_shards >= 0,
           f'dataset.num_shards={config.dataset.num_shards} must be >= 0')
  recipes.check_config(config.augment)
  models.validate_model_config(config.model)
  _require(config.kernels in cpu_kernels.KERNELS,
           f'unknown kernels {config.kernels!r}; known: '
           f"{', '.join(cpu_kernels.KERNELS)}")
  _require(config.head.num_layers >= 0 and config.head.output_dim > 0,
           f'head.num_layers={config.head.num_layers} must be >= 0 and '
           f'head.output_dim={config.head.output_dim} positive')
  _validate_optim(config.optim, 'optim')
  _validate_linear_eval(config.linear_eval)
  _validate_knn_eval(config.knn_eval)
  _validate_finetune(config.finetune)
  _require(config.eval_every_steps >= 0,
           f'eval_every_steps={config.eval_every_steps} must be >= 0 (0: off)')
  _require(config.health.num_samples >= 2,
           f'health.num_samples={config.health.num_samples} must be >= 2 '
           '(uniformity needs a pair)')
  methods.get_method_class(config.method).validate_config(config)


def dotted_keys(config: ml_collections.ConfigDict, prefix: str = ''):
  """Every leaf key of `config` as a dotted name, sections recursed into."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from dotted_keys(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


def check_declared_keys(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError if `config`'s keys differ from `defaults(method)`'s.

  A misspelt key set in a config file (`c.optim.base_learing_rate = 5.0`)
  would otherwise become a new key that nothing reads, and the run would
  train at the default value; the error names the closest declared key.
  """
  declared = list(dotted_keys(defaults(config.method)))
  present = list(dotted_keys(config))
  for key in present:
    if key not in declared:
      closest = difflib.get_close_matches(key, declared, n=1, cutoff=0.0)
      raise ValueError(
          f'config key {key} is not declared (closest declared key: '
          f'{closest[0]}); config files may only set the keys of '
          'config_schema.defaults')
  missing = [key for key in declared if key not in present]
  if missing:
    raise ValueError(f'config lacks the declared key {missing[0]}; build it '
                     'with config_schema.defaults(method)')


def _validate_optim(optim, prefix: str) -> None:
  _require(math.isfinite(optim.base_learning_rate)
           and optim.base_learning_rate > 0,
           f'{prefix}.base_learning_rate={optim.base_learning_rate} must be a '
           'positive number')
  _require(optim.weight_decay >= 0,
           f'{prefix}.weight_decay={optim.weight_decay} must be >= 0')
  _require(0 <= optim.momentum < 1,
           f'{prefix}.momentum={optim.momentum} must be in [0, 1)')
  _require(optim.warmup_epochs >= 0,
           f'{prefix}.warmup_epochs={optim.warmup_epochs} must be >= 0')


def _validate_knn_eval(ke) -> None:
  ks = tuple(ke.ks) if isinstance(ke.ks, (tuple, list)) else ()
  _require(bool(ks) and all(isinstance(k, int) and not isinstance(k, bool)
                            and k > 0 for k in ks),
           f'knn_eval.ks={ke.ks!r} must be a non-empty tuple of positive '
           'integers, e.g. (20, 200)')
  _require(math.isfinite(ke.temperature) and ke.temperature > 0,
           f'knn_eval.temperature={ke.temperature} must be a positive number')
  _require(ke.block_size > 0,
           f'knn_eval.block_size={ke.block_size} must be positive')


def _validate_finetune(ft) -> None:
  fractions = ft.fractions if isinstance(ft.fractions, (tuple, list)) else (
      None,)
  _require(all(isinstance(f, (int, float)) and not isinstance(f, bool)
               and 0 < f <= 1 for f in fractions),
           f'finetune.fractions={ft.fractions!r} must be a tuple of numbers '
           'in (0, 1], e.g. (0.01, 0.1)')
  _require(ft.num_epochs >= 0 and ft.batch_size > 0,
           f'finetune.num_epochs={ft.num_epochs} must be >= 0 (0: SimCLR '
           f"v2's) and finetune.batch_size={ft.batch_size} positive")
  _require(math.isfinite(ft.base_learning_rate) and ft.base_learning_rate > 0,
           f'finetune.base_learning_rate={ft.base_learning_rate} must be a '
           'positive number')
  _check_choice('finetune.optimizer', ft.optimizer, ('lars', 'nesterov'))
  _check_choice('finetune.lr_scaling', ft.lr_scaling,
                ('linear', 'sqrt', 'none'))
  _require(ft.weight_decay >= 0 and 0 <= ft.momentum < 1,
           f'finetune.weight_decay={ft.weight_decay} must be >= 0 and '
           f'finetune.momentum={ft.momentum} in [0, 1)')


def _validate_linear_eval(le) -> None:
  protocols = le.protocols if isinstance(le.protocols, (tuple, list)) else (
      le.protocols,)
  _require(bool(protocols) and all(p in ('fast', 'paper') for p in protocols)
           and len(set(protocols)) == len(protocols),
           f'linear_eval.protocols={le.protocols!r} must be a non-empty tuple '
           "of distinct protocols from 'fast', 'paper'")
  _require(le.paper_num_epochs >= 0,
           f'linear_eval.paper_num_epochs={le.paper_num_epochs} must be >= 0 '
           '(0: linear_eval.num_epochs)')
  _require(le.num_epochs > 0 and le.batch_size > 0
           and le.feature_batch_size > 0,
           f'linear_eval.num_epochs={le.num_epochs}, batch_size='
           f'{le.batch_size} and feature_batch_size={le.feature_batch_size} '
           'must be positive')
  _require(math.isfinite(le.base_learning_rate) and le.base_learning_rate > 0,
           f'linear_eval.base_learning_rate={le.base_learning_rate} must be '
           'a positive number')
  _check_choice('linear_eval.lr_scaling', le.lr_scaling,
                ('linear', 'sqrt', 'none'))
