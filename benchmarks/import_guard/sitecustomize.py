"""Makes chosen top-level modules absent, as on the accelerator machine.

On `PYTHONPATH`, Python imports this file at start-up (`site`), in the
process and in every subprocess that inherits the environment. For each
top-level name in `$JAXSSL_BLOCKED_IMPORTS` (comma-separated, e.g.
`tensorflow,tensorflow_datasets,clu`), an import raises
`ModuleNotFoundError`, as it would where the package is not installed, and
the attempt is appended to `$JAXSSL_BLOCKED_IMPORTS_LOG` (one line
`<pid> <module>`) when that is set, so a caller can tell that nothing even
tried. Used by `benchmarks/device_check.py --dry-run` and its test.
"""

import os
import sys

_BLOCKED = frozenset(
    name.strip() for name in os.environ.get('JAXSSL_BLOCKED_IMPORTS',
                                            '').split(',') if name.strip())
_LOG = os.environ.get('JAXSSL_BLOCKED_IMPORTS_LOG', '')


class _BlockedFinder:
  """A meta-path finder that refuses the blocked names (and submodules)."""

  @staticmethod
  def find_spec(name, path=None, target=None):
    del path, target
    if name.partition('.')[0] not in _BLOCKED:
      return None  # Not ours: the next finder looks for it.
    if _LOG:
      with open(_LOG, 'a', encoding='utf-8') as log:
        log.write(f'{os.getpid()} {name}\n')
    raise ModuleNotFoundError(
        f'No module named {name!r} (blocked by benchmarks/import_guard: '
        'not installed on the accelerator machine)', name=name)


if _BLOCKED:
  sys.meta_path.insert(0, _BlockedFinder())
