"""The local API on a Unix socket: connections, requests, and the pins each connection holds.

Pins live with their connection: when it closes, however the client ended (SIGKILL
included), every pin it held is dropped. A malformed frame closes that one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from .. import _protocol as p
from .._errors import MowsError, ProtocolError
from ..pool import Pool, PoolFile, Version
from ._loads import Opened

__all__ = ["Backend", "LocalApi"]

log = logging.getLogger("mows.daemon")

PROGRESS_INTERVAL = 0.1  # seconds between progress messages to a client
# What one connection may hold: a member of the socket's group is a client, not the owner.
MAX_REQUEST = 1 << 20  # bytes in one request frame (requests are small; replies may not be)
MAX_OPENS_IN_FLIGHT = 64
MAX_PINS = 4096

_Send = Callable[[msgspec.Struct], Awaitable[None]]
_PinKey = tuple[str, tuple[str, ...] | None]  # (version, files) as the client pinned them


class Backend(Protocol):
    """What the API asks of the daemon behind it."""

    pool: Pool

    async def open(self, msg: p.Open, progress: Callable[[int, int], None]) -> Opened: ...

    def status(self) -> dict[str, object]: ...

    def add_prefetch(self, path: str) -> dict[str, object]: ...

    def reload(self) -> dict[str, object]: ...

    async def scrub(self) -> dict[str, object]: ...


@dataclass
class _Connection:
    """One client: its pins (each a list of files pinned by one open) and versions it read."""

    who: str = "?"  # uid/pid of the peer process, from the kernel (SO_PEERCRED)
    pins: dict[_PinKey, list[tuple[list[PoolFile], bool]]] = field(default_factory=dict)
    versions: set[Version] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class LocalApi:
    def __init__(self, path: str, mode: int, backend: Backend) -> None:
        self.path = path
        self.mode = mode
        self.backend = backend
        self.clients = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o755, exist_ok=True)
        _claim_socket_path(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, self.mode)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def close(self) -> None:
        self.stop_accepting()
        if self._server is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        conn = _Connection(who=_peer_credentials(writer))
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
                    pinned = sum(len(v) for v in conn.pins.values())
                    if len(conn.tasks) >= MAX_OPENS_IN_FLIGHT or pinned >= MAX_PINS:
                        await send(
                            p.Error(
                                "DaemonError",
                                f"{msg.path}: too many opens on this connection "
                                f"({len(conn.tasks)} in flight, {pinned} held; the limits are "
                                f"{MAX_OPENS_IN_FLIGHT} and {MAX_PINS})",
                            )
                        )
                        continue
                    log.info("open %s for %s", msg.path, conn.who)
                    t = asyncio.ensure_future(self._open(msg, send, conn))
                    conn.tasks.add(t)
                    t.add_done_callback(conn.tasks.discard)
                elif isinstance(msg, p.Release):
                    self._release(conn, msg)
                elif isinstance(msg, p.Status | p.Prefetch | p.Reload):
                    await send(self._answer(msg))
                elif isinstance(msg, p.Scrub):  # a full pass: answered when it is done
                    t = asyncio.ensure_future(self._scrub(send))
                    conn.tasks.add(t)
                    t.add_done_callback(conn.tasks.discard)
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
            for t in list(conn.tasks):
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*conn.tasks, return_exceptions=True)
            pool = self.backend.pool
            for held in conn.pins.values():
                for files, transient in held:
                    pool.unpin(files, transient=transient)
            for v in conn.versions:
                pool.release_user(v)
            self.clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, msg: p.Status | p.Prefetch | p.Reload) -> p.StatusReply | p.Error:
        try:
            if isinstance(msg, p.Status):
                return p.StatusReply(self.backend.status())
            if isinstance(msg, p.Prefetch):
                return p.StatusReply(self.backend.add_prefetch(msg.path))
            return p.StatusReply(self.backend.reload())
        except MowsError as e:
            return p.error_message(e)
        except Exception as e:  # a bug: answered (and logged), never a dropped connection
            log.exception("%s failed", type(msg).__name__)
            return p.Error(kind=type(e).__name__, message=f"internal error: {e}")

    async def _scrub(self, send: _Send) -> None:
        try:
            reply: p.StatusReply | p.Error = p.StatusReply(await self.backend.scrub())
        except MowsError as e:
            reply = p.error_message(e)
        except Exception as e:  # a bug: answered (and logged), never a dropped connection
            log.exception("Scrub failed")
            reply = p.Error(kind=type(e).__name__, message=f"internal error: {e}")
        await send(reply)

    def _release(self, conn: _Connection, msg: p.Release) -> None:
        key = (msg.model, None if msg.files is None else tuple(sorted(msg.files)))
        held = conn.pins.get(key)
        if held:
            files, transient = held.pop()
            if not held:
                del conn.pins[key]
            self.backend.pool.unpin(files, transient=transient, consumed=msg.consumed)

    async def _open(self, msg: p.Open, send: _Send, conn: _Connection) -> None:
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue(maxsize=1)

        def progress(done: int, total: int) -> None:
            if queue.empty():  # latest value wins; never queue stale progress
                queue.put_nowait((done, total))

        result = asyncio.ensure_future(self.backend.open(msg, progress))
        try:
            while not result.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({result, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    done, total = getter.result()
                    await send(p.Progress(msg.path, done, total))
                else:
                    getter.cancel()
            opened = result.result()
        except MowsError as e:
            await send(p.error_message(e))
            return
        except (ConnectionError, asyncio.CancelledError):
            result.cancel()
            with contextlib.suppress(BaseException):
                opened = await result  # it may have pinned in its last step: undo that
                self.backend.pool.unpin(opened.files, transient=opened.transient)
            raise
        except Exception as e:  # a bug: report it instead of hanging the client
            log.exception("open %s failed", msg.path)
            await send(p.Error(type(e).__name__, f"internal error: {e}"))
            return
        # The open pinned its files in the step that completed it; from here they are this
        # connection's, released by Release or when it closes.
        v = opened.version
        if v not in conn.versions:
            conn.versions.add(v)
            v.users += 1
        if msg.pin:
            key = (v.id, None if msg.files is None else tuple(sorted(msg.files)))
            conn.pins.setdefault(key, []).append((opened.files, opened.transient))
        else:
            self.backend.pool.unpin(opened.files, transient=opened.transient)
        rels = [f.rel for f in opened.files]
        await send(
            p.Ready(
                model=v.id,
                manifest=v.client_manifest(rels),
                files={f.rel: f.path for f in opened.files},
                bytes_from_origin=opened.bytes_from_origin,
                bytes_from_peers=opened.bytes_from_peers,
                bytes_from_pool=opened.bytes_from_pool,
                seconds=opened.seconds,
                stale=opened.stale,
            )
        )


async def _read_request(reader: asyncio.StreamReader) -> p.Request:
    n = p.check_length(await reader.readexactly(4))
    if n > MAX_REQUEST:
        raise ProtocolError(f"request of {n} bytes exceeds the {MAX_REQUEST} byte limit")
    return p.decode_request(await reader.readexactly(n))


def _peer_credentials(writer: asyncio.StreamWriter) -> str:
    """``uid U pid P`` of the process at the other end, as the kernel reports it."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _ = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
    except (OSError, AttributeError, struct.error):
        return "an unknown process"
    return f"uid {uid} pid {pid}"


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
