"""Forging CRC-32: changes to a file's bytes that keep its CRC-32 (what an attacker can do).

CRC-32 is affine over GF(2): ``crc(m ^ d) = crc(m) ^ crc(d) ^ crc(0)`` for messages of one
length, so XORing a delta ``d`` changes the CRC by ``crc(d) ^ crc(0)``, whatever ``m`` is. The
effects of the 40 single-bit deltas in 5 bytes at one offset are 40 vectors in a 32-dimensional
space: some nonzero combination of them is zero, and XORing those bits leaves the CRC as it was.
"""

from __future__ import annotations

import zlib

__all__ = ["crc_preserving_delta"]

WIDTH = 5  # bytes: 40 bits, more than CRC-32's 32, so a dependent set always exists


def crc_preserving_delta(length: int, offset: int) -> bytes:
    """5 nonzero bytes to XOR at ``offset`` of any ``length``-byte message, keeping its CRC-32."""
    if not 0 <= offset <= length - WIDTH:
        raise ValueError(f"offset {offset} leaves no {WIDTH} bytes in a {length}-byte message")
    # The effect depends only on the bytes after the delta (the ones before are the same in
    # both messages), so the messages here are just the delta and that zero tail.
    tail = bytes(length - offset - WIDTH)
    zero = zlib.crc32(tail, zlib.crc32(bytes(WIDTH)))
    basis: dict[int, tuple[int, int]] = {}  # leading bit -> (effect, bits combined into it)
    for bit in range(8 * WIDTH):
        delta = (1 << bit).to_bytes(WIDTH, "little")
        effect, combo = zlib.crc32(tail, zlib.crc32(delta)) ^ zero, 1 << bit
        while effect:  # Gaussian elimination: reduce by the basis until new or zero
            top = effect.bit_length() - 1
            if top not in basis:
                basis[top] = (effect, combo)
                break
            effect ^= basis[top][0]
            combo ^= basis[top][1]
        else:
            return combo.to_bytes(WIDTH, "little")
    raise AssertionError("unreachable: 40 vectors in 32 dimensions are dependent")


def xor_at(data: bytes, offset: int, delta: bytes) -> bytes:
    """``data`` with ``delta`` XORed in at ``offset``."""
    out = bytearray(data)
    for i, b in enumerate(delta):
        out[offset + i] ^= b
    return bytes(out)
