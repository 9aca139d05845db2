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
- after the optimizer step, `target <- tau target + (1 - tau) online` with
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
from jaxssl import optim
from jaxssl.methods import base
from jaxssl.methods import simclr
from jaxssl.models import heads

# Haiku's `hk.Linear` init: truncated normal on [-2, 2] standard deviations
# with stddev 1/sqrt(fan_in) before truncation. Flax's variance_scaling
# divides the stddev by this constant (the std of a [-2, 2]-truncated unit
# normal), so scaling the variance by its square gives Haiku's law.
_TRUNCATED_STD = 0.87962566103423978
haiku_linear_init = nn.initializers.variance_scaling(
    _TRUNCATED_STD**2, 'fan_in', 'truncated_normal')


class SiameseNet(nn.Module):
  """Encoder, projector and (optionally applied) predictor.

  Submodules: `encoder`, `projector`, `predictor`. Called with
  `predict=False` the predictor is neither run nor, at init, created: that
  is the target network.
  """

  encoder: nn.Module
  projector: nn.Module
  predictor: nn.Module

  def __call__(self, x: jax.Array, *, train: bool, predict: bool = True):
    """Returns `(projection [B, dim], prediction [B, dim] or None)`."""
    z = self.projector(self.encoder(x, train=train), train=train)
    return z, (self.predictor(z, train=train) if predict else None)


def forward_views(net: nn.Module, params, batch_stats, views: jax.Array, *,
                  predict: bool):
  """Forwards each view separately in training mode, threading BN statistics.

  Args:
    net: a `SiameseNet`.
    params: its parameters.
    batch_stats: its BatchNorm running averages.
    views: `[global_batch, V, H, W, C]`, sharded over `'data'`.
    predict: also apply the predictor.

  Returns:
    `(outputs, batch_stats)`: a list of V `(z, p)` pairs, each array
    `[global_batch, dim]` (p is None without `predict`), and the running
    averages after the V updates (view 1's update first).
  """
  outputs = []
  for v in range(views.shape[1]):
    out, mutated = net.apply({'params': params, 'batch_stats': batch_stats},
                             views[:, v], train=True, predict=predict,
                             mutable=['batch_stats'])
    batch_stats = mutated['batch_stats']
    outputs.append(out)
  return outputs, batch_stats


def mean_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over the batch of `cos(a_i, b_i)`; `a, b`: `[global_batch, dim]`."""
  return jnp.mean(jnp.sum(losses.l2_normalize(a) * losses.l2_normalize(b), -1))


def check_two_views(config: ml_collections.ConfigDict, name: str) -> None:
  """Raises ValueError unless the run makes exactly two views per image."""
  if config.augment.num_views != 2:
    raise ValueError(f'augment.num_views={config.augment.num_views}; {name} '
                     'uses exactly 2 views')


def check_positive(config: ml_collections.ConfigDict, section: str,
                   *keys: str) -> None:
  """Raises ValueError unless each `config.<section>.<key>` is an int > 0."""
  for key in keys:
    value = config[section][key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f'{section}.{key}={value!r} must be a positive integer')


class BYOL(base.Method):
  """BYOL with per-view global BN, an EMA target and the symmetric loss."""

  name = 'byol'

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
    base_ema = config.byol.base_ema
    if not 0.0 <= base_ema <= 1.0:
      raise ValueError(f'byol.base_ema={base_ema} must be in [0, 1]')
    check_positive(config, 'byol', 'predictor_hidden_dim')
    if config.head.num_layers < 1:
      raise ValueError(f'head.num_layers={config.head.num_layers}; the BYOL '
                       'projector needs >= 1 layer (official: 2)')
    check_two_views(config, 'BYOL')

  def __init__(self, config, **kwargs):
    super().__init__(config, **kwargs)
    self._encoder = self.make_encoder()
    mlp = dict(dtype=models.compute_dtype(config.model),
               bn_momentum=config.model.bn_momentum,
               bn_epsilon=config.model.bn_epsilon,
               kernel_init=haiku_linear_init)
    hidden = config.head.hidden_dim or models.feature_dim(config.model)
    self.net = SiameseNet(
        encoder=self._encoder,
        projector=heads.MLPHead(hidden, config.head.output_dim,
                                num_layers=config.head.num_layers, **mlp),
        predictor=heads.MLPHead(config.byol.predictor_hidden_dim,
                                config.head.output_dim, **mlp))
    self.tau_schedule = optim.ema_momentum_schedule(config.byol.base_ema,
                                                    self.total_steps)

  @property
  def encoder(self) -> nn.Module:
    """The online encoder module (`encoder_variables` are its params)."""
    return self._encoder

  def init(self, rng):
    """Online and target variables from two keys split from `rng`.

    Returns:
      `(params, batch_stats, extra)`: the online network's, and `extra =
      {'target_params', 'target_batch_stats'}` (encoder and projector).
    """
    online_key, target_key = jax.random.split(rng)
    x = jnp.zeros((2, self.image_size, self.image_size, self.num_channels),
                  jnp.float32)
    online = self.net.init(online_key, x, train=True)
    target = self.net.init(target_key, x, train=True, predict=False)
    extra = {'target_params': target['params'],
             'target_batch_stats': target['batch_stats']}
    return online['params'], online['batch_stats'], extra

  def loss_fn(self, params, batch_stats, extra, batch, rng, step):
    """The symmetric BYOL loss; both networks in training mode.

    Args:
      params: online parameters (the only ones differentiated).
      batch_stats: online BatchNorm averages.
      extra: `{'target_params', 'target_batch_stats'}`.
      batch: `{'views': ([global_batch, 2, H, W, C],), ...}`, sharded.
      rng: unused (the views are made by the input pipeline).
      step: updates applied so far, for the logged tau.

    Returns:
      `(loss, (batch_stats, extra, metrics))` with both networks' updated
      BatchNorm averages and the loss, embedding_std,
      target_online_agreement and tau monitors.
    """
    del rng  # all randomness is in the host augmentations
    views = batch['views'][0]  # [N, 2, H, W, C]
    online, batch_stats = forward_views(self.net, params, batch_stats, views,
                                        predict=True)
    (z1, p1), (z2, p2) = online
    target, target_stats = forward_views(
        self.net, extra['target_params'], extra['target_batch_stats'], views,
        predict=False)
    t1, t2 = (jax.lax.stop_gradient(z) for z, _ in target)
    loss = losses.byol_loss(p1, p2, t1, t2)
    metrics = {
        'loss': loss,
        'embedding_std': simclr.embedding_std(z1),
        'target_online_agreement': 0.5 * (mean_cosine(z1, t1)
                                          + mean_cosine(z2, t2)),
        'tau': self.tau_schedule(step),
    }
    extra = dict(extra, target_batch_stats=target_stats)
    return loss, (batch_stats, extra, metrics)

  def post_update(self, params, extra, step):
    """`target <- tau target + (1 - tau) online` after the optimizer step.

    Args:
      params: the online parameters after this update.
      extra: the target state; its BatchNorm averages are left as they are.
      step: updates applied, this one included.

    Returns:
      `(params, extra)` with the moved target parameters.
    """
    # `step` counts this update; the official tau uses the count before it.
    tau = self.tau_schedule(step - 1)
    target = extra['target_params']
    online = {name: params[name] for name in target}
    extra = dict(extra, target_params=optim.ema_update(target, online, tau))
    return params, extra
