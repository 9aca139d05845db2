"""The fast linear protocol: a linear classifier on fixed frozen features.

Protocol `fast` (SimCLR's linear evaluation, sized for small data;
docs/evaluation.md):
- the features are those of the frozen encoder, BatchNorm in inference mode,
  on the centre-cropped images (no augmentation), extracted once;
- optionally standardised with the train features' per-dimension mean and
  std (a fixed affine map, so the classifier family is unchanged; it only
  conditions the optimisation);
- a zero-initialised linear classifier is trained with Nesterov SGD
  (momentum 0.9), a cosine schedule from `base_learning_rate · B/256` to 0,
  and L2 weight decay on the kernel;
- top-1 and top-5 are reported on the test split.

Difference from SimCLR's own protocol (`paper`): it trains the classifier on
augmented crops (random crop + flip) for 90 epochs through the frozen
encoder; fixed features (no augmentation) are what make this one take
seconds on a CPU.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

PyTree = Any


def train_linear_classifier(train_x: np.ndarray, train_y: np.ndarray,
                            num_classes: int,
                            le: ml_collections.ConfigDict, seed: int
                            ) -> PyTree:
  """Fits the linear classifier with the protocol in the module docstring.

  Args:
    train_x: `[N, D]` features (already standardised if requested), global.
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


def fast_linear_probe(train: tuple[np.ndarray, np.ndarray],
                      test: tuple[np.ndarray, np.ndarray], *,
                      num_classes: int, le: ml_collections.ConfigDict,
                      seed: int) -> dict[str, float]:
  """The `fast` protocol on extracted features.

  Args:
    train: `(features [N, D], labels [N])` of the train split, global.
    test: `(features [M, D], labels [M])` of the test split, global.
    num_classes: number of classes.
    le: `config.linear_eval`.
    seed: the classifier's shuffling seed.

  Returns:
    `{'top1', 'top5'}` on the test split, fractions in [0, 1].
  """
  (train_x, train_y), (test_x, test_y) = train, test
  if le.standardize:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  params = train_linear_classifier(train_x, train_y, num_classes, le, seed)
  logits = test_x @ np.asarray(params['kernel']) + np.asarray(params['bias'])
  return {'top1': topk_accuracy(logits, test_y, 1),
          'top5': topk_accuracy(logits, test_y, 5)}
