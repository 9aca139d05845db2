"""The exported encoder: its variables and spec, written atomically.

Layout:
  <directory>/{variables,spec}    encoder params + BN statistics, and the
                                  JSON needed to rebuild the encoder
                                  (model config, image size, channels,
                                  provenance); `<workdir>/export/` for a run

The export is what evaluation and downstream work load
(`evaluate.load_encoder`); it holds no optimizer state or heads. It is
written beside the old one and swapped in only when complete
(`export_encoder`), so a kill at any moment leaves the old or the new one.
"""

import ctypes
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

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
