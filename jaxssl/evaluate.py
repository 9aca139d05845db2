"""Linear evaluation of a frozen encoder, with a random-init baseline.

Protocol (SimCLR's linear eval, sized for small data; docs/evaluation.md):
- the encoder is frozen and runs with BatchNorm in inference mode;
- features of the centre-cropped images (no colour augmentation) are
  extracted once for `dataset.eval_train_split` and `dataset.eval_test_split`;
- optionally standardised with the train features' per-dimension mean and
  std (a fixed affine map, so the classifier family is unchanged; it only
  conditions the optimisation);
- a zero-initialised linear classifier is trained with Nesterov SGD
  (momentum 0.9), a cosine schedule from `base_learning_rate · B/256` to 0,
  and L2 weight decay on the kernel;
- top-1 and top-5 are reported on the test split.
The same protocol applied to the same architecture at random init is the
baseline printed beside it.

Differences from the official protocol: SimCLR trains the classifier on
augmented crops (random crop + flip) for 90 epochs; here features are fixed
(no augmentation), which is what makes a CPU evaluation take seconds.
"""

import functools
import json
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxssl import checkpoint
from jaxssl import cpu_kernels
from jaxssl import datasets
from jaxssl import encoder_export
from jaxssl import input_pipeline
from jaxssl import models
from jaxssl import parallel

PyTree = Any


def encoder_spec(config: ml_collections.ConfigDict, *, num_channels: int,
                 step: int) -> dict[str, Any]:
  """The JSON spec that lets an exported encoder be rebuilt without config."""
  return {'model': config.model.to_dict(),
          'image_size': config.dataset.image_size,
          'num_channels': num_channels,
          'method': config.method,
          'dataset': config.dataset.name,
          'step': step,
          'format': 'jaxssl-encoder-v1'}


def build_encoder(spec: dict[str, Any], *, kernels: str = 'auto'
                  ) -> tuple[nn.Module, PyTree]:
  """Returns `(encoder module, abstract variables)` for an encoder spec.

  Args:
    spec: an `encoder_spec` (from an export or a training checkpoint).
    kernels: the ops to run it with (`cpu_kernels.select_factories`); any
      choice loads any export, as the variables do not depend on it.
  """
  model = dict(spec['model'])
  # Exports written before jaxssl.cpu_kernels carry `conv_impl`, a runtime
  # choice that no longer belongs to the model; it is ignored.
  model.pop('conv_impl', None)
  factories = cpu_kernels.select_factories(kernels)
  encoder = models.make_encoder(
      ml_collections.ConfigDict(model), image_size=spec['image_size'],
      conv=factories.conv, norm=factories.norm)
  shape = (1, spec['image_size'], spec['image_size'], spec['num_channels'])
  abstract = jax.eval_shape(
      functools.partial(encoder.init, train=False), jax.random.key(0),
      jnp.zeros(shape, jnp.float32))
  abstract = {'params': abstract['params'],
              'batch_stats': abstract.get('batch_stats', {})}
  return encoder, abstract


def load_encoder(source: str, mesh: Mesh, *, prefer_export: bool = True,
                 kernels: str = 'auto'
                 ) -> tuple[dict[str, Any], nn.Module, PyTree]:
  """Loads `(spec, encoder, variables)` from an export or a training run.

  Args:
    source: an exported-encoder directory, or a training workdir (then its
      `export/` if present and `prefer_export`, else the encoder part of its
      newest intact checkpoint, restored partially and checked against the
      checksums saved with it; damaged newer steps are skipped with a
      warning, `encoder_export.restore_newest_good_encoder`).
    mesh: variables are placed replicated on this mesh.
    prefer_export: for a workdir, use its `export/` when there is one.
    kernels: the ops the returned encoder runs with (`build_encoder`).
  """
  path = epath.Path(source)
  if prefer_export and not (path / 'spec').exists() and (
      path / encoder_export.EXPORT_SUBDIR / 'spec').exists():
    path = path / encoder_export.EXPORT_SUBDIR
  replicated = parallel.replicated(mesh)
  if (path / 'spec').exists():
    spec = encoder_export.read_export_spec(str(path))
    encoder, abstract = build_encoder(spec, kernels=kernels)
    variables = encoder_export.load_exported_variables(
        str(path), checkpoint.abstract_with_sharding(abstract, replicated))
    return spec, encoder, variables
  def abstract_for(meta):
    _, abstract = build_encoder(meta['encoder_spec'], kernels=kernels)
    return checkpoint.abstract_with_sharding(abstract, replicated)

  step, meta, variables = encoder_export.restore_newest_good_encoder(
      source, abstract_for)
  spec = dict(meta['encoder_spec'], step=step)
  encoder, _ = build_encoder(spec, kernels=kernels)
  return spec, encoder, variables


def random_encoder_variables(encoder: nn.Module, spec: dict[str, Any],
                             seed: int, mesh: Mesh) -> PyTree:
  """Variables of the same architecture at random init (the baseline)."""
  shape = (1, spec['image_size'], spec['image_size'], spec['num_channels'])
  init = jax.jit(functools.partial(encoder.init, train=False),
                 out_shardings=parallel.replicated(mesh))
  variables = init(jax.random.key(seed), jnp.zeros(shape, jnp.float32))
  return {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}


def extract_features(encoder: nn.Module, variables: PyTree,
                     batches: Iterator[dict[str, np.ndarray]], mesh: Mesh
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Frozen-encoder features of every (unpadded) example, on every process.

  Args:
    encoder: the backbone; run with `train=False`.
    variables: its `{'params', 'batch_stats'}`.
    batches: this process's `{'image', 'label', 'mask'}` batches.
    mesh: the batch is sharded over its `'data'` axis.

  Returns:
    `(features [N, feature_dim] float32, labels [N] int32)`, global.
  """
  sharding = parallel.batch_sharding(mesh)
  apply = jax.jit(lambda v, x: encoder.apply(v, x, train=False))
  features, labels = [], []
  for local in batches:
    batch = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), local)
    feats = apply(variables, batch['image'])
    gathered = multihost_utils.process_allgather(
        {'f': feats, 'y': batch['label'], 'm': batch['mask']}, tiled=True)
    keep = np.asarray(gathered['m'], bool)
    features.append(np.asarray(gathered['f'], np.float32)[keep])
    labels.append(np.asarray(gathered['y'], np.int32)[keep])
  return np.concatenate(features), np.concatenate(labels)


def train_linear_classifier(train_x: np.ndarray, train_y: np.ndarray,
                            num_classes: int,
                            le: ml_collections.ConfigDict, seed: int
                            ) -> PyTree:
  """Fits the linear probe with the protocol in the module docstring.

  Args:
    train_x: `[N, D]` features (already standardised if requested).
    train_y: `[N]` integer labels.
    num_classes: classifier width.
    le: `config.linear_eval`.
    seed: shuffling seed.

  Returns:
    `{'kernel': [D, num_classes], 'bias': [num_classes]}`.
  """
  n, dim = train_x.shape
  batch_size = min(le.batch_size, n)
  steps_per_epoch = n // batch_size
  total_steps = steps_per_epoch * le.num_epochs
  scale = {'linear': batch_size / 256, 'sqrt': batch_size ** 0.5,
           'none': 1.0}[le.lr_scaling]
  schedule = optax.cosine_decay_schedule(le.base_learning_rate * scale,
                                         total_steps)
  tx = optax.chain(
      optax.add_decayed_weights(
          le.weight_decay, mask={'kernel': True, 'bias': False}),
      optax.sgd(schedule, momentum=le.momentum, nesterov=le.nesterov))
  params = {'kernel': jnp.zeros((dim, num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
  xs, ys = jnp.asarray(train_x), jnp.asarray(train_y)

  def loss_fn(p, x, y):
    logits = x @ p['kernel'] + p['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def run_epoch(carry, key):
    order = jax.random.permutation(key, n)[:steps_per_epoch * batch_size]

    def sgd_step(carry, idx):
      p, opt_state = carry
      grads = jax.grad(loss_fn)(p, xs[idx], ys[idx])
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None

    carry, _ = jax.lax.scan(sgd_step, carry,
                            order.reshape(steps_per_epoch, batch_size))
    return carry

  carry = (params, tx.init(params))
  key = jax.random.key(seed)
  for epoch in range(le.num_epochs):
    carry = run_epoch(carry, jax.random.fold_in(key, epoch))
  return carry[0]


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k largest logits."""
  k = min(k, logits.shape[1])
  top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def linear_probe(config: ml_collections.ConfigDict, encoder: nn.Module,
                 variables: PyTree, mesh: Mesh) -> dict[str, float]:
  """Extracts features and fits/evaluates the linear probe.

  Returns:
    `{'top1', 'top5', 'num_train', 'num_test', 'feature_dim'}`.
  """
  info = datasets.dataset_info(config.dataset)
  le = config.linear_eval
  per_process = le.feature_batch_size // jax.process_count()

  def features(split):
    batches = input_pipeline.eval_batches(
        config, split, batch_size=per_process,
        process_index=jax.process_index(),
        process_count=jax.process_count())
    return extract_features(encoder, variables, batches, mesh)

  train_x, train_y = features(config.dataset.eval_train_split)
  test_x, test_y = features(config.dataset.eval_test_split)
  if le.standardize:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  params = train_linear_classifier(train_x, train_y, info.num_classes, le,
                                   config.seed)
  logits = test_x @ np.asarray(params['kernel']) + np.asarray(params['bias'])
  return {'top1': topk_accuracy(logits, test_y, 1),
          'top5': topk_accuracy(logits, test_y, 5),
          'num_train': int(len(train_y)), 'num_test': int(len(test_y)),
          'feature_dim': int(train_x.shape[1])}


def check_eval_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Raises ValueError before any compile for unusable eval settings."""
  devices = mesh.devices.size
  size = config.linear_eval.feature_batch_size
  if size % devices or size % jax.process_count():
    raise ValueError(
        f'linear_eval.feature_batch_size={size} must be divisible by the '
        f'device count {devices} and the process count '
        f'{jax.process_count()}')


def run(config: ml_collections.ConfigDict, source: str, mesh: Mesh,
        results_path: str | None = None) -> dict[str, Any]:
  """Linear evaluation of `source` and, if configured, the random baseline.

  Args:
    config: the run config (dataset and `linear_eval` protocol).
    source: exported-encoder directory or training workdir.
    mesh: device mesh for feature extraction.
    results_path: where process 0 writes the results as JSON (optional).

  Returns:
    `{'encoder': {...}, 'random_init': {...} or None, 'spec': {...}}`.
  """
  check_eval_config(config, mesh)
  spec, encoder, variables = load_encoder(source, mesh,
                                          kernels=config.kernels)
  if spec['image_size'] != config.dataset.image_size:
    raise ValueError(
        f'the encoder was trained at image_size={spec["image_size"]} but '
        f'dataset.image_size={config.dataset.image_size}; evaluate at the '
        'training size')
  results = {'spec': spec, 'dataset': config.dataset.name,
             'encoder': linear_probe(config, encoder, variables, mesh),
             'random_init': None}
  if config.linear_eval.random_init_baseline:
    baseline = random_encoder_variables(encoder, spec, config.seed, mesh)
    results['random_init'] = linear_probe(config, encoder, baseline, mesh)
  if jax.process_index() == 0:
    print(format_results(results), flush=True)
    if results_path:
      epath.Path(results_path).write_text(json.dumps(results, indent=2))
  return results


def format_results(results: dict[str, Any]) -> str:
  """A small table: one row per encoder, top-1 and top-5 in percent."""
  enc = results['encoder']
  lines = [f'linear eval on {results["dataset"]}: {enc["num_train"]} train / '
           f'{enc["num_test"]} test images, {enc["feature_dim"]}-d features',
           f'{"encoder":<28}{"top-1":>8}{"top-5":>8}']
  rows = [(f'{results["spec"]["method"]} (step {results["spec"]["step"]})',
           enc)]
  if results['random_init']:
    rows.append(('random init (baseline)', results['random_init']))
  for name, r in rows:
    lines.append(f'{name:<28}{100 * r["top1"]:>7.2f}%{100 * r["top5"]:>7.2f}%')
  return '\n'.join(lines)
