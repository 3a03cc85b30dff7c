"""The node memory pool: one shared-memory file per model file, under a hard byte cap.

Accounting is by reservation: a file's bytes (rounded up to pages) count from the moment
its fill starts, so partial files never push the pool over the cap. Files are evicted whole,
least recently used first, and only when ready and unpinned. Eviction unlinks: a process that
still maps the file keeps valid pages (the kernel frees them at its last unmap), so eviction
never unmaps or zeroes memory under a live tensor.

A file becomes visible (renamed from ``.partial`` and recorded in the model's metadata) only
after every chunk passed its CRC and the whole file matched its crc32.txt entry. On start,
recorded files are re-verified against their chunk CRCs and adopted, everything else removed.

Not thread-safe: the daemon calls it from its event loop only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec

from .._errors import CapacityError

__all__ = ["FileState", "Pool", "PoolFile", "WouldWait", "model_id"]

log = logging.getLogger("mows.pool")

PAGE = os.sysconf("SC_PAGE_SIZE")
META = ".mows-meta.json"
PARTIAL = ".partial"


def model_id(location: str) -> str:
    """A stable, filesystem-safe id: a readable name plus a hash of the full location."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", location.rstrip("/").rsplit("/", 1)[-1])[:48] or "model"
    return f"{name}-{hashlib.sha256(location.encode()).hexdigest()[:12]}"


def _pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


class FileState(Enum):
    FILLING = "filling"
    READY = "ready"
    PARTIAL = "partial"  # some chunks, prefetched: served to peers, not to clients


@dataclass
class PoolFile:
    model: str
    rel: str
    size: int
    path: str  # where clients find it once ready
    state: FileState = FileState.FILLING
    mtime_ns: int = 0  # of the source file it was filled from
    crc32: int = 0
    chunk_size: int = 0
    chunk_crcs: list[int] = field(default_factory=list)
    last_used: float = 0.0
    held: dict[int, int] = field(default_factory=dict)  # PARTIAL: chunk index -> CRC-32
    held_bytes: int = 0  # PARTIAL: bytes reserved for the held chunks (page-rounded)

    @property
    def reserved(self) -> int:
        return self.held_bytes if self.state is FileState.PARTIAL else _pages(self.size)

    @property
    def partial_path(self) -> str:
        return self.path + PARTIAL


class WouldWait(Exception):
    """The request does not fit now, but loads in progress will free enough when they end."""


class Pool:
    def __init__(
        self,
        root: str,
        capacity: int,
        *,
        dir_mode: int = 0o750,
        file_mode: int = 0o640,
        on_remove: Callable[[PoolFile], None] | None = None,
    ):
        self.root = os.path.abspath(root)
        self.capacity = capacity
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        self.files: dict[tuple[str, str], PoolFile] = {}
        self.sources: dict[str, str] = {}  # model id -> source location
        self.expected: dict[str, dict[str, int]] = {}  # model id -> {file: size} of the model
        self.pins: dict[str, int] = {}  # model id -> client pins on the whole model
        self.file_pins: dict[tuple[str, str], int] = {}  # (model, file) -> streaming pins
        self.busy: dict[tuple[str, str], int] = {}  # (model, file) -> loads using it
        # Told whether evicting a file would drop the cluster's last copy of some of it:
        # those go last. None (a single node): every file is a last copy, plain LRU.
        self.last_copy: Callable[[PoolFile], bool] | None = None
        self.on_remove = on_remove  # told of every file leaving the pool (evicted, discarded)
        self.used_bytes = 0
        self.evictions = 0
        self.evicted_bytes = 0
        self.evicted_last_copy_bytes = 0
        os.makedirs(self.root, mode=0o755, exist_ok=True)

    # -- queries -------------------------------------------------------------------------
    def model_dir(self, model: str) -> str:
        return os.path.join(self.root, model)

    def get(self, model: str, rel: str) -> PoolFile | None:
        return self.files.get((model, rel))

    def model_files(self, model: str) -> list[PoolFile]:
        return [f for (m, _), f in self.files.items() if m == model]

    def is_locked(self, f: PoolFile) -> bool:
        key = (f.model, f.rel)
        return (
            self.pins.get(f.model, 0) > 0
            or self.file_pins.get(key, 0) > 0
            or self.busy.get(key, 0) > 0
        )

    @property
    def pinned_bytes(self) -> int:
        return sum(f.reserved for f in self.files.values() if self.is_locked(f))

    # -- pins and loads in progress ----------------------------------------------------------
    def pin(self, model: str, rels: Iterable[str] | None = None) -> None:
        """Pin the whole model (``rels`` None) or some of its files."""
        now = time.monotonic()
        if rels is None:
            self.pins[model] = self.pins.get(model, 0) + 1
            touched = self.model_files(model)
        else:
            touched = []
            for rel in rels:
                self.file_pins[(model, rel)] = self.file_pins.get((model, rel), 0) + 1
                if (model, rel) in self.files:
                    touched.append(self.files[(model, rel)])
        for f in touched:
            f.last_used = now

    def unpin(
        self, model: str, rels: Iterable[str] | None = None, *, consumed: bool = False
    ) -> None:
        """Drop a pin; ``consumed`` files (streamed and done with) are evicted first."""
        if rels is None:
            _decrement(self.pins, model)
            return
        for rel in rels:
            _decrement(self.file_pins, (model, rel))
            f = self.files.get((model, rel))
            if consumed and f is not None:
                f.last_used = -1.0

    def mark_busy(self, model: str, rels: Iterable[str]) -> None:
        for rel in rels:
            self.busy[(model, rel)] = self.busy.get((model, rel), 0) + 1

    def unmark_busy(self, model: str, rels: Iterable[str]) -> None:
        for rel in rels:
            _decrement(self.busy, (model, rel))

    # -- reservation and eviction ----------------------------------------------------------
    def reserve(
        self,
        model: str,
        source: str,
        entries: Iterable[tuple[str, int, int]],
        expected: Mapping[str, int],
    ) -> list[PoolFile]:
        """Reserve room for ``(rel, size, mtime_ns)`` files of ``model``, evicting LRU files.

        Raises ``WouldWait`` if loads in progress hold the space, ``CapacityError`` if the
        files cannot fit even when every unpinned file is evicted.
        """
        entries = list(entries)
        need = sum(_pages(size) for _, size, _ in entries)
        existing = {
            rel: self.files[(model, rel)] for rel, _, _ in entries if (model, rel) in self.files
        }
        # A prefetched partial file of the same source file is kept and completed in place.
        partial = {
            rel: f
            for rel, f in existing.items()
            if f.state is FileState.PARTIAL
            and any(r == rel and sz == f.size and mt == f.mtime_ns for r, sz, mt in entries)
        }
        stale = [f for rel, f in existing.items() if rel not in partial]
        stale_bytes = sum(f.reserved for f in stale if f.state is not FileState.FILLING)
        stale_bytes += sum(f.reserved for f in partial.values())
        free = self.capacity - self.used_bytes + stale_bytes
        if need > free:
            requested = {(model, rel) for rel, _, _ in entries}
            victims = [f for f in self._victims() if (f.model, f.rel) not in requested]
            evictable = sum(f.reserved for f in victims)
            if need > free + evictable:
                # Space other models' loads will release when they end. Never this model's
                # own files: its loads run one at a time, so they would wait on themselves.
                waiting = sum(
                    f.reserved
                    for key, f in self.files.items()
                    if f.model != model
                    and self.busy.get(key, 0)
                    and not self.pins.get(f.model)
                    and not self.file_pins.get(key)
                )
                if need <= free + evictable + waiting:
                    raise WouldWait
                locked = self.pinned_bytes
                raise CapacityError(
                    f"model {source} needs {need:,} bytes in the pool; capacity is "
                    f"{self.capacity:,} bytes, of which {locked:,} are pinned by clients or "
                    "loads in progress (raise --max-memory, or release other models)"
                )
            for f in victims:
                if need <= free:
                    break
                self._evict(f)
                free += f.reserved
        for f in stale:
            self._remove(f)
        self.sources[model] = source
        self.expected[model] = dict(expected)
        os.makedirs(self.model_dir(model), mode=self.dir_mode, exist_ok=True)
        out = []
        for rel, size, mtime_ns in entries:
            pf = partial.get(rel)
            if pf is not None:
                self.used_bytes -= pf.reserved
                pf.state = FileState.FILLING  # keeps its held chunks
            else:
                pf = PoolFile(
                    model, rel, size, os.path.join(self.model_dir(model), rel), mtime_ns=mtime_ns
                )
                self.files[(model, rel)] = pf
            self.used_bytes += pf.reserved
            out.append(pf)
        assert self.used_bytes <= self.capacity, "pool cap exceeded"
        return out

    def reserve_chunk(
        self, model: str, source: str, rel: str, size: int, mtime_ns: int, length: int
    ) -> PoolFile | None:
        """Room for one prefetched chunk, in a PARTIAL file; None if the pool is full.
        Prefetch never evicts: it only fills memory nobody else is using."""
        need = _pages(length)
        if self.used_bytes + need > self.capacity:
            return None
        pf = self.files.get((model, rel))
        if pf is None:
            self.sources.setdefault(model, source)
            os.makedirs(self.model_dir(model), mode=self.dir_mode, exist_ok=True)
            pf = PoolFile(
                model,
                rel,
                size,
                os.path.join(self.model_dir(model), rel),
                state=FileState.PARTIAL,
                mtime_ns=mtime_ns,
            )
            self.files[(model, rel)] = pf
        if pf.state is not FileState.PARTIAL:
            return None
        pf.held_bytes += need
        self.used_bytes += need
        return pf

    def unreserve_chunk(self, pf: PoolFile, length: int) -> None:
        """Give back a chunk's room after its fetch failed."""
        if pf.state is FileState.PARTIAL and self.files.get((pf.model, pf.rel)) is pf:
            pf.held_bytes -= _pages(length)
            self.used_bytes -= _pages(length)
            if not pf.held and pf.held_bytes == 0:
                self._remove(pf)

    def _victims(self) -> list[PoolFile]:
        """Evictable files in eviction order: copies other nodes also hold first, the
        cluster's last copies last; least recently used first among equals."""
        cands = [
            f
            for f in self.files.values()
            if f.state is not FileState.FILLING and not self.is_locked(f)
        ]
        last_copy = self.last_copy
        return sorted(
            cands, key=lambda f: (last_copy(f) if last_copy is not None else True, f.last_used)
        )

    def _evict(self, f: PoolFile) -> None:
        log.info("evicting %s/%s (%d bytes)", f.model, f.rel, f.size)
        self.evictions += 1
        self.evicted_bytes += f.size
        if self.last_copy is None or self.last_copy(f):
            self.evicted_last_copy_bytes += f.size
        self._remove(f)

    def _remove(self, f: PoolFile) -> None:
        if self.on_remove is not None:
            self.on_remove(f)
        self.files.pop((f.model, f.rel), None)
        self.used_bytes -= f.reserved
        for p in (f.path, f.partial_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if f.state is FileState.READY:
            self._write_meta(f.model)

    def discard(self, f: PoolFile) -> None:
        """Drop a file that failed or was abandoned while filling."""
        if self.files.get((f.model, f.rel)) is f:
            self._remove(f)

    def shrink_to_capacity(self) -> None:
        for f in self._victims():
            if self.used_bytes <= self.capacity:
                break
            self._evict(f)

    # -- filling ----------------------------------------------------------------------------
    def create_partial(self, f: PoolFile) -> int:
        """Create the file's partial shared-memory file at full size; returns an O_RDWR fd."""
        os.makedirs(os.path.dirname(f.partial_path), mode=self.dir_mode, exist_ok=True)
        trunc = 0 if f.held else os.O_TRUNC  # a prefetched partial file keeps its chunks
        fd = os.open(f.partial_path, os.O_RDWR | os.O_CREAT | trunc | os.O_CLOEXEC, self.file_mode)
        try:
            os.ftruncate(fd, f.size)
        except OSError:
            os.close(fd)
            raise
        return fd

    def commit(self, f: PoolFile, chunk_size: int, chunk_crcs: list[int], crc32: int) -> None:
        """Publish a fully fetched, verified file."""
        os.replace(f.partial_path, f.path)
        if f.state is FileState.PARTIAL:  # completed by prefetch: account the whole file
            self.used_bytes += _pages(f.size) - f.held_bytes
        f.held = {}
        f.chunk_size = chunk_size
        f.chunk_crcs = chunk_crcs
        f.crc32 = crc32
        f.state = FileState.READY
        f.last_used = time.monotonic()
        self._write_meta(f.model)

    # -- metadata and adoption --------------------------------------------------------------
    def _write_meta(self, model: str) -> None:
        files = {
            f.rel: _FileMeta(f.size, f.mtime_ns, f.crc32, f.chunk_size, f.chunk_crcs)
            for f in self.model_files(model)
            if f.state is FileState.READY
        }
        path = os.path.join(self.model_dir(model), META)
        if not files and not any(self.model_files(model)):
            shutil.rmtree(self.model_dir(model), ignore_errors=True)
            return
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as fh:
            meta = _Meta(1, self.sources.get(model, ""), files, self.expected.get(model, {}))
            fh.write(msgspec.json.encode(meta))
        os.replace(tmp, path)

    def adopt(self, verify: Callable[[str, int, list[int]], bool]) -> int:
        """Re-verify and adopt files left by a previous daemon; remove everything else.

        ``verify(path, chunk_size, chunk_crcs)`` re-reads a pool file and says if it matches.
        Returns the number of bytes adopted.
        """
        adopted = 0
        for model in sorted(os.listdir(self.root)):
            mdir = self.model_dir(model)
            if not os.path.isdir(mdir) or os.path.islink(mdir):
                _remove_path(mdir)
                continue
            meta = _read_meta(os.path.join(mdir, META))
            keep: set[str] = set()
            for rel, info in (meta.files if meta else {}).items():
                path = os.path.join(mdir, rel)
                try:
                    ok = (
                        os.path.commonpath([os.path.realpath(path), mdir]) == mdir
                        and os.path.isfile(path)
                        and not os.path.islink(path)
                        and os.path.getsize(path) == info.size
                        and verify(path, info.chunk_size, info.chunk_crcs)
                    )
                except (OSError, ValueError):
                    ok = False
                if not ok:
                    log.warning("pool file %s failed re-verification; removing it", path)
                    continue
                pf = PoolFile(
                    model,
                    rel,
                    info.size,
                    path,
                    FileState.READY,
                    info.mtime_ns,
                    info.crc32,
                    info.chunk_size,
                    list(info.chunk_crcs),
                )
                self.files[(model, rel)] = pf
                self.used_bytes += pf.reserved
                adopted += pf.size
                keep.add(rel)
            if meta is not None and keep:
                self.sources[model] = meta.source
                self.expected[model] = dict(meta.expected)
            for path in _walk_files(mdir):
                rel = os.path.relpath(path, mdir)
                if rel not in keep and rel != META:
                    _remove_path(path)
            if keep:
                self._write_meta(model)
            else:
                shutil.rmtree(mdir, ignore_errors=True)
        self.shrink_to_capacity()
        return adopted


class _FileMeta(msgspec.Struct, frozen=True):
    size: int
    mtime_ns: int
    crc32: int
    chunk_size: int
    chunk_crcs: list[int]


class _Meta(msgspec.Struct, frozen=True):
    version: int
    source: str
    files: dict[str, _FileMeta]
    expected: dict[str, int] = {}  # every file of the model, cached or not


def _read_meta(path: str) -> _Meta | None:
    try:
        with open(path, "rb") as fh:
            meta = msgspec.json.decode(fh.read(), type=_Meta)
    except (OSError, msgspec.DecodeError):
        return None
    return meta if meta.version == 1 else None


def _walk_files(root: str) -> Iterator[str]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield os.path.join(dirpath, name)


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _decrement(counts: dict[Any, int], key: Any) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)
