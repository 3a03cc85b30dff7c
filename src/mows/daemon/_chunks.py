"""The table of chunks this node can serve to peers (read by peer-server threads).

Chunks of files still filling are served as soon as they are checked, which is what lets a
cold cluster pipeline: a chunk is forwarded while the origin still sends the next ones.

Each served chunk goes with its BLAKE3 digest. A chunk that came from a peer has it already
(the receiver checked it), and so does one a cluster node read from the origin (computed in
the reading worker). Others (adopted after a restart, filled before joining) get it the first
time a peer asks, from the pool's bytes, re-checked against the chunk's CRC in the same pass:
a page that rotted in memory is withheld, not vouched for.

Peers waiting for chunks we own and are still reading from the origin watch us (``watch``):
each version has a log of the chunks this node read from the origin (its first copies),
and a watch is answered with the entries past the watcher's position as soon as there are
any. One watch per (peer, version) replaces a waiting request per chunk, so a peer's
transfer threads only ever carry chunks that are here. A file that goes is cut from its
version's log under a new epoch: watchers then read the log again from its start.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .._digest import crc_and_digest
from ..transport import ServedChunk
from ..transport._wire import Landed

log = logging.getLogger("mows.daemon")

__all__ = ["ChunkTable"]

MAX_WAIT = 30.0  # seconds a peer's watch may be held
LANDED_BYTES = 256 << 10  # a watch answer's entries, about: well inside a peer frame


@dataclass
class _Chunk:
    offset: int
    length: int
    crc: int
    digest: bytes | None  # None until a peer first asks (origin fills)


@dataclass
class _Log:
    """A version's first copies here (and chunks this node came to own after it got them
    from a peer), in landing order; a new epoch when entries go."""

    epoch: int = field(default_factory=lambda: random.getrandbits(62))
    entries: list[tuple[str, int]] = field(default_factory=list)
    logged: set[tuple[str, int]] = field(default_factory=set)

    def add(self, path: str, index: int) -> bool:
        if (path, index) in self.logged:
            return False
        self.logged.add((path, index))
        self.entries.append((path, index))
        return True


@dataclass
class _Entry:
    fd: int  # our own descriptor of the pool file; survives the partial -> final rename
    chunks: dict[int, _Chunk] = field(default_factory=dict)
    sending: int = 0  # sends in flight, each on a descriptor of its own (see ``withdraw``)
    draining: bool = False  # to be evicted: no new send starts (see ``drain``)


class ChunkTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[tuple[str, str], _Entry] = {}
        self._logs: dict[str, _Log] = {}  # model -> its first copies here
        self._landed = threading.Condition(self._lock)  # a log grew or changed epoch
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
        *,
        first_copy: bool = False,
    ) -> None:
        """Serve a checked chunk; ``first_copy``: read from the origin here (watchers are
        told of it)."""
        with self._lock:
            entry = self._files.get((model, path))
            if entry is not None:
                entry.chunks[index] = _Chunk(offset, length, crc, digest)
                if first_copy and self._logs.setdefault(model, _Log()).add(path, index):
                    self._landed.notify_all()

    def held_chunks(self, model: str) -> list[tuple[str, int]]:
        """(path, index) of every chunk of the version served here now."""
        with self._lock:
            return [(p, i) for (m, p), e in self._files.items() if m == model for i in e.chunks]

    def announce(self, model: str, chunks: list[tuple[str, int]]) -> None:
        """Tell watchers of these held chunks, as if first copies: this node came to own
        them (a dead owner's) after a peer sent them, and peers now wait on it for them."""
        with self._lock:
            grew = False
            for path, index in chunks:
                entry = self._files.get((model, path))
                if entry is not None and index in entry.chunks:
                    grew = self._logs.setdefault(model, _Log()).add(path, index) or grew
            if grew:
                self._landed.notify_all()

    def remove_file(self, model: str, path: str) -> None:
        with self._lock:
            entry = self._files.pop((model, path), None)
            log_ = self._logs.get(model)
            if log_ is not None:
                kept = [e for e in log_.entries if e[0] != path]
                if not any(m == model for m, _ in self._files):
                    del self._logs[model]  # nothing of the version left here
                elif len(kept) < len(log_.entries):  # a new epoch: read it again
                    self._logs[model] = _Log(entries=kept, logged=set(kept))
                self._landed.notify_all()
        if entry is not None:
            os.close(entry.fd)

    def withdraw(self, model: str, path: str) -> bool:
        """Stop serving a file about to be evicted, unless a send from it is in flight (then
        False: it stays served, and is not to be evicted now). In one step under the lock, so
        no send starts after a True: a send's descriptor would keep the unlinked file's pages,
        which the pool no longer counts, until the peer read the whole chunk."""
        with self._lock:
            entry = self._files.get((model, path))
            if entry is None:
                return True
            if entry.sending:
                return False
            del self._files[(model, path)]
        os.close(entry.fd)
        return True  # (its log entries go with ``remove_file``, which the eviction calls)

    def drain(self, model: str, path: str) -> None:
        """A file chosen for eviction while being sent: no new send of it starts (a peer
        asking is told it is not held), so the sends in flight end and it can go."""
        with self._lock:
            entry = self._files.get((model, path))
            if entry is not None:
                entry.draining = True

    def sending(self, model: str, path: str) -> bool:
        """Is a peer being sent a chunk of this file now?"""
        with self._lock:
            entry = self._files.get((model, path))
            return entry is not None and entry.sending > 0

    def _sent(self, entry: _Entry) -> None:
        with self._lock:
            entry.sending -= 1

    def has_file(self, model: str, path: str) -> bool:
        with self._lock:
            return (model, path) in self._files

    def open_chunk(self, model: str, path: str, index: int) -> ServedChunk | None:
        with self._lock:
            entry = self._files.get((model, path))
            if entry is None or entry.draining or index not in entry.chunks:
                return None
            c = entry.chunks[index]
            fd = os.dup(entry.fd)
            entry.sending += 1  # until the server closes the chunk (or we do, below)
        done = functools.partial(self._sent, entry)
        if c.digest is None:  # outside the lock: hashing a chunk takes milliseconds
            try:
                c.digest = _digest_checked(fd, c)
            except BaseException:
                os.close(fd)
                done()
                raise
            if c.digest is None:
                os.close(fd)
                done()
                with self._lock:
                    self.rotten += 1
                    e = self._files.get((model, path))
                    if e is not None and e.chunks.get(index) is c:
                        del e.chunks[index]
                log.error("%s chunk %d no longer matches its CRC: withheld", path, index)
                if self.on_rotten is not None:
                    self.on_rotten(model, path)
                return None
        return ServedChunk(fd, c.offset, c.length, c.crc, c.digest, done)

    def watch(self, model: str, epoch: int, since: int, wait: float) -> Landed:
        """The version's first copies past ``since`` (all of them if ``epoch`` is not the
        log's), as soon as there are any, waiting at most ``wait`` (<= MAX_WAIT) seconds."""
        wait = wait if 0.0 < wait <= MAX_WAIT else MAX_WAIT if wait > MAX_WAIT else 0.0  # NaN: 0
        deadline = time.monotonic() + wait
        with self._landed:
            while True:
                log_ = self._logs.get(model)
                if log_ is not None:
                    start = since if epoch == log_.epoch and since >= 0 else 0
                    if start < len(log_.entries):
                        return _answer(log_, start)
                left = deadline - time.monotonic()
                if left <= 0:
                    if log_ is None:
                        return Landed(0, 0, {})
                    return Landed(log_.epoch, min(max(since, 0), len(log_.entries)), {})
                self._landed.wait(left)

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


def _answer(log_: _Log, start: int) -> Landed:
    """Entries from ``start``, grouped by path, about LANDED_BYTES at most."""
    chunks: dict[str, list[int]] = {}
    size, end = 0, start
    for path, index in log_.entries[start : start + LANDED_BYTES // 9]:
        if size > LANDED_BYTES:
            break
        got = chunks.get(path)
        if got is None:
            size += len(path) + 8
            got = chunks[path] = []
        got.append(index)
        size += 9
        end += 1
    return Landed(log_.epoch, end, chunks)


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
