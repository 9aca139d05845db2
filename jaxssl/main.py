"""Command line: pretrain, evaluate, export or preview, from one config file.

  python -m jaxssl.main --config=configs/simclr_fashion_mnist.py \
      --workdir=workdirs/quickstart [--config.key=value ...]
  python -m jaxssl.main --mode=eval --config=... --workdir=RUN [--source=DIR]
  python -m jaxssl.main --mode=export --config=... --workdir=RUN
  python -m jaxssl.main --mode=preview --config=... --out=views.png

The console scripts `jaxssl-pretrain`, `jaxssl-eval` and `jaxssl-export` are
the same program with the mode fixed.
"""

import os
import sys

# TensorFlow (used for input only) prints C++ banners unless told before import.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file in configs/.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (local or gs://): checkpoints, '
    'TensorBoard events, export/ and linear_eval.json.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'export', 'preview'],
    'train: pretrain (auto-resumes), export, and evaluate if the config says '
    'so; eval: linear evaluation of --source; export: write the encoder of '
    'the latest checkpoint to <workdir>/export; preview: PNG grid of views.')
_SOURCE = flags.DEFINE_string(
    'source', None, 'eval: an exported encoder or a training workdir '
    '(default: --workdir).')
_OUT = flags.DEFINE_string('out', 'views.png', 'preview: output PNG path.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process '
    'runs outside Cloud TPU / SLURM (which are detected automatically).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (with coordinator).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process (with coordinator).')


def _maybe_initialize_distributed() -> None:
  """Starts the multi-controller runtime when running as one of many."""
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif (int(os.environ.get('SLURM_NTASKS', '1')) > 1
        or os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0
        or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS')):
    jax.distributed.initialize()


def _main(argv, mode=None) -> None:
  del argv
  if not flags.FLAGS['verbosity'].present:
    # Library INFO logs (orbax, tfds, clu) drown the progress line; -v 0
    # brings them back.
    logging.set_verbosity(logging.WARNING)
  mode = mode or _MODE.value
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required (a file in configs/)')
  if mode == 'preview':
    from jaxssl import preview  # pylint: disable=g-import-not-at-top
    print(preview.write_view_grid(config, _OUT.value))
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  _maybe_initialize_distributed()
  from jaxssl import evaluate, parallel, train  # pylint: disable=g-import-not-at-top
  if mode == 'train':
    train.run(config, _WORKDIR.value)
  elif mode == 'eval':
    evaluate.run(config, _SOURCE.value or _WORKDIR.value,
                 parallel.make_mesh())
  elif mode == 'export':
    export_latest(config, _WORKDIR.value)


def export_latest(config, workdir: str) -> str:
  """Exports the encoder of `workdir`'s latest checkpoint to its export/."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from jaxssl import checkpoint, evaluate, parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  spec, _, variables = evaluate.load_encoder(workdir, mesh,
                                             prefer_export=False)
  destination = str(epath.Path(workdir) / checkpoint.EXPORT_SUBDIR)
  checkpoint.export_encoder(destination, variables, spec)
  print(f'exported the encoder at step {spec["step"]} to {destination}')
  del config
  return destination


def run_main() -> None:
  """`jaxssl-pretrain` and `python -m jaxssl.main`."""
  app.run(_main)


def run_eval() -> None:
  """`jaxssl-eval`: `--mode=eval`."""
  app.run(lambda argv: _main(argv, mode='eval'))


def run_export() -> None:
  """`jaxssl-export`: `--mode=export`."""
  app.run(lambda argv: _main(argv, mode='export'))


if __name__ == '__main__':
  sys.exit(run_main())
