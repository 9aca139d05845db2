"""SwAV: multi-crop forward, Sinkhorn codes, swapped prediction, a queue.

Semantics follow facebookresearch/swav `main_swav.py` and `src/resnet50.py`
(see docs/methods.md):
- crops of one resolution go through the encoder together, one forward per
  resolution, so BatchNorm statistics cover each resolution group (over the
  global batch, or over `bn_examples_per_group` examples as apex SyncBN in
  groups of 8 GPUs); the features of all crops are concatenated and go
  through the projection head in one batch, then L2 normalisation, then
  the prototypes: `scores = z · Cᵀ` (cosines);
- codes come from Sinkhorn on the scores of `crops_for_assign` (no
  gradient); every other crop predicts them at `temperature`
  (`losses.swav_loss`, in a `shard_map` island over `'data'`);
- the prototypes are trainable parameters (LARC and weight decay apply to
  them as to everything else) whose gradient is zeroed for the first
  `freeze_prototypes_niters` iterations. A zero gradient here equals
  torch's `grad = None`: apex LARC skips a zero gradient (no weight decay,
  no adaptation) and the momentum buffer, still zero, stays zero, so the
  prototypes do not move at all. Officially they are re-normalised at the
  start of every iteration; here `after_update` normalises them after every
  update that moved them (and `init` normalises the initial ones), which
  leaves the same prototypes for the next forward, since nothing reads them
  in between, while frozen prototypes stay bit-identical;
- the queue (`queue_length > 0`) holds detached normalised embeddings of
  the assigned crops from `epoch_queue_starts` on; Sinkhorn uses it, scored
  with the current prototypes, only once it is full. See `SwAV.loss_fn` for
  how the one global queue relates to the official per-GPU queues.

References:
  Caron et al., Unsupervised Learning of Visual Features by Contrasting
  Cluster Assignments, NeurIPS 2020; facebookresearch/swav `main_swav.py`,
  `src/resnet50.py`.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxssl import losses
from jaxssl import models
from jaxssl.methods import base
from jaxssl.methods import common
from jaxssl.models import heads


class SwAVNet(nn.Module):
  """Encoder per resolution group, projection head, L2 norm, prototypes."""

  encoder: nn.Module
  head: nn.Module
  prototypes: nn.Module

  def __call__(self, views, *, train: bool, num_chunks: int = 1):
    """Embeds and scores every crop.

    Args:
      views: tuple of `[N, V_r, H_r, W_r, C]` crops, one entry per
        resolution (global batch, sharded over `'data'`).
      train: BatchNorm uses and updates batch statistics.
      num_chunks: the head sees the features in `num_chunks` contiguous
        chunks of examples (`common.multicrop_embed`).

    Returns:
      `(z, scores, features)`: `[N, V, dim]` L2-normalised embeddings,
      `[N, V, K]` float32 prototype scores (crops in view order), and
      `[N, V_0, feature_dim]` encoder features of the global crops.
    """
    z, features = common.multicrop_embed(
        self.encoder, self.head, views, train=train, num_chunks=num_chunks,
        with_features=True)
    return z, self.prototypes(z), features


code_metrics = common.assignment_metrics


class SwAV(base.Method):
  """SwAV with multi-crop, frozen-then-normalised prototypes and a queue."""

  name = 'swav'

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_prototypes = 3000  # nmb_prototypes
    c.temperature = 0.1
    c.epsilon = 0.05
    c.sinkhorn_iterations = 3
    c.sinkhorn_log_domain = False  # losses.sinkhorn_log: finite for tiny ε
    c.crops_for_assign = (0, 1)
    c.freeze_prototypes_niters = 313  # iterations with frozen prototypes
    c.queue_length = 0  # 0 = no queue; truncated to a multiple of the batch
    c.epoch_queue_starts = 15.0
    c.bn_examples_per_group = 0  # 0 = global BN; 512 = apex groups of 8x64
    return c

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    c = config.swav
    for key in ('num_prototypes', 'sinkhorn_iterations'):
      if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
        raise ValueError(f'swav.{key}={c[key]!r} must be a positive integer')
    for key in ('temperature', 'epsilon'):
      if not c[key] > 0:
        raise ValueError(f'swav.{key}={c[key]} must be > 0')
    num_crops = num_crops_of(config)
    crops = tuple(c.crops_for_assign)
    if (not crops or len(set(crops)) != len(crops)
        or not all(isinstance(i, int) and 0 <= i < num_crops for i in crops)):
      raise ValueError(
          f'swav.crops_for_assign={c.crops_for_assign!r} must be distinct '
          f'crop indices in [0, {num_crops})')
    for key in ('freeze_prototypes_niters', 'queue_length',
                'bn_examples_per_group'):
      if c[key] < 0:
        raise ValueError(f'swav.{key}={c[key]} must be >= 0')
    if not c.epoch_queue_starts >= 0:
      raise ValueError(
          f'swav.epoch_queue_starts={c.epoch_queue_starts} must be >= 0')
    batch = config.global_batch_size
    micro = batch // config.accumulation_steps
    if 0 < c.queue_length < batch:
      raise ValueError(
          f'swav.queue_length={c.queue_length} is shorter than one global '
          f'batch ({batch}); use 0 (no queue) or at least {batch}')
    group = c.bn_examples_per_group
    if group and micro % group:
      raise ValueError(
          f'swav.bn_examples_per_group={group} must divide the {micro} '
          'examples of one forward (global_batch_size / accumulation_steps; '
          '0 = global BatchNorm)')
    if config.head.num_layers < 1:
      raise ValueError(f'head.num_layers={config.head.num_layers} must be '
                       '>= 1 for SwAV (1 = a linear projection)')

  def __init__(self, config, run):
    super().__init__(config, run)
    c = config.swav
    self.bn_groups = (run.micro_batch_size // c.bn_examples_per_group
                      if c.bn_examples_per_group else 1)
    self.num_chunks = math.lcm(self.bn_groups, run.num_devices)
    # As main_swav.py: the queue holds whole global batches.
    self.queue_length = c.queue_length - (c.queue_length
                                          % config.global_batch_size)
    self.queue_start_step = math.ceil(
        c.epoch_queue_starts * self.steps_per_epoch - 1e-6)
    dtype = models.compute_dtype(config.model)
    bn = dict(bn_momentum=config.model.bn_momentum,
              bn_epsilon=config.model.bn_epsilon, bn_groups=self.bn_groups,
              dtype=dtype)
    self._encoder = self.make_encoder(bn_groups=self.bn_groups)
    self.net = SwAVNet(
        encoder=self._encoder,
        head=heads.MLPHead(hidden_dim=self.head_hidden_dim(),
                           output_dim=config.head.output_dim,
                           num_layers=config.head.num_layers,
                           output_bias=True, **bn),
        prototypes=heads.Prototypes(num_prototypes=c.num_prototypes))

  def resolved(self):
    return dict(super().resolved(), **{'swav.bn_groups': self.bn_groups,
                                       'swav.queue_length': self.queue_length})

  @property
  def encoder(self) -> nn.Module:
    return self._encoder

  def init(self, rng):
    # train=False: BatchNorm groups need no batch at init; params and
    # statistics are created the same either way.
    shape = (1, 2, self.image_size, self.image_size, self.num_channels)
    variables = self.net.init(rng, (jnp.zeros(shape, jnp.float32),),
                              train=False)
    params = dict(variables['params'])
    params['prototypes'] = heads.normalize_prototypes(params['prototypes'])
    extra = {}
    if self.queue_length:
      num_assign = len(self.config.swav.crops_for_assign)
      extra = {'queue': jnp.zeros((num_assign, self.queue_length,
                                   self.config.head.output_dim), jnp.float32),
               'queue_rows': jnp.zeros((), jnp.int32)}
    return params, variables['batch_stats'], extra

  def _island(self, scores, queue_scores):
    """`losses.swav_loss` in a shard_map island over `'data'`."""
    c = self.config.swav
    fn = functools.partial(
        losses.swav_loss, crops_for_assign=tuple(c.crops_for_assign),
        temperature=c.temperature, epsilon=c.epsilon,
        num_iters=c.sinkhorn_iterations, log_domain=c.sinkhorn_log_domain,
        axis_name=common.DATA_AXIS)
    if queue_scores is None:
      return common.island(lambda s: fn(s), self.mesh)(scores)
    return common.island(lambda s, q: fn(s, queue_scores=q),
                         self.mesh)(scores, queue_scores)

  def _loss_and_codes(self, scores, queue_scores):
    """The loss and, for the monitors, the codes of the first assigned crop.

    The codes are recomputed in the global view (`axis_name=None`), which
    equals the island's distributed Sinkhorn.
    """
    c = self.config.swav
    loss = self._island(scores, queue_scores)
    out = scores[c.crops_for_assign[0]]
    if queue_scores is not None:
      out = jnp.concatenate([queue_scores[0], out])
    sinkhorn = losses.sinkhorn_log if c.sinkhorn_log_domain else losses.sinkhorn
    codes = sinkhorn(out, c.epsilon, c.sinkhorn_iterations)[-scores[0].shape[0]:]
    return loss, codes

  def compute_loss(self, params, batch_stats, extra, batch, rng, step):
    """SwAV's loss in the global view; enqueues the assigned embeddings.

    The official code keeps one queue per GPU, `[A, L / W, dim]`, of that
    rank's embeddings, shifted by the local batch each step. Here one queue
    `[A, L, dim]` holds the global batch's embeddings in global order,
    shifted by the global batch: its rows are exactly the union of the W
    per-rank queues. Sinkhorn uses only global sums over all queued and
    current samples (per-prototype sums are all-reduced, per-sample sums
    are row-local), so the codes are the same. The queue is used once it is
    full, which for every rank happens at the same step.

    Args:
      params, batch_stats, extra, rng, step: see `base.Method.loss_fn`.
      batch: `views[0]` is `[N, V, S, S, C]` (V global crops, V >= 2);
        optional `views[1]` is `[N, V_small, s, s, C]`.
    """
    del rng  # all randomness is in the host augmentations
    c = self.config.swav
    num_crops = sum(v.shape[1] for v in batch['views'])
    (z, scores, features), batch_stats = self.accumulated(
        functools.partial(common.forward, self.net,
                          num_chunks=self.num_chunks))(params, batch_stats,
                                                       batch['views'])
    scores_list = [scores[:, v] for v in range(num_crops)]
    metrics = {'embedding_std': common.embedding_std(z[:, 0])}
    if not self.queue_length:
      loss, codes = self._loss_and_codes(scores_list, None)
      metrics['queue_in_use'] = jnp.zeros((), jnp.float32)
    else:
      # Scored with the current prototypes, without gradient (no_grad).
      kernel = jax.lax.stop_gradient(params['prototypes']['kernel'])
      queue_scores = [extra['queue'][i] @ kernel
                      for i in range(len(c.crops_for_assign))]
      in_use = extra['queue_rows'] >= self.queue_length
      loss, codes = jax.lax.cond(
          in_use, self._loss_and_codes,
          lambda s, q: self._loss_and_codes(s, None), scores_list,
          queue_scores)
      metrics['queue_in_use'] = in_use.astype(jnp.float32)
      extra = self._enqueue(extra, z, step)
    metrics.update(common.assignment_metrics(codes), loss=loss)
    return loss, base.Aux(batch_stats, extra, metrics, features)

  def _enqueue(self, extra, z, step):
    """Shifts the queue by the global batch and puts this batch in front."""
    n = z.shape[0]
    emb = jax.lax.stop_gradient(
        jnp.stack([z[:, i] for i in self.config.swav.crops_for_assign]))
    shifted = jnp.concatenate([emb, extra['queue'][:, :-n]], axis=1)
    active = step >= self.queue_start_step
    return {'queue': jnp.where(active, shifted, extra['queue']),
            'queue_rows': jnp.where(
                active, jnp.minimum(extra['queue_rows'] + n,
                                    self.queue_length),
                extra['queue_rows'])}

  def process_grads(self, grads, extra, step):
    """Zeroes the prototype gradients while `step < freeze_prototypes_niters`."""
    del extra
    frozen = step < self.config.swav.freeze_prototypes_niters
    protos = jax.tree.map(lambda g: jnp.where(frozen, jnp.zeros_like(g), g),
                          grads['prototypes'])
    return {**grads, 'prototypes': protos}

  def after_update(self, params, extra, step):
    """L2-normalises the prototypes after every update that moved them."""
    moved = step > self.config.swav.freeze_prototypes_niters
    protos = params['prototypes']
    protos = jax.tree.map(functools.partial(jnp.where, moved),
                          heads.normalize_prototypes(protos), protos)
    return {**params, 'prototypes': protos}, extra


def num_crops_of(config: ml_collections.ConfigDict) -> int:
  """Crops per image: the global views plus the multi-crop small ones."""
  return config.augment.num_views + config.augment.num_small_views
