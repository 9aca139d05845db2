"""Trace-time argument checks shared by the losses.

Every check raises `ValueError` with one line that names the bad value and
what is allowed, so a wrong call fails before anything is compiled.
"""

import math
import numbers
from typing import Sequence

import jax


def check_temperature(temperature, name: str = 'temperature') -> float:
  """Returns `temperature` as a float after checking it is static and > 0.

  Args:
    temperature: a Python (or NumPy) real number; traced values are refused
      because the losses branch and scale on it at trace time.
    name: the argument name used in the error message.

  Returns:
    The temperature as a Python float.
  """
  if (isinstance(temperature, bool) or
      not isinstance(temperature, numbers.Real)):
    raise ValueError(
        f'{name}={temperature!r} must be a positive Python float (a static '
        f'value, not an array)')
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f'{name}={temperature!r} must be a finite float > 0')
  return float(temperature)


def check_positive_int(value, name: str) -> int:
  """Returns `value` after checking it is a static integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name}={value!r} must be a Python int >= 1')
  if value < 1:
    raise ValueError(f'{name}={value!r} must be a Python int >= 1')
  return int(value)


def check_embeddings(named: Sequence[tuple[str, jax.Array]]) -> None:
  """Checks that each array is 2-D and that all share the first one's shape.

  Args:
    named: `(name, array)` pairs, e.g. `[('z1', z1), ('z2', z2)]`; arrays are
      `[per_device_batch, dim]`.
  """
  first_name, first = named[0]
  for name, x in named:
    if x.ndim != 2:
      raise ValueError(
          f'{name} has shape {tuple(x.shape)}; expected a 2-D '
          f'[per_device_batch, dim] array')
    if x.shape != first.shape:
      raise ValueError(
          f'{name} has shape {tuple(x.shape)} but {first_name} has shape '
          f'{tuple(first.shape)}; they must be equal')
    if x.shape[0] < 1 or x.shape[1] < 1:
      raise ValueError(
          f'{name} has shape {tuple(x.shape)}; batch and dim must be >= 1')


def check_width(x: jax.Array, dim: int, name: str, meaning: str) -> None:
  """Checks that `x` is 2-D with `dim` columns (e.g. a queue `[K, dim]`)."""
  if x.ndim != 2 or x.shape[1] != dim:
    raise ValueError(
        f'{name} has shape {tuple(x.shape)}; expected {meaning} with width '
        f'{dim}')
