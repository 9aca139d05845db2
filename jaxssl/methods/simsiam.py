"""SimSiam: a predictor and a stop-gradient, no negatives and no EMA.

Semantics follow facebookresearch/simsiam (`simsiam/builder.py`,
`main_simsiam.py`; docs/methods.md):
- one network: encoder, 3-layer projector (`Linear(no bias)-BN-ReLU` twice,
  then `Linear-BN(affine=False)`, width = the encoder's feature dimension,
  output 2048) and predictor (`Linear(2048 -> 512, no bias)-BN-ReLU-
  Linear(512 -> 2048, bias)`); PyTorch's Linear init;
- each view is forwarded separately (`z1 = f(x1); z2 = f(x2)`), so BatchNorm
  statistics are per view and global over devices (SyncBN), and the running
  averages are updated once per view in view order;
- loss `-(cos(p1, sg z2) + cos(p2, sg z1)) / 2` (`losses.simsiam_loss`);
- no extra state and no post-update rule.

- `simsiam.fix_predictor_lr` (default True, the official README recipe's
  `--fix-pred-lr`): the predictor keeps the peak learning rate while the
  rest follows the schedule; False lets it decay with the rest (the paper's
  Table 1 reports both, the decaying one slightly below).

References:
  Chen & He, Exploring Simple Siamese Representation Learning, CVPR 2021.
  facebookresearch/simsiam `simsiam/builder.py`, `main_simsiam.py`.
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


class SimSiam(base.Method):
  """SimSiam with per-view global BN and the symmetric negative cosine."""

  name = 'simsiam'
  accumulation = 'average'  # a mean of per-example cosines

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The `config.simsiam` section.

    The projector is `config.head` (`num_layers=3`, `hidden_dim=0` = the
    encoder's feature dimension, `output_dim=2048` in the official recipe);
    the predictor maps the projection back to `head.output_dim`.
    """
    c = ml_collections.ConfigDict()
    c.predictor_hidden_dim = 512  # the bottleneck (official `--pred-dim`)
    c.fix_predictor_lr = True  # official `--fix-pred-lr`
    return c

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad `simsiam`/`head`/view value."""
    common.check_positive_ints(config, 'simsiam', ('predictor_hidden_dim',))
    common.check_head_layers(config, 'SimSiam', official=3)
    common.check_num_views(config, 'SimSiam')

  def __init__(self, config, run):
    super().__init__(config, run)
    self._encoder = self.make_encoder()
    mlp = dict(dtype=models.compute_dtype(config.model),
               bn_momentum=config.model.bn_momentum,
               bn_epsilon=config.model.bn_epsilon, hidden_bias=False)
    dim = config.head.output_dim
    self.net = common.SiameseNet(
        encoder=self._encoder,
        # The official last Linear has a bias, but the affine-free BN right
        # after it cancels it (the official code freezes it).
        projector=heads.MLPHead(self.head_hidden_dim(), dim,
                                num_layers=config.head.num_layers,
                                last_bn=True, last_bn_affine=False, **mlp),
        predictor=heads.MLPHead(config.simsiam.predictor_hidden_dim, dim,
                                output_bias=True, **mlp))

  @property
  def fixed_lr_mask(self):
    """The predictor's leaves, with `simsiam.fix_predictor_lr`; else None."""
    if not self.config.simsiam.fix_predictor_lr:
      return None

    def mask(params):
      return {name: jax.tree.map(lambda _: name == 'predictor', tree)
              for name, tree in params.items()}

    return mask

  @property
  def encoder(self) -> nn.Module:
    """The encoder module (`encoder_variables` are its params)."""
    return self._encoder

  def init(self, rng):
    """Returns `(params, batch_stats, {})`: SimSiam has no extra state."""
    x = jnp.zeros((2, self.image_size, self.image_size, self.num_channels),
                  jnp.float32)
    variables = self.net.init(rng, x, train=True, predict=True)
    return variables['params'], variables['batch_stats'], {}

  def compute_loss(self, params, batch_stats, extra, batch, rng, step):
    """The symmetric negative cosine with stop-gradient on the projections.

    Args:
      params: network parameters.
      batch_stats: BatchNorm averages, updated once per view.
      extra: `{}`, returned as is.
      batch: `{'views': ([global_batch, 2, H, W, C],)}`, sharded.
      rng: unused (the views are made by the input pipeline).
      step: unused.

    Returns:
      `(loss, Aux)`; metrics: loss, embedding_std, target_online_agreement
      and view_agreement.
    """
    del rng, step  # all randomness is in the host augmentations
    (e1, e2), batch_stats = common.forward_each_view(
        self.net, params, batch_stats, batch['views'][0], predict=True)
    z1, p1, z2, p2 = e1.projection, e1.prediction, e2.projection, e2.prediction
    loss = losses.simsiam_loss(p1, p2, z1, z2)
    t1, t2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
    metrics = {
        'loss': loss,
        'embedding_std': common.embedding_std(z1),
        # The targets of p1 and p2 are sg(z2) and sg(z1): -loss, logged
        # under the name BYOL uses for the same collapse monitor.
        'target_online_agreement': 0.5 * (common.mean_cosine(p1, t2)
                                          + common.mean_cosine(p2, t1)),
        # Tends to 1 (with embedding_std to 0) when the network collapses.
        'view_agreement': common.mean_cosine(z1, z2),
    }
    features = jnp.stack([e1.features, e2.features], axis=1)
    return loss, base.Aux(batch_stats, extra, metrics, features)
