"""Open Inference Protocol v2 tensor encodings: datatypes, typed contents and raw bytes.

Raw tensors are little-endian and row-major. BYTES tensors are, per element, a 4-byte
little-endian length followed by the bytes. Shared by the inference service, the
pipeline client and (later) the REST gateway.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidInput

NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

#: Which InferTensorContents field carries each datatype; FP16 travels only as raw bytes.
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH_PREFIX = struct.Struct("<I")
#: numpy's own limit is 64; no OIP model takes more than a handful.
MAX_DIMENSIONS = 32
#: Elements numpy can address at 8 bytes each, counting zero-size dimensions as 1 (numpy
#: refuses such shapes even when they hold no element).
MAX_ELEMENTS = np.iinfo(np.intp).max // 8


def element_count(name: str, shape: Sequence[int]) -> int:
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidInput(f"tensor {name!r} has {len(shape)} dimensions; max is {MAX_DIMENSIONS}")
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"tensor {name!r} has shape {list(shape)}; dimensions must not be negative")
    # Python integers: numpy's int64 product wraps around, so a lying shape such as
    # [2**32, 2**32] would count 0 elements and match an empty payload.
    if math.prod(dim for dim in shape if dim) > MAX_ELEMENTS:
        raise InvalidInput(f"tensor {name!r} has shape {list(shape)}; that is more elements than any tensor can hold")
    return math.prod(shape)


def numpy_dtype(name: str, datatype: str) -> np.dtype[np.generic]:
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise InvalidInput(f"tensor {name!r} has unknown datatype {datatype!r}") from None


def datatype_of(array: npt.NDArray[np.generic]) -> str:
    for datatype, dtype in NUMPY_DTYPES.items():
        if array.dtype == dtype:
            return datatype
    raise ValueError(f"no OIP datatype for numpy dtype {array.dtype}")


def decode_bytes_elements(name: str, raw: bytes, count: int) -> npt.NDArray[np.object_]:
    """Splits length-prefixed BYTES data into `count` elements; the lengths must add up exactly."""
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"tensor {name!r}: BYTES data ends inside a length prefix at byte {offset}")
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(
                f"tensor {name!r}: BYTES element {len(items)} claims {length} bytes; {len(raw) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInput(f"tensor {name!r}: BYTES data holds {len(items)} elements; its shape needs {count}")
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


def encode_bytes_elements(items: npt.NDArray[np.object_] | Sequence[bytes | str]) -> bytes:
    parts: list[bytes] = []
    for item in np.asarray(items, dtype=np.object_).reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH_PREFIX.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> npt.NDArray[np.generic]:
    """A raw tensor as a numpy array of `shape`; the byte length must match exactly."""
    dtype = numpy_dtype(name, datatype)
    count = element_count(name, shape)
    if datatype == "BYTES":
        return decode_bytes_elements(name, raw, count).reshape(tuple(shape))
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"tensor {name!r}: raw data has {len(raw)} bytes; {datatype} shape {list(shape)} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def encode_raw(array: npt.NDArray[np.generic], datatype: str) -> bytes:
    if datatype == "BYTES":
        return encode_bytes_elements(array)  # type: ignore[arg-type]
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


def decode_typed(name: str, datatype: str, shape: Sequence[int], values: Sequence[object]) -> npt.NDArray[np.generic]:
    """Typed contents as a numpy array of `shape`; the element count must match exactly."""
    dtype = numpy_dtype(name, datatype)
    count = element_count(name, shape)
    if len(values) != count:
        raise InvalidInput(f"tensor {name!r}: contents hold {len(values)} elements; shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = [bytes(v) for v in values]  # type: ignore[call-overload]
        return array.reshape(tuple(shape))
    try:
        return np.asarray(values, dtype=dtype).reshape(tuple(shape))
    except OverflowError:
        raise InvalidInput(f"tensor {name!r}: a value does not fit {datatype}") from None
