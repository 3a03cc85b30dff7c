"""Defensive parser of safetensors headers (untrusted bytes).

A safetensors file is ``u64 little-endian N`` + ``N bytes of JSON`` + data. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data
section, plus an optional ``__metadata__`` of strings. Everything is checked before use: the
header length is bounded, dtypes are known, ``prod(shape) * itemsize == end - begin``, offsets
lie inside the file and tensors do not overlap. Any flaw is one ``HeaderError`` naming the file.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Callable

import msgspec

from .._errors import HeaderError

__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "SafetensorsIndex",
    "TensorInfo",
    "parse_safetensors_header",
    "read_safetensors_index",
]

# safetensors itself refuses headers above 100 MB.
MAX_HEADER_BYTES = 100 * 1000 * 1000

# Item sizes in bytes of the dtypes the format defines (sub-byte types are not supported).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


class TensorInfo(msgspec.Struct, frozen=True):
    """One tensor: ``start``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsIndex(msgspec.Struct, frozen=True):
    """The parsed header of one safetensors file."""

    data_start: int
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]


def parse_safetensors_header(
    head: bytes | memoryview, file_size: int, path: str
) -> SafetensorsIndex:
    """Parse the header from ``head`` (the file's first bytes, at least 8 + N of them)."""
    if file_size < 8 or len(head) < 8:
        raise HeaderError(path, f"file of {file_size} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", bytes(head[:8]))
    if n > MAX_HEADER_BYTES:
        raise HeaderError(path, f"header length {n} exceeds the {MAX_HEADER_BYTES} byte limit")
    data_start = 8 + n
    if data_start > file_size:
        raise HeaderError(path, f"header length {n} runs past the end of the {file_size} byte file")
    if len(head) < data_start:
        raise HeaderError(path, f"only {len(head)} of {data_start} header bytes given")
    try:
        doc = json.loads(bytes(head[8:data_start]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HeaderError(path, f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(doc, dict):
        raise HeaderError(path, "header is not a JSON object")

    metadata: dict[str, str] = {}
    raw_meta = doc.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
        ):
            raise HeaderError(path, "__metadata__ must map strings to strings")
        metadata = raw_meta

    data_size = file_size - data_start
    tensors = [_tensor(name, spec, data_start, data_size, path) for name, spec in doc.items()]
    tensors.sort(key=lambda t: (t.start, t.end))
    for prev, cur in itertools.pairwise(tensors):
        if cur.start < prev.end:
            raise HeaderError(path, f"tensors {prev.name!r} and {cur.name!r} overlap")
    return SafetensorsIndex(data_start=data_start, metadata=metadata, tensors=tuple(tensors))


def _tensor(name: str, spec: object, data_start: int, data_size: int, path: str) -> TensorInfo:
    if not isinstance(spec, dict):
        raise HeaderError(path, f"tensor {name!r}: entry is not an object")
    dtype = spec.get("dtype")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise HeaderError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise HeaderError(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise HeaderError(path, f"tensor {name!r}: data_offsets must be [begin, end], begin <= end")
    begin, end = offsets
    if end > data_size:
        raise HeaderError(
            path, f"tensor {name!r}: data_offsets end {end} is past the data section ({data_size})"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if expected != end - begin:
        raise HeaderError(
            path,
            f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, "
            f"data_offsets give {end - begin}",
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors_index(
    read: Callable[[int, int], bytes], file_size: int, path: str
) -> SafetensorsIndex:
    """Read and parse a header with ``read(offset, length)``: two small reads, never the data."""
    if file_size < 8:
        raise HeaderError(path, f"file of {file_size} bytes is too short for a safetensors header")
    prefix = read(0, 8)
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        return parse_safetensors_header(prefix, file_size, path)  # raises the precise error
    return parse_safetensors_header(prefix + read(8, n), file_size, path)
