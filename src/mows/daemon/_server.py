"""The node daemon: the pool, the fetch workers and the local API on a Unix socket.

Everything that touches shared state runs on one asyncio event loop; worker threads only read
from sources and compute CRCs. One load task per model is shared by every client that asks
for it; each client connection holds pins that are dropped when it closes, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec

from .. import _protocol as p
from .._config import DaemonConfig
from .._errors import AccessDeniedError, IntegrityError, MowsError, ProtocolError
from ..manifest import FileEntry, Manifest, build_manifest
from ..pool import FileState, Pool, PoolFile, WouldWait, model_id
from ..sources import Source, open_source
from ._loader import FileFill, crc_of_pool_file, fetch_chunk, file_crc

__all__ = ["Daemon", "run_daemon"]

log = logging.getLogger("mows.daemon")

PROGRESS_INTERVAL = 0.1  # seconds between progress messages to a client

_Send = Callable[[msgspec.Struct], Awaitable[None]]


@dataclass
class _Load:
    """One fetch of one model, shared by every client waiting for it."""

    model: str
    location: str
    done: int = 0
    total: int = 0
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


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.pool = Pool(config.pool_dir, config.max_memory)
        self.counters = _Counters()
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="mows-fetch")
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

    def stop(self) -> None:
        self._stopping.set()

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self._stopping.wait()
        finally:
            await self.close()

    async def close(self) -> None:
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
        self, path: str, crc32_file: str | None, progress: asyncio.Queue[tuple[int, int]] | None
    ) -> p.Ready:
        location = self.authorize(path)
        mid = model_id(location)
        load = self._loads.get(mid)
        if load is None:
            load = self._loads[mid] = _Load(mid, location)
            load.task = asyncio.ensure_future(self._run_load(load, crc32_file))
            load.task.add_done_callback(functools.partial(self._load_done, mid))
        if progress is not None:
            load.subscribers.add(progress)
        try:
            assert load.task is not None
            return await asyncio.shield(load.task)
        finally:
            if progress is not None:
                load.subscribers.discard(progress)

    def _load_done(self, mid: str, _task: object) -> None:
        self._loads.pop(mid, None)

    async def _run_load(self, load: _Load, crc32_file: str | None) -> p.Ready:
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
        self.pool.busy[load.model] = self.pool.busy.get(load.model, 0) + 1
        try:
            missing = [f for f in manifest.files if not self._fresh(load.model, f)]
            load.total = sum(f.size for f in missing)
            from_pool = manifest.total_bytes - load.total
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
            self.pool.busy[load.model] -= 1
            if not self.pool.busy[load.model]:
                del self.pool.busy[load.model]
            self._pool_changed.set()
        files = {}
        for f in manifest.files:
            pf = self.pool.get(load.model, f.path)
            assert pf is not None and pf.state is FileState.READY
            files[f.path] = pf.path
        return p.Ready(
            model=load.model,
            manifest=manifest,
            files=files,
            bytes_from_origin=load.total,
            bytes_from_peers=0,
            bytes_from_pool=from_pool,
            seconds=time.perf_counter() - start,
        )

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
        loop = asyncio.get_running_loop()
        pool_files = await self._reserve(load.model, manifest, missing)
        fills: dict[str, FileFill] = {}
        pending: list[asyncio.Future[int]] = []
        last_publish = 0.0
        try:
            for pf in pool_files:
                fills[pf.rel] = FileFill(self.pool.create_partial(pf), pf.size)
            per_file: dict[str, list[asyncio.Future[int]]] = {}
            for entry in missing:
                fill = fills[entry.path]
                futs = [
                    loop.run_in_executor(self._executor, fetch_chunk, source, fill, chunk)
                    for chunk in manifest.chunks(entry.path)
                ]
                per_file[entry.path] = futs
                pending.extend(futs)
            for entry, pf in zip(missing, pool_files, strict=True):
                chunks = manifest.chunks(entry.path)
                crcs = []
                for chunk, fut in zip(chunks, per_file[entry.path], strict=True):
                    crcs.append(await fut)
                    load.done += chunk.length
                    self.counters.bytes_from_origin += chunk.length
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
            for fut in pending:
                fut.cancel()
            # Running reads write into the mappings: let them finish before unmapping.
            await asyncio.gather(*pending, return_exceptions=True)
            for pf in pool_files:
                if pf.state is FileState.FILLING:
                    self.pool.discard(pf)
            raise
        finally:
            for fill in fills.values():
                fill.close()

    # -- the local API ---------------------------------------------------------------------------
    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._clients += 1
        pins: dict[str, int] = {}
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
                    if pins.get(msg.model, 0) > 0:
                        pins[msg.model] -= 1
                        self.pool.unpin(msg.model)
                        self._pool_changed.set()
                elif isinstance(msg, p.Status):
                    await send(p.StatusReply(self.status()))
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
            for model, n in pins.items():
                for _ in range(n):
                    self.pool.unpin(model)
            self._pool_changed.set()
            self._clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle_open(self, msg: p.Open, send: _Send, pins: dict[str, int]) -> None:
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue(maxsize=1)
        result: asyncio.Task[p.Ready] = asyncio.ensure_future(
            self.open_model(msg.path, msg.crc32_file, queue)
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
                self.pool.pin(ready.model)
                pins[ready.model] = pins.get(ready.model, 0) + 1
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
            "evictions": self.pool.evictions,
            "evicted_bytes": self.pool.evicted_bytes,
            "integrity_failures": c.integrity_failures,
            "loads_failed": c.loads_failed,
            "clients": self._clients,
            "models": models,
        }

    def _manifest_locations(self) -> dict[str, str]:
        return {mid: m.source for mid, m in self._manifests.items()}


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


def run_daemon(config: DaemonConfig) -> None:
    """Run until SIGTERM/SIGINT."""

    async def main() -> None:
        await Daemon(config).serve_forever()

    asyncio.run(main())
