"""Filling pool files from a source: parallel chunk reads straight into the shared mapping.

Each chunk is read with ``Source.read_into`` into the pool file's own mapping (no bounce
buffer) and CRC'd there by a worker thread; both release the GIL. The mapping is not
pre-populated: page faults then happen inside the parallel reads, which measured faster on
fresh memory than MAP_POPULATE's single-threaded zeroing.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

from .._crc import combine_chunks, crc32
from ..manifest import Chunk
from ..sources import Source

__all__ = ["FileFill", "crc_of_pool_file", "fetch_chunk"]


class FileFill:
    """A pool file being filled: its fd and writable mapping, released by ``close``."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED) if size else None
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def close(self) -> None:
        self.view.release()
        if self._map is not None:
            self._map.close()
        os.close(self.fd)


def fetch_chunk(source: Source, fill: FileFill, chunk: Chunk) -> int:
    """Read one chunk from the source into the pool mapping; return its CRC-32."""
    view = fill.view[chunk.offset : chunk.offset + chunk.length]
    try:
        source.read_into(chunk.path, chunk.offset, view)
        return crc32(view)
    finally:
        view.release()


def crc_of_pool_file(path: str, chunk_size: int, expected: Sequence[int]) -> bool:
    """Re-verify a pool file against its recorded chunk CRCs (used when adopting)."""
    size = os.path.getsize(path)
    if chunk_size <= 0 or len(expected) != -(-size // chunk_size):
        return False
    with open(path, "rb") as fh:
        if size == 0:
            return True
        with mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as m:
            view = memoryview(m)
            try:
                for i, want in enumerate(expected):
                    part = view[i * chunk_size : (i + 1) * chunk_size]
                    ok = crc32(part) == want
                    part.release()
                    if not ok:
                        return False
            finally:
                view.release()
    return True


def file_crc(chunk_crcs: Sequence[int], chunks: Sequence[Chunk]) -> int:
    return combine_chunks(zip(chunk_crcs, (c.length for c in chunks), strict=True))
