"""See what the model sees: a PNG grid of every augmented view.

python -m jaxssl.preview --config=configs/simclr_tiny.py --out=views.png

Each row is one image of `dataset.train_split` (in tfds's fixed order): the
evaluation centre crop first, then each global view of `config.augment`,
then each multi-crop small view (`augment.num_small_views`), enlarged to
`dataset.image_size` with nearest-neighbour sampling so its pixels show.
Small images are enlarged with nearest-neighbour sampling so that every
cell is at least 96 px wide.
"""

import math
import os

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxssl import datasets
from jaxssl.augment import device
from jaxssl.augment import host
from jaxssl.augment import recipes

MIN_CELL_SIDE = 96
PADDING = 2  # white pixels between and around the cells


def grid_shape(num_rows: int, num_columns: int, image_size: int):
  """`(height, width, scale)` of the grid for cells of side `image_size`."""
  scale = max(1, math.ceil(MIN_CELL_SIDE / image_size))
  cell = image_size * scale
  return (num_rows * cell + (num_rows + 1) * PADDING,
          num_columns * cell + (num_columns + 1) * PADDING, scale)


def _grid(rows: list[list[np.ndarray]], image_size: int) -> np.ndarray:
  """Tiles float [S, S, C] cells into one uint8 [H, W, 3] image."""
  height, width, scale = grid_shape(len(rows), len(rows[0]), image_size)
  cell = image_size * scale
  grid = np.full((height, width, 3), 255, np.uint8)
  for r, row in enumerate(rows):
    for c, image in enumerate(row):
      pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
      pixels = pixels.repeat(scale, 0).repeat(scale, 1)
      top, left = PADDING + r * (cell + PADDING), PADDING + c * (cell + PADDING)
      grid[top:top + cell, left:left + cell] = pixels  # C=1 broadcasts to 3
  return grid


def write_view_grid(config: ml_collections.ConfigDict, path: str, *,
                    num_images: int = 8, seed: int = 0) -> str:
  """Writes a PNG of centre crops and augmented views; returns `path`.

  Args:
    config: the run config (dataset.*, augment.*).
    path: where to write the PNG (local or any tf.io.gfile path).
    num_images: rows of the grid, from the start of `dataset.train_split`.
    seed: view v of image i is cropped with the stateless TF seed
      fold_in((seed, i), v) and finished (`augment.device.finish_view`)
      with the key fold_in(fold_in(key(seed), i), v), for
      v < augment.num_views + augment.num_small_views (small views last,
      as in the input pipeline).

  Returns:
    `path`.
  """
  if num_images < 1:
    raise ValueError(f'num_images={num_images} must be >= 1')
  recipes.check_config(config.augment)
  builder = datasets.get_builder(config.dataset)
  image_key, _ = datasets.feature_keys(builder)
  size = config.dataset.image_size
  ds = builder.as_dataset(split=config.dataset.train_split,
                          shuffle_files=False,
                          read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.take(num_images)
  rows = []
  c = config.augment
  for i, example in enumerate(ds):
    image = example[image_key]
    row = [host.center_crop(image, out_size=size)]
    for v in range(c.num_views + c.num_small_views):
      view_seed = tf.random.experimental.stateless_fold_in(
          tf.constant([seed, i], tf.int64), v)
      spec = recipes.view_spec(c, v)
      small = spec.small
      view = host.crop_view(image, view_seed, view_index=v,
                            out_size=c.small_image_size if small else size,
                            config_augment=c)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), v)
      view = tf.constant(np.asarray(device.finish_view(
          view.numpy(), key, spec=spec, config_augment=c)))
      if small:
        view = tf.image.resize(view, [size, size], method='nearest')
      row.append(view)
    rows.append([cell.numpy() for cell in row])
  if not rows:
    raise ValueError(f"split '{config.dataset.train_split}' of "
                     f"'{config.dataset.name}' has no images to preview")
  folder = os.path.dirname(path)
  if folder:
    tf.io.gfile.makedirs(folder)
  tf.io.write_file(path, tf.io.encode_png(_grid(rows, size)))
  return path


def main(argv=None) -> None:
  """`python -m jaxssl.preview --config=configs/x.py --out=views.png`."""
  # Flags are defined here, not at import, so that jaxssl.main can import
  # this module next to its own --config flag.
  config = config_flags.DEFINE_config_file(
      'config', None, 'Run config file, e.g. configs/simclr_tiny.py.',
      lock_config=True)
  out = flags.DEFINE_string('out', 'views.png', 'PNG file to write.')
  num_images = flags.DEFINE_integer('num_images', 8, 'Rows of the grid.')
  seed = flags.DEFINE_integer('seed', 0, 'Seed of the augmentations.')
  flags.mark_flag_as_required('config')

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f'unexpected arguments: {args[1:]}')
    print(write_view_grid(config.value, out.value,
                          num_images=num_images.value, seed=seed.value))

  app.run(run, argv=argv)


if __name__ == '__main__':
  main()
