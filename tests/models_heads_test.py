"""Tests for jaxssl.models.heads: layer structure per official recipe,
forward values against float64 numpy, dtypes, prototype normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.models import heads

# RBG keys: threefry takes seconds to compile per random op on CPU.
_KEY = jax.random.key(0, impl='rbg')
_EPS = 1e-5


def _shapes(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {'/'.join(k.key for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


def _np_bn(h, gamma=1.0, beta=0.0):
  """float64 train-mode BN over the batch (biased variance)."""
  mean = h.mean(0)
  var = ((h - mean)**2).mean(0)
  return (h - mean) / np.sqrt(var + _EPS) * gamma + beta


def _np_params(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _randomize(params, seed=0):
  """Non-trivial gamma/beta/bias values so the numpy check sees them."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: (rng.uniform(0.5, 1.5, a.shape) if a.ndim == 1 else
                 rng.normal(size=a.shape) / np.sqrt(a.shape[0])
                 ).astype(np.float32), params)


def _inputs(batch=8, dim=6, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, dim)).astype(
      np.float32)


@pytest.mark.parametrize('num_layers,expected', [
    (0, {}),
    (1, {'dense_0/kernel': (6, 4), 'bn_0/scale': (4,)}),
    (2, {'dense_0/kernel': (6, 6), 'bn_0/scale': (6,), 'bn_0/bias': (6,),
         'dense_1/kernel': (6, 4), 'bn_1/scale': (4,)}),
    (3, {'dense_0/kernel': (6, 6), 'bn_0/scale': (6,), 'bn_0/bias': (6,),
         'dense_1/kernel': (6, 6), 'bn_1/scale': (6,), 'bn_1/bias': (6,),
         'dense_2/kernel': (6, 4), 'bn_2/scale': (4,)}),
])
def test_projection_head_structure(num_layers, expected):
  """SimCLR v2: no Dense bias; middle BNs have beta, the last one does not."""
  head = heads.ProjectionHead(num_layers=num_layers, output_dim=4)
  out, variables = head.init_with_output(_KEY, _inputs(), train=True)
  assert _shapes(variables.get('params', {})) == expected
  assert out.shape == (8, 4 if num_layers else 6)


def test_projection_head_hidden_dim():
  head = heads.ProjectionHead(num_layers=2, hidden_dim=10, output_dim=3)
  variables = head.init(_KEY, _inputs(), train=True)
  assert _shapes(variables['params'])['dense_0/kernel'] == (6, 10)
  assert _shapes(variables['params'])['dense_1/kernel'] == (10, 3)


def test_projection_head_forward_matches_numpy():
  x = _inputs()
  head = heads.ProjectionHead(num_layers=3, output_dim=4)
  variables = head.init(_KEY, x, train=True)
  params = _randomize(variables['params'])
  (out, hiddens), _ = head.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x,
      train=True, return_hiddens=True, mutable=['batch_stats'])
  p = _np_params(params)
  h0 = np.asarray(x, np.float64)
  h1 = np.maximum(_np_bn(h0 @ p['dense_0']['kernel'], p['bn_0']['scale'],
                         p['bn_0']['bias']), 0)
  h2 = np.maximum(_np_bn(h1 @ p['dense_1']['kernel'], p['bn_1']['scale'],
                         p['bn_1']['bias']), 0)
  h3 = _np_bn(h2 @ p['dense_2']['kernel'], p['bn_2']['scale'])
  assert len(hiddens) == 4
  for got, want in zip(hiddens, (h0, h1, h2, h3)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out, h3, rtol=1e-4, atol=1e-4)
  assert np.min(h3) < 0  # No ReLU on the last layer.


def test_projection_head_dense_init_is_normal_0_01():
  head = heads.ProjectionHead(num_layers=1, output_dim=128)
  kernel = head.init(_KEY, jnp.zeros((4, 256)), train=True)['params'][
      'dense_0']['kernel']
  kernel = np.asarray(kernel, np.float64)
  assert abs(kernel.std() / 0.01 - 1) < 0.03
  assert abs(kernel.mean()) < 1e-3
  assert np.abs(kernel).max() > 0.035  # Not truncated at 2 sigma.


# name: (MLPHead kwargs, expected param shapes) for in 6, hidden 10, out 4.
_MLP_CASES = {
    'byol': (dict(), {
        'dense_0/kernel': (6, 10), 'dense_0/bias': (10,), 'bn_0/scale': (10,),
        'bn_0/bias': (10,), 'dense_1/kernel': (10, 4)}),
    'moco_v2': (dict(use_bn=False, output_bias=True), {
        'dense_0/kernel': (6, 10), 'dense_0/bias': (10,),
        'dense_1/kernel': (10, 4), 'dense_1/bias': (4,)}),
    'moco_v3_projector': (dict(hidden_bias=False, last_bn=True,
                               last_bn_affine=False), {
        'dense_0/kernel': (6, 10), 'bn_0/scale': (10,), 'bn_0/bias': (10,),
        'dense_1/kernel': (10, 4)}),
    'moco_v3_predictor': (dict(hidden_bias=False), {
        'dense_0/kernel': (6, 10), 'bn_0/scale': (10,), 'bn_0/bias': (10,),
        'dense_1/kernel': (10, 4)}),
    'swav': (dict(output_bias=True), {
        'dense_0/kernel': (6, 10), 'dense_0/bias': (10,), 'bn_0/scale': (10,),
        'bn_0/bias': (10,), 'dense_1/kernel': (10, 4),
        'dense_1/bias': (4,)}),
}


def _np_mlp(name, p, x):
  """Each official MLP written out from its paper/repo description."""
  x = np.asarray(x, np.float64)
  d0, d1 = p['dense_0'], p['dense_1']
  if name == 'byol':  # Linear(bias) -> BN -> ReLU -> Linear(no bias)
    h = np.maximum(_np_bn(x @ d0['kernel'] + d0['bias'], p['bn_0']['scale'],
                          p['bn_0']['bias']), 0)
    return h @ d1['kernel']
  if name == 'moco_v2':  # Linear -> ReLU -> Linear, with biases, no BN
    h = np.maximum(x @ d0['kernel'] + d0['bias'], 0)
    return h @ d1['kernel'] + d1['bias']
  if name.startswith('moco_v3'):  # no biases; projector ends in BN(affine=F)
    h = np.maximum(_np_bn(x @ d0['kernel'], p['bn_0']['scale'],
                          p['bn_0']['bias']), 0)
    out = h @ d1['kernel']
    return _np_bn(out) if name == 'moco_v3_projector' else out
  assert name == 'swav'  # Linear -> BN -> ReLU -> Linear, torch biases
  h = np.maximum(_np_bn(x @ d0['kernel'] + d0['bias'], p['bn_0']['scale'],
                        p['bn_0']['bias']), 0)
  return h @ d1['kernel'] + d1['bias']


@pytest.mark.parametrize('name', sorted(_MLP_CASES))
def test_mlp_head_official_configurations(name):
  kwargs, expected = _MLP_CASES[name]
  head = heads.MLPHead(hidden_dim=10, output_dim=4, **kwargs)
  x = _inputs()
  variables = head.init(_KEY, x, train=True)
  assert _shapes(variables['params']) == expected
  params = _randomize(variables['params'])
  out, _ = head.apply({'params': params,
                       'batch_stats': variables.get('batch_stats', {})},
                      x, train=True, mutable=['batch_stats'])
  assert out.shape == (8, 4) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_mlp(name, _np_params(params), x),
                             rtol=1e-4, atol=1e-4)


def test_mlp_head_num_layers():
  head = heads.MLPHead(hidden_dim=10, output_dim=4, num_layers=3,
                       last_bn=True)
  shapes = _shapes(head.init(_KEY, _inputs(), train=True)['params'])
  assert shapes == {
      'dense_0/kernel': (6, 10), 'dense_0/bias': (10,), 'bn_0/scale': (10,),
      'bn_0/bias': (10,), 'dense_1/kernel': (10, 10), 'dense_1/bias': (10,),
      'bn_1/scale': (10,), 'bn_1/bias': (10,), 'dense_2/kernel': (10, 4),
      'bn_2/scale': (4,), 'bn_2/bias': (4,)}


@pytest.mark.parametrize('make_head,message', [
    (lambda: heads.MLPHead(hidden_dim=10, output_dim=4, num_layers=0),
     'MLPHead num_layers=0 must be a positive integer'),
    (lambda: heads.MLPHead(hidden_dim=0, output_dim=4),
     'MLPHead hidden_dim=0 must be a positive integer'),
    (lambda: heads.ProjectionHead(num_layers=-1),
     'ProjectionHead num_layers=-1 must be a non-negative integer'),
    (lambda: heads.ProjectionHead(output_dim=0),
     'ProjectionHead output_dim=0 must be a positive integer'),
    (lambda: heads.Prototypes(0),
     'Prototypes num_prototypes=0 must be a positive integer'),
])
def test_heads_reject_bad_sizes(make_head, message):
  head = make_head()
  kwargs = {} if isinstance(head, heads.Prototypes) else {'train': True}
  with pytest.raises(ValueError, match=message):
    head.init(_KEY, _inputs(), **kwargs)


@pytest.mark.parametrize('make_head', [
    lambda dtype: heads.ProjectionHead(num_layers=3, output_dim=4,
                                       dtype=dtype),
    lambda dtype: heads.MLPHead(10, 4, last_bn=True, dtype=dtype),
    lambda dtype: heads.MLPHead(10, 4, use_bn=False, dtype=dtype),
])
def test_heads_bfloat16_compute_float32_params_and_output(make_head):
  x = jax.ShapeDtypeStruct((8, 6), jnp.bfloat16)
  head = make_head(jnp.bfloat16)
  out, variables = jax.eval_shape(
      lambda x: head.init_with_output(_KEY, x, train=True), x)
  assert out.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  jaxpr = jax.make_jaxpr(lambda v, x: head.apply(
      v, x, train=True, mutable=['batch_stats']))(variables, x)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general']
  assert dots and all(
      [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2 for e in dots)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_prototypes_scores(dtype):
  z = _inputs(8, 6)
  prototypes = heads.Prototypes(5, dtype=dtype)
  variables = prototypes.init(_KEY, z)
  assert _shapes(variables['params']) == {'kernel': (6, 5)}
  scores = prototypes.apply(variables, z)
  assert scores.dtype == jnp.float32
  expected = np.asarray(z, np.float64) @ np.asarray(
      variables['params']['kernel'], np.float64)
  tolerance = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(scores, expected, rtol=tolerance,
                             atol=tolerance)


def test_normalize_prototypes_gives_unit_columns():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(6, 5)).astype(np.float32) * 3.0
  kernel[:, 2] = 0.0  # A dead prototype must stay finite.
  params = {'kernel': jnp.asarray(kernel)}
  normalized = jax.jit(heads.normalize_prototypes)(params)
  k64 = kernel.astype(np.float64)
  norms = np.linalg.norm(k64, axis=0, keepdims=True)
  expected = np.where(norms > 0, k64 / np.maximum(norms, 1e-300), 0.0)
  np.testing.assert_allclose(normalized['kernel'], expected, rtol=1e-6,
                             atol=1e-6)
  assert np.all(np.isfinite(normalized['kernel']))
  np.testing.assert_array_equal(params['kernel'], kernel)  # Pure.
  # Each prototype (a column) is a unit vector; rows are not.
  live = [0, 1, 3, 4]
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(normalized['kernel'])[:, live], axis=0),
      1.0, rtol=1e-6)


def test_normalize_prototypes_rejects_other_trees():
  with pytest.raises(ValueError, match=r"got keys \['bias', 'kernel'\]"):
    heads.normalize_prototypes({'kernel': jnp.ones((2, 3)),
                                'bias': jnp.ones(3)})
