"""The safetensors format written and read with numpy (no torch)."""

import json
import struct

import numpy as np
import pytest

from jaxssl import safetensors_file


def test_encode_writes_the_format_byte_for_byte():
  data = safetensors_file.encode(
      {'w': np.array([[1.0, 2.0]], np.float32), 'n': np.array(5, np.int64)},
      {'format': 'pt'})
  header = (b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":'
            b'[1,2],"data_offsets":[0,8]},"n":{"dtype":"I64","shape":[],'
            b'"data_offsets":[8,16]}}')
  header += b' ' * (-len(header) % 8)
  assert data == (struct.pack('<Q', len(header)) + header +
                  b'\x00\x00\x80\x3f\x00\x00\x00\x40' +  # 1.0f, 2.0f
                  b'\x05' + b'\x00' * 7)                  # int64 5


def test_round_trip_keeps_names_order_dtypes_and_values():
  rng = np.random.default_rng(0)
  tensors = {
      'b.transposed': rng.normal(size=(3, 4)).astype(np.float32).T,
      'a.big_endian': np.arange(5, dtype='>i8'),
      'c.empty': np.zeros((0, 2), np.float16),
      'd.scalar': np.array(True),
      'e.bytes': np.arange(7, dtype=np.uint8),
  }
  data = safetensors_file.encode(tensors, {'k': 'v'})
  (length,) = struct.unpack('<Q', data[:8])
  assert (8 + length) % 8 == 0  # the data starts aligned
  back, metadata = safetensors_file.decode(data)
  assert metadata == {'k': 'v'}
  assert list(back) == list(tensors)
  for name, value in tensors.items():
    assert back[name].dtype == value.dtype.newbyteorder('=')
    np.testing.assert_array_equal(back[name], value)


def test_the_reference_implementation_reads_and_writes_the_same():
  st = pytest.importorskip('safetensors.numpy')
  tensors = {'x': np.arange(6, dtype=np.float32).reshape(2, 3),
             'y': np.array(3, np.int64), 'z': np.ones(2, np.float64)}
  for name, value in st.load(safetensors_file.encode(tensors)).items():
    np.testing.assert_array_equal(value, tensors[name])
  back, metadata = safetensors_file.decode(
      st.save(tensors, metadata={'m': 'n'}))
  assert metadata == {'m': 'n'} and set(back) == set(tensors)
  for name, value in back.items():
    np.testing.assert_array_equal(value, tensors[name])


@pytest.mark.parametrize('tensors, metadata, message', [
    ({'x': np.zeros(2, np.complex64)}, None,
     "tensor 'x' has dtype complex64, which this writer does not support; "
     'supported: float64, float32, float16, int64, int32, int16, int8, '
     'uint8, bool'),
    ({'': np.zeros(2)}, None,
     "tensor name '' must be a non-empty string other than '__metadata__'"),
    ({'__metadata__': np.zeros(2)}, None,
     "tensor name '__metadata__' must be a non-empty string other than "
     "'__metadata__'"),
    ({'x': np.zeros(2)}, {'step': 8},
     "safetensors metadata must map str to str; got {'step': 8}"),
])
def test_bad_tensors_are_one_line_errors(tensors, metadata, message):
  with pytest.raises(ValueError) as e:
    safetensors_file.encode(tensors, metadata)
  assert str(e.value) == message


def _file(header: dict, body: bytes) -> bytes:
  text = json.dumps(header).encode()
  return struct.pack('<Q', len(text)) + text + body


@pytest.mark.parametrize('data, message', [
    (b'\x01\x00', 'not a safetensors file: 2 bytes'),
    (struct.pack('<Q', 100) + b'{}', 'not a safetensors file: header '
     'length 100 > 2 bytes after it'),
    (_file({'x': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}},
           b'\x00' * 12),
     'safetensors data is 12 bytes but the tensors cover 8'),
    (_file({'x': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}},
           b'\x00' * 12),
     "safetensors entry 'x' has data_offsets [4, 12]; expected [0, 8] (no "
     'gap, no overlap)'),
    (_file({'x': {'dtype': 'C64', 'shape': [1], 'data_offsets': [0, 8]}},
           b'\x00' * 8),
     "safetensors entry 'x' is malformed: {'dtype': 'C64', 'shape': [1], "
     "'data_offsets': [0, 8]}"),
])
def test_bad_files_are_one_line_errors(data, message):
  with pytest.raises(ValueError) as e:
    safetensors_file.decode(data)
  assert str(e.value) == message
