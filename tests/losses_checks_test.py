"""Trace-time validation: bad arguments raise a one-line ValueError."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import losses

Z = jnp.ones((4, 3))


def _raises(fn, *args, match, **kwargs):
  """Calls `fn` under `jax.jit` (static kwargs) and checks the message."""
  with pytest.raises(ValueError, match=match) as info:
    jax.jit(functools.partial(fn, **kwargs))(*args)
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('tau', [0.0, -0.1, float('nan'), float('inf'), True,
                                 jnp.float32(0.1), '0.1'])
@pytest.mark.parametrize('fn', [losses.nt_xent, losses.nt_xent_with_metrics])
def test_bad_temperature(fn, tau):
  with pytest.raises(ValueError, match='temperature=') as info:
    fn(Z, Z, tau)
  assert '\n' not in str(info.value)


def test_bad_temperature_other_losses():
  _raises(losses.moco_v2_infonce, Z, Z, Z, match=r'temperature=0\b',
          temperature=0)
  _raises(losses.moco_v3_infonce, Z, Z, Z, Z, match=r'temperature=-1\b',
          temperature=-1)
  _raises(losses.nt_xent_blockwise, Z, Z, match='temperature=-0.5',
          temperature=-0.5, block_size=2)
  _raises(losses.swav_loss, [Z, Z], match='temperature=0.0',
          temperature=0.0)


@pytest.mark.parametrize('shape2,bad', [((5, 3), r'\(5, 3\)'),
                                        ((4, 2), r'\(4, 2\)'),
                                        ((4,), r'\(4,\)')])
@pytest.mark.parametrize('fn,kwargs', [
    (losses.nt_xent, {}),
    (losses.nt_xent_blockwise, {'block_size': 2}),
])
def test_mismatched_views(fn, kwargs, shape2, bad):
  _raises(fn, Z, jnp.ones(shape2), match=bad, temperature=0.1, **kwargs)


@pytest.mark.parametrize('block_size', [0, -3, 2.5, None])
def test_bad_block_size(block_size):
  _raises(losses.nt_xent_blockwise, Z, Z,
          match=re.escape(f'block_size={block_size!r}'), temperature=0.1,
          block_size=block_size)


def test_moco_shapes():
  _raises(losses.moco_v2_infonce, Z, Z, jnp.ones((8, 5)),
          match=r'queue has shape \(8, 5\).*width 3', temperature=0.2)
  _raises(losses.moco_v2_infonce, Z, jnp.ones((4, 2)), jnp.ones((8, 3)),
          match=r'k has shape \(4, 2\)', temperature=0.2)
  _raises(losses.moco_v3_infonce, Z, Z, Z, jnp.ones((3, 3)),
          match=r'k2 has shape \(3, 3\)', temperature=1.0)
  _raises(losses.moco_enqueue, jnp.ones((8, 4)), jnp.int32(0), Z,
          match=r'queue has shape \(8, 4\)')


def test_moco_queue_length_must_be_multiple_of_global_batch():
  _raises(losses.moco_enqueue, jnp.ones((10, 3)), jnp.int32(0), Z,
          match=r'K=10 .* global batch 4')


@pytest.mark.parametrize('kwargs,match', [
    ({'epsilon': 0.0}, 'epsilon=0.0'),
    ({'num_iters': 0}, 'num_iters=0'),
])
@pytest.mark.parametrize('fn', [losses.sinkhorn, losses.sinkhorn_log])
def test_bad_sinkhorn_arguments(fn, kwargs, match):
  _raises(fn, Z, match=match, **kwargs)


def test_sinkhorn_needs_2d_scores():
  _raises(losses.sinkhorn, jnp.ones((4,)), match=r'scores has shape \(4,\)')


@pytest.mark.parametrize('scores,kwargs,match', [
    ([Z], {}, 'length 1'),
    ([Z, jnp.ones((4, 5))], {}, r'scores\[1\] has shape \(4, 5\)'),
    ([Z, Z], {'crops_for_assign': (0, 2)}, r'crops_for_assign=\(0, 2\)'),
    ([Z, Z], {'crops_for_assign': (1, 1)}, r'crops_for_assign=\(1, 1\)'),
    ([Z, Z], {'crops_for_assign': ()}, r'crops_for_assign=\(\)'),
])
def test_bad_swav_crops(scores, kwargs, match):
  _raises(losses.swav_loss, scores, match=match, **kwargs)


def test_swav_queue_width_and_count():
  _raises(lambda s, q: losses.swav_loss(s, queue_scores=q), [Z, Z],
          [jnp.ones((6, 3)), jnp.ones((6, 2))],
          match=r'queue_scores\[1\] has shape \(6, 2\).*width 3')
  _raises(lambda s, q: losses.swav_loss(s, queue_scores=q), [Z, Z],
          [jnp.ones((6, 3))], match='queue_scores has 1 entries')


def test_swav_scores_must_be_a_sequence():
  with pytest.raises(ValueError, match='got ArrayImpl'):
    losses.swav_loss(Z)


def test_valid_numpy_temperature_is_accepted():
  loss = losses.nt_xent(np.ones((2, 3), np.float32), np.ones((2, 3)),
                        np.float64(0.5))
  assert np.isfinite(loss)
