"""CPU speed kernels for the encoders, and the one place that picks them.

`jaxssl.models` builds every encoder from a convolution factory and a
BatchNorm factory (`conv=`, `norm=`; plain XLA ops by default) and never
looks at the backend. This package holds a faster CPU convolution with
the same parameters and values: `CpuConv`, `layers.Conv` computed by
`fastconv.conv2d`, whose products are im2col matmuls or Winograd
F(2x2, 3x3) (`fastconv`, `winograd`, `batch_chunks`). BatchNorm stays
`layers.BatchNorm` everywhere: a hand-written fused BatchNorm VJP saved
less than 10% of the ResNet-18 CIFAR step and was removed, and nothing
measurable on either step once `layers.affine` ran one-group BN without
the `[1, M, C]` view (docs/benchmarks.md, "Fused BatchNorm VJP: removed"
and "BatchNorm with one group").

`select_factories` picks the pair once, outside the model, from the
backend, this process's device count and the user's `kernels` choice
(config key `kernels`, `python -m jaxssl.bench step --kernels`). The choice
is a runtime setting: it is not part of the model config or of an exported
encoder, and variables trained with one pair load and run with the other.
"""

from typing import Any, NamedTuple

import jax

from jaxssl.cpu_kernels import fastconv
from jaxssl.models import layers

# 'auto': the CPU kernels on a CPU backend with one device in this process,
# else XLA's ops; 'cpu' and 'xla' force one pair.
KERNELS = ('auto', 'cpu', 'xla')


class CpuConv(layers.Conv):
  """`layers.Conv` whose product is `fastconv.conv2d(impl='auto')`.

  Same parameter, padding and values as `layers.Conv` (up to float
  rounding); the forward and both gradients are matmuls or Winograd
  transforms chosen per shape (`fastconv` module docstring).
  """

  def convolve(self, x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
    return fastconv.conv2d(x, kernel, strides=self.strides, padding=pads,
                           impl='auto')


class Factories(NamedTuple):
  """The encoder building blocks of a run (`models.make_encoder`'s args).

  Attributes:
    conv: convolution factory (`layers.Conv` or `CpuConv`).
    norm: BatchNorm factory (`layers.BatchNorm` for both choices today).
    name: 'cpu' or 'xla', what was picked.
    reason: why, in words, for the start-of-run log line.
  """
  conv: Any
  norm: Any
  name: str
  reason: str

  def describe(self) -> str:
    """One log line, e.g. 'kernels: cpu (auto: CPU backend, 1 device)'."""
    return f'kernels: {self.name} ({self.reason})'


def select_factories(kernels: str = 'auto', *, backend: str | None = None,
                     local_devices: int | None = None) -> Factories:
  """Picks the encoders' conv and norm factories for this process.

  'auto' takes the CPU kernels only on a CPU backend with one device in
  this process. Several CPU devices in one process are simulated devices
  sharing the host's cores; there the quickstart step on 8 devices ran
  2.03x slower than on 1 with the matmul convolutions but 0.51x with XLA's
  (docs/benchmarks.md), so they take XLA's ops. TPU and GPU always take
  XLA's ops under 'auto'.

  Args:
    kernels: a name in `KERNELS` (the config key `kernels`).
    backend: `jax.default_backend()` by default.
    local_devices: `jax.local_device_count()` by default (>= 1).

  Returns:
    `Factories` for `models.make_encoder(..., conv=, norm=)`.
  """
  if kernels not in KERNELS:
    raise ValueError(f"unknown kernels {kernels!r}; known: "
                     f"{', '.join(KERNELS)}")
  if local_devices is None:
    local_devices = jax.local_device_count()
  if isinstance(local_devices, bool) or not isinstance(local_devices, int) or (
      local_devices < 1):
    raise ValueError(f'local_devices={local_devices!r} must be an int >= 1')
  backend = backend or jax.default_backend()
  if kernels == 'auto':
    use_cpu = backend == 'cpu' and local_devices == 1
    reason = (f'auto: {backend} backend, {local_devices} device'
              f'{"s" if local_devices > 1 else ""} in this process')
  else:
    use_cpu = kernels == 'cpu'
    reason = f'{kernels}: chosen'
  if use_cpu:
    return Factories(CpuConv, layers.BatchNorm, 'cpu', reason)
  return Factories(layers.Conv, layers.BatchNorm, 'xla', reason)


__all__ = ['KERNELS', 'CpuConv', 'Factories', 'fastconv', 'select_factories']
