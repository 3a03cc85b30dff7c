"""The load service: which version a location holds, admission to the pool, shared fills.

An open resolves its location to a version (a warm open revalidates with one cheap request,
the crc32 file; if the origin cannot be reached it opens the cached version and says so),
waits its turn for pool space in a fair queue, and pins the files it needs in the same step
that reserves them. Each missing pool file is filled by one task, shared by every open that
needs it; the file becomes visible only once it passed its check.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .._config import DaemonConfig
from .._errors import (
    CapacityError,
    DaemonError,
    IntegrityError,
    ManifestError,
    MowsError,
    SourceError,
    SourceNotFoundError,
)
from ..manifest import MAX_CRC32_FILE_BYTES, MAX_SHA256_FILE_BYTES, Manifest, build_manifest
from ..manifest._model import choose_chunk_size
from ..pool import FileState, Pool, PoolFile, Version, index_file
from ..sources import Source
from ..sources._local import LocalSource
from ._fetcher import ChunkFetcher, Counters, FillTarget
from ._fill import DigestFollower, FileFill, check_digest, check_file
from ._peering import Peering

__all__ = ["LoadService", "Opened", "check_origin"]

log = logging.getLogger("mows.daemon")

REVALIDATE_TIMEOUT = 10.0  # seconds a warm open waits for the origin before using its cache
RECORDS_WAIT = 2.0  # seconds a fill waits for the records of a version it just joined


@dataclass
class Opened:
    """What an open got: pinned files of one version (the caller owns the pins)."""

    version: Version
    files: list[PoolFile]
    transient: bool
    stale: str  # why the origin could not be asked; "" when it was
    bytes_from_origin: int
    bytes_from_peers: int
    bytes_from_pool: int
    seconds: float


@dataclass
class _FillStats:
    from_origin: int = 0
    from_peers: int = 0
    reused: int = 0  # prefetched chunks found in place


@dataclass
class _Location:
    version: Version | None = None
    digest: str = ""  # of the crc32 and sha256 files when last checked (see check_origin)
    origin_error: str | None = None
    checks: int = 0  # origin revalidations
    checked_at: float = -1e9  # monotonic time of the last answer from the origin
    check: asyncio.Future[tuple[Version, str]] | None = None  # one in flight, shared


class LoadService:
    def __init__(
        self,
        config: DaemonConfig,
        pool: Pool,
        fetcher: ChunkFetcher,
        counters: Counters,
        peering: Peering | None,
        source: Callable[[str], Source],
    ) -> None:
        self.config = config
        self.pool = pool
        self.fetcher = fetcher
        self.counters = counters
        self.peering = peering
        self.source = source
        self._locations: dict[str, _Location] = {}
        self._fills: dict[PoolFile, asyncio.Task[_FillStats]] = {}
        self._queue: collections.deque[object] = collections.deque()  # loads waiting for space
        self._space = asyncio.Event()
        self.prefetch_writes: dict[PoolFile, asyncio.Task[None]] = {}  # set by the prefetcher
        # Revalidation and header parsing: never queued behind a big load's chunk reads.
        self._meta = ThreadPoolExecutor(2, thread_name_prefix="mows-meta")
        self._peers_failed: set[tuple[str, str]] = set()  # (version, file) refilled from origin
        # SHA-256 of files being filled: one sequential stream per file, as many as readers.
        self.digest_executor = ThreadPoolExecutor(config.workers, thread_name_prefix="mows-sha")
        self.foreground = 0  # opens in progress: prefetch pauses while there are any
        self.idle = asyncio.Event()
        self.idle.set()
        pool.on_change = self._space_changed

    # -- versions ------------------------------------------------------------------------------
    async def resolve(self, location: str, max_age: float = 0.0) -> tuple[Version, str]:
        """The version ``location`` holds now, and why the origin could not be asked ("" if
        it was). Concurrent calls share one revalidation; ``max_age`` accepts an answer that
        old (prefetch re-plans often, and need not ask the origin each time). With a cached
        version at hand, an origin slower than ``REVALIDATE_TIMEOUT`` counts as unreachable."""
        loc = self._locations.setdefault(location, _Location())
        if loc.version is None:
            record = self.pool.locations.get(location)
            if record is not None:
                loc.version, loc.digest = self.pool.versions.get(record.version), record.digest
        cached = loc.version if loc.version is not None and _has_ready(loc.version) else None
        if (
            max_age
            and cached is not None
            and time.monotonic() - loc.checked_at < max_age
            and self.pool.versions.get(cached.id) is cached
        ):
            return cached, ""
        if loc.check is None:
            loc.check = asyncio.ensure_future(self._revalidate(location, loc))

            def done(_: object) -> None:
                loc.check = None

            loc.check.add_done_callback(done)
        if cached is None:
            return await asyncio.shield(loc.check)
        try:
            return await asyncio.wait_for(asyncio.shield(loc.check), REVALIDATE_TIMEOUT)
        except TimeoutError:  # the check goes on; this open does not wait for it
            reason = f"the origin did not answer in {REVALIDATE_TIMEOUT:g} s"
            loc.origin_error = reason
            return cached, reason

    async def _revalidate(self, location: str, loc: _Location) -> tuple[Version, str]:
        known = loc.version
        loc.checks += 1
        try:
            source = self.source(location)
            manifest, digest = await asyncio.get_running_loop().run_in_executor(
                self._meta,
                check_origin,
                source,
                known.manifest if known is not None else None,
                loc.digest,
                self.config,
            )
        except (SourceError, ManifestError) as e:
            # Unreachable, or caught mid-update (a torn crc32.txt): the cached, verified
            # version is still what this location last held for sure.
            loc.origin_error = str(e)
            if known is None or not _has_ready(known):
                raise
            log.warning(
                "%s: cannot revalidate (%s): opening the cached version %s", location, e, known.id
            )
            return known, str(e)
        loc.origin_error = None
        loc.checked_at = time.monotonic()
        if manifest is None and known is not None:
            version = known
        else:
            assert manifest is not None
            version = self.pool.version(manifest)
        self.pool.bind(location, version, digest)
        loc.version, loc.digest = version, digest
        if self.peering is not None:
            self.peering.join(version)
        return version, ""

    def _distrust(self, location: str) -> None:
        """A fill of the location's version failed its check or its read: the next open lists
        the origin again instead of trusting the crc32 file's digest (it may have been read
        before the files it describes were all written)."""
        loc = self._locations.get(location)
        if loc is not None and loc.version is not None and loc.digest:
            loc.digest = ""
            self.pool.bind(location, loc.version, "")

    def location_info(self, location: str) -> dict[str, object]:
        """Status of a location: its version and whether its origin answered last time."""
        loc = self._locations.get(location)
        record = self.pool.locations.get(location)
        vid = (
            loc.version.id
            if loc is not None and loc.version is not None
            else (record.version if record is not None else None)
        )
        if loc is None or not loc.checks:
            origin = "unknown"
        else:
            origin = "unreachable" if loc.origin_error else "ok"
        return {
            "version": vid,
            "origin": origin,
            "origin_error": loc.origin_error if loc is not None else None,
        }

    def version_of(self, location: str) -> Version | None:
        loc = self._locations.get(location)
        if loc is not None and loc.version is not None:
            return loc.version
        record = self.pool.locations.get(location)
        return self.pool.versions.get(record.version) if record is not None else None

    def loading(self, version: Version) -> tuple[int, int] | None:
        """(done, total) bytes of the fills of ``version`` in progress, or None."""
        fills = [f for f in self._fills if f.version is version]
        if not fills:
            return None
        return sum(f.filled_bytes for f in fills), sum(f.size for f in fills)

    # -- opens -----------------------------------------------------------------------------------
    async def open(
        self,
        location: str,
        rels: list[str] | None,
        *,
        transient: bool,
        version: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        wait: bool = True,
    ) -> Opened:
        """Pin ``rels`` (None: every file) of the version ``location`` holds (or of
        ``version``, for a reader that must keep reading one version), fetching what is
        missing. The pins belong to the caller once this returns; on any failure none remain.
        ``wait=False``: no room now (or others waiting for it first) is a ``CapacityError``
        at once, not a place in the line for space (a stream's fetch-ahead).
        """
        start = time.perf_counter()
        self.foreground += 1
        self.idle.clear()  # prefetch pauses before its next chunk
        v: Version | None = None
        try:
            if version is not None:
                found = self.pool.versions.get(version)
                if found is None:
                    raise DaemonError(
                        f"{location}: version {version} is no longer known to the daemon",
                        "DaemonError",
                    )
                stale = ""
            else:
                found, stale = await self.resolve(location)
            v = self.pool.hold(found)  # known to the pool until this open ends
            if stale:
                self.counters.stale_opens += 1
            if rels is None:
                rels = [f.path for f in v.manifest.files]
            unknown = sorted(r for r in rels if not v.has(r))
            if unknown:
                raise SourceNotFoundError(location, unknown[0], "not in the model")
            ready_bytes = sum(v.entry(r).size for r in rels if v.ready(r) is not None)
            files = await self._admit(v, rels, transient, wait)
            try:
                stats = await self._fill_all(location, files, progress)
            except BaseException:
                self.pool.unpin(files, transient=transient)
                raise
        except MowsError as e:
            if wait or not isinstance(e, CapacityError):  # a fetch-ahead's "not now" is none
                self.counters.loads_failed += 1
            if version is None and isinstance(e, IntegrityError | SourceError):
                self._distrust(location)
            raise
        finally:
            self.foreground -= 1
            if not self.foreground:
                self.idle.set()
            if v is not None:
                self.pool.release_user(v)
        if stats is None:
            self.counters.hits += 1
            stats = _FillStats()
        else:
            self.counters.misses += 1
        self.counters.bytes_from_pool += ready_bytes
        return Opened(
            v,
            files,
            transient,
            stale,
            stats.from_origin,
            stats.from_peers,
            ready_bytes + stats.reused,
            time.perf_counter() - start,
        )

    async def _admit(
        self, v: Version, rels: list[str], transient: bool, wait: bool = True
    ) -> list[PoolFile]:
        """Wait in line for room; only the head of the line may evict or take free space,
        so a big load is never starved by smaller ones (opens that need no space pass, and
        one that can never fit fails at once wherever it stands). ``wait=False``: one look,
        then a ``CapacityError`` if there was no room (or others wait for it first)."""
        ticket = object()
        self._queue.append(ticket)
        deadline = time.monotonic() + self.config.load_timeout
        try:
            while True:
                changed = self._space  # taken before checking: no wake-up is lost
                head = self._queue[0] is ticket
                files = self.pool.admit(v, rels, transient=transient, take=head)
                if files is not None:
                    return files
                if not wait:
                    raise CapacityError(
                        f"no room in the pool now for {', '.join(rels)} of "
                        f"{v.manifest.source} (an open that does not wait for space; "
                        f"{len(self._queue) - 1} waiting in line, {self.pool.used_bytes:,} of "
                        f"{self.pool.capacity:,} bytes used)"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CapacityError(
                        self.pool.explain(v, self.pool.need(v, rels))
                        + f" (waited {self.config.load_timeout:g}s: --load-timeout)"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, 1.0))
        finally:
            self._queue.remove(ticket)
            self._space_changed()

    def _space_changed(self) -> None:
        self._space.set()
        self._space = asyncio.Event()

    async def _fill_all(
        self,
        location: str,
        files: list[PoolFile],
        progress: Callable[[int, int], None] | None,
    ) -> _FillStats | None:
        """Fill every file not ready (joining fills in progress); None if all were ready."""
        tasks: dict[PoolFile, asyncio.Task[_FillStats]] = {}
        for f in files:
            if f.state is FileState.READY:
                continue
            t = self._fills.get(f)
            if t is None:
                t = self._fills[f] = asyncio.ensure_future(self._fill(location, f))
                t.add_done_callback(functools.partial(self._fill_done, f))
            tasks[f] = t
        if not tasks:
            return None
        total = sum(f.size for f in tasks)
        pending: set[asyncio.Task[_FillStats]] = set(tasks.values())
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.1)
            if progress is not None:
                progress(sum(f.filled_bytes for f in tasks), total)
        out = _FillStats()
        for t in tasks.values():
            s = t.result()  # the first failure is this open's error
            out.from_origin += s.from_origin
            out.from_peers += s.from_peers
            out.reused += s.reused
        return out

    def _fill_done(self, f: PoolFile, task: asyncio.Task[_FillStats]) -> None:
        self._fills.pop(f, None)
        if not task.cancelled():
            task.exception()  # retrieved: each open that waited re-raises it

    async def _fill(self, location: str, f: PoolFile) -> _FillStats:
        """Fetch the chunks ``f`` lacks into its pool file, check it whole, publish it."""
        if self.peering is None:
            return await self._fill_file(location, f)
        with self.peering.loading(f.version, [f.rel]):  # peers may wait on us for chunks we own
            return await self._fill_file(location, f)

    async def _fill_file(self, location: str, f: PoolFile) -> _FillStats:
        writing = self.prefetch_writes.get(f)
        if writing is not None:  # a prefetched chunk is being written: let it land first
            await asyncio.wait([writing])
        v = f.version
        stats = _FillStats()
        crcs = dict(f.chunk_crcs)
        chunks = [c for c in f.chunks() if c.index not in crcs]
        stats.reused = sum(c.length for c in f.chunks() if c.index in crcs)
        f.filled_bytes = stats.reused
        tasks: list[asyncio.Task[int]] = []
        target: FillTarget | None = None
        follower: DigestFollower | None = None
        try:
            source = self.source(location)
            if f.entry.crc32 is None:  # no content identity: it must still be the same file
                await self._check_unlisted(source, f)
            fd = self.pool.open_partial(f)
            try:
                target = FillTarget(source, v, FileFill(fd, f.size))
                target.origin_only = (v.id, f.rel) in self._peers_failed
            except BaseException:
                os.close(fd)
                raise
            if self.peering is not None:
                self.peering.serve_file(f, fd)
                cluster = self.peering.cluster
                await cluster.records_read(v.id, RECORDS_WAIT)
                # On a cold cluster, let the other nodes loading this version announce
                # themselves before ownership is computed, so each chunk leaves the origin
                # about once. A warm cluster (someone holds chunks already) needs no wait.
                if cluster.healthy and not cluster.anyone_holds(v.id):
                    await asyncio.sleep(cluster.publish_interval * 3)
            if f.entry.sha256 is not None:
                follower = DigestFollower(
                    target.fill, f.chunks(), crcs, self.digest_executor, target.running
                )
            tasks = [
                asyncio.ensure_future(self.fetcher.obtain(target, c, wait_for_owner=True))
                for c in chunks
            ]
            for c, t in zip(chunks, tasks, strict=True):
                crcs[c.index] = await t
                f.filled_bytes += c.length
                if follower is not None:
                    follower.landed(c.index)
            stats.from_origin, stats.from_peers = target.from_origin, target.from_peers
            source_name = "origin" if not stats.from_peers else "the cluster"
            try:
                actual = check_file(f, crcs, source_name)
                if follower is not None:  # not READY, never served, until the digest matches
                    check_digest(f, await follower.digest(), source_name)
            except IntegrityError:
                self.counters.integrity_failures += 1
                if stats.from_peers:  # members sent bytes that passed their checks but not
                    self._peers_failed.add((v.id, f.rel))  # the origin's: origin next time
                raise
            if f.entry.crc32 is None and stats.from_origin:
                await self._check_unlisted(source, f)  # not rewritten while we read it
            index = await asyncio.get_running_loop().run_in_executor(self._meta, index_file, f)
            target.fill.close()
            self.pool.commit(f, crcs, actual)
            self._peers_failed.discard((v.id, f.rel))
            if index is not None:
                v.index[f.rel] = index
            return stats
        except BaseException:
            for t in tasks:
                t.cancel()
            if follower is not None:
                follower.cancel()
            if target is not None:
                await target.drain()  # reads and hashes still running use the mapping
            await asyncio.gather(*tasks, return_exceptions=True)
            if follower is not None:
                await follower.wait()
            self.pool.discard(f)
            raise
        finally:
            if target is not None:
                target.fill.close()

    async def _check_unlisted(self, source: Source, f: PoolFile) -> None:
        """A file crc32.txt does not list is known by size and modification time only: if
        either changed at the origin, its bytes are no longer this version's."""
        st = await asyncio.get_running_loop().run_in_executor(self._meta, source.stat, f.rel)
        if (st.size, st.mtime_ns, st.etag) != (f.entry.size, f.entry.mtime_ns, f.entry.etag):
            raise SourceError(
                source.url,
                f.rel,
                "changed at the origin (and crc32.txt does not list it): this version's bytes "
                "are no longer there; open the model again for the new version",
            )

    async def drain(self, timeout: float) -> None:
        tasks = list(self._fills.values())
        if tasks:
            log.info("draining %d fills (up to %.0fs)", len(tasks), timeout)
            await asyncio.wait(tasks, timeout=timeout)

    async def close(self) -> None:
        for t in list(self._fills.values()):
            t.cancel()
        await asyncio.gather(*self._fills.values(), return_exceptions=True)
        self._meta.shutdown(wait=False, cancel_futures=True)
        self.digest_executor.shutdown(wait=False, cancel_futures=True)


def _has_ready(v: Version) -> bool:
    return any(f.state is FileState.READY for f in v.files.values())


def check_origin(
    source: Source, known: Manifest | None, digest: str, config: DaemonConfig
) -> tuple[Manifest | None, str]:
    """Ask the origin whether ``known`` is still what it holds: ONE read of the crc32 file
    when its digest still matches (and a stat per file the crc32 file does not list). Only
    when it changed (or on a cold open) is the sha256 file read too: weights whose CRCs did
    not change were verified already, so a warm open costs one request; a digest file added
    beside unchanged weights takes effect with the next crc32.txt change or cold open.
    Returns (None, digest) if unchanged, else the new manifest (tensor indexes are parsed
    later, from the verified pool bytes) and the digest of exactly the bytes it was built
    from. Runs in a worker thread."""
    crc_rel = (known.crc32_file if known is not None else None) or config.crc32_file
    blob = _read_optional(source, crc_rel, MAX_CRC32_FILE_BYTES)
    crc_digest = hashlib.sha256(blob).hexdigest() if blob is not None else ""
    unchanged = (
        known is not None
        and blob is not None
        and crc_digest == digest.split("+")[0]
        # A version planned at another chunk size (the old fixed default, or --chunk-size
        # changed) is planned again: a cluster's nodes must agree on the version id.
        and known.chunk_size == choose_chunk_size(known.total_bytes, config.model_chunk_size)
    )
    if unchanged and _unlisted_unchanged(source, known):  # type: ignore[arg-type]
        return None, digest
    sha_rel = config.sha256_file
    sha_blob = _read_optional(source, sha_rel, MAX_SHA256_FILE_BYTES)
    new_digest = crc_digest
    if blob is not None and sha_blob is not None:
        new_digest += "+" + hashlib.sha256(sha_blob).hexdigest()
    manifest = build_manifest(
        source,
        chunk_size=config.model_chunk_size,
        crc32_file=config.crc32_file,
        index_tensors=False,
        crc32_data=blob if crc_rel == config.crc32_file else None,
        sha256_file=sha_rel if sha_blob is not None else None,
        sha256_data=sha_blob,
        local_root=source.root if isinstance(source, LocalSource) else None,
    )
    if not manifest.files:
        # An empty directory (a mount that came back empty) is not a new, empty model.
        raise SourceError(source.url, "", "the model directory holds no files")
    return manifest, new_digest if manifest.crc32_file else ""


def _read_optional(source: Source, rel: str, limit: int) -> bytes | None:
    if not rel:
        return None
    try:
        return source.read_file(rel, limit)
    except SourceNotFoundError:
        return None


def _unlisted_unchanged(source: Source, known: Manifest) -> bool:
    for rel in known.unlisted:
        try:
            st = source.stat(rel)
        except SourceNotFoundError:
            return False
        entry = known.file(rel)
        if (st.size, st.mtime_ns, st.etag) != (entry.size, entry.mtime_ns, entry.etag):
            return False
    return True
