"""Tests for jaxssl.evaluation.pictures (training curves, retrieval grid).

Event files are written by the writers jaxssl uses (clu's default writer,
`jaxssl.reporting.Reporter`) or record by record with TensorBoard's
`RecordWriter`; expected scalars are the written values rounded to float32.
Pictures are read back from the PNG; the retrieval grid's pixel positions
are recomputed here from the formulas in `retrieval_grid`'s docstring.
"""

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from clu import metric_writers
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from jaxssl import reporting
from jaxssl.evaluation import pictures

ALL_TITLES = ['loss', 'online linear probe (train top-1)',
              'kNN top-1 (held-out)', 'learning rate',
              'effective rank (RankMe)', 'alignment / uniformity']


def _f32(values):
  return np.asarray(values, np.float32).astype(np.float64)


def _write_clu(workdir, logs):
  """Writes `[(step, {tag: value})]`, and hparams, texts and an image."""
  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=False, asynchronous=False)
  writer.write_hparams({'learning_rate': 0.1, 'model': 'resnet18'})
  for step, scalars in logs:
    writer.write_scalars(step, scalars)
    writer.write_texts(step, {'note': 'not a scalar'})
  writer.write_images(1, {'image': np.ones((1, 4, 4, 1), np.float32)})
  writer.close()


def _write_records(path, events):
  """Writes `[(wall_time, step, tag, simple_value)]` as legacy summaries."""
  with open(path, 'wb') as f:
    writer = RecordWriter(f)
    writer.write(event_pb2.Event(wall_time=events[0][0] - 1,
                                 file_version='brain.Event:2')
                 .SerializeToString())
    for wall_time, step, tag, value in events:
      summary = summary_pb2.Summary(
          value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
      writer.write(event_pb2.Event(wall_time=wall_time, step=step,
                                   summary=summary).SerializeToString())


def _assert_scalars(actual, expected):
  assert sorted(actual) == sorted(expected)
  for tag, (steps, values) in expected.items():
    got_steps, got_values = actual[tag]
    assert got_steps.dtype == np.int64 and got_values.dtype == np.float64
    np.testing.assert_array_equal(got_steps, steps, err_msg=tag)
    np.testing.assert_array_equal(got_values, _f32(values), err_msg=tag)


def test_read_scalars_returns_what_clu_wrote_last_value_wins(tmp_path):
  rng = np.random.default_rng(0)
  loss, lr = rng.normal(size=8), rng.uniform(size=8)
  # Step 3 is logged twice in the first file; a resumed run (a second
  # writer, so a second file) re-logs steps 4 and 5 with new values.
  first = [(s, {'loss': loss[s], 'learning_rate': lr[s]}) for s in (1, 2, 3)]
  first += [(3, {'loss': loss[0]})]
  first += [(s, {'loss': -loss[s]}) for s in (5, 4)]
  _write_clu(tmp_path, first)
  _write_clu(tmp_path, [(s, {'loss': loss[s], 'rankme': float(s)})
                        for s in (4, 5, 6, 7)])
  assert len(list(tmp_path.glob('events.out.tfevents*'))) == 2
  scalars = pictures.read_scalars(str(tmp_path))
  _assert_scalars(scalars, {
      'loss': ([1, 2, 3, 4, 5, 6, 7], [loss[1], loss[2], loss[0]]
               + list(loss[4:8])),
      'learning_rate': ([1, 2, 3], lr[1:4]),
      'rankme': ([4, 5, 6, 7], [4, 5, 6, 7])})


def test_read_scalars_reads_what_the_reporter_wrote(tmp_path, capsys):
  reporter = reporting.Reporter(str(tmp_path), total_steps=4,
                                global_batch_size=8, start_step=0)
  for step, loss in [(1, 2.5), (2, 1.25)]:
    reporter.add({'loss': jnp.float32(loss), 'learning_rate': jnp.float32(0.1)})
    reporter.write(step)
  reporter.close()
  scalars = pictures.read_scalars(str(tmp_path))
  assert 'steps_per_sec' in scalars and 'images_per_sec' in scalars
  _assert_scalars({k: scalars[k] for k in ('loss', 'learning_rate')},
                  {'loss': ([1, 2], [2.5, 1.25]),
                   'learning_rate': ([1, 2], [0.1, 0.1])})


def test_read_scalars_simple_values_in_write_time_order(tmp_path):
  # Name order is the opposite of write order: the later file must win.
  _write_records(tmp_path / 'events.out.tfevents.1.late',
                 [(200.0, 5, 'loss', 0.5), (201.0, 6, 'loss', 0.25)])
  _write_records(tmp_path / 'events.out.tfevents.2.early',
                 [(100.0, 4, 'loss', 4.0), (101.0, 5, 'loss', 2.0)])
  (tmp_path / 'not_events.txt').write_text('ignored')
  _assert_scalars(pictures.read_scalars(str(tmp_path)),
                  {'loss': ([4, 5, 6], [4.0, 0.5, 0.25])})


def test_read_scalars_truncated_tail_corruption_and_no_files(tmp_path):
  path = tmp_path / 'events.out.tfevents.1'
  _write_records(path, [(1.0, 1, 'loss', 1.0), (2.0, 2, 'loss', 2.0)])
  data = path.read_bytes()
  path.write_bytes(data[:-5])  # the last record is cut: it is dropped
  _assert_scalars(pictures.read_scalars(str(tmp_path)),
                  {'loss': ([1], [1.0])})
  corrupt = bytearray(data)
  corrupt[-6] ^= 0xFF
  path.write_bytes(bytes(corrupt))
  with pytest.raises(ValueError, match='corrupt record'):
    pictures.read_scalars(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    pictures.read_scalars(str(tmp_path / 'missing'))


def _curve(steps, offset=0.0):
  steps = np.asarray(steps, np.int64)
  return steps, np.cos(steps / 7.0) + offset


def _all_groups():
  return {'knn_k200_top1': _curve([100, 200], 3.0),
          'uniformity': _curve([100, 200], -2.0),
          'knn_k20_top1': _curve([100, 200], 2.0),
          'rankme': _curve([100, 200], 50.0),
          'loss': _curve(range(1, 201)),
          'knn_k5_top1': _curve([100, 200], 1.0),
          'knn_k20_top5': _curve([100, 200]),
          'learning_rate': _curve(range(1, 201), 1.0),
          'alignment': _curve([100, 200], 1.0),
          'online_probe_top1': _curve(range(1, 201), 5.0),
          'steps_per_sec': _curve(range(1, 201))}


def test_panels_follow_the_present_groups_in_order():
  assert pictures._panels(_all_groups()) == [
      ('loss', ['loss']),
      ('online linear probe (train top-1)', ['online_probe_top1']),
      ('kNN top-1 (held-out)',
       ['knn_k5_top1', 'knn_k20_top1', 'knn_k200_top1']),
      ('learning rate', ['learning_rate']),
      ('effective rank (RankMe)', ['rankme']),
      ('alignment / uniformity', ['alignment', 'uniformity'])]
  only = {'uniformity': _curve([1]), 'loss': _curve([1, 2]),
          'rankme': _curve([]), 'knn_k20_top5': _curve([1])}
  assert pictures._panels(only) == [
      ('loss', ['loss']), ('alignment / uniformity', ['uniformity'])]
  assert pictures._panels({'steps_per_sec': _curve([1])}) == []


def test_figure_has_one_axes_per_panel_with_the_data():
  scalars = _all_groups()
  fig = pictures._figure(scalars, 'run')
  assert [ax.get_title() for ax in fig.axes] == ALL_TITLES
  knn = fig.axes[2]
  assert [t.get_text() for t in knn.get_legend().get_texts()] == [
      'k=5', 'k=20', 'k=200']
  for line, tag in zip(knn.lines, ['knn_k5_top1', 'knn_k20_top1',
                                   'knn_k200_top1'], strict=True):
    np.testing.assert_array_equal(line.get_xydata(),
                                  np.stack(scalars[tag], axis=1))
  assert all(ax.get_xlabel() == 'step' for ax in fig.axes)


def _read_png(path):
  with Image.open(path) as image:
    assert image.format == 'PNG'
    return np.asarray(image.convert('RGB'))


@pytest.mark.parametrize('tags, title, size', [
    (['loss'], '', (340, 500)),
    (['loss', 'rankme'], 'two', (380, 1000)),
    (None, 'all groups', (720, 1500))])
def test_plot_training_curves_writes_a_png(tmp_path, tags, title, size):
  scalars = _all_groups()
  if tags is not None:
    scalars = {tag: scalars[tag] for tag in tags}
  out = tmp_path / 'run' / 'curves.png'
  assert pictures.plot_training_curves(scalars, str(out), title=title) == str(
      out)
  pixels = _read_png(out)
  assert pixels.shape == size + (3,)
  colours = np.unique(pixels.reshape(-1, 3), axis=0)
  assert len(colours) > 50
  blue = np.all(pixels == (0x1f, 0x77, 0xb4), axis=-1)  # matplotlib's C0
  assert blue.sum() > 200
  assert os.listdir(out.parent) == ['curves.png']


def test_plot_training_curves_without_curves_fails(tmp_path):
  with pytest.raises(ValueError, match='steps_per_sec'):
    pictures.plot_training_curves({'steps_per_sec': _curve([1])},
                                  str(tmp_path / 'x.png'))
  assert not os.listdir(tmp_path)


def _layout(h, w, q, k, caption=0):
  """`retrieval_grid`'s documented layout: s, b, cell origins, picture size."""
  s = max(1, math.ceil(64 / min(h, w)))
  b = max(2, s * min(h, w) // 10)
  origin = lambda i, j: (b + i * (s * h + 3 * b + caption),
                         b + j * (s * w + 3 * b) + (2 * b if j else 0))
  size = (b + q * (s * h + 3 * b + caption), b + (k + 1) * (s * w + 3 * b)
          + 2 * b)
  return s, b, origin, size


def _upscaled(image, s):
  pixels = np.clip(np.asarray(image, np.float64), 0, 1)
  pixels = np.round(pixels * 255).astype(np.uint8)
  pixels = np.broadcast_to(pixels, pixels.shape[:2] + (3,))
  return pixels.repeat(s, axis=0).repeat(s, axis=1)


@pytest.mark.parametrize('h, w, c', [(28, 28, 1), (32, 32, 3), (20, 40, 3),
                                     (96, 96, 1)])
def test_retrieval_grid_layout_frames_and_pixels(tmp_path, h, w, c):
  rng = np.random.default_rng(h + w + c)
  q, k = 2, 3
  queries = rng.uniform(-0.2, 1.2, size=(q, h, w, c))
  neighbours = rng.uniform(-0.2, 1.2, size=(q, k, h, w, c)).astype(np.float32)
  query_labels = np.array([3, 7])
  neighbour_labels = np.array([[3, 1, 3], [2, 7, 7]])
  out = tmp_path / 'grid.png'
  assert pictures.retrieval_grid(queries, query_labels, neighbours,
                                 neighbour_labels, str(out)) == str(out)
  pixels = _read_png(out)
  s, b, origin, size = _layout(h, w, q, k)
  assert pixels.shape == size + (3,)
  assert s * min(h, w) >= 64 and b >= 2
  cells = np.concatenate([queries[:, None], neighbours], axis=1)
  labels = np.concatenate([query_labels[:, None], neighbour_labels], axis=1)
  white = np.ones(pixels.shape[:2], bool)
  for i in range(q):
    for j in range(k + 1):
      y, x = origin(i, j)
      cell = pixels[y:y + s * h + 2 * b, x:x + s * w + 2 * b]
      white[y:y + s * h + 2 * b, x:x + s * w + 2 * b] = False
      ring = np.ones(cell.shape[:2], bool)
      ring[b:-b, b:-b] = False
      expected = ((0, 90, 255) if j == 0 else
                  (0, 190, 0) if labels[i, j] == labels[i, 0] else
                  (255, 0, 0))
      assert np.all(cell[ring] == expected), (i, j)
      np.testing.assert_array_equal(cell[b:-b, b:-b],
                                    _upscaled(cells[i, j], s))
  assert np.all(pixels[white] == 255)
  # Wrong-class neighbours: (0, 2) is label 1 vs 3, (1, 1) is 2 vs 7.
  assert [tuple(pixels[origin(i, j)]) for i, j in [(0, 2), (1, 1), (0, 1)]] \
      == [(255, 0, 0), (255, 0, 0), (0, 190, 0)]


def test_retrieval_grid_captions_with_class_names(tmp_path):
  rng = np.random.default_rng(1)
  h = w = 28
  queries, neighbours = rng.uniform(size=(2, h, w, 1)), rng.uniform(
      size=(2, 2, h, w, 1))
  out = tmp_path / 'grid.png'
  pictures.retrieval_grid(queries, [0, 1], neighbours, [[0, 1], [1, 1]],
                          str(out), class_names=['T-shirt/top', 'Trouser'])
  pixels = _read_png(out)
  s, b, origin, size = _layout(h, w, 2, 2, caption=pictures.CAPTION_PX)
  assert pixels.shape == size + (3,)
  for i in range(2):
    for j in range(3):
      y, x = origin(i, j)
      cell = pixels[y:y + s * h + 2 * b, x:x + s * w + 2 * b]
      np.testing.assert_array_equal(cell[b:-b, b:-b],
                                    _upscaled(queries[i] if j == 0 else
                                              neighbours[i, j - 1], s))
      strip = pixels[y + s * h + 2 * b:y + s * h + 2 * b + pictures.CAPTION_PX,
                     x:x + s * w + 2 * b]
      assert np.sum(strip.max(axis=-1) < 128) > 10, (i, j)  # dark text


@pytest.mark.parametrize('q_shape, ql_shape, n_shape, nl_shape', [
    ((2, 8, 8), (2,), (2, 3, 8, 8, 1), (2, 3)),
    ((2, 8, 8, 2), (2,), (2, 3, 8, 8, 2), (2, 3)),
    ((2, 8, 8, 3), (2,), (3, 3, 8, 8, 3), (3, 3)),
    ((2, 8, 8, 3), (2,), (2, 3, 8, 9, 3), (2, 3)),
    ((2, 8, 8, 3), (2,), (2, 3, 8, 8, 1), (2, 3)),
    ((2, 8, 8, 3), (2,), (2, 3, 8, 8, 3), (2, 4)),
    ((2, 8, 8, 3), (1,), (2, 3, 8, 8, 3), (2, 3)),
    ((0, 8, 8, 3), (0,), (0, 3, 8, 8, 3), (0, 3))])
def test_retrieval_grid_rejects_bad_shapes(tmp_path, q_shape, ql_shape,
                                           n_shape, nl_shape):
  with pytest.raises(ValueError) as error:
    pictures.retrieval_grid(np.zeros(q_shape), np.zeros(ql_shape, int),
                            np.zeros(n_shape), np.zeros(nl_shape, int),
                            str(tmp_path / 'grid.png'))
  message = str(error.value)
  assert '\n' not in message
  assert all(str(shape) in message
             for shape in (q_shape, ql_shape, n_shape, nl_shape))
  assert not os.listdir(tmp_path)


def test_retrieval_grid_rejects_labels_without_names(tmp_path):
  with pytest.raises(ValueError, match='class_names has 2 names'):
    pictures.retrieval_grid(np.zeros((1, 8, 8, 1)), [0], np.zeros(
        (1, 2, 8, 8, 1)), [[1, 2]], str(tmp_path / 'grid.png'),
                            class_names=['a', 'b'])
  with pytest.raises(ValueError, match='integers'):
    pictures.retrieval_grid(np.zeros((1, 8, 8, 1)), [0.5], np.zeros(
        (1, 2, 8, 8, 1)), [[1, 2]], str(tmp_path / 'grid.png'))
