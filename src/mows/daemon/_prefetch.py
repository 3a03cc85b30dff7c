"""Idle prefetch: plans which chunks this node should hold and throttles their fetching.

Runs only while no client open is in progress (one pauses it before its next chunk), never
evicts, and writes chunks into *partial* pool files that peers may read but clients never
see; a client load completes such a file in place. A chunk is written under a hold on its file,
so eviction can take a partial file only between chunks. No error of one model stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

from .._config import DaemonConfig
from .._errors import ConfigError, IntegrityError, ManifestError
from ..manifest import Chunk, FileEntry
from ..pool import FileState, Pool, PoolFile, Version, index_file
from ._fetcher import ChunkFetcher, Counters, FillTarget
from ._fill import FileFill, check_digest, check_file, sha256_of_file
from ._loads import LoadService
from ._peering import Peering

__all__ = ["Prefetcher"]

log = logging.getLogger("mows.daemon")

REPLAN_INTERVAL = 5.0  # seconds between passes: membership and the model list change
MAX_EXTRA = 256  # models clients may add with `mows prefetch`
REVALIDATE_EVERY = 60.0  # seconds between prefetch's questions to the origin of a model


class Prefetcher:
    def __init__(
        self,
        config: DaemonConfig,
        pool: Pool,
        loads: LoadService,
        fetcher: ChunkFetcher,
        counters: Counters,
        peering: Peering | None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.loads = loads
        self.fetcher = fetcher
        self.counters = counters
        self.peering = peering
        self.extra: list[str] = []  # added by `mows prefetch`
        self.targets: list[str] = []  # the model paths (canonical), set by the daemon
        self.state: dict[str, dict[str, object]] = {}
        self._wake = asyncio.Event()
        self._rate_next = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def add(self, location: str) -> None:
        if location not in self.extra and len(self.extra) >= MAX_EXTRA:
            raise ConfigError(
                f"{location}: the prefetch list is full ({MAX_EXTRA} models added by clients); "
                "list models with --model-path instead"
            )
        if location not in self.extra:
            self.extra.append(location)
        self._wake.set()

    async def _run(self) -> None:
        if self.peering is not None:
            # Say which models we will hold before anyone computes who owns what.
            for location in self.targets:
                with contextlib.suppress(Exception):
                    await self.loads.resolve(location)
        await asyncio.sleep(self.config.prefetch_delay)  # let the other members appear
        while True:
            for location in dict.fromkeys(self.targets + self.extra):
                try:
                    await self._prefetch(location)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # one model's failure never stops the others
                    log.warning("prefetch of %s stopped: %s", location, e)
                    self.state.setdefault(location, {})["state"] = f"error: {e}"
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # re-plan as membership changes
                await asyncio.wait_for(self._wake.wait(), REPLAN_INTERVAL)

    async def _settled_members(self, vid: str) -> None:
        """Wait until the set of nodes holding this version has stopped changing, so every
        node computes the same owners (each chunk fetched once, shares even)."""
        assert self.peering is not None
        cluster = self.peering.cluster
        seen, since = cluster.interested(vid), time.monotonic()
        deadline = since + 15
        while time.monotonic() - since < 1.0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now = cluster.interested(vid)
            if now != seen:
                seen, since = now, time.monotonic()

    def _mine(self, v: Version, chunk: Chunk, share: bool) -> bool:
        if not share or self.peering is None or not self.peering.cluster.view_usable:
            return True
        cluster = self.peering.cluster
        index = v.chunk_range(chunk.path)[chunk.index]
        return cluster.owner(v.id, f"{v.id}/{index}") == cluster.node_id

    async def _prefetch(self, location: str) -> None:
        """Fetch this node's share of a model (or all of it) chunk by chunk, yielding to every
        client open, at most ``prefetch_rate`` bytes a second."""
        v, _ = await self.loads.resolve(location, max_age=REVALIDATE_EVERY)
        # A member while it runs (others count us in their owner tables, and wait for the
        # chunks we own), not while it is paused: a paused prefetch waited on by peers whose
        # own loads keep their prefetches paused would stall them all.
        with contextlib.ExitStack() as membership:
            peering = self.peering

            def member(running: bool) -> None:
                if peering is None:
                    return
                if running:
                    membership.enter_context(peering.loading(v, [e.path for e in v.manifest.files]))
                else:
                    membership.close()

            member(True)
            await self._prefetch_version(location, v, member)

    async def _prefetch_version(
        self, location: str, v: Version, member: Callable[[bool], None]
    ) -> None:
        share = self.peering is not None and self.config.prefetch == "share"
        if share:
            await self._settled_members(v.id)
            assert self.peering is not None
            await self.peering.cluster.owners_ready(v.id)  # the table, off the event loop
        plan = [
            (e, c) for e in v.manifest.files for c in v.chunks(e.path) if self._mine(v, c, share)
        ]
        state: dict[str, object] = {
            "policy": "share" if share else "full",
            "version": v.id,
            "target_bytes": sum(c.length for _, c in plan),
            "held_bytes": 0,
            "state": "running",
        }
        self.state[location] = state
        state["held_bytes"] = sum(c.length for e, c in plan if _present(v, e, c))
        for entry, chunk in plan:
            if _present(v, entry, chunk):
                continue
            if not self.loads.idle.is_set():
                state["state"] = "paused"
                member(False)
                await self.loads.idle.wait()
                member(True)
                state["state"] = "running"
            await self._throttle(chunk.length)
            if _present(v, entry, chunk) or not self._mine(v, chunk, share):
                continue
            if self.pool.versions.get(v.id) is not v or v.superseded:
                state["state"] = "superseded"  # the origin moved on: re-planned next pass
                return
            f = self.pool.reserve_chunk(v, entry.path, chunk.length)
            if f is None:
                taken = v.files.get(entry.path)
                if taken is not None and taken.state is not FileState.PARTIAL:
                    continue  # a load has taken the file over
                state["state"] = "stopped: the pool is full"
                return
            write = asyncio.ensure_future(self._write_chunk(location, f, chunk))
            self.loads.prefetch_writes[f] = write
            try:
                await asyncio.shield(write)
            finally:
                self.loads.prefetch_writes.pop(f, None)
            state["held_bytes"] = sum(c.length for e, c in plan if _present(v, e, c))
        state["state"] = "done"

    async def _write_chunk(self, location: str, f: PoolFile, chunk: Chunk) -> None:
        """One chunk into a partial pool file (held for the write), from a peer holding it,
        else the origin; completes the file when it was the last one missing."""
        crc: int | None = None
        target: FillTarget | None = None
        self.pool.pin([f], transient=True)  # a second hold, kept through the completion
        try:
            try:
                source = self.loads.source(location)
                fd = self.pool.open_partial(f)
                try:
                    target = FillTarget(source, f.version, FileFill(fd, f.size))
                except BaseException:
                    os.close(fd)
                    raise
                if self.peering is not None:
                    self.peering.serve_file(f, fd)
                crc = await self.fetcher.obtain(target, chunk, wait_for_owner=False)
            finally:
                if target is not None:
                    await target.drain()
                    if crc is None:  # whatever was written of the chunk leaves the pool too
                        target.fill.forget(chunk)
                    target.fill.close()
                self.pool.end_chunk(f, chunk.index, chunk.length, crc)
            if f.state is FileState.PARTIAL and len(f.chunk_crcs) == len(f.chunks()):
                await self._complete(f)
        finally:
            self.pool.unpin([f], transient=True)

    async def _complete(self, f: PoolFile) -> None:
        loop = asyncio.get_running_loop()
        try:
            actual = check_file(f, f.chunk_crcs, "prefetch")
            if f.entry.sha256 is not None:
                # Chunks came one by one, in any order, over minutes: one pass at the end
                # (background work; a load hashes while it fills instead).
                digest = await loop.run_in_executor(
                    self.loads.digest_executor, sha256_of_file, f.partial_path
                )
                check_digest(f, digest, "prefetch")
            index = await loop.run_in_executor(self.fetcher.executor, index_file, f)
        except (IntegrityError, ManifestError, OSError) as e:
            if f.state is not FileState.PARTIAL:
                return  # a load took the file over meanwhile: its own checks decide
            if isinstance(e, IntegrityError):
                self.counters.integrity_failures += 1
            log.error("prefetch: %s/%s: %s: dropped", f.version.manifest.source, f.rel, e)
            self.pool.discard(f)
            return
        if f.state is FileState.PARTIAL and f.version.files.get(f.rel) is f:
            self.pool.commit(f, f.chunk_crcs, actual)  # unless a load took it over meanwhile
            if index is not None:
                f.version.index[f.rel] = index

    async def _throttle(self, nbytes: int) -> None:
        rate = self.config.prefetch_rate
        if rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self._rate_next)
        self._rate_next = start + nbytes / rate
        if start > now:
            await asyncio.sleep(start - now)


def _present(v: Version, entry: FileEntry, chunk: Chunk) -> bool:
    f = v.files.get(entry.path)
    if f is None:
        return False
    return f.state is FileState.READY or chunk.index in f.chunk_crcs
