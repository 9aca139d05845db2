"""Pure, jit-able self-supervised losses.

Every loss that crosses devices takes `axis_name=None`: with `None` it
computes on one device over the global batch; with a mesh axis name it must
run inside `jax.shard_map(..., in_specs=P('data'), out_specs=P())` and
returns a replicated scalar. Logits, log-sum-exp and Sinkhorn run in
float32 for any input dtype. See docs/architecture.md and each docstring.
"""

from jaxssl.losses.blockwise import nt_xent_blockwise
from jaxssl.losses.blockwise import nt_xent_blockwise_with_metrics
from jaxssl.losses.infonce import moco_enqueue
from jaxssl.losses.infonce import moco_v2_infonce
from jaxssl.losses.infonce import moco_v3_infonce
from jaxssl.losses.ntxent import nt_xent
from jaxssl.losses.ntxent import nt_xent_with_metrics
from jaxssl.losses.numerics import l2_normalize
from jaxssl.losses.regression import byol_loss
from jaxssl.losses.regression import byol_regression
from jaxssl.losses.regression import simsiam_loss
from jaxssl.losses.swav import sinkhorn
from jaxssl.losses.swav import sinkhorn_log
from jaxssl.losses.swav import swav_loss

__all__ = [
    'byol_loss',
    'byol_regression',
    'l2_normalize',
    'moco_enqueue',
    'moco_v2_infonce',
    'moco_v3_infonce',
    'nt_xent',
    'nt_xent_blockwise',
    'nt_xent_blockwise_with_metrics',
    'nt_xent_with_metrics',
    'simsiam_loss',
    'sinkhorn',
    'sinkhorn_log',
    'swav_loss',
]
