"""Helpers for tests/integration/test_fuzz_wire.py: raw framing, reply readers, the oracles
that say what a byte stream must get back, and process resource counts.

The oracles replay a stream through the same framing rules the servers document (length
limits, decoders, first-message rules) and say what the server must answer; the tests then
hold a real server to that, over real sockets.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import strategies as st

from mows import _errors
from mows import _protocol as p
from mows._errors import ProtocolError
from mows.daemon._api import MAX_REQUEST
from mows.transport import _wire as w

_enc = msgspec.msgpack.Encoder()

# -- strategies ------------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**64 - 1)  # every integer msgpack can carry
EXTREME_INTS = st.sampled_from([-(2**63), -1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1])
ANY_INT = st.one_of(EXTREME_INTS, INT64, st.integers(-5, 70))
FLOATS = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e300, -1e300, 5e-324, -0.0]),
    st.floats(allow_nan=True, allow_infinity=True),
)


def huge_text(prefix: str = "") -> st.SearchStrategy[str]:
    """Long strings, up to past the local API's request limit, built cheaply."""
    sizes = st.sampled_from([1 << 10, 1 << 16, MAX_REQUEST - 200, MAX_REQUEST + 10])
    return st.tuples(sizes, st.characters(min_codepoint=1, codec="utf-8")).map(
        lambda t: prefix + t[1] * t[0]
    )


msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(), st.booleans(), ANY_INT, FLOATS, st.text(max_size=20), st.binary(max_size=20)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def wrong_type(value: Any) -> st.SearchStrategy[Any]:
    """A msgpack value of another type than ``value``'s (msgspec accepts ints for floats)."""
    if isinstance(value, bool):
        return st.sampled_from([0, "yes", None, b"\x01", [True]])
    if isinstance(value, int | float):
        return st.one_of(st.text(max_size=8), st.none(), st.binary(max_size=4), st.just([1]))
    if isinstance(value, str):
        return st.one_of(ANY_INT, st.none(), st.binary(max_size=8), st.just(["a"]), FLOATS)
    if isinstance(value, bytes):
        return st.one_of(ANY_INT, st.none(), st.just(["a"]), st.just({"a": 1}))
    if isinstance(value, list):
        return st.one_of(st.text(max_size=8), ANY_INT, st.just([1, None]))
    return st.one_of(st.text(max_size=8), ANY_INT)


@st.composite
def mangled(draw: st.DrawFn, msg: msgspec.Struct) -> dict[str, Any]:
    """``msg`` as a msgpack map with one field of a wrong type, dropped, or an unknown tag."""
    doc: dict[str, Any] = {"type": type(msg).__name__, **msgspec.structs.asdict(msg)}
    fields = [k for k in doc if k != "type"]
    how = draw(st.sampled_from(["type", "drop", "tag", "extra"] if fields else ["tag", "extra"]))
    if how == "type":
        k = draw(st.sampled_from(fields))
        doc[k] = draw(wrong_type(doc[k]))
    elif how == "drop":
        del doc[draw(st.sampled_from(fields))]
    elif how == "tag":
        doc["type"] = draw(st.one_of(st.text(max_size=12), ANY_INT, st.none()))
    else:
        doc[draw(st.text(min_size=1, max_size=8))] = draw(msgpack_values)
    return doc


def encode_doc(doc: Any) -> bytes:
    return _enc.encode(doc)


def frame(body: bytes, length: int | None = None) -> bytes:
    """A frame (4-byte big-endian length + body); ``length`` overrides the true length."""
    n = len(body) if length is None else length
    return (n % 2**32).to_bytes(4, "big") + body


# -- a background sender (so a server's replies never block our sending, or vice versa) ------


@contextlib.contextmanager
def sending(sock: socket.socket, data: bytes, *, half_close: bool = True) -> Iterator[None]:
    """Send ``data`` from a thread (then shut our side for writing) while the caller reads.
    A server that closes early makes the send fail: that is its right, not an error here."""

    def run() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run, name="fuzz-sender", daemon=True)
    t.start()
    try:
        yield
    finally:
        t.join(30)
        assert not t.is_alive(), "sending to the server hung for 30 s"


def read_exact(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    """``n`` bytes, or None at a clean EOF before the first byte; raises ``AssertionError``
    on a hang past ``deadline`` and ``EOFError`` on EOF in the middle."""
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"the server neither answered nor closed (had {len(buf)}/{n} bytes)"
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except TimeoutError:
            raise AssertionError(
                f"the server hung: {len(buf)}/{n} bytes after the deadline"
            ) from None
        if not chunk:
            if not buf:
                return None
            raise EOFError(f"the server closed in the middle of a frame ({len(buf)}/{n} bytes)")
        buf += chunk
    return bytes(buf)


def read_frames(
    sock: socket.socket, deadline: float, limit: int, *, count: int | None = None
) -> tuple[list[bytes], bool]:
    """Frame bodies until EOF (or ``count`` frames); returns (bodies, closed). A reset counts
    as closed; a hang past ``deadline`` fails."""
    bodies: list[bytes] = []
    try:
        while count is None or len(bodies) < count:
            head = read_exact(sock, 4, deadline)
            if head is None:
                return bodies, True
            n = int.from_bytes(head, "big")
            assert n <= limit, f"the server sent a frame of {n} bytes (limit {limit})"
            body = read_exact(sock, n, deadline)
            assert body is not None, "the server closed between a frame's length and its body"
            bodies.append(body)
    except ConnectionResetError:
        return bodies, True
    return bodies, False


# -- the local API ---------------------------------------------------------------------------

MOWS_ERRORS = {
    name
    for name in dir(_errors)
    if isinstance(getattr(_errors, name), type)
    and issubclass(getattr(_errors, name), _errors.MowsError)
}


@dataclass
class ApiExpect:
    """What the daemon owes a connection that sent a stream and then shut its side."""

    welcome: bool = False  # the first frame was a proper Hello
    answered: int = 0  # Status, Reload, Prefetch: one reply each, in order
    opens: int = 0  # Open: at most one final reply each (the close cancels those in flight)
    scrubs: int = 0  # Scrub: answered when its pass ends, so at most one StatusReply each
    protocol_error: bool = False  # the stream breaks the protocol: Error("ProtocolError"), close


def expect_api(stream: bytes) -> ApiExpect:
    """Parse ``stream`` as the daemon must (``_protocol`` framing, ``MAX_REQUEST``, Hello
    first and only first) and say what it owes."""
    e = ApiExpect()
    pos = 0
    while True:
        if len(stream) - pos < 4:
            return e  # EOF inside a length: a closed connection, nothing more owed
        n = int.from_bytes(stream[pos : pos + 4], "big")
        if n > min(p.MAX_FRAME, MAX_REQUEST):
            e.protocol_error = True
            return e
        if len(stream) - pos - 4 < n:
            return e  # EOF inside a body
        body = stream[pos + 4 : pos + 4 + n]
        pos += 4 + n
        try:
            msg = p.decode_request(body)
        except ProtocolError:
            e.protocol_error = True
            return e
        if not e.welcome:
            if not (isinstance(msg, p.Hello) and msg.version == p.PROTOCOL_VERSION):
                e.protocol_error = True
                return e
            e.welcome = True
        elif isinstance(msg, p.Hello):
            e.protocol_error = True
            return e
        elif isinstance(msg, p.Open):
            e.opens += 1
        elif isinstance(msg, p.Scrub):
            e.scrubs += 1
        elif isinstance(msg, p.Status | p.Reload | p.Prefetch):
            e.answered += 1


def check_api_replies(bodies: list[bytes], closed: bool, e: ApiExpect) -> list[p.Response]:
    """Hold the replies of one connection to ``e``; returns them decoded."""
    assert closed, "the daemon kept the connection open after our side shut"
    replies = [p.decode_response(b) for b in bodies]  # everything it sends is well formed
    rest = list(replies)
    if e.welcome:
        assert rest and isinstance(rest[0], p.Welcome), replies[:3]
        rest = rest[1:]
    if e.protocol_error:
        assert rest, "a protocol violation was not answered with a typed error"
        last = rest[-1]
        assert isinstance(last, p.Error) and last.kind == "ProtocolError", last
        rest = rest[:-1]
    assert not any(isinstance(m, p.Welcome) for m in rest), replies
    errors = [m for m in rest if isinstance(m, p.Error)]
    for err in errors:
        # Every refusal names a mows exception; anything else is a crash reported as one.
        assert err.kind in MOWS_ERRORS and err.kind != "ProtocolError", err
    ready = sum(isinstance(m, p.Ready) for m in rest)
    status = sum(isinstance(m, p.StatusReply) for m in rest)
    finals = ready + status + len(errors)
    assert ready <= e.opens and status <= e.answered + e.scrubs, (e, replies)
    assert e.answered <= finals <= e.answered + e.opens + e.scrubs, (e, replies)
    if not e.opens:
        assert not any(isinstance(m, p.Progress) for m in rest), replies
    return replies


def api_exchange(path: str, stream: bytes, timeout: float = 20.0) -> tuple[list[bytes], bool]:
    """Send ``stream`` on a fresh connection, shut our side, read every reply until close."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        with sending(s, stream):
            return read_frames(s, time.monotonic() + timeout, p.MAX_FRAME)
    finally:
        s.close()


# -- the peer protocol -----------------------------------------------------------------------


def raw_seal(key: bytes, direction: bytes, number: int, body: bytes) -> bytes:
    """``body`` with the tag ``Channel`` puts on frame ``number`` of ``direction`` (b"c":
    client to server, b"s": back); written out here so a test can tag any bytes at all."""
    mac = hmac.new(key, direction + number.to_bytes(8, "big") + body, hashlib.sha256)
    return body + mac.digest()[: w.TAG_BYTES]


@dataclass
class PeerExpect:
    replies: list[type[msgspec.Struct]]  # untagged handshake replies owed, in order


def expect_peer_handshake(stream: bytes) -> PeerExpect:
    """What a server (with a secret, no required encryption) owes a client that sends
    ``stream`` before any handshake completes: a challenge for a proper hello, a refusal for
    a decodable wrong message, nothing for bytes it cannot frame or decode."""
    out: list[type[msgspec.Struct]] = []
    pos = 0
    for step in ("hello", "auth"):
        if len(stream) - pos < 4:
            break
        n = int.from_bytes(stream[pos : pos + 4], "big")
        if n > w.MAX_PEER_FRAME or len(stream) - pos - 4 < n:
            break
        body = stream[pos + 4 : pos + 4 + n]
        pos += 4 + n
        try:
            msg = w.decode_peer(body)
        except ProtocolError:
            break
        if step == "hello":
            if not isinstance(msg, w.PeerHello) or msg.version != w.PEER_PROTOCOL_VERSION:
                out.append(w.PeerFailure)
                break
            out.append(w.PeerChallenge)
        else:
            out.append(w.PeerFailure)  # no proof without the secret
            break
    return PeerExpect(out)


# -- resources -------------------------------------------------------------------------------


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        m = re.search(r"^Threads:\s+(\d+)", fh.read(), re.M)
    assert m is not None
    return int(m.group(1))


def settles(
    what: str, probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 10.0
) -> Any:
    """Poll ``probe`` until ``ok`` of its value (connections close asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not settle in {timeout}s: {value!r}")
        time.sleep(0.02)


@contextlib.contextmanager
def thread_errors() -> Iterator[list[BaseException]]:
    """Exceptions that escape any thread while the block runs (a server thread that crashed
    instead of dropping one connection)."""
    seen: list[BaseException] = []
    old = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            seen.append(args.exc_value)
        old(args)

    threading.excepthook = hook
    try:
        yield seen
    finally:
        threading.excepthook = old
