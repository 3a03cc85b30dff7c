"""A model's manifest: its files, their chunk plan, expected CRCs and tensor indexes."""

from __future__ import annotations

import hashlib
from typing import Protocol

import msgspec

from .._errors import Crc32FileError
from ._crcfile import check_relative_path, parse_crc32
from ._safetensors import SafetensorsIndex, read_safetensors_index

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "Chunk",
    "FileEntry",
    "FileStat",
    "Manifest",
    "ManifestSource",
    "build_manifest",
    "chunk_count",
    "chunk_plan",
    "version_id",
]

DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024


class FileStat(msgspec.Struct, frozen=True):
    """A regular file of a model: ``path`` is relative, POSIX-style."""

    path: str
    size: int
    mtime_ns: int
    etag: str = ""  # the object store's ETag, where there is one (S3)


class Chunk(msgspec.Struct, frozen=True):
    """A fixed byte range of one file, the unit of fetching and checking."""

    path: str
    index: int
    offset: int
    length: int


class FileEntry(msgspec.Struct, frozen=True):
    path: str
    size: int
    mtime_ns: int
    crc32: int | None = None  # from the crc32 file, when it lists this file
    safetensors: SafetensorsIndex | None = None
    etag: str = ""  # last, with a default: manifests written before it still decode


class Manifest(msgspec.Struct, frozen=True):
    """Everything needed to fetch, check and index a model; sent as-is to clients."""

    source: str
    chunk_size: int
    files: tuple[FileEntry, ...]
    crc32_file: str | None = None  # relative path of the crc32 file used, if any
    unlisted: tuple[str, ...] = ()  # files the crc32 file does not list

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def chunks(self, path: str) -> list[Chunk]:
        return chunk_plan(self.file(path), self.chunk_size)


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a file of ``size`` bytes has (the last may be short)."""
    return -(-size // chunk_size)


def version_id(manifest: Manifest) -> str:
    """A model version's identity: what its bytes are, never where or when they were read.

    Names, sizes, crc32.txt values and the chunk plan; no timestamps, so identical content at
    two locations is one version. A file the crc32 file does not list has no content identity:
    its ETag (an object store's, which changes with every rewrite) or else its modification
    time stands in for one, so that an update of it is still a new version.
    """
    h = hashlib.sha256(f"mows-version-1\0{manifest.chunk_size}".encode())
    for f in manifest.files:
        if f.crc32 is not None:
            content = f"{f.crc32:08x}"
        else:
            content = f"etag:{f.etag}" if f.etag else f"mtime:{f.mtime_ns}"
        h.update(f"\0{f.path}\0{f.size}\0{content}".encode())
    return h.hexdigest()[:24]


def chunk_plan(entry: FileStat | FileEntry, chunk_size: int) -> list[Chunk]:
    """Fixed-size byte ranges covering the file; the last may be shorter; none if empty."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return [
        Chunk(entry.path, i, off, min(chunk_size, entry.size - off))
        for i, off in enumerate(range(0, entry.size, chunk_size))
    ]


class ManifestSource(Protocol):
    """What building a manifest needs from origin storage (see ``mows.sources.Source``)."""

    @property
    def url(self) -> str: ...

    def list_files(self) -> list[FileStat]: ...

    def read_range(self, path: str, offset: int, length: int) -> bytes: ...


def build_manifest(
    source: ManifestSource,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    crc32_file: str | None = "crc32.txt",
    require_crc32_file: bool = False,
    index_tensors: bool = True,
    crc32_data: bytes | None = None,
) -> Manifest:
    """Describe the model at ``source``.

    ``crc32_file`` is relative to the model root; a missing file is fine unless
    ``require_crc32_file``. Entries naming files that do not exist are an error.
    """
    stats = sorted(source.list_files(), key=lambda s: s.path)
    crcs: dict[str, int] = {}
    crc_rel: str | None = None
    if crc32_file:
        crc_rel = check_relative_path(crc32_file, crc32_file)
        crc_stat = next((s for s in stats if s.path == crc_rel), None)
        if crc_stat is None:
            if require_crc32_file:
                raise Crc32FileError(f"{source.url}/{crc_rel}", "crc32 file not found")
            crc_rel = None
        else:
            where = f"{source.url}/{crc_rel}"
            if crc_stat.size > 16 * 1024 * 1024:
                raise Crc32FileError(where, f"file of {crc_stat.size} bytes is too large")
            if crc32_data is None:  # else: the bytes the caller read (and digested) already
                crc32_data = source.read_range(crc_rel, 0, crc_stat.size)
            crcs = parse_crc32(crc32_data, where)
            present = {s.path for s in stats}
            missing = sorted(set(crcs) - present)
            if missing:
                raise Crc32FileError(
                    where,
                    "lists files that do not exist (or lie outside the model directory): "
                    + ", ".join(missing[:10])
                    + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""),
                )
    files = []
    for s in stats:
        if s.path == crc_rel:
            continue
        index = None
        if index_tensors and s.path.endswith(".safetensors"):
            index = _index(source, s)
        files.append(FileEntry(s.path, s.size, s.mtime_ns, crcs.get(s.path), index, etag=s.etag))
    unlisted = tuple(f.path for f in files if f.crc32 is None) if crc_rel else ()
    return Manifest(source.url, chunk_size, tuple(files), crc_rel, unlisted)


def _index(source: ManifestSource, stat: FileStat) -> SafetensorsIndex:
    def read(offset: int, length: int) -> bytes:
        return source.read_range(stat.path, offset, length)

    return read_safetensors_index(read, stat.size, f"{source.url}/{stat.path}")
