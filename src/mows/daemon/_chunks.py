"""The table of chunks this node can serve to peers (read by peer-server threads).

Chunks of files still filling are served as soon as they are checked, which is what lets a
cold cluster pipeline: a chunk is forwarded while the origin still sends the next ones.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from ..transport import ServedChunk

__all__ = ["ChunkTable"]


@dataclass
class _Entry:
    fd: int  # our own descriptor of the pool file; survives the partial -> final rename
    chunks: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # i -> off, len, crc


class ChunkTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[tuple[str, str], _Entry] = {}
        self.bytes_served = 0
        self.served_to: dict[str, int] = {}

    def add_file(self, model: str, path: str, fd: int) -> None:
        """Start serving a pool file; takes a duplicate of ``fd``."""
        dup = os.dup(fd)
        with self._lock:
            old = self._files.pop((model, path), None)
            self._files[(model, path)] = _Entry(dup)
        if old is not None:
            os.close(old.fd)

    def add_chunk(
        self, model: str, path: str, index: int, offset: int, length: int, crc: int
    ) -> None:
        with self._lock:
            entry = self._files.get((model, path))
            if entry is not None:
                entry.chunks[index] = (offset, length, crc)

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
            offset, length, crc = entry.chunks[index]
            return ServedChunk(os.dup(entry.fd), offset, length, crc)

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
