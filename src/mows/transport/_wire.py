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
    "PEER_PROTOCOL_VERSION",
    "ChunkHeader",
    "ChunkRequest",
    "PeerAuth",
    "PeerChallenge",
    "PeerFailure",
    "PeerHello",
    "PeerOk",
    "client_handshake",
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
    body = frames.recv_exact(sock, n)
    try:
        msg: PeerMessage = _dec.decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed peer message: {e}") from None
    return msg


def proof(secret: bytes | None, role: bytes, first: bytes, second: bytes) -> bytes:
    if not secret:
        return b""
    return hmac.new(secret, role + b"|" + first + b"|" + second, hashlib.sha256).digest()


def _expect(msg: PeerMessage, cls: type[msgspec.Struct], peer: str) -> None:
    if isinstance(msg, PeerFailure):
        raise PeerError(peer, f"refused: {msg.message}")
    if not isinstance(msg, cls):
        raise PeerError(peer, f"expected {cls.__name__}, got {type(msg).__name__}")


def client_handshake(sock: socket.socket, node: str, secret: bytes | None, peer: str) -> str:
    """Prove the secret to the server and check its proof; returns the server's node id."""
    nonce = os.urandom(16)
    send_peer(sock, PeerHello(PEER_PROTOCOL_VERSION, node, nonce))
    challenge = recv_peer(sock)
    _expect(challenge, PeerChallenge, peer)
    assert isinstance(challenge, PeerChallenge)
    if not hmac.compare_digest(challenge.proof, proof(secret, b"server", nonce, challenge.nonce)):
        raise PeerError(peer, "the peer does not know the cluster secret")
    send_peer(sock, PeerAuth(proof(secret, b"client", challenge.nonce, nonce)))
    ok = recv_peer(sock)
    _expect(ok, PeerOk, peer)
    assert isinstance(ok, PeerOk)
    return ok.node


def server_handshake(sock: socket.socket, node: str, secret: bytes | None, peer: str) -> str:
    """Check the client's proof; returns its node id. Raises ``PeerError`` on refusal."""
    hello = recv_peer(sock)
    if not isinstance(hello, PeerHello) or hello.version != PEER_PROTOCOL_VERSION:
        send_peer(sock, PeerFailure(f"expected PeerHello version {PEER_PROTOCOL_VERSION}"))
        raise PeerError(peer, "bad hello")
    nonce = os.urandom(16)
    send_peer(sock, PeerChallenge(nonce, proof(secret, b"server", hello.nonce, nonce)))
    auth = recv_peer(sock)
    if not isinstance(auth, PeerAuth) or not hmac.compare_digest(
        auth.proof, proof(secret, b"client", nonce, hello.nonce)
    ):
        send_peer(sock, PeerFailure("authentication failed"))
        raise PeerError(peer, f"node {hello.node!r} failed authentication")
    send_peer(sock, PeerOk(node))
    return hello.node
