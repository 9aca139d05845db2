"""A small orbax adapter: full-state checkpoints, auto-resume, encoder export.

Layout of a workdir:
  <workdir>/checkpoints/<step>/{state,meta}    full TrainState + run config
                                               and the encoder spec
  <workdir>/export/{variables,spec}            encoder params + BN statistics

Orbax writes each checkpoint to a temporary directory and renames it when it
is complete, so an interrupted save never replaces the last good checkpoint;
`latest_step` sees only complete ones. Every process calls `save` and
`restore` (orbax coordinates multi-host writes); arrays are restored straight
into the shardings of an abstract target. Nothing is pickled.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any
_CHECKPOINTS = 'checkpoints'
EXPORT_SUBDIR = 'export'


def absolute(path: str) -> epath.Path:
  """`path` made absolute (orbax needs absolute local paths); URLs unchanged."""
  path = str(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def abstract_with_sharding(tree: PyTree, sharding: jax.sharding.Sharding
                           ) -> PyTree:
  """Returns `tree`'s shapes and dtypes as ShapeDtypeStructs on `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


class Checkpointer:
  """Periodic full-state checkpoints of one run, with auto-resume."""

  def __init__(self, workdir: str, *, keep: int):
    """Opens (or creates) `<workdir>/checkpoints`.

    Args:
      workdir: the run's directory (local path or gs://).
      keep: how many recent checkpoints to keep.
    """
    self.directory = absolute(workdir) / _CHECKPOINTS
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            create=True),
        handler_registry=_handler_registry())

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save of `state` and JSON `meta` at `step`.

    Args:
      step: the step count of `state`.
      state: the full train state.
      meta: `{'config': run config dict, 'encoder_spec': ...}`.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: PyTree) -> PyTree:
    """Restores the full state of `step` into `abstract_state`'s shardings."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _handler_registry(state_restore: type[ocp.args.CheckpointArgs]
                      = ocp.args.StandardRestore
                      ) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """The items of a training checkpoint: `state` (arrays) and `meta` (JSON).

  orbax's current way to name items (`item_names` and `item_handlers` are
  deprecated). `state_restore` picks the handler that reads `state`:
  StandardRestore for the whole state, PyTreeRestore for a partial restore.
  """
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add('state', ocp.args.StandardSave)
  registry.add('state', state_restore)
  registry.add('meta', ocp.args.JsonSave)
  registry.add('meta', ocp.args.JsonRestore)
  return registry


def _reader(directory: epath.Path, state_restore: type[ocp.args.CheckpointArgs]
            = ocp.args.StandardRestore) -> ocp.CheckpointManager:
  # Not `read_only=True`: orbax logs three warnings per read-only manager.
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      handler_registry=_handler_registry(state_restore))


def read_training_meta(workdir: str, step: int | None = None
                       ) -> tuple[int, dict[str, Any]]:
  """Returns `(step, meta)` saved with a training checkpoint (latest if None).

  Raises:
    FileNotFoundError: if the workdir has no complete checkpoint.
  """
  directory = absolute(workdir) / _CHECKPOINTS
  if not directory.exists():
    raise FileNotFoundError(f'no checkpoints under {directory}')
  manager = _reader(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no complete checkpoint under {directory}')
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore())).meta
  return step, meta


def _path_names(path) -> tuple[str, ...]:
  """Key path as plain names: `.params['encoder']` and `['params']['encoder']`
  (a dataclass field in memory, a dict key on disk) both give
  `('params', 'encoder')`."""
  names = []
  for entry in path:
    for attr in ('name', 'key', 'idx'):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
  return tuple(names)


def shapes_by_path(tree: PyTree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """`{('params', 'encoder', ...): shape}` for every array leaf of `tree`."""
  return {_path_names(path): tuple(leaf.shape) for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_state_shapes(workdir: str, step: int
                       ) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shapes of every array in the saved TrainState of `step` (metadata only)."""
  manager = _reader(absolute(workdir) / _CHECKPOINTS)
  return shapes_by_path(manager.item_metadata(step)['state'])


def restore_encoder_from_training(workdir: str, step: int,
                                  abstract_variables: PyTree) -> PyTree:
  """Partially restores `{'params', 'batch_stats'}` of the encoder.

  Reads only `params['encoder']` and `batch_stats['encoder']` of the saved
  TrainState; the optimizer state and heads are not loaded.

  Args:
    workdir: the training run's directory.
    step: which checkpoint.
    abstract_variables: `{'params': ..., 'batch_stats': ...}` of the encoder
      as ShapeDtypeStructs with shardings.
  """
  item = {'params': {'encoder': abstract_variables['params']}}
  if abstract_variables.get('batch_stats'):
    item['batch_stats'] = {'encoder': abstract_variables['batch_stats']}
  manager = _reader(absolute(workdir) / _CHECKPOINTS,
                    state_restore=ocp.args.PyTreeRestore)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))).state
  return {'params': restored['params']['encoder'],
          'batch_stats': restored.get('batch_stats', {}).get('encoder', {})}


def export_encoder(directory: str, variables: PyTree,
                   spec: dict[str, Any]) -> None:
  """Writes the encoder alone: variables and the spec needed to rebuild it.

  Args:
    directory: destination (replaced atomically if it exists).
    variables: `{'params': ..., 'batch_stats': ...}` of the encoder.
    spec: JSON-able description: model config, image size, channels, and
      provenance (method, dataset, step).
  """
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(absolute(directory), args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        spec=ocp.args.JsonSave(spec)), force=True)


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
