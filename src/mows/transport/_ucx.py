"""UCX transport (``--nic ucx``): RDMA NICs where the cluster has them, tcp/shm elsewhere.

ucxx is asyncio-based, so UCX work runs on one private event loop thread per process; the
blocking ``PeerClient.fetch`` of worker threads submits to it. The server sends each chunk
straight from a read-only mapping of the pool file and the client receives into the pool
mapping: no copy in Python on either side, and zero-copy RDMA where the NIC supports it.
ucxx listens on every interface, so this transport requires a cluster secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import threading
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec

from .. import _protocol as frames
from .._errors import ConfigError, PeerError, ProtocolError
from ._base import ChunkStore, PeerClient, PeerServer, check_chunk
from ._tcp import split_address
from ._wire import (
    MAX_PEER_FRAME,
    ChunkHeader,
    ChunkRequest,
    ClientHandshake,
    PeerFailure,
    PeerMessage,
    ServerHandshake,
    decode_peer,
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


async def _send(ep: Any, msg: msgspec.Struct) -> None:
    import numpy as np

    body = frames.encode(msg)[4:]
    await ep.send(np.array([len(body)], dtype=np.uint64))
    await ep.send(np.frombuffer(body, dtype=np.uint8))


async def _recv(ep: Any) -> PeerMessage:
    import numpy as np

    n = np.empty(1, dtype=np.uint64)
    await ep.recv(n)
    if int(n[0]) > MAX_PEER_FRAME or int(n[0]) == 0:
        raise ProtocolError(f"peer frame of {int(n[0])} bytes is out of bounds")
    body = np.empty(int(n[0]), dtype=np.uint8)
    await ep.recv(body)
    return decode_peer(body.tobytes())


class UcxPeerServer(PeerServer):
    def __init__(self, listen: str, store: ChunkStore, *, node: str, secret: bytes | None) -> None:
        if not secret:
            raise ConfigError(
                "--nic ucx listens on every interface: it needs --cluster-secret-file"
            )
        self._ucxx = _ucxx()
        host, port = split_address(listen)
        self._store, self.node, self._secret = store, node, secret
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
        hs = ServerHandshake(self.node, self._secret, "ucx peer")
        try:
            try:
                await _send(ep, hs.on_hello(await _recv(ep)))
                await _send(ep, hs.on_auth(await _recv(ep)))
            except PeerError:
                if hs.refusal is not None:
                    await _send(ep, hs.refusal)
                raise
            while True:
                req = await _recv(ep)
                if not isinstance(req, ChunkRequest):
                    raise ProtocolError(f"expected ChunkRequest, got {type(req).__name__}")
                chunk = self._store.open_chunk(req.model, req.path, req.index)
                if chunk is None:
                    await _send(ep, PeerFailure(f"not held: {req.path} chunk {req.index}"))
                    continue
                try:
                    with mmap.mmap(
                        chunk.fd, chunk.length, prot=mmap.PROT_READ, offset=chunk.offset
                    ) as m:
                        await _send(ep, ChunkHeader(chunk.offset, chunk.length, chunk.crc))
                        view = memoryview(m)
                        try:
                            await ep.send(view)
                        finally:
                            view.release()
                finally:
                    os.close(chunk.fd)
                self._store.served(hs.client, chunk.length)
        except (ProtocolError, PeerError) as e:
            log.warning("dropping UCX peer connection: %s", e)
        except Exception as e:
            log.debug("UCX peer connection ended: %s", e)
        finally:
            with contextlib.suppress(Exception):
                await ep.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.loop.call_soon_threadsafe(self._listener.close)


class UcxPeerClient(PeerClient):
    def __init__(
        self, *, node: str, secret: bytes | None, connections: int = 4, timeout: float = 10.0
    ) -> None:
        self._ucxx = _ucxx()
        self.node, self._secret = node, secret
        self._max, self._timeout = connections, timeout
        self._loop = _Loop.get()
        self._idle: dict[str, list[Any]] = defaultdict(list)
        self._slots: dict[str, asyncio.Semaphore] = {}

    def fetch(
        self,
        address: str,
        model: str,
        path: str,
        index: int,
        dest: memoryview,
        expected_crc: int | None,
    ) -> int:
        coro = self._fetch(address, model, path, index, dest, expected_crc)
        try:
            return self._loop.run(coro, self._timeout * 3)
        except TimeoutError:
            raise PeerError(address, f"stalled for {self._timeout * 3:.0f}s") from None

    async def _connect(self, address: str) -> Any:
        host, port = split_address(address)
        ep = await self._ucxx.create_endpoint(host, port)
        hs = ClientHandshake(self.node, self._secret, address)
        await _send(ep, hs.hello())
        await _send(ep, hs.on_challenge(await _recv(ep)))
        hs.on_ok(await _recv(ep))
        return ep

    async def _fetch(
        self,
        address: str,
        model: str,
        path: str,
        index: int,
        dest: memoryview,
        expected_crc: int | None,
    ) -> int:
        slots = self._slots.setdefault(address, asyncio.Semaphore(self._max))
        async with slots:
            ep = self._idle[address].pop() if self._idle[address] else None
            ok = False
            try:
                if ep is None:
                    ep = await asyncio.wait_for(self._connect(address), self._timeout)
                assert ep is not None
                await _send(ep, ChunkRequest(model, path, index))
                header = await asyncio.wait_for(_recv(ep), self._timeout)
                if isinstance(header, PeerFailure):
                    ok = True
                    raise PeerError(address, header.message)
                if not isinstance(header, ChunkHeader) or header.length != len(dest):
                    raise PeerError(address, f"unexpected reply {header!r}")
                await asyncio.wait_for(ep.recv(dest), self._timeout)
                actual = check_chunk(address, path, index, dest, expected_crc, header.crc)
                ok = True
                return actual
            except PeerError:
                raise
            except TimeoutError:
                raise PeerError(address, f"stalled for {self._timeout}s") from None
            except Exception as e:
                raise PeerError(address, f"{type(e).__name__}: {e}") from None
            finally:
                if ep is not None:
                    if ok:
                        self._idle[address].append(ep)
                    else:
                        with contextlib.suppress(Exception):
                            await ep.close()

    def close(self) -> None:
        async def close_all() -> None:
            for eps in self._idle.values():
                for ep in eps:
                    with contextlib.suppress(Exception):
                        await ep.close()
            self._idle.clear()

        with contextlib.suppress(Exception):
            self._loop.run(close_all(), 10)
