"""UCX transport (``--nic ucx``): RDMA NICs where the cluster has them, tcp/shm elsewhere.

ucxx is asyncio-based, so UCX work runs on one private event loop thread per process; the
blocking ``PeerClient.fetch`` of worker threads submits to it. The server sends each chunk
straight from a read-only mapping of the pool file and the client receives into the pool
mapping: no copy in Python on either side, and zero-copy RDMA where the NIC supports it.
ucxx listens on every interface, so this transport requires a cluster secret. Frames after
the handshake are tagged like TCP's (see ``_wire``). The port is bounded like TCP's: a total
connection cap, a wall-clock handshake deadline, idle and send timeouts (ucxx does not tell
the listener a peer's address, so there is no per-address cap here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from .._errors import ConfigError, PeerError, ProtocolError
from ._base import ChunkStore, PeerClient, PeerServer, ServedChunk, Sink
from ._tcp import IDLE_TIMEOUT, MAX_CONNECTIONS, SEND_TIMEOUT, connection_cap, split_address
from ._wire import (
    MAX_PEER_FRAME,
    Channel,
    ChunkHeader,
    ChunkRequest,
    ClientHandshake,
    Have,
    HaveRequest,
    Landed,
    PeerFailure,
    PeerMessage,
    Received,
    ServerHandshake,
    WatchRequest,
    decode_peer,
    verify_chunk,
)

__all__ = ["UcxPeerClient", "UcxPeerServer"]

log = logging.getLogger("mows.transport")
T = TypeVar("T")


def _ucxx() -> Any:
    # UCX warns about variables that ucxx itself sets; keep the daemon's log readable.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx
    except ImportError as e:
        raise ConfigError("--nic ucx needs ucxx: pip install 'mows[ucx]'") from e
    return ucxx


class _Loop:
    """The process's UCX event loop thread."""

    _instance: _Loop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="mows-ucx", daemon=True).start()

    @classmethod
    def get(cls) -> _Loop:
        with cls._lock:
            if cls._instance is None:
                cls._instance = _Loop()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_enc = msgspec.msgpack.Encoder()


async def _send(ep: Any, msg: msgspec.Struct, channel: Channel | None = None) -> None:
    await _send_body(ep, _enc.encode(msg) if channel is None else channel.seal(msg))


async def _send_body(ep: Any, body: bytes) -> None:
    import numpy as np

    await ep.send(np.array([len(body)], dtype=np.uint64))
    await ep.send(np.frombuffer(body, dtype=np.uint8))


async def _recv(ep: Any, channel: Channel | None = None) -> PeerMessage:
    body = await _recv_body(ep)
    return decode_peer(body) if channel is None else channel.open(body)


async def _recv_body(ep: Any) -> bytes:
    import numpy as np

    n = np.empty(1, dtype=np.uint64)
    await ep.recv(n)
    if int(n[0]) > MAX_PEER_FRAME or int(n[0]) == 0:
        raise ProtocolError(f"peer frame of {int(n[0])} bytes is out of bounds")
    body = np.empty(int(n[0]), dtype=np.uint8)
    await ep.recv(body)
    return body.tobytes()


class UcxPeerServer(PeerServer):
    def __init__(
        self,
        listen: str,
        store: ChunkStore,
        *,
        node: str,
        secret: bytes | None,
        handshake_timeout: float = 10.0,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        encrypt: bool = False,
    ) -> None:
        if not secret:
            raise ConfigError(
                "--nic ucx listens on every interface: it needs --cluster-secret-file"
            )
        self._ucxx = _ucxx()
        host, port = split_address(listen)
        self._store, self.node, self._secret = store, node, secret
        self._timeout, self._idle_timeout = handshake_timeout, idle_timeout
        self._max, self._encrypt = connection_cap(max_connections), encrypt
        self._active = 0  # touched on the UCX loop only
        self._waits = ThreadPoolExecutor(self._max, thread_name_prefix="mows-ucx-serve")
        self.refused = 0
        self._loop = _Loop.get()
        self._listener = self._loop.run(self._create(port), 30)
        self._address = f"{host}:{self._listener.port}"
        log.info("UCX peer server on port %d", self._listener.port)

    async def _create(self, port: int) -> Any:
        return self._ucxx.create_listener(self._handle, port or None)

    @property
    def address(self) -> str:
        return self._address

    async def _handle(self, ep: Any) -> None:
        if self._active >= self._max:
            self.refused += 1
            with contextlib.suppress(Exception):
                await ep.close()
            return
        self._active += 1
        hs = ServerHandshake(self.node, self._secret, "ucx peer", self._encrypt)
        try:
            try:
                async with asyncio.timeout(self._timeout):  # one deadline for the whole exchange
                    await _send(ep, hs.on_hello(await _recv(ep)))
                    channel, ok = hs.on_auth(await _recv(ep))
                    await _send_body(ep, ok)
            except PeerError:
                if hs.refusal is not None:
                    await asyncio.wait_for(_send(ep, hs.refusal), self._timeout)
                raise
            while True:
                req = await asyncio.wait_for(_recv(ep, channel), self._idle_timeout)
                if isinstance(req, HaveRequest):
                    held = self._store.have(req.model, req.path)
                    await asyncio.wait_for(_send(ep, Have(held), channel), SEND_TIMEOUT)
                    continue
                if isinstance(req, WatchRequest):
                    # A long poll, in a thread of its own: it must not hold the loop's
                    # default executor.
                    landed = await asyncio.get_running_loop().run_in_executor(
                        self._waits, self._store.watch, req.model, req.epoch, req.since, req.wait
                    )
                    await asyncio.wait_for(_send(ep, landed, channel), SEND_TIMEOUT)
                    continue
                if not isinstance(req, ChunkRequest):
                    raise ProtocolError(f"expected ChunkRequest, got {type(req).__name__}")
                chunk = await asyncio.get_running_loop().run_in_executor(
                    self._waits, self._store.open_chunk, req.model, req.path, req.index
                )
                try:
                    await asyncio.wait_for(
                        self._send_chunk(ep, channel, req, chunk, hs.client), SEND_TIMEOUT
                    )
                finally:  # (also when cancelled before the send began: its fd, its count)
                    if chunk is not None:
                        chunk.close()
        except (ProtocolError, PeerError) as e:
            log.warning("dropping UCX peer connection: %s", e)
        except Exception as e:
            log.debug("UCX peer connection ended: %s", e)
        finally:
            self._active -= 1
            with contextlib.suppress(Exception):
                await ep.close()

    async def _send_chunk(
        self, ep: Any, channel: Channel, req: ChunkRequest, chunk: ServedChunk | None, client: str
    ) -> None:
        # Hashing and ciphers run off the loop: it carries every UCX transfer of the process.
        run = asyncio.get_running_loop().run_in_executor
        if chunk is None:
            await _send(ep, PeerFailure(f"not held: {req.path[:200]} chunk {req.index}"), channel)
            return
        try:
            with mmap.mmap(chunk.fd, chunk.length, prot=mmap.PROT_READ, offset=chunk.offset) as m:
                header = ChunkHeader(chunk.offset, chunk.length, chunk.crc, chunk.digest)
                await _send(ep, header, channel)
                view = memoryview(m)
                try:
                    if channel.encrypted:  # into a copy: the pool's pages are never written
                        out = bytearray(chunk.length)
                        cipher = channel.chunk_cipher(sending=True)
                        await run(None, cipher.update_into, view, out)
                        await ep.send(out)
                    else:
                        await ep.send(view)
                finally:
                    view.release()
        finally:
            chunk.close()
        self._store.served(client, chunk.length)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.loop.call_soon_threadsafe(self._listener.close)
        self._waits.shutdown(wait=False, cancel_futures=True)


class UcxPeerClient(PeerClient):
    def __init__(
        self,
        *,
        node: str,
        secret: bytes | None,
        connections: int = 4,
        timeout: float = 10.0,
        encrypt: bool = False,
    ) -> None:
        self._ucxx = _ucxx()
        self.node, self._secret, self._encrypt = node, secret, encrypt
        self._max, self._timeout = connections, timeout
        self._loop = _Loop.get()
        # (address, watch) -> idle connections; the slots bound the open ones
        self._idle: dict[tuple[str, bool], list[tuple[Any, Channel, str]]] = defaultdict(list)
        self._slots: dict[tuple[str, bool], asyncio.Semaphore] = {}

    def fetch(
        self,
        address: str,
        model: str,
        path: str,
        index: int,
        dest: memoryview,
        expected_crc: int | None,
        node: str | None = None,
        sink: Sink | None = None,  # UCX receives into ``dest`` in one message
    ) -> Received:
        ended = threading.Event()
        request = ChunkRequest(model, path, index)

        async def guarded() -> Received:
            try:
                return await self._fetch(address, request, dest, expected_crc, node)
            finally:
                ended.set()

        fut = asyncio.run_coroutine_threadsafe(guarded(), self._loop.loop)
        try:
            return fut.result(self._timeout * 3)
        except TimeoutError:
            # Cancel it and wait for it to end: a transfer left running could write into
            # ``dest`` after the caller refilled it from elsewhere and checked it.
            fut.cancel()
            ended.wait(self._timeout)
            raise PeerError(address, f"stalled for {self._timeout * 3:.0f}s") from None

    async def _connect(self, address: str, node: str | None) -> tuple[Any, Channel, str]:
        host, port = split_address(address)
        ep = await self._ucxx.create_endpoint(host, port)
        hs = ClientHandshake(self.node, self._secret, address, node, self._encrypt)
        await _send(ep, hs.hello())
        await _send(ep, hs.on_challenge(await _recv(ep)))
        return ep, hs.on_ok(await _recv_body(ep)), hs.server

    @contextlib.asynccontextmanager
    async def _connection(
        self, address: str, node: str | None, watch: bool = False
    ) -> AsyncIterator[_Use]:
        """A pooled (or new) connection to ``address``, proven to be ``node``; back to the
        pool if the body set ``ok``, else closed. Failures become PeerError. Watches (long
        polls) have connections of their own: they must not take the chunks'."""
        key = (address, watch)
        slots = self._slots.setdefault(key, asyncio.Semaphore(self._max))
        async with slots:
            conn = self._idle[key].pop() if self._idle[key] else None
            use: _Use | None = None
            try:
                if conn is None:
                    conn = await asyncio.wait_for(self._connect(address, node), self._timeout)
                ep, channel, server = conn
                if node is not None and server != node:
                    raise PeerError(address, f"is node {server!r}, expected {node!r}")
                use = _Use(ep, channel)
                yield use
            except PeerError:
                raise
            except TimeoutError:
                raise PeerError(address, f"stalled for {self._timeout}s") from None
            except Exception as e:
                raise PeerError(address, f"{type(e).__name__}: {e}") from None
            finally:
                if conn is not None:
                    if use is not None and use.ok:
                        self._idle[key].append(conn)
                    else:
                        with contextlib.suppress(Exception):
                            await conn[0].close()

    async def _fetch(
        self,
        address: str,
        request: ChunkRequest,
        dest: memoryview,
        expected_crc: int | None,
        node: str | None,
    ) -> Received:
        path, index = request.path, request.index
        run = asyncio.get_running_loop().run_in_executor  # checks off the UCX loop
        async with self._connection(address, node) as use:
            ep, channel = use.ep, use.channel
            await _send(ep, request, channel)
            header = await asyncio.wait_for(_recv(ep, channel), self._timeout)
            if isinstance(header, PeerFailure):
                use.ok = True
                raise PeerError(address, header.message, missing=True)
            if not isinstance(header, ChunkHeader) or header.length != len(dest):
                raise PeerError(address, f"unexpected reply {header!r}")
            await asyncio.wait_for(ep.recv(dest), self._timeout)
            if channel.encrypted:
                cipher = channel.chunk_cipher(sending=False)
                await run(None, cipher.update_into, dest, dest)
            received: Received = await run(
                None, verify_chunk, address, path, index, dest, expected_crc, header
            )
            use.ok = True
            return received

    def _exchange(
        self, address: str, request: HaveRequest | WatchRequest, node: str | None
    ) -> Have | Landed:
        watch = isinstance(request, WatchRequest)
        wait = request.wait if isinstance(request, WatchRequest) else 0.0
        expect = Landed if watch else Have

        async def ask() -> Have | Landed:
            async with self._connection(address, node, watch) as use:
                await _send(use.ep, request, use.channel)
                reply = await asyncio.wait_for(_recv(use.ep, use.channel), self._timeout + wait)
                if not isinstance(reply, expect):
                    raise PeerError(
                        address, f"expected {expect.__name__}, got {type(reply).__name__}"
                    )
                use.ok = True
                return reply

        try:
            return self._loop.run(ask(), self._timeout * 3 + wait)
        except TimeoutError:
            raise PeerError(address, f"stalled for {self._timeout * 3:.0f}s") from None

    def close(self) -> None:
        async def close_all() -> None:
            for conns in self._idle.values():
                for ep, _, _ in conns:
                    with contextlib.suppress(Exception):
                        await ep.close()
            self._idle.clear()

        with contextlib.suppress(Exception):
            self._loop.run(close_all(), 10)


@dataclass
class _Use:
    """A connection lent to one exchange; ``ok``: it ended cleanly, the connection is reusable."""

    ep: Any
    channel: Channel
    ok: bool = False
