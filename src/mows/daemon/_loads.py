"""The load service: which version a location holds, admission to the pool, shared fills.

An open resolves its location to a version (a warm open revalidates with one cheap request:
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
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._config import DaemonConfig
from .._errors import (
    CapacityError,
    DaemonError,
    IntegrityError,
    MowsError,
    SourceError,
    SourceNotFoundError,
)
from ..manifest import MAX_CRC32_FILE_BYTES, Manifest, build_manifest
from ..pool import FileState, Pool, PoolFile, Version, index_file
from ..sources import Source
from ._fetcher import ChunkFetcher, Counters, FillTarget
from ._fill import FileFill, check_file
from ._peering import Peering

__all__ = ["LoadService", "Opened", "check_origin"]

log = logging.getLogger("mows.daemon")


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
    digest: str = ""  # sha256 of the crc32 file when last checked
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
        self.foreground = 0  # opens in progress: prefetch pauses while there are any
        self.idle = asyncio.Event()
        self.idle.set()
        pool.on_change = self._space_changed

    # -- versions ------------------------------------------------------------------------------
    async def resolve(self, location: str, max_age: float = 0.0) -> tuple[Version, str]:
        """The version ``location`` holds now, and why the origin could not be asked ("" if
        it was). Concurrent calls share one revalidation; ``max_age`` accepts an answer that
        old (prefetch re-plans often, and need not ask the origin each time)."""
        loc = self._locations.setdefault(location, _Location())
        if loc.version is None:
            record = self.pool.locations.get(location)
            if record is not None:
                loc.version, loc.digest = self.pool.versions.get(record.version), record.digest
        if (
            max_age
            and loc.version is not None
            and time.monotonic() - loc.checked_at < max_age
            and self.pool.versions.get(loc.version.id) is loc.version
        ):
            return loc.version, ""
        if loc.check is None:
            loc.check = asyncio.ensure_future(self._revalidate(location, loc))

            def done(_: object) -> None:
                loc.check = None

            loc.check.add_done_callback(done)
        return await asyncio.shield(loc.check)

    async def _revalidate(self, location: str, loc: _Location) -> tuple[Version, str]:
        known = loc.version
        loc.checks += 1
        try:
            source = self.source(location)
            manifest, digest = await asyncio.get_running_loop().run_in_executor(
                self.fetcher.executor,
                check_origin,
                source,
                known.manifest if known is not None else None,
                loc.digest,
                self.config,
            )
        except SourceError as e:
            if known is None or not any(f.state is FileState.READY for f in known.files.values()):
                raise
            loc.origin_error = str(e)
            self.counters.stale_opens += 1
            log.warning(
                "%s: origin unreachable (%s): opening the cached version %s", location, e, known.id
            )
            return known, str(e)
        loc.origin_error = None
        version = (
            known
            if manifest is None and known is not None
            else self.pool.version(
                manifest  # type: ignore[arg-type]
            )
        )
        self.pool.bind(location, version, digest)
        loc.version, loc.digest = version, digest
        if self.peering is not None:
            self.peering.join(version)
        return version, ""

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
    ) -> Opened:
        """Pin ``rels`` (None: every file) of the version ``location`` holds (or of
        ``version``, for a reader that must keep reading one version), fetching what is
        missing. The pins belong to the caller once this returns; on any failure none remain.
        """
        start = time.perf_counter()
        self.foreground += 1
        self.idle.clear()  # prefetch pauses before its next chunk
        try:
            if version is not None:
                v = self.pool.versions.get(version)
                if v is None:
                    raise DaemonError(
                        f"{location}: version {version} is no longer known to the daemon",
                        "DaemonError",
                    )
                stale = ""
            else:
                v, stale = await self.resolve(location)
            if rels is None:
                rels = [f.path for f in v.manifest.files]
            unknown = sorted(r for r in rels if not v.has(r))
            if unknown:
                raise SourceNotFoundError(location, unknown[0], "not in the model")
            ready_bytes = sum(v.entry(r).size for r in rels if v.ready(r) is not None)
            files = await self._admit(v, rels, transient)
            try:
                stats = await self._fill_all(location, files, progress)
            except BaseException:
                self.pool.unpin(files, transient=transient)
                raise
        except MowsError:
            self.counters.loads_failed += 1
            raise
        finally:
            self.foreground -= 1
            if not self.foreground:
                self.idle.set()
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

    async def _admit(self, v: Version, rels: list[str], transient: bool) -> list[PoolFile]:
        """Wait in line for room; only the head of the line may evict or take free space,
        so a big load is never starved by smaller ones (opens that need no space pass)."""
        ticket = object()
        self._queue.append(ticket)
        deadline = time.monotonic() + self.config.load_timeout
        try:
            while True:
                if self._queue[0] is ticket or self.pool.need(v, rels) == 0:
                    files = self.pool.admit(v, rels, transient=transient)
                    if files is not None:
                        return files
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CapacityError(
                        self.pool.explain(v, self.pool.need(v, rels))
                        + f" (waited {self.config.load_timeout:g}s: --load-timeout)"
                    )
                self._space.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._space.wait(), min(remaining, 1.0))
        finally:
            self._queue.remove(ticket)
            self._space_changed()

    def _space_changed(self) -> None:
        self._space.set()

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
        writing = self.prefetch_writes.get(f)
        if writing is not None:  # a prefetched chunk is being written: let it land first
            await asyncio.wait([writing])
        v = f.version
        stats = _FillStats()
        fd = self.pool.open_partial(f)
        target = FillTarget(self.source(location), v, FileFill(fd, f.size))
        crcs = dict(f.chunk_crcs)
        chunks = [c for c in f.chunks() if c.index not in crcs]
        stats.reused = sum(c.length for c in f.chunks() if c.index in crcs)
        f.filled_bytes = stats.reused
        tasks: list[asyncio.Task[int]] = []
        try:
            if self.peering is not None:
                self.peering.serve_file(f, fd)
                cluster = self.peering.cluster
                # On a cold cluster, let the other nodes loading this version announce
                # themselves before ownership is computed, so each chunk leaves the origin
                # about once. A warm cluster (someone holds chunks already) needs no wait.
                if cluster.healthy and not cluster.anyone_holds(v.id):
                    await asyncio.sleep(cluster.publish_interval * 3)
            tasks = [
                asyncio.ensure_future(self.fetcher.obtain(target, c, wait_for_owner=True))
                for c in chunks
            ]
            for c, t in zip(chunks, tasks, strict=True):
                crcs[c.index] = await t
                f.filled_bytes += c.length
            stats.from_origin, stats.from_peers = target.from_origin, target.from_peers
            try:
                actual = check_file(f, crcs, "origin" if not stats.from_peers else "the cluster")
            except IntegrityError:
                self.counters.integrity_failures += 1
                raise
            index = await asyncio.get_running_loop().run_in_executor(
                self.fetcher.executor, index_file, f
            )
            target.fill.close()
            self.pool.commit(f, crcs, actual)
            if index is not None:
                v.index[f.rel] = index
            return stats
        except BaseException:
            for t in tasks:
                t.cancel()
            await target.drain()  # reads still running write into the mapping
            await asyncio.gather(*tasks, return_exceptions=True)
            self.pool.discard(f)
            raise
        finally:
            target.fill.close()

    async def drain(self, timeout: float) -> None:
        tasks = list(self._fills.values())
        if tasks:
            log.info("draining %d fills (up to %.0fs)", len(tasks), timeout)
            await asyncio.wait(tasks, timeout=timeout)

    async def close(self) -> None:
        for t in list(self._fills.values()):
            t.cancel()
        await asyncio.gather(*self._fills.values(), return_exceptions=True)


def check_origin(
    source: Source, known: Manifest | None, digest: str, config: DaemonConfig
) -> tuple[Manifest | None, str]:
    """Ask the origin whether ``known`` is still what it holds: one read of the crc32 file
    when its digest still matches (and a stat per file it does not list). Returns (None,
    digest) if unchanged, else the new manifest (tensor indexes are parsed later, from the
    verified pool bytes) and its crc32 file's digest. Runs in a worker thread."""
    if known is not None and known.crc32_file:
        try:
            blob: bytes | None = source.read_file(known.crc32_file, MAX_CRC32_FILE_BYTES)
        except SourceNotFoundError:
            blob = None
        if blob is not None and hashlib.sha256(blob).hexdigest() == digest:
            unchanged = True
            for rel in known.unlisted:
                st = source.stat(rel)
                entry = known.file(rel)
                unchanged &= st.size == entry.size and st.mtime_ns == entry.mtime_ns
            if unchanged:
                return None, digest
    manifest = build_manifest(
        source, chunk_size=config.chunk_size, crc32_file=config.crc32_file, index_tensors=False
    )
    new_digest = ""
    if manifest.crc32_file:
        blob = source.read_file(manifest.crc32_file, MAX_CRC32_FILE_BYTES)
        new_digest = hashlib.sha256(blob).hexdigest()
    return manifest, new_digest
