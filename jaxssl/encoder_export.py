"""The encoder alone: exported atomically, or read from a training run.

Layout:
  <directory>/{variables,spec}    encoder params + BN statistics, and the
                                  JSON needed to rebuild the encoder
                                  (model config, image size, channels,
                                  provenance); `<workdir>/export/` for a run

The export is what evaluation and downstream work load
(`evaluate.load_encoder`); it holds no optimizer state or heads. It is
written beside the old one and swapped in only when complete
(`export_encoder`), so a kill at any moment leaves the old or the new one.

A training workdir's encoder is read from its checkpoints without the
optimizer state or heads (`restore_encoder_from_training`, a partial
restore), from the newest step whose encoder arrays match the checksums
saved with them (`restore_newest_good_encoder`).
"""

import ctypes
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxssl import checkpoint
from jaxssl.checkpoint import absolute

PyTree = Any
EXPORT_SUBDIR = 'export'


def export_encoder(directory: str, variables: PyTree,
                   spec: dict[str, Any]) -> None:
  """Writes the encoder alone: variables and the spec needed to rebuild it.

  The export is written beside the destination (`<directory>.incoming`) and
  swapped in only when complete, so a process killed at any moment leaves
  the old export or the new one (`_swap_in`). Every process calls it.

  Args:
    directory: destination; an existing export there is replaced.
    variables: `{'params': ..., 'batch_stats': ...}` of the encoder.
    spec: JSON-able description: model config, image size, channels, and
      provenance (method, dataset, step).
  """
  final = absolute(directory)
  incoming = final.parent / f'{final.name}.incoming'
  previous = final.parent / f'{final.name}.previous'
  if jax.process_index() == 0:
    if previous.exists() and not final.exists():
      previous.rename(final)  # a swap that was cut between its renames
    for leftover in (incoming, previous):
      if leftover.exists():
        leftover.rmtree()
  _sync('jaxssl_export_start')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(incoming, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        spec=ocp.args.JsonSave(spec)))
  if jax.process_index() == 0:
    _swap_in(incoming, final, previous)
  _sync('jaxssl_export_done')


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _swap_in(incoming: epath.Path, final: epath.Path,
             previous: epath.Path) -> None:
  """Makes `incoming` the directory at `final`, then removes the old one.

  Local paths on Linux exchange the two directories in one atomic
  `renameat2(RENAME_EXCHANGE)`; elsewhere (object stores, other systems)
  the old export is renamed to `previous` first, and a swap cut between
  the two renames is completed by the next export.
  """
  if not final.exists():
    incoming.rename(final)
    return
  if _exchange(str(incoming), str(final)):
    incoming.rmtree()  # now holds the old export
    return
  final.rename(previous)
  incoming.rename(final)
  previous.rmtree()


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two local directories; False where unsupported."""
  if '://' in a or not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    return libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(),
                          rename_exchange) == 0
  except (OSError, AttributeError):
    return False


def read_export_spec(directory: str) -> dict[str, Any]:
  """Returns the spec JSON of an exported encoder."""
  path = absolute(directory)
  if not (path / 'spec').exists():
    raise FileNotFoundError(
        f'{path} is not an exported encoder (no spec); create one with '
        '`python -m jaxssl.main --mode=export --workdir=RUN_DIR`')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, args=ocp.args.Composite(
        spec=ocp.args.JsonRestore())).spec


def load_exported_variables(directory: str, abstract_variables: PyTree
                            ) -> PyTree:
  """Restores exported encoder variables into `abstract_variables`."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(absolute(directory), args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(abstract_variables))).variables


def restore_encoder_from_training(workdir: str, step: int,
                                  abstract_variables: PyTree) -> PyTree:
  """Partially restores `{'params', 'batch_stats'}` of the encoder.

  Reads only `params['encoder']` and `batch_stats['encoder']` of the saved
  TrainState; the optimizer state and heads are not loaded. Unverified:
  `restore_newest_good_encoder` checks the checksums.

  Args:
    workdir: the training run's directory.
    step: which checkpoint.
    abstract_variables: `{'params': ..., 'batch_stats': ...}` of the encoder
      as ShapeDtypeStructs with shardings.
  """
  item = {'params': {'encoder': abstract_variables['params']}}
  if abstract_variables.get('batch_stats'):
    item['batch_stats'] = {'encoder': abstract_variables['batch_stats']}
  manager = checkpoint.reader(
      absolute(workdir) / checkpoint.CHECKPOINTS_SUBDIR,
      state_restore=ocp.args.PyTreeRestore)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))).state
  return {'params': restored['params']['encoder'],
          'batch_stats': restored.get('batch_stats', {}).get('encoder', {})}


def restore_newest_good_encoder(
    workdir: str, abstract_for: Callable[[dict[str, Any]], PyTree]
) -> tuple[int, dict[str, Any], PyTree]:
  """The encoder of the newest training step that is readable and intact.

  What `--mode=eval` and `--mode=export` read from a workdir. As
  `Checkpointer.restore_newest_good`, but for the encoder alone: a newer
  step whose meta or encoder arrays are unreadable, or whose encoder arrays
  fail the checksums recorded at save time, is skipped with a one-line
  warning naming the step and the reason. Nothing is moved: these modes
  only read (the next training run sets damaged steps aside).

  Args:
    workdir: the training run's directory.
    abstract_for: `meta -> {'params', 'batch_stats'}` ShapeDtypeStructs with
      shardings of the encoder that `meta['encoder_spec']` describes.

  Returns:
    `(step, meta, variables)`.

  Raises:
    FileNotFoundError: the workdir has no complete checkpoint.
    ValueError: every step is damaged (one line naming each reason).
  """
  directory = absolute(workdir) / checkpoint.CHECKPOINTS_SUBDIR
  if not directory.exists():
    raise FileNotFoundError(
        f'no encoder in {absolute(workdir)}: no exported encoder (a spec '
        f'file there or in its {EXPORT_SUBDIR}/) and no checkpoints under '
        f'{directory}')
  steps = sorted(checkpoint.reader(directory).all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint under {directory}')
  checkpoint.quiet_closed_event_loop()
  damaged = []
  for step in steps:
    try:
      meta, variables = _verified_encoder(workdir, step, abstract_for)
    except checkpoint.DamagedCheckpointError as e:
      print(f'jaxssl: warning: skipping checkpoint step {step} in '
            f'{directory}: {e}', file=sys.stderr, flush=True)
      damaged.append(f'step {step}: {e}')
      continue
    return step, meta, variables
  raise ValueError(f'no usable checkpoint in {directory} '
                   f'({"; ".join(damaged)})')


def _verified_encoder(workdir, step, abstract_for):
  """`(meta, variables)` of `step`, or DamagedCheckpointError saying why."""
  try:
    _, meta = checkpoint.read_training_meta(workdir, step)
    if not isinstance(meta, dict) or 'encoder_spec' not in meta:
      raise ValueError('no encoder_spec')
  except Exception as e:  # pylint: disable=broad-except
    raise checkpoint.DamagedCheckpointError(
        f'its meta is unreadable ({checkpoint.brief_error(e)})')
  try:
    variables = restore_encoder_from_training(workdir, step,
                                              abstract_for(meta))
    checksums = checkpoint.array_checksums(
        {'params': {'encoder': variables['params']},
         'batch_stats': {'encoder': variables['batch_stats']}},
        check_finite=False)
  except Exception as e:  # pylint: disable=broad-except
    raise checkpoint.DamagedCheckpointError(
        f'its arrays are unreadable ({checkpoint.brief_error(e)})')
  checkpoint.verify_checksums(step, checksums, meta, whole_state=False,
                              unverified='read unverified')
  return meta, variables
