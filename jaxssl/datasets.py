"""tfds datasets: prepared builders, offline Fashion-MNIST, image folders.

`get_builder(config.dataset)` returns a prepared `tfds.core.DatasetBuilder`:
- any tfds image dataset (`cifar10`, `imagenet2012`, ...) from
  `dataset.data_dir`, else `$TFDS_DATA_DIR`, else tfds's default; an
  unprepared one is downloaded and prepared by tfds, and a dataset that
  needs a manual download (ImageNet) fails with the files to fetch and where
  to put them;
- `fashion_mnist` is prepared offline, once, from the Debian package
  `dataset-fashion-mnist` (or the folder in `$JAXSSL_FASHION_MNIST_DIR`), and
  from then on loads like any other prepared tfds dataset;
- `image_folder` reads `dataset.image_folder/<split>/<class>/<image>` with
  `tfds.folder_dataset.ImageFolder`, extended to accept sub-splits.

Every failure is a one-line ValueError that says what to do.
"""

import contextlib
import difflib
import os
import shutil
import struct
import tempfile

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import download_manager

from jaxssl.data_facts import DatasetInfo, IMAGE_FOLDER  # re-exported; no TF

try:
  # TF only feeds the host pipeline (on CPU); it must not reserve accelerator
  # memory that JAX needs. Every jaxssl module that runs TF imports this one.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF's devices were initialised before this import.
  pass

FASHION_MNIST_DIR_ENV = 'JAXSSL_FASHION_MNIST_DIR'
DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_APT = 'sudo apt-get install -y dataset-fashion-mnist'

# Debian's package keeps upstream's DEFLATE streams and CRC/size trailers
# byte for byte but rewrites the 10-byte gzip header: it drops the original
# file name and sets the time stamp to the packaging date. Upstream's
# headers carried the name and these modification times (2017-08-31 UTC),
# so restoring them gives back the exact files tfds downloads; tfds then
# checks them against its registered sha256 checksums.
_UPSTREAM_GZIP_MTIME = {
    'train-images-idx3-ubyte.gz': 1504176606,
    'train-labels-idx1-ubyte.gz': 1504176606,
    't10k-images-idx3-ubyte.gz': 1504176627,
    't10k-labels-idx1-ubyte.gz': 1504176627,
}


def resolve_data_dir(dataset_config: ml_collections.ConfigDict) -> str:
  """`dataset.data_dir`, else `$TFDS_DATA_DIR`, else tfds's default."""
  return (dataset_config.data_dir or os.environ.get('TFDS_DATA_DIR')
          or tfds.core.constants.DATA_DIR)


def get_builder(
    dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns a prepared tfds builder for `dataset_config.name`.

  Args:
    dataset_config: `config.dataset` (name, data_dir, image_folder).

  Returns:
    A builder whose `as_dataset` works: prepared on disk, an image folder,
    or (inside `tfds.testing.mock_data`) a mocked one.

  Raises:
    ValueError: unknown name, a dataset that cannot be prepared here (with
      what to do), or an image folder that does not exist.
  """
  name = dataset_config.name
  if name == IMAGE_FOLDER:
    return _image_folder(dataset_config.image_folder)
  _check_known(name)
  root = resolve_data_dir(dataset_config)
  builder = tfds.builder(name, data_dir=root)
  if builder.is_prepared():
    return builder
  if builder.name == 'fashion_mnist':
    return prepare_fashion_mnist(root)
  _download_and_prepare(builder, root)
  return builder


def _check_known(name: str) -> None:
  base = name.split(':')[0].split('/')[0]
  try:
    tfds.builder_cls(base)
    return
  except tfds.core.registered.DatasetNotFoundError:
    pass
  known = tfds.list_builders(with_community_datasets=False)
  close = difflib.get_close_matches(base, known, n=3)
  hint = f'did you mean {", ".join(close)}? ' if close else ''
  raise ValueError(
      f"unknown dataset '{name}'; {hint}known: the {len(known)} names in "
      f"tfds.list_builders(), or '{IMAGE_FOLDER}' for your own images")


def _download_and_prepare(builder: tfds.core.DatasetBuilder, root: str):
  """Lets tfds download and prepare; turns its failures into clear errors."""
  try:
    builder.download_and_prepare()
  except AssertionError as e:
    # tfds signals a missing or empty manual_dir with an AssertionError.
    if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS or 'anual dir' not in str(e):
      raise
    steps = ' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
    manual_dir = os.path.join(root, 'downloads', 'manual')
    raise ValueError(
        f"dataset '{builder.name}' needs a manual download: {steps} Put the "
        f'files in {manual_dir} (tfds manual_dir under the data dir {root}) '
        f'and rerun; tfds then prepares {builder.data_dir} once') from e
  except Exception as e:  # pylint: disable=broad-except
    cause = str(e).splitlines()[0] if str(e) else ''
    raise ValueError(
        f"dataset '{builder.name}' is not prepared in {root} and tfds could "
        f'not download it ({type(e).__name__}: {cause}); with no internet, '
        f'copy a prepared copy to {builder.data_dir} or point dataset.data_dir '
        'or TFDS_DATA_DIR at one') from e


def prepare_fashion_mnist(root: str, *,
                          source_dir: str | None = None
                          ) -> tfds.core.DatasetBuilder:
  """Prepares tfds `fashion_mnist` in `root` from local IDX files, once.

  The source is `source_dir`, else `$JAXSSL_FASHION_MNIST_DIR`, else the
  Debian package's folder. With no explicit source and no Debian files, tfds
  downloads the files instead (needs internet). Safe to call from several
  processes at once: a file lock serialises them and tfds writes into a
  temporary folder that it renames when complete, so the later callers find
  the dataset prepared.

  Args:
    root: the tfds data dir.
    source_dir: folder with the four `*-ubyte.gz` files.

  Returns:
    The prepared builder.

  Raises:
    ValueError: no source (with the apt command), or files that do not match
      tfds's registered checksums.
  """
  explicit = source_dir or os.environ.get(FASHION_MNIST_DIR_ENV)
  source = explicit or DEBIAN_FASHION_MNIST_DIR
  builder = tfds.builder('fashion_mnist', data_dir=root)
  names = [info.filename for info in builder.url_infos.values()]
  missing = [n for n in names if not os.path.exists(os.path.join(source, n))]
  if missing and explicit:
    raise ValueError(_fashion_mnist_missing(source, missing, downloaded=False))
  os.makedirs(root, exist_ok=True)
  with _file_lock(os.path.join(root, '.fashion_mnist.lock')):
    builder = tfds.builder('fashion_mnist', data_dir=root)
    if builder.is_prepared():
      return builder
    if not missing:
      _prepare_from_local(builder, source, names, root)
    else:
      try:
        builder.download_and_prepare()
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(
            _fashion_mnist_missing(source, missing, downloaded=True)) from e
  return tfds.builder('fashion_mnist', data_dir=root)


def _fashion_mnist_missing(source: str, missing: list[str], *,
                           downloaded: bool) -> str:
  tried = ' and tfds could not download them' if downloaded else ''
  return (f'Fashion-MNIST source files {", ".join(missing)} are missing in '
          f'{source}{tried}; install the offline '
          f'copy with `{FASHION_MNIST_APT}` (or set {FASHION_MNIST_DIR_ENV} to '
          'a folder holding the four *-ubyte.gz files), or run once with '
          'internet access so tfds can download them')


def _prepare_from_local(builder, source: str, names: list[str], root: str):
  """Runs the official builder on upstream-identical copies of local files."""
  stage = tempfile.mkdtemp(prefix='.jaxssl-fashion-mnist-', dir=root)
  try:
    manual_dir = os.path.join(stage, 'manual')
    os.makedirs(manual_dir)
    for name in names:
      with open(os.path.join(source, name), 'rb') as f:
        data = upstream_gzip(f.read(), name)
      with open(os.path.join(manual_dir, name), 'wb') as f:
        f.write(data)
    # tfds takes a file found in manual_dir in place of the download and
    # verifies it against the dataset's registered checksums.
    builder.download_and_prepare(
        download_dir=os.path.join(stage, 'downloads'),
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except download_manager.NonMatchingChecksumError as e:
    raise ValueError(
        f'the Fashion-MNIST files in {source} differ from the ones tfds '
        'expects (checksum mismatch); reinstall them with `sudo apt-get '
        'install --reinstall dataset-fashion-mnist`') from e
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def upstream_gzip(data: bytes, filename: str) -> bytes:
  """Restores upstream's gzip header on a Debian-repacked Fashion-MNIST file.

  Args:
    data: the bytes of a `*-ubyte.gz` file.
    filename: its upstream name, e.g. 'train-images-idx3-ubyte.gz'.

  Returns:
    The upstream bytes when `data` has Debian's bare header (no file name)
    and `filename` is a known Fashion-MNIST file; otherwise `data` unchanged
    (tfds's checksum check decides whether it is the right file).
  """
  if data[:3] != b'\x1f\x8b\x08':
    raise ValueError(f'{filename} is not a gzip file (magic {data[:3]!r})')
  if data[3] != 0 or filename not in _UPSTREAM_GZIP_MTIME:
    return data
  # flags=FNAME, upstream mtime, xfl=0 (default level), os=3 (Unix), name.
  header = (b'\x1f\x8b\x08\x08' + struct.pack('<I', _UPSTREAM_GZIP_MTIME[
      filename]) + b'\x00\x03' + filename[:-len('.gz')].encode() + b'\x00')
  return header + data[10:]


@contextlib.contextmanager
def _file_lock(path: str):
  """An exclusive advisory lock across processes on one machine."""
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class SubsplitImageFolder(tfds.folder_dataset.ImageFolder,
                          skip_registration=True):
  """`tfds.folder_dataset.ImageFolder` that also reads sub-splits.

  The input pipeline cuts a split into contiguous shards ('train[:50%]',
  `tfds.even_splits`); ImageFolder itself only takes whole split names. The
  image order within a split is ImageFolder's (a fixed shuffle of the files).
  """

  name = IMAGE_FOLDER

  def image_paths(self, split) -> list[str]:
    """Paths of the images of `split` (any tfds split spec), in order."""
    return [e.image_path for e in self._examples(split)]

  def _examples(self, split):
    spec = tfds.core.splits.AbstractSplit.from_spec(split)
    examples = []
    for instr in spec.to_absolute(self.info.splits):
      examples += self._split_examples[instr.splitname][instr.from_:instr.to]
    return examples

  def _as_dataset(self, split, shuffle_files=False, decoders=None,
                  read_config=None):
    del read_config
    examples = self._examples(split)
    label_feature = self.info.features['label']
    paths = [e.image_path for e in examples]
    labels = [label_feature.str2int(e.label) for e in examples]
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int64)))
    if shuffle_files:
      ds = ds.shuffle(len(examples))

    @tf.autograph.experimental.do_not_convert
    def load(path, label):
      example = {'image': tf.io.read_file(path), 'label': label,
                 'image/filename': path}
      return self.info.features.decode_example(example, decoders=decoders)

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)


def _image_folder(root: str) -> SubsplitImageFolder:
  if not root or not tf.io.gfile.isdir(root):
    raise ValueError(
        f"dataset.image_folder='{root}' is not a folder; for dataset.name="
        f"'{IMAGE_FOLDER}' give a root holding <split>/<class>/<image> files")
  builder = SubsplitImageFolder(root)
  if not builder.info.splits:
    raise ValueError(
        f"dataset.image_folder='{root}' holds no images; expected "
        '<split>/<class>/<image>.jpg|.jpeg|.png, e.g. train/cat/001.jpg')
  return builder


def corrupt_images(builder: tfds.core.DatasetBuilder, split) -> list[str]:
  """Paths of the images of `split` that TensorFlow cannot decode.

  Only image folders read files one by one; for other builders this is [].
  """
  if not isinstance(builder, SubsplitImageFolder):
    return []
  bad = []
  for path in builder.image_paths(split):
    try:
      tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
      bad.append(path)
  return bad


def feature_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """The `(image, label)` feature names, checked to be an image and a label."""
  keys = builder.info.supervised_keys
  image_key, label_key = (keys if keys and all(isinstance(k, str) for k in keys)
                          else ('image', 'label'))
  features = dict(builder.info.features.items())
  if not isinstance(features.get(image_key), tfds.features.Image):
    raise ValueError(f"dataset '{builder.name}' has no image feature "
                     f"'{image_key}'; jaxssl needs an image classification "
                     'dataset with image and label features')
  if not isinstance(features.get(label_key), tfds.features.ClassLabel):
    raise ValueError(f"dataset '{builder.name}' has no class label "
                     f"'{label_key}'; jaxssl needs image and label features")
  return image_key, label_key


def split_num_examples(builder: tfds.core.DatasetBuilder, split) -> int:
  """Number of examples in `split` (any tfds split spec) of `builder`."""
  splits = builder.info.splits
  if not splits:
    # Metadata without splits: the data was not generated where we look, as
    # inside tfds.testing.mock_data; count what as_dataset yields.
    return int(builder.as_dataset(split=split).cardinality())
  try:
    return splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    cause = ' '.join(str(e).split())
    raise ValueError(f"bad split '{split}' for dataset '{builder.name}' "
                     f'({cause}); known splits: {", ".join(splits)}') from e


def dataset_info(dataset_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Returns the `DatasetInfo` of `dataset_config` (preparing it if needed)."""
  builder = get_builder(dataset_config)
  image_key, label_key = feature_keys(builder)
  features = builder.info.features
  return DatasetInfo(
      name=dataset_config.name,
      num_train_examples=split_num_examples(builder,
                                            dataset_config.train_split),
      num_classes=features[label_key].num_classes,
      image_shape=tuple(features[image_key].shape))
