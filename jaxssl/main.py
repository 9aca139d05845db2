"""Command line: pretrain, evaluate, export or preview, from one config file.

  python -m jaxssl.main --config=configs/simclr_fashion_mnist.py \
      --workdir=workdirs/quickstart [--config.key=value ...]
  python -m jaxssl.main --mode=eval --config=... --workdir=RUN [--source=DIR]
  python -m jaxssl.main --mode=export --config=... --workdir=RUN
  python -m jaxssl.main --mode=export --format=torch --config=... --workdir=RUN
  python -m jaxssl.main --mode=preview --config=... --out=views.png
  python -m jaxssl.main --mode=pictures --config=... --workdir=RUN

The console scripts `jaxssl-pretrain`, `jaxssl-eval` and `jaxssl-export` are
the same program with the mode fixed.
"""

import os
import sys

from jaxssl import runtime

runtime.configure_process()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file in configs/.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (local or gs://): checkpoints, '
    'TensorBoard events, export/ and evaluation.json.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'export', 'preview', 'pictures'],
    'train: pretrain (auto-resumes), export, and evaluate if the config says '
    'so; eval: every evaluation of --source, printed and written to '
    '<workdir>/evaluation.json; export: '
    'write the encoder of the latest checkpoint (or of --source) to '
    '<workdir>/export (--format=torch: <workdir>/torch_export); '
    'preview: PNG grid of views; pictures: training curves and kNN '
    'retrieval grid of --source into --workdir.')
_SOURCE = flags.DEFINE_string(
    'source', None, 'eval, pictures, export: an exported encoder or a '
    'training workdir (default: --workdir).')
_FORMAT = flags.DEFINE_enum(
    'format', 'orbax', ['orbax', 'torch'],
    'export: orbax (<workdir>/export, what --mode=eval loads) or torch '
    '(<workdir>/torch_export/encoder.safetensors with torchvision ResNet '
    'names and layouts, and encoder.json: input, stem, recipe).')
_OUT = flags.DEFINE_string('out', 'views.png', 'preview: output PNG path.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process '
    'runs outside Cloud TPU, SLURM, Open MPI and Kubernetes Jobs (detected '
    'automatically); or $JAXSSL_COORDINATOR_ADDRESS.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes (with coordinator); or '
    '$JAXSSL_NUM_PROCESSES.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0 .. num_processes - 1 (with '
    'coordinator); or $JAXSSL_PROCESS_ID.')
_ALLOW_CHANGE = flags.DEFINE_boolean(
    'allow_config_change', False, 'Resume even though the config changes a '
    'key that fixes the data order or the schedule (seed, method, '
    'global_batch_size, dataset, shards, total steps); docs/failures.md.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout', 20, 'Multi-process runs: seconds after which a '
    'silent peer counts as lost and every process stops.')


def _main(argv, mode=None) -> None:
  """Runs the mode; bad input ends with one line on stderr and exit code 1."""
  del argv
  verbose = flags.FLAGS['verbosity'].present
  if not verbose:
    # Library INFO logs (orbax, tfds, clu) drown the progress line; -v 0
    # brings them back (and full tracebacks for the errors below).
    logging.set_verbosity(logging.WARNING)
  from jaxssl import distributed, preemption, supervisor  # pylint: disable=g-import-not-at-top
  mode = mode or _MODE.value
  try:
    if supervisor.is_worker():
      supervisor.become_worker()
    elif mode != 'preview' and _is_multi_process():
      # A native abort after a lost peer becomes one line (see supervisor).
      sys.exit(supervisor.supervise([*sys.argv[1:], f'--mode={mode}'],
                                    hold=not verbose))
    _run_mode(mode)
  except preemption.Preempted as e:  # SIGTERM/SIGINT: saved, resumable
    distributed.finish_distributed()
    print(f'jaxssl: {e}', file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_PREEMPTED)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    if not verbose:
      distributed.exit_with_error(f'jaxssl: error: {e}')
    distributed.exit_after_error(e)  # multi-process: tell peers, stop
    raise
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    distributed.exit_after_error(e)
    raise
  distributed.finish_distributed()


def _is_multi_process() -> bool:
  from jaxssl import distributed  # pylint: disable=g-import-not-at-top
  return bool(distributed.process_flags(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
              or distributed.detect_cluster())


def _run_mode(mode: str) -> None:
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required (a file in configs/)')
  from jaxssl import command_line, config_schema  # pylint: disable=g-import-not-at-top
  config_schema.validate(config)
  if _FORMAT.value != 'orbax' and mode != 'export':
    raise ValueError(f'--format={_FORMAT.value} applies to --mode=export '
                     f'only; got --mode={mode}')
  if mode == 'preview':
    command_line.check_writable_file('out', _OUT.value)
    from jaxssl import preview  # pylint: disable=g-import-not-at-top
    print(preview.write_view_grid(config, _OUT.value))
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  if mode in ('train', 'eval', 'export', 'pictures'):
    command_line.check_writable_directory('workdir', _WORKDIR.value)
  from jaxssl import distributed, evaluate, parallel, train  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
      heartbeat_timeout_seconds=_HEARTBEAT.value)
  if mode == 'train':
    train.run(config, _WORKDIR.value,
              allow_config_change=_ALLOW_CHANGE.value)
  elif mode == 'eval':
    evaluate.run(config, _SOURCE.value or _WORKDIR.value,
                 parallel.make_mesh(),
                 results_path=os.path.join(_WORKDIR.value, 'evaluation.json'))
  elif mode == 'export':
    train.export_latest(_WORKDIR.value, export_format=_FORMAT.value,
                        source=_SOURCE.value)
  elif mode == 'pictures':
    from jaxssl.evaluation import retrieval  # pylint: disable=g-import-not-at-top
    mesh = parallel.make_mesh()
    spec, encoder, variables = evaluate.load_encoder(
        _SOURCE.value or _WORKDIR.value, mesh, kernels=config.kernels)
    for path in retrieval.write_pictures(
        config, _WORKDIR.value, encoder, variables, mesh,
        title=f'{spec["method"]} (step {spec["step"]})'):
      print(f'wrote {path}', flush=True)


def _parse_flags(argv):
  """absl's parse, with a bad flag or `--config.<key>` as one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    from jaxssl import command_line  # pylint: disable=g-import-not-at-top
    keys = command_line.config_keys_from_argv(argv)
    print(f'jaxssl: error: {command_line.flag_error_line(e, argv, keys)}',
          file=sys.stderr)
    sys.exit(1)


def run_main() -> None:
  """`jaxssl-pretrain` and `python -m jaxssl.main`."""
  app.run(_main, flags_parser=_parse_flags)


def run_eval() -> None:
  """`jaxssl-eval`: `--mode=eval`."""
  app.run(lambda argv: _main(argv, mode='eval'), flags_parser=_parse_flags)


def run_export() -> None:
  """`jaxssl-export`: `--mode=export`."""
  app.run(lambda argv: _main(argv, mode='export'), flags_parser=_parse_flags)


if __name__ == '__main__':
  sys.exit(run_main())
