"""Filling pool files: parallel chunk reads into the pool, and the checks that make a file
visible.

A local-directory origin (``LocalSource``) is copied the way ``cp`` copies: each worker
thread reads a chunk block by block into a small buffer of its own (``mows._bounce``) that stays in
cache, CRCs the block there and ``pwrite``s it to the pool file; tmpfs allocates the pages in
the write path. Reading straight into the pool file's fresh shared mapping, as before, took a
page fault (and a page zeroing) per 4 KiB: 262K minor faults per GiB, 93% of the daemon's CPU
in the kernel, 76% in fault handling. Measured on this project's VMs (bench/local.py (a),
1 GiB in the page cache, 4 workers, cp in the same runs): 0.89-0.90 CPU-s/GiB that way, 0.59-0.60
through the buffer, cp 0.47-0.50. MADV_POPULATE_WRITE, ``fallocate``, ``sendfile``/``splice``
(one copy, then CRC via the mapping) measured no better than faulting; ``copy_file_range``
fails across filesystems. The CRC (and BLAKE3) covers exactly the bytes handed to ``pwrite``.
Other sources (HTTP, S3) fetch a chunk with one ``read_into`` (one request) straight into the
mapping. A file with a SHA-256 digest is hashed while it fills (``DigestFollower``), not in
a second pass after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Iterable, Sequence

from .._bounce import thread_buffer
from .._crc import combine_chunks, crc32
from .._digest import CrcAndDigest, crc_and_digest
from .._errors import CapacityError, IntegrityError
from ..manifest import Chunk, chunk_count
from ..pool import PoolFile
from ..sources import Source
from ..sources._local import LocalSource

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
    """A pool file being filled: its fd and writable mapping, released by ``close``. Chunks
    land through either (``write``, or a view of the mapping); the bytes are the same."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED) if size else None
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self._closed = False
        # Writers of one tmpfs file are serialized by its inode lock anyway; waiting here
        # sleeps, where the kernel's rwsem spins on its owner (up to 21% of the CPU): 4
        # workers filling one file measured 0.76 vs 0.91 and 0.75 vs 0.84 CPU-s/GiB alone,
        # 0.64 vs 0.66 in the daemon (at 1.51 vs 1.10 GiB/s).
        self._write_lock = threading.Lock()

    def chunk_view(self, chunk: Chunk) -> memoryview:
        return self.view[chunk.offset : chunk.offset + chunk.length]

    def write(self, offset: int, data: memoryview) -> None:
        """All of ``data`` into the file at ``offset`` (tmpfs allocates the pages here: no
        faults). A full pool filesystem is a ``CapacityError``, not a crash."""
        if self._closed:
            raise ValueError("write to a closed FileFill")
        done = 0
        try:
            with self._write_lock:
                while done < len(data):
                    with data[done:] as rest:
                        done += os.pwrite(self.fd, rest, offset + done)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise CapacityError(f"the pool's filesystem is full: {e.strerror}") from None
            raise

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
    """Read one chunk from the source into the pool file; return its CRC-32 and, if asked
    (a cluster node: peers will want it), its BLAKE3 digest, in the same pass."""
    if isinstance(source, LocalSource):
        return _copy_chunk(source, fill, chunk, digest)
    view = fill.chunk_view(chunk)
    try:
        source.read_into(chunk.path, chunk.offset, view)
        if digest:
            return crc_and_digest(view)
        return crc32(view), None
    finally:
        view.release()


def _copy_chunk(
    source: LocalSource, fill: FileFill, chunk: Chunk, digest: bool
) -> tuple[int, bytes | None]:
    """A local file's chunk through this worker's buffer: each block CRC'd (and hashed)
    while in cache, then written; the checks cover exactly the bytes written."""
    hasher = CrcAndDigest() if digest else None
    crc = 0

    def land(block: memoryview, at: int) -> None:
        nonlocal crc
        if hasher is not None:
            hasher.update(block)
        else:
            crc = crc32(block, crc)
        fill.write(chunk.offset + at, block)

    source.read_through(chunk.path, chunk.offset, chunk.length, thread_buffer(), land)
    if hasher is not None:
        return hasher.crc, hasher.digest()
    return crc, None


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
