"""Optimizers of the official recipes: LARS variants, SGD and AdamW.

`config.optim` keys (declared in every config file):
  * `name`: 'lars', 'sgd' (momentum SGD, coupled L2) or 'adamw'.
  * `lars_variant`: 'simclr' (lr inside the momentum buffer, =
    `optax.lars`), 'after' (BYOL / MoCo v3: lr after momentum) or 'larc'
    (SwAV: apex LARC with clip=False).
  * `exclude`: 'bias_and_norm' (SimCLR / BYOL names), 'ndim' (MoCo v3:
    ndim <= 1) or 'none' (SwAV, MoCo v2).
  * `weight_decay`, `momentum`, `nesterov`, `trust_coefficient`.
  * `base_learning_rate`, `lr_scaling`: see
    `jaxssl.schedules.peak_learning_rate`.
  * `schedule`, `warmup_epochs`, `warmup_start_lr`, `final_lr`: see
    `jaxssl.schedules.make_schedule`.

The EMA of target networks is `jaxssl.methods.common.ema_update`.

Excluded parameters get neither weight decay nor trust-ratio adaptation; they
still follow momentum SGD with the scheduled learning rate, as in every
official recipe. Masks are computed from the parameter pytree paths, so they
work on the nested dicts of Flax Linen (`params` collection or the whole
`{'params': ...}` tree).
"""

import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxssl.schedules import ema_momentum_schedule  # noqa: F401  (re-export)
from jaxssl.schedules import make_schedule  # noqa: F401  (re-export)
from jaxssl.schedules import peak_learning_rate  # noqa: F401  (re-export)

PyTree = Any

# apex LARC's `eps`, added to its trust-ratio denominator.
_LARC_EPS = 1e-8


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_bias_or_norm(path, leaf) -> bool:
  del leaf
  names = [_key_name(k).lower() for k in path]
  return (bool(names) and names[-1] == 'bias') or any(
      'bn' in n or 'norm' in n for n in names)


def _is_vector_or_scalar(path, leaf) -> bool:
  del path
  return len(leaf.shape) <= 1


def _nothing(path, leaf) -> bool:
  del path, leaf
  return False


EXCLUSION_RULES: dict[str, Callable[[tuple, Any], bool]] = {
    'bias_and_norm': _is_bias_or_norm,
    'ndim': _is_vector_or_scalar,
    'none': _nothing,
}


def _lookup(registry: dict, name: str, what: str):
  if name not in registry:
    raise ValueError(
        f"unknown {what} '{name}'; known: {', '.join(sorted(registry))}")
  return registry[name]


def exclusion_mask(params: PyTree, rule: str) -> PyTree:
  """Returns which leaves are excluded from weight decay and adaptation.

  Args:
    params: a parameter pytree (nested dicts from Flax Linen); leaves may be
      arrays or `jax.ShapeDtypeStruct`s.
    rule: 'bias_and_norm' (a leaf named 'bias', or any path component
      containing 'bn' or 'norm', case-insensitive), 'ndim' (leaves with
      ndim <= 1) or 'none' (nothing excluded).

  Returns:
    A pytree of Python bools with the structure of `params`; True means
    excluded.

  References:
    google-research/simclr `lars_optimizer.py` (name regex);
    deepmind-research/byol `utils/optimizers.py:exclude_bias_and_norm`;
    facebookresearch/moco-v3 `moco/optimizer.py` (`p.ndim > 1`).
  """
  predicate = _lookup(EXCLUSION_RULES, rule, 'exclude rule')
  return jax.tree_util.tree_map_with_path(predicate, params)


def _included(rule: str) -> Callable[[PyTree], PyTree]:
  """Returns an optax mask function: True where the transform applies."""
  _lookup(EXCLUSION_RULES, rule, 'exclude rule')
  return lambda tree: jax.tree.map(operator.not_, exclusion_mask(tree, rule))


def _norm(x: jax.Array) -> jax.Array:
  # Why promote: a bfloat16 sum of squares loses precision; float64 stays.
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def scale_by_larc(weight_decay: float,
                  trust_coefficient: float) -> optax.GradientTransformation:
  """Adds weight decay and rescales by apex LARC's trust ratio (clip=False).

  Per leaf, when `|p| > 0` and `|g| > 0`:
  `g <- (g + wd * p) * eta * |p| / (|g| + wd * |p| + 1e-8)`; otherwise `g` is
  passed through with neither adaptation nor weight decay.

  Args:
    weight_decay: coupled L2 coefficient (wd).
    trust_coefficient: eta.

  Returns:
    A stateless `optax.GradientTransformation` that needs `params`.

  References:
    NVIDIA/apex `apex/parallel/LARC.py`; facebookresearch/swav
    `main_swav.py` (`LARC(optimizer, trust_coefficient=0.001, clip=False)`).
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)

    def adapt(g, p):
      p_norm, g_norm = _norm(p), _norm(g)
      ratio = trust_coefficient * p_norm / (
          g_norm + weight_decay * p_norm + _LARC_EPS)
      adapted = (g + weight_decay * p) * ratio.astype(g.dtype)
      return jnp.where((p_norm > 0) & (g_norm > 0), adapted, g)

    return jax.tree.map(adapt, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _lars_simclr(cfg, schedule, include) -> optax.GradientTransformation:
  """SimCLR LARS: optax.lars scales by lr before `trace` (classic momentum)."""
  return optax.lars(
      schedule, weight_decay=cfg.weight_decay, weight_decay_mask=include,
      trust_coefficient=cfg.trust_coefficient, eps=0.,
      trust_ratio_mask=include, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _lars_after(cfg, schedule, include) -> optax.GradientTransformation:
  """BYOL / MoCo v3 LARS: lr applied after the momentum buffer."""
  return optax.chain(
      optax.masked(optax.add_decayed_weights(cfg.weight_decay), include),
      optax.masked(
          optax.scale_by_trust_ratio(trust_coefficient=cfg.trust_coefficient),
          include),
      optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov),
      optax.scale_by_learning_rate(schedule))


def _larc(cfg, schedule, include) -> optax.GradientTransformation:
  """SwAV: apex LARC (clip=False) around torch SGD, lr after momentum."""
  return optax.chain(
      optax.masked(
          scale_by_larc(cfg.weight_decay, cfg.trust_coefficient), include),
      optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov),
      optax.scale_by_learning_rate(schedule))


LARS_VARIANTS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'simclr': _lars_simclr,
    'after': _lars_after,
    'larc': _larc,
}


def _lars(optim_config, schedule, include) -> optax.GradientTransformation:
  """Builds the LARS variant named by `optim_config.lars_variant`."""
  build = _lookup(LARS_VARIANTS, optim_config.lars_variant, 'lars_variant')
  if not optim_config.trust_coefficient > 0:
    raise ValueError(f'trust_coefficient={optim_config.trust_coefficient} '
                     'must be positive')
  return build(optim_config, schedule, include)


def _sgd(optim_config, schedule, include) -> optax.GradientTransformation:
  """Momentum SGD with coupled L2 (torch.optim.SGD / TF MomentumOptimizer)."""
  cfg = optim_config
  return optax.chain(
      optax.masked(optax.add_decayed_weights(cfg.weight_decay), include),
      optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov),
      optax.scale_by_learning_rate(schedule))


def _adamw(optim_config, schedule, include) -> optax.GradientTransformation:
  """AdamW with torch defaults (betas 0.9, 0.999; eps 1e-8), as MoCo v3 ViT."""
  cfg = optim_config
  if cfg.nesterov:
    raise ValueError("nesterov=True is not supported by optimizer 'adamw'; "
                     'set it to False')
  return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=include)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'lars': _lars,
    'sgd': _sgd,
    'adamw': _adamw,
}


def make_optimizer(optim_config,
                   schedule: optax.ScalarOrSchedule, *,
                   fixed_lr_mask: Callable[[PyTree], PyTree] | None = None,
                   fixed_lr: float = 0.0,
                   also_exclude: Callable[[tuple, Any], bool] | None = None
                   ) -> optax.GradientTransformation:
  """Returns the optax optimizer of a recipe, with its exclusion masks.

  `update(grads, state, params)` needs `params` (weight decay, trust ratio).
  LARS variants (`optim_config.lars_variant`), per included leaf:
    * 'simclr': `g += wd * p; v = m * v + lr * trust * g; p -= v`.
    * 'after': `g += wd * p; mu = m * mu + trust * g; p -= lr * mu`.
    * 'larc': `g = (g + wd * p) * eta |p| / (|g| + wd |p| + 1e-8)`, or `g`
      unchanged (no weight decay) if `|p| = 0` or `|g| = 0`; then as 'after'.
  Here `trust = eta |p| / |g + wd * p|`, or 1 if either norm is 0.
  'sgd' is `g += wd * p; mu = m * mu + g; p -= lr * mu` (optionally
  Nesterov); 'adamw' decays included leaves only.

  With `fixed_lr_mask`, the leaves it marks True follow the same rule at the
  constant `fixed_lr` instead of `schedule`, with their own state
  (`optax.multi_transform`): SimSiam's `--fix-pred-lr`.

  Args:
    optim_config: `config.optim` (see the module docstring).
    schedule: learning rate, a float or an `optax.Schedule` such as
      `make_schedule(...)`.
    fixed_lr_mask: `params -> bool pytree` of the leaves kept at `fixed_lr`,
      or None (every leaf follows `schedule`).
    fixed_lr: their learning rate (> 0), e.g. `peak_learning_rate(...)`.
    also_exclude: `(path, leaf) -> bool`, leaves excluded besides those of
      `optim_config.exclude` (SimCLR excludes `head_supervised` by name).

  Returns:
    An `optax.GradientTransformation` over a params pytree.

  References:
    You et al., Large Batch Training of Convolutional Networks, 2017;
    google-research/simclr `lars_optimizer.py`; deepmind-research/byol
    `utils/optimizers.py`; facebookresearch/moco-v3 `moco/optimizer.py`;
    NVIDIA/apex `apex/parallel/LARC.py`; facebookresearch/moco
    `main_moco.py`.
  """
  cfg = optim_config
  build = _lookup(OPTIMIZERS, cfg.name, 'optimizer')
  include = _included(cfg.exclude)
  if also_exclude is not None:
    rule_include = include
    include = lambda tree: jax.tree.map(
        lambda kept, excluded: kept and not excluded, rule_include(tree),
        jax.tree_util.tree_map_with_path(also_exclude, tree))
  if cfg.weight_decay < 0:
    raise ValueError(f'weight_decay={cfg.weight_decay} must be >= 0')
  if not 0 <= cfg.momentum < 1:
    raise ValueError(f'momentum={cfg.momentum} must be in [0, 1)')
  if fixed_lr_mask is None:
    return build(cfg, schedule, include)
  if not fixed_lr > 0:
    raise ValueError(f'fixed_lr={fixed_lr} must be > 0 with a fixed_lr_mask')

  def labels(params):
    return jax.tree.map(lambda fixed: 'fixed' if fixed else 'scheduled',
                        fixed_lr_mask(params))

  return optax.multi_transform({'scheduled': build(cfg, schedule, include),
                                'fixed': build(cfg, fixed_lr, include)},
                               labels)


def make_excluded_optimizer(optim_config, schedule: optax.ScalarOrSchedule
                            ) -> optax.GradientTransformation:
  """The recipe's optimizer with every leaf excluded from weight decay and
  trust-ratio adaptation.

  What SimCLR's LARS does to its supervised head (`head_supervised`,
  excluded by name from both): momentum SGD at the scheduled learning rate,
  with the learning rate where the recipe's variant puts it (inside the
  momentum buffer for 'simclr', after it otherwise).

  Args:
    optim_config: `config.optim`.
    schedule: the learning rate of the run.

  References:
    google-research/simclr `tf2/lars_optimizer.py` (`exclude_from_weight_
    decay`, `exclude_from_layer_adaptation`).
  """
  build = _lookup(OPTIMIZERS, optim_config.name, 'optimizer')
  return build(optim_config, schedule,
               lambda tree: jax.tree.map(lambda _: False, tree))
