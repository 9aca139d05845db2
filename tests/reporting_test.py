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


def test_the_progress_line_shows_the_probe_and_the_latest_knn(tmp_path,
                                                             capsys):
  reporter = reporting.Reporter(str(tmp_path), total_steps=10,
                                global_batch_size=32, start_step=0)
  reporter.add(dict(_metrics(1.0), online_probe_top1=jnp.float32(0.25)))
  reporter.write(1)
  reporter.write_monitors(1, {'knn_k200_top1': 0.5, 'knn_k20_top1': 0.625,
                              'knn_k20_top5': 0.9, 'rankme': 12.5})
  reporter.add(dict(_metrics(1.0), online_probe_top1=jnp.float32(0.75)))
  reporter.write(2)
  reporter.close()
  first, monitors, second = capsys.readouterr().out.strip().splitlines()
  assert '| probe 0.250 |' in first and 'kNN' not in first
  assert monitors == ('monitors at step 1: knn_k200_top1 0.5 | knn_k20_top1 '
                      '0.625 | knn_k20_top5 0.9 | rankme 12.5')
  assert '| probe 0.750 | kNN-20 0.625 | lr 0.1 |' in second


def test_evaluation_scalars_are_named_as_the_monitors():
  entry = {'linear': {'fast': {'top1': 0.8, 'top5': 0.9},
                      'paper': {'top1': 0.7, 'top5': 0.95}},
           'knn': {'k20': {'top1': 0.6, 'top5': 0.85}},
           'health': {'rankme': 3.5, 'alignment': 0.25, 'uniformity': -2.0},
           'finetune': {'0.01': {'top1': 0.5, 'top5': 0.75}}}
  assert reporting.evaluation_scalars(entry) == {
      'linear_fast_top1': 0.8, 'linear_paper_top1': 0.7,
      'knn_k20_top1': 0.6, 'knn_k20_top5': 0.85, 'rankme': 3.5,
      'alignment': 0.25, 'uniformity': -2.0, 'finetune_0.01_top1': 0.5}
  assert reporting.evaluation_scalars(
      dict(entry, knn=None, health=None, finetune=None)) == {
          'linear_fast_top1': 0.8, 'linear_paper_top1': 0.7}


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
