"""The node daemon: the pool, the fetch workers and the local API on a Unix socket.

Everything that touches shared state runs on one asyncio event loop; worker threads only read
from sources and compute CRCs. One load task per model is shared by every client that asks
for it; each client connection holds pins that are dropped when it closes, however it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import _protocol as p
from .._config import DaemonConfig
from .._errors import (
    AccessDeniedError,
    DaemonError,
    IntegrityError,
    MowsError,
    PeerError,
    ProtocolError,
    SourceNotFoundError,
)
from ..cluster import Cluster, NodeInfo, fingerprint
from ..manifest import Chunk, FileEntry, Manifest, build_manifest
from ..pool import FileState, Pool, PoolFile, WouldWait, model_id
from ..sources import Source, open_source
from ..transport import PeerClient, PeerServer, TcpPeerClient, TcpPeerServer
from ._chunks import ChunkTable
from ._loader import FileFill, crc_of_pool_file, fetch_chunk, file_crc
from ._metrics import Metrics

__all__ = ["Daemon", "run_daemon"]

log = logging.getLogger("mows.daemon")

PROGRESS_INTERVAL = 0.1  # seconds between progress messages to a client

_Send = Callable[[msgspec.Struct], Awaitable[None]]
_PinKey = tuple[str, tuple[str, ...] | None]  # (model, files) as the client pinned them


def _pin_key(model: str, files: list[str] | None) -> _PinKey:
    return (model, None if files is None else tuple(sorted(files)))


@dataclass
class _Load:
    """One fetch of one model, shared by every client waiting for it."""

    model: str
    location: str
    done: int = 0
    total: int = 0
    from_origin: int = 0
    from_peers: int = 0
    reused: int = 0  # prefetched chunks this load found in place
    subscribers: set[asyncio.Queue[tuple[int, int]]] = field(default_factory=set)
    task: asyncio.Task[p.Ready] | None = None

    def publish(self) -> None:
        for q in self.subscribers:
            if q.empty():  # latest value wins; never queue stale progress
                q.put_nowait((self.done, self.total))


@dataclass
class _Counters:
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    bytes_from_pool: int = 0
    hits: int = 0
    misses: int = 0
    integrity_failures: int = 0
    loads_failed: int = 0
    peer_failures: int = 0
    corrupt_from_peers: int = 0


@dataclass
class _FetchJob:
    """The state one fetch of missing files shares between its chunk tasks."""

    load: _Load
    source: Source
    manifest: Manifest
    fp: str
    base: dict[str, int] = field(default_factory=dict)  # file -> index of its first chunk
    total_chunks: int = 0
    running: set[concurrent.futures.Future[int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.base = self.bases(self.manifest)
        self.total_chunks = sum(-(-f.size // self.manifest.chunk_size) for f in self.manifest.files)

    @staticmethod
    def bases(manifest: Manifest) -> dict[str, int]:
        """Each file's first chunk in the model-wide chunk numbering of the directory."""
        out, n = {}, 0
        for f in manifest.files:
            out[f.path] = n
            n += -(-f.size // manifest.chunk_size)
        return out


def _fetch_from_peer(
    peers: PeerClient, address: str, fp: str, fill: FileFill, chunk: Chunk, crc: int
) -> int:
    view = fill.view[chunk.offset : chunk.offset + chunk.length]
    try:
        return peers.fetch(address, fp, chunk.path, chunk.index, view, crc)
    finally:
        view.release()


class Daemon:
    def __init__(
        self, config: DaemonConfig, reload: Callable[[], DaemonConfig] | None = None
    ) -> None:
        self.config = config
        self._reload = reload
        self._draining = False
        self.pool = Pool(config.pool_dir, config.max_memory, on_remove=self._on_pool_remove)
        self.counters = _Counters()
        self.chunks = ChunkTable()
        self.cluster: Cluster | None = None
        self.peers: PeerClient | None = None
        self._peer_server: PeerServer | None = None
        self.metrics = Metrics(self.status)
        self._fingerprints: dict[str, str] = {}  # model id -> cluster fingerprint
        self._model_locks: dict[str, asyncio.Lock] = {}
        # Idle prefetch: runs only while no client load is in progress.
        self._foreground = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._prefetch_wake = asyncio.Event()
        self._prefetch_extra: list[str] = []
        self._prefetch_task: asyncio.Task[None] | None = None
        self._rate_next = 0.0
        self.prefetch_state: dict[str, dict[str, object]] = {}
        self._inflight: dict[str, int] = {}  # peer node -> chunk requests in flight
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="mows-fetch")
        # Peer transfers get their own workers: queued behind origin reads they would wait
        # for the origin, and a cold cluster would lose its pipelining.
        self._peer_executor = ThreadPoolExecutor(
            2 * config.peer_connections, thread_name_prefix="mows-peer"
        )
        self._loads: dict[str, _Load] = {}
        self._manifests: dict[str, Manifest] = {}
        self._sources: dict[str, Source] = {}
        self._pool_changed = asyncio.Event()
        self._clients = 0
        self._server: asyncio.AbstractServer | None = None
        self._stopping = asyncio.Event()
        self._roots = [self._canonical_root(r) for r in config.roots]

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        adopted = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.pool.adopt, crc_of_pool_file
        )
        if adopted:
            log.info("adopted %d verified bytes from a previous run", adopted)
        if self.config.etcd:
            await self._start_cluster()
        if self.config.prefetch != "off":
            self._prefetch_task = asyncio.ensure_future(self._prefetch_loop())
        if self.config.metrics_listen:
            self.metrics.serve(self.config.metrics_listen)
            log.info("Prometheus metrics on http://%s/metrics", self.config.metrics_listen)
        path = self.config.socket
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        _claim_socket_path(path)
        self._server = await asyncio.start_unix_server(self._serve_client, path=path)
        os.chmod(path, self.config.socket_mode)
        log.info(
            "serving on %s, pool %s, cap %d bytes, roots %s",
            path,
            self.config.pool_dir,
            self.config.max_memory,
            ", ".join(self._roots) or "(none)",
        )

    async def _start_cluster(self) -> None:
        cfg = self.config
        secret = cfg.cluster_secret()
        server_cls, client_cls = _transport(cfg.nic)
        # The node id is the advertised address unless set, and the address is known only
        # once the server listens: name the server after the fact.
        server = server_cls(cfg.listen, self.chunks, node=cfg.node_id or "?", secret=secret)
        self._peer_server = server
        host, _, port = server.address.rpartition(":")
        advertise = cfg.advertise or (
            f"{socket.gethostname()}:{port}" if host in ("0.0.0.0", "::") else server.address
        )
        node_id = cfg.node_id or advertise
        server._node = node_id
        self.peers = client_cls(
            node=node_id, secret=secret, connections=cfg.peer_connections, timeout=cfg.peer_timeout
        )

        def info() -> NodeInfo:
            return NodeInfo(
                node_id,
                advertise,
                cfg.max_memory,
                self.pool.used_bytes,
                self.counters.bytes_from_origin,
                self.counters.bytes_from_peers,
                self.chunks.bytes_served,
            )

        self.cluster = Cluster(list(cfg.etcd), cfg.cluster, info, ttl=cfg.lease_ttl)
        self.pool.last_copy = self._is_last_copy
        self.cluster.start()
        if not await self.cluster.wait_healthy(5.0):
            log.warning("etcd %s not reachable yet: running alone until it is", ",".join(cfg.etcd))
        log.info("node %s in cluster %s, peers connect to %s", node_id, cfg.cluster, advertise)

    def _is_last_copy(self, f: PoolFile) -> bool:
        """Would evicting ``f`` drop the cluster's last copy of any of its chunks?"""
        fp, manifest = self._fingerprints.get(f.model), self._manifests.get(f.model)
        if self.cluster is None or fp is None or manifest is None or not self.cluster.healthy:
            return True
        base = _FetchJob.bases(manifest).get(f.rel)
        if base is None:
            return True
        n = -(-f.size // manifest.chunk_size)
        return self.cluster.min_copies(fp, base, base + n) <= 1

    def _on_pool_remove(self, f: PoolFile) -> None:
        """A file left the pool: stop serving it and tell the cluster."""
        fp = self._fingerprints.get(f.model)
        if fp is None:
            return
        self.chunks.remove_file(fp, f.rel)
        manifest = self._manifests.get(f.model)
        if self.cluster is not None and manifest is not None:
            base = _FetchJob.bases(manifest)[f.rel]
            n = -(-f.size // manifest.chunk_size)
            self.cluster.drop(fp, list(range(base, base + n)))

    def stop(self) -> None:
        self._stopping.set()

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_logged)
        try:
            await self._stopping.wait()
            await self.drain()
        finally:
            await self.close()

    async def drain(self) -> None:
        """Refuse new loads and give those in progress ``drain_timeout`` seconds to finish."""
        self._draining = True
        tasks = [load.task for load in self._loads.values() if load.task is not None]
        if tasks:
            log.info("draining %d loads (up to %.0fs)", len(tasks), self.config.drain_timeout)
            await asyncio.wait(tasks, timeout=self.config.drain_timeout)

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
        self._roots = [self._canonical_root(r) for r in self.config.roots]
        log.info("reloaded: roots %s", ", ".join(self._roots) or "(none)")
        return {"reloaded": True, "roots": list(self._roots), "restart_needed_for": changed}

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except MowsError as e:
            log.error("reload failed, keeping the old settings: %s", e)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()  # no new clients while we wind down
        if self._prefetch_task is not None:
            self._prefetch_task.cancel()
            with contextlib.suppress(BaseException):
                await self._prefetch_task
        if self.cluster is not None:
            await self.cluster.close()  # deregister first: peers stop asking us
        if self._peer_server is not None:
            self._peer_server.close()
        if self.peers is not None:
            self.peers.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket)
        for load in list(self._loads.values()):
            if load.task is not None:
                load.task.cancel()
                with contextlib.suppress(BaseException):
                    await load.task
        for src in self._sources.values():
            src.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._peer_executor.shutdown(wait=True, cancel_futures=True)
        self.chunks.close()
        self.metrics.close()
        log.info("stopped")

    # -- access control ------------------------------------------------------------------------
    @staticmethod
    def _canonical_root(root: str) -> str:
        return root.rstrip("/") if "://" in root else os.path.realpath(root)

    def authorize(self, path: str) -> str:
        """The canonical location for ``path``, if it lies under an allowed root."""
        if "://" in path:
            location = path.rstrip("/")
            for root in self._roots:
                if "://" in root and (location == root or location.startswith(root + "/")):
                    if "/../" in location + "/" or "/./" in location + "/":
                        break
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

    # -- loading -------------------------------------------------------------------------------
    def _source(self, location: str) -> Source:
        src = self._sources.get(location)
        if src is None:
            src = self._sources[location] = open_source(location, **self.config.sources)
        return src

    async def open_model(
        self,
        path: str,
        crc32_file: str | None,
        progress: asyncio.Queue[tuple[int, int]] | None,
        files: list[str] | None = None,
    ) -> p.Ready:
        if self._draining:
            raise DaemonError("the daemon is shutting down", "DaemonError")
        location = self.authorize(path)
        mid = model_id(location)
        key = mid if files is None else f"{mid}|{'|'.join(sorted(files))}"
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = _Load(mid, location)
            load.task = asyncio.ensure_future(self._run_load(load, crc32_file, files))
            load.task.add_done_callback(functools.partial(self._load_done, key))
        if progress is not None:
            load.subscribers.add(progress)
        self._foreground += 1
        self._idle.clear()  # prefetch pauses before its next chunk
        try:
            assert load.task is not None
            return await asyncio.shield(load.task)
        finally:
            if progress is not None:
                load.subscribers.discard(progress)
            self._foreground -= 1
            if not self._foreground:
                self._idle.set()

    def _load_done(self, mid: str, _task: object) -> None:
        self._loads.pop(mid, None)

    async def _run_load(
        self, load: _Load, crc32_file: str | None, only: list[str] | None = None
    ) -> p.Ready:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        source = self._source(load.location)
        manifest = await loop.run_in_executor(
            self._executor,
            functools.partial(
                build_manifest,
                source,
                chunk_size=self.config.chunk_size,
                crc32_file=crc32_file or self.config.crc32_file,
            ),
        )
        self._manifests[load.model] = manifest
        if self.cluster is not None:
            self._advertise_ready(load.model, manifest)
        wanted = manifest.files
        if only is not None:
            unknown = set(only) - {f.path for f in manifest.files}
            if unknown:
                raise SourceNotFoundError(load.location, sorted(unknown)[0], "not in the model")
            wanted = tuple(f for f in manifest.files if f.path in set(only))
        rels = [f.path for f in wanted]
        # One fetch at a time per model: concurrent subset loads (streaming) never race for
        # the same pool file. Identical requests already share one load task.
        async with self._model_locks.setdefault(load.model, asyncio.Lock()):
            self.pool.mark_busy(load.model, rels)
            try:
                missing = [f for f in wanted if not self._fresh(load.model, f)]
                load.total = sum(f.size for f in missing)
                from_pool = sum(f.size for f in wanted) - load.total
                if missing:
                    self.counters.misses += 1
                    await self._fetch(load, source, manifest, missing)
                else:
                    self.counters.hits += 1
                self.counters.bytes_from_pool += from_pool
            except MowsError:
                self.counters.loads_failed += 1
                raise
            finally:
                self.pool.unmark_busy(load.model, rels)
                self._pool_changed.set()
        files = {}
        for f in wanted:
            pf = self.pool.get(load.model, f.path)
            assert pf is not None and pf.state is FileState.READY
            files[f.path] = pf.path
        return p.Ready(
            model=load.model,
            manifest=manifest,
            files=files,
            bytes_from_origin=load.from_origin,
            bytes_from_peers=load.from_peers,
            bytes_from_pool=from_pool + load.reused,
            seconds=time.perf_counter() - start,
        )

    def _advertise_ready(self, model: str, manifest: Manifest) -> None:
        """Serve the model's complete pool files to peers (adopted or loaded earlier)."""
        assert self.cluster is not None
        fp = self._fingerprints[model] = fingerprint(manifest)
        bases = _FetchJob.bases(manifest)
        self.cluster.join(
            fp, sum(-(-f.size // manifest.chunk_size) for f in manifest.files), manifest
        )
        for entry in manifest.files:
            pf = self.pool.get(model, entry.path)
            if not self._fresh(model, entry) or pf is None or self.chunks.has_file(fp, entry.path):
                continue
            if pf.chunk_size != manifest.chunk_size:
                continue  # recorded under another chunk size: the CRCs do not line up
            fd = os.open(pf.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.chunks.add_file(fp, entry.path, fd)
            finally:
                os.close(fd)
            for c, crc in zip(manifest.chunks(entry.path), pf.chunk_crcs, strict=True):
                self.chunks.add_chunk(fp, entry.path, c.index, c.offset, c.length, crc)
                self.cluster.mark_held(fp, bases[entry.path] + c.index, crc)

    def _fresh(self, model: str, entry: FileEntry) -> bool:
        """Is the pool's copy ready and still the source's current file?"""
        pf = self.pool.get(model, entry.path)
        return (
            pf is not None
            and pf.state is FileState.READY
            and pf.size == entry.size
            and pf.mtime_ns == entry.mtime_ns
            and (entry.crc32 is None or entry.crc32 == pf.crc32)
        )

    async def _reserve(
        self, model: str, manifest: Manifest, missing: list[FileEntry]
    ) -> list[PoolFile]:
        while True:
            try:
                return self.pool.reserve(
                    model,
                    manifest.source,
                    ((f.path, f.size, f.mtime_ns) for f in missing),
                    {f.path: f.size for f in manifest.files},
                )
            except WouldWait:
                log.info("%s waits for loads in progress to free pool space", manifest.source)
                self._pool_changed.clear()
                await self._pool_changed.wait()

    async def _fetch(
        self, load: _Load, source: Source, manifest: Manifest, missing: list[FileEntry]
    ) -> None:
        pool_files = await self._reserve(load.model, manifest, missing)
        job = _FetchJob(load, source, manifest, fingerprint(manifest))
        fills: dict[str, FileFill] = {}
        tasks: list[asyncio.Task[int]] = []
        last_publish = 0.0
        try:
            if self.cluster is not None:
                self._fingerprints[load.model] = job.fp
                self.cluster.join(job.fp, job.total_chunks, manifest)
                # On a cold cluster, let the other nodes loading this model announce
                # themselves before ownership is computed, so each chunk leaves the origin
                # about once. A warm cluster (someone holds chunks already) needs no wait.
                if self.cluster.healthy and not self.cluster.anyone_holds(job.fp):
                    await asyncio.sleep(self.cluster.publish_interval * 3)
            for pf in pool_files:
                fd = self.pool.create_partial(pf)
                fills[pf.rel] = FileFill(fd, pf.size)
                if self.cluster is not None:
                    self.chunks.add_file(job.fp, pf.rel, fd)
            per_file: dict[str, list[asyncio.Task[int]]] = {}
            for entry, pf in zip(missing, pool_files, strict=True):
                per_file[entry.path] = [
                    asyncio.ensure_future(self._obtain(job, fills[entry.path], chunk, pf.held))
                    for chunk in manifest.chunks(entry.path)
                ]
                tasks.extend(per_file[entry.path])
            for entry, pf in zip(missing, pool_files, strict=True):
                chunks = manifest.chunks(entry.path)
                crcs = []
                for chunk, task in zip(chunks, per_file[entry.path], strict=True):
                    crcs.append(await task)
                    load.done += chunk.length
                    now = time.monotonic()
                    if now - last_publish >= PROGRESS_INTERVAL:
                        last_publish = now
                        load.publish()
                actual = file_crc(crcs, chunks)
                if entry.crc32 is not None and actual != entry.crc32:
                    self.counters.integrity_failures += 1
                    raise IntegrityError(
                        f"{load.location}/{entry.path}", entry.crc32, actual, source="origin"
                    )
                fills.pop(entry.path).close()
                self.pool.commit(pf, manifest.chunk_size, crcs, actual)
            load.publish()
        except BaseException:
            for t in tasks:
                t.cancel()
            # Reads still running write into the mappings: let them end before unmapping.
            running = [f for f in job.running if not f.done()]
            if running:
                await asyncio.get_running_loop().run_in_executor(
                    None, concurrent.futures.wait, running
                )
            await asyncio.gather(*tasks, return_exceptions=True)
            for pf in pool_files:
                if pf.state is FileState.FILLING:
                    self.pool.discard(pf)
            raise
        finally:
            for fill in fills.values():
                fill.close()

    async def _in_worker(
        self, job: _FetchJob, pool: ThreadPoolExecutor, fn: Callable[..., int], *args: object
    ) -> int:
        """Run a blocking read in a worker, tracked so a failed load can wait for it."""
        cf = pool.submit(fn, *args)
        job.running.add(cf)
        try:
            return await asyncio.wrap_future(cf)
        finally:
            job.running.discard(cf)

    async def _obtain(
        self, job: _FetchJob, fill: FileFill, chunk: Chunk, held: dict[int, int] | None = None
    ) -> int:
        """One chunk into the pool mapping, from a peer that holds it or from the origin."""
        index = job.base[chunk.path] + chunk.index
        if held and chunk.index in held:  # prefetched into this very file already
            self.counters.bytes_from_pool += chunk.length
            job.load.reused += chunk.length
            self._held(job, chunk, index, held[chunk.index])
            return held[chunk.index]
        cluster = self.cluster
        failed: set[str] = set()
        deadline: float | None = None
        while cluster is not None and cluster.healthy:
            holders = {n: c for n, c in cluster.holders(job.fp, index).items() if n not in failed}
            if holders:
                node = min(holders, key=lambda n: (self._inflight.get(n, 0), random.random()))
                address = cluster.address(node)
                if address is None:
                    failed.add(node)
                    continue
                self._inflight[node] = self._inflight.get(node, 0) + 1
                started = time.perf_counter()
                try:
                    crc = await self._in_worker(
                        job,
                        self._peer_executor,
                        _fetch_from_peer,
                        self.peers,
                        address,
                        job.fp,
                        fill,
                        chunk,
                        holders[node],
                    )
                except PeerError as e:
                    failed.add(node)
                    self.counters.peer_failures += 1
                    if e.corrupt:
                        self.counters.corrupt_from_peers += 1
                    log.warning("%s; retrying %s chunk %d elsewhere", e, chunk.path, chunk.index)
                    continue
                finally:
                    self._inflight[node] -= 1
                self.metrics.fetch_seconds.labels("peers").observe(time.perf_counter() - started)
                self.counters.bytes_from_peers += chunk.length
                job.load.from_peers += chunk.length
                self._held(job, chunk, index, crc)
                return crc
            owner = cluster.owner(job.fp, f"{job.fp}/{index}")
            if owner == cluster.node_id or owner in failed:
                break  # ours to fetch, or the owner already failed us: go to the origin
            now = time.monotonic()
            deadline = deadline or now + self.config.peer_timeout
            if now >= deadline:
                log.info("no peer delivered %s chunk %d in time: origin", chunk.path, chunk.index)
                break
            await cluster.wait_change(min(deadline - now, 1.0))
        started = time.perf_counter()
        crc = await self._in_worker(job, self._executor, fetch_chunk, job.source, fill, chunk)
        self.metrics.fetch_seconds.labels("origin").observe(time.perf_counter() - started)
        self.counters.bytes_from_origin += chunk.length
        job.load.from_origin += chunk.length
        self._held(job, chunk, index, crc)
        return crc

    def _held(self, job: _FetchJob, chunk: Chunk, index: int, crc: int) -> None:
        if self.cluster is not None:
            self.chunks.add_chunk(job.fp, chunk.path, chunk.index, chunk.offset, chunk.length, crc)
            self.cluster.mark_held(job.fp, index, crc)

    # -- idle prefetch ----------------------------------------------------------------------
    def add_prefetch(self, path: str) -> dict[str, object]:
        location = self.authorize(path)
        if location not in self._prefetch_extra:
            self._prefetch_extra.append(location)
        self._prefetch_wake.set()
        return {"queued": location, "policy": self.config.prefetch}

    async def _prefetch_loop(self) -> None:
        if self.cluster is not None:
            # Say which models we will hold before anyone computes who owns what.
            for root in self.config.model_paths:
                try:
                    await self._join_model(self._canonical_root(root))
                except MowsError as e:
                    log.warning("cannot register %s with the cluster: %s", root, e)
        await asyncio.sleep(self.config.prefetch_delay)  # let the other members appear
        while True:
            targets = [self._canonical_root(r) for r in self.config.model_paths]
            for location in dict.fromkeys(targets + self._prefetch_extra):
                try:
                    await self._prefetch(location)
                except MowsError as e:
                    log.warning("prefetch of %s stopped: %s", location, e)
                    self.prefetch_state.setdefault(location, {})["state"] = f"error: {e}"
            self._prefetch_wake.clear()
            with contextlib.suppress(TimeoutError):  # re-plan as membership changes
                await asyncio.wait_for(self._prefetch_wake.wait(), 5.0)

    async def _join_model(self, location: str) -> tuple[str, Source, Manifest]:
        """Describe a model and, in a cluster, register our interest in it."""
        mid = model_id(location)
        source = self._source(location)
        manifest = await asyncio.get_running_loop().run_in_executor(
            self._executor,
            functools.partial(
                build_manifest,
                source,
                chunk_size=self.config.chunk_size,
                crc32_file=self.config.crc32_file,
            ),
        )
        self._manifests[mid] = manifest
        if self.cluster is not None:
            self._advertise_ready(mid, manifest)
        return mid, source, manifest

    async def _prefetch(self, location: str) -> None:
        """Fetch this node's share of a model (or all of it) chunk by chunk, yielding to every
        client load, never evicting anything, at most ``prefetch_rate`` bytes a second."""
        mid, source, manifest = await self._join_model(location)
        cluster = self.cluster
        fp = fingerprint(manifest)
        share = cluster is not None and self.config.prefetch == "share"
        bases = _FetchJob.bases(manifest)
        if share and cluster is not None:
            # Plan only once the set of nodes holding this model has stopped changing, so
            # every node computes the same owners (each chunk fetched once, shares even).
            seen, since, deadline = cluster.interested(fp), time.monotonic(), time.monotonic() + 15
            while time.monotonic() - since < 1.0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                now = cluster.interested(fp)
                if now != seen:
                    seen, since = now, time.monotonic()

        def mine(entry: FileEntry, chunk: Chunk) -> bool:
            if not share or cluster is None or not cluster.healthy:
                return True
            return cluster.owner(fp, f"{fp}/{bases[entry.path] + chunk.index}") == cluster.node_id

        plan = [(e, c) for e in manifest.files for c in manifest.chunks(e.path) if mine(e, c)]
        state: dict[str, object] = {
            "policy": "share" if share else "full",
            "target_bytes": sum(c.length for _, c in plan),
            "held_bytes": 0,
            "state": "running",
        }
        self.prefetch_state[location] = state
        held = sum(c.length for e, c in plan if self._present(mid, e, c))
        state["held_bytes"] = held
        for entry, chunk in plan:
            if self._present(mid, entry, chunk):
                continue
            if not self._idle.is_set():
                state["state"] = "paused"
                await self._idle.wait()
                state["state"] = "running"
            await self._throttle(chunk.length)
            async with self._model_locks.setdefault(mid, asyncio.Lock()):
                if self._present(mid, entry, chunk) or not mine(entry, chunk):
                    continue
                pf = self.pool.reserve_chunk(
                    mid, location, entry.path, entry.size, entry.mtime_ns, chunk.length
                )
                if pf is None:
                    state["state"] = "stopped: the pool is full"
                    return
                try:
                    crc = await self._prefetch_chunk(source, fp, bases, pf, chunk)
                except BaseException:
                    self.pool.unreserve_chunk(pf, chunk.length)
                    raise
                pf.held[chunk.index] = crc
                held += chunk.length
                state["held_bytes"] = held
                chunks = manifest.chunks(entry.path)
                if len(pf.held) == len(chunks):
                    self._complete_prefetched(location, entry, pf, chunks, manifest.chunk_size)
        state["state"] = "done"

    def _present(self, mid: str, entry: FileEntry, chunk: Chunk) -> bool:
        pf = self.pool.get(mid, entry.path)
        if pf is None:
            return False
        if pf.state is FileState.PARTIAL:
            return chunk.index in pf.held
        return pf.state is FileState.READY and self._fresh(mid, entry)

    async def _throttle(self, nbytes: int) -> None:
        rate = self.config.prefetch_rate
        if rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self._rate_next)
        self._rate_next = start + nbytes / rate
        if start > now:
            await asyncio.sleep(start - now)

    async def _prefetch_chunk(
        self, source: Source, fp: str, bases: dict[str, int], pf: PoolFile, chunk: Chunk
    ) -> int:
        """One chunk into a partial pool file: from a peer holding it, else the origin."""
        fd = self.pool.create_partial(pf)
        fill = FileFill(fd, pf.size)
        index = bases[chunk.path] + chunk.index
        try:
            crc: int | None = None
            cluster = self.cluster
            if cluster is not None and self.peers is not None:
                peers = self.peers
                if not self.chunks.has_file(fp, pf.rel):
                    self.chunks.add_file(fp, pf.rel, fd)
                for node, want in cluster.holders(fp, index).items():
                    address = cluster.address(node)
                    if address is None:
                        continue
                    try:
                        crc = await asyncio.get_running_loop().run_in_executor(
                            self._peer_executor,
                            _fetch_from_peer,
                            peers,
                            address,
                            fp,
                            fill,
                            chunk,
                            want,
                        )
                    except PeerError as e:
                        self.counters.peer_failures += 1
                        log.info("prefetch: %s", e)
                        continue
                    self.counters.bytes_from_peers += chunk.length
                    break
            if crc is None:
                crc = await asyncio.get_running_loop().run_in_executor(
                    self._executor, fetch_chunk, source, fill, chunk
                )
                self.counters.bytes_from_origin += chunk.length
            if cluster is not None:
                self.chunks.add_chunk(fp, chunk.path, chunk.index, chunk.offset, chunk.length, crc)
                cluster.mark_held(fp, index, crc)
            return crc
        finally:
            fill.close()

    def _complete_prefetched(
        self, location: str, entry: FileEntry, pf: PoolFile, chunks: list[Chunk], size: int
    ) -> None:
        crcs = [pf.held[c.index] for c in chunks]
        actual = file_crc(crcs, chunks)
        if entry.crc32 is not None and actual != entry.crc32:
            self.counters.integrity_failures += 1
            log.error(
                "prefetch: %s/%s fails its CRC-32 (%08x, expected %08x): dropped",
                location,
                entry.path,
                actual,
                entry.crc32,
            )
            self.pool.discard(pf)
            return
        self.pool.commit(pf, size, crcs, actual)

    # -- the local API ---------------------------------------------------------------------------
    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._clients += 1
        pins: dict[_PinKey, int] = {}
        tasks: set[asyncio.Task[None]] = set()
        send_lock = asyncio.Lock()

        async def send(msg: msgspec.Struct) -> None:
            async with send_lock:
                writer.write(p.encode(msg))
                await writer.drain()

        try:
            hello = await _read_request(reader)
            if not isinstance(hello, p.Hello) or hello.version != p.PROTOCOL_VERSION:
                raise ProtocolError(f"expected Hello version {p.PROTOCOL_VERSION}, got {hello!r}")
            await send(p.Welcome(p.PROTOCOL_VERSION, os.getpid()))
            while True:
                msg = await _read_request(reader)
                if isinstance(msg, p.Open):
                    t = asyncio.ensure_future(self._handle_open(msg, send, pins))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                elif isinstance(msg, p.Release):
                    key = _pin_key(msg.model, msg.files)
                    if pins.get(key, 0) > 0:
                        pins[key] -= 1
                        self.pool.unpin(msg.model, msg.files, consumed=msg.consumed)
                        self._pool_changed.set()
                elif isinstance(msg, p.Status):
                    await send(p.StatusReply(self.status()))
                elif isinstance(msg, p.Prefetch):
                    try:
                        await send(p.StatusReply(self.add_prefetch(msg.path)))
                    except MowsError as e:
                        await send(p.error_message(e))
                elif isinstance(msg, p.Reload):
                    try:
                        await send(p.StatusReply(self.reload()))
                    except MowsError as e:
                        await send(p.error_message(e))
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the daemon is stopping: close this connection like any other
        except ProtocolError as e:
            log.warning("closing a client connection: %s", e)
            with contextlib.suppress(Exception):
                await send(p.Error("ProtocolError", str(e)))
        finally:
            for t in tasks:
                t.cancel()
            for (model, files), n in pins.items():
                for _ in range(n):
                    self.pool.unpin(model, files)
            self._pool_changed.set()
            self._clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle_open(self, msg: p.Open, send: _Send, pins: dict[_PinKey, int]) -> None:
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue(maxsize=1)
        result: asyncio.Task[p.Ready] = asyncio.ensure_future(
            self.open_model(msg.path, msg.crc32_file, queue, msg.files)
        )
        try:
            while not result.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({result, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    done, total = getter.result()
                    await send(p.Progress(msg.path, done, total))
                else:
                    getter.cancel()
            ready = result.result()
            if msg.pin:
                self.pool.pin(ready.model, msg.files)
                key = _pin_key(ready.model, msg.files)
                pins[key] = pins.get(key, 0) + 1
            await send(ready)
        except MowsError as e:
            await send(p.error_message(e))
        except (ConnectionError, asyncio.CancelledError):
            result.cancel()
            raise
        except Exception as e:  # a bug: report it instead of hanging the client
            log.exception("open %s failed", msg.path)
            await send(p.Error(type(e).__name__, f"internal error: {e}"))

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        models = []
        known = dict(self.pool.sources)
        for root in self.config.model_paths:
            loc = self._canonical_root(root)
            known.setdefault(model_id(loc), loc)
        for mid, location in self._manifest_locations().items():
            known.setdefault(mid, location)
        for mid, location in sorted(known.items(), key=lambda kv: kv[1]):
            manifest = self._manifests.get(mid)
            pool_files = {f.rel: f for f in self.pool.model_files(mid)}
            if manifest is not None:
                entries = [(f.path, f.size) for f in manifest.files]
            elif self.pool.expected.get(mid):
                entries = sorted(self.pool.expected[mid].items())
            else:
                entries = [(f.rel, f.size) for f in pool_files.values()]
            total = sum(size for _, size in entries)
            files = []
            cached = 0
            for rel, size in entries:
                pf = pool_files.get(rel)
                ok = pf is not None and pf.state is FileState.READY and pf.size == size
                cached += size if ok else 0
                files.append({"path": rel, "size": size, "cached": ok})
            load = self._loads.get(mid)
            models.append(
                {
                    "path": location,
                    "id": mid,
                    "state": "loading"
                    if load
                    else (
                        "cached" if total and cached == total else "partial" if cached else "absent"
                    ),
                    "bytes": total,
                    "cached_bytes": cached,
                    "cached_fraction": (cached / total) if total else (1.0 if manifest else 0.0),
                    "pins": self.pool.pins.get(mid, 0),
                    "progress": {"done": load.done, "total": load.total} if load else None,
                    "files": files,
                }
            )
        c = self.counters
        return {
            "version": 1,
            "pid": os.getpid(),
            "socket": self.config.socket,
            "pool_dir": self.pool.root,
            "capacity_bytes": self.pool.capacity,
            "used_bytes": self.pool.used_bytes,
            "pinned_bytes": self.pool.pinned_bytes,
            "bytes_from_origin": c.bytes_from_origin,
            "bytes_from_peers": c.bytes_from_peers,
            "bytes_from_pool": c.bytes_from_pool,
            "hits": c.hits,
            "misses": c.misses,
            "hit_rate": c.hits / (c.hits + c.misses) if c.hits + c.misses else None,
            "evictions": self.pool.evictions,
            "evicted_bytes": self.pool.evicted_bytes,
            "evicted_last_copy_bytes": self.pool.evicted_last_copy_bytes,
            "integrity_failures": c.integrity_failures,
            "loads_failed": c.loads_failed,
            "clients": self._clients,
            "bytes_served_to_peers": self.chunks.bytes_served,
            "peer_failures": c.peer_failures,
            "corrupt_chunks_from_peers": c.corrupt_from_peers,
            "models": models,
            "cluster": self._cluster_status(),
            "prefetch": {
                "policy": self.config.prefetch,
                "rate_bytes_per_s": self.config.prefetch_rate or None,
                "models": [{"path": loc, **st} for loc, st in self.prefetch_state.items()],
            },
        }

    def _cluster_status(self) -> dict[str, object] | None:
        cl = self.cluster
        if cl is None:
            return None
        me = cl._node_info()
        nodes = [me, *cl.live_peers()]
        models = []
        for mid, fp in sorted(self._fingerprints.items()):
            copies = cl.copies(fp)
            manifest = self._manifests.get(mid)
            models.append(
                {
                    "path": manifest.source if manifest else "",
                    "fingerprint": fp,
                    "chunks": len(copies),
                    "min_copies": min(copies, default=0),
                    "max_copies": max(copies, default=0),
                    "copies": copies,
                }
            )
        return {
            "name": cl.name,
            "node_id": cl.node_id,
            "healthy": cl.healthy,
            "etcd": list(cl.endpoints),
            "etcd_errors": cl.etcd_errors,
            "nodes": [
                {
                    "id": n.id,
                    "address": n.address,
                    "capacity_bytes": n.capacity,
                    "used_bytes": n.used,
                    "alive": True,
                    "bytes_from_origin": n.bytes_from_origin,
                    "bytes_from_peers": n.bytes_from_peers,
                    "bytes_served_to_peers": n.bytes_served,
                }
                for n in sorted(nodes, key=lambda n: n.id)
            ],
            "models": models,
        }

    def _manifest_locations(self) -> dict[str, str]:
        return {mid: m.source for mid, m in self._manifests.items()}


def _transport(nic: str) -> tuple[Any, Any]:
    """The (server, client) classes for ``--nic``; UCX is imported only when chosen."""
    if nic == "ucx":
        from ..transport._ucx import UcxPeerClient, UcxPeerServer

        return UcxPeerServer, UcxPeerClient
    return TcpPeerServer, TcpPeerClient


async def _read_request(reader: asyncio.StreamReader) -> p.Request:
    n = p.check_length(await reader.readexactly(4))
    return p.decode_request(await reader.readexactly(n))


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket file, refusing if a live daemon still answers on it."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise MowsError(f"{path}: another mows daemon is already serving on this socket")


def run_daemon(config: DaemonConfig, reload: Callable[[], DaemonConfig] | None = None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP calls ``reload`` for a new model list."""

    async def main() -> None:
        await Daemon(config, reload).serve_forever()

    asyncio.run(main())
