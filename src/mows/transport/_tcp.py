"""TCP transport: ``sendfile`` from the pool file, ``recv_into`` the receiver's pool mapping.

Blocking sockets in threads: both calls release the GIL, so several connections (and several
peers) move chunks in parallel with no copy in Python.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import defaultdict

from .._errors import MowsError, PeerError, ProtocolError
from ._base import ChunkStore, PeerClient, PeerServer, check_chunk
from ._wire import (
    ChunkHeader,
    ChunkRequest,
    PeerFailure,
    client_handshake,
    recv_peer,
    send_peer,
    server_handshake,
)

__all__ = ["TcpPeerClient", "TcpPeerServer", "split_address"]

log = logging.getLogger("mows.transport")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise MowsError(f"{address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class TcpPeerServer(PeerServer):
    def __init__(
        self,
        listen: str,
        store: ChunkStore,
        *,
        node: str,
        secret: bytes | None,
        handshake_timeout: float = 10.0,
    ) -> None:
        host, port = split_address(listen)
        if not secret and host not in LOOPBACK:
            log.warning(
                "no cluster secret: the peer port listens on loopback only, not on %s", host
            )
            host = "127.0.0.1"
        self._store = store
        self.node = node
        self._secret = secret
        self._timeout = handshake_timeout
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=128)
        self._address = f"{host}:{self._sock.getsockname()[1]}"
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="mows-peer-accept", daemon=True).start()
        log.info("peer server on %s%s", self._address, "" if secret else " (no secret)")

    @property
    def address(self) -> str:
        return self._address

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.settimeout(self._timeout)
            peer_node = server_handshake(conn, self.node, self._secret, peer)
            conn.settimeout(None)
            while True:
                req = recv_peer(conn)
                if not isinstance(req, ChunkRequest):
                    raise ProtocolError(f"expected ChunkRequest, got {type(req).__name__}")
                chunk = self._store.open_chunk(req.model, req.path, req.index)
                if chunk is None:
                    send_peer(conn, PeerFailure(f"not held: {req.path} chunk {req.index}"))
                    continue
                try:
                    send_peer(conn, ChunkHeader(chunk.offset, chunk.length, chunk.crc))
                    sent = 0
                    while sent < chunk.length:
                        n = os.sendfile(
                            conn.fileno(), chunk.fd, chunk.offset + sent, chunk.length - sent
                        )
                        if n == 0:
                            raise ConnectionError("pool file shorter than the chunk")
                        sent += n
                finally:
                    os.close(chunk.fd)
                self._store.served(peer_node, chunk.length)
        except (ConnectionError, TimeoutError, OSError):
            pass
        except (ProtocolError, PeerError) as e:
            log.warning("dropping peer connection from %s: %s", peer, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        # shutdown() wakes a thread blocked in accept(); close() alone may not.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


class TcpPeerClient(PeerClient):
    """Pools up to ``connections`` authenticated connections per peer."""

    def __init__(
        self,
        *,
        node: str,
        secret: bytes | None,
        connections: int = 4,
        timeout: float = 10.0,
    ) -> None:
        self.node = node
        self._secret = secret
        self._max = connections
        self._timeout = timeout
        self._idle: dict[str, list[socket.socket]] = defaultdict(list)
        self._count: dict[str, int] = defaultdict(int)
        self._cond = threading.Condition()

    def _acquire(self, address: str) -> socket.socket:
        with self._cond:
            while True:
                if self._idle[address]:
                    return self._idle[address].pop()
                if self._count[address] < self._max:
                    self._count[address] += 1
                    break
                self._cond.wait()
        sock: socket.socket | None = None
        try:
            host, port = split_address(address)
            sock = socket.create_connection((host, port), timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_handshake(sock, self.node, self._secret, address)
            return sock
        except BaseException as e:
            if sock is not None:
                sock.close()
            with self._cond:
                self._count[address] -= 1
                self._cond.notify()
            if isinstance(e, OSError):
                raise PeerError(address, f"cannot connect: {e.strerror or e}") from None
            if isinstance(e, ProtocolError):
                raise PeerError(address, str(e)) from None
            raise

    def _release(self, address: str, sock: socket.socket, ok: bool) -> None:
        with self._cond:
            if ok:
                self._idle[address].append(sock)
            else:
                self._count[address] -= 1
                sock.close()
            self._cond.notify()

    def fetch(
        self,
        address: str,
        model: str,
        path: str,
        index: int,
        dest: memoryview,
        expected_crc: int | None,
    ) -> int:
        sock = self._acquire(address)
        ok = False
        try:
            sock.settimeout(self._timeout)  # a stalled peer costs at most this per recv
            send_peer(sock, ChunkRequest(model, path, index))
            header = recv_peer(sock)
            if isinstance(header, PeerFailure):
                ok = True  # the connection is fine; the peer just lacks the chunk
                raise PeerError(address, header.message)
            if not isinstance(header, ChunkHeader):
                raise PeerError(address, f"expected ChunkHeader, got {type(header).__name__}")
            if header.length != len(dest):
                raise PeerError(address, f"chunk of {header.length} bytes, expected {len(dest)}")
            got = 0
            start = time.monotonic()
            while got < len(dest):
                n = sock.recv_into(dest[got:])
                if n == 0:
                    raise PeerError(address, f"connection closed after {got} of {len(dest)} bytes")
                got += n
            actual = check_chunk(address, path, index, dest, expected_crc, header.crc)
            ok = True
            log.debug(
                "%s chunk %d from %s: %.1f MiB/s",
                path,
                index,
                address,
                len(dest) / 2**20 / max(time.monotonic() - start, 1e-9),
            )
            return actual
        except TimeoutError:
            raise PeerError(address, f"stalled for {self._timeout}s") from None
        except (OSError, ProtocolError) as e:
            raise PeerError(address, str(e)) from None
        finally:
            self._release(address, sock, ok)

    def close(self) -> None:
        with self._cond:
            for socks in self._idle.values():
                for s in socks:
                    s.close()
            self._idle.clear()
