"""A small orbax adapter: full-state checkpoints, auto-resume, integrity.

Layout of a workdir:
  <workdir>/checkpoints/<step>/{state,meta}    full TrainState + run config
                                               and the encoder spec

Orbax writes each checkpoint to a temporary directory and renames it when it
is complete, so an interrupted save never replaces the last good checkpoint;
`latest_step` sees only complete ones. Every process calls `save` and
`restore` (orbax coordinates multi-host writes); arrays are restored straight
into the shardings of an abstract target. Nothing is pickled.

Integrity: `save` refuses a state with a non-finite array and records a
CRC-32 of every array's bytes in the step's meta; `restore_newest_good`
verifies them and falls back past a damaged newest step (incomplete,
unreadable or failing its checksum) to the previous good one, with a
one-line warning; the damaged step is set aside under
`<workdir>/checkpoints_damaged/`, never deleted. The exported encoder
(`<workdir>/export/`) is `jaxssl.encoder_export`'s.
"""

import os
import sys
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any
CHECKPOINTS_SUBDIR = 'checkpoints'
_DAMAGED = 'checkpoints_damaged'


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
    self.directory = absolute(workdir) / CHECKPOINTS_SUBDIR
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            create=True),
        handler_registry=_handler_registry())

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every complete checkpoint's step, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save of `state` and JSON `meta` at `step`.

    The state is first fetched to the host, checked to be finite and
    checksummed (`array_checksums`); the checksums go into the saved meta.

    Args:
      step: the step count of `state`.
      state: the full train state (replicated arrays).
      meta: `{'config': run config dict, 'encoder_spec': ...}`.

    Raises:
      NonFiniteStateError: an array of `state` holds NaN or infinity; nothing
        is written.
    """
    try:
      checksums = array_checksums(state)
    except NonFiniteStateError as e:
      raise NonFiniteStateError(
          f'the state at step {step} is not finite: {e}, the last good '
          f'checkpoint in {self.directory} is kept (lower the learning '
          'rate or check the input data)') from None
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta, checksums=checksums))), force=True)

  def restore(self, step: int, abstract_state: PyTree) -> PyTree:
    """Restores the full state of `step` into `abstract_state`'s shardings."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def restore_newest_good(
      self, abstract_state: PyTree,
      check_fits: Callable[[int, dict[str, Any], dict], None],
  ) -> tuple[int, PyTree, dict[str, Any]] | None:
    """Restores the newest step that is complete, readable and checksummed.

    Newer damaged steps are skipped with a one-line warning on stderr naming
    the step and the reason, and set aside under
    `<workdir>/checkpoints_damaged/` by process 0 once a good step is
    restored.

    Args:
      abstract_state: ShapeDtypeStructs with shardings of the full state.
      check_fits: `(step, meta, saved_shapes)` called before a step's arrays
        are read; raises ValueError if the step may not be resumed with this
        config (that error is not damage: it propagates).

    Returns:
      `(step, state, meta)`, or None if there is no checkpoint at all.

    Raises:
      ValueError: every step is damaged (one line; the files are left).
    """
    quiet_closed_event_loop()
    steps = sorted(self._manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      try:
        state, meta = self._verified(step, abstract_state, check_fits)
      except DamagedCheckpointError as e:
        print(f'jaxssl: warning: skipping checkpoint step {step} in '
              f'{self.directory}: {e}', file=sys.stderr, flush=True)
        damaged.append((step, str(e)))
        continue
      self._set_aside([s for s, _ in damaged])
      return step, state, meta
    if damaged:
      reasons = '; '.join(f'step {s}: {r}' for s, r in damaged)
      raise ValueError(
          f'no usable checkpoint in {self.directory} ({reasons}); the files '
          'are left as they are: move them away to start from scratch')
    return None

  def _verified(self, step, abstract_state, check_fits):
    """`(state, meta)` of `step`, or DamagedCheckpointError saying why not."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(f'its meta is unreadable ({brief_error(e)})')
    if not isinstance(meta, dict) or 'config' not in meta:
      raise DamagedCheckpointError('its meta is not a run description')
    try:
      shapes = saved_state_shapes(str(self.directory.parent), step)
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f'its array metadata is unreadable ({brief_error(e)})')
    if not shapes:
      raise DamagedCheckpointError('its array metadata is missing')
    check_fits(step, meta, shapes)
    try:
      state = self.restore(step, abstract_state)
      checksums = array_checksums(state, check_finite=False)
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f'its arrays are unreadable ({brief_error(e)})')
    verify_checksums(step, checksums, meta, whole_state=True,
                     unverified='restored unverified')
    return state, meta

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps to `<workdir>/checkpoints_damaged/<step>`.

    Process 0 moves them; every process reloads its step list.
    """
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.directory.parent / _DAMAGED
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / str(step)
        n = 1
        while target.exists():
          target, n = aside / f'{step}.{n}', n + 1
        (self.directory / str(step)).rename(target)
        print(f'jaxssl: warning: checkpoint step {step} moved to {target}',
              file=sys.stderr, flush=True)
    self._manager.reload()

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



def quiet_closed_event_loop() -> None:
  """Drops asyncio's 'Event loop is closed' errors from reads of damaged steps.

  When orbax fails to read a damaged array, tensorstore's pending callbacks
  fire after orbax has closed its event loop; Python reports each as an
  "Exception ignored" traceback on stderr, after the one-line warning that
  already says the step was skipped. Only that exact error is dropped;
  every other unraisable exception reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'jaxssl_quiet_loop', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError)
            and str(error) == 'Event loop is closed'):
      previous(unraisable)

  hook.jaxssl_quiet_loop = True
  sys.unraisablehook = hook


class DamagedCheckpointError(Exception):
  """A saved step is incomplete, unreadable or fails its checksum."""


class NonFiniteStateError(FloatingPointError):
  """An array of the state to be saved holds NaN or infinity."""


def verify_checksums(step: int, checksums: dict[str, int],
                     meta: dict[str, Any], *, whole_state: bool,
                     unverified: str) -> None:
  """Raises DamagedCheckpointError if read arrays differ from those saved.

  Args:
    step: the checkpoint step (for the messages).
    checksums: `array_checksums` of the arrays read back.
    meta: the step's meta; `meta['checksums']` is what was saved.
    whole_state: the arrays read are the whole state, so an array saved
      but not read is a mismatch too; else only those read are compared.
    unverified: what the warning says was done with a step that has no
      checksums (an older jaxssl saved it).
  """
  saved = meta.get('checksums')
  if saved is None:
    print(f'jaxssl: warning: checkpoint step {step} has no checksums (an '
          f'older jaxssl saved it); {unverified}', file=sys.stderr)
    return
  keys = set(checksums) | set(saved) if whole_state else set(checksums)
  bad = [k for k in sorted(keys) if checksums.get(k) != saved.get(k)]
  if bad:
    more = f' and {len(bad) - 1} more arrays' if len(bad) > 1 else ''
    raise DamagedCheckpointError(f'checksum mismatch in {bad[0]}{more}')


def brief_error(error: Exception) -> str:
  """The first line of an error, at most 160 characters."""
  text = (str(error).strip().splitlines() or [''])[0]
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= 160 else text[:157] + '...'


def _host_array(leaf) -> np.ndarray:
  """One replica of `leaf` on the host (replicated arrays need only one)."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf.addressable_data(0))
  return np.asarray(leaf)


def array_checksums(tree: PyTree, *, check_finite: bool = True
                    ) -> dict[str, int]:
  """`{'params/encoder/...': CRC-32 of the array's bytes}` for every leaf.

  Args:
    tree: replicated arrays (or host arrays).
    check_finite: raise NonFiniteStateError naming the first floating
      array that holds NaN or infinity.
  """
  checksums = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = '/'.join(_path_names(path))
    host = _host_array(leaf)
    if (check_finite and jax.numpy.issubdtype(host.dtype, jax.numpy.inexact)
        and not np.all(np.isfinite(host))):
      raise NonFiniteStateError(
          f'{name} holds NaN or infinity; not saved')
    checksums[name] = zlib.crc32(host.tobytes())
  return checksums



def reader(directory: epath.Path, state_restore: type[ocp.args.CheckpointArgs]
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
  directory = absolute(workdir) / CHECKPOINTS_SUBDIR
  if not directory.exists():
    raise FileNotFoundError(f'no checkpoints under {directory}')
  manager = reader(directory)
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
  manager = reader(absolute(workdir) / CHECKPOINTS_SUBDIR)
  return shapes_by_path(manager.item_metadata(step)['state'])
