"""Messages on the daemon's Unix socket: versioned, size-bounded, validated.

A frame is a 4-byte big-endian length and a msgpack body holding one tagged message. The
first message from a client must be ``Hello`` with our ``PROTOCOL_VERSION``. A frame that is
too large, not msgpack, or not a known message is a ``ProtocolError``: the daemon closes that
one connection and nothing else.
"""

from __future__ import annotations

import socket
import struct
from typing import NoReturn

import msgspec

from ._errors import ProtocolError
from .manifest import Manifest

__all__ = [
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "Error",
    "Hello",
    "Open",
    "Prefetch",
    "Progress",
    "Ready",
    "Release",
    "Reload",
    "Scrub",
    "Status",
    "StatusReply",
    "Welcome",
    "decode_request",
    "decode_response",
    "encode",
    "recv_frame",
    "send_frame",
]

PROTOCOL_VERSION = 2
MAX_FRAME = 64 * 2**20
_LEN = struct.Struct(">I")


class Hello(msgspec.Struct, tag=True, frozen=True):
    version: int
    pid: int = 0


class Open(msgspec.Struct, tag=True, frozen=True):
    """Fetch a model into the pool (if needed) and pin it for this connection."""

    path: str
    # The crc32 file is the daemon's configuration, never a client's choice: a client may
    # name the one it expects, and gets a ConfigError if the daemon checks another.
    crc32_file: str | None = None
    pin: bool = True
    files: list[str] | None = None  # only these files (streaming); None: the whole model
    version: str | None = None  # this exact version (a stream keeps reading one version)
    # False: never wait in line for pool space; no room now is a CapacityError at once (a
    # stream's fetch-ahead, which must not wait while its stream holds a file)
    wait: bool = True


class Release(msgspec.Struct, tag=True, frozen=True):
    """Drop one pin this connection holds on version ``model`` (or on ``files`` of it); no
    reply. ``consumed`` files (streamed and done with) are the first the pool evicts."""

    model: str
    files: list[str] | None = None
    consumed: bool = False


class Status(msgspec.Struct, tag=True, frozen=True):
    pass


class Reload(msgspec.Struct, tag=True, frozen=True):
    """Re-read the model list (as SIGHUP does); answered with a StatusReply."""


class Prefetch(msgspec.Struct, tag=True, frozen=True):
    """Add a model to the idle prefetch list; answered with a StatusReply."""

    path: str


class Scrub(msgspec.Struct, tag=True, frozen=True):
    """Re-check every READY pool file against its chunk CRCs now (a full scrub pass, bad
    files dropped); answered with a StatusReply once the pass is done."""


Request = Hello | Open | Release | Status | Reload | Prefetch | Scrub


class Welcome(msgspec.Struct, tag=True, frozen=True):
    version: int
    daemon_pid: int


class Progress(msgspec.Struct, tag=True, frozen=True):
    model: str
    done: int
    total: int


class Ready(msgspec.Struct, tag=True, frozen=True):
    model: str  # the version id: what Release names, and what every file here belongs to
    manifest: Manifest  # with tensor indexes (from the verified pool bytes) of ``files``
    files: dict[str, str]  # relative path -> pool file path, for the files asked for
    bytes_from_origin: int
    bytes_from_peers: int
    bytes_from_pool: int
    seconds: float
    stale: str = ""  # why the origin could not be asked: this is the cached version


class Error(msgspec.Struct, tag=True, frozen=True):
    kind: str  # the daemon-side exception class, e.g. "IntegrityError"
    message: str
    fields: dict[str, str | int | None] = {}  # the exception's typed fields (path, expected...)


class StatusReply(msgspec.Struct, tag=True, frozen=True):
    status: dict[str, object]


Response = Welcome | Progress | Ready | Error | StatusReply

_enc = msgspec.msgpack.Encoder()
_dec_req = msgspec.msgpack.Decoder(Request)
_dec_resp = msgspec.msgpack.Decoder(Response)


def encode(msg: msgspec.Struct) -> bytes:
    body = _enc.encode(msg)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME} byte limit")
    return _LEN.pack(len(body)) + body


def decode_request(body: bytes) -> Request:
    try:
        msg: Request = _dec_req.decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed request: {e}") from None
    return msg


def decode_response(body: bytes) -> Response:
    try:
        msg: Response = _dec_resp.decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed response: {e}") from None
    return msg


def check_length(header: bytes) -> int:
    (n,) = _LEN.unpack(header)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME} byte limit")
    return int(n)


def send_frame(sock: socket.socket, msg: msgspec.Struct) -> None:
    sock.sendall(encode(msg))


def recv_frame(sock: socket.socket) -> bytes:
    """One frame's body from a blocking socket; ``ConnectionError`` at EOF."""
    n = check_length(recv_exact(sock, _LEN.size))
    return recv_exact(sock, n)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("daemon closed the connection")
        got += k
    return bytes(buf)


def error_message(exc: Exception) -> Error:
    fields = {k: v for k, v in vars(exc).items() if isinstance(v, str | int | None)}
    return Error(type(exc).__name__, str(exc), fields)


def raise_error(msg: Error) -> NoReturn:
    """Re-raise a daemon-side error as the same mows exception class, fields included."""
    from . import _errors

    cls = getattr(_errors, msg.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, _errors.MowsError)):
        raise _errors.DaemonError(msg.message, msg.kind)
    exc = cls.__new__(cls)
    Exception.__init__(exc, msg.message)
    vars(exc).update(msg.fields)
    raise exc
