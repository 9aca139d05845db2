"""BYOL: an online network regresses an EMA target network's projections.

Semantics follow google-deepmind/deepmind-research `byol/` (docs/methods.md):
- online network = encoder, projector and predictor; target network =
  encoder and projector with their own parameters, initialised from a
  different key (the official code does the same, `rng_target`);
- each view is forwarded separately, so BatchNorm statistics are per view
  (global over devices), and the running averages are updated once per view
  in view order, as Haiku's state threading does;
- both networks run in training mode: the target normalises with its own
  batch statistics and updates its own running averages, which live in
  `extra` beside the target parameters; nothing of the target is averaged
  from the online BatchNorm statistics;
- loss `mean(rl(p1, sg t2) + rl(p2, sg t1))`, `rl = 2 - 2 cos`
  (`losses.byol_loss`); gradients reach the online parameters only;
- after the optimizer step (`common.EmaTarget` timing 'after_update'),
  `target <- tau target + (1 - tau) online` with
  `tau(k) = 1 - (1 - base) (cos(pi k / K) + 1) / 2`, where k is the number of
  updates before this one (the official `global_step`) and K the run length.

Differences from the official code, none of which changes the optimised
objective: the target carries no predictor (the official target predictor
is EMA'd but never used); there is no online stop-gradient classifier (use
`jaxssl.evaluate` instead); BatchNorm running averages are not zero-debiased
(Haiku's are), which only changes inference-mode statistics early in a run.

References:
  Grill et al., Bootstrap Your Own Latent: A New Approach to Self-Supervised
  Learning, NeurIPS 2020. google-deepmind/deepmind-research
  `byol/byol_experiment.py`, `byol/utils/networks.py`,
  `byol/utils/schedules.py`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxssl import losses
from jaxssl import models
from jaxssl.methods import base
from jaxssl.methods import common
from jaxssl.models import heads

# Haiku's `hk.Linear` init: truncated normal on [-2, 2] standard deviations
# with stddev 1/sqrt(fan_in) before truncation. Flax's variance_scaling
# divides the stddev by this constant (the std of a [-2, 2]-truncated unit
# normal), so scaling the variance by its square gives Haiku's law.
_TRUNCATED_STD = 0.87962566103423978
haiku_linear_init = nn.initializers.variance_scaling(
    _TRUNCATED_STD**2, 'fan_in', 'truncated_normal')


class BYOL(base.Method):
  """BYOL with per-view global BN, an EMA target and the symmetric loss."""

  name = 'byol'
  accumulation = 'average'  # a mean of per-example regressions

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The `config.byol` section.

    The projector is `config.head` (`num_layers=2`, `hidden_dim=4096`,
    `output_dim=256` in the official recipe); the predictor maps the
    projection back to `head.output_dim`.
    """
    c = ml_collections.ConfigDict()
    c.base_ema = 0.996  # tau at step 0 (1000-epoch preset; 0.99 for 100-300)
    c.predictor_hidden_dim = 4096
    return c

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad `byol`/`head`/view value."""
    common.check_in_unit_interval(config, 'byol', ('base_ema',))
    common.check_positive_ints(config, 'byol', ('predictor_hidden_dim',))
    common.check_head_layers(config, 'BYOL', official=2)
    common.check_num_views(config, 'BYOL')

  def __init__(self, config, run):
    super().__init__(config, run)
    self._encoder = self.make_encoder()
    mlp = dict(dtype=models.compute_dtype(config.model),
               bn_momentum=config.model.bn_momentum,
               bn_epsilon=config.model.bn_epsilon,
               kernel_init=haiku_linear_init)
    self.net = common.SiameseNet(
        encoder=self._encoder,
        projector=heads.MLPHead(self.head_hidden_dim(),
                                config.head.output_dim,
                                num_layers=config.head.num_layers, **mlp),
        predictor=heads.MLPHead(config.byol.predictor_hidden_dim,
                                config.head.output_dim, **mlp))
    self.tau_schedule = common.ema_momentum_schedule(config.byol.base_ema,
                                                     self.total_steps)
    self.ema = common.EmaTarget(parts=('encoder', 'projector'),
                                momentum=self.tau_schedule,
                                timing='after_update')

  @property
  def encoder(self) -> nn.Module:
    """The online encoder module (`encoder_variables` are its params)."""
    return self._encoder

  def init(self, rng):
    """Online and target variables from two keys split from `rng`.

    Returns:
      `(params, batch_stats, extra)`: the online network's, and `extra =
      {'target': {'params', 'batch_stats'}}` (encoder and projector).
    """
    online_key, target_key = jax.random.split(rng)
    x = jnp.zeros((2, self.image_size, self.image_size, self.num_channels),
                  jnp.float32)
    online = self.net.init(online_key, x, train=True, predict=True)
    target = self.net.init(target_key, x, train=True)
    extra = {'target': {'params': target['params'],
                        'batch_stats': target['batch_stats']}}
    return online['params'], online['batch_stats'], extra

  def compute_loss(self, params, batch_stats, extra, batch, rng, step):
    """The symmetric BYOL loss; both networks in training mode.

    Args:
      params: online parameters (the only ones differentiated).
      batch_stats: online BatchNorm averages.
      extra: `{'target': {'params', 'batch_stats'}}`.
      batch: `{'views': ([global_batch, 2, H, W, C],)}`, sharded.
      rng: unused (the views are made by the input pipeline).
      step: updates applied so far, for the logged tau.

    Returns:
      `(loss, Aux)` with both networks' updated BatchNorm averages and the
      loss, embedding_std, target_online_agreement and tau monitors.
    """
    del rng  # all randomness is in the host augmentations
    views = batch['views'][0]  # [N, 2, H, W, C]
    (o1, o2), batch_stats = common.forward_each_view(
        self.net, params, batch_stats, views, predict=True)
    target = extra['target']
    (e1, e2), target_stats = common.forward_each_view(
        self.net, target['params'], target['batch_stats'], views)
    t1 = jax.lax.stop_gradient(e1.projection)
    t2 = jax.lax.stop_gradient(e2.projection)
    loss = losses.byol_loss(o1.prediction, o2.prediction, t1, t2)
    metrics = {
        'loss': loss,
        'embedding_std': common.embedding_std(o1.projection),
        'target_online_agreement': 0.5 * (
            common.mean_cosine(o1.projection, t1)
            + common.mean_cosine(o2.projection, t2)),
        'tau': self.tau_schedule(step),
    }
    extra = dict(extra, target=dict(target, batch_stats=target_stats))
    # View 1 only feeds the online classifier, as in BYOL.
    return loss, base.Aux(batch_stats, extra, metrics, o1.features[:, None])
