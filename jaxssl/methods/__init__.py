"""Registry of pretraining methods: a plain dict of classes.

Each method module imports only `jaxssl.methods.base`/`common`,
`jaxssl.losses` and `jaxssl.models` (docs/adding-a-method.md).
"""

from jaxssl.methods import byol
from jaxssl.methods import moco_v2
from jaxssl.methods import moco_v3
from jaxssl.methods import simclr
from jaxssl.methods import simsiam
from jaxssl.methods import swav
from jaxssl.methods.base import Aux, Method, RunInfo  # noqa: F401

METHODS: dict[str, type[Method]] = {
    'simclr': simclr.SimCLR,
    'byol': byol.BYOL,
    'simsiam': simsiam.SimSiam,
    'moco_v2': moco_v2.MoCoV2,
    'moco_v3': moco_v3.MoCoV3,
    'swav': swav.SwAV,
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
