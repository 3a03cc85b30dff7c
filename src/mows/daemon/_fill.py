"""Filling pool files: parallel chunk reads straight into the shared mapping, and the one
check that makes a file visible.

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
from .._errors import IntegrityError
from ..manifest import Chunk, chunk_count
from ..pool import PoolFile
from ..sources import Source

__all__ = ["FileFill", "check_file", "crc_of_pool_file", "fetch_chunk"]


class FileFill:
    """A pool file being filled: its fd and writable mapping, released by ``close``."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED) if size else None
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self._closed = False

    def chunk_view(self, chunk: Chunk) -> memoryview:
        return self.view[chunk.offset : chunk.offset + chunk.length]

    def forget(self, chunk: Chunk) -> None:
        """Give a chunk's pages back to the system (a failed write into a sparse partial
        file must not keep memory the pool no longer counts)."""
        if self._map is not None and not self._closed:
            self._map.madvise(mmap.MADV_REMOVE, chunk.offset, chunk.length)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.view.release()
        if self._map is not None:
            self._map.close()
        os.close(self.fd)


def fetch_chunk(source: Source, fill: FileFill, chunk: Chunk) -> int:
    """Read one chunk from the source into the pool mapping; return its CRC-32."""
    view = fill.chunk_view(chunk)
    try:
        source.read_into(chunk.path, chunk.offset, view)
        return crc32(view)
    finally:
        view.release()


def check_file(f: PoolFile, chunk_crcs: dict[int, int], source: str) -> int:
    """The whole file's CRC-32, combined from its chunks' (nothing is read twice); an
    ``IntegrityError`` if it is not the crc32.txt value."""
    chunks = f.chunks()
    actual = combine_chunks((chunk_crcs[c.index], c.length) for c in chunks)
    expected = f.entry.crc32
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{f.version.manifest.source}/{f.rel}", expected, actual, source=source
        )
    return actual


def crc_of_pool_file(path: str, chunk_size: int, expected: Sequence[int]) -> bool:
    """Re-verify a pool file against its recorded chunk CRCs (used when adopting)."""
    size = os.path.getsize(path)
    if chunk_size <= 0 or len(expected) != chunk_count(size, chunk_size):
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
