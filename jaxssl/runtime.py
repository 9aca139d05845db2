"""Process-level settings applied once by the entry points, before any work.

- TensorFlow (used for input only) prints C++ banners unless told before it
  is imported.
- glibc returns large freed blocks to the OS (mmap'd allocations, heap
  trimming); XLA's CPU runtime allocates fresh temporaries every step, so
  each step then page-faults its buffers back in: about 15% of a small-CNN
  step on a 2-core CPU (docs/benchmarks.md). Keeping freed memory in the
  process removes that, at the cost of a higher resident peak. It is skipped
  where glibc is not the allocator, and `JAXSSL_TUNE_MALLOC=0` turns it off.
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
  """Quiet TensorFlow's C++ logs and tune malloc; call before other imports."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  tune_malloc()
