"""Registry of pretraining methods.

Each entry names the module and class that implement the method; the module
is imported when the method is chosen, so a method's extra dependencies load
only for runs that use it.
"""

import importlib

from jaxssl.methods.base import Method

METHODS: dict[str, str] = {
    'simclr': 'jaxssl.methods.simclr:SimCLR',
    'byol': 'jaxssl.methods.byol:BYOL',
    'simsiam': 'jaxssl.methods.simsiam:SimSiam',
    'moco_v2': 'jaxssl.methods.moco_v2:MoCoV2',
    'moco_v3': 'jaxssl.methods.moco_v3:MoCoV3',
    'swav': 'jaxssl.methods.swav:SwAV',
}


def get_method_class(name: str) -> type[Method]:
  """Returns the method class registered as `name`.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name not in METHODS:
    raise ValueError(
        f'unknown method {name!r}; known: {", ".join(sorted(METHODS))}')
  module, cls = METHODS[name].split(':')
  return getattr(importlib.import_module(module), cls)
