"""Filling pool files: parallel chunk reads straight into the shared mapping, and the checks
that make a file visible.

Each chunk is read with ``Source.read_into`` into the pool file's own mapping (no bounce
buffer) and CRC'd there by a worker thread; both release the GIL. The mapping is not
pre-populated: page faults then happen inside the parallel reads, which measured faster on
fresh memory than MAP_POPULATE's single-threaded zeroing. A file with a SHA-256 digest is
hashed while it fills (``DigestFollower``), not in a second pass after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import mmap
import os
from collections.abc import Iterable, Sequence

from .._crc import combine_chunks, crc32
from .._digest import crc_and_digest
from .._errors import IntegrityError
from ..manifest import Chunk, chunk_count
from ..pool import PoolFile
from ..sources import Source

__all__ = [
    "DigestFollower",
    "FileFill",
    "check_digest",
    "check_file",
    "fetch_chunk",
    "sha256_of_file",
    "verify_pool_file",
]

BLOCK = 1024 * 1024  # re-verification reads: CRC and SHA-256 of a block while it is in cache


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


def fetch_chunk(
    source: Source, fill: FileFill, chunk: Chunk, digest: bool = False
) -> tuple[int, bytes | None]:
    """Read one chunk from the source into the pool mapping; return its CRC-32 and, if asked
    (a cluster node: peers will want it), its BLAKE3 digest, in the same pass."""
    view = fill.chunk_view(chunk)
    try:
        source.read_into(chunk.path, chunk.offset, view)
        if digest:
            return crc_and_digest(view)
        return crc32(view), None
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


def check_digest(f: PoolFile, actual: str, source: str) -> None:
    """An ``IntegrityError`` if the file has a SHA-256 digest and ``actual`` is not it."""
    expected = f.entry.sha256
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{f.version.manifest.source}/{f.rel}", expected, actual, source=source
        )


class DigestFollower:
    """The SHA-256 of a pool file, computed while it fills: fed the contiguous prefix of
    landed chunks in order as it grows, in a worker thread (hashlib releases the GIL on big
    buffers). The file is hashed in the one pass of its fill, mostly hidden behind the reads,
    instead of a second pass over all its bytes after them.

    Each hash job stays in ``running`` unless it ended normally, so a failed fill that drains
    ``running`` never unmaps bytes a cancelled follower's hash is still reading.
    """

    def __init__(
        self,
        fill: FileFill,
        chunks: list[Chunk],
        landed: Iterable[int],
        executor: concurrent.futures.Executor,
        running: set[concurrent.futures.Future[int]],
    ) -> None:
        self._fill, self._chunks = fill, chunks
        self._landed = set(landed)  # prefetched chunks already in place count from the start
        self._executor, self._running = executor, running
        self._hash = hashlib.sha256()
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._follow())

    def landed(self, index: int) -> None:
        """Chunk ``index`` is in the mapping and passed its CRC."""
        self._landed.add(index)
        self._wake.set()

    async def digest(self) -> str:
        """The hex digest, once every chunk landed and was hashed."""
        return await self._task

    def cancel(self) -> None:
        self._task.cancel()

    async def wait(self) -> None:
        """Until the follower task has ended (after ``cancel``)."""
        await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> str:
        chunks, done = self._chunks, 0
        while done < len(chunks):
            if done not in self._landed:
                self._wake.clear()
                await self._wake.wait()
                continue
            end = done
            while end < len(chunks) and end in self._landed:
                end += 1
            lo, last = chunks[done].offset, chunks[end - 1]
            job = self._executor.submit(self._update, lo, last.offset + last.length)
            self._running.add(job)
            await asyncio.wrap_future(job)
            self._running.discard(job)  # (on the loop: drain iterates the set there)
            done = end
        return self._hash.hexdigest()

    def _update(self, lo: int, hi: int) -> int:
        part = self._fill.view[lo:hi]
        try:
            self._hash.update(part)
        finally:
            part.release()
        return hi - lo


def sha256_of_file(path: str) -> str:
    """One pass over a whole file (a prefetched file completed chunk by chunk, out of order)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify_pool_file(
    path: str, chunk_size: int, expected: Sequence[int], sha256: str | None = None
) -> bool:
    """Re-verify a pool file against its recorded chunk CRCs and, when the version has one,
    its SHA-256, in one read (used when adopting: valid CRCs prove nothing against a forger)."""
    size = os.path.getsize(path)
    if chunk_size <= 0 or len(expected) != chunk_count(size, chunk_size):
        return False
    digest = hashlib.sha256() if sha256 is not None else None
    with open(path, "rb") as fh:
        if size == 0:
            return digest is None or digest.hexdigest() == sha256
        with mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as m:
            view = memoryview(m)
            try:
                for i, want in enumerate(expected):
                    crc, end = 0, min((i + 1) * chunk_size, size)
                    for lo in range(i * chunk_size, end, BLOCK):
                        part = view[lo : min(lo + BLOCK, end)]
                        crc = crc32(part, crc)
                        if digest is not None:
                            digest.update(part)
                        part.release()
                    if crc != want:
                        return False
            finally:
                view.release()
    return digest is None or digest.hexdigest() == sha256
