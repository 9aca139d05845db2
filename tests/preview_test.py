"""Tests for jaxssl.preview: the PNG grid of centre crops and views."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxssl.augment import host
from jaxssl import preview

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(name='cifar10', image_size=32, num_views=2, image_folder=''):
  return ml_collections.ConfigDict(dict(
      seed=0, global_batch_size=8,
      dataset=dict(name=name, data_dir='', image_folder=image_folder,
                   train_split='train', eval_train_split='train',
                   eval_test_split='test', image_size=image_size,
                   shuffle_buffer=16, cache=False, num_shards=0),
      augment=dict(recipe='simclr', num_views=num_views, crop_sampler='tf',
                   crop_area=(0.08, 1.0), crop_aspect=(3 / 4, 4 / 3),
                   resize_method='bicubic', flip=True, color_strength=1.0,
                   color_jitter=(), color_prob=0.8, grayscale_prob=0.2,
                   brightness='multiplicative', blur_prob=0.5,
                   view_blur_probs=(), blur_sigma=(0.1, 2.0),
                   view_solarize_probs=(), num_small_views=0,
                   small_image_size=16, small_crop_area=(0.05, 0.14))))


def read_png(path) -> np.ndarray:
  return tf.io.decode_png(tf.io.read_file(str(path))).numpy()


def cell(grid, row, column, side, pad=2):
  top, left = pad + row * (side + pad), pad + column * (side + pad)
  return grid[top:top + side, left:left + side]


def test_grid_layout_and_centre_crop_column(tmp_path):
  path = str(tmp_path / 'sub' / 'views.png')
  with tfds.testing.mock_data(num_examples=5):
    config = make_config('cifar10', image_size=32)
    assert preview.write_view_grid(config, path, num_images=3) == path
    images = [ex['image'] for ex in tfds.builder('cifar10').as_dataset(
        split='train', shuffle_files=False).take(3)]
  grid = read_png(path)
  # 32 px cells are enlarged 3x to 96 px; 2 px white gaps around them.
  assert grid.shape == (3 * 96 + 4 * 2, 3 * 96 + 4 * 2, 3)
  assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
  for row, image in enumerate(images):
    crop = host.center_crop(image, out_size=32).numpy()
    expected = np.round(crop * 255).repeat(3, 0).repeat(3, 1)
    np.testing.assert_allclose(cell(grid, row, 0, 96), expected, atol=1)
    first, second = cell(grid, row, 1, 96), cell(grid, row, 2, 96)
    assert np.abs(first.astype(int) - second).max() > 10


def test_grey_images_are_enlarged_to_at_least_96_px(tmp_path):
  path = str(tmp_path / 'mnist.png')
  with tfds.testing.mock_data(num_examples=4):
    preview.write_view_grid(make_config('mnist', image_size=28, num_views=3),
                            path, num_images=2)
  grid = read_png(path)
  # 28 px: 4x nearest neighbour gives 112 px cells; 1 + 3 columns.
  assert grid.shape == (2 * 112 + 3 * 2, 4 * 112 + 5 * 2, 3)
  assert (grid[..., 0] == grid[..., 1]).all()
  assert (grid[..., 1] == grid[..., 2]).all()
  block = cell(grid, 0, 1, 112)[:4, :4]  # one source pixel, 4 x 4 copies
  assert (block == block[0, 0]).all()


def test_same_seed_same_png_other_seed_other_views(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    config = make_config('cifar10')
    paths = [preview.write_view_grid(config, str(tmp_path / f'{i}.png'),
                                     num_images=2, seed=seed)
             for i, seed in enumerate([0, 0, 1])]
  grids = [read_png(p) for p in paths]
  np.testing.assert_array_equal(grids[0], grids[1])
  assert np.abs(cell(grids[0], 0, 1, 96).astype(int) -
                cell(grids[2], 0, 1, 96)).max() > 10


def test_multicrop_views_are_shown_enlarged(tmp_path):
  path = str(tmp_path / 'swav.png')
  config = make_config('cifar10', image_size=32)
  config.augment.update(dict(recipe='swav', crop_sampler='torchvision',
                             resize_method='bilinear',
                             color_jitter=(0.8, 0.8, 0.8, 0.2),
                             num_small_views=3, small_image_size=8))
  with tfds.testing.mock_data(num_examples=4):
    preview.write_view_grid(config, path, num_images=2)
  grid = read_png(path)
  # 1 centre crop + 2 global + 3 small columns of 96 px (32 px x 3).
  assert grid.shape == (2 * 96 + 3 * 2, 6 * 96 + 7 * 2, 3)
  for column in (3, 4, 5):
    small = cell(grid, 0, column, 96)
    # 8 px crops enlarged 4x to 32 px, then 3x: 12 x 12 blocks of one colour.
    blocks = small.reshape(8, 12, 8, 12, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
  assert np.abs(cell(grid, 0, 3, 96).astype(int) -
                cell(grid, 0, 4, 96)).max() > 10


def test_bad_arguments():
  with pytest.raises(ValueError, match='num_images=0 must be >= 1'):
    preview.write_view_grid(make_config(), 'x.png', num_images=0)
  config = make_config()
  config.augment.blur_prob = 1.5
  with pytest.raises(ValueError, match='augment.blur_prob=1.5'):
    preview.write_view_grid(config, 'x.png')


CONFIG_FILE = """
import ml_collections

def get_config():
  return ml_collections.ConfigDict({config!r})
"""


def test_command_line(tmp_path):
  rng = np.random.default_rng(0)
  for label in ('a', 'b'):
    folder = tmp_path / 'images' / 'train' / label
    folder.mkdir(parents=True)
    tf.io.write_file(str(folder / '0.png'), tf.io.encode_png(
        rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)))
  config = make_config('image_folder', image_size=48,
                       image_folder=str(tmp_path / 'images'))
  config_path = tmp_path / 'config.py'
  config_path.write_text(CONFIG_FILE.format(config=config.to_dict()))
  out = tmp_path / 'views.png'
  result = subprocess.run(
      [sys.executable, '-m', 'jaxssl.preview', f'--config={config_path}',
       f'--out={out}', '--num_images=4'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == str(out)
  # Only 2 images exist; 48 px cells are enlarged 2x to 96 px.
  assert read_png(out).shape == (2 * 96 + 3 * 2, 3 * 96 + 4 * 2, 3)
