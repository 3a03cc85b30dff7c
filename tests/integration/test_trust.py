"""Peer traffic is authenticated end to end: a relay that passes the handshake along and
edits bytes in flight (keeping their CRC-32) gets nothing served, with real daemons, a real
etcd and real sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

import mows
from mows import PeerError, crc32
from mows._digest import chunk_digest
from mows._protocol import recv_exact
from mows.transport._wire import TAG_BYTES, ChunkHeader, PeerMessage
from tests.crc_forge import crc_preserving_delta
from tests.daemons import make_random_model
from tests.integration.test_cluster import FAST, load_all, wait_published
from tests.integration.test_daemon import _wait, assert_same_as_files

_decode = msgspec.msgpack.Decoder(PeerMessage).decode
_encode = msgspec.msgpack.Encoder().encode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EditingRelay:
    """A man in the middle between a node and the peer it fetches from. The handshake
    passes unchanged (the relay does not know the secret); then every chunk's bytes are
    edited with a delta that keeps their CRC-32. ``forge_digest``: also rewrite the chunk
    header's digest to match the edited bytes (keeping the header frame's old tag)."""

    def __init__(self, upstream: int, *, forge_digest: bool) -> None:
        self.upstream, self.forge_digest = upstream, forge_digest
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.edited = 0
        self.crc_kept = True  # every edit kept the chunk's CRC-32: the CRC alone would pass
        self.errors: list[BaseException] = []
        self._conns = _Sockets()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                down = self._conns.add(self.sock.accept()[0])
                up = self._conns.add(socket.create_connection(("127.0.0.1", self.upstream)))
                threading.Thread(target=self._pipe, args=(down, up), daemon=True).start()
                threading.Thread(target=self._edit, args=(up, down), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def _edit(self, up: socket.socket, down: socket.socket) -> None:
        try:
            while True:
                size = recv_exact(up, 4)
                body = recv_exact(up, int.from_bytes(size, "big"))
                header = self._header(body)
                if header is None:
                    down.sendall(size + body)
                    continue
                data = bytearray(recv_exact(up, header.length))
                before = crc32(data)
                at = header.length // 2
                delta = crc_preserving_delta(header.length, at)
                for i, b in enumerate(delta):
                    data[at + i] ^= b
                self.crc_kept &= crc32(data) == before
                self.edited += 1
                if self.forge_digest:
                    forged = msgspec.structs.replace(header, digest=chunk_digest(data))
                    body = _encode(forged) + body[-TAG_BYTES:]
                    size = len(body).to_bytes(4, "big")
                down.sendall(size + body + bytes(data))
        except (ConnectionError, OSError):
            pass
        except BaseException as e:  # a bug in the relay must fail the test, not hide
            self.errors.append(e)
        finally:
            for s in (up, down):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _header(body: bytes) -> ChunkHeader | None:
        for candidate in (body[:-TAG_BYTES], body):  # tagged after the handshake
            with contextlib.suppress(msgspec.DecodeError):
                msg = _decode(candidate)
                return msg if isinstance(msg, ChunkHeader) else None
        return None

    def close(self) -> None:
        self.sock.close()
        self._conns.close()


class _Sockets:
    """A relay's connections, every one closed by ``close``, also one accepted while it
    runs (a socket left to the garbage collector is an unraisable ResourceWarning)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False

    def add(self, s: socket.socket) -> socket.socket:
        with self._lock:
            if not self._closed:
                self._open.append(s)
                return s
        s.close()
        raise OSError("the relay is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._open = self._open, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.parametrize("forge_digest", [False, True], ids=["bytes", "bytes+digest"])
def test_a_relay_editing_chunks_keeping_their_crc_gets_nothing_served(
    daemon_factory: Any, etcd: Any, tmp_path: Path, forge_digest: bool
) -> None:
    """Node A's advertised address is the relay's. B's load ends bitwise right from the
    origin; the forged chunks are counted and A is quarantined after the first."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"k" * 32)
    secret.chmod(0o600)
    model = make_random_model(tmp_path / "m", 8, files=1)
    a_port = free_port()
    relay = EditingRelay(a_port, forge_digest=forge_digest)
    try:
        common = ["--etcd", etcd.endpoint, "--cluster", "t", *FAST, "--chunk-size", "1"]
        common += ["--cluster-secret-file", str(secret)]
        a = daemon_factory(
            roots=[tmp_path],
            extra=[
                *common,
                "--listen",
                f"127.0.0.1:{a_port}",
                "--advertise",
                f"127.0.0.1:{relay.port}",
            ],
        )
        b = daemon_factory(roots=[tmp_path], extra=common)
        _wait(lambda: len(b.status()["cluster"]["nodes"]) == 2, timeout=15)
        load_all([a], model)
        with mows.open_model(model, socket=b.socket, fallback=False) as h:
            assert_same_as_files(h.state_dict(), model)
            assert h.stats["bytes_from_peers"] == 0
        st = b.status()
        assert relay.edited >= 1 and relay.crc_kept, "the relay did not mount its attack"
        assert not relay.errors, relay.errors
        assert st["corrupt_chunks_from_peers"] >= 1
        assert st["corrupt_chunks_from_peers"] == relay.edited  # every forged chunk caught
        assert st["integrity_failures"] == 0  # nothing reached the pool's final check
    finally:
        relay.close()


class CapturingRelay:
    """Passes bytes both ways unchanged and keeps what the server sent (an eavesdropper)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen = bytearray()
        self._conns = _Sockets()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                down = self._conns.add(self.sock.accept()[0])
                up = self._conns.add(socket.create_connection(self.upstream))
                threading.Thread(target=self._pipe, args=(down, up, False), daemon=True).start()
                threading.Thread(target=self._pipe, args=(up, down, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, keep: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if keep:
                    self.seen += data
                dst.sendall(data)

    def close(self) -> None:
        self.sock.close()
        self._conns.close()


def test_encrypted_chunks_are_opaque_on_the_wire_and_still_verified() -> None:
    """--peer-encryption: what crosses the wire is not the chunk's bytes, the receiver gets
    them bitwise (checked by digest and CRC), and a server that requires encryption refuses
    a client that does not ask for it."""
    from mows.transport import TcpPeerClient
    from tests.integration.test_transport import CHUNK, DATA, SECRET, tcp_server

    with tcp_server(encrypt=True) as server:
        relay = CapturingRelay(server.address)
        client = TcpPeerClient(node="c", secret=SECRET, timeout=5, encrypt=True)
        try:
            dest = bytearray(CHUNK)
            got = client.fetch(relay.address, "m", "f.bin", 1, memoryview(dest), None, "s")
            assert bytes(dest) == DATA[CHUNK : 2 * CHUNK] and got.crc == crc32(dest)
            assert len(relay.seen) >= CHUNK
            assert DATA[CHUNK + 4096 : CHUNK + 4160] not in relay.seen
        finally:
            client.close()
            relay.close()
        plain = TcpPeerClient(node="c", secret=SECRET, timeout=5)
        try:
            with pytest.raises(PeerError, match="requires encrypted"):
                plain.fetch(server.address, "m", "f.bin", 0, memoryview(bytearray(CHUNK)), None)
        finally:
            plain.close()


def test_unencrypted_chunks_are_plain_on_the_wire() -> None:
    """The control for the test above: without encryption an eavesdropper does see them."""
    from mows.transport import TcpPeerClient
    from tests.integration.test_transport import CHUNK, DATA, SECRET, tcp_server

    with tcp_server() as server:
        relay = CapturingRelay(server.address)
        client = TcpPeerClient(node="c", secret=SECRET, timeout=5)
        try:
            client.fetch(relay.address, "m", "f.bin", 1, memoryview(bytearray(CHUNK)), None)
            assert DATA[CHUNK + 4096 : CHUNK + 4160] in relay.seen
        finally:
            client.close()
            relay.close()


def test_encrypted_cluster_loads_from_peers(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    """Two daemons with --peer-encryption: the second loads everything from the first,
    bitwise right."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"e" * 32)
    secret.chmod(0o600)
    model = make_random_model(tmp_path / "m", 12, files=2)
    common = ["--etcd", etcd.endpoint, "--cluster", "t", *FAST, "--chunk-size", "1"]
    common += ["--cluster-secret-file", str(secret), "--peer-encryption"]
    a = daemon_factory(roots=[tmp_path], extra=common)
    b = daemon_factory(roots=[tmp_path], extra=common)
    _wait(lambda: len(b.status()["cluster"]["nodes"]) == 2, timeout=15)
    load_all([a], model)
    wait_published(a, b, 12 << 20)
    with mows.open_model(model, socket=b.socket, fallback=False) as h:
        assert_same_as_files(h.state_dict(), model)
        assert h.stats["bytes_from_peers"] == h.stats["bytes"] > 0
    assert b.status()["corrupt_chunks_from_peers"] == 0
