"""The node memory pool: the versions it holds, under a hard byte cap.

Accounting is by reservation: a file's bytes (rounded up to pages) count from the moment its
fill starts, so partial files never push the pool over the cap. Files are evicted whole, and
only when ready (or partial) and held by nobody: superseded versions first, then copies other
nodes also hold, then least recently used. Eviction unlinks, and a pinned file is never
evicted, so every page a client maps is a page this pool counts.

A file becomes visible (renamed from ``.partial`` and recorded in its version's metadata) only
after every chunk passed its CRC and the whole file matched its crc32.txt entry (and its
SHA-256 digest, where the version has one). On start, recorded files are re-read against their
chunk CRCs and digests and adopted; everything else is removed.

Not thread-safe: the daemon calls it from its event loop only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import msgspec

from .._crc import combine_chunks
from .._errors import CapacityError, ConfigError, HeaderError
from ..manifest import Manifest, SafetensorsIndex, read_safetensors_index, version_id
from ._version import FileState, PoolFile, Version, pages

__all__ = ["LocationRecord", "Pool", "index_file"]

log = logging.getLogger("mows.pool")

VERSION_META = ".mows-version.json"
ADOPT_WORKERS = max(1, min(8, os.cpu_count() or 1))
LOCATIONS = ".mows-locations.json"
META_FORMAT = 2
_VID = re.compile(r"[0-9a-f]{24}")

# (path, chunk size, recorded chunk CRCs, SHA-256 digest or None) -> whether the file matches
Verify = Callable[[str, int, list[int], str | None], bool]


class LocationRecord(msgspec.Struct, frozen=True):
    """Which version an origin location held when last checked, and the digest of its crc32
    file then (a warm open compares it with one request)."""

    version: str
    digest: str = ""


class Pool:
    def __init__(
        self,
        root: str,
        capacity: int,
        *,
        dir_mode: int = 0o750,
        file_mode: int = 0o640,
    ) -> None:
        self.root = os.path.abspath(root)
        self.capacity = capacity
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        self.versions: dict[str, Version] = {}
        self.locations: dict[str, LocationRecord] = {}
        # Would evicting this file drop the cluster's last copy of some of it? Those go last.
        # None (a single node): every file is a last copy, plain LRU.
        self.last_copy: Callable[[PoolFile], bool] | None = None
        self.on_remove: Callable[[PoolFile], None] | None = None  # a file left the pool
        self.on_commit: Callable[[PoolFile], None] | None = None  # a file became READY
        self.on_forget: Callable[[Version], None] | None = None  # a version left for good
        self.on_change: Callable[[], None] | None = None  # space may have been freed
        # Is this file being read now (a peer sent some of it, the scrub)? Such a file is not
        # evicted: the reader's descriptor would keep its pages, which the cap no longer
        # counts, past the unlink.
        # ``stop_serving`` (at eviction) checks the same and, if none is, ends the serving
        # in one step (no send starts after it): False means keep it, one began meanwhile.
        self.sending: Callable[[PoolFile], bool] | None = None
        self.stop_serving: Callable[[PoolFile], bool] | None = None
        # A victim passed over because it is being sent: no new send of it starts, so it
        # is evictable at the next look (else a file peers keep reading never would be).
        self.drain: Callable[[PoolFile], None] | None = None
        self.used_bytes = 0
        # Taken out of service while clients held them (``retire``): no longer in any
        # version, their pages counted until the last hold goes.
        self.retired: set[PoolFile] = set()
        self.evictions = 0
        self.evicted_bytes = 0
        self.evicted_last_copy_bytes = 0
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        _check_root(self.root)

    # -- versions and locations --------------------------------------------------------------
    def version(self, manifest: Manifest) -> Version:
        """The version holding ``manifest``'s content (one per content, whatever its origin)."""
        vid = version_id(manifest)
        v = self.versions.get(vid)
        if v is None:
            v = self.versions[vid] = Version(manifest, vid, self.root)
        return v

    def bind(self, location: str, version: Version, digest: str) -> None:
        """``location`` now holds ``version``; the version it held before is superseded."""
        old = self.locations.get(location)
        if old is not None and old.version != version.id:
            prev = self.versions.get(old.version)
            if prev is not None:
                prev.locations.discard(location)
                log.info(
                    "%s changed at its origin: version %s supersedes %s",
                    location,
                    version.id,
                    prev.id,
                )
                self._forget_if_unused(prev)
        version.locations.add(location)
        record = LocationRecord(version.id, digest)
        if old != record:
            self.locations[location] = record
            self._write_locations()

    def files(self) -> Iterator[PoolFile]:
        for v in self.versions.values():
            yield from v.files.values()

    @property
    def pinned_bytes(self) -> int:
        return sum(f.reserved for f in self.files() if f.locked) + self._retired_bytes()

    def _retired_bytes(self) -> int:
        return sum(f.reserved for f in self.retired)

    # -- pins ----------------------------------------------------------------------------------
    def pin(self, files: Iterable[PoolFile], *, transient: bool) -> None:
        now = time.monotonic()
        for f in files:
            if transient:
                f.transient_pins += 1
            else:
                f.pins += 1
            f.last_used = now

    def unpin(self, files: Iterable[PoolFile], *, transient: bool, consumed: bool = False) -> None:
        """Drop a hold; ``consumed`` files (streamed and done with) are evicted first."""
        for f in files:
            if transient:
                f.transient_pins = max(0, f.transient_pins - 1)
            else:
                f.pins = max(0, f.pins - 1)
            if consumed:
                f.last_used = -1.0
            if f.rotten and not f.locked:
                if f in self.retired:  # already out of the pool: its pages are free now
                    self.retired.discard(f)
                    self.used_bytes -= f.reserved
                else:
                    self._remove(f)
        self._changed()

    # -- admission, reservation and eviction ---------------------------------------------------
    def need(self, version: Version, rels: list[str]) -> int:
        """Bytes that admitting ``rels`` of ``version`` would add to the pool."""
        out = 0
        for r in rels:
            f = version.files.get(r)
            if f is None:
                out += pages(version.entry(r).size)
            elif f.state is FileState.PARTIAL:
                out += pages(f.size) - f.held_bytes
        return out

    def admit(
        self, version: Version, rels: list[str], *, transient: bool, take: bool = True
    ) -> list[PoolFile] | None:
        """Room for ``rels`` of ``version``, all or nothing, and a pin on each of them in the
        same step (so nothing can evict a file between its load and its client's pin).

        Files not yet in the pool are reserved (FILLING) for the caller to fill. Returns None
        when memory that will be released (evictable later, held only transiently) is needed,
        or when the caller may not ``take`` space now (it waits its turn): it waits and asks
        again. Raises ``CapacityError`` when it can never fit beside what clients hold.
        """
        # Callers hold the version (``hold``), so it cannot have been forgotten meanwhile.
        assert self.versions.get(version.id) is version, "admitting an untracked version"
        present = [version.files[r] for r in rels if r in version.files]
        need = self.need(version, rels)
        free = self.capacity - self.used_bytes
        if need > 0:
            keep = set(present)
            held = sum(f.reserved for f in self.files() if f.pins and f not in keep)
            held += sum(f.reserved for f in self.retired if f.pins)
            if need > self.capacity - held - sum(f.reserved for f in present):
                raise CapacityError(self.explain(version, need))
            if not take:
                return None
        if need > free:
            victims = self._victims(keep, need - free)
            if need > free + sum(f.reserved for f in victims):
                return None
            for f in victims:
                if need <= free:
                    break
                if self._evict(f):
                    free += f.reserved
            if need > free:
                return None  # a victim is being sent from since it was chosen: ask again
        out = []
        for rel in rels:
            pf = version.files.get(rel)
            if pf is None:
                pf = version.files[rel] = PoolFile(version, version.entry(rel), FileState.FILLING)
                self.used_bytes += pf.reserved
            elif pf.state is FileState.PARTIAL:
                self.used_bytes -= pf.reserved
                pf.state = FileState.FILLING  # keeps its prefetched chunks
                self.used_bytes += pf.reserved
            out.append(pf)
        assert self.used_bytes <= self.capacity, "pool cap exceeded"
        self.pin(out, transient=transient)
        return out

    def explain(self, version: Version, need: int) -> str:
        """Why ``need`` more bytes do not fit: the cap and what holds the memory."""
        holders: dict[str, int] = {}
        for f in self.files():
            if f.locked:
                key = f"{f.version.manifest.source} ({f.version.id[:12]})"
                holders[key] = holders.get(key, 0) + f.reserved
        top = sorted(holders.items(), key=lambda kv: -kv[1])[:5]
        held = ", ".join(f"{k}: {n:,}" for k, n in top) or "nothing"
        return (
            f"model {version.manifest.source} needs {need:,} more bytes in the pool; capacity is "
            f"{self.capacity:,} bytes, {self.used_bytes:,} used, {self.pinned_bytes:,} held by "
            f"clients and loads in progress ({held}); raise --max-memory or release models"
        )

    def reserve_chunk(self, version: Version, rel: str, length: int) -> PoolFile | None:
        """Room for one prefetched chunk in a PARTIAL file, held (transiently) for the
        writer; None if the pool is full or the file is not partial. Never evicts."""
        need = pages(length)
        if self.used_bytes + need > self.capacity:
            return None
        f = version.files.get(rel)
        if f is None:
            f = version.files[rel] = PoolFile(version, version.entry(rel), FileState.PARTIAL)
        if f.state is not FileState.PARTIAL:
            return None
        f.held_bytes += need
        self.used_bytes += need
        self.pin([f], transient=True)
        return f

    def end_chunk(self, f: PoolFile, index: int, length: int, crc: int | None) -> None:
        """A prefetched chunk was written (``crc``) or failed (None); the writer's hold ends.
        A file a load took over meanwhile (FILLING) keeps its full reservation, and the chunk:
        the load waits for this write before it plans its own."""
        if f.state is not FileState.READY and self._owns(f):
            if crc is not None:
                f.chunk_crcs[index] = crc
            elif f.state is FileState.PARTIAL:
                f.held_bytes -= pages(length)
                self.used_bytes -= pages(length)
        self.unpin([f], transient=True)
        if f.state is FileState.PARTIAL and not f.chunk_crcs and not f.locked:
            self.discard(f)

    def _owns(self, f: PoolFile) -> bool:
        return f.version.files.get(f.rel) is f and self.versions.get(f.version.id) is f.version

    def _victims(
        self, keep: Collection[PoolFile] = (), enough: int | None = None
    ) -> list[PoolFile]:
        """Evictable files in eviction order: superseded versions first, then copies other
        nodes also hold, the cluster's last copies last; least recently used among equals.
        ``enough``: stop once the files listed free that many bytes (each candidate costs a
        lock probe: only as many as needed are probed)."""
        last_copy = self.last_copy
        cands = sorted(
            (f for f in self.files() if not f.locked and f not in keep),
            key=lambda f: (
                not f.version.superseded,
                last_copy(f) if last_copy is not None else True,
                f.last_used,
            ),
        )
        out: list[PoolFile] = []
        freed = 0
        for f in cands:
            if enough is not None and freed >= enough:
                break
            if self.sending is not None and self.sending(f):
                if self.drain is not None:
                    self.drain(f)
                continue
            if f.state is FileState.READY and _mapped_by_a_client(f.path):
                continue
            out.append(f)
            freed += f.reserved
        return out

    def _evict(self, f: PoolFile) -> bool:
        if self.stop_serving is not None and not self.stop_serving(f):
            return False
        log.info("evicting %s/%s (%d bytes)", f.version.id, f.rel, f.size)
        self.evictions += 1
        self.evicted_bytes += f.size
        if self.last_copy is None or self.last_copy(f):
            self.evicted_last_copy_bytes += f.size
        self._remove(f)
        return True

    def _remove(self, f: PoolFile) -> None:
        v = f.version
        if v.files.get(f.rel) is not f:
            return
        if self.on_remove is not None:
            self.on_remove(f)
        del v.files[f.rel]
        v.index.pop(f.rel, None)
        self.used_bytes -= f.reserved
        for p in (f.path, f.partial_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if f.state is FileState.READY:
            self._write_meta(v)
        self._forget_if_unused(v)
        self._changed()

    def discard(self, f: PoolFile) -> None:
        """Drop a file that failed or was abandoned while filling."""
        self._remove(f)

    def retire(self, f: PoolFile) -> None:
        """Take a READY file whose bytes went bad out of service now: removed as if evicted,
        so the next open fetches it again. Clients mapping it keep their mapping (zero-copy:
        nothing can take it back); until their holds go, its pages stay counted in
        ``used_bytes``."""
        v = f.version
        if v.files.get(f.rel) is not f:
            return
        assert f.state is FileState.READY, "retiring a file still being filled"
        if not f.locked:
            self._remove(f)
            return
        if self.on_remove is not None:
            self.on_remove(f)
        del v.files[f.rel]
        v.index.pop(f.rel, None)
        f.rotten = True
        self.retired.add(f)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f.path)  # the next fill publishes a new file under its name
        self._write_meta(v)
        self._forget_if_unused(v)
        self._changed()

    def shrink_to_capacity(self) -> None:
        for f in self._victims(enough=self.used_bytes - self.capacity):
            if self.used_bytes <= self.capacity:
                break
            self._evict(f)

    def hold(self, version: Version) -> Version:
        """Keep ``version`` known while a caller uses it (an open, a stream); registers it
        again if it had been forgotten meanwhile (superseded, emptied). Returns the object
        the pool tracks for that content."""
        tracked = self.versions.get(version.id)
        if tracked is None:
            tracked = self.versions[version.id] = version
        tracked.users += 1
        return tracked

    def release_user(self, version: Version) -> None:
        version.users = max(0, version.users - 1)
        self._forget_if_unused(version)

    def _forget_if_unused(self, v: Version) -> None:
        """A superseded version nobody reads and nothing of which is left goes for good."""
        if v.superseded and not v.files and not v.users and self.versions.get(v.id) is v:
            del self.versions[v.id]
            shutil.rmtree(v.dir, ignore_errors=True)
            if self.on_forget is not None:
                self.on_forget(v)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- filling ----------------------------------------------------------------------------
    def open_partial(self, f: PoolFile) -> int:
        """The file's partial shared-memory file at full size (prefetched chunks kept);
        returns an O_RDWR fd."""
        os.makedirs(os.path.dirname(f.partial_path), mode=self.dir_mode, exist_ok=True)
        trunc = 0 if f.chunk_crcs else os.O_TRUNC
        fd = os.open(f.partial_path, os.O_RDWR | os.O_CREAT | trunc | os.O_CLOEXEC, self.file_mode)
        try:
            os.ftruncate(fd, f.size)
        except OSError:
            os.close(fd)
            raise
        return fd

    def commit(self, f: PoolFile, chunk_crcs: dict[int, int], crc32: int) -> None:
        """Publish a fully fetched, verified file."""
        os.replace(f.partial_path, f.path)
        self.used_bytes -= f.reserved
        f.chunk_crcs = dict(chunk_crcs)
        f.crc32 = crc32
        f.state = FileState.READY
        f.held_bytes = 0
        f.last_used = time.monotonic()
        self.used_bytes += f.reserved
        self._write_meta(f.version)
        self._changed()
        if self.on_commit is not None:
            self.on_commit(f)

    # -- metadata and adoption --------------------------------------------------------------
    def _write_meta(self, v: Version) -> None:
        files = {
            f.rel: _FileMeta(f.crc32, [f.chunk_crcs[i] for i in range(len(f.chunk_crcs))])
            for f in v.files.values()
            if f.state is FileState.READY
        }
        path = os.path.join(v.dir, VERSION_META)
        if not files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        os.makedirs(v.dir, mode=self.dir_mode, exist_ok=True)
        _write_atomic(path, msgspec.json.encode(_Meta(META_FORMAT, v.manifest, files)))

    def _write_locations(self) -> None:
        live = {loc: r for loc, r in self.locations.items() if r.version in self.versions}
        _write_atomic(os.path.join(self.root, LOCATIONS), msgspec.json.encode(live))

    def adopt(self, verify: Verify) -> int:
        """Re-verify and adopt files left by a previous daemon; remove everything else.

        ``verify(path, chunk_size, chunk_crcs, sha256)`` re-reads a pool file and says if it
        matches its chunk CRCs and (unless None) the version's SHA-256 digest of the file.
        Returns the number of bytes adopted.
        """
        try:
            with open(os.path.join(self.root, LOCATIONS), "rb") as fh:
                locations = msgspec.json.decode(fh.read(), type=dict[str, LocationRecord])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            locations = {}
        adopted = 0
        for name in sorted(os.listdir(self.root)):
            vdir = os.path.join(self.root, name)
            if name == LOCATIONS:
                continue
            meta = _read_meta(os.path.join(vdir, VERSION_META)) if _VID.fullmatch(name) else None
            if meta is None or os.path.islink(vdir) or version_id(meta.manifest) != name:
                _remove_path(vdir)
                continue
            v = Version(meta.manifest, name, self.root)
            files = list(meta.files.items())
            # Files re-verify in parallel (hashing releases the GIL): a large pool must not
            # hold the socket closed for one core's worth of SHA-256 over every byte.
            with ThreadPoolExecutor(ADOPT_WORKERS, thread_name_prefix="mows-adopt") as ex:
                ok = list(
                    ex.map(
                        self._verify_file,
                        [v] * len(files),
                        [rel for rel, _ in files],
                        [os.path.join(vdir, rel) for rel, _ in files],
                        [info for _, info in files],
                        [verify] * len(files),
                    )
                )
            for (rel, info), good in zip(files, ok, strict=True):
                path = os.path.join(vdir, rel)
                if not good:
                    log.warning("pool file %s failed re-verification; removing it", path)
                    continue
                f = PoolFile(
                    v,
                    v.entry(rel),
                    FileState.READY,
                    dict(enumerate(info.chunk_crcs)),
                    info.crc32,
                )
                try:
                    index = index_file(f)
                except (HeaderError, OSError) as e:
                    log.warning("pool file %s: %s; removing it", path, e)
                    continue
                if index is not None:
                    v.index[rel] = index
                v.files[rel] = f
                self.used_bytes += f.reserved
                adopted += f.size
            for path in _walk_files(vdir):
                rel = os.path.relpath(path, vdir)
                if rel not in v.files and rel != VERSION_META:
                    _remove_path(path)
            if v.files:
                self.versions[name] = v
                self._write_meta(v)
            else:
                shutil.rmtree(vdir, ignore_errors=True)
        for loc, record in locations.items():
            held = self.versions.get(record.version)
            if held is not None:
                held.locations.add(loc)
                self.locations[loc] = record
        self._write_locations()
        self.shrink_to_capacity()
        return adopted

    def _verify_file(
        self,
        v: Version,
        rel: str,
        path: str,
        info: _FileMeta,
        verify: Verify,
    ) -> bool:
        if not v.has(rel):
            return False
        entry = v.entry(rel)
        chunks = v.chunks(rel)
        try:
            if (
                os.path.commonpath([os.path.realpath(path), v.dir]) != v.dir
                or not os.path.isfile(path)
                or os.path.islink(path)
                or os.path.getsize(path) != entry.size
                or len(info.chunk_crcs) != len(chunks)
            ):
                return False
            # The file CRC is recomputed from the chunk CRCs, never taken from the record.
            combined = combine_chunks(zip(info.chunk_crcs, (c.length for c in chunks), strict=True))
            if combined != info.crc32 or (entry.crc32 is not None and combined != entry.crc32):
                return False
            # The digest comes from the manifest, which the version id (the directory's name)
            # binds: dropping it from the metadata makes another version, not a weaker check.
            return verify(path, v.manifest.chunk_size, info.chunk_crcs, entry.sha256)
        except (OSError, ValueError):
            return False


def index_file(f: PoolFile) -> SafetensorsIndex | None:
    """A safetensors file's tensor index, parsed from its verified pool bytes (thread-safe:
    reads only)."""
    if not f.rel.endswith(".safetensors"):
        return None
    fd = os.open(f.path if f.state is FileState.READY else f.partial_path, os.O_RDONLY)
    try:
        return read_safetensors_index(
            lambda off, n: os.pread(fd, n, off), f.size, f"{f.version.manifest.source}/{f.rel}"
        )
    finally:
        os.close(fd)


class _FileMeta(msgspec.Struct, frozen=True):
    crc32: int
    chunk_crcs: list[int]


class _Meta(msgspec.Struct, frozen=True):
    format: int
    manifest: Manifest
    files: dict[str, _FileMeta]


def _mapped_by_a_client(path: str) -> bool:
    """A client maps the file (it holds a shared flock while it does): one that outlived a
    daemon restart, whose pins this daemon never saw, or one whose pin went with a
    connection while its tensors live on. Evicting it would unlink pages still mapped:
    memory the cap would no longer count."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops our probe's lock
    return False


def _check_root(root: str) -> None:
    """The pool root must be ours alone: a directory someone else owns or may write could hold
    planted "verified" files (adoption trusts what it finds there only after re-reading it, but
    the layout, metadata and names would be theirs)."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"pool_dir {root}: not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"pool_dir {root}: owned by uid {st.st_uid}, not this daemon's ({os.geteuid()}); "
            "remove it or give it to the daemon's user"
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"pool_dir {root}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "chmod go-w it"
        )


def _read_meta(path: str) -> _Meta | None:
    try:
        with open(path, "rb") as fh:
            meta = msgspec.json.decode(fh.read(), type=_Meta)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return meta if meta.format == META_FORMAT else None


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


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
