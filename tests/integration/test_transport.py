"""The peer transport contract, run against every implementation, over real sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mows import PeerError, crc32
from mows._digest import chunk_digest
from mows.transport import ServedChunk, TcpPeerClient, TcpPeerServer
from mows.transport._wire import Landed

SECRET = b"s" * 32
DATA = os.urandom(3 * 2**20 + 123)
CHUNK = 2**20


@dataclass
class FileStore:
    """A ChunkStore over a real file, with optional lies about chunks' CRCs or digests."""

    fd: int
    wrong_crc: set[int] = field(default_factory=set)
    wrong_digest: set[int] = field(default_factory=set)
    sent: int = 0

    def open_chunk(self, model: str, path: str, index: int) -> ServedChunk | None:
        if model != "m" or path != "f.bin" or index * CHUNK >= len(DATA):
            return None
        off = index * CHUNK
        length = min(CHUNK, len(DATA) - off)
        crc = crc32(DATA[off : off + length]) ^ (1 if index in self.wrong_crc else 0)
        digest = chunk_digest(DATA[off : off + length] + b"x" * (index in self.wrong_digest))
        return ServedChunk(os.dup(self.fd), off, length, crc, digest)

    def have(self, model: str, path: str) -> bytes:
        return b"\x0f" if (model, path) == ("m", "f.bin") else b""

    def watch(self, model: str, epoch: int, since: int, wait: float) -> Landed:
        return Landed(7, 1, {"f.bin": [0]})

    def served(self, peer: str, nbytes: int) -> None:
        self.sent += nbytes


def ucx_classes() -> tuple[type[Any], type[Any]]:
    from mows.transport._ucx import UcxPeerClient, UcxPeerServer

    return UcxPeerServer, UcxPeerClient


def make_client(kind: str, secret: bytes | None) -> Any:
    cls = TcpPeerClient if kind == "tcp" else ucx_classes()[1]
    return cls(node="client", secret=secret, timeout=5)


@pytest.fixture(params=["tcp", "ucx"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "ucx":
        pytest.importorskip("ucxx", reason="--nic ucx needs the mows[ucx] extra")
    return str(request.param)


@pytest.fixture
def pair(kind: str) -> Iterator[tuple[Any, Any, FileStore]]:
    with tempfile.TemporaryFile() as fh:
        fh.write(DATA)
        fh.flush()
        store = FileStore(fh.fileno())
        server_cls = TcpPeerServer if kind == "tcp" else ucx_classes()[0]
        server = server_cls("127.0.0.1:0", store, node="server", secret=SECRET)
        client = make_client(kind, SECRET)
        try:
            yield server, client, store
        finally:
            client.close()
            server.close()


def test_fetches_every_chunk_bitwise(pair: tuple[Any, Any, FileStore]) -> None:
    server, client, store = pair
    out = bytearray(len(DATA))
    view = memoryview(out)
    for i in range(4):
        off = i * CHUNK
        dest = view[off : min(off + CHUNK, len(DATA))]
        got = client.fetch(server.address, "m", "f.bin", i, dest, None, "server")
        assert got.crc == crc32(dest) and got.digest == chunk_digest(dest)
    assert bytes(out) == DATA
    assert store.sent == len(DATA)


def test_missing_chunk_is_a_peer_error(pair: tuple[Any, Any, FileStore]) -> None:
    server, client, _ = pair
    with pytest.raises(PeerError, match="not held"):
        client.fetch(server.address, "m", "other.bin", 0, memoryview(bytearray(CHUNK)), None)
    # The connection stays usable.
    buf = bytearray(CHUNK)
    client.fetch(server.address, "m", "f.bin", 0, memoryview(buf), None)
    assert bytes(buf) == DATA[:CHUNK]


def test_a_watch_reports_first_copies_as_they_land(kind: str) -> None:
    """A loading owner answers a watch as soon as it reads a chunk from the origin (not at
    the end of the wait), with every such chunk past the watcher's position; chunks it got
    from peers are not reported; an empty answer comes at the end of the wait; a file that
    goes starts a new epoch (read again from 0); chunks announced (ones it came to own) are
    reported once, if held. ``Have`` lists what it holds. The daemon's real ChunkTable behind
    a real server."""
    from mows.daemon._chunks import ChunkTable

    table = ChunkTable()
    with tempfile.TemporaryFile() as fh:
        fh.write(DATA)
        fh.flush()
        table.add_file("m", "f.bin", fh.fileno())
        table.add_file("m", "g.bin", fh.fileno())
        server_cls = TcpPeerServer if kind == "tcp" else ucx_classes()[0]
        server = server_cls("127.0.0.1:0", table, node="server", secret=SECRET)
        client = make_client(kind, SECRET)

        def lands(index: int, first_copy: bool = True, path: str = "f.bin") -> None:
            off = index * CHUNK
            crc = crc32(DATA[off : off + CHUNK])
            table.add_chunk("m", path, index, off, CHUNK, crc, first_copy=first_copy)

        try:
            address = server.address
            assert client.have(address, "m", "f.bin", "server") == b""
            threading.Timer(0.5, lands, (1,)).start()
            started = time.monotonic()
            got = client.watch(address, "m", 0, 0, 5, "server")
            took = time.monotonic() - started
            assert got.chunks == {"f.bin": [1]} and got.next == 1
            assert 0.4 < took < 3, took  # answered when it landed, not at the end of the wait
            buf = bytearray(CHUNK)
            client.fetch(address, "m", "f.bin", 1, memoryview(buf), None, "server")
            assert bytes(buf) == DATA[CHUNK : 2 * CHUNK]
            assert client.have(address, "m", "f.bin", "server") == b"\x02"
            # From a peer: served, not reported; nothing new: empty at the end of the wait.
            lands(2, first_copy=False)
            started = time.monotonic()
            empty = client.watch(address, "m", got.epoch, got.next, 0.3, "server")
            assert empty.chunks == {} and (empty.epoch, empty.next) == (got.epoch, 1)
            assert 0.25 < time.monotonic() - started < 3
            assert client.have(address, "m", "f.bin", "server") == b"\x06"
            lands(0, path="g.bin")
            lands(3)
            both = client.watch(address, "m", got.epoch, got.next, 5, "server")
            assert both.chunks == {"g.bin": [0], "f.bin": [3]} and both.next == 3
            # Owning chunks got from a peer (a dead owner's): announced once, held ones only.
            table.announce("m", [("f.bin", 2), ("f.bin", 3), ("f.bin", 5), ("f.bin", 2)])
            owned = client.watch(address, "m", both.epoch, both.next, 5, "server")
            assert owned.chunks == {"f.bin": [2]} and owned.next == 4
            both = owned
            # A file that goes: a new epoch; a watcher at the old one reads the rest again.
            table.remove_file("m", "f.bin")
            again = client.watch(address, "m", both.epoch, both.next, 5, "server")
            assert again.epoch != both.epoch and again.chunks == {"g.bin": [0]}
            assert again.next == 1
            # An unknown model: an empty answer after the wait, never an error.
            none = client.watch(address, "other", 0, 0, 0.1, "server")
            assert none.chunks == {}
        finally:
            client.close()
            server.close()
            table.close()


def test_bad_bytes_are_detected(pair: tuple[Any, Any, FileStore]) -> None:
    server, client, store = pair
    store.wrong_crc.add(1)
    with pytest.raises(PeerError, match="CRC") as e:
        client.fetch(server.address, "m", "f.bin", 1, memoryview(bytearray(CHUNK)), None)
    assert e.value.corrupt
    with pytest.raises(PeerError, match="CRC"):
        client.fetch(server.address, "m", "f.bin", 2, memoryview(bytearray(CHUNK)), 12345)
    store.wrong_digest.add(0)
    with pytest.raises(PeerError, match="BLAKE3") as e:
        client.fetch(server.address, "m", "f.bin", 0, memoryview(bytearray(CHUNK)), None)
    assert e.value.corrupt


def test_a_server_proving_another_node_id_is_refused(pair: tuple[Any, Any, FileStore]) -> None:
    """The directory says which node listens at an address; a server that proves another id
    (a node moved, or a relay to the wrong node) is not fetched from."""
    server, client, store = pair
    with pytest.raises(PeerError, match="expected 'other'"):
        client.fetch(server.address, "m", "f.bin", 0, memoryview(bytearray(CHUNK)), None, "other")
    assert store.sent == 0


def test_wrong_secret_gets_nothing(kind: str, pair: tuple[Any, Any, FileStore]) -> None:
    server, _, store = pair
    intruder = make_client(kind, b"x" * 32)
    with pytest.raises(PeerError, match=r"secret|authentication"):
        intruder.fetch(server.address, "m", "f.bin", 0, memoryview(bytearray(CHUNK)), None)
    nosecret = make_client(kind, None)
    with pytest.raises(PeerError):
        nosecret.fetch(server.address, "m", "f.bin", 0, memoryview(bytearray(CHUNK)), None)
    intruder.close()
    nosecret.close()
    assert store.sent == 0


def test_malformed_frames_drop_only_that_connection(
    kind: str, pair: tuple[Any, Any, FileStore]
) -> None:
    if kind != "tcp":
        pytest.skip("raw bytes can be injected on a TCP socket only; UCX frames are typed")
    server, client, _ = pair
    host, port = server.address.rsplit(":", 1)
    for junk in (struct.pack(">I", 2**30) + b"x", b"\x00\x00\x00\x03abc", os.urandom(512)):
        s = socket.create_connection((host, int(port)))
        s.sendall(junk)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
        s.close()
    buf = bytearray(CHUNK)
    client.fetch(server.address, "m", "f.bin", 0, memoryview(buf), None)
    assert bytes(buf) == DATA[:CHUNK]


def test_dead_peer_is_a_peer_error() -> None:
    client = TcpPeerClient(node="c", secret=SECRET, timeout=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerError, match="cannot connect"):
        client.fetch(f"127.0.0.1:{port}", "m", "f.bin", 0, memoryview(bytearray(8)), None)


def test_ucx_needs_a_secret() -> None:
    pytest.importorskip("ucxx", reason="--nic ucx needs the mows[ucx] extra")
    from mows import ConfigError

    with tempfile.TemporaryFile() as fh, pytest.raises(ConfigError, match="secret"):
        ucx_classes()[0]("127.0.0.1:0", FileStore(fh.fileno()), node="s", secret=None)


def test_no_secret_means_loopback_only() -> None:
    with tempfile.TemporaryFile() as fh:
        server = TcpPeerServer("0.0.0.0:0", FileStore(fh.fileno()), node="s", secret=None)
        try:
            assert server.address.startswith("127.0.0.1:")
        finally:
            server.close()


@contextlib.contextmanager
def tcp_server(**options: Any) -> Iterator[TcpPeerServer]:
    """A TCP peer server on loopback over DATA, with ``options`` (caps, timeouts)."""
    with tempfile.TemporaryFile() as fh:
        fh.write(DATA)
        fh.flush()
        server = TcpPeerServer(
            "127.0.0.1:0", FileStore(fh.fileno()), node="s", secret=SECRET, **options
        )
        try:
            yield server
        finally:
            server.close()


def _fetch_one(client: Any, server: Any) -> None:
    dest = bytearray(CHUNK)
    got = client.fetch(server.address, "m", "f.bin", 0, memoryview(dest), crc32(DATA[:CHUNK]))
    assert bytes(dest) == DATA[:CHUNK] and got.crc == crc32(DATA[:CHUNK])


def test_slow_handshake_is_cut_at_its_deadline() -> None:
    """One byte every half second never completes a handshake: the server closes the
    connection at its wall-clock deadline, though no single receive times out."""
    with tcp_server(handshake_timeout=2) as server:
        host, port = server.address.rsplit(":", 1)
        slow = socket.create_connection((host, int(port)))
        slow.settimeout(10)
        start = time.monotonic()
        closed = False
        try:
            for b in struct.pack(">I", 1000) + b"x" * 40:
                slow.sendall(bytes([b]))
                time.sleep(0.5)
        except OSError:
            closed = True
        if not closed:
            closed = slow.recv(1) == b""
        assert closed and time.monotonic() - start < 8
        slow.close()


def test_connection_flood_leaves_the_port_serving_real_peers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hundreds of unauthenticated connections from one host hit the per-address cap; the
    accept loop keeps going and a real peer (another address) is still served."""
    with tcp_server(max_per_address=8) as server:
        flood: list[socket.socket] = []
        try:
            host, port = server.address.rsplit(":", 1)
            for _ in range(200):
                flood.append(socket.create_connection((host, int(port))))
            deadline = time.monotonic() + 10
            while server.refused < 150 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.refused >= 150, server.refused
            # The peer comes from another loopback address, so the flood's cap is not its.
            real = TcpPeerClient(node="client", secret=SECRET, timeout=5)
            real_server_addr = server.address
            orig = socket.create_connection

            def from_other(address: Any, *a: Any, **k: Any) -> socket.socket:
                return orig(address, *a, **{**k, "source_address": ("127.0.0.2", 0)})

            monkeypatch.setattr(socket, "create_connection", from_other)
            try:
                dest = bytearray(CHUNK)
                real.fetch(real_server_addr, "m", "f.bin", 0, memoryview(dest), None)
                assert bytes(dest) == DATA[:CHUNK]
            finally:
                monkeypatch.undo()
                real.close()
        finally:
            for s in flood:
                s.close()


def test_a_pooled_connection_closed_while_idle_is_replaced() -> None:
    """The server ends idle connections; the client's next fetch on the pooled one fails on
    a closed socket and is retried once on a fresh connection, transparently."""
    with tcp_server(idle_timeout=0.5) as server:
        client = make_client("tcp", SECRET)
        try:
            _fetch_one(client, server)
            time.sleep(1.5)  # the server drops the idle connection
            _fetch_one(client, server)
        finally:
            client.close()


def test_a_fresh_connection_is_made_when_the_pool_is_full_of_idle_ones() -> None:
    """The retry after a stale pooled connection asks for a fresh one: with the pool at its
    cap and the rest idle, an idle one makes room. Before, it waited for a release that,
    with every other connection idle, never came (a chaos run: fetches hung after a peer's
    restart left stale connections in the pool)."""
    with tcp_server(idle_timeout=0.5) as server:
        client = TcpPeerClient(node="client", secret=SECRET, timeout=5, connections=2)
        try:
            held = [client._acquire(server.address, "s") for _ in range(2)]
            for c in held:  # two connections, both pooled idle
                client._release(server.address, c, True)
            assert client._count[(server.address, False)] == 2
            time.sleep(1.5)  # the server drops both: stale
            got: list[Any] = []
            asker = threading.Thread(
                target=lambda: got.append(client._acquire(server.address, "s", True)),
                daemon=True,  # (it waited forever before: the test must not)
            )
            asker.start()
            asker.join(10)
            assert got, "a fresh connection waited for a release that never comes"
            client._release(server.address, got[0], True)
            assert client._count[(server.address, False)] == 2
            _fetch_one(client, server)
        finally:
            client.close()


def test_ucx_port_is_bounded() -> None:
    """UCX: a connection that never completes its handshake is dropped at the deadline, one
    past the cap is refused at once, and the port still serves a real peer afterwards."""
    pytest.importorskip("ucxx", reason="--nic ucx needs the mows[ucx] extra")
    from mows.transport._ucx import _Loop, _ucxx

    server_cls, client_cls = ucx_classes()
    with tempfile.TemporaryFile() as fh:
        fh.write(DATA)
        fh.flush()
        server = server_cls(
            "127.0.0.1:0",
            FileStore(fh.fileno()),
            node="s",
            secret=SECRET,
            handshake_timeout=1.0,
            max_connections=1,
        )
        loop = _Loop.get()
        port = int(server.address.rsplit(":", 1)[1])
        try:
            silent = loop.run(_ucxx().create_endpoint("127.0.0.1", port), 10)
            deadline = time.monotonic() + 5
            while server._active == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server._active == 1
            extra = loop.run(_ucxx().create_endpoint("127.0.0.1", port), 10)
            deadline = time.monotonic() + 5
            while server.refused == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.refused == 1
            while server._active and time.monotonic() < deadline + 5:
                time.sleep(0.05)
            assert server._active == 0  # the silent one was cut at its handshake deadline
            for ep in (silent, extra):
                with contextlib.suppress(Exception):
                    loop.run(ep.close(), 5)
            client = client_cls(node="c", secret=SECRET, timeout=5)
            try:
                dest = bytearray(CHUNK)
                client.fetch(server.address, "m", "f.bin", 0, memoryview(dest), None)
                assert bytes(dest) == DATA[:CHUNK]
            finally:
                client.close()
        finally:
            server.close()


def test_connection_cap_follows_the_descriptor_limit() -> None:
    """The peer port's cap: raised RLIMIT_NOFILE when the hard limit allows it, else capped
    to what the limit leaves room for (with a warning), never more descriptors than there
    are. In a child process: the limits are per process."""
    import subprocess
    import sys

    code = (
        "import resource as r; from mows.transport._tcp import connection_cap as c; "
        "r.setrlimit(r.RLIMIT_NOFILE, (1024, 20000)); a = c(8192); "
        "b = r.getrlimit(r.RLIMIT_NOFILE)[0]; "
        "r.setrlimit(r.RLIMIT_NOFILE, (2048, 2048)); print(a, b, c(8192), c(100))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["8192", str(2 * 8192 + 1024), "512", "100"], out
    assert "capped at 512 by RLIMIT_NOFILE 2048" in out.stderr
