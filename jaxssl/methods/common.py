"""What several methods share: networks, forwarding, EMA targets, islands.

A method module imports only this module, `jaxssl.methods.base`,
`jaxssl.losses` and `jaxssl.models` (tests/methods_base_test.py checks it),
so everything two methods would otherwise write twice lives here:
- `SiameseNet`: encoder, projector and an optional predictor, returning
  named `Embeddings`; `multicrop_embed` for per-resolution passes;
- `forward` / `forward_each_view`: train-mode applies threading BatchNorm
  statistics;
- `EmaTarget`: the one EMA (momentum) target mechanism, with its two
  official timings (`EMA_TIMINGS`) run by `base.Method`;
- `island`: the one `shard_map` over `'data'` that every loss island uses;
- `resolve_bn_groups`, `shard_batch`: BN groups and batch sharding;
- collapse monitors (`embedding_std`, `mean_cosine`, `contrast_accuracy`,
  `in_batch_accuracy`, `assignment_metrics`) and view/value checks.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxssl import losses
from jaxssl import parallel
from jaxssl import schedules

PyTree = Any
DATA_AXIS = parallel.DATA_AXIS
l2_normalize = losses.l2_normalize  # the one L2 normalisation (float32, eps)
ema_momentum_schedule = schedules.ema_momentum_schedule

# When the EMA target moves, as the official code of each method does it:
# 'before_forward' (MoCo v2/v3: at the start of the step, from the
# parameters the step differentiates) or 'after_update' (BYOL: after the
# optimizer step, from the new parameters).
EMA_TIMINGS = ('before_forward', 'after_update')


class Embeddings(NamedTuple):
  """`SiameseNet` outputs, each `[B, dim]` in the batch of the input.

  Attributes:
    features: encoder output `[B, feature_dim]` (what is exported).
    projection: projector output `[B, output_dim]`.
    prediction: predictor output `[B, output_dim]`, or None when the
      predictor was not applied (a target/key network).
  """
  features: jax.Array
  projection: jax.Array
  prediction: jax.Array | None


class SiameseNet(nn.Module):
  """Encoder, projector and (optionally applied) predictor.

  Submodules, hence parameter subtrees: `encoder`, `projector`,
  `predictor`. Called with `predict=False` the predictor is neither run nor,
  at init, created: that is the EMA target / key network.
  """

  encoder: nn.Module
  projector: nn.Module
  predictor: nn.Module | None = None

  def __call__(self, x: jax.Array, *, train: bool,
               predict: bool = False) -> Embeddings:
    """Embeds `x`, `[B, H, W, C]` images (global batch)."""
    h = self.encoder(x, train=train)
    z = self.projector(h, train=train)
    p = None
    if predict:
      if self.predictor is None:
        raise ValueError('predict=True needs a network built with a predictor')
      p = self.predictor(z, train=train)
    return Embeddings(h, z, p)


def forward(net: nn.Module, params: PyTree, batch_stats: PyTree,
            x: Any, **kwargs) -> tuple[Any, PyTree]:
  """Applies `net` in train mode; returns `(output, new_batch_stats)`.

  Args:
    net: a flax module with BatchNorm statistics.
    params, batch_stats: its variables.
    x: its input (e.g. `[global_batch, H, W, C]` images).
    **kwargs: forwarded to the module call (`predict`, `num_chunks`).
  """
  out, mutated = net.apply({'params': params, 'batch_stats': batch_stats}, x,
                           train=True, mutable=['batch_stats'], **kwargs)
  return out, mutated['batch_stats']


def forward_each_view(net: nn.Module, params: PyTree, batch_stats: PyTree,
                      views: jax.Array, **kwargs) -> tuple[list, PyTree]:
  """Forwards each view separately in train mode, threading BN statistics.

  BatchNorm statistics are per view (and global over devices), and the
  running averages are updated once per view in view order, as two
  PyTorch forwards or Haiku's state threading do.

  Args:
    net, params, batch_stats: as in `forward`.
    views: `[global_batch, V, H, W, C]`, sharded over `'data'`.
    **kwargs: forwarded to the module call.

  Returns:
    `(outputs, batch_stats)`: a list of V outputs and the statistics after
    the V updates (view 1's first).
  """
  outputs = []
  for v in range(views.shape[1]):
    out, batch_stats = forward(net, params, batch_stats, views[:, v], **kwargs)
    outputs.append(out)
  return outputs, batch_stats


def multicrop_embed(encoder: nn.Module, head: nn.Module, views, *,
                    train: bool, num_chunks: int = 1,
                    with_features: bool = False):
  """Multi-crop: one encoder pass per resolution, one head pass for all.

  Call from inside a module's `__call__` (bound submodules). The features
  of all crops are concatenated chunk-major (chunk c holds examples
  `c·N/num_chunks ...` with all their crops), so grouped BatchNorm
  statistics in the head and device shards follow examples, as the
  official per-GPU batches do.

  Args:
    encoder, head: bound submodules.
    views: tuple of `[N, V_r, H_r, W_r, C]` crops, one per resolution
      (global batch).
    train: BatchNorm uses and updates batch statistics.
    num_chunks: contiguous chunks of the batch (BN groups, devices).
    with_features: also return the encoder features of the first
      resolution's crops (the global views).

  Returns:
    `[N, V, dim]` L2-normalised head outputs, crops in view order; with
    `with_features`, the pair of that and `[N, V_0, feature_dim]`.

  References:
    facebookresearch/swav `src/resnet50.py:MultiPrependedResNet.forward`.
  """
  n = views[0].shape[0]
  feats, layout = [], []
  for x in views:
    v = x.shape[1]
    h = encoder(x.reshape((n * v,) + x.shape[2:]), train=train)
    if not feats:
      first = h.reshape(n, v, -1)
    feats.append(h.reshape(num_chunks, -1, h.shape[-1]))
    layout.append((n // num_chunks * v, v))
  h = jnp.concatenate(feats, axis=1).reshape(-1, feats[0].shape[-1])
  z = l2_normalize(head(h, train=train))
  parts = jnp.split(z.reshape(num_chunks, -1, z.shape[-1]),
                    [sum(r for r, _ in layout[:i + 1])
                     for i in range(len(layout) - 1)], axis=1)
  z = jnp.concatenate(
      [part.reshape(num_chunks, rows // v, v, -1).reshape(n, v, -1)
       for part, (rows, v) in zip(parts, layout)], axis=1)
  return (z, first) if with_features else z


def ema_update(target: PyTree, online: PyTree, momentum) -> PyTree:
  """`m·target + (1 − m)·online` per leaf, no gradient into `online`.

  Computed in float32 and cast back to each target leaf's dtype.

  Args:
    target: the target's parameters (replicated).
    online: online parameters with the same structure.
    momentum: m, a float or float32 scalar (possibly traced).

  References:
    Grill et al., BYOL, 2020, eq. (1); He et al., MoCo, 2020, eq. (2).
  """
  m = jnp.asarray(momentum, jnp.float32)

  def mix(t, o):
    o = jax.lax.stop_gradient(o).astype(jnp.float32)
    return (m * t.astype(jnp.float32) + (1. - m) * o).astype(t.dtype)

  return jax.tree.map(mix, target, online)


@dataclasses.dataclass(frozen=True)
class EmaTarget:
  """An EMA target network kept in `extra['target']`.

  The state is `{'params', 'batch_stats'}` of the online subtrees named by
  `parts`. Only parameters move by momentum; the target's BatchNorm
  statistics come from its own train-mode forwards. `base.Method` runs
  `update` at `timing` with `count` = the number of updates applied before
  the current one (the official `global_step` / iteration index).

  Attributes:
    parts: online parameter subtrees the target mirrors (`('encoder',
      'projector')`).
    momentum: `count -> m`, a float32 schedule (constant or cosine).
    timing: one of `EMA_TIMINGS`.
  """
  parts: tuple[str, ...]
  momentum: Callable[[jax.Array], jax.Array]
  timing: str

  def __post_init__(self):
    if self.timing not in EMA_TIMINGS:
      raise ValueError(f'EMA timing {self.timing!r} is not one of '
                       f'{", ".join(EMA_TIMINGS)}')

  def select(self, tree: PyTree) -> PyTree:
    """The `parts` subtrees of a params or batch_stats tree."""
    return {name: tree[name] for name in self.parts if name in tree}

  def copy_of(self, params: PyTree, batch_stats: PyTree) -> PyTree:
    """A target state starting as a copy (no aliasing) of the online one."""
    return {'params': jax.tree.map(jnp.copy, self.select(params)),
            'batch_stats': jax.tree.map(jnp.copy, self.select(batch_stats))}

  def update(self, target: PyTree, online_params: PyTree,
             count: jax.Array) -> PyTree:
    """Returns the target state with `θt ← m(count)·θt + (1 − m)·θo`."""
    new = ema_update(target['params'], self.select(online_params),
                     self.momentum(count))
    return dict(target, params=new)


def constant_momentum(m: float) -> Callable[[jax.Array], jax.Array]:
  """A momentum schedule that is `m` at every step (MoCo v2)."""
  return lambda count: jnp.asarray(m, jnp.float32)


def island(fn: Callable, mesh: Mesh) -> Callable:
  """The one loss island: `fn` under `jax.shard_map` over `'data'`.

  Every input is sharded `P('data')` (per-shard views inside `fn`, which
  uses collectives over `DATA_AXIS`); the output is replicated `P()`, so
  `fn` must reduce to replicated values (scalars, dicts of scalars).
  """
  return jax.shard_map(fn, mesh=mesh, in_specs=P(DATA_AXIS), out_specs=P())


def shard_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Constrains `x` (global view, batch first) to be sharded over `'data'`."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(DATA_AXIS)))


def resolve_bn_groups(bn_groups: int, num_devices: int,
                      global_batch_size: int, key: str) -> int:
  """The number of BatchNorm groups: `bn_groups`, or the device count if 0.

  Raises:
    ValueError: if the resolved count does not divide the global batch.
  """
  groups = bn_groups or num_devices
  if global_batch_size % groups:
    raise ValueError(
        f'{key}={bn_groups} gives {groups} BatchNorm groups, which do not '
        f'divide global_batch_size={global_batch_size}; use a divisor of it')
  return groups


def embedding_std(z: jax.Array) -> jax.Array:
  """Mean over dimensions of the batch std of L2-normalised embeddings.

  About `1/sqrt(dim)` for spread-out embeddings, 0 when every embedding is
  the same (Chen & He, SimSiam, 2021, Sec. 4.1). `z`: `[global_batch, dim]`.
  """
  return jnp.mean(jnp.std(l2_normalize(z), axis=0))


def mean_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over the batch of `cos(a_i, b_i)`; `a, b`: `[global_batch, dim]`."""
  return jnp.mean(jnp.sum(l2_normalize(a) * l2_normalize(b), -1))


def contrast_accuracy(q: jax.Array, positives: jax.Array,
                      negatives: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean positive cosine and how often the positive beats every negative.

  Args:
    q: `[N, dim]` queries; positives: `[N, dim]` their keys; negatives:
      `[M, dim]` keys competing with every positive (MoCo v2's queue).

  Returns:
    `(positive_cosine, contrast_acc)`.
  """
  q, positives, negatives = map(l2_normalize, (q, positives, negatives))
  pos = jnp.sum(q * positives, axis=1)
  neg = jnp.max(q @ negatives.T, axis=1)
  return jnp.mean(pos), jnp.mean((pos > neg).astype(jnp.float32))


def in_batch_accuracy(q: jax.Array, k: jax.Array) -> tuple[jax.Array,
                                                           jax.Array]:
  """`contrast_accuracy` with in-batch negatives: row i of `k` `[N, dim]` is
  query i's positive, the other rows its negatives."""
  q, k = l2_normalize(q), l2_normalize(k)
  sims = q @ k.T
  pos = jnp.diagonal(sims)
  neg = jnp.max(jnp.where(jnp.eye(q.shape[0], dtype=bool), -1e9, sims),
                axis=1)
  return jnp.mean(pos), jnp.mean((pos > neg).astype(jnp.float32))


def _entropy(p: jax.Array, axis: int = -1) -> jax.Array:
  """Shannon entropy in nats, with `0 · log 0 = 0`."""
  safe = jnp.where(p > 0, p, 1.0)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=axis)


def assignment_metrics(codes: jax.Array) -> dict[str, jax.Array]:
  """Collapse monitors of soft cluster assignments `[global_batch, K]`.

  Returns:
    `prototype_usage_entropy`: entropy of the histogram of hard (argmax)
    assignments, `ln K` when every cluster is used equally, 0 when all
    examples pick one; `code_entropy`: mean entropy of the soft codes,
    `ln K` for the uniform codes of a collapsed SwAV (its README).
  """
  hard = jax.nn.one_hot(jnp.argmax(codes, axis=-1), codes.shape[-1])
  return {'prototype_usage_entropy': _entropy(jnp.mean(hard, axis=0)),
          'code_entropy': jnp.mean(_entropy(codes))}


def check_num_views(config: ml_collections.ConfigDict, name: str,
                    num_views: int = 2) -> None:
  """Raises ValueError unless the run makes `num_views` views per image."""
  if config.augment.num_views != num_views:
    raise ValueError(f'augment.num_views={config.augment.num_views}; {name} '
                     f'uses exactly {num_views} views')


def check_positive_ints(config: ml_collections.ConfigDict, section: str,
                        keys: Sequence[str]) -> None:
  """Raises ValueError unless each `config.<section>.<key>` is an int > 0."""
  for key in keys:
    value = config[section][key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f'{section}.{key}={value!r} must be a positive integer')


def check_in_unit_interval(config: ml_collections.ConfigDict, section: str,
                           keys: Sequence[str]) -> None:
  """Raises ValueError unless each `config.<section>.<key>` is in [0, 1]."""
  for key in keys:
    value = config[section][key]
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'{section}.{key}={value} must be in [0, 1]')


def check_positive_numbers(config: ml_collections.ConfigDict, section: str,
                           keys: Sequence[str]) -> None:
  """Raises ValueError unless each `config.<section>.<key>` is > 0."""
  for key in keys:
    if not config[section][key] > 0:
      raise ValueError(f'{section}.{key}={config[section][key]} must be > 0')


def check_head_layers(config: ml_collections.ConfigDict, name: str,
                      official: int) -> None:
  """Raises ValueError unless `head.num_layers >= 1`."""
  if config.head.num_layers < 1:
    raise ValueError(f'head.num_layers={config.head.num_layers}; the {name} '
                     f'projector needs >= 1 layer (official: {official})')


def check_fits_memory(run, setting: str, needed_bytes: int,
                      what: str) -> None:
  """Raises ValueError if `needed_bytes` exceed one device's memory.

  For state whose size a config sets (a queue, a memory bank), checked
  when the method is built, before anything is compiled or allocated.

  Args:
    run: the `base.RunInfo`; its `device_memory_bytes` (0: unknown, no
      check) is one device's memory.
    setting: the config value at fault, as `'key=value'`.
    needed_bytes: the bytes it needs on one device.
    what: what they hold, in words, e.g. 'queue [65536, 128] float32'.
  """
  limit = run.device_memory_bytes
  if limit and needed_bytes > limit:
    raise ValueError(
        f'{setting} needs {needed_bytes / 2**30:.1f} GiB on each device '
        f'({what}), more than the {limit / 2**30:.1f} GiB one device has; '
        'use a smaller value')
