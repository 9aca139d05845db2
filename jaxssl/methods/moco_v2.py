"""MoCo v2: a momentum key encoder, a queue of negatives and shuffle-BN.

Semantics follow facebookresearch/moco `moco/builder.py:MoCo` (see
docs/methods.md):
- the query network (encoder, then the v2 MLP head Linear-ReLU-Linear
  without BN) sees view 1; the key network, a momentum copy
  (`θk ← m·θk + (1 − m)·θq`, m = 0.999, parameters only, applied at the
  start of the step from the parameters the step differentiates: the
  `common.EmaTarget` timing 'before_forward'), sees view 2;
- InfoNCE with the positive at index 0 and the queue as the only negatives,
  `[q·k, q·queueᵀ] / τ` with τ = 0.2 (`losses.moco_v2_infonce`);
- after the loss the global batch of keys is enqueued at the pointer
  (`losses.moco_enqueue`); the queue `[K, dim]` starts as L2-normalised
  Gaussian rows, and K must be a multiple of the global batch;
- shuffle-BN, in the global view. The official code all-gathers the key
  images, permutes them with a permutation shared by all GPUs, lets each
  GPU encode its slice with local (unsynchronised) BN, then gathers and
  un-permutes the keys. Here the global batch of key images is permuted
  with a per-step permutation drawn from the step key (identical on every
  device), encoded with BatchNorm in `bn_groups` contiguous groups (with
  one group per device, each group is exactly one device's slice, i.e.
  per-device statistics), and un-permuted. Under `jit` XLA inserts the
  exchanges. The query encoder uses the same grouped BN without shuffling
  (the official per-GPU BN). Because the groups are a property of the
  computation, not of the hardware, one device with `bn_groups=8` gives the
  numbers of 8 devices (the CIFAR demo's SplitBatchNorm);
- SGD over every parameter (BN and biases included) with weight decay 1e-4
  and a per-epoch cosine learning rate; the key network is not optimised.

References:
  He et al., Momentum Contrast for Unsupervised Visual Representation
  Learning, CVPR 2020; Chen et al., Improved Baselines with Momentum
  Contrastive Learning, 2020; facebookresearch/moco `moco/builder.py`,
  `main_moco.py`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxssl import losses
from jaxssl import models
from jaxssl.methods import base
from jaxssl.methods import common
from jaxssl.models import heads

# fold_in tag of the shuffle-BN permutation's stream within the step key.
_SHUFFLE_STREAM = 1


class MoCoV2(base.Method):
  """MoCo v2 with a queue, a momentum key encoder and shuffle-BN."""

  name = 'moco_v2'

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.temperature = 0.2  # 0.07 in MoCo v1
    c.queue_size = 65536  # K; a multiple of global_batch_size
    c.momentum = 0.999  # key encoder m, constant
    c.bn_groups = 0  # BatchNorm statistics groups; 0 = number of devices
    c.shuffle_bn = True  # permute key images across the BN groups
    return c

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    cfg = config.moco_v2
    common.check_positive_numbers(config, 'moco_v2', ('temperature',))
    common.check_in_unit_interval(config, 'moco_v2', ('momentum',))
    if cfg.queue_size <= 0 or cfg.queue_size % config.global_batch_size:
      raise ValueError(
          f'moco_v2.queue_size={cfg.queue_size} must be a positive multiple '
          f'of global_batch_size={config.global_batch_size}')
    micro = config.global_batch_size // config.accumulation_steps
    if cfg.bn_groups < 0 or (cfg.bn_groups and micro % cfg.bn_groups):
      raise ValueError(
          f'moco_v2.bn_groups={cfg.bn_groups} must be 0 (one per device) or '
          f'a divisor of the {micro} examples of one forward '
          f'(global_batch_size / accumulation_steps)')
    common.check_num_views(config, 'MoCo v2 (query and key)')
    common.check_head_layers(config, 'MoCo v2', official=2)

  def __init__(self, config, run):
    super().__init__(config, run)
    self.bn_groups = common.resolve_bn_groups(
        config.moco_v2.bn_groups, run.num_devices, run.micro_batch_size,
        'moco_v2.bn_groups')
    self._check_queue_fits()
    self._encoder = self.make_encoder(bn_groups=self.bn_groups)
    projector = heads.MLPHead(
        hidden_dim=self.head_hidden_dim(), output_dim=config.head.output_dim,
        num_layers=config.head.num_layers, use_bn=False, hidden_bias=True,
        output_bias=True, dtype=models.compute_dtype(config.model))
    self.net = common.SiameseNet(encoder=self._encoder, projector=projector)
    self.ema = common.EmaTarget(
        parts=('encoder', 'projector'),
        momentum=common.constant_momentum(config.moco_v2.momentum),
        timing='before_forward')

  def resolved(self):
    return dict(super().resolved(), **{'moco_v2.bn_groups': self.bn_groups})

  def _check_queue_fits(self) -> None:
    """The queue (replicated) and one device's logits against its memory.

    Per device: the queue `[K, dim]` float32 twice (the state and the
    step's updated copy) and the logits `[B / devices, K + 1]` float32
    three times (logits, softmax, their gradient).
    """
    k, dim = self.config.moco_v2.queue_size, self.config.head.output_dim
    rows = -(-self.run.global_batch_size // self.run.num_devices)
    needed = 4 * (2 * k * dim + 3 * rows * (k + 1))
    common.check_fits_memory(
        self.run, f'moco_v2.queue_size={k}', needed,
        f'queue [{k}, {dim}] float32 and logits [{rows}, {k + 1}]')

  @property
  def encoder(self) -> nn.Module:
    return self._encoder

  def init(self, rng):
    net_key, queue_key = jax.random.split(rng)
    shape = (1, self.image_size, self.image_size, self.num_channels)
    variables = self.net.init(net_key, jnp.zeros(shape, jnp.float32),
                              train=False)
    params, batch_stats = variables['params'], variables['batch_stats']
    queue = jax.random.normal(
        queue_key, (self.config.moco_v2.queue_size,
                    self.config.head.output_dim), jnp.float32)
    extra = {
        # The key network starts as a copy of the query network.
        'target': self.ema.copy_of(params, batch_stats),
        'queue': losses.l2_normalize(queue),
        'queue_ptr': jnp.zeros((), jnp.int32),
    }
    return params, batch_stats, extra

  def shuffle_permutation(self, rng: jax.Array, n: int) -> jax.Array:
    """The step's shuffle-BN permutation of the `n` key images.

    Args:
      rng: the step key (identical on every device).
      n: global batch size.

    Returns:
      `[n]` int32: shuffled position i holds key image `perm[i]`.
    """
    return jax.random.permutation(jax.random.fold_in(rng, _SHUFFLE_STREAM), n)

  def keys(self, key_params, key_batch_stats, x: jax.Array, *,
           rng: jax.Array):
    """Key projections with shuffle-BN, in the original batch order.

    Args:
      key_params: the key network's parameters (already momentum-updated).
      key_batch_stats: its BatchNorm statistics.
      x: `[n, H, W, C]` key images of one forward (the global batch, or
        one micro-batch of it), sharded over `'data'`.
      rng: the step key (a micro-batch's own key under accumulation).

    Returns:
      `(k, new_key_batch_stats)`: `[n, dim]` float32 keys without
      gradient, row i the key of image i.
    """
    shuffle = self.config.moco_v2.shuffle_bn and self.bn_groups > 1
    if shuffle:
      perm = self.shuffle_permutation(rng, x.shape[0])
      # Keep the shuffled batch sharded over devices, as each GPU holds its
      # slice of the permuted batch in the official code.
      x = common.shard_batch(jnp.take(x, perm, axis=0), self.mesh)
    out, new_stats = common.forward(self.net, key_params, key_batch_stats, x)
    k = out.projection
    if shuffle:
      k = jnp.take(k, jnp.argsort(perm), axis=0)
    return jax.lax.stop_gradient(k), new_stats

  def compute_loss(self, params, batch_stats, extra, batch, rng, step):
    del step  # m is constant and the LR schedule lives in the optimizer
    cfg = self.config.moco_v2
    views = batch['views'][0]  # [N, 2, H, W, C]
    out, new_batch_stats = self.accumulated(
        functools.partial(common.forward, self.net))(params, batch_stats,
                                                     views[:, 0])
    q = out.projection
    # extra['target'] was moved by `base.Method.loss_fn` ('before_forward').
    target = extra['target']
    k, key_batch_stats = self.accumulated(self.keys)(
        target['params'], target['batch_stats'], views[:, 1], rng=rng)
    # A per-query loss: the global view is exact, no shard_map island needed.
    loss = losses.moco_v2_infonce(q, k, extra['queue'], cfg.temperature)
    positive_cosine, contrast_acc = common.contrast_accuracy(
        q, k, extra['queue'])
    queue, queue_ptr = losses.moco_enqueue(extra['queue'], extra['queue_ptr'],
                                           k)
    new_extra = {'target': dict(target, batch_stats=key_batch_stats),
                 'queue': queue, 'queue_ptr': queue_ptr}
    metrics = {'loss': loss, 'embedding_std': common.embedding_std(q),
               'key_embedding_std': common.embedding_std(k),
               'positive_cosine': positive_cosine,
               'contrast_acc': contrast_acc}
    return loss, base.Aux(new_batch_stats, new_extra, metrics,
                          out.features[:, None])  # the queries' view
