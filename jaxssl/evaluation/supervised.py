"""Supervised training on top of a pretrained encoder: the `paper` linear
protocol (frozen encoder) and fine-tuning (every layer trained).

Both train a zero-initialised `Dense(num_classes)` on the encoder's
features, from random resized crops and flips of the train images (no
colour, no blur: SimCLR's `preprocess_for_train` with `color_distort=False`,
crop area 0.08-1), redrawn every epoch, with a cosine learning rate from
its peak to 0 and no warmup, and report top-1/top-5 on the centre crops of
`dataset.eval_test_split`. The batches (`labelled_data`) are the same for
any process count that divides `dataset.num_shards`.

- `linear`: the encoder is frozen, BatchNorm in inference mode; Nesterov
  momentum SGD; the weight decay is an L2 term `wd · Σ w² / 2` on the
  classifier (kernel and bias) added to the loss, as SimCLR's
  `add_weight_decay` for its momentum optimizer.
- `finetune`: the encoder and the classifier are trained, BatchNorm in
  training mode over the global batch (SimCLR v2 `--global_bn=True`), with
  LARS (SimCLR's, lr inside the momentum buffer; biases, BN and the
  classifier excluded from decay and trust ratio, as `head_supervised`) or
  Nesterov SGD as above on every non-BN variable.

References:
  google-research/simclr `run.py` (`train_mode=finetune`), `data_util.py`,
  `model_util.py:add_weight_decay`; README (linear evaluation and
  semi-supervised fine-tuning commands).
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from jaxssl import datasets
from jaxssl import optim
from jaxssl import parallel
from jaxssl.evaluation import label_subsets
from jaxssl.evaluation import labelled_data
from jaxssl.evaluation import linear
from jaxssl.evaluation import features

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the classifier (and, fine-tuning, the encoder) is trained.

  Attributes:
    finetune: train the encoder too (else it is frozen).
    num_epochs: passes over the labelled examples.
    batch_size: global batch; at most the labelled examples, rounded down
      to a multiple of the device count.
    base_learning_rate: scaled by `lr_scaling` ('linear': × B/256,
      'sqrt': × √B, 'none').
    lr_scaling: see above.
    optimizer: 'momentum' or 'nesterov' (momentum SGD, L2 in the loss),
      or 'lars'.
    weight_decay: the L2 coefficient.
    momentum: the momentum.
    seed: shuffling and augmentation seed.
  """
  finetune: bool
  num_epochs: int
  batch_size: int
  base_learning_rate: float
  lr_scaling: str
  optimizer: str
  weight_decay: float
  momentum: float = 0.9
  seed: int = 0


def global_batch_size(recipe: Recipe, num_examples: int, multiple: int
                      ) -> int:
  """The recipe's batch, at most `num_examples`, a multiple of `multiple`
  (`labelled_data.batch_multiple`: the device and shard counts)."""
  batch = min(recipe.batch_size, num_examples) // multiple * multiple
  if batch < multiple:
    raise ValueError(f'{num_examples} labelled examples cannot fill a batch '
                     f'of {multiple} (one image per device and shard)')
  return batch


def _optimizer(recipe: Recipe, schedule) -> optax.GradientTransformation:
  if recipe.optimizer in ('momentum', 'nesterov'):
    return optax.sgd(schedule, momentum=recipe.momentum,
                     nesterov=recipe.optimizer == 'nesterov')
  if recipe.optimizer == 'lars':
    cfg = ml_collections.ConfigDict(dict(
        name='lars', lars_variant='simclr', exclude='bias_and_norm',
        weight_decay=recipe.weight_decay, momentum=recipe.momentum,
        nesterov=False, trust_coefficient=1e-3))
    # The classifier is excluded by name, as SimCLR's `head_supervised`:
    # a zero-initialised kernel would otherwise never leave zero's
    # neighbourhood (trust ratio 1e-3 · |w| / |g|).
    return optim.make_optimizer(
        cfg, schedule, also_exclude=lambda path, _: _key(path[0]) == 'head')
  raise ValueError(f"unknown optimizer '{recipe.optimizer}'; known: lars, "
                   'momentum, nesterov')


def _key(entry) -> str:
  return str(getattr(entry, 'key', entry))


def _is_batch_norm(path) -> bool:
  names = [_key(k).lower() for k in path]
  return any('bn' in n or 'norm' in n for n in names)


def _l2(params: PyTree) -> jax.Array:
  """Σ w² / 2 over the non-BatchNorm leaves (SimCLR's `add_weight_decay`
  for its momentum optimizer: every variable but BatchNorm's)."""
  terms = jax.tree_util.tree_map_with_path(
      lambda path, p: 0. if _is_batch_norm(path) else jnp.sum(jnp.square(p)),
      params)
  return 0.5 * sum(jax.tree.leaves(terms))


def _init_head(feature_dim: int, num_classes: int) -> PyTree:
  """SimCLR's `zero_init_logits_layer=True`."""
  return {'kernel': jnp.zeros((feature_dim, num_classes), jnp.float32),
          'bias': jnp.zeros((num_classes,), jnp.float32)}


def _make_step(encoder: nn.Module, recipe: Recipe, tx):
  """The jitted `(trainable, frozen, opt_state, batch) -> (trainable,
  frozen, opt_state, loss)` update; `trainable` holds the head (and, when
  fine-tuning, the encoder's params), `frozen` the encoder's variables
  that the gradient does not move."""

  def loss_fn(trainable, frozen, images, labels):
    if recipe.finetune:
      features, updates = encoder.apply(
          {'params': trainable['encoder'],
           'batch_stats': frozen['batch_stats']}, images, train=True,
          mutable=['batch_stats'])
      frozen = dict(frozen, batch_stats=updates['batch_stats'])
    else:
      features = jax.lax.stop_gradient(
          encoder.apply(frozen, images, train=False))
    head = trainable['head']
    logits = features.astype(jnp.float32) @ head['kernel'] + head['bias']
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    if recipe.optimizer != 'lars':  # LARS decays inside the optimizer
      loss += recipe.weight_decay * _l2(trainable)
    return loss, frozen

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(trainable, frozen, opt_state, batch):
    (loss, frozen), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, batch['image'], batch['label'])
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), frozen, opt_state, loss

  return step


def fit(config: ml_collections.ConfigDict, encoder: nn.Module,
        variables: PyTree, mesh: Mesh, recipe: Recipe, *, num_classes: int,
        indices: np.ndarray | None = None
        ) -> tuple[PyTree, PyTree, dict[str, int]]:
  """Trains with `recipe` on the labelled examples.

  Args:
    config: the run config (dataset.*, augment.*).
    encoder: the backbone.
    variables: its `{'params', 'batch_stats'}` to start from (replicated;
      not changed).
    mesh: the device mesh; batches are sharded over `'data'`.
    recipe: the training recipe.
    num_classes: the dataset's number of classes.
    indices: the labelled examples of `dataset.eval_train_split` (a
      `label_subsets.balanced_subset`), or None for all of them.

  Returns:
    `(encoder variables, head {'kernel', 'bias'}, facts)`: the encoder's
    after training (the same as `variables` for the linear protocol) and
    `{'num_labelled', 'num_epochs', 'global_batch_size', 'num_steps'}`.
  """
  split = config.dataset.eval_train_split
  builder = datasets.get_builder(config.dataset)
  count = (datasets.split_num_examples(builder, split) if indices is None
           else len(indices))
  batch = global_batch_size(
      recipe, count, labelled_data.batch_multiple(config, mesh.devices.size))
  data = labelled_data.LabelledData(config, split, indices, batch_size=batch)
  total = data.steps * recipe.num_epochs
  scale = {'linear': batch / 256, 'sqrt': math.sqrt(batch), 'none': 1.}[
      recipe.lr_scaling]
  schedule = optax.cosine_decay_schedule(recipe.base_learning_rate * scale,
                                         max(total, 1))
  tx = _optimizer(recipe, schedule)
  image_key, _ = datasets.feature_keys(builder)
  size = config.dataset.image_size
  shape = (1, size, size, builder.info.features[image_key].shape[-1])
  feature_dim = jax.eval_shape(
      functools.partial(encoder.apply, train=False), variables,
      jax.ShapeDtypeStruct(shape, jnp.float32)).shape[-1]
  replicated = parallel.replicated(mesh)
  trainable = {'head': _init_head(feature_dim, num_classes)}
  frozen = variables
  if recipe.finetune:
    trainable['encoder'] = variables['params']
    frozen = {'batch_stats': variables['batch_stats']}
  # Copies: the step donates them, and `variables` stay the caller's.
  trainable, frozen = jax.tree.map(
      jnp.copy, jax.device_put((trainable, frozen), replicated))
  opt_state = jax.jit(tx.init, out_shardings=replicated)(trainable)
  step = _make_step(encoder, recipe, tx)
  sharding = parallel.batch_sharding(mesh)
  for epoch in range(recipe.num_epochs):
    for local in data.epoch(epoch, recipe.seed):
      global_batch = jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x),
          local)
      trainable, frozen, opt_state, _ = step(trainable, frozen, opt_state,
                                             global_batch)
  trained = ({'params': trainable['encoder'], **frozen} if recipe.finetune
             else frozen)
  return trained, trainable['head'], {
      'num_labelled': int(count), 'num_epochs': recipe.num_epochs,
      'global_batch_size': batch, 'num_steps': total}


def train_and_test(config: ml_collections.ConfigDict, encoder: nn.Module,
                   variables: PyTree, mesh: Mesh, recipe: Recipe, *,
                   num_classes: int, indices: np.ndarray | None = None
                   ) -> dict[str, Any]:
  """`fit`, then top-1/top-5 on `dataset.eval_test_split`'s centre crops.

  Returns:
    `{'top1', 'top5'}` and `fit`'s facts.
  """
  trained, head, facts = fit(config, encoder, variables, mesh, recipe,
                             num_classes=num_classes, indices=indices)
  test_x, test_y = features.split_features(config, encoder, trained, mesh,
                                           config.dataset.eval_test_split)
  head = jax.device_get(head)
  logits = test_x @ np.asarray(head['kernel']) + np.asarray(head['bias'])
  return {'top1': linear.topk_accuracy(logits, test_y, 1),
          'top5': linear.topk_accuracy(logits, test_y, 5), **facts}


# SimCLR's ImageNet subsets, as tfds configs of `imagenet2012_subset`.
OFFICIAL_SUBSETS = {('imagenet2012', 0.01): 'imagenet2012_subset/1pct',
                    ('imagenet2012', 0.1): 'imagenet2012_subset/10pct'}


def linear_recipe(config: ml_collections.ConfigDict) -> Recipe:
  """The `paper` linear protocol from `config.linear_eval`
  (`paper_num_epochs` epochs, or `num_epochs` when it is 0)."""
  le = config.linear_eval
  return Recipe(finetune=False,
                num_epochs=le.paper_num_epochs or le.num_epochs,
                batch_size=le.batch_size,
                base_learning_rate=le.base_learning_rate,
                lr_scaling=le.lr_scaling,
                optimizer='nesterov' if le.nesterov else 'momentum',
                weight_decay=le.weight_decay, momentum=le.momentum,
                seed=config.seed)


def finetune_recipe(config: ml_collections.ConfigDict,
                    fraction: float) -> Recipe:
  """Fine-tuning on `fraction` of the labels from `config.finetune`; 0
  epochs means SimCLR v2's: 60 below a 10% fraction, 30 otherwise."""
  ft = config.finetune
  return Recipe(finetune=True,
                num_epochs=ft.num_epochs or (60 if fraction < 0.1 else 30),
                batch_size=ft.batch_size,
                base_learning_rate=ft.base_learning_rate,
                lr_scaling=ft.lr_scaling, optimizer=ft.optimizer,
                weight_decay=ft.weight_decay, momentum=ft.momentum,
                seed=config.seed)


def split_labels(config: ml_collections.ConfigDict, split: str) -> np.ndarray:
  """Every label of `split` in the split's fixed order (images not decoded)."""
  builder = datasets.get_builder(config.dataset)
  image_key, label_key = datasets.feature_keys(builder)
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.map(lambda e: e[label_key]).batch(65536)
  return np.concatenate([np.asarray(b, np.int64) for b in tfds.as_numpy(ds)])


def labelled_set(config: ml_collections.ConfigDict, fraction: float
                 ) -> tuple[ml_collections.ConfigDict, np.ndarray | None]:
  """The labelled examples for fine-tuning on `fraction` of the labels.

  ImageNet's 1% and 10% are SimCLR's official lists (tfds
  `imagenet2012_subset`); other fractions and datasets are class-balanced
  subsets of `dataset.eval_train_split` drawn with `finetune.subset_seed`
  (`label_subsets.balanced_subset`), the same on every process and run.

  Returns:
    `(config, indices)`: the config to read the data with (another tfds
    dataset for the official lists) and the example indices into its
    `dataset.eval_train_split` (None: all of them).
  """
  official = OFFICIAL_SUBSETS.get((config.dataset.name, fraction))
  if official is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.dataset.name = official
    config.dataset.eval_train_split = 'train'
    return config, None
  if fraction == 1:
    return config, None
  labels = split_labels(config, config.dataset.eval_train_split)
  return config, label_subsets.balanced_subset(
      labels, fraction, seed=config.finetune.subset_seed)
