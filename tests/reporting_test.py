"""Progress line, TensorBoard scalars and the non-finite stop."""

import jax.numpy as jnp
import pytest
import tensorflow as tf
from etils import epath

from jaxssl import reporting


def _metrics(loss):
  return {'loss': jnp.float32(loss), 'learning_rate': jnp.float32(0.1),
          'contrast_acc': jnp.float32(0.5)}


@pytest.mark.parametrize('seconds, text', [(6, '6s'), (245, '4m05s'),
                                           (3723, '1h02m03s')])
def test_format_duration(seconds, text):
  assert reporting.format_duration(seconds) == text


def test_write_averages_and_logs_to_tensorboard(tmp_path, capsys):
  reporter = reporting.Reporter(str(tmp_path), total_steps=10,
                                global_batch_size=32, start_step=0)
  reporter.add(_metrics(2.0))
  reporter.add(_metrics(4.0))
  metrics = reporter.write(2)
  reporter.close()
  assert metrics['loss'] == 3.0 and metrics['images_per_sec'] > 0
  line = capsys.readouterr().out.strip()
  assert line.startswith('step 2/10 | loss 3.0000 | acc 0.500 | lr 0.1 |')
  assert 'img/s | ETA' in line
  values = {}
  for path in epath.Path(tmp_path).glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        values[value.tag] = float(tf.make_ndarray(value.tensor))
  assert values['loss'] == 3.0 and values['learning_rate'] == pytest.approx(
      0.1)


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_nonfinite_loss_names_the_step(tmp_path, bad):
  reporter = reporting.Reporter(str(tmp_path), total_steps=10,
                                global_batch_size=32, start_step=4)
  for loss in (1.0, bad, 1.0):
    reporter.add(_metrics(loss))
  with pytest.raises(reporting.NonFiniteLossError,
                     match=f'non-finite loss {bad} at step 6'):
    reporter.check_finite(7)
  reporter.close()
