"""Fuzzing every wire format against running servers: the local API of a real ``mows serve``
(Unix socket) and the peer protocol of a real ``TcpPeerServer`` over the daemon's
``ChunkTable`` (TCP, cluster secret, tagged frames), plus a real ``TcpPeerClient`` fed a
malicious server's replies.

Each example talks to the running server over real sockets; oracles in tests/fuzz_helpers.py
say what it owes (a typed error, a reply, a close, never a hang). After each example the
server must still be alive and serve a real client correctly (bytes compared), hold no
leaked pins, and its fd and thread counts must come back to where they were.

The default run is short: 20 to 250 examples per test (about 1,100 in all), under a minute
on two cores. For a long run, set ``MOWS_FUZZ_EXAMPLES`` (examples per test, replacing every
default) and lift pytest's per-test timeout:

    MOWS_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/integration/test_fuzz_wire.py \
        --timeout=0

Hypothesis keeps failing examples in .hypothesis/ and replays them first on the next run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mows import MowsError, PeerError, crc32
from mows import _protocol as p
from mows._digest import chunk_digest
from mows.client._session import Session
from mows.daemon import _chunks
from mows.daemon._api import MAX_REQUEST
from mows.daemon._chunks import ChunkTable
from mows.transport import TcpPeerClient, TcpPeerServer
from mows.transport import _wire as w
from tests import fuzz_helpers as fz
from tests.daemons import make_random_model

FUZZ_EXAMPLES = int(os.environ.get("MOWS_FUZZ_EXAMPLES", "0"))  # 0: each test's default

# A failing example holding a megabyte string is reported all the same.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


def fuzz(default: int) -> Callable[[Any], Any]:
    """Hypothesis settings for one fuzz test: ``default`` examples unless overridden."""
    return settings(
        max_examples=FUZZ_EXAMPLES or default,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # one running server serves every example
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


FD_SLACK = 16  # descriptors a server may hold beyond its settled count (caches, a log rotation)
THREAD_SLACK = 8


# == the local API (Unix socket) =============================================================


@dataclass
class ApiTarget:
    """A running daemon with one small model cached, and what a healthy one looks like."""

    d: Any = field(repr=False)
    root: Path
    model: Path
    files: dict[str, bytes] = field(repr=False)
    version: str = ""
    cold: int = 0  # models made so far that the daemon has not read yet
    fds: int = 0
    threads: int = 0

    @property
    def pid(self) -> int:
        return int(self.d.proc.pid)

    def assert_ready(self, ready: p.Ready, whole: bool = True) -> None:
        """The pool files a Ready names hold exactly the origin's bytes: those of the model,
        or (the one other directory under the root) of the root itself opened as a model."""
        if self.version and ready.model != self.version:
            for rel, path in ready.files.items():
                assert Path(path).read_bytes() == (self.root / rel).read_bytes(), rel
            return
        if whole:
            assert set(ready.files) == set(self.files), ready.files
        for rel, path in ready.files.items():
            assert Path(path).read_bytes() == self.files[rel], rel

    def status(self) -> dict[str, Any]:
        s = Session(self.d.socket, timeout=10)
        try:
            return s.status()
        finally:
            s.close()

    def quiet(self, st_: dict[str, Any]) -> bool:
        """Nobody but the asker is connected, and no connection left a pin or a use behind."""
        return (
            st_["clients"] == 1
            and st_["pinned_bytes"] == 0
            and all(v["pins"] == 0 and v["users"] == 0 for v in st_["versions"])
        )

    def check(self) -> None:
        """Alive, answers a status and a real open (bytes compared), leaks nothing."""
        assert self.d.proc.poll() is None, "the daemon died:\n" + self.d.log()[-6000:]
        s = Session(self.d.socket, timeout=10)
        try:
            assert s.status()["pid"] == self.pid
            ready = s.open(str(self.model))
            self.assert_ready(ready)
            if self.version:
                assert ready.model == self.version
            self.version = ready.model
        finally:
            s.close()  # its pin goes with the connection
        fz.settles("the daemon's clients and pins", self.status, self.quiet)
        if self.fds:
            # (plus one per model directory opened: the daemon keeps its source open)
            fz.settles(
                "the daemon's fds",
                lambda: fz.fd_count(self.pid),
                lambda n: n <= self.fds + FD_SLACK + self.cold,
            )
            fz.settles(
                "the daemon's threads",
                lambda: fz.thread_count(self.pid),
                lambda n: n <= self.threads + THREAD_SLACK,
            )


@pytest.fixture
def api(daemon_factory: Any, tmp_path: Path) -> ApiTarget:
    root = tmp_path / "models"
    model = make_random_model(root / "m", 2, files=2)
    files = {str(f.relative_to(model)): f.read_bytes() for f in model.rglob("*") if f.is_file()}
    target = ApiTarget(daemon_factory(roots=[root]), root, model, files)
    for _ in range(3):  # warm up: the model cached, the daemon's pools of threads started
        target.check()
    target.fds = fz.fd_count(target.pid)
    target.threads = fz.thread_count(target.pid)
    return target


# Strategies are built once, before any daemon exists: paths and ids name the running one
# by these markers, filled in per example (``fill``).
ROOT, MODEL, VERSION = "<<root>>", "<<model>>", "<<version>>"
MODEL_FILES = [f"model-{i:05d}-of-00002.safetensors" for i in range(2)] + ["config.json"]


def fill(t: ApiTarget, x: Any) -> Any:
    """``x`` with the markers replaced by the running daemon's paths and version id."""
    if isinstance(x, str):
        return x.replace(MODEL, str(t.model)).replace(ROOT, str(t.root)).replace(VERSION, t.version)
    if isinstance(x, list):
        return [fill(t, v) for v in x]
    if isinstance(x, dict):
        return {fill(t, k): fill(t, v) for k, v in x.items()}
    if isinstance(x, msgspec.Struct):
        fields = {k: fill(t, getattr(x, k)) for k in x.__struct_fields__}
        return msgspec.structs.replace(x, **fields)
    return x


# Path text leans to the characters paths trip on: NUL, separators, dots, escapes.
PATH_TEXT = st.lists(
    st.one_of(
        st.sampled_from(["\x00", "/", "..", ".", "%2e", "\\", "~", "\n"]), st.text(max_size=8)
    ),
    max_size=6,
).map("".join)
API_PATHS = st.one_of(
    st.sampled_from(
        [MODEL, MODEL + "/", f"{ROOT}/m/../m", f"{ROOT}/./m", f"{MODEL}/config.json", ROOT, "/", ""]
    ),
    PATH_TEXT.map(lambda s: f"{ROOT}/{s}"),
    PATH_TEXT.map(lambda s: "/" + s),
    PATH_TEXT,
    PATH_TEXT.map(lambda s: "http://127.0.0.1:9/" + s),
    PATH_TEXT.map(lambda s: "s3://bucket/" + s),
    fz.huge_text("/"),
    fz.huge_text(ROOT + "/"),
)
_RELS = st.one_of(
    st.none(),
    st.lists(
        st.one_of(st.sampled_from(MODEL_FILES), st.text(max_size=20), st.just("../../etc/passwd")),
        max_size=5,
    ),
)
API_REQUESTS: st.SearchStrategy[msgspec.Struct] = st.one_of(
    st.builds(p.Hello, version=st.one_of(st.just(p.PROTOCOL_VERSION), fz.ANY_INT), pid=fz.ANY_INT),
    st.builds(
        p.Open,
        path=API_PATHS,
        crc32_file=st.one_of(st.none(), st.just("crc32.txt"), st.text(max_size=10)),
        pin=st.booleans(),
        files=_RELS,
        version=st.one_of(st.none(), st.just(VERSION), st.text(max_size=30)),
    ),
    st.builds(
        p.Release,
        model=st.one_of(st.just(VERSION), st.text(max_size=30), fz.huge_text()),
        files=_RELS,
        consumed=st.booleans(),
    ),
    st.just(p.Status()),
    st.just(p.Reload()),
    st.builds(p.Prefetch, path=API_PATHS),
    st.just(p.Scrub()),
)
# One frame of every kind of wrong: ("msg", message or document, length error) or ("raw", b).
API_FRAMES: st.SearchStrategy[tuple[str, Any, int]] = st.one_of(
    st.tuples(st.just("msg"), API_REQUESTS, st.just(0)),
    st.tuples(st.just("msg"), API_REQUESTS.flatmap(fz.mangled), st.just(0)),
    st.tuples(st.just("msg"), fz.msgpack_values, st.just(0)),
    st.tuples(st.just("msg"), API_REQUESTS, st.integers(-8, 8)),  # a wrong length prefix
    st.tuples(st.just("raw"), st.binary(max_size=64).map(fz.frame), st.just(0)),
    st.tuples(
        st.just("raw"),
        st.tuples(st.integers(MAX_REQUEST + 1, 2**32 - 1), st.binary(max_size=16)).map(
            lambda t_: t_[0].to_bytes(4, "big") + t_[1]
        ),
        st.just(0),
    ),
)


def build_frame(t: ApiTarget, spec: tuple[str, Any, int]) -> bytes:
    kind, what, error = spec
    if kind == "raw":
        return bytes(what)
    body = fz.encode_doc(fill(t, what))
    return fz.frame(body, max(0, len(body) + error))


HELLO = fz.frame(fz.encode_doc(p.Hello(p.PROTOCOL_VERSION, os.getpid())))


def run_api_stream(t: ApiTarget, stream: bytes) -> list[p.Response]:
    """One connection sends ``stream`` and shuts; its replies held to the oracle."""
    expect = fz.expect_api(stream)
    bodies, closed = fz.api_exchange(t.d.socket, stream)
    replies = fz.check_api_replies(bodies, closed, expect)
    for r in replies:
        if isinstance(r, p.Ready):
            t.assert_ready(r, whole=False)
    return replies


@fuzz(150)
@given(hello=st.booleans(), junk=st.binary(max_size=4096))
def test_api_random_bytes(api: ApiTarget, hello: bool, junk: bytes) -> None:
    """Random bytes, before or after a proper Hello."""
    run_api_stream(api, (HELLO if hello else b"") + junk)
    api.check()


@fuzz(250)
@given(
    frames=st.lists(API_FRAMES, max_size=6),
    hello=st.booleans(),
    cut=st.one_of(st.none(), st.integers(0, 2**24)),
)
def test_api_malformed_frames(
    api: ApiTarget, frames: list[tuple[str, Any, int]], hello: bool, cut: int | None
) -> None:
    """Frames: proper requests of every kind with hostile values (huge strings, negative and
    64-bit numbers, paths outside the roots, unknown files and versions), requests with a
    field of the wrong type, missing or unknown, unknown message kinds, msgpack that is no
    message, wrong length prefixes, oversized lengths, truncation at any byte."""
    stream = (HELLO if hello else b"") + b"".join(build_frame(api, f) for f in frames)
    if cut is not None:  # truncated anywhere
        stream = stream[: cut % (len(stream) + 1)]
    run_api_stream(api, stream)
    api.check()


@dataclass
class _Conversation:
    """One connection kept open, each request answered before the next: pins tracked."""

    t: ApiTarget
    sock: socket.socket = field(default_factory=lambda: socket.socket(socket.AF_UNIX))
    whole_pins: int = 0  # whole-model pins this connection holds (what status counts)
    used: bool = False  # this connection has opened the version
    closed: bool = False

    def __post_init__(self) -> None:
        self.sock.settimeout(20)
        self.sock.connect(self.t.d.socket)

    def send(self, msg: Any) -> None:
        self.sock.sendall(fz.frame(fz.encode_doc(msg)))

    def recv(self) -> p.Response:
        bodies, _ = fz.read_frames(self.sock, time.monotonic() + 20, p.MAX_FRAME, count=1)
        assert bodies, "the daemon closed a well-behaved connection"
        return p.decode_response(bodies[0])

    def closes(self) -> None:
        bodies, closed = fz.read_frames(self.sock, time.monotonic() + 20, p.MAX_FRAME)
        assert closed and not bodies, bodies
        self.closed = True

    def do(self, msg: Any) -> None:
        t = self.t
        wire = fz.frame(fz.encode_doc(msg))
        if len(wire) - 4 > MAX_REQUEST:  # too large to read: refused unread, then closed
            with contextlib.suppress(OSError):  # the daemon may close before we are done
                self.sock.sendall(wire)
            err = self.recv()
            assert isinstance(err, p.Error) and err.kind == "ProtocolError", err
            assert "exceeds" in err.message, err
            return self.closes()
        self.sock.sendall(wire)
        if isinstance(msg, p.Hello):  # a second Hello breaks the protocol
            err = self.recv()
            assert isinstance(err, p.Error) and err.kind == "ProtocolError", err
            self.closes()
        elif isinstance(msg, p.Open):
            while isinstance(reply := self.recv(), p.Progress):
                pass
            good = (
                msg.path in (str(t.model), str(t.model) + "/", f"{t.root}/m/../m")
                and msg.crc32_file is None
                and msg.version in (None, t.version)
                and (msg.files is None or set(msg.files) <= set(t.files))
            )
            if isinstance(reply, p.Ready):
                t.assert_ready(reply, whole=msg.files is None)
                if reply.model == t.version:
                    self.used = True
                    self.whole_pins += msg.pin and msg.files is None
                else:
                    assert not good, reply
            else:
                assert not good, reply
                assert isinstance(reply, p.Error) and reply.kind in fz.MOWS_ERRORS, reply
                assert reply.kind != "ProtocolError", reply
        elif isinstance(msg, p.Release):
            if msg.model == t.version and msg.files is None and self.whole_pins:
                self.whole_pins -= 1
        else:
            reply = self.recv()
            if isinstance(reply, p.Error):
                assert reply.kind in fz.MOWS_ERRORS and reply.kind != "ProtocolError", reply
            else:
                assert isinstance(reply, p.StatusReply), reply
        if not self.closed and isinstance(msg, p.Status):
            assert isinstance(reply, p.StatusReply)
            (v,) = [v for v in reply.status["versions"] if v["id"] == t.version]
            # (an idle prefetch may hold the version a moment too: users is at least ours)
            assert v["pins"] == self.whole_pins and v["users"] >= int(self.used), (v, self)


CONVERSATION_OPS = st.lists(
    st.one_of(
        API_REQUESTS.filter(lambda m: not isinstance(m, p.Hello)),
        st.builds(p.Open, path=st.just(MODEL), pin=st.booleans()),
        st.just(p.Release(VERSION)),
        st.just(p.Status()),
        st.just("replay"),
        st.just("hello"),
    ),
    max_size=12,
)


@fuzz(150)
@given(ops=CONVERSATION_OPS)
def test_api_conversations_out_of_order_and_replayed(api: ApiTarget, ops: list[Any]) -> None:
    """A live connection sending requests out of order and again: Release of handles it never
    had (or before any Open, or twice), opens of one model pinned and unpinned, whole and in
    parts, replayed frames, a second Hello. Every request gets its answer (a typed error at
    worst), the pins the daemon reports are the ones this connection holds, and none are
    left once it goes."""
    c = _Conversation(api)
    try:
        c.send(p.Hello(p.PROTOCOL_VERSION, os.getpid()))
        assert isinstance(c.recv(), p.Welcome)
        last: Any = p.Status()
        for op in ops:
            if op == "replay":
                msg = last
            elif op == "hello":
                msg = p.Hello(p.PROTOCOL_VERSION, 1)
            else:
                msg = fill(api, op)
            c.do(msg)
            last = msg
            if c.closed:
                break
        if not c.closed:
            c.do(p.Status())
    finally:
        c.sock.close()
    api.check()


@fuzz(20)
@given(
    held_kinds=st.lists(
        st.sampled_from(["silent", "hello", "half", "open", "unread"]), min_size=32, max_size=64
    ),
    streams=st.lists(st.lists(API_FRAMES, max_size=4), min_size=4, max_size=12),
)
def test_api_many_connections_at_once(
    api: ApiTarget, held_kinds: list[str], streams: list[list[tuple[str, Any, int]]]
) -> None:
    """Dozens of connections held open at once (silent, half a frame, pinned opens, asking
    without ever reading the answers) while more fuzz streams run in parallel threads: a
    real client is still served meanwhile, and everything they held goes when they close."""
    model_open = fz.frame(fz.encode_doc(p.Open(str(api.model))))
    held: list[socket.socket] = []
    try:
        for kind in held_kinds:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(20)
            s.connect(api.d.socket)
            held.append(s)
            if kind == "hello":
                s.sendall(HELLO)
            elif kind == "half":
                s.sendall(HELLO + model_open[:7])
            elif kind == "open":
                s.sendall(HELLO + model_open)
            elif kind == "unread":  # asks and asks, never reads: the daemon's writes back up
                s.sendall(HELLO + fz.frame(fz.encode_doc(p.Status())) * 2000)
        for s, kind in zip(held, held_kinds, strict=True):
            while kind == "open":  # Welcome, any Progress, then Ready
                (body,), _ = fz.read_frames(s, time.monotonic() + 20, p.MAX_FRAME, count=1)
                reply = p.decode_response(body)
                assert not isinstance(reply, p.Error), reply
                if isinstance(reply, p.Ready):
                    break
        errors: list[BaseException] = []

        def one(stream: bytes) -> None:
            try:
                run_api_stream(api, stream)
            except BaseException as e:  # reported from the main thread
                errors.append(e)

        threads = [
            threading.Thread(target=one, args=(HELLO + b"".join(build_frame(api, f) for f in fs),))
            for fs in streams
        ]
        for th in threads:
            th.start()
        s = Session(api.d.socket, timeout=10)
        try:
            api.assert_ready(s.open(str(api.model)))
            st_ = s.status()
            assert st_["clients"] >= len(held) + 1, st_["clients"]
        finally:
            s.close()
        for th in threads:
            th.join(60)
            assert not th.is_alive(), "a fuzz connection hung"
        if errors:
            raise errors[0]
    finally:
        for s in held:
            s.close()
    api.check()


@fuzz(30)
@given(
    delay_ms=st.integers(0, 40),
    how=st.sampled_from(["close", "shut", "garbage", "hello", "release"]),
    pin=st.booleans(),
    twice=st.booleans(),
)
def test_api_opens_cut_off_mid_fill(
    api: ApiTarget, delay_ms: int, how: str, pin: bool, twice: bool
) -> None:
    """A connection that opens a model the daemon has not read yet (once or twice) and
    goes, or breaks the protocol, while the fill runs: the fill is cancelled or finished
    cleanly, no pin or use stays behind, and the next open of that model gets all its
    bytes right."""
    api.cold += 1
    cold = make_random_model(api.root / f"cold-{api.cold}", 16, files=4, seed=api.cold)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(20)
        s.connect(api.d.socket)
        opens = fz.frame(fz.encode_doc(p.Open(str(cold), pin=pin)))
        s.sendall(HELLO + opens * (1 + twice))
        time.sleep(delay_ms / 1000)
        if how == "shut":
            s.shutdown(socket.SHUT_WR)
        elif how == "garbage":
            s.sendall(b"\x00\x00\x00\x03abc")
        elif how == "hello":
            s.sendall(HELLO)
        elif how == "release":  # of what it may not hold yet, then gone
            s.sendall(fz.frame(fz.encode_doc(p.Release(api.version))))
        if how in ("shut", "garbage", "hello"):  # the daemon closes: read all it sent
            bodies, closed = fz.read_frames(s, time.monotonic() + 20, p.MAX_FRAME)
            replies = [p.decode_response(b) for b in bodies]
            assert closed, replies
            if how != "shut":
                assert isinstance(replies[-1], p.Error) and replies[-1].kind == "ProtocolError"
    finally:
        s.close()
    api.check()
    session = Session(api.d.socket, timeout=30)
    try:
        ready = session.open(str(cold))
        assert sorted(ready.files) == sorted(str(f.relative_to(cold)) for f in cold.iterdir())
        for rel, path in ready.files.items():
            assert Path(path).read_bytes() == (cold / rel).read_bytes(), rel
    finally:
        session.close()
    api.check()


def test_api_nul_byte_in_a_path_gets_a_typed_error(api: ApiTarget) -> None:
    """Regression (found by the fuzzer): a path with a NUL byte is a path no file can have;
    Prefetch and Open of one must be refused with a mows error, the connection kept."""
    for msg in (p.Prefetch(f"{api.root}/m\x00"), p.Open(f"{api.root}/m\x00"), p.Open("/\x00")):
        c = _Conversation(api)
        try:
            c.send(p.Hello(p.PROTOCOL_VERSION, os.getpid()))
            assert isinstance(c.recv(), p.Welcome)
            c.do(msg)  # a typed error (AccessDeniedError or the like), not a crash
            c.do(p.Status())  # and the connection still serves
        finally:
            c.sock.close()
    api.check()


# == the peer protocol (TCP, tagged frames) ==================================================

SECRET = b"k" * 32
CHUNK = 64 * 1024
DATA = os.urandom(4 * CHUNK + 1000)
HELD = (0, 1, 2, 3)  # chunk 4 (the short tail) is never held
CAP = 0.3  # MAX_WAIT while fuzzing, so a hostile watch costs this, not 30 s


def chunk(i: int) -> bytes:
    return DATA[i * CHUNK : (i + 1) * CHUNK]


@dataclass
class PeerTarget:
    server: TcpPeerServer
    table: ChunkTable
    errors: list[BaseException]  # exceptions that escaped any thread (a server crash)
    threads: int = 0
    fds: int = 0

    @property
    def address(self) -> str:
        return self.server.address

    def watching(self) -> int:
        """Server threads waiting in a watch now."""
        return len(self.table._landed._waiters)  # type: ignore[attr-defined]

    def connect(self) -> socket.socket:
        host, port = fz_split(self.address)
        s = socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def check(self, client: TcpPeerClient | None = None, *, settle: bool = True) -> None:
        """A real client fetches every held chunk (bytes compared), asks Have, and is told a
        missing chunk is missing; no thread crashed; threads and fds come back."""
        assert not self.errors, self.errors
        own = client is None
        c = client or TcpPeerClient(node="checker", secret=SECRET, timeout=5)
        try:
            for i in HELD:
                dest = bytearray(CHUNK)
                got = c.fetch(
                    self.address, "m", "f.bin", i, memoryview(dest), crc32(chunk(i)), "server"
                )
                assert bytes(dest) == chunk(i) and got.digest == chunk_digest(chunk(i))
            assert c.have(self.address, "m", "f.bin", "server") == b"\x0f"
            with pytest.raises(PeerError, match="not held") as e:
                c.fetch(self.address, "m", "f.bin", 4, memoryview(bytearray(1000)), None)
            assert e.value.missing
        finally:
            if own:
                c.close()
        assert not self.errors, self.errors
        if settle:  # no watch left waiting once the requests are answered
            fz.settles("the table's watches", self.watching, lambda n: not n)
        if self.threads and settle:
            fz.settles("our threads", threading.active_count, lambda n: n <= self.threads + 1)
            fz.settles("our fds", fz.fd_count, lambda n: n <= self.fds + FD_SLACK)


def fz_split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


@pytest.fixture
def peer(monkeypatch: pytest.MonkeyPatch) -> Iterator[PeerTarget]:
    """The daemon's ChunkTable over a real file behind a real TcpPeerServer (cluster secret:
    every frame tagged). Chunks 1 and 3 have no digest yet (computed on first request)."""
    monkeypatch.setattr(_chunks, "MAX_WAIT", CAP)
    table = ChunkTable()
    with tempfile.TemporaryFile() as fh, fz.thread_errors() as errors:
        fh.write(DATA)
        fh.flush()
        table.add_file("m", "f.bin", fh.fileno())
        for i in HELD:
            digest = None if i % 2 else chunk_digest(chunk(i))
            table.add_chunk("m", "f.bin", i, i * CHUNK, CHUNK, crc32(chunk(i)), digest)
        server = TcpPeerServer(
            "127.0.0.1:0", table, node="server", secret=SECRET, handshake_timeout=2, idle_timeout=5
        )
        target = PeerTarget(server, table, errors)
        try:
            target.check()
            target.threads = threading.active_count()
            target.fds = fz.fd_count()
            yield target
        finally:
            server.close()
            table.close()


def peer_handshake(t: PeerTarget, s: socket.socket, encrypt: bool = False) -> w.Channel:
    """The client side of the handshake, step by step, with _wire's own pieces."""
    hs = w.ClientHandshake("fuzzer", SECRET, t.address, "server", encrypt)
    w.send_peer(s, hs.hello())
    w.send_peer(s, hs.on_challenge(w.recv_peer(s)))
    bodies, _ = fz.read_frames(s, time.monotonic() + 10, w.MAX_PEER_FRAME, count=1)
    assert bodies, "the server closed after a proper handshake"
    return hs.on_ok(bodies[0])


def peer_messages() -> st.SearchStrategy[msgspec.Struct]:
    """Any peer message, of any kind, with hostile values."""
    texts = st.one_of(st.sampled_from(["m", "f.bin", ""]), st.text(max_size=20), fz.huge_text())
    blobs = st.binary(max_size=64)
    return st.one_of(
        st.builds(
            w.ChunkRequest,
            model=st.one_of(st.just("m"), texts),
            path=st.one_of(st.just("f.bin"), texts),
            index=st.one_of(st.sampled_from(list(range(6))), fz.ANY_INT),
        ),
        st.builds(
            w.HaveRequest,
            model=st.one_of(st.just("m"), texts),
            path=st.one_of(st.just("f.bin"), texts),
        ),
        st.builds(
            w.WatchRequest,
            model=st.one_of(st.just("m"), texts),
            epoch=fz.ANY_INT,
            since=fz.ANY_INT,
            wait=st.one_of(st.just(0.0), fz.FLOATS),
        ),
        st.builds(
            w.Landed,
            epoch=fz.ANY_INT,
            next=fz.ANY_INT,
            chunks=st.dictionaries(texts, st.lists(fz.ANY_INT, max_size=8), max_size=4),
        ),
        st.builds(w.PeerHello, version=fz.ANY_INT, node=texts, nonce=blobs, encrypt=st.booleans()),
        st.builds(w.PeerChallenge, node=texts, nonce=blobs, proof=blobs),
        st.builds(w.PeerAuth, proof=blobs),
        st.builds(w.PeerOk, node=texts),
        st.builds(
            w.ChunkHeader, offset=fz.ANY_INT, length=fz.ANY_INT, crc=fz.ANY_INT, digest=blobs
        ),
        st.builds(w.PeerFailure, message=texts),
        st.builds(w.Have, held=st.one_of(blobs, st.integers(0, 2**20).map(lambda n: b"\xff" * n))),
    )


def peer_hellos() -> st.SearchStrategy[bytes]:
    good = w.PeerHello(w.PEER_PROTOCOL_VERSION, "fuzzer", b"n" * 16)
    hello_docs = st.one_of(
        st.builds(
            w.PeerHello,
            version=st.one_of(st.just(w.PEER_PROTOCOL_VERSION), fz.ANY_INT),
            node=st.one_of(st.text(max_size=20), fz.huge_text()),
            nonce=st.binary(max_size=40),
            encrypt=st.booleans(),
        ),
        fz.mangled(good),
    )
    return hello_docs.map(lambda m: fz.frame(fz.encode_doc(m)))


def _framed(m: Any) -> bytes:
    return fz.frame(fz.encode_doc(m))


@fuzz(200)
@given(
    first=st.one_of(
        st.binary(max_size=256),
        peer_hellos(),
        peer_messages().map(_framed),
        st.integers(w.MAX_PEER_FRAME + 1, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),
    ),
    second=st.one_of(
        st.binary(max_size=128),
        peer_messages().map(_framed),
        st.builds(w.PeerAuth, proof=st.binary(max_size=40)).map(_framed),
    ),
    cut=st.one_of(st.none(), st.integers(0, 2**24)),
)
def test_peer_before_the_handshake(
    peer: PeerTarget, first: bytes, second: bytes, cut: int | None
) -> None:
    """Garbage, oversized and truncated frames, hellos of every shape, a hello followed by
    anything but a proof: a challenge for a proper hello, a refusal for a wrong message,
    a close for what cannot be framed; never a PeerOk, never a hang."""
    stream = first + second
    if cut is not None:  # truncated anywhere
        stream = stream[: cut % (len(stream) + 1)]
    expect = fz.expect_peer_handshake(stream)
    s = peer.connect()
    try:
        with fz.sending(s, stream):
            bodies, closed = fz.read_frames(s, time.monotonic() + 10, w.MAX_PEER_FRAME)
    finally:
        s.close()
    assert closed
    assert [type(w.decode_peer(b)) for b in bodies] == expect.replies, bodies
    peer.check()


@dataclass
class _PeerOp:
    """One thing a client sends after the handshake, and whether it is a proper request."""

    wire: bytes  # what goes on the socket
    request: w.ChunkRequest | w.HaveRequest | w.WatchRequest | None  # None: must drop us
    then_shut: bool = False  # shut our side after it (a frame cut short)


@dataclass
class _PeerSession:
    t: PeerTarget
    sock: socket.socket
    channel: w.Channel
    sent: int = 0  # our frame number (the tag binds it)
    last_wire: bytes = b""  # the last frame sent

    def seal(self, body: bytes, direction: bytes = b"c", number: int | None = None) -> bytes:
        assert self.channel.key is not None
        n = self.sent if number is None else number
        return fz.raw_seal(self.channel.key, direction, n, body)

    def answer(self, req: w.ChunkRequest | w.HaveRequest | w.WatchRequest, started: float) -> None:
        """Read and check the server's answer to a proper request."""
        bodies, _ = fz.read_frames(self.sock, time.monotonic() + 10, w.MAX_PEER_FRAME, count=1)
        if isinstance(req, w.WatchRequest):  # nothing was read from an origin here: empty
            assert bodies, "no answer to a WatchRequest"
            reply = self.channel.open(bodies[0])
            assert isinstance(reply, w.Landed) and reply.chunks == {}, reply
            took = time.monotonic() - started
            assert took < CAP + 2.0, f"wait={req.wait} held the watch {took:.1f}s (cap {CAP}s)"
            return
        if isinstance(req, w.HaveRequest):
            assert bodies, "no answer to a HaveRequest"
            reply = self.channel.open(bodies[0])
            want = b"\x0f" if (req.model, req.path) == ("m", "f.bin") else b""
            assert reply == w.Have(want), reply
            return
        held = (req.model, req.path) == ("m", "f.bin") and req.index in HELD
        if not bodies:
            # A refusal naming a path near the frame limit cannot be framed: a close then.
            failure = w.PeerFailure(f"not held: {req.path} chunk {req.index}")
            assert not held and len(fz.encode_doc(failure)) + w.TAG_BYTES > w.MAX_PEER_FRAME, (
                f"the server dropped a proper request {req!r:.200}"
            )
            return
        reply = self.channel.open(bodies[0])
        if not held:
            assert isinstance(reply, w.PeerFailure) and "not held" in reply.message, reply
            took = time.monotonic() - started
            assert took < 2.0, f"'not held' took {took:.1f}s"
            return
        i = req.index
        assert reply == w.ChunkHeader(i * CHUNK, CHUNK, crc32(chunk(i)), chunk_digest(chunk(i))), (
            reply
        )
        got = fz.read_exact(self.sock, CHUNK, time.monotonic() + 10)
        assert got is not None
        if self.channel.encrypted:
            got = self.channel.chunk_cipher(sending=False).update(got)
        assert got == chunk(i)


@dataclass(frozen=True)
class PeerOpSpec:
    """One post-handshake thing to send, made into bytes against the live session (it needs
    the session key and frame counter): ``kind`` says how the payload is framed and tagged."""

    kind: str
    payload: Any
    extra: int = 0

    def __call__(self, s: _PeerSession) -> _PeerOp:
        kind, extra = self.kind, self.extra
        if kind == "again":  # the very bytes of the frame before: a replay
            return _PeerOp(s.last_wire, None)
        body = self.payload if kind == "raw_tagged" else fz.encode_doc(self.payload)
        if kind in ("tagged", "raw_tagged"):
            sealed = s.seal(body)
            try:
                msg = w.decode_peer(body)
            except MowsError:
                msg = None
            proper = w.ChunkRequest | w.HaveRequest | w.WatchRequest
            ok = isinstance(msg, proper) and len(sealed) <= w.MAX_PEER_FRAME
            return _PeerOp(fz.frame(sealed), msg if ok else None)  # type: ignore[arg-type]
        if kind == "flip":  # one bit of the body or tag
            sealed = bytearray(s.seal(body))
            sealed[extra % len(sealed)] ^= 1 << (extra % 8)
            return _PeerOp(fz.frame(bytes(sealed)), None)
        if kind == "untagged":
            return _PeerOp(fz.frame(body), None)
        if kind == "replay" and s.sent:  # an earlier frame's number again
            return _PeerOp(fz.frame(s.seal(body, number=s.sent - 1 - extra % min(3, s.sent))), None)
        if kind in ("replay", "ahead"):  # a later frame first (reordered)
            return _PeerOp(fz.frame(s.seal(body, number=s.sent + 1 + extra % 3)), None)
        if kind == "reverse":  # the server's direction, as if reflected back
            return _PeerOp(fz.frame(s.seal(body, direction=b"s")), None)
        if kind == "oversize":
            return _PeerOp((w.MAX_PEER_FRAME + 1 + extra).to_bytes(4, "big") + body, None)
        if kind == "short_tag":
            return _PeerOp(fz.frame(s.seal(body)[: -1 - extra % w.TAG_BYTES]), None)
        assert kind == "cut"  # a frame cut short, then our side shut
        f = fz.frame(s.seal(body))
        return _PeerOp(f[: extra % len(f)], None, then_shut=True)


GOOD_PEER_REQUESTS = st.one_of(
    st.builds(
        w.ChunkRequest,
        model=st.just("m"),
        path=st.just("f.bin"),
        index=st.sampled_from(range(6)),
    ),
    st.builds(
        w.HaveRequest, model=st.sampled_from(["m", "x"]), path=st.sampled_from(["f.bin", "g"])
    ),
    st.builds(
        w.WatchRequest,
        model=st.sampled_from(["m", "x"]),
        epoch=st.one_of(st.just(0), fz.ANY_INT),
        since=st.one_of(st.just(0), fz.ANY_INT),
        wait=st.one_of(st.just(0.0), fz.FLOATS),
    ),
)
_SINGLE_PEER_OPS = st.one_of(
    st.builds(PeerOpSpec, st.just("tagged"), GOOD_PEER_REQUESTS),
    st.builds(PeerOpSpec, st.just("tagged"), peer_messages()),
    st.builds(PeerOpSpec, st.just("tagged"), peer_messages().flatmap(fz.mangled)),
    st.builds(PeerOpSpec, st.just("tagged"), fz.msgpack_values),
    st.builds(PeerOpSpec, st.just("raw_tagged"), st.binary(max_size=64)),
    st.builds(
        PeerOpSpec,
        st.sampled_from(
            ["flip", "untagged", "replay", "ahead", "reverse", "oversize", "short_tag", "cut"]
        ),
        GOOD_PEER_REQUESTS,
        st.integers(0, 2**16),
    ),
)
# Batches: one op, or a proper request sent and then the very same bytes again.
PEER_OPS = st.one_of(
    _SINGLE_PEER_OPS.map(lambda o: [o]),
    GOOD_PEER_REQUESTS.map(lambda m: [PeerOpSpec("tagged", m), PeerOpSpec("again", None)]),
)


@fuzz(200)
@given(encrypt=st.booleans(), batches=st.lists(PEER_OPS, min_size=1, max_size=6))
def test_peer_after_the_handshake(
    peer: PeerTarget, encrypt: bool, batches: list[list[PeerOpSpec]]
) -> None:
    """A proper handshake (encrypted or not), then frames: proper requests with huge or
    negative indexes, watches with absurd positions and waits (NaN, inf, 1e300, negative:
    held at most MAX_WAIT) and unknown models; messages of the wrong kind or direction;
    bodies that are not messages; tags flipped, cut, missing; replayed and reordered
    frames; oversized and truncated frames. Proper requests get their answer (chunk bytes
    compared); anything else drops that connection at once and nothing more is sent on it."""
    s = peer.connect()
    try:
        sess = _PeerSession(peer, s, peer_handshake(peer, s, encrypt))
        dropped = False
        for batch in batches:
            for make in batch:
                op = make(sess)
                if op.request is None:  # the server may drop us before it is all sent
                    with fz.sending(s, op.wire, half_close=op.then_shut):
                        bodies, closed = fz.read_frames(s, time.monotonic() + 10, w.MAX_PEER_FRAME)
                    assert closed and not bodies, "a bad frame was answered instead of dropped"
                    dropped = True
                    break
                started = time.monotonic()
                s.sendall(op.wire)
                sess.last_wire = op.wire
                sess.sent += 1
                sess.answer(op.request, started)
            if dropped:
                break
    finally:
        s.close()
    peer.check()


WAIT_CAP = 1.0  # MAX_WAIT in the test of watches: room to see one waiting before it ends


@fuzz(24)
@given(wait=fz.FLOATS, lands=st.booleans(), since=st.one_of(st.just(0), fz.ANY_INT))
def test_peer_watches_are_bounded(
    peer: PeerTarget, monkeypatch: pytest.MonkeyPatch, wait: float, lands: bool, since: int
) -> None:
    """A watch waits at most MAX_WAIT whatever ``wait`` says (NaN, inf, 1e300, negative),
    is answered with the chunk read from the origin meanwhile (whatever position it gave:
    a foreign epoch reads from 0), and leaves no waiter behind."""
    monkeypatch.setattr(_chunks, "MAX_WAIT", WAIT_CAP)
    with tempfile.TemporaryFile() as fh:
        fh.write(DATA)
        fh.flush()
        peer.table.add_file("m", "late.bin", fh.fileno())
        s = peer.connect()
        try:
            sess = _PeerSession(peer, s, peer_handshake(peer, s))
            s.sendall(fz.frame(sess.seal(fz.encode_doc(w.WatchRequest("m", 123, since, wait)))))
            started = time.monotonic()
            waits = wait > 0  # NaN and negatives: no wait
            lands = lands and wait >= WAIT_CAP / 2  # long enough to be seen waiting
            if lands:  # land it once the server is seen waiting for it
                fz.settles("the watch", peer.watching, bool, WAIT_CAP)
                crc = crc32(chunk(0))
                peer.table.add_chunk("m", "late.bin", 0, 0, CHUNK, crc, first_copy=True)
            bodies, _ = fz.read_frames(s, time.monotonic() + 10, w.MAX_PEER_FRAME, count=1)
            took = time.monotonic() - started
            assert bodies, "no answer"
            reply = sess.channel.open(bodies[0])
            assert isinstance(reply, w.Landed), reply
            if lands:
                assert reply.chunks == {"late.bin": [0]} and reply.next == 1, reply
            else:
                assert reply.chunks == {}, reply
                assert took < WAIT_CAP + 2.0, f"wait={wait} held {took:.2f}s (cap {WAIT_CAP}s)"
                if waits:
                    assert took >= min(wait, WAIT_CAP) - 0.05, (
                        f"wait={wait} answered early: {took:.3f}s"
                    )
        finally:
            s.close()
            peer.table.remove_file("m", "late.bin")
    peer.check()


def test_peer_many_connections_at_once(peer: PeerTarget) -> None:
    """Forty connections at once in every state (silent, half a hello, authenticated and
    idle, authenticated with a waiting watch) while eight threads fuzz more: the server
    still serves a real client meanwhile, and every thread it started ends with its
    connection."""
    held: list[socket.socket] = []
    errors: list[BaseException] = []
    try:
        for i in range(40):
            s = peer.connect()
            held.append(s)
            kind = i % 4
            if kind == 1:
                s.sendall(fz.frame(fz.encode_doc(w.PeerHello(3, "x", b"n" * 16)))[:9])
            elif kind >= 2:
                sess = _PeerSession(peer, s, peer_handshake(peer, s))
                if kind == 3:
                    s.sendall(fz.frame(sess.seal(fz.encode_doc(w.WatchRequest("m", 0, 0, 1e300)))))

        def noise(seed: int) -> None:
            try:
                for j in range(10):
                    c = peer.connect()
                    try:
                        if j % 2:
                            sess = _PeerSession(peer, c, peer_handshake(peer, c))
                            c.sendall(fz.frame(sess.seal(os.urandom(32))))
                        else:
                            c.sendall(os.urandom(64 + seed))
                        with contextlib.suppress(OSError):
                            c.shutdown(socket.SHUT_WR)
                        fz.read_frames(c, time.monotonic() + 10, w.MAX_PEER_FRAME)
                    finally:
                        c.close()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=noise, args=(k,)) for k in range(8)]
        for th in threads:
            th.start()
        client = TcpPeerClient(node="real", secret=SECRET, timeout=5)
        try:
            peer.check(client, settle=False)
        finally:
            client.close()
        for th in threads:
            th.join(60)
            assert not th.is_alive()
        if errors:
            raise errors[0]
    finally:
        for s in held:
            s.close()
    peer.check()


# == a real client against a malicious server ================================================


@dataclass
class _Plan:
    """How the malicious server behaves on every connection of one example."""

    handshake: str  # "honest" or how it cheats in the handshake
    replies: list[tuple[Any, ...]]  # how it answers the first requests (then honestly)


class EvilServer:
    """Speaks the real handshake (it knows the secret: a compromised or buggy member), then
    answers requests by its plan: lies in headers, short or wrong bytes, floods, frames
    replayed, reversed, untagged, oversized, silence."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.plan = _Plan("honest", [])
        self.threads: list[threading.Thread] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn, self.plan), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, plan: _Plan) -> None:
        try:
            conn.settimeout(10)
            self._run(conn, plan)
        except (OSError, MowsError, EOFError):
            pass
        finally:
            conn.close()

    @staticmethod
    def _linger(conn: socket.socket) -> None:
        """Say nothing more; wait for the client to give up and close."""
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    def _run(self, conn: socket.socket, plan: _Plan) -> None:
        hs = w.ServerHandshake("evil", SECRET, "client")
        hello = w.recv_peer(conn)
        how = plan.handshake
        if how == "honest" or how.startswith("after:"):
            w.send_peer(conn, hs.on_hello(hello))
            channel, ok = hs.on_auth(w.recv_peer(conn))
            if how == "after:untagged_ok":
                ok = fz.encode_doc(w.PeerOk("evil"))
            elif how == "after:failure":
                ok = channel.seal(w.PeerFailure("go away"))
            elif how == "after:garbage":
                ok = os.urandom(40)
            elif how == "after:silence":
                return self._linger(conn)
            conn.sendall(fz.frame(ok))
        else:
            if how == "bad_proof":
                msg: Any = w.PeerChallenge("evil", os.urandom(16), os.urandom(32))
            elif how == "refuse":
                msg = w.PeerFailure("refused")
            else:
                msg = {
                    "wrong_kind": w.Have(b"\xff"),
                    "huge_node": w.PeerChallenge("e" * 900_000, b"", b""),
                }.get(how)
            if how == "garbage":
                conn.sendall(os.urandom(64))
            elif how == "oversize":
                conn.sendall((2**31).to_bytes(4, "big") + b"x" * 64)
            elif how != "silence":
                conn.sendall(fz.frame(fz.encode_doc(msg)))
            return self._linger(conn)
        if how != "honest":
            return self._linger(conn)
        key = channel.key
        assert key is not None
        sent = 1  # PeerOk was our frame 0

        def send(
            m: Any, *, direction: bytes = b"s", number: int | None = None, tag: bool = True
        ) -> bytes:
            nonlocal sent
            body = fz.encode_doc(m)
            f = fz.frame(
                fz.raw_seal(key, direction, sent if number is None else number, body)
                if tag
                else body
            )
            conn.sendall(f)
            if number is None and direction == b"s" and tag:
                sent += 1
            return f

        replies = list(plan.replies)
        while True:
            bodies, _ = fz.read_frames(conn, time.monotonic() + 30, w.MAX_PEER_FRAME, count=1)
            if not bodies:
                return  # the client went
            req = channel.open(bodies[0])
            action = replies.pop(0) if replies else ("honest",)
            kind = action[0]
            if kind == "honest" or kind == "header":
                if isinstance(req, w.HaveRequest):
                    send(w.Have(b"\x0f"))
                    continue
                if isinstance(req, w.WatchRequest):
                    send(w.Landed(1, 1, {"f.bin": [0]}))
                    continue
                assert isinstance(req, w.ChunkRequest)
                i = req.index
                real = chunk(i)
                if kind == "honest":
                    send(w.ChunkHeader(i * CHUNK, len(real), crc32(real), chunk_digest(real)))
                    conn.sendall(real)
                    continue
                _, length, crc, digest, payload, after = action
                body = {
                    "right": real,
                    "other": chunk((i + 1) % 4),
                    "flipped": real[:100] + bytes([real[100] ^ 4]) + real[101:],
                    "short": real[: len(real) // 2],
                    "none": b"",
                    "long": real + b"x" * 1000,
                }[payload]
                send(
                    w.ChunkHeader(
                        i * CHUNK,
                        {"exact": len(body), "chunk": len(real)}.get(length, length),
                        {"right": crc32(body), "chunk": crc32(real)}.get(crc, crc),
                        {"right": chunk_digest(body), "chunk": chunk_digest(real)}.get(
                            digest, digest
                        ),
                    )
                )
                conn.sendall(body)
                if after == "close":
                    return
                if after == "linger":
                    return self._linger(conn)
            elif kind == "have":
                n = action[1]
                huge = w.Have(b"\xa5" * n) if n % 2 else w.Landed(1, n, {"f.bin": [7] * (n // 2)})
                body = fz.raw_seal(key, b"s", sent, fz.encode_doc(huge))
                conn.sendall(fz.frame(body))  # possibly past the frame limit: sent raw
                sent += 1
            elif kind == "flood":
                for _ in range(action[1]):
                    send(w.PeerFailure("x" * action[2]))
            elif kind == "wrong_kind":
                send(action[1])
            elif kind == "replay":
                f = send(w.PeerFailure("once"))
                conn.sendall(f)
            elif kind == "reverse":
                send(w.PeerFailure("reflected"), direction=b"c")
            elif kind == "untagged":
                send(w.PeerFailure("plain"), tag=False)
            elif kind == "ahead":
                send(w.PeerFailure("skipped"), number=sent + 1)
            elif kind == "garbage":
                conn.sendall(action[1])
            elif kind == "oversize":
                conn.sendall((w.MAX_PEER_FRAME + 1).to_bytes(4, "big") + b"y" * 64)
            elif kind == "close":
                return
            else:
                assert kind == "silence"
                return self._linger(conn)


def evil_replies() -> st.SearchStrategy[tuple[Any, ...]]:
    ints = st.one_of(st.sampled_from([-1, 0, CHUNK - 1, CHUNK + 1, 2**63 - 1]), fz.ANY_INT)
    return st.one_of(
        st.just(("honest",)),
        st.tuples(
            st.just("header"),
            st.one_of(st.sampled_from(["exact", "chunk"]), ints),
            st.one_of(st.sampled_from(["right", "chunk"]), fz.ANY_INT),
            st.one_of(st.sampled_from(["right", "chunk"]), st.binary(max_size=40)),
            st.sampled_from(["right", "other", "flipped", "short", "none", "long"]),
            st.sampled_from(["keep", "close", "linger"]),
        ),
        st.tuples(st.just("have"), st.sampled_from([0, 1, 1000, 2**20 - 64, 2**20])),
        st.tuples(st.just("flood"), st.integers(1, 200), st.sampled_from([0, 10, 4000])),
        st.tuples(
            st.just("wrong_kind"),
            peer_messages().filter(lambda m: not isinstance(m, w.Have | w.PeerFailure)),
        ),
        st.tuples(
            st.sampled_from(
                ["replay", "reverse", "untagged", "ahead", "oversize", "close", "silence"]
            )
        ),
        st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=200)),
    )


CLIENT_TIMEOUT = 0.5  # the client's timeout: what a silent or stalled server costs it
OP_BOUND = 15.0  # seconds one client call may take against any server


@fuzz(80)
@given(
    handshake=st.sampled_from(
        ["honest"] * 6
        + ["bad_proof", "refuse", "wrong_kind", "huge_node", "garbage", "oversize", "silence"]
        + ["after:untagged_ok", "after:failure", "after:garbage", "after:silence"]
    ),
    replies=st.lists(evil_replies(), max_size=4),
    calls=st.lists(
        st.one_of(st.integers(0, 3), st.sampled_from(["have", "watch"])), min_size=1, max_size=4
    ),
)
def test_client_against_a_malicious_server(
    peer: PeerTarget, handshake: str, replies: list[tuple[Any, ...]], calls: list[Any]
) -> None:
    """A real TcpPeerClient against a server that knows the secret and lies: wrong or
    absurd ChunkHeader lengths, offsets, CRCs and digests, bytes short, long, flipped or of
    another chunk, Have with a megabyte of bits and Landed with half a million chunks (and
    past the frame limit), PeerFailure
    floods (stale answers to the next requests), frames replayed, reflected, untagged,
    skipped ahead, oversized, garbage, silence, and cheats in the handshake. Every call
    ends in bounded time with a result or a PeerError; a fetch that returns holds exactly
    the chunk the directory's CRC names; the same client then still fetches correctly from
    an honest server."""
    evil = EvilServer()
    evil.plan = _Plan(handshake, replies)
    client = TcpPeerClient(node="client", secret=SECRET, timeout=CLIENT_TIMEOUT)
    try:
        honest = handshake == "honest" and all(r == ("honest",) for r in replies)
        for call in calls:
            outcome: list[Any] = []

            def run(call: Any = call, outcome: list[Any] = outcome) -> None:
                try:
                    if call == "have":
                        outcome.append(client.have(evil.address, "m", "f.bin", "evil"))
                    elif call == "watch":
                        outcome.append(client.watch(evil.address, "m", 0, 0, 0.5, "evil"))
                    else:
                        dest = bytearray(CHUNK)
                        client.fetch(
                            evil.address,
                            "m",
                            "f.bin",
                            call,
                            memoryview(dest),
                            crc32(chunk(call)),
                            "evil",
                        )
                        outcome.append(bytes(dest))
                except BaseException as e:
                    outcome.append(e)

            th = threading.Thread(target=run, daemon=True)
            started = time.monotonic()
            th.start()
            th.join(OP_BOUND)
            assert not th.is_alive(), f"{call!r} hung for {OP_BOUND}s against {evil.plan}"
            (result,) = outcome
            if isinstance(result, BaseException):
                assert isinstance(result, PeerError), f"{call!r} raised {result!r}"
                assert not honest, result
            elif call == "have":
                assert isinstance(result, bytes) and len(result) <= w.MAX_PEER_FRAME
            elif call == "watch":
                assert isinstance(result, w.Landed), result
            else:
                assert result == chunk(call), f"a fetch returned bytes that are not chunk {call}"
            assert time.monotonic() - started < OP_BOUND
        peer.check(client, settle=False)  # the same client, still sound, with an honest server
    finally:
        client.close()
        evil.close()
        for t in evil.threads:
            t.join(OP_BOUND)
            assert not t.is_alive(), "a malicious server's connection was never let go"
    peer.check()
