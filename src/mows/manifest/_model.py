"""A model's manifest: its files, their chunk plan, expected CRCs and tensor indexes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Protocol

import msgspec

from .._errors import Crc32FileError
from ._crcfile import MAX_CRC32_FILE_BYTES, check_relative_path, parse_crc32
from ._safetensors import SafetensorsIndex, read_safetensors_index
from ._shafile import MAX_SHA256_FILE_BYTES, hf_blob_digest, parse_sha256

__all__ = [
    "AUTO_CHUNK_MAX",
    "AUTO_CHUNK_MIN",
    "AUTO_CHUNK_SIZE",
    "AUTO_CHUNK_TARGET",
    "DEFAULT_CHUNK_SIZE",
    "Chunk",
    "FileEntry",
    "FileStat",
    "Manifest",
    "ManifestSource",
    "build_manifest",
    "choose_chunk_size",
    "chunk_count",
    "chunk_plan",
    "version_id",
]

# Chunk size: ``AUTO_CHUNK_SIZE`` (0) lets each model's size choose it (``choose_chunk_size``);
# any positive value is used as given (``--chunk-size``). Auto is the default.
AUTO_CHUNK_SIZE = 0
DEFAULT_CHUNK_SIZE = AUTO_CHUNK_SIZE
# Auto rule: the largest power of two <= total / AUTO_CHUNK_TARGET, within [MIN, MAX].
# Why: a chunk is the unit of pipelining and of sharing. A cold cluster of N nodes splits a
# model's chunks among owners (one origin read each) and forwards each as soon as it landed,
# so a node's share of the serving is its share of the chunks: with 4 chunks of 64 MiB (a
# 256 MiB model at the old fixed size) one of 8 nodes served 3.5 copies, and a few big chunks
# leave the last transfers in the tail. ~256 chunks give 8 nodes ~32 each, 64 nodes ~4; peer
# swarms size pieces from the content length the same way (BitTorrent clients aim at 1-2
# thousand pieces). MIN 1 MiB: each chunk costs daemon CPU (a task, a peer request and its
# header, CRC-32 and BLAKE3 calls, directory bookkeeping) and 4 bytes + 1 bit of every
# node's etcd holdings record; on bench/cluster.py (8 daemons on 2 cores) 512 KiB and 256 KiB
# chunks loaded 1.1-1.5x slower than 1 MiB. MAX 64 MiB, the old fixed size: models from
# 16 GiB keep their plans and version ids, and 1 TiB stays at 16K chunks (64 KiB records).
AUTO_CHUNK_TARGET = 256
AUTO_CHUNK_MIN = 1 << 20
AUTO_CHUNK_MAX = 64 << 20


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
    etag: str = ""  # with a default, at the end: manifests written before it still decode
    sha256: str | None = None  # lower-case hex, from the sha256 file or an HF blob's name


class Manifest(msgspec.Struct, frozen=True):
    """Everything needed to fetch, check and index a model; sent as-is to clients."""

    source: str
    chunk_size: int
    files: tuple[FileEntry, ...]
    crc32_file: str | None = None  # relative path of the crc32 file used, if any
    unlisted: tuple[str, ...] = ()  # files the crc32 file does not list
    sha256_file: str | None = None  # relative path of the sha256 file used, if any

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


def choose_chunk_size(total_bytes: int, requested: int = AUTO_CHUNK_SIZE) -> int:
    """The chunk size of a model of ``total_bytes``: ``requested`` when positive (an explicit
    ``--chunk-size``), else the largest power of two <= total / AUTO_CHUNK_TARGET, clamped
    to [AUTO_CHUNK_MIN, AUTO_CHUNK_MAX]. Every node computes it from the same listing, so
    nodes agree on it (it is part of the version id)."""
    if requested > 0:
        return requested
    if requested < 0:
        raise ValueError("chunk_size must be positive, or 0 for auto")
    per_chunk = max(total_bytes, 0) // AUTO_CHUNK_TARGET
    size = 1 << max(per_chunk.bit_length() - 1, 0)  # largest power of two <= per_chunk
    return min(max(size, AUTO_CHUNK_MIN), AUTO_CHUNK_MAX)


def version_id(manifest: Manifest) -> str:
    """A model version's identity: what its bytes are, never where or when they were read.

    Names, sizes, crc32.txt values, SHA-256 digests and the chunk plan; no timestamps, so
    identical content at two locations is one version. A file the crc32 file does not list has
    no content identity: its ETag (an object store's, which changes with every rewrite) or else
    its modification time stands in for one, so that an update of it is still a new version.
    A digest is hashed only where there is one, so versions without digests keep their ids
    (and pools written before digests existed stay valid).
    """
    h = hashlib.sha256(f"mows-version-1\0{manifest.chunk_size}".encode())
    for f in manifest.files:
        if f.crc32 is not None:
            content = f"{f.crc32:08x}"
        else:
            content = f"etag:{f.etag}" if f.etag else f"mtime:{f.mtime_ns}"
        if f.sha256 is not None:
            content += f"\0sha256:{f.sha256}"
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
    chunk_size: int = AUTO_CHUNK_SIZE,
    crc32_file: str | None = "crc32.txt",
    require_crc32_file: bool = False,
    index_tensors: bool = True,
    crc32_data: bytes | None = None,
    sha256_file: str | None = None,
    sha256_data: bytes | None = None,
    local_root: str | None = None,
) -> Manifest:
    """Describe the model at ``source``.

    ``crc32_file`` and ``sha256_file`` are relative to the model root; a missing file is
    fine unless ``require_crc32_file``. ``*_data`` are the bytes the caller read (and
    digested) already; else the files are read if listed. Entries naming files that do not
    exist are an error. ``chunk_size``: 0 (auto) chooses it from the model's total size
    (``choose_chunk_size``); a positive value is used as given. ``local_root``: the model's
    directory when the source is local, where Hugging Face snapshot links give digests to
    files the sha256 file does not list.
    """
    stats = sorted(source.list_files(), key=lambda s: s.path)
    present = {s.path for s in stats}
    crcs: dict[str, int] = {}
    crc_found = _checksum_file(source, stats, crc32_file, MAX_CRC32_FILE_BYTES, crc32_data)
    if crc_found is None and crc32_file and require_crc32_file:
        raise Crc32FileError(f"{source.url}/{crc32_file}", "crc32 file not found")
    if crc_found is not None:
        where = f"{source.url}/{crc_found[0]}"
        crcs = parse_crc32(crc_found[1], where)
        _check_present(crcs, present, where)
    digests: dict[str, str] = {}
    sha_found = _checksum_file(source, stats, sha256_file, MAX_SHA256_FILE_BYTES, sha256_data)
    meta = {r[0] for r in (crc_found, sha_found) if r is not None}
    if sha_found is not None:
        where = f"{source.url}/{sha_found[0]}"
        # `sha256sum * > sha256sums.txt` lists the checksum files too: not model files.
        digests = {p: d for p, d in parse_sha256(sha_found[1], where).items() if p not in meta}
        _check_present(digests, present, where)
    files = []
    for s in stats:
        if s.path in meta:
            continue
        index = None
        if index_tensors and s.path.endswith(".safetensors"):
            index = _index(source, s)
        digest = digests.get(s.path)
        if digest is None and local_root is not None:
            digest = hf_blob_digest(local_root, s.path)
        files.append(
            FileEntry(
                s.path, s.size, s.mtime_ns, crcs.get(s.path), index, etag=s.etag, sha256=digest
            )
        )
    unlisted = tuple(f.path for f in files if f.crc32 is None) if crc_found else ()
    return Manifest(
        source.url,
        choose_chunk_size(sum(f.size for f in files), chunk_size),
        tuple(files),
        crc_found[0] if crc_found else None,
        unlisted,
        sha_found[0] if sha_found else None,
    )


def _checksum_file(
    source: ManifestSource, stats: list[FileStat], rel: str | None, limit: int, data: bytes | None
) -> tuple[str, bytes] | None:
    """(path, content) of a checksum file, or None if there is none: ``data`` when the caller
    read it already, else read if the listing has it."""
    if not rel:
        return None
    rel = check_relative_path(rel, rel)
    if data is not None:
        return rel, data
    stat = next((s for s in stats if s.path == rel), None)
    if stat is None:
        return None
    if stat.size > limit:
        raise Crc32FileError(f"{source.url}/{rel}", f"file of {stat.size} bytes is too large")
    return rel, source.read_range(rel, 0, stat.size)


def _check_present(listed: Mapping[str, object], present: set[str], where: str) -> None:
    missing = sorted(set(listed) - present)
    if missing:
        raise Crc32FileError(
            where,
            "lists files that do not exist (or lie outside the model directory): "
            + ", ".join(missing[:10])
            + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""),
        )


def _index(source: ManifestSource, stat: FileStat) -> SafetensorsIndex:
    def read(offset: int, length: int) -> bytes:
        return source.read_range(stat.path, offset, length)

    return read_safetensors_index(read, stat.size, f"{source.url}/{stat.path}")
