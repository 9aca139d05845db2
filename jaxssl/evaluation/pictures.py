"""Pictures of a pretraining run: training curves and a retrieval grid.

`read_scalars` reads the scalars `jaxssl.reporting` logged in a workdir,
`plot_training_curves` draws them, and `retrieval_grid` shows queries next
to their nearest training neighbours. PNGs are written atomically (a
temporary sibling, then `os.replace`). Event files are parsed with
TensorBoard's protos alone: its `EventFileLoader` imports TensorFlow
whenever TensorFlow is installed, which these small files do not need.
"""

import math
import os
import re
import secrets
import struct
from typing import Callable, NamedTuple, Sequence

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.util import tensor_util

Scalars = dict[str, tuple[np.ndarray, np.ndarray]]

# Panels of `plot_training_curves`, in order: (title, tags); kNN is by regex.
_KNN_TITLE = 'kNN top-1 (held-out)'
_KNN_TAG = re.compile(r'knn_k(\d+)_top1')
_GROUPS = (('loss', ('loss',)),
           ('online linear probe (train top-1)', ('online_probe_top1',)),
           (_KNN_TITLE, None),
           ('learning rate', ('learning_rate',)),
           ('effective rank (RankMe)', ('rankme',)),
           ('alignment / uniformity', ('alignment', 'uniformity')))

# Retrieval grid: RGB frame colours, smallest shown image side, caption strip.
QUERY_COLOR = (0, 90, 255)
MATCH_COLOR = (0, 190, 0)
MISMATCH_COLOR = (255, 0, 0)
BACKGROUND = 255
MIN_SIDE_PX = 64
CAPTION_PX = 14


def _write_atomic(out_path, write: Callable) -> str:
  """Calls `write(file)` on a temporary sibling, then renames it."""
  out_path = os.fspath(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = f'{out_path}.tmp-{os.getpid()}-{secrets.token_hex(4)}'
  try:
    with open(tmp, 'xb') as f:
      write(f)
    os.replace(tmp, out_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out_path


def _records(data: bytes, path) -> list[bytes]:
  """The CRC-checked TFRecords of an event file, less a truncated tail.

  A record is its length (uint64), the masked CRC-32C of the length, the
  bytes, and their masked CRC-32C. An incomplete last record (a run still
  writing, or killed mid-write) is dropped, as TensorBoard does.
  """
  crc = pywrap_tensorflow.masked_crc32c
  records, offset = [], 0
  while offset + 12 <= len(data):
    length, length_crc = struct.unpack_from('<QI', data, offset)
    start, end = offset + 12, offset + 12 + length
    if crc(data[offset:offset + 8]) != length_crc:
      raise ValueError(f'{path}: corrupt record length at byte {offset}.')
    if end + 4 > len(data):
      break
    if crc(data[start:end]) != struct.unpack_from('<I', data, end)[0]:
      raise ValueError(f'{path}: corrupt record at byte {offset}.')
    records.append(data[start:end])
    offset = end + 4
  return records


def _scalar_value(value, plugins: dict[str, str]) -> float | None:
  """A summary value as a float, or None when it is not a scalar."""
  if value.metadata.plugin_data.plugin_name:
    plugins[value.tag] = value.metadata.plugin_data.plugin_name
  kind = value.WhichOneof('value')
  if kind == 'simple_value':
    return float(value.simple_value)
  if kind == 'tensor' and plugins.get(value.tag) == 'scalars':
    array = tensor_util.make_ndarray(value.tensor)
    if array.size == 1:
      return float(array.reshape(()))
  return None


def _first_summary_time(events: list[event_pb2.Event]) -> float:
  """When a file first logged a summary (its header's time is in seconds)."""
  times = [e.wall_time for e in events if e.HasField('summary')]
  return times[0] if times else events[0].wall_time if events else 0.0


def read_scalars(workdir: str) -> Scalars:
  """Every scalar logged in the TensorBoard event files of a workdir.

  Reads the `events.out.tfevents*` files directly in `workdir` (not its
  subfolders), oldest first (by the time of each file's first summary). A
  scalar is a `simple_value` or a tensor summary of TensorBoard's 'scalars'
  plugin (what `tf.summary.scalar` and clu's `write_scalars` write);
  images, histograms and hparams are skipped. When a step is logged more
  than once (a resumed run re-logs steps) the last written value is kept.

  Args:
    workdir: the run's folder (any path `etils.epath` opens).

  Returns:
    `{tag: (steps, values)}`, tags sorted, with `steps` int64 `[T]` in
    ascending order and `values` float64 `[T]`.

  Raises:
    FileNotFoundError: `workdir` holds no event file.
    ValueError: an event file has a corrupt record (a truncated last record,
      from a run still writing or killed mid-write, is ignored).
  """
  paths = sorted(epath.Path(workdir).glob('events.out.tfevents*'))
  if not paths:
    raise FileNotFoundError(f'no events.out.tfevents* files in {workdir}')
  files = [[event_pb2.Event.FromString(r)
            for r in _records(path.read_bytes(), path)] for path in paths]
  files.sort(key=_first_summary_time)  # stable: ties stay in name order
  points: dict[str, dict[int, float]] = {}
  plugins: dict[str, str] = {}
  for events in files:
    for event in events:
      for value in event.summary.value:
        x = _scalar_value(value, plugins)
        if x is not None:
          points.setdefault(value.tag, {})[int(event.step)] = x
  result = {}
  for tag in sorted(points):
    steps = np.array(sorted(points[tag]), np.int64)
    values = np.array([points[tag][s] for s in steps.tolist()], np.float64)
    result[tag] = (steps, values)
  return result


def _panels(scalars: Scalars) -> list[tuple[str, list[str]]]:
  """`(title, tags)` of each panel with data, in `_GROUPS` order."""
  present = [t for t, (steps, _) in scalars.items() if len(steps)]
  panels = []
  for title, tags in _GROUPS:
    if tags is None:
      knn = [t for t in present if _KNN_TAG.fullmatch(t)]
      tags = sorted(knn, key=lambda t: int(_KNN_TAG.fullmatch(t).group(1)))
    tags = [t for t in tags if t in present]
    if tags:
      panels.append((title, tags))
  return panels


def plot_training_curves(scalars: Scalars, out_path: str, *,
                         title: str = '') -> str:
  """Draws the training curves of a run as one PNG.

  One panel per group with data, in this order: loss; online linear probe
  (`online_probe_top1`); kNN top-1 (`knn_k{k}_top1`, one line per k);
  learning rate; effective rank (`rankme`); alignment / uniformity. Three
  panels (500 × 340 px each) per row, plus 40 px for a title; step on every
  x axis; markers on curves of at most 20 points (evaluations are sparse).

  Args:
    scalars: `{tag: (steps [T], values [T])}`, as `read_scalars` returns;
      other tags are ignored.
    out_path: the PNG to write (its folder is created).
    title: a title over the whole figure.

  Returns:
    `out_path`.

  Raises:
    ValueError: no group has data.
  """
  fig = _figure(scalars, title)
  return _write_atomic(out_path,
                       lambda f: fig.savefig(f, format='png', dpi=100))


def _figure(scalars: Scalars, title: str) -> Figure:
  """The figure `plot_training_curves` saves, one axes per `_panels` entry."""
  panels = _panels(scalars)
  if not panels:
    raise ValueError(f'no training curves to plot; tags: {sorted(scalars)}')
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(5 * cols, 3.4 * rows + (0.4 if title else 0)),
               dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  for i, (panel_title, tags) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    for tag in tags:
      steps, values = scalars[tag]
      knn = _KNN_TAG.fullmatch(tag) if panel_title == _KNN_TITLE else None
      ax.plot(steps, values, marker='o' if len(steps) <= 20 else None,
              markersize=3, linewidth=1.2,
              label=f'k={knn.group(1)}' if knn else tag)
    ax.set_title(panel_title)
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
    if len(tags) > 1:
      ax.legend(fontsize='small')
  if title:
    fig.suptitle(title)
  return fig


class _Layout(NamedTuple):
  """Pixel layout of `retrieval_grid` (its docstring's s, b, c, cells)."""
  scale: int
  border: int  # the frame width, also the white gap between cells
  caption: int
  cell_h: int  # framed image: s·H + 2b
  cell_w: int

  def origin(self, row: int, col: int) -> tuple[int, int]:
    """Top-left pixel (y, x) of a cell's frame; column 0 is the query."""
    b = self.border
    return (b + row * (self.cell_h + self.caption + b),
            b + col * (self.cell_w + b) + (2 * b if col else 0))


def _layout(height: int, width: int, *, captions: bool) -> _Layout:
  scale = max(1, math.ceil(MIN_SIDE_PX / min(height, width)))
  b = max(2, scale * min(height, width) // 10)
  return _Layout(scale, b, CAPTION_PX if captions else 0,
                 scale * height + 2 * b, scale * width + 2 * b)


def _check_shapes(queries, query_labels, neighbours, neighbour_labels):
  q, k = neighbours.shape[:2] if neighbours.ndim == 5 else (None, None)
  ok = (queries.ndim == 4 and queries.shape[-1] in (1, 3)
        and min(queries.shape[:3], default=0) > 0
        and neighbours.ndim == 5 and q == queries.shape[0]
        and neighbours.shape[2:] == queries.shape[1:]
        and query_labels.shape == (q,) and neighbour_labels.shape == (q, k))
  if not ok:
    raise ValueError(
        'retrieval_grid needs query_images [Q, H, W, C] (C = 1 or 3), '
        'query_labels [Q], neighbor_images [Q, K, H, W, C], neighbor_labels '
        f'[Q, K]; got {queries.shape}, {query_labels.shape}, '
        f'{neighbours.shape}, {neighbour_labels.shape}.')


def _to_uint8(images: np.ndarray, scale: int) -> np.ndarray:
  """`round(255 · clip(x, 0, 1))` as RGB, upscaled by `scale` (nearest)."""
  if images.dtype != np.uint8:
    images = np.nan_to_num(images.astype(np.float64))
    images = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images.repeat(scale, axis=-3).repeat(scale, axis=-2)


def _caption(draw, layout: _Layout, y: int, x: int, text: str) -> None:
  font = ImageFont.load_default()
  while text and draw.textlength(text, font=font) > layout.cell_w:
    text = text[:-1]
  draw.text((x, y + layout.cell_h + 1), text, fill=(0, 0, 0), font=font)


def _check_labels(labels: np.ndarray, class_names) -> None:
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integers, got dtype {labels.dtype}.')
  if class_names is not None and labels.size and (
      labels.min() < 0 or labels.max() >= len(class_names)):
    raise ValueError(f'labels span [{labels.min()}, {labels.max()}], but '
                     f'class_names has {len(class_names)} names.')


def _draw_grid(rows: np.ndarray, labels: np.ndarray, layout: _Layout,
               class_names) -> Image.Image:
  """The picture of `rows` `[Q, 1 + K, sH, sW, 3]` uint8 (queries first)."""
  num_queries, num_cols = labels.shape
  grid = np.full(layout.origin(num_queries, num_cols) + (3,), BACKGROUND,
                 np.uint8)  # the origin of the cell past the last corner
  image = Image.fromarray(grid)
  draw = ImageDraw.Draw(image)
  b = layout.border
  for i in range(num_queries):
    for j in range(num_cols):
      y, x = layout.origin(i, j)
      color = (QUERY_COLOR if j == 0 else MATCH_COLOR
               if labels[i, j] == labels[i, 0] else MISMATCH_COLOR)
      draw.rectangle((x, y, x + layout.cell_w - 1, y + layout.cell_h - 1),
                     fill=color)
      image.paste(Image.fromarray(rows[i, j]), (x + b, y + b))
      if class_names is not None:
        _caption(draw, layout, y, x, str(class_names[int(labels[i, j])]))
  return image


def retrieval_grid(query_images: np.ndarray, query_labels: np.ndarray,
                   neighbor_images: np.ndarray, neighbor_labels: np.ndarray,
                   out_path: str, *,
                   class_names: Sequence[str] | None = None) -> str:
  """Draws queries and their nearest training neighbours as one PNG.

  One row per query: the query in a blue frame, a wider gap, then its K
  neighbours in the given order, each in a green frame if its label equals
  the query's and in a red frame if not. Pixels are `round(255 · x)` of the
  input clipped to [0, 1] (grey images are repeated to RGB), upscaled by
  nearest neighbour. Layout, in pixels, for `[H, W]` images:

    scale s = max(1, ceil(64 / min(H, W)))   (image shown as sH × sW)
    border b = max(2, s · min(H, W) // 10)   (frame width; also the gap g)
    cell = (sH + 2b) × (sW + 2b)             (frame outside the image)
    caption c = 14 with class_names, else 0  (text strip under each cell)
    cell (row i, column j; j = 0 is the query) has its frame's top-left at
      y = b + i · (sH + 2b + c + b),
      x = b + j · (sW + 2b + b) + (2b if j ≥ 1 else 0),
    and its image at (y + b, x + b); the picture is
      height b + Q · (sH + 3b + c), width b + (K + 1) · (sW + 3b) + 2b,
    white between cells.

  Args:
    query_images: `[Q, H, W, C]` floats in [0, 1] (or uint8), C = 1 or 3.
    query_labels: `[Q]` integer labels.
    neighbor_images: `[Q, K, H, W, C]`, the neighbours of each query,
      nearest first.
    neighbor_labels: `[Q, K]` integer labels.
    out_path: the PNG to write (its folder is created).
    class_names: if given, each cell is captioned with
      `class_names[label]`.

  Returns:
    `out_path`.

  Raises:
    ValueError: the shapes disagree, or a label has no class name.
  """
  queries, neighbours = np.asarray(query_images), np.asarray(neighbor_images)
  query_labels = np.asarray(query_labels)
  neighbor_labels = np.asarray(neighbor_labels)
  _check_shapes(queries, query_labels, neighbours, neighbor_labels)
  labels = np.concatenate([query_labels[:, None], neighbor_labels], axis=1)
  _check_labels(labels, class_names)
  layout = _layout(*queries.shape[1:3], captions=class_names is not None)
  rows = np.concatenate([_to_uint8(queries, layout.scale)[:, None],
                         _to_uint8(neighbours, layout.scale)], axis=1)
  image = _draw_grid(rows, labels, layout, class_names)
  return _write_atomic(out_path, lambda f: image.save(f, format='PNG'))
