"""Compact chunk sets for the etcd directory: a zlib-compressed bitmap, and CRC arrays."""

from __future__ import annotations

import array
import sys
import zlib
from collections.abc import Iterable

from .._errors import ProtocolError

__all__ = ["decode_bitmap", "decode_crcs", "encode_bitmap", "encode_crcs"]

MAX_CHUNKS = 1 << 24  # 16M chunks: 1 PiB at 64 MiB; anything larger is a corrupt record


def encode_bitmap(held: Iterable[int], n: int) -> bytes:
    bits = bytearray((n + 7) // 8)
    for i in held:
        bits[i >> 3] |= 1 << (i & 7)
    return zlib.compress(bytes(bits), 1)


def decode_bitmap(data: bytes, n: int) -> set[int]:
    if not 0 <= n <= MAX_CHUNKS:
        raise ProtocolError(f"bitmap of {n} chunks is out of range")
    bits = _inflate(data, (n + 7) // 8, "chunk bitmap")
    if len(bits) != (n + 7) // 8:
        raise ProtocolError(f"chunk bitmap has {len(bits)} bytes, expected {(n + 7) // 8}")
    return {i for i in range(n) if bits[i >> 3] >> (i & 7) & 1}


def encode_crcs(crcs: dict[int, int], n: int) -> bytes:
    arr = array.array("I", [0]) * n
    for i, c in crcs.items():
        arr[i] = c
    if sys.byteorder != "little":
        arr.byteswap()
    return zlib.compress(arr.tobytes(), 1)


def decode_crcs(data: bytes, n: int) -> list[int]:
    if not 0 <= n <= MAX_CHUNKS:
        raise ProtocolError(f"CRC array of {n} chunks is out of range")
    raw = _inflate(data, 4 * n, "CRC array")
    if len(raw) != 4 * n:
        raise ProtocolError(f"CRC array has {len(raw)} bytes, expected {4 * n}")
    arr = array.array("I")
    arr.frombytes(raw)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tolist()


def _inflate(data: bytes, limit: int, what: str) -> bytes:
    """Decompress at most ``limit + 1`` bytes: a bomb cannot make us allocate more."""
    d = zlib.decompressobj()
    try:
        return d.decompress(data, limit + 1)
    except zlib.error as e:
        raise ProtocolError(f"corrupt {what}: {e}") from None
