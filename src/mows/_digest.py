"""The chunk digest peers prove their bytes with: BLAKE3 (256 bits).

A cryptographic digest, unlike CRC-32, cannot be kept while bytes are changed. BLAKE3 is the
cheapest such hash here (about 0.25 CPU-s/GiB against SHA-256's 0.8 on this project's
machines) and its binding releases the GIL, so chunk checks run in parallel threads.
"""

from __future__ import annotations

import blake3

from ._crc import crc32

__all__ = ["DIGEST_BYTES", "CrcAndDigest", "chunk_digest", "crc_and_digest"]

DIGEST_BYTES = 32
_SLICE = 256 * 2**10  # both hashes read each slice while it is in cache: one pass, not two


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def crc_and_digest(data: memoryview) -> tuple[int, bytes]:
    """CRC-32 and BLAKE3 of ``data`` in one pass over memory (measured 0.25 CPU-s/GiB
    against 0.33 for the two in turn, 64 MiB chunks)."""
    h, crc = blake3.blake3(), 0
    for at in range(0, len(data), _SLICE):
        with data[at : at + _SLICE] as part:
            crc = crc32(part, crc)
            h.update(part)
    return crc, h.digest()


class CrcAndDigest:
    """``crc_and_digest`` of a chunk fed in parts, in order (each part hashed by both while
    it is in cache: an origin fill's blocks)."""

    def __init__(self) -> None:
        self.crc = 0
        self._hash = blake3.blake3()

    def update(self, part: memoryview) -> None:
        self.crc = crc32(part, self.crc)
        self._hash.update(part)

    def digest(self) -> bytes:
        return self._hash.digest()
