"""Registry of pretraining methods."""

from jaxssl.methods.base import Method
from jaxssl.methods.simclr import SimCLR

METHODS: dict[str, type[Method]] = {
    'simclr': SimCLR,
}


def get_method_class(name: str) -> type[Method]:
  """Returns the method class registered as `name`.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name not in METHODS:
    raise ValueError(
        f'unknown method {name!r}; known: {", ".join(sorted(METHODS))}')
  return METHODS[name]
