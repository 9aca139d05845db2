"""MoCo v3 (ResNet): projector, predictor, momentum encoder, symmetric loss.

Semantics follow facebookresearch/moco-v3 `moco/builder.py:MoCo_ResNet`
(see docs/methods.md):
- the online network is the encoder, a projector (2 layers, 2048-4096-256,
  Linear without bias, BN and ReLU after the hidden layer, BN without
  affine parameters after the last) and a predictor (2 layers, 256-4096-256,
  no last BN); the momentum network is a copy of encoder and projector;
- each view goes through its own forward, so BatchNorm statistics are per
  view and global over all devices (SyncBN): the global view under `jit`;
  the running statistics are updated view 1 then view 2, as two PyTorch
  forwards do;
- the momentum update `θk ← m·θk + (1 − m)·θq` (encoder and projector
  parameters, not the predictor, not BN statistics) happens at the start of
  the forward, before the keys (`common.EmaTarget` timing
  'before_forward'), with
  `m = 1 − (1 − m0)(1 + cos(π t / T)) / 2` from m0 = 0.99 over the run;
- `loss = ctr(q1, k2) + ctr(q2, k1)`, each the InfoNCE of local queries
  against the keys of every device (no gradient) times 2τ, τ = 1.0, in a
  `shard_map` island (`losses.moco_v3_infonce`);
- LARS with the learning rate after momentum, parameters with ndim <= 1
  excluded from weight decay and adaptation; `zero_init_residual=True`.

The momentum schedule: the official code evaluates it at the fractional
epoch `epoch + i / iters_per_epoch` out of `epochs`, i.e. at
`t / (epochs · iters_per_epoch)`; here `t / total_steps` with
`total_steps = ceil(num_epochs · steps_per_epoch)`, the same for whole
epochs.

References:
  Chen, Xie & He, An Empirical Study of Training Self-Supervised Vision
  Transformers, ICCV 2021; facebookresearch/moco-v3 `moco/builder.py`,
  `main_moco.py` (`adjust_moco_momentum`), `moco/optimizer.py`.
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


class MoCoV3(base.Method):
  """MoCo v3 for convolutional encoders (the ResNet recipe)."""

  name = 'moco_v3'

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.temperature = 1.0  # ResNet; 0.2 for ViT
    c.base_momentum = 0.99  # m0 of the cosine schedule (0.996 at 1000 ep)
    c.predictor_hidden_dim = 4096
    c.predictor_num_layers = 2
    return c

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    cfg = config.moco_v3
    common.check_positive_numbers(config, 'moco_v3', ('temperature',))
    common.check_in_unit_interval(config, 'moco_v3', ('base_momentum',))
    if cfg.predictor_hidden_dim <= 0 or cfg.predictor_num_layers < 1:
      raise ValueError(
          f'moco_v3.predictor_hidden_dim={cfg.predictor_hidden_dim} must be '
          f'positive and moco_v3.predictor_num_layers='
          f'{cfg.predictor_num_layers} >= 1')
    common.check_num_views(config, 'MoCo v3')
    if config.head.num_layers < 1:
      raise ValueError(f'head.num_layers={config.head.num_layers} must be '
                       '>= 1 for the MoCo v3 projector')

  def __init__(self, config, run):
    super().__init__(config, run)
    cfg = config.moco_v3
    self._encoder = self.make_encoder()
    mlp = functools.partial(
        heads.MLPHead, hidden_bias=False, output_bias=False,
        dtype=models.compute_dtype(config.model),
        bn_momentum=config.model.bn_momentum,
        bn_epsilon=config.model.bn_epsilon)
    projector = mlp(
        hidden_dim=self.head_hidden_dim(),
        output_dim=config.head.output_dim, num_layers=config.head.num_layers,
        last_bn=True, last_bn_affine=False)
    predictor = mlp(hidden_dim=cfg.predictor_hidden_dim,
                    output_dim=config.head.output_dim,
                    num_layers=cfg.predictor_num_layers)
    # The momentum network is this network without the predictor.
    self.net = common.SiameseNet(encoder=self._encoder, projector=projector,
                                 predictor=predictor)
    self.momentum_schedule = common.ema_momentum_schedule(
        cfg.base_momentum, self.total_steps)
    self.ema = common.EmaTarget(parts=('encoder', 'projector'),
                                momentum=self.momentum_schedule,
                                timing='before_forward')

  @property
  def encoder(self) -> nn.Module:
    return self._encoder

  def init(self, rng):
    shape = (1, self.image_size, self.image_size, self.num_channels)
    variables = self.net.init(rng, jnp.zeros(shape, jnp.float32),
                              train=False, predict=True)
    params, batch_stats = variables['params'], variables['batch_stats']
    # The momentum network starts as a copy of encoder and projector.
    return params, batch_stats, {'target': self.ema.copy_of(params,
                                                            batch_stats)}

  def _contrastive(self, q1, q2, k1, k2):
    """The symmetric InfoNCE in a shard_map island over `'data'`."""
    fn = functools.partial(losses.moco_v3_infonce,
                           temperature=self.config.moco_v3.temperature,
                           axis_name=common.DATA_AXIS)
    return common.island(fn, self.mesh)(q1, q2, k1, k2)

  def compute_loss(self, params, batch_stats, extra, batch, rng, step):
    del rng  # MoCo v3's randomness is all in the host augmentations
    views = batch['views'][0]  # [N, 2, H, W, C]
    forward = functools.partial(common.forward_each_view, self.net)
    (o1, o2), stats = self.accumulated(
        functools.partial(forward, predict=True))(params, batch_stats, views)
    # extra['target'] was moved by `base.Method.loss_fn` ('before_forward').
    target = extra['target']
    (e1, e2), key_stats = self.accumulated(forward)(
        target['params'], target['batch_stats'], views)
    k1 = jax.lax.stop_gradient(e1.projection)
    k2 = jax.lax.stop_gradient(e2.projection)
    q1, q2 = o1.prediction, o2.prediction
    loss = self._contrastive(q1, q2, k1, k2)
    positive_cosine, contrast_acc = common.in_batch_accuracy(q1, k2)
    metrics = {'loss': loss, 'embedding_std': common.embedding_std(q1),
               'key_embedding_std': common.embedding_std(k2),
               'positive_cosine': positive_cosine,
               'contrast_acc': contrast_acc,
               'momentum': self.momentum_schedule(step)}
    new_extra = {'target': dict(target, batch_stats=key_stats)}
    features = jnp.stack([o1.features, o2.features], axis=1)
    return loss, base.Aux(stats, new_extra, metrics, features)
