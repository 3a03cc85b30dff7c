"""The table of chunks this node can serve to peers (read by peer-server threads).

Chunks of files still filling are served as soon as they are checked, which is what lets a
cold cluster pipeline: a chunk is forwarded while the origin still sends the next ones.

Each served chunk goes with its BLAKE3 digest. A chunk that came from a peer has it already
(the receiver checked it), and so does one a cluster node read from the origin (computed in
the reading worker). Others (adopted after a restart, filled before joining) get it the first
time a peer asks, from the pool's bytes, re-checked against the chunk's CRC in the same pass:
a page that rotted in memory is withheld, not vouched for.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .._digest import crc_and_digest
from ..transport import ServedChunk

log = logging.getLogger("mows.daemon")

__all__ = ["ChunkTable"]


@dataclass
class _Chunk:
    offset: int
    length: int
    crc: int
    digest: bytes | None  # None until a peer first asks (origin fills)


@dataclass
class _Entry:
    fd: int  # our own descriptor of the pool file; survives the partial -> final rename
    chunks: dict[int, _Chunk] = field(default_factory=dict)


class ChunkTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[tuple[str, str], _Entry] = {}
        self.bytes_served = 0
        self.served_to: dict[str, int] = {}
        self.rotten = 0  # chunks withheld because their bytes no longer match their CRC
        # Called (from a server thread) with (version id, path) of a file with a rotten chunk.
        self.on_rotten: Callable[[str, str], None] | None = None

    def add_file(self, model: str, path: str, fd: int) -> None:
        """Start serving a pool file; takes a duplicate of ``fd``."""
        dup = os.dup(fd)
        with self._lock:
            old = self._files.pop((model, path), None)
            self._files[(model, path)] = _Entry(dup)
        if old is not None:
            os.close(old.fd)

    def add_chunk(
        self,
        model: str,
        path: str,
        index: int,
        offset: int,
        length: int,
        crc: int,
        digest: bytes | None = None,
    ) -> None:
        with self._lock:
            entry = self._files.get((model, path))
            if entry is not None:
                entry.chunks[index] = _Chunk(offset, length, crc, digest)

    def remove_file(self, model: str, path: str) -> None:
        with self._lock:
            entry = self._files.pop((model, path), None)
        if entry is not None:
            os.close(entry.fd)

    def has_file(self, model: str, path: str) -> bool:
        with self._lock:
            return (model, path) in self._files

    def open_chunk(self, model: str, path: str, index: int) -> ServedChunk | None:
        with self._lock:
            entry = self._files.get((model, path))
            if entry is None or index not in entry.chunks:
                return None
            c = entry.chunks[index]
            fd = os.dup(entry.fd)
        if c.digest is None:  # outside the lock: hashing a chunk takes milliseconds
            try:
                c.digest = _digest_checked(fd, c)
            except BaseException:
                os.close(fd)
                raise
            if c.digest is None:
                os.close(fd)
                with self._lock:
                    self.rotten += 1
                    e = self._files.get((model, path))
                    if e is not None and e.chunks.get(index) is c:
                        del e.chunks[index]
                log.error("%s chunk %d no longer matches its CRC: withheld", path, index)
                if self.on_rotten is not None:
                    self.on_rotten(model, path)
                return None
        return ServedChunk(fd, c.offset, c.length, c.crc, c.digest)

    def served(self, peer: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_served += nbytes
            self.served_to[peer] = self.served_to.get(peer, 0) + nbytes

    def close(self) -> None:
        with self._lock:
            entries = list(self._files.values())
            self._files.clear()
        for e in entries:
            os.close(e.fd)


def _digest_checked(fd: int, c: _Chunk) -> bytes | None:
    """The chunk's digest from the pool bytes, or None if they fail the chunk's CRC."""
    start = c.offset - c.offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, c.offset + c.length - start, prot=mmap.PROT_READ, offset=start) as m:
        view = memoryview(m)[c.offset - start :]
        try:
            crc, digest = crc_and_digest(view)
            return digest if crc == c.crc else None
        finally:
            view.release()
