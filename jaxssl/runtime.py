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
- `device_memory_bytes` (the trainer, for the size checks done before
  compiling, `methods.RunInfo.device_memory_bytes`).
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
  """Quiets TensorFlow's C++ logs; call before importing TensorFlow.

  `TF_ENABLE_ONEDNN_OPTS=0` too: on CPUs where TensorFlow turns its oneDNN
  kernels on by default (AVX-512 VNNI/BF16 hosts), TF 2.21 prints two
  "oneDNN custom operations are on" banners on import that no log level
  hides, so a one-line error would not be one line there; and the input
  pipeline's ops then compute the same on every host. jaxssl runs no
  TensorFlow model, so no speed is lost. Both are defaults a user's
  environment overrides.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


def device_memory_bytes(device) -> int:
  """Memory one device of this process may use, in bytes (0: unknown).

  A TPU or GPU reports its limit (`memory_stats()['bytes_limit']`). CPU
  devices are the host's RAM, shared by the process's simulated devices,
  so each gets physical RAM / local device count.

  Args:
    device: a `jax.Device` of this process.
  """
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform != 'cpu':
    return 0
  try:
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError):
    return 0
  import jax  # pylint: disable=g-import-not-at-top
  return ram // max(1, jax.local_device_count())
