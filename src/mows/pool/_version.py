"""A model version: immutable content, the pool files that hold it, and who holds them.

A version is identified by its content (``manifest.version_id``). Its files live under
``<pool>/<version id>/``, so a pool path never changes content: a client that mapped a path
keeps reading the version it opened whatever happens at the origin. A version with no
location pointing at it any more (its origin moved on) is *superseded*: still readable while
held, evicted first once released, forgotten once empty.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum

import msgspec

from ..manifest import Chunk, FileEntry, Manifest, SafetensorsIndex, chunk_count

__all__ = ["FileState", "PoolFile", "Version", "pages"]

PAGE = os.sysconf("SC_PAGE_SIZE")
PARTIAL_SUFFIX = ".partial"


def pages(size: int) -> int:
    """``size`` rounded up to whole pages: what a file costs in shared memory."""
    return -(-size // PAGE) * PAGE


class FileState(Enum):
    PARTIAL = "partial"  # some chunks, prefetched: served to peers, never to clients
    FILLING = "filling"  # reserved whole, chunks arriving for a load
    READY = "ready"  # every chunk checked, the whole file equal to its crc32.txt entry and digest


@dataclass(eq=False)
class PoolFile:
    """One file of one version in the pool. Identity, not value, is what matters here."""

    version: Version
    entry: FileEntry
    state: FileState
    chunk_crcs: dict[int, int] = field(default_factory=dict)  # chunks held -> CRC-32
    crc32: int = 0  # of the whole file, once READY
    held_bytes: int = 0  # PARTIAL: pages reserved for the chunks held or being written
    pins: int = 0  # opens that hold the file for a client (whole-model opens)
    transient_pins: int = 0  # holds that end by themselves (loads, streaming, prefetch)
    last_used: float = 0.0
    filled_bytes: int = 0  # progress of a fill
    rotten: bool = False  # its bytes went bad in memory: dropped once nobody holds it

    @property
    def rel(self) -> str:
        return self.entry.path

    @property
    def size(self) -> int:
        return self.entry.size

    @property
    def path(self) -> str:
        return os.path.join(self.version.dir, self.rel)

    @property
    def partial_path(self) -> str:
        return self.path + PARTIAL_SUFFIX

    @property
    def reserved(self) -> int:
        return self.held_bytes if self.state is FileState.PARTIAL else pages(self.size)

    @property
    def locked(self) -> bool:
        return self.state is FileState.FILLING or self.pins > 0 or self.transient_pins > 0

    def chunks(self) -> list[Chunk]:
        return self.version.chunks(self.rel)


class Version:
    """One immutable model version: its manifest, tensor index, pool files and holders."""

    def __init__(self, manifest: Manifest, vid: str, root: str) -> None:
        self.id = vid
        self.manifest = manifest
        self.dir = os.path.join(root, vid)
        self.files: dict[str, PoolFile] = {}
        self.index: dict[str, SafetensorsIndex] = {}  # parsed from verified pool bytes
        self.locations: set[str] = set()  # origins whose current content this is
        self.users = 0  # connections that opened it (a stream keeps reading it)
        self._entries = {f.path: f for f in manifest.files}
        self._bases: dict[str, int] = {}
        self._indexes = {f.path: i for i, f in enumerate(manifest.files)}
        n = 0
        for f in manifest.files:
            self._bases[f.path] = n
            n += chunk_count(f.size, manifest.chunk_size)
        self.total_chunks = n

    @property
    def superseded(self) -> bool:
        return not self.locations

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    def entry(self, rel: str) -> FileEntry:
        return self._entries[rel]

    def has(self, rel: str) -> bool:
        return rel in self._entries

    def chunks(self, rel: str) -> list[Chunk]:
        return self.manifest.chunks(rel)

    def file_index(self, rel: str) -> int:
        """The file's position in the manifest: how the cluster directory names it."""
        return self._indexes[rel]

    def chunk_range(self, rel: str) -> range:
        """The file's chunks in the version-wide numbering the cluster directory uses."""
        base = self._bases[rel]
        return range(base, base + chunk_count(self._entries[rel].size, self.manifest.chunk_size))

    def ready(self, rel: str) -> PoolFile | None:
        pf = self.files.get(rel)
        return pf if pf is not None and pf.state is FileState.READY else None

    def cached_bytes(self) -> int:
        return sum(pf.size for pf in self.files.values() if pf.state is FileState.READY)

    def reserved_bytes(self) -> int:
        return sum(pf.reserved for pf in self.files.values())

    def client_manifest(self, rels: list[str]) -> Manifest:
        """The manifest a client gets: tensor indexes (from the pool's verified bytes) for
        the files it asked for."""
        wanted = set(rels)
        files = tuple(
            msgspec.structs.replace(f, safetensors=self.index.get(f.path))
            if f.path in wanted
            else f
            for f in self.manifest.files
        )
        return msgspec.structs.replace(self.manifest, files=files)

    def __repr__(self) -> str:
        return f"Version({self.id}, {self.manifest.source!r})"
