"""Tests for jaxssl.optim: LARS variants, SGD, AdamW, masks and EMA updates.

Each optimizer is checked over several steps with a changing learning rate
(so lr inside vs after the momentum buffer differs) against a float64 numpy
re-statement of the official update rule: SimCLR `lars_optimizer.py`, BYOL
`utils/optimizers.py`, MoCo v3 `moco/optimizer.py`, apex `LARC.py` + torch
SGD, torch SGD and torch AdamW.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxssl import optim

NUM_STEPS = 5
# Leaves by role: 'still' has a zero gradient at every step, 'zero' starts at
# zero, 'head/gain' is 1-D but neither a bias nor a norm parameter.
SHAPES = {
    'conv': {'kernel': (3, 3, 2, 4)},
    'dense': {'kernel': (4, 5), 'bias': (5,)},
    'bn': {'scale': (4,), 'bias': (4,)},
    'head': {'gain': (5,)},
    'still': {'kernel': (3, 2)},
    'zero': {'kernel': (2, 3)},
}
# Hand-written from each rule's definition, independent of exclusion_mask.
EXCLUDED = {
    'bias_and_norm': {'dense/bias', 'bn/scale', 'bn/bias'},
    'ndim': {'dense/bias', 'bn/scale', 'bn/bias', 'head/gain'},
    'none': set(),
}


def _config(**overrides):
  values = dict(
      name='lars', lars_variant='simclr', exclude='bias_and_norm',
      base_learning_rate=0.3, lr_scaling='linear', weight_decay=0.1,
      momentum=0.9, nesterov=False, trust_coefficient=1e-3,
      schedule='warmup_cosine', warmup_epochs=0., warmup_start_lr=0.,
      final_lr=0.)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _schedule(count):
  # Grows 0.5, 1.0, 1.5, ...: a changing lr separates lr-inside from
  # lr-after momentum.
  return 0.5 * (count + 1)


def _problem(seed=0):
  """Returns float64 numpy params and per-step gradients, keyed 'mod/leaf'."""
  rng = np.random.default_rng(seed)
  params, grads = {}, [{} for _ in range(NUM_STEPS)]
  for module, leaves in SHAPES.items():
    for leaf, shape in leaves.items():
      name = f'{module}/{leaf}'
      params[name] = (np.zeros(shape) if module == 'zero'
                      else rng.normal(size=shape))
      for step_grads in grads:
        step_grads[name] = (np.zeros(shape) if module == 'still'
                            else 0.1 * rng.normal(size=shape))
  return params, grads


def _nest(flat):
  tree = {}
  for name, value in flat.items():
    module, leaf = name.split('/')
    tree.setdefault(module, {})[leaf] = jnp.asarray(value)
  return tree


def _flatten(tree):
  return {f'{m}/{leaf}': np.asarray(v) for m, leaves in tree.items()
          for leaf, v in leaves.items()}


# ------------------------------------------- official rules, float64 numpy


def _simclr_step(p, g, s, lr, excluded, cfg):
  """SimCLR LARSOptimizer, classic_momentum=True."""
  v = s.get('v', np.zeros_like(p))
  if not excluded:
    g = g + cfg.weight_decay * p
  trust = 1.
  if not excluded:
    w_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
    if w_norm > 0 and g_norm > 0:
      trust = cfg.trust_coefficient * w_norm / g_norm
  scaled_lr = lr * trust
  v = cfg.momentum * v + scaled_lr * g
  update = cfg.momentum * v + scaled_lr * g if cfg.nesterov else v
  return p - update, {'v': v}


def _after_step(p, g, s, lr, excluded, cfg):
  """BYOL lars chain / MoCo v3 LARS: trust on g + wd p, lr after momentum."""
  mu = s.get('mu', np.zeros_like(p))
  if not excluded:
    g = g + cfg.weight_decay * p
    p_norm, u_norm = np.linalg.norm(p), np.linalg.norm(g)
    if p_norm > 0 and u_norm > 0:
      g = g * (cfg.trust_coefficient * p_norm / u_norm)
  mu = cfg.momentum * mu + g
  return p - lr * mu, {'mu': mu}


def _larc_step(p, g, s, lr, excluded, cfg):
  """apex LARC(clip=False) then torch SGD with its weight decay set to 0."""
  buf = s.get('buf', np.zeros_like(p))
  p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
  if not excluded and p_norm != 0 and g_norm != 0:
    wd = cfg.weight_decay
    adaptive_lr = cfg.trust_coefficient * p_norm / (
        g_norm + p_norm * wd + 1e-8)
    g = (g + wd * p) * adaptive_lr
  buf = cfg.momentum * buf + g
  return p - lr * buf, {'buf': buf}


def _sgd_step(p, g, s, lr, excluded, cfg):
  """torch.optim.SGD with coupled weight decay (optionally Nesterov)."""
  buf = s.get('buf', np.zeros_like(p))
  if not excluded:
    g = g + cfg.weight_decay * p
  buf = cfg.momentum * buf + g
  direction = g + cfg.momentum * buf if cfg.nesterov else buf
  return p - lr * direction, {'buf': buf}


def _adamw_step(p, g, s, lr, excluded, cfg):
  """torch.optim.AdamW with default betas (0.9, 0.999) and eps 1e-8."""
  b1, b2, eps = 0.9, 0.999, 1e-8
  t = s.get('t', 0) + 1
  m = b1 * s.get('m', np.zeros_like(p)) + (1 - b1) * g
  v = b2 * s.get('v', np.zeros_like(p)) + (1 - b2) * g * g
  if not excluded:
    p = p * (1 - lr * cfg.weight_decay)
  denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
  p = p - (lr / (1 - b1 ** t)) * m / denom
  return p, {'m': m, 'v': v, 't': t}


REFERENCE_STEPS = {
    ('lars', 'simclr'): _simclr_step,
    ('lars', 'after'): _after_step,
    ('lars', 'larc'): _larc_step,
    ('sgd', None): _sgd_step,
    ('adamw', None): _adamw_step,
}


def _reference_run(cfg, params, grads):
  step_fn = REFERENCE_STEPS[
      (cfg.name, cfg.lars_variant if cfg.name == 'lars' else None)]
  excluded = EXCLUDED[cfg.exclude]
  params = dict(params)
  states = {name: {} for name in params}
  for t, step_grads in enumerate(grads):
    lr = _schedule(t)
    for name in params:
      params[name], states[name] = step_fn(
          params[name], step_grads[name], states[name], lr,
          name in excluded, cfg)
  return params


def _optax_run(cfg, params, grads, schedule=_schedule, **kwargs):
  opt = optim.make_optimizer(cfg, schedule, **kwargs)
  tree = _nest(params)
  state = opt.init(tree)
  update = jax.jit(opt.update)
  for step_grads in grads:
    updates, state = update(_nest(step_grads), state, tree)
    tree = optax.apply_updates(tree, updates)
  return _flatten(tree)


RECIPES = [
    pytest.param(dict(lars_variant='simclr'), id='simclr'),
    pytest.param(dict(lars_variant='simclr', nesterov=True),
                 id='simclr-nesterov'),
    pytest.param(dict(lars_variant='after'), id='byol'),
    pytest.param(dict(lars_variant='after', exclude='ndim'), id='moco_v3'),
    pytest.param(dict(lars_variant='larc', exclude='none'), id='swav'),
    pytest.param(dict(lars_variant='larc'), id='larc-bias_and_norm'),
    pytest.param(dict(name='sgd', exclude='none'), id='moco_v2-sgd'),
    pytest.param(dict(name='sgd', exclude='none', nesterov=True,
                      weight_decay=1e-6), id='linear_eval-nesterov'),
    pytest.param(dict(name='adamw', exclude='none'), id='adamw'),
    pytest.param(dict(name='adamw', exclude='ndim'), id='adamw-ndim'),
]


@pytest.mark.parametrize('overrides', RECIPES)
def test_matches_official_update_rule(overrides):
  cfg = _config(**overrides)
  params, grads = _problem()
  expected = _reference_run(cfg, params, grads)
  with jax.enable_x64(True):
    actual = _optax_run(cfg, params, grads)
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=1e-10,
                               atol=1e-14, err_msg=name)


FIXED_MODULES = ('head', 'bn')  # 1-D leaves: excluded by some rules, not all


def _fixed_mask(tree):
  return {module: jax.tree.map(lambda _: module in FIXED_MODULES, leaves)
          for module, leaves in tree.items()}


@pytest.mark.parametrize('overrides', [
    pytest.param(dict(name='sgd', exclude='none'), id='simsiam-sgd'),
    pytest.param(dict(lars_variant='after', exclude='ndim'), id='lars-after'),
    pytest.param(dict(name='adamw', exclude='none'), id='adamw')])
def test_fixed_lr_leaves_follow_the_constant_rate(overrides):
  # SimSiam's --fix-pred-lr: marked leaves are updated exactly as a run at
  # the constant rate would update them, the rest as the scheduled run.
  cfg = _config(**overrides)
  params, grads = _problem()
  with jax.enable_x64(True):
    scheduled = _optax_run(cfg, params, grads)
    constant = _optax_run(cfg, params, grads, schedule=0.7)
    split = _optax_run(cfg, params, grads, fixed_lr_mask=_fixed_mask,
                       fixed_lr=0.7)
  assert split.keys() == scheduled.keys()
  for name in split:
    fixed = name.split('/')[0] in FIXED_MODULES
    expected = (constant if fixed else scheduled)[name]
    np.testing.assert_allclose(split[name], expected, rtol=1e-12, atol=0,
                               err_msg=name)
  # The two rates really differ on this problem.
  assert not np.allclose(constant['head/gain'], scheduled['head/gain'])


def test_fixed_lr_must_be_positive():
  with pytest.raises(ValueError, match=r'^fixed_lr=0.0 must be > 0 with a '
                     r'fixed_lr_mask$'):
    optim.make_optimizer(_config(), 0.1, fixed_lr_mask=_fixed_mask)


def test_lr_inside_and_after_momentum_differ_on_the_test_problem():
  # Guards the test above: on its problem the two placements must disagree,
  # or the LARS comparisons could not tell them apart.
  params, grads = _problem()
  inside = _reference_run(_config(lars_variant='simclr'), params, grads)
  after = _reference_run(_config(lars_variant='after'), params, grads)
  for name in ['conv/kernel', 'dense/bias']:
    moved = np.linalg.norm(inside[name] - params[name])
    gap = np.linalg.norm(inside[name] - after[name])
    assert gap > 0.1 * moved, name


# ------------------------------------------------------------- masks


class _TinyNet(nn.Module):
  """Dense + BatchNorm 'bn' + LayerNorm + bias-free Dense + a 1-D gain."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    x = nn.LayerNorm()(x)
    x = nn.Dense(4, use_bias=False, name='proj')(x)
    return x * self.param('gain', nn.initializers.ones, (4,))


def _tiny_variables(abstract=False):
  init = lambda: _TinyNet().init(jax.random.key(0), jnp.ones((2, 3)))
  return jax.eval_shape(init) if abstract else init()


# 'gain' is 1-D but neither bias nor norm: only the ndim rule excludes it.
TINY_EXPECTED = {
    'bias_and_norm': {
        'Dense_0': {'kernel': False, 'bias': True},
        'bn': {'scale': True, 'bias': True},
        'LayerNorm_0': {'scale': True, 'bias': True},
        'proj': {'kernel': False}, 'gain': False},
    'ndim': {
        'Dense_0': {'kernel': False, 'bias': True},
        'bn': {'scale': True, 'bias': True},
        'LayerNorm_0': {'scale': True, 'bias': True},
        'proj': {'kernel': False}, 'gain': True},
    'none': {
        'Dense_0': {'kernel': False, 'bias': False},
        'bn': {'scale': False, 'bias': False},
        'LayerNorm_0': {'scale': False, 'bias': False},
        'proj': {'kernel': False}, 'gain': False},
}


@pytest.mark.parametrize('rule', sorted(TINY_EXPECTED))
@pytest.mark.parametrize('abstract', [False, True])
def test_exclusion_mask_on_flax_model(rule, abstract):
  variables = _tiny_variables(abstract)
  assert optim.exclusion_mask(variables['params'], rule) == TINY_EXPECTED[rule]
  # The whole variables tree works too: the 'params' prefix changes nothing.
  whole = optim.exclusion_mask({'params': variables['params']}, rule)
  assert whole == {'params': TINY_EXPECTED[rule]}


@pytest.mark.parametrize('name', ['BatchNorm_0', 'batch_norm', 'proj_BN1',
                                  'GroupNorm_2'])
def test_name_rule_matches_norm_modules_case_insensitively(name):
  params = {name: {'scale': jnp.ones(3)}, 'other': {'kernel': jnp.ones((2, 2))}}
  assert optim.exclusion_mask(params, 'bias_and_norm') == {
      name: {'scale': True}, 'other': {'kernel': False}}


@pytest.mark.parametrize('variant', ['simclr', 'after', 'larc'])
def test_lars_excluded_leaves_get_plain_sgd(variant):
  # First step from a fresh state with lr 0.1: an excluded leaf moves by
  # exactly -0.1 * g (no weight decay, trust 1); a kernel does not.
  params = _tiny_variables()['params']
  cfg = _config(lars_variant=variant, weight_decay=0.5)
  opt = optim.make_optimizer(cfg, 0.1)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  grads = jax.tree.unflatten(treedef, [
      jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  updates, _ = opt.update(grads, opt.init(params), params)
  excluded = TINY_EXPECTED['bias_and_norm']
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    names = [k.key for k in path]
    is_excluded = excluded[names[0]] if len(names) == 1 else (
        excluded[names[0]][names[1]])
    grad = grads[names[0]] if len(names) == 1 else grads[names[0]][names[1]]
    if is_excluded:
      np.testing.assert_allclose(update, -0.1 * grad, rtol=1e-6)
    else:
      assert not np.allclose(update, -0.1 * grad, rtol=1e-2), names


# ---------------------------------------------------- zero-norm rules


def _one_leaf_run(variant, param, grad, num_steps=3):
  cfg = _config(lars_variant=variant, exclude='none', weight_decay=0.5)
  opt = optim.make_optimizer(cfg, 0.1)
  params = {'w': {'kernel': param}}
  state = opt.init(params)
  for _ in range(num_steps):
    updates, state = opt.update({'w': {'kernel': grad}}, state, params)
    params = optax.apply_updates(params, updates)
  return params['w']['kernel']


def test_larc_skips_weight_decay_when_gradient_is_zero():
  param = jnp.arange(1., 7.).reshape(2, 3)
  out = _one_leaf_run('larc', param, jnp.zeros_like(param))
  np.testing.assert_array_equal(out, param)


@pytest.mark.parametrize('variant', ['simclr', 'after'])
def test_lars_zero_gradient_still_decays(variant):
  # g = wd * p, trust = eta |p| / |wd p| = eta / wd, so one step moves p by
  # -lr * eta * p in both placements (the buffer starts at zero).
  param = jnp.arange(1., 7.).reshape(2, 3)
  out = _one_leaf_run(variant, param, jnp.zeros_like(param), num_steps=1)
  np.testing.assert_allclose(out, param * (1 - 0.1 * 1e-3), rtol=1e-6)


@pytest.mark.parametrize('variant', ['simclr', 'after', 'larc'])
def test_zero_parameter_gets_trust_one(variant):
  grad = jnp.arange(1., 7.).reshape(2, 3)
  out = _one_leaf_run(variant, jnp.zeros_like(grad), grad, num_steps=1)
  np.testing.assert_allclose(out, -0.1 * grad, rtol=1e-6)


# ------------------------------------------------------------- errors


@pytest.mark.parametrize('overrides, match', [
    (dict(name='lamb'), r"^unknown optimizer 'lamb'; known: adamw, lars, sgd$"),
    (dict(lars_variant='byol'),
     r"^unknown lars_variant 'byol'; known: after, larc, simclr$"),
    (dict(exclude='norms'),
     r"^unknown exclude rule 'norms'; known: bias_and_norm, ndim, none$"),
    (dict(weight_decay=-1e-4), r'^weight_decay=-0.0001 must be >= 0$'),
    (dict(momentum=1.), r'^momentum=1.0 must be in \[0, 1\)$'),
    (dict(trust_coefficient=0.), r'^trust_coefficient=0.0 must be positive$'),
    (dict(name='adamw', nesterov=True),
     r"^nesterov=True is not supported by optimizer 'adamw'"),
])
def test_make_optimizer_errors(overrides, match):
  with pytest.raises(ValueError, match=match) as err:
    optim.make_optimizer(_config(**overrides), 0.1)
  assert '\n' not in str(err.value)


def test_exclusion_mask_unknown_rule():
  with pytest.raises(ValueError, match=r"^unknown exclude rule 'bn'; known: "
                     r'bias_and_norm, ndim, none$'):
    optim.exclusion_mask({'w': jnp.ones(2)}, 'bn')


def test_schedule_helpers_are_reexported():
  cfg = _config(warmup_epochs=1.)
  schedule = optim.make_schedule(cfg, global_batch_size=512,
                                 steps_per_epoch=10, total_steps=20)
  assert float(schedule(10)) == pytest.approx(
      optim.peak_learning_rate(cfg, 512), rel=1e-6)
  assert float(optim.ema_momentum_schedule(0.99, 10)(10)) == 1.
