"""Process-level settings, applied by the entry points and the trainer.

- `configure_process` (entry points, before any import of TensorFlow):
  TensorFlow, used for input only, prints C++ banners unless told first.
- `tune_malloc` (the trainer, only when it runs the CPU kernels on a CPU
  backend, `jaxssl.cpu_kernels`): glibc returns large freed blocks to the
  OS (mmap'd allocations, heap trimming); XLA's CPU runtime allocates fresh
  temporaries every step, which then page-fault back in. Keeping freed
  memory in the process made the quickstart step faster in every
  interleaved pair measured (docs/benchmarks.md, "glibc malloc tuning"),
  at the cost of a higher resident peak. It was not measured on TPU or GPU
  hosts, whose step memory is on the device, so it is not applied there.
  It is skipped where glibc is not the allocator; `JAXSSL_TUNE_MALLOC=0`
  turns it off.
"""

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_malloc() -> bool:
  """Keeps freed heap memory in the process (glibc only).

  Returns:
    Whether the allocator settings were applied.
  """
  if os.environ.get('JAXSSL_TUNE_MALLOC', '1') == '0':
    return False
  name = ctypes.util.find_library('c')
  if not name or 'libc.so' not in name:
    return False
  try:
    mallopt = ctypes.CDLL(name).mallopt
  except (OSError, AttributeError):
    return False
  # The values are C ints: 2**31 - 1 is the largest trim threshold.
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(
      mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def configure_process() -> None:
  """Quiets TensorFlow's C++ logs; call before importing TensorFlow."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
