"""The table of chunks this node can serve to peers (read by peer-server threads).

Chunks of files still filling are served as soon as they are checked, which is what lets a
cold cluster pipeline: a chunk is forwarded while the origin still sends the next ones.

Each served chunk goes with its BLAKE3 digest. A chunk that came from a peer has it already
(the receiver checked it), and so does one a cluster node read from the origin (computed in
the reading worker). Others (adopted after a restart, filled before joining) get it the first
time a peer asks, from the pool's bytes, re-checked against the chunk's CRC in the same pass:
a page that rotted in memory is withheld, not vouched for.

A request may wait for a chunk not held yet (we own it and are loading it: peers ask us, not
etcd, whether it has landed): each waiter has an event of its own, set when that chunk is
added or its file goes, so one arrival wakes only the requests for it.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .._digest import crc_and_digest
from ..transport import ServedChunk

log = logging.getLogger("mows.daemon")

__all__ = ["ChunkTable"]

MAX_WAIT = 30.0  # seconds a peer's request may wait for a chunk to land


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
        # (model, path) -> chunk index -> the events of the requests waiting for it
        self._waiting: dict[tuple[str, str], dict[int, list[threading.Event]]] = {}
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
                for event in self._waiting.get((model, path), {}).pop(index, []):
                    event.set()

    def remove_file(self, model: str, path: str) -> None:
        with self._lock:
            entry = self._files.pop((model, path), None)
            for events in self._waiting.pop((model, path), {}).values():
                for event in events:
                    event.set()  # gone: "not held" at once
        if entry is not None:
            os.close(entry.fd)

    def has_file(self, model: str, path: str) -> bool:
        with self._lock:
            return (model, path) in self._files

    def open_chunk(
        self, model: str, path: str, index: int, wait: float = 0.0
    ) -> ServedChunk | None:
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
        while True:
            with self._lock:
                entry = self._files.get((model, path))
                if entry is not None and index in entry.chunks:
                    c = entry.chunks[index]
                    fd = os.dup(entry.fd)
                    break
                left = deadline - time.monotonic()
                if left <= 0 or (entry is None and wait <= 0):
                    return None
                event = threading.Event()
                waiters = self._waiting.setdefault((model, path), {}).setdefault(index, [])
                waiters.append(event)
            if not event.wait(left):
                with self._lock:
                    waiters = self._waiting.get((model, path), {}).get(index, [])
                    if event in waiters:
                        waiters.remove(event)
                        if not waiters:
                            self._waiting[(model, path)].pop(index, None)
                        if not self._waiting[(model, path)]:
                            del self._waiting[(model, path)]
                return None
            with self._lock:
                if (model, path) not in self._files:
                    return None  # the file went (a failed fill)
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

    def have(self, model: str, path: str) -> bytes:
        with self._lock:
            entry = self._files.get((model, path))
            held = list(entry.chunks) if entry is not None else []
        bits = bytearray((max(held) // 8 + 1) if held else 0)
        for i in held:
            bits[i >> 3] |= 1 << (i & 7)
        return bytes(bits)

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
