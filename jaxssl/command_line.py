"""Checks of command-line input that the config schema cannot see.

Flag parsing errors (a misspelt `--config.<key>`, a value of the wrong type)
become one line naming the flag, and output paths (`--workdir`, which holds
checkpoints and `export/`, and `--out`) are checked to be writable before
anything is built or compiled.
"""

import difflib
import importlib.util
import os
import re
from typing import Sequence

_SUGGESTION = re.compile(r'Did you mean "(\w+)" instead of "(\w+)"')


def flag_error_line(error: Exception, argv: Sequence[str],
                    declared_keys: Sequence[str] = ()) -> str:
  """One line for an error raised while parsing `argv`'s flags.

  Args:
    error: what absl or ml_collections raised.
    argv: the command line, to name the `--config.<key>` at fault.
    declared_keys: the config's dotted keys (if it was loaded), for the
      closest key when ml_collections suggests none.
  """
  text = ' '.join(str(error).replace('\\n', ' ').split())
  found = _SUGGESTION.search(str(error))
  # ml_collections raises AttributeError("'key'") for an undeclared key.
  bad, closest = ((found.group(2), found.group(1)) if found
                  else (text.strip('\'"'), None))
  for arg in argv:
    key = arg.split('=', 1)[0]
    if key.startswith('--config.') and key.split('.')[-1] == bad:
      dotted = key[len('--config.'):]
      parent = dotted.rsplit('.', 1)[0] + '.' if '.' in dotted else ''
      closest = f'{parent}{closest}' if closest else next(iter(
          difflib.get_close_matches(dotted, declared_keys, n=1, cutoff=0.0)),
                                                            None)
      hint = f'; closest declared key: {closest}' if closest else ''
      return f'{key}: the config declares no key {dotted}{hint}'
  return f'bad command line: {text}'


def config_keys_from_argv(argv: Sequence[str]) -> list[str]:
  """The dotted keys of the config file named by `--config` in `argv`.

  For `flag_error_line` when absl's parse failed (then the `config` flag
  holds no value): the file's `get_config()` is loaded again, without its
  overrides. Returns [] if there is no `--config` or it cannot be loaded
  (that error is reported on its own).
  """
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  if not path:
    return []
  try:
    spec = importlib.util.spec_from_file_location('_jaxssl_cli_config',
                                                  path.split(':', 1)[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from jaxssl import config_schema  # pylint: disable=g-import-not-at-top
    return list(config_schema.dotted_keys(module.get_config()))
  except Exception:  # pylint: disable=broad-except
    return []


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_writable_directory(flag: str, path: str) -> None:
  """Raises ValueError unless `path` is, or can be made, a writable directory.

  Remote paths (`gs://...`) are not checked here; nothing is created.
  """
  if '://' in path:
    return
  absolute = os.path.abspath(path)
  existing = _nearest_existing(absolute)
  if not os.path.isdir(existing):
    where = 'is a file' if existing == absolute else f'is under the file {existing}'
    raise ValueError(f'--{flag}={path} {where}; give a directory (it is '
                     'created if missing)')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f'--{flag}={path} cannot be written: {existing} is not '
                     'writable by this user')


def check_writable_file(flag: str, path: str) -> None:
  """Raises ValueError unless a file can be written at `path`."""
  absolute = os.path.abspath(path)
  folder = os.path.dirname(absolute)
  if os.path.isdir(absolute):
    raise ValueError(f'--{flag}={path} is a directory; give a file name')
  if not os.path.isdir(folder):
    raise ValueError(f'--{flag}={path}: the folder {folder} does not exist; '
                     'create it first')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise ValueError(f'--{flag}={path} cannot be written: {folder} is not '
                     'writable by this user')
