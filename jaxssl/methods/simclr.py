"""SimCLR (v1/v2): two views, one global-BN forward, NT-Xent over the pod.

Semantics follow google-research/simclr `tf2/` (see docs/methods.md):
- both views go through the encoder and the projection head in one batch,
  so BatchNorm statistics are over the 2·N_global views jointly and across
  all devices (global view under `jit`);
- NT-Xent runs in a `shard_map` island; every device's anchors see every
  device's keys through a differentiable all-gather;
- the objective is the official one, `loss_a + loss_b` averaged over the
  global batch, i.e. 2·L where L = `losses.nt_xent` (the paper's mean over
  the 2·N anchors). The factor matters: LARS's trust ratio mixes the gradient
  with weight decay, and excluded parameters take plain `lr·g` steps;
- no extra state, no post-update rule.

References:
  Chen et al., A Simple Framework for Contrastive Learning of Visual
  Representations, ICML 2020. Chen et al., Big Self-Supervised Models are
  Strong Semi-Supervised Learners, NeurIPS 2020.
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


class SimCLRNet(nn.Module):
  """Encoder followed by the SimCLR v2 projection head."""

  encoder: nn.Module
  head: nn.Module

  def __call__(self, x: jax.Array, *, train: bool):
    """Returns `(features [B, feature_dim], projections [B, output_dim])`."""
    h = self.encoder(x, train=train)
    return h, self.head(h, train=train)


class SimCLR(base.Method):
  """SimCLR with a global-BN forward and a pod-wide NT-Xent."""

  name = 'simclr'

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.temperature = 0.1  # ImageNet; the CIFAR-10 recipe uses 0.5
    c.loss_block_size = 0  # > 0: blockwise NT-Xent with this key block
    return c

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    common.check_positive_numbers(config, 'simclr', ('temperature',))
    if config.simclr.loss_block_size < 0:
      raise ValueError(f'simclr.loss_block_size={config.simclr.loss_block_size}'
                       ' must be >= 0 (0 = dense NT-Xent)')
    common.check_num_views(config, 'SimCLR')

  def __init__(self, config, run):
    super().__init__(config, run)
    self._encoder = self.make_encoder()
    self.net = SimCLRNet(
        encoder=self._encoder,
        head=heads.ProjectionHead(
            num_layers=config.head.num_layers,
            hidden_dim=self.head_hidden_dim(),
            output_dim=config.head.output_dim,
            dtype=models.compute_dtype(config.model),
            bn_momentum=config.model.bn_momentum,
            bn_epsilon=config.model.bn_epsilon))

  @property
  def encoder(self) -> nn.Module:
    return self._encoder

  def init(self, rng):
    shape = (2, self.image_size, self.image_size, self.num_channels)
    variables = self.net.init(rng, jnp.zeros(shape, jnp.float32), train=True)
    return variables['params'], variables['batch_stats'], {}

  def _contrastive(self, z1, z2):
    """NT-Xent and its monitors in a shard_map island over `'data'`."""
    cfg = self.config.simclr
    if cfg.loss_block_size:
      fn = functools.partial(losses.nt_xent_blockwise_with_metrics,
                             block_size=cfg.loss_block_size)
    else:
      fn = losses.nt_xent_with_metrics
    fn = functools.partial(fn, temperature=cfg.temperature,
                           axis_name=common.DATA_AXIS)
    return common.island(fn, self.mesh)(z1, z2)

  def _embed(self, params, batch_stats, views):
    """`[n, V, H, W, C]` views to `[n, V, dim]` features and projections."""
    n, v = views.shape[:2]
    # Row-major [n*V] keeps each device's images (both views) on that device.
    x = views.reshape((n * v,) + views.shape[2:])
    (h, z), batch_stats = common.forward(self.net, params, batch_stats, x)
    return (h.reshape(n, v, -1), z.reshape(n, v, -1)), batch_stats

  def compute_loss(self, params, batch_stats, extra, batch, rng, step):
    del rng, step  # SimCLR's randomness is all in the host augmentations
    views = batch['views'][0]  # [N, 2, H, W, C]
    (h, z), batch_stats = self.accumulated(self._embed)(params, batch_stats,
                                                       views)
    mean_loss, metrics = self._contrastive(z[:, 0], z[:, 1])
    loss = 2.0 * mean_loss  # tf2/objective.py's mean(loss_a + loss_b)
    metrics = dict(metrics, loss=loss,
                   embedding_std=common.embedding_std(z[:, 0]))
    # Both views feed the online probe, as `head_supervised` in SimCLR TF2.
    return loss, base.Aux(batch_stats, extra, metrics, h)
