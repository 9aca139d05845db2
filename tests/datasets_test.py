"""Tests for jaxssl.datasets: builders, offline Fashion-MNIST, image folders.

The Fashion-MNIST tests use the Debian package `dataset-fashion-mnist`. They
skip with the install command when its files are missing, except under
CI=true, where they fail instead.
"""

import hashlib
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxssl import config_schema
from jaxssl import datasets
from jaxssl import input_pipeline
from jaxssl.augment import device

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                 't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')


def dataset_config(**overrides) -> ml_collections.ConfigDict:
  c = dict(name='fashion_mnist', data_dir='', image_folder='',
           train_split='train', eval_train_split='train',
           eval_test_split='test', image_size=16, shuffle_buffer=64,
           cache=False, num_shards=0)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def run_config(data_dir) -> ml_collections.ConfigDict:
  augment = config_schema.defaults().augment
  augment.color_strength = 0.5
  augment.blur_prob = 0.0
  return ml_collections.ConfigDict(dict(
      seed=0, global_batch_size=16,
      dataset=dataset_config(data_dir=str(data_dir),
                             train_split='train[:512]').to_dict(),
      augment=augment.to_dict()))


def require_debian_fashion_mnist():
  source = datasets.DEBIAN_FASHION_MNIST_DIR
  missing = [f for f in FASHION_FILES
             if not os.path.exists(os.path.join(source, f))]
  if missing:
    message = (f'Fashion-MNIST files {missing} are missing in {source}; '
               f'install them with `{datasets.FASHION_MNIST_APT}`')
    if os.environ.get('CI') == 'true':
      pytest.fail(message)
    pytest.skip(message)


PREPARE_SCRIPT = """
import sys
import ml_collections
from jaxssl import config_schema
from jaxssl import datasets
config = ml_collections.ConfigDict(
    dict(name='fashion_mnist', data_dir=sys.argv[1], image_folder=''))
print('PREPARED', datasets.get_builder(config).data_dir)
"""


@pytest.fixture(scope='session')
def fashion_mnist(tmp_path_factory):
  """Prepares Fashion-MNIST from two processes at once, as multi-host tests on
  one machine do; returns (data_dir, [(stdout, stderr, returncode)] * 2)."""
  require_debian_fashion_mnist()
  root = tmp_path_factory.mktemp('tfds')
  env = {k: v for k, v in os.environ.items()
         if k != datasets.FASHION_MNIST_DIR_ENV}
  procs = [subprocess.Popen([sys.executable, '-c', PREPARE_SCRIPT, str(root)],
                            cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for _ in range(2)]
  results = [p.communicate(timeout=900) + (p.returncode,) for p in procs]
  return root, results


def test_two_processes_prepare_fashion_mnist_at_once(fashion_mnist):
  root, results = fashion_mnist
  for stdout, stderr, returncode in results:
    assert returncode == 0, stderr[-3000:]
    assert 'PREPARED' in stdout
  leftovers = [p for p in os.listdir(root) if p.startswith('.jaxssl-')]
  leftovers += [p for p in os.listdir(root / 'fashion_mnist')
                if 'incomplete' in p]
  assert not leftovers


def test_prepared_fashion_mnist_loads_with_plain_tfds(fashion_mnist):
  root, _ = fashion_mnist
  for split, per_class in [('train', 6000), ('test', 1000)]:
    ds = tfds.load('fashion_mnist', split=split, data_dir=str(root),
                   download=False,
                   decoders={'image': tfds.decode.SkipDecoding()})
    labels = next(ds.map(lambda ex: ex['label']).batch(100_000)
                  .as_numpy_iterator())
    # Fashion-MNIST is balanced: 6,000 / 1,000 images per class (README).
    np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                  [per_class] * 10)
  image = next(iter(tfds.load('fashion_mnist', split='test[:1]',
                              data_dir=str(root))))['image']
  assert image.shape == (28, 28, 1) and image.dtype == tf.uint8


def test_get_builder_reuses_the_prepared_dataset(fashion_mnist):
  root, _ = fashion_mnist
  info_file = root / 'fashion_mnist' / '3.0.1' / 'dataset_info.json'
  before = info_file.stat().st_mtime_ns
  builder = datasets.get_builder(dataset_config(data_dir=str(root)))
  assert builder.is_prepared()
  assert info_file.stat().st_mtime_ns == before


@pytest.mark.parametrize('split,expected', [('train', 60000),
                                            ('train[:2048]', 2048)])
def test_fashion_mnist_dataset_info(fashion_mnist, split, expected):
  root, _ = fashion_mnist
  info = datasets.dataset_info(dataset_config(data_dir=str(root),
                                              train_split=split))
  assert info == datasets.DatasetInfo(name='fashion_mnist',
                                      num_train_examples=expected,
                                      num_classes=10, image_shape=(28, 28, 1))


def test_fashion_mnist_through_the_input_pipeline(fashion_mnist):
  root, _ = fashion_mnist
  config = run_config(root)
  batches = input_pipeline.pretrain_batches(config)
  for _ in range(2):
    batch = next(batches)
    (views,) = batch['views']
    assert views.shape == (16, 2, 16, 16, 1) and views.dtype == np.float32
    # The host's bicubic crops may overshoot [0, 1] (as tf.image's resize
    # does in the official code); the device half clips the finished views.
    assert np.isfinite(views).all()
    (finished,) = device.finish_views((views,), jax.random.key(0),
                                      config.augment)
    assert finished.min() >= 0 and finished.max() <= 1
    assert np.abs(views[:, 0] - views[:, 1]).max() > 0.1
    assert batch['label'].dtype == np.int32
  evals = list(input_pipeline.eval_batches(config, 'test[:40]',
                                           batch_size=16))
  labels = np.concatenate([b['label'][b['mask']] for b in evals])
  expected = next(tfds.load('fashion_mnist', split='test[:40]',
                            data_dir=str(root)).map(lambda ex: ex['label'])
                  .batch(40).as_numpy_iterator())
  np.testing.assert_array_equal(labels, expected)


def test_upstream_gzip_gives_tfds_registered_checksums():
  require_debian_fashion_mnist()
  registered = {info.filename: info
                for info in tfds.builder_cls('fashion_mnist').url_infos.values()}
  assert sorted(registered) == sorted(FASHION_FILES)
  for name in FASHION_FILES:
    with open(os.path.join(datasets.DEBIAN_FASHION_MNIST_DIR, name), 'rb') as f:
      data = datasets.upstream_gzip(f.read(), name)
    assert len(data) == registered[name].size
    assert hashlib.sha256(data).hexdigest() == registered[name].checksum


def test_upstream_gzip_leaves_other_headers_alone():
  named = b'\x1f\x8b\x08\x08' + bytes(6) + b'x\x00' + b'body'
  assert datasets.upstream_gzip(named, 'train-images-idx3-ubyte.gz') == named
  bare = b'\x1f\x8b\x08\x00' + bytes(6) + b'body'
  assert datasets.upstream_gzip(bare, 'other.gz') == bare
  with pytest.raises(ValueError, match='train-images-idx3-ubyte.gz is not a '
                     'gzip file'):
    datasets.upstream_gzip(b'PK\x03\x04', 'train-images-idx3-ubyte.gz')


@pytest.mark.parametrize('how', ['env', 'argument'])
def test_missing_fashion_mnist_source_says_how_to_get_it(tmp_path,
                                                         monkeypatch, how):
  empty = tmp_path / 'empty'
  empty.mkdir()
  match = r'sudo apt-get install -y dataset-fashion-mnist'
  if how == 'env':
    monkeypatch.setenv(datasets.FASHION_MNIST_DIR_ENV, str(empty))
    with pytest.raises(ValueError, match=match):
      datasets.get_builder(dataset_config(data_dir=str(tmp_path / 'data')))
  else:
    with pytest.raises(ValueError, match=match) as error:
      datasets.prepare_fashion_mnist(str(tmp_path / 'data'),
                                     source_dir=str(empty))
    assert str(empty) in str(error.value)
    assert datasets.FASHION_MNIST_DIR_ENV in str(error.value)


@pytest.mark.parametrize('name,suggestion', [
    ('cifar1', 'cifar10'), ('fashoin_mnist', 'fashion_mnist'),
    ('imagenet2021', 'imagenet2012'), ('qqqzzzx', None)])
def test_unknown_dataset_name(name, suggestion):
  with pytest.raises(ValueError, match=f"unknown dataset '{name}'") as error:
    datasets.get_builder(dataset_config(name=name))
  message = str(error.value)
  assert '\n' not in message and 'image_folder' in message
  if suggestion:
    assert f'did you mean {suggestion}' in message


def test_imagenet_without_manual_download_says_what_to_do(tmp_path):
  with pytest.raises(ValueError) as error:
    datasets.get_builder(dataset_config(name='imagenet2012',
                                        data_dir=str(tmp_path)))
  message = str(error.value)
  assert 'needs a manual download' in message and '\n' not in message
  assert 'ILSVRC2012_img_train.tar' in message
  assert 'ILSVRC2012_img_val.tar' in message
  assert str(tmp_path / 'downloads' / 'manual') in message


@pytest.mark.parametrize('config_dir,env_dir,expected', [
    ('/cfg', '/env', '/cfg'), ('', '/env', '/env'), ('', None, 'default')])
def test_data_dir_resolution(monkeypatch, config_dir, env_dir, expected):
  if env_dir is None:
    monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  else:
    monkeypatch.setenv('TFDS_DATA_DIR', env_dir)
  if expected == 'default':
    expected = tfds.core.constants.DATA_DIR
  assert datasets.resolve_data_dir(
      dataset_config(data_dir=config_dir)) == expected


def make_image_folder(root, *, corrupt=False):
  """train: 2 classes x 5 images, test: 2 x 2; sizes vary; 1-channel PNGs."""
  rng = np.random.default_rng(0)
  for split, count in [('train', 5), ('test', 2)]:
    for label in ('cat', 'dog'):
      folder = root / split / label
      folder.mkdir(parents=True)
      for i in range(count):
        shape = (int(rng.integers(20, 50)), int(rng.integers(20, 50)),
                 1 if i % 2 else 3)
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        tf.io.write_file(str(folder / f'{i}.png'), tf.io.encode_png(image))
  if corrupt:
    (root / 'train' / 'cat' / 'broken.jpg').write_bytes(b'not an image')
  return root


def test_image_folder_builder_and_info(tmp_path):
  root = make_image_folder(tmp_path / 'images')
  config = dataset_config(name='image_folder', image_folder=str(root))
  info = datasets.dataset_info(config)
  assert info == datasets.DatasetInfo(name='image_folder',
                                      num_train_examples=10, num_classes=2,
                                      image_shape=(None, None, 3))
  builder = datasets.get_builder(config)
  parts = tfds.even_splits('train', n=3)
  assert [datasets.split_num_examples(builder, p) for p in parts] == [4, 3, 3]
  # Sub-splits are contiguous pieces of the split, in its order.
  pieces = sum((builder.image_paths(p) for p in parts), [])
  assert pieces == builder.image_paths('train')
  assert builder.image_paths('train[2:5]') == builder.image_paths('train')[2:5]
  ds = builder.as_dataset(split=parts[1])
  images = [ex['image'].shape[-1] for ex in ds]
  assert images == [3, 3, 3]  # decoded to 3 channels, grey PNGs included


def test_image_folder_reports_corrupt_files(tmp_path):
  root = make_image_folder(tmp_path / 'images', corrupt=True)
  builder = datasets.get_builder(dataset_config(name='image_folder',
                                                image_folder=str(root)))
  assert datasets.corrupt_images(builder, 'train') == [
      str(root / 'train' / 'cat' / 'broken.jpg')]
  assert datasets.corrupt_images(builder, 'test') == []


@pytest.mark.parametrize('make,message', [
    (lambda root: root / 'missing', 'is not a folder'),
    (lambda root: root, 'holds no images'),
])
def test_image_folder_errors(tmp_path, make, message):
  folder = make(tmp_path)
  with pytest.raises(ValueError, match=message):
    datasets.get_builder(dataset_config(name='image_folder',
                                        image_folder=str(folder)))


def test_bad_split_lists_the_known_ones(tmp_path):
  root = make_image_folder(tmp_path / 'images')
  builder = datasets.get_builder(dataset_config(name='image_folder',
                                                image_folder=str(root)))
  with pytest.raises(ValueError, match=r"bad split 'valid'.*known splits: "
                     r'test, train'):
    datasets.split_num_examples(builder, 'valid')


@pytest.mark.parametrize('name,num_classes,shape', [
    ('mnist', 10, (28, 28, 1)), ('cifar10', 10, (32, 32, 3)),
    ('imagenet2012', 1000, (None, None, 3))])
def test_mocked_datasets(name, num_classes, shape):
  with tfds.testing.mock_data(num_examples=7):
    info = datasets.dataset_info(dataset_config(name=name))
  assert info == datasets.DatasetInfo(name=name, num_train_examples=7,
                                      num_classes=num_classes,
                                      image_shape=shape)


def test_non_image_dataset_is_rejected():
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(ValueError, match="'imdb_reviews' has no image "
                       "feature 'text'"):
      datasets.dataset_info(dataset_config(name='imdb_reviews'))
