"""TCP transport: ``sendfile`` from the pool file, ``recv_into`` the receiver's pool mapping.

Blocking sockets in threads: both calls release the GIL, so several connections (and several
peers) move chunks in parallel with no copy in Python.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import resource
import socket
import struct
import threading
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass

from .._bounce import thread_buffer
from .._digest import CrcAndDigest
from .._errors import MowsError, PeerError, ProtocolError
from ._base import ChunkStore, PeerClient, PeerServer, ServedChunk, Sink
from ._wire import (
    Channel,
    ChunkHeader,
    ChunkRequest,
    Have,
    HaveRequest,
    Landed,
    PeerFailure,
    PeerMessage,
    Received,
    WatchRequest,
    check_received,
    client_handshake,
    recv_peer,
    send_peer,
    server_handshake,
    verify_chunk,
)

__all__ = ["TcpPeerClient", "TcpPeerServer", "split_address"]

log = logging.getLogger("mows.transport")

LOOPBACK = ("127.0.0.1", "::1", "localhost")
# A bounded peer port: whoever reaches it, with or without the secret, holds at most this much.
# In all: at 1,000 nodes, a cold start has every other node watching us and fetching on a
# few connections each. Lowered to what RLIMIT_NOFILE allows (see ``connection_cap``).
MAX_CONNECTIONS = 8192
MAX_PER_ADDRESS = 64  # from one host (a peer uses `peer_connections`, 4 by default)
IDLE_TIMEOUT = 120.0  # seconds an authenticated connection may wait for its next request
SEND_TIMEOUT = 60.0  # seconds a send may block on a reader that stopped reading


def connection_cap(wanted: int) -> int:
    """``wanted`` connections, or as many as the descriptor limit leaves room for (each
    costs one here and a pool file's when it sends): the soft limit is raised to the hard
    one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + 1024
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    cap = max(16, (soft - 1024) // 2)
    log.warning(
        "peer connections capped at %d by RLIMIT_NOFILE %d (raise it to %d for %d)",
        cap,
        soft,
        need,
        wanted,
    )
    return cap


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
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_per_address: int = MAX_PER_ADDRESS,
        encrypt: bool = False,
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
        self._encrypt = encrypt
        self._timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._max = connection_cap(max_connections)
        self._max_per_address = max_per_address
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=128)
        self._address = f"{host}:{self._sock.getsockname()[1]}"
        self._conns: dict[socket.socket, str] = {}  # connection -> remote host
        self._handshaking: dict[socket.socket, float] = {}  # connection -> deadline
        self.refused = 0  # connections turned away at a cap
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="mows-peer-accept", daemon=True).start()
        threading.Thread(target=self._watchdog, name="mows-peer-watchdog", daemon=True).start()
        log.info("peer server on %s%s", self._address, "" if secret else " (no secret)")

    @property
    def address(self) -> str:
        return self._address

    def _accept_loop(self) -> None:
        """Accept forever: a refused or failed connection never ends the loop (only close)."""
        while True:
            try:
                conn, addr = self._sock.accept()
            except OSError as e:
                if self._closed:
                    return
                log.warning("peer server: accept failed (%s); retrying", e)  # e.g. EMFILE
                time.sleep(0.1)
                continue
            host = str(addr[0])
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                same = sum(1 for h in self._conns.values() if h == host)
                if len(self._conns) >= self._max or same >= self._max_per_address:
                    self.refused += 1
                    conn.close()
                    continue
                self._conns[conn] = host
                self._handshaking[conn] = time.monotonic() + self._timeout
            try:
                threading.Thread(
                    target=self._serve, args=(conn, f"{host}:{addr[1]}"), daemon=True
                ).start()
            except RuntimeError as e:  # no thread to spare: turn this one away, keep serving
                log.warning("peer server: cannot serve %s: %s", host, e)
                self._forget(conn)

    def _watchdog(self) -> None:
        """A wall-clock deadline for handshakes: one byte every few seconds cannot hold a
        connection (each receive has a timeout, but the whole handshake needs one too)."""
        while not self._closed:
            time.sleep(min(1.0, self._timeout / 4))
            now = time.monotonic()
            with self._lock:
                late = [c for c, deadline in self._handshaking.items() if deadline < now]
            for c in late:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.pop(conn, None)
            self._handshaking.pop(conn, None)
        conn.close()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.settimeout(self._timeout)
            peer_node, channel = server_handshake(
                conn, self.node, self._secret, peer, self._encrypt
            )
            with self._lock:
                self._handshaking.pop(conn, None)
            conn.settimeout(None)  # blocking: sendfile needs it; the kernel times out instead
            _kernel_timeouts(conn, recv=self._idle_timeout, send=SEND_TIMEOUT)
            while True:
                req = recv_peer(conn, channel)
                if isinstance(req, HaveRequest):
                    send_peer(conn, Have(self._store.have(req.model, req.path)), channel)
                    continue
                if isinstance(req, WatchRequest):
                    landed = self._store.watch(req.model, req.epoch, req.since, req.wait)
                    send_peer(conn, landed, channel)
                    continue
                if not isinstance(req, ChunkRequest):
                    raise ProtocolError(f"expected ChunkRequest, got {type(req).__name__}")
                chunk = self._store.open_chunk(req.model, req.path, req.index)
                if chunk is None:
                    send_peer(
                        conn, PeerFailure(f"not held: {req.path[:200]} chunk {req.index}"), channel
                    )
                    continue
                try:
                    header = ChunkHeader(chunk.offset, chunk.length, chunk.crc, chunk.digest)
                    send_peer(conn, header, channel)
                    if channel.encrypted:
                        _send_encrypted(conn, chunk, channel)
                    else:
                        _sendfile(conn, chunk)
                finally:
                    chunk.close()
                self._store.served(peer_node, chunk.length)
        except (ConnectionError, TimeoutError, OSError):
            pass
        except (ProtocolError, PeerError) as e:
            log.warning("dropping peer connection from %s: %s", peer, e)
        finally:
            self._forget(conn)

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


def _sendfile(conn: socket.socket, chunk: ServedChunk) -> None:
    sent = 0
    while sent < chunk.length:
        n = os.sendfile(conn.fileno(), chunk.fd, chunk.offset + sent, chunk.length - sent)
        if n == 0:
            raise ConnectionError("pool file shorter than the chunk")
        sent += n


CIPHER_SLICE = 4 * 2**20  # encrypted chunks go out through a bounce buffer this big


def _send_encrypted(conn: socket.socket, chunk: ServedChunk, channel: Channel) -> None:
    """Encrypt from a read-only mapping of the chunk into a small buffer, slice by slice
    (sendfile cannot transform bytes; the pool's pages are never written)."""
    cipher = channel.chunk_cipher(sending=True)
    start = chunk.offset - chunk.offset % mmap.ALLOCATIONGRANULARITY
    size = chunk.offset + chunk.length - start
    buf = bytearray(min(CIPHER_SLICE, chunk.length))
    with mmap.mmap(chunk.fd, size, prot=mmap.PROT_READ, offset=start) as m:
        view = memoryview(m)[chunk.offset - start :]
        out = memoryview(buf)
        try:
            for at in range(0, chunk.length, CIPHER_SLICE):
                with view[at : at + CIPHER_SLICE] as part:  # released even if sendall fails
                    n = cipher.update_into(part, out)
                conn.sendall(out[:n])
        finally:
            out.release()
            view.release()


def _peer_error(address: str, e: BaseException, timeout: float) -> BaseException:
    """What a failed exchange with a peer is to the caller: a ``PeerError`` naming it."""
    if isinstance(e, TimeoutError):
        return PeerError(address, f"stalled for {timeout}s")
    if isinstance(e, OSError | ProtocolError):
        return PeerError(address, str(e))
    return e


def _kernel_timeouts(conn: socket.socket, *, recv: float, send: float) -> None:
    """SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket: an idle or stalled peer ends with EAGAIN
    while sendfile keeps the blocking semantics it needs."""
    for opt, seconds in ((socket.SO_RCVTIMEO, recv), (socket.SO_SNDTIMEO, send)):
        whole = int(seconds)
        conn.setsockopt(
            socket.SOL_SOCKET, opt, struct.pack("ll", whole, int((seconds - whole) * 1e6))
        )


class TcpPeerClient(PeerClient):
    """Pools up to ``connections`` authenticated connections per peer address for chunks,
    and as many again for watches (long polls must not take the chunks' connections)."""

    def __init__(
        self,
        *,
        node: str,
        secret: bytes | None,
        connections: int = 4,
        timeout: float = 10.0,
        encrypt: bool = False,
    ) -> None:
        self.node = node
        self._secret = secret
        self._encrypt = encrypt
        self._max = connections
        self._timeout = timeout
        self._idle: dict[tuple[str, bool], list[_Conn]] = defaultdict(list)  # (address, watch)
        self._count: dict[tuple[str, bool], int] = defaultdict(int)
        self._open: weakref.WeakSet[_Conn] = weakref.WeakSet()  # idle or in use
        # One condition per pool, on one lock: a freed connection wakes one thread waiting
        # for that peer, not every fetch thread (a herd that contended for the GIL at every
        # chunk: bench/peer.py).
        self._lock = threading.Lock()
        self._conds: dict[tuple[str, bool], threading.Condition] = {}

    def _acquire(
        self, address: str, node: str | None, fresh: bool = False, watch: bool = False
    ) -> _Conn:
        key = (address, watch)
        with self._lock:
            while True:
                if self._idle[key] and not fresh:
                    return self._idle[key].pop()
                if self._count[key] < self._max:
                    self._count[key] += 1
                    break
                if self._idle[key]:  # fresh, and the pool full: an idle one makes room
                    self._idle[key].pop(0).sock.close()  # (else no release might ever come)
                    break
                self._cond(key).wait()
        sock: socket.socket | None = None
        try:
            host, port = split_address(address)
            sock = socket.create_connection((host, port), timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server, channel = client_handshake(
                sock, self.node, self._secret, address, node, self._encrypt
            )
            conn = _Conn(sock, server, channel)
            self._open.add(conn)
            return conn
        except BaseException as e:
            if sock is not None:
                sock.close()
            with self._lock:
                self._count[key] -= 1
                self._cond(key).notify()
            if isinstance(e, OSError):
                raise PeerError(address, f"cannot connect: {e.strerror or e}") from None
            if isinstance(e, ProtocolError):
                raise PeerError(address, str(e)) from None
            raise

    def _release(self, address: str, conn: _Conn, ok: bool, watch: bool = False) -> None:
        key = (address, watch)
        with self._lock:
            if ok:
                self._idle[key].append(conn)
            else:
                self._count[key] -= 1
                conn.sock.close()
            self._cond(key).notify()  # one connection freed: one waiter can take it

    def _cond(self, key: tuple[str, bool]) -> threading.Condition:
        """The condition of pool ``key``; called with ``_lock`` held."""
        cond = self._conds.get(key)
        if cond is None:
            cond = self._conds[key] = threading.Condition(self._lock)
        return cond

    def fetch(
        self,
        address: str,
        model: str,
        path: str,
        index: int,
        dest: memoryview,
        expected_crc: int | None,
        node: str | None = None,
        sink: Sink | None = None,
    ) -> Received:
        conn, header = self._request(address, ChunkRequest(model, path, index), node)
        ok = False
        try:
            if isinstance(header, PeerFailure):
                ok = True  # the connection is fine; the peer just lacks the chunk
                raise PeerError(address, header.message, missing=True)
            if not isinstance(header, ChunkHeader):
                raise PeerError(address, f"expected ChunkHeader, got {type(header).__name__}")
            if header.length != len(dest):
                raise PeerError(address, f"chunk of {header.length} bytes, expected {len(dest)}")
            start = time.monotonic()
            if sink is not None:
                crc, digest = _receive_through(conn, address, header.length, sink)
                received = check_received(address, path, index, crc, digest, expected_crc, header)
            else:
                _receive_into(conn, address, dest)
                received = verify_chunk(address, path, index, dest, expected_crc, header)
            ok = True
            log.debug(
                "%s chunk %d from %s: %.1f MiB/s",
                path,
                index,
                address,
                len(dest) / 2**20 / max(time.monotonic() - start, 1e-9),
            )
            return received
        except PeerError:
            raise
        except BaseException as e:
            raise _peer_error(address, e, self._timeout) from None
        finally:
            self._release(address, conn, ok)

    def _exchange(
        self, address: str, request: HaveRequest | WatchRequest, node: str | None
    ) -> Have | Landed:
        watch = isinstance(request, WatchRequest)
        conn, reply = self._request(address, request, node, watch)
        expect = Landed if watch else Have
        if not isinstance(reply, expect):
            self._release(address, conn, False, watch)
            raise PeerError(address, f"expected {expect.__name__}, got {type(reply).__name__}")
        self._release(address, conn, True, watch)
        return reply

    def _request(
        self,
        address: str,
        request: ChunkRequest | HaveRequest | WatchRequest,
        node: str | None,
        watch: bool = False,
    ) -> tuple[_Conn, PeerMessage]:
        """Send ``request`` on a pooled connection and read the reply; the connection is the
        caller's to release. A pooled connection the server closed while idle is replaced
        by a fresh one, once. Failures become PeerError."""
        reused = bool(self._idle.get((address, watch)))  # a hint: a pooled one may be stale
        conn = self._acquire(address, node, watch=watch)
        try:
            return conn, self._ask(conn, request, node)
        except ConnectionError as e:
            self._release(address, conn, False, watch)
            if not reused:
                raise PeerError(address, str(e)) from None
            log.debug("%s: idle connection closed (%s); reconnecting", address, e)
        except BaseException as e:
            self._release(address, conn, False, watch)
            raise _peer_error(address, e, self._timeout) from None
        conn = self._acquire(address, node, fresh=True, watch=watch)
        try:
            return conn, self._ask(conn, request, node)
        except BaseException as e:
            self._release(address, conn, False, watch)
            raise _peer_error(address, e, self._timeout) from None

    def _ask(
        self, conn: _Conn, request: ChunkRequest | HaveRequest | WatchRequest, node: str | None
    ) -> PeerMessage:
        if node is not None and conn.node != node:
            # The directory moved another node to this address: this connection is not it.
            raise PeerError(conn.channel.peer, f"is node {conn.node!r}, expected {node!r}")
        # A stalled peer costs at most this per recv; a watch's answer may come after its wait.
        wait = request.wait if isinstance(request, WatchRequest) else 0.0
        conn.sock.settimeout(self._timeout + wait)
        send_peer(conn.sock, request, conn.channel)
        header = recv_peer(conn.sock, conn.channel)
        conn.sock.settimeout(self._timeout)
        return header

    def close(self) -> None:
        """Close idle connections and cut those in use (a watch blocked in its long poll
        returns at once, with a PeerError)."""
        with self._lock:
            for conns in self._idle.values():
                for c in conns:
                    c.sock.close()
            self._idle.clear()
            busy = list(self._open)
        for c in busy:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)


def _receive_into(conn: _Conn, address: str, dest: memoryview) -> None:
    got = 0
    while got < len(dest):
        n = conn.sock.recv_into(dest[got:])
        if n == 0:
            raise PeerError(address, f"connection closed after {got} of {len(dest)} bytes")
        got += n
    if conn.channel.encrypted:
        conn.channel.chunk_cipher(sending=False).update_into(dest, dest)


def _receive_through(conn: _Conn, address: str, length: int, sink: Sink) -> tuple[int, bytes]:
    """The chunk block by block through this thread's buffer (see mows._bounce: receiving
    into the pool's fresh mapping faults a page at a time): each block decrypted, hashed and
    handed to ``sink`` in turn, so the checks cover exactly the bytes written."""
    buf = thread_buffer()
    hasher = CrcAndDigest()
    cipher = conn.channel.chunk_cipher(sending=False) if conn.channel.encrypted else None
    got = 0
    while got < length:
        block = buf[: min(len(buf), length - got)]
        filled = 0
        while filled < len(block):
            n = conn.sock.recv_into(block[filled:])
            if n == 0:
                raise PeerError(
                    address, f"connection closed after {got + filled} of {length} bytes"
                )
            filled += n
        if cipher is not None:
            cipher.update_into(block, block)
        hasher.update(block)
        sink(got, block)
        got += filled
    return hasher.crc, hasher.digest()


@dataclass(eq=False)  # hashed by identity: kept in a WeakSet
class _Conn:
    """A pooled, authenticated connection: the node it proved to be and its channel."""

    sock: socket.socket
    node: str
    channel: Channel
