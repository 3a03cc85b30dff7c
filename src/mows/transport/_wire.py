"""Peer messages and the HMAC handshake (untrusted bytes from the network).

Frames are those of the local API (4-byte length + msgpack, size-bounded). A connection
starts with a mutual challenge: each side proves it knows the cluster secret by an HMAC over
both nonces; the secret never crosses the wire. With no secret configured the proofs are
empty and the server listens on loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket

import msgspec

from .. import _protocol as frames
from .._errors import PeerError, ProtocolError

__all__ = [
    "MAX_PEER_FRAME",
    "PEER_PROTOCOL_VERSION",
    "ChunkHeader",
    "ChunkRequest",
    "ClientHandshake",
    "PeerAuth",
    "PeerChallenge",
    "PeerFailure",
    "PeerHello",
    "PeerOk",
    "ServerHandshake",
    "client_handshake",
    "decode_peer",
    "proof",
    "recv_peer",
    "send_peer",
    "server_handshake",
]

PEER_PROTOCOL_VERSION = 1
MAX_PEER_FRAME = 1 << 20  # control messages only; chunk bytes follow a header, unframed


class PeerHello(msgspec.Struct, tag=True, frozen=True):
    version: int
    node: str
    nonce: bytes


class PeerChallenge(msgspec.Struct, tag=True, frozen=True):
    nonce: bytes
    proof: bytes  # the server's proof: HMAC(secret, "server" | client nonce | server nonce)


class PeerAuth(msgspec.Struct, tag=True, frozen=True):
    proof: bytes  # HMAC(secret, "client" | server nonce | client nonce)


class PeerOk(msgspec.Struct, tag=True, frozen=True):
    node: str


class ChunkRequest(msgspec.Struct, tag=True, frozen=True):
    model: str  # the model's cluster fingerprint
    path: str
    index: int


class ChunkHeader(msgspec.Struct, tag=True, frozen=True):
    offset: int
    length: int
    crc: int


class PeerFailure(msgspec.Struct, tag=True, frozen=True):
    message: str


PeerMessage = (
    PeerHello | PeerChallenge | PeerAuth | PeerOk | ChunkRequest | ChunkHeader | PeerFailure
)
_dec = msgspec.msgpack.Decoder(PeerMessage)


def send_peer(sock: socket.socket, msg: msgspec.Struct) -> None:
    sock.sendall(frames.encode(msg))


def recv_peer(sock: socket.socket) -> PeerMessage:
    """One validated message; ``ProtocolError`` for anything malformed or oversized."""
    header = frames.recv_exact(sock, 4)
    n = int.from_bytes(header, "big")
    if n > MAX_PEER_FRAME:
        raise ProtocolError(f"peer frame of {n} bytes exceeds the {MAX_PEER_FRAME} byte limit")
    return decode_peer(frames.recv_exact(sock, n))


def proof(secret: bytes | None, role: bytes, first: bytes, second: bytes) -> bytes:
    if not secret:
        return b""
    return hmac.new(secret, role + b"|" + first + b"|" + second, hashlib.sha256).digest()


def decode_peer(body: bytes) -> PeerMessage:
    if len(body) > MAX_PEER_FRAME:
        raise ProtocolError(
            f"peer frame of {len(body)} bytes exceeds the {MAX_PEER_FRAME} byte limit"
        )
    try:
        msg: PeerMessage = _dec.decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed peer message: {e}") from None
    return msg


def _expect(msg: PeerMessage, cls: type[msgspec.Struct], peer: str) -> None:
    if isinstance(msg, PeerFailure):
        raise PeerError(peer, f"refused: {msg.message}")
    if not isinstance(msg, cls):
        raise PeerError(peer, f"expected {cls.__name__}, got {type(msg).__name__}")


class ClientHandshake:
    """The client side of the mutual HMAC challenge, free of I/O (each transport drives it)."""

    def __init__(self, node: str, secret: bytes | None, peer: str) -> None:
        self.node, self.secret, self.peer = node, secret, peer
        self.nonce = os.urandom(16)

    def hello(self) -> PeerHello:
        return PeerHello(PEER_PROTOCOL_VERSION, self.node, self.nonce)

    def on_challenge(self, msg: PeerMessage) -> PeerAuth:
        _expect(msg, PeerChallenge, self.peer)
        assert isinstance(msg, PeerChallenge)
        if not hmac.compare_digest(msg.proof, proof(self.secret, b"server", self.nonce, msg.nonce)):
            raise PeerError(self.peer, "the peer does not know the cluster secret")
        return PeerAuth(proof(self.secret, b"client", msg.nonce, self.nonce))

    def on_ok(self, msg: PeerMessage) -> str:
        _expect(msg, PeerOk, self.peer)
        assert isinstance(msg, PeerOk)
        return msg.node


class ServerHandshake:
    """The server side: each step returns the reply, or raises ``PeerError`` with the refusal
    to send in ``refusal``."""

    def __init__(self, node: str, secret: bytes | None, peer: str) -> None:
        self.node, self.secret, self.peer = node, secret, peer
        self.nonce = os.urandom(16)
        self.client_nonce = b""
        self.client = ""
        self.refusal: PeerFailure | None = None

    def _refuse(self, message: str, reason: str) -> PeerError:
        self.refusal = PeerFailure(message)
        return PeerError(self.peer, reason)

    def on_hello(self, msg: PeerMessage) -> PeerChallenge:
        if not isinstance(msg, PeerHello) or msg.version != PEER_PROTOCOL_VERSION:
            raise self._refuse(f"expected PeerHello version {PEER_PROTOCOL_VERSION}", "bad hello")
        self.client_nonce, self.client = msg.nonce, msg.node
        return PeerChallenge(self.nonce, proof(self.secret, b"server", msg.nonce, self.nonce))

    def on_auth(self, msg: PeerMessage) -> PeerOk:
        want = proof(self.secret, b"client", self.nonce, self.client_nonce)
        if not isinstance(msg, PeerAuth) or not hmac.compare_digest(msg.proof, want):
            raise self._refuse(
                "authentication failed", f"node {self.client!r} failed authentication"
            )
        return PeerOk(self.node)


def client_handshake(sock: socket.socket, node: str, secret: bytes | None, peer: str) -> str:
    """Prove the secret to the server and check its proof; returns the server's node id."""
    hs = ClientHandshake(node, secret, peer)
    send_peer(sock, hs.hello())
    send_peer(sock, hs.on_challenge(recv_peer(sock)))
    return hs.on_ok(recv_peer(sock))


def server_handshake(sock: socket.socket, node: str, secret: bytes | None, peer: str) -> str:
    """Check the client's proof; returns its node id. Raises ``PeerError`` on refusal."""
    hs = ServerHandshake(node, secret, peer)
    try:
        send_peer(sock, hs.on_hello(recv_peer(sock)))
        send_peer(sock, hs.on_auth(recv_peer(sock)))
    except PeerError:
        if hs.refusal is not None:
            send_peer(sock, hs.refusal)
        raise
    return hs.client
