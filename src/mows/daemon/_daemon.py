"""The node daemon's composition root: builds the services, authorizes paths, runs them.

    LocalApi (_api)      connections, requests, per-connection pins
    LoadService (_loads) locations -> versions, the wait queue for space, shared file fills
    ChunkFetcher         peer-then-origin policy with per-peer circuit breakers
    Prefetcher           what to prefetch, and how fast
    Scrubber (_scrub)    READY pool files re-checked against their chunk CRCs in idle time
    Peering              peer server/client and the cluster directory (cluster mode only)
    Pool (mows.pool)     versions in shared memory under the cap
    build_status         the status document, built on the loop (metrics ask the loop for it)

Everything that touches shared state runs on one asyncio event loop; worker threads only
read from sources and peers and compute CRCs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from urllib.parse import unquote

from .. import _protocol as p
from .._config import DaemonConfig
from .._errors import AccessDeniedError, ConfigError, DaemonError, MowsError
from ..cluster import NodeInfo
from ..pool import FileState, PoolFile
from ..sources import Source, open_source
from ..sources._local import LocalSource
from ._api import LocalApi
from ._chunks import ChunkTable
from ._fetcher import ChunkFetcher, Counters
from ._fill import verify_pool_file
from ._loads import LoadService, Opened
from ._metrics import Metrics
from ._peering import Peering
from ._prefetch import Prefetcher
from ._scrub import Scrubber
from ._status import build_status

__all__ = ["Daemon", "run_daemon"]

log = logging.getLogger("mows.daemon")


class Daemon:
    def __init__(
        self, config: DaemonConfig, reload: Callable[[], DaemonConfig] | None = None
    ) -> None:
        from ..pool import Pool

        self.config = config
        self._reload = reload
        self._draining = False
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counters = Counters()
        self.chunks = ChunkTable()
        self.pool = Pool(config.pool_dir, config.max_memory)
        self.metrics = Metrics(self.snapshot)
        self.peering: Peering | None = None
        self._sources: dict[str, Source] = {}
        self.fetcher = ChunkFetcher(config, self.counters, self.metrics, None)
        self.loads = LoadService(config, self.pool, self.fetcher, self.counters, None, self.source)
        self.prefetcher: Prefetcher | None = None
        self.scrubber = Scrubber(config, self.pool, self.loads)
        self.pool.sending = self._reading  # files read now are not evicted (see Pool.sending)
        self.api = LocalApi(config.socket, config.socket_mode, self)
        self._roots = [_canonical_root(r) for r in config.roots]

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        adopted = await self._loop.run_in_executor(
            self.fetcher.executor, self.pool.adopt, verify_pool_file
        )
        if adopted:
            log.info("adopted %d verified bytes from a previous run", adopted)
        if self.config.etcd:
            self.peering = Peering(self.config, self.chunks, self.node_info)
            self.fetcher.peering = self.loads.peering = self.peering
            self.pool.last_copy = self.peering.is_last_copy
            self.pool.stop_serving = self.peering.stop_serving
            self.pool.drain = self.peering.drain
            self.pool.on_remove = self.peering.file_removed
            self.pool.on_commit = self.peering.file_ready
            self.chunks.on_rotten = self._rotten_threadsafe
            self.peering.cluster.on_owners = self._owners_changed
            await self.peering.start(",".join(self.config.etcd))
            for v in list(self.pool.versions.values()):  # adopted: serve them to peers now
                if not v.superseded:
                    self.peering.join(v)
        if self.config.prefetch != "off":
            self.prefetcher = Prefetcher(
                self.config, self.pool, self.loads, self.fetcher, self.counters, self.peering
            )
            self.prefetcher.targets = [_canonical_root(r) for r in self.config.model_paths]
            self.prefetcher.start()
        self.scrubber.start()
        if self.config.metrics_listen:
            self.metrics.serve(self.config.metrics_listen)
            log.info("Prometheus metrics on http://%s/metrics", self.config.metrics_listen)
        await self.api.start()
        log.info(
            "serving on %s, pool %s, cap %d bytes, roots %s",
            self.config.socket,
            self.config.pool_dir,
            self.config.max_memory,
            ", ".join(self._roots) or "(none)",
        )

    def node_info(self, node_id: str, address: str) -> NodeInfo:
        return NodeInfo(
            node_id,
            address,
            self.config.max_memory,
            self.pool.used_bytes,
            self.counters.bytes_from_origin,
            self.counters.bytes_from_peers,
            self.chunks.bytes_served,
        )

    def stop(self) -> None:
        self._stopping.set()

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_logged)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        try:
            await self._stopping.wait()
            await self.drain()
        finally:
            await self.close()

    async def drain(self) -> None:
        """Refuse new loads and give those in progress ``drain_timeout`` seconds to finish."""
        self._draining = True
        await self.loads.drain(self.config.drain_timeout)

    def reload(self) -> dict[str, object]:
        """Re-read the settings; the model list and allowed roots change at once."""
        if self._reload is None:
            raise MowsError("this daemon was started without a way to re-read its settings")
        new = self._reload()
        changed = [
            f.name
            for f in dataclasses.fields(new)
            if f.name not in ("model_paths", "allow_roots")
            and getattr(new, f.name) != getattr(self.config, f.name)
        ]
        if changed:
            log.warning("reload: %s changed but take effect at restart", ", ".join(changed))
        self.config = dataclasses.replace(
            self.config, model_paths=new.model_paths, allow_roots=new.allow_roots
        )
        self._roots = [_canonical_root(r) for r in self.config.roots]
        if self.prefetcher is not None:
            self.prefetcher.targets = [_canonical_root(r) for r in self.config.model_paths]
        log.info("reloaded: roots %s", ", ".join(self._roots) or "(none)")
        return {"reloaded": True, "roots": list(self._roots), "restart_needed_for": changed}

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except MowsError as e:
            log.error("reload failed, keeping the old settings: %s", e)

    async def close(self) -> None:
        self.api.stop_accepting()  # no new clients while we wind down
        if self.prefetcher is not None:
            await self.prefetcher.close()
        await self.scrubber.close()
        if self.peering is not None:
            await self.peering.close()
        self.api.close()
        await self.loads.close()
        for src in self._sources.values():
            src.close()
        self.fetcher.close()
        self.chunks.close()
        self.metrics.close()
        log.info("stopped")

    # -- access control and sources --------------------------------------------------------------
    def authorize(self, path: str) -> str:
        """The canonical location for ``path``, if it lies under an allowed root."""
        if "\x00" in path:
            raise AccessDeniedError(f"{path[:200]!r}: a path cannot contain a NUL byte")
        if "://" in path:
            location = path.rstrip("/")
            # Decoded before any check: "%2e%2e/" is "../" to the origin that receives it.
            decoded = unquote(location)
            if "/../" in decoded + "/" or "/./" in decoded + "/" or "\\" in decoded:
                raise AccessDeniedError(f"{path}: relative segments are not allowed in a URL")
            for root in self._roots:
                if "://" in root and (location == root or location.startswith(root + "/")):
                    return location
        else:
            if not os.path.isabs(path):
                raise AccessDeniedError(f"{path}: the daemon needs an absolute path")
            location = os.path.realpath(path)
            for root in self._roots:
                if "://" not in root and os.path.commonpath([location, root]) == root:
                    return location
        raise AccessDeniedError(
            f"{path}: not under the daemon's model paths or allowed roots "
            f"({', '.join(self._roots) or 'none configured'})"
        )

    def _rotten_threadsafe(self, vid: str, rel: str) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._rotten, vid, rel)

    def _reading(self, f: PoolFile) -> bool:
        """Is ``f`` being read now by a peer's send or by the scrub?"""
        sent = self.peering is not None and self.peering.sending(f)
        return sent or self.scrubber.reading is f

    def _owners_changed(self, vid: str, table: list[str]) -> None:
        v = self.pool.versions.get(vid)
        if v is not None and self.peering is not None:
            self.peering.owners_changed(v, table)

    def _rotten(self, vid: str, rel: str) -> None:
        """A file's bytes no longer match a chunk's CRC (memory gone bad since it was checked):
        drop it so the next open fetches it again (clients that map it keep their mapping,
        counted until they let go: ``Pool.retire``). One still filling is no longer served to
        peers and is dropped as soon as its holders let go."""
        v = self.pool.versions.get(vid)
        f = v.files.get(rel) if v is not None else None
        if f is None:
            return
        self.counters.integrity_failures += 1
        if f.state is FileState.READY:  # out of service now, whoever maps it
            log.error("%s/%s rotted in memory: dropped, the next open fetches it again", vid, rel)
            self.pool.retire(f)
            return
        if f.locked:
            log.error(
                "%s/%s rotted in memory while clients hold it: dropped once released", vid, rel
            )
            if self.peering is not None:
                self.peering.file_removed(f)
            f.rotten = True
            return
        log.error("%s/%s rotted in memory: dropped, the next open fetches it again", vid, rel)
        self.pool.discard(f)

    def source(self, location: str) -> Source:
        src = self._sources.get(location)
        if src is None:
            src = open_source(location, **self.config.sources)
            if isinstance(src, LocalSource) and src.root != location:
                # Authorized as its real path, resolved again now: a directory swapped for a
                # symlink in between would anchor the source outside the allowed roots.
                src.close()
                raise AccessDeniedError(f"{location}: changed while being opened (a symlink)")
            self._sources[location] = src
        return src

    # -- what the local API asks ---------------------------------------------------------------
    async def open(self, msg: p.Open, progress: Callable[[int, int], None]) -> Opened:
        if self._draining:
            raise DaemonError("the daemon is shutting down", "DaemonError")
        location = self.authorize(msg.path)
        if msg.crc32_file is not None and msg.crc32_file != self.config.crc32_file:
            raise ConfigError(
                f"{msg.path}: this daemon checks models against {self.config.crc32_file!r} "
                f"(its crc32_file setting); a client cannot choose another ({msg.crc32_file!r})"
            )
        # Whole-model opens hold their files for a client; file subsets (streaming) and
        # unpinned opens hold them only while they last.
        transient = msg.files is not None or not msg.pin
        return await self.loads.open(
            location,
            msg.files,
            transient=transient,
            version=msg.version,
            progress=progress,
            wait=msg.wait,
        )

    def add_prefetch(self, path: str) -> dict[str, object]:
        location = self.authorize(path)
        if self.prefetcher is None:
            raise ConfigError("prefetch is off on this daemon (--prefetch off)")
        self.prefetcher.add(location)
        return {"queued": location, "policy": self.config.prefetch}

    async def scrub(self) -> dict[str, object]:
        """A full scrub pass now (``mows scrub``): every READY pool file re-read against its
        chunk CRCs, bad ones dropped; what it found."""
        if self._draining:
            raise DaemonError("the daemon is shutting down", "DaemonError")
        return await self.scrubber.run_now()

    def known_locations(self) -> list[str]:
        known = dict.fromkeys(_canonical_root(r) for r in self.config.model_paths)
        known.update(dict.fromkeys(self.pool.locations))
        return sorted(known)

    def status(self) -> dict[str, object]:
        """The status document; on the event loop only (see ``snapshot``)."""
        return build_status(self)

    def snapshot(self) -> dict[str, object]:
        """The status document from any thread: built on the loop, handed over whole."""
        loop = self._loop
        if loop is None or not loop.is_running():
            raise DaemonError("the daemon is not running", "DaemonError")

        async def build() -> dict[str, object]:
            return self.status()

        return asyncio.run_coroutine_threadsafe(build(), loop).result(10)


def _canonical_root(root: str) -> str:
    return root.rstrip("/") if "://" in root else os.path.realpath(root)


def run_daemon(config: DaemonConfig, reload: Callable[[], DaemonConfig] | None = None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP calls ``reload`` for a new model list; SIGUSR1 logs
    where every task and thread is (a load that seems stuck)."""

    async def main() -> None:
        await Daemon(config, reload).serve_forever()

    asyncio.run(main())


def _dump_tasks() -> None:
    """Log every asyncio task's suspended stack and every thread's: where work waits."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        out.write(f"\n--- {task!r}\n")
        for f in task.get_stack(limit=12):  # (print_stack fails on Cython frames: no line)
            out.write(f"  {f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}\n")
    frames = sys._current_frames()
    for t in threading.enumerate():
        frame = frames.get(t.ident or -1)
        if frame is not None:
            out.write(f"\n--- thread {t.name}\n")
            out.write("".join(traceback.format_stack(frame, limit=12)))
    log.warning("SIGUSR1: tasks and threads:%s", out.getvalue())
