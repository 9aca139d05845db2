"""The safetensors file format, written and read with numpy alone.

Layout of a file (huggingface/safetensors, README "Format"):
  8 bytes   N, the length of the header, unsigned 64-bit little-endian
  N bytes   UTF-8 JSON object: `{name: {"dtype": "F32", "shape": [...],
            "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}`
  the rest  every tensor's bytes, little-endian, C order, back to back; the
            offsets count from the first byte after the header

As the reference writer does, the header is padded with spaces to a multiple
of 8 bytes (so the data starts aligned) and the tensors lie in the order of
their offsets with no gap. Nothing here imports torch or jax: jaxssl writes
PyTorch weights without PyTorch (`jaxssl.torch_export`), and a PyTorch user
can read them with `read` (numpy) or with `safetensors.torch.load_file`.

References:
  https://github.com/huggingface/safetensors (README "Format"; the Rust
  crate's `tensor.rs` validates the same rules as `decode`).
"""

import json
import struct
from typing import Mapping

import numpy as np
from etils import epath

# safetensors dtype name -> little-endian numpy dtype. bfloat16 ('BF16') is
# left out: numpy has no such dtype, and exports are float32.
DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'), 'I16': np.dtype('<i2'),
    'I8': np.dtype('i1'), 'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_METADATA = '__metadata__'
_ALIGN = 8


def _dtype_name(key: str, array: np.ndarray) -> str:
  name = _NAMES.get(array.dtype.newbyteorder('<'))
  if name is None:
    raise ValueError(
        f'tensor {key!r} has dtype {array.dtype}, which this writer does not '
        f"support; supported: {', '.join(str(d) for d in DTYPES.values())}")
  return name


def encode(tensors: Mapping[str, np.ndarray],
           metadata: Mapping[str, str] | None = None) -> bytes:
  """The bytes of a safetensors file holding `tensors`.

  Args:
    tensors: name -> array of a dtype in `DTYPES` (any byte order or memory
      layout; written little-endian in C order), in the order to write them.
    metadata: optional `{str: str}` stored as the header's `__metadata__`.

  Returns:
    The whole file.

  Raises:
    ValueError: a name that is not a non-empty string or is
      '__metadata__', an unsupported dtype, or metadata that is not str.
  """
  header, chunks, offset = {}, [], 0
  for key, value in tensors.items():
    if not isinstance(key, str) or not key or key == _METADATA:
      raise ValueError(f'tensor name {key!r} must be a non-empty string '
                       f'other than {_METADATA!r}')
    array = np.asarray(value)
    name = _dtype_name(key, array)
    data = np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()
    header[key] = {'dtype': name, 'shape': list(array.shape),
                   'data_offsets': [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  if metadata:
    if not all(isinstance(k, str) and isinstance(v, str)
               for k, v in metadata.items()):
      raise ValueError(f'safetensors metadata must map str to str; got '
                       f'{dict(metadata)!r}')
    header = {_METADATA: dict(metadata), **header}
  text = json.dumps(header, separators=(',', ':')).encode('utf-8')
  text += b' ' * (-len(text) % _ALIGN)
  return b''.join([struct.pack('<Q', len(text)), text, *chunks])


def _check_entry(key: str, entry, expected_begin: int) -> tuple[int, int]:
  """`(begin, end)` of one header entry; ValueError unless well-formed."""
  if (not isinstance(entry, dict) or entry.get('dtype') not in DTYPES or
      not isinstance(entry.get('shape'), list) or
      not all(isinstance(n, int) and n >= 0 for n in entry['shape'])):
    raise ValueError(f'safetensors entry {key!r} is malformed: {entry!r}')
  offsets = entry.get('data_offsets')
  size = DTYPES[entry['dtype']].itemsize * int(np.prod(entry['shape']))
  if offsets != [expected_begin, expected_begin + size]:
    raise ValueError(
        f'safetensors entry {key!r} has data_offsets {offsets}; expected '
        f'[{expected_begin}, {expected_begin + size}] (no gap, no overlap)')
  return expected_begin, expected_begin + size


def _begin(entry) -> int:
  """Sort key: an entry's first offset (-1 if malformed, to fail first)."""
  offsets = entry.get('data_offsets') if isinstance(entry, dict) else None
  if isinstance(offsets, list) and offsets and isinstance(offsets[0], int):
    return offsets[0]
  return -1


def decode(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The tensors and metadata of a safetensors file's bytes.

  Args:
    data: the whole file.

  Returns:
    `(tensors, metadata)`: name -> numpy array (a copy, native byte order)
    in the order of their offsets, and the `__metadata__` dict ({} if none).

  Raises:
    ValueError: the bytes are not a well-formed safetensors file (the
      header length, JSON, a dtype, or offsets that do not tile the data).
  """
  if len(data) < 8:
    raise ValueError(f'not a safetensors file: {len(data)} bytes')
  (length,) = struct.unpack('<Q', data[:8])
  if length > len(data) - 8:
    raise ValueError(f'not a safetensors file: header length {length} > '
                     f'{len(data) - 8} bytes after it')
  try:
    header = json.loads(data[8:8 + length].decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'not a safetensors file: bad header ({e})') from None
  if not isinstance(header, dict):
    raise ValueError('not a safetensors file: the header is not an object')
  metadata = header.pop(_METADATA, None) or {}
  body = memoryview(data)[8 + length:]
  tensors, offset = {}, 0
  for key, entry in sorted(header.items(), key=lambda kv: _begin(kv[1])):
    begin, end = _check_entry(key, entry, offset)
    dtype = DTYPES[entry['dtype']]
    tensors[key] = np.frombuffer(body[begin:end], dtype=dtype).reshape(
        entry['shape']).astype(dtype.newbyteorder('='))
    offset = end
  if offset != len(body):
    raise ValueError(f'safetensors data is {len(body)} bytes but the '
                     f'tensors cover {offset}')
  return tensors, metadata


def write(path: str, tensors: Mapping[str, np.ndarray],
          metadata: Mapping[str, str] | None = None) -> None:
  """Writes `encode(tensors, metadata)` to `path` (local or gs://)."""
  epath.Path(path).write_bytes(encode(tensors, metadata))


def read(path: str) -> dict[str, np.ndarray]:
  """The tensors of the safetensors file at `path`, as numpy arrays.

  For PyTorch: `{k: torch.from_numpy(v) for k, v in read(path).items()}`.
  """
  tensors, _ = decode(epath.Path(path).read_bytes())
  return tensors


def read_metadata(path: str) -> dict[str, str]:
  """The `__metadata__` of the safetensors file at `path` ({} if none)."""
  _, metadata = decode(epath.Path(path).read_bytes())
  return metadata
