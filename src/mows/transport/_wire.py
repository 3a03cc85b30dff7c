"""Peer messages, the HMAC handshake and the authenticated channel (untrusted bytes from
the network).

Frames are those of the local API (4-byte length + msgpack, size-bounded). A connection
starts with a mutual challenge: each side proves it knows the cluster secret by an HMAC over
both nonces and both node ids; the secret never crosses the wire. Both then derive a session
key bound to the same four values, and every later frame carries a tag over its direction,
sequence number and body: a relay that passed the handshake along can neither edit, reorder,
replay nor inject a frame. Chunk bytes follow a ``ChunkHeader`` unframed (sendfile); the
header carries the chunk's BLAKE3 digest, so the tag on the header covers the bytes too.
With no secret configured the proofs and tags are empty and the server listens on loopback
only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
from dataclasses import dataclass
from typing import Any

import msgspec

from .. import _protocol as frames
from .._digest import crc_and_digest
from .._errors import PeerError, ProtocolError

__all__ = [
    "MAX_PEER_FRAME",
    "PEER_PROTOCOL_VERSION",
    "Channel",
    "ChunkHeader",
    "ChunkRequest",
    "ClientHandshake",
    "Have",
    "HaveRequest",
    "Landed",
    "PeerAuth",
    "PeerChallenge",
    "PeerFailure",
    "PeerHello",
    "PeerOk",
    "Received",
    "ServerHandshake",
    "WatchRequest",
    "check_received",
    "client_handshake",
    "decode_peer",
    "proof",
    "recv_peer",
    "send_peer",
    "server_handshake",
    "verify_chunk",
]

PEER_PROTOCOL_VERSION = 4  # 3: requests may wait for a chunk; Have. 4: Watch, no waits
MAX_PEER_FRAME = 1 << 20  # control messages only; chunk bytes follow a header, unframed
TAG_BYTES = 16  # truncated HMAC-SHA256: 128 bits, checked on every frame


class PeerHello(msgspec.Struct, tag=True, frozen=True):
    version: int
    node: str
    nonce: bytes
    encrypt: bool = False  # chunk bytes encrypted on this connection (bound into the proofs)


class PeerChallenge(msgspec.Struct, tag=True, frozen=True):
    node: str
    nonce: bytes
    proof: bytes  # the server's proof: HMAC(secret, "server", both nonces, both node ids)


class PeerAuth(msgspec.Struct, tag=True, frozen=True):
    proof: bytes  # the client's: HMAC(secret, "client", both nonces, both node ids)


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
    digest: bytes  # BLAKE3 of the bytes that follow: the frame's tag then covers them too


class PeerFailure(msgspec.Struct, tag=True, frozen=True):
    message: str


class HaveRequest(msgspec.Struct, tag=True, frozen=True):
    """Which chunks of a file do you hold (checked, servable) now?"""

    model: str
    path: str


class Have(msgspec.Struct, tag=True, frozen=True):
    held: bytes  # bit i (of byte i // 8, LSB first) set: chunk i is held; trailing zeros cut


class WatchRequest(msgspec.Struct, tag=True, frozen=True):
    """Which chunks of this version did you read from the origin since ``since`` (in your log
    of epoch ``epoch``)? Held up to ``wait`` seconds until there is one: a node waiting for
    chunks an owner is still fetching keeps one such request per owner, instead of a
    request (and a transfer thread) per chunk."""

    model: str
    epoch: int = 0
    since: int = 0
    wait: float = 0.0


class Landed(msgspec.Struct, tag=True, frozen=True):
    """The answer to a ``WatchRequest``: first copies landed since, by path."""

    epoch: int  # the server's log; a watcher whose epoch differs asks again from 0
    next: int  # where the next request starts
    chunks: dict[str, list[int]]


PeerMessage = (
    PeerHello
    | PeerChallenge
    | PeerAuth
    | PeerOk
    | ChunkRequest
    | ChunkHeader
    | PeerFailure
    | HaveRequest
    | Have
    | WatchRequest
    | Landed
)
_dec = msgspec.msgpack.Decoder(PeerMessage)


_enc = msgspec.msgpack.Encoder()


class Channel:
    """One connection's frames after the handshake, tagged under the session key.

    Each direction numbers its frames; the tag covers (direction, number, body), so a frame
    cut, replayed, reordered or sent the other way fails like an edited one.
    """

    def __init__(
        self, key: bytes | None, peer: str, *, client: bool, encrypt: bool = False
    ) -> None:
        self.key, self.peer = key, peer
        self._out, self._in = (b"c", b"s") if client else (b"s", b"c")
        self._sent = self._received = 0
        self._cipher_key = None
        if encrypt:
            assert key is not None, "encryption needs a session key"
            self._cipher_key = hmac.new(key, b"mows-chunk-cipher", hashlib.sha256).digest()

    @property
    def encrypted(self) -> bool:
        return self._cipher_key is not None

    def chunk_cipher(self, *, sending: bool) -> Any:
        """AES-256-CTR for the chunk bytes that follow the last header frame sent (or
        received): the IV is that frame's direction and number, unique under this key.
        Encrypting and decrypting are the same XOR, done in place on the buffer."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        assert self._cipher_key is not None
        direction, number = (self._out, self._sent) if sending else (self._in, self._received)
        iv = direction + (number - 1).to_bytes(8, "big") + bytes(7)
        return Cipher(algorithms.AES(self._cipher_key), modes.CTR(iv)).encryptor()

    def seal(self, msg: msgspec.Struct) -> bytes:
        """The frame body for ``msg`` (without the length prefix)."""
        body = _enc.encode(msg)
        if self.key:
            body += self._tag(self._out, self._sent, body)
        self._sent += 1
        return body

    def open(self, frame: bytes) -> PeerMessage:
        """The message in a received frame body; ``PeerError(corrupt=True)`` if its tag fails."""
        body = frame
        if self.key:
            body, tag = frame[:-TAG_BYTES], frame[-TAG_BYTES:]
            if len(frame) < TAG_BYTES or not hmac.compare_digest(
                tag, self._tag(self._in, self._received, body)
            ):
                raise PeerError(
                    self.peer, f"frame {self._received} failed authentication", corrupt=True
                )
        self._received += 1
        return decode_peer(body)

    def _tag(self, direction: bytes, number: int, body: bytes) -> bytes:
        assert self.key is not None
        msg = direction + number.to_bytes(8, "big") + body
        return hmac.new(self.key, msg, hashlib.sha256).digest()[:TAG_BYTES]


def send_peer(sock: socket.socket, msg: msgspec.Struct, channel: Channel | None = None) -> None:
    """Send one frame: plain during the handshake, tagged on a channel after it."""
    _send_body(sock, _enc.encode(msg) if channel is None else channel.seal(msg))


def recv_peer(sock: socket.socket, channel: Channel | None = None) -> PeerMessage:
    """One validated message; ``ProtocolError`` for anything malformed or oversized."""
    body = _recv_body(sock)
    return decode_peer(body) if channel is None else channel.open(body)


def _send_body(sock: socket.socket, body: bytes) -> None:
    if len(body) > MAX_PEER_FRAME:
        raise ProtocolError(f"peer frame of {len(body)} bytes exceeds the limit")
    sock.sendall(len(body).to_bytes(4, "big") + body)


def _recv_body(sock: socket.socket) -> bytes:
    n = int.from_bytes(frames.recv_exact(sock, 4), "big")
    if n > MAX_PEER_FRAME:
        raise ProtocolError(f"peer frame of {n} bytes exceeds the {MAX_PEER_FRAME} byte limit")
    return frames.recv_exact(sock, n)


# What a handshake binds: client nonce, server nonce, client node, server node, encryption.
Binding = tuple[bytes, bytes, str, str, bool]


def _mac(secret: bytes, label: bytes, binding: Binding) -> bytes:
    # A msgpack array is an unambiguous encoding: no field can spill into the next.
    return hmac.new(secret, _enc.encode([label, *binding]), hashlib.sha256).digest()


def proof(secret: bytes | None, role: bytes, binding: Binding) -> bytes:
    """HMAC(secret, role, everything the handshake binds); empty without a secret."""
    return _mac(secret, role, binding) if secret else b""


def session_key(secret: bytes | None, binding: Binding) -> bytes | None:
    """The key every frame of this connection is tagged with; None without a secret."""
    return _mac(secret, b"mows-session-2", binding) if secret else None


@dataclass(frozen=True)
class Received:
    """What a peer fetch proved about the chunk now in the caller's buffer."""

    crc: int
    digest: bytes  # BLAKE3, as the sender announced and as we computed it


def verify_chunk(
    peer: str,
    path: str,
    index: int,
    data: memoryview,
    expected_crc: int | None,
    header: ChunkHeader,
) -> Received:
    """Check received bytes against the (authenticated) header and the directory's CRC;
    ``PeerError(corrupt=True)`` on any mismatch. The digest is what stops a CRC-preserving
    edit (CRC-32 is linear); the CRC is what ties the chunk to the origin's crc32.txt."""
    actual, digest = crc_and_digest(data)
    return check_received(peer, path, index, actual, digest, expected_crc, header)


def check_received(
    peer: str,
    path: str,
    index: int,
    actual: int,
    digest: bytes,
    expected_crc: int | None,
    header: ChunkHeader,
) -> Received:
    """``verify_chunk`` for a chunk whose CRC and digest were computed as it arrived."""
    if not hmac.compare_digest(digest, header.digest):
        raise PeerError(
            peer, f"{path} chunk {index}: bytes do not match their BLAKE3 digest", corrupt=True
        )
    for want in (expected_crc, header.crc):
        if want is not None and actual != want:
            raise PeerError(
                peer, f"{path} chunk {index}: CRC {actual:08x}, expected {want:08x}", corrupt=True
            )
    return Received(actual, digest)


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
    """The client side of the mutual HMAC challenge, free of I/O (each transport drives it).
    ``expect``: the node id the directory gave for this address; ``encrypt``: ask for
    encrypted chunk bytes (needs a secret)."""

    def __init__(
        self,
        node: str,
        secret: bytes | None,
        peer: str,
        expect: str | None = None,
        encrypt: bool = False,
    ) -> None:
        self.node, self.secret, self.peer, self.expect = node, secret, peer, expect
        self.encrypt = encrypt and bool(secret)
        self.nonce = os.urandom(16)
        self.server = ""
        self.channel: Channel | None = None

    def hello(self) -> PeerHello:
        return PeerHello(PEER_PROTOCOL_VERSION, self.node, self.nonce, self.encrypt)

    def on_challenge(self, msg: PeerMessage) -> PeerAuth:
        _expect(msg, PeerChallenge, self.peer)
        assert isinstance(msg, PeerChallenge)
        if self.expect is not None and msg.node != self.expect:
            raise PeerError(self.peer, f"answered as node {msg.node!r}, expected {self.expect!r}")
        binding = (self.nonce, msg.nonce, self.node, msg.node, self.encrypt)
        if not hmac.compare_digest(msg.proof, proof(self.secret, b"server", binding)):
            raise PeerError(self.peer, "the peer does not know the cluster secret")
        self.server = msg.node
        key = session_key(self.secret, binding)
        self.channel = Channel(key, self.peer, client=True, encrypt=self.encrypt)
        return PeerAuth(proof(self.secret, b"client", binding))

    def on_ok(self, frame: bytes) -> Channel:
        """The server's first tagged frame: it derived the same key. Returns the channel."""
        assert self.channel is not None
        _expect(self.channel.open(frame), PeerOk, self.peer)
        return self.channel


class ServerHandshake:
    """The server side: each step returns the reply, or raises ``PeerError`` with the refusal
    to send in ``refusal``. ``require_encryption``: refuse clients that do not encrypt."""

    def __init__(
        self, node: str, secret: bytes | None, peer: str, require_encryption: bool = False
    ) -> None:
        self.node, self.secret, self.peer = node, secret, peer
        self.require_encryption = require_encryption
        self.nonce = os.urandom(16)
        self.binding: Binding = (b"", self.nonce, "", node, False)
        self.client = ""
        self.refusal: PeerFailure | None = None

    def _refuse(self, message: str, reason: str) -> PeerError:
        self.refusal = PeerFailure(message)
        return PeerError(self.peer, reason)

    def on_hello(self, msg: PeerMessage) -> PeerChallenge:
        if not isinstance(msg, PeerHello) or msg.version != PEER_PROTOCOL_VERSION:
            raise self._refuse(f"expected PeerHello version {PEER_PROTOCOL_VERSION}", "bad hello")
        if msg.encrypt and not self.secret:
            raise self._refuse("encryption needs a cluster secret", "encryption without secret")
        if self.require_encryption and not msg.encrypt:
            raise self._refuse(
                "this node requires encrypted peer traffic (peer_encryption)",
                f"node {msg.node!r} did not ask for encryption",
            )
        self.client = msg.node
        self.binding = (msg.nonce, self.nonce, msg.node, self.node, msg.encrypt)
        return PeerChallenge(self.node, self.nonce, proof(self.secret, b"server", self.binding))

    def on_auth(self, msg: PeerMessage) -> tuple[Channel, bytes]:
        """Check the client's proof; returns the channel and the tagged ``PeerOk`` frame body."""
        want = proof(self.secret, b"client", self.binding)
        if not isinstance(msg, PeerAuth) or not hmac.compare_digest(msg.proof, want):
            raise self._refuse(
                "authentication failed", f"node {self.client!r} failed authentication"
            )
        key = session_key(self.secret, self.binding)
        channel = Channel(key, self.peer, client=False, encrypt=self.binding[4])
        return channel, channel.seal(PeerOk(self.node))


def client_handshake(
    sock: socket.socket,
    node: str,
    secret: bytes | None,
    peer: str,
    expect: str | None = None,
    encrypt: bool = False,
) -> tuple[str, Channel]:
    """Prove the secret to the server and check its proof (and, given ``expect``, its node
    id); returns the server's node id and the connection's channel."""
    hs = ClientHandshake(node, secret, peer, expect, encrypt)
    send_peer(sock, hs.hello())
    send_peer(sock, hs.on_challenge(recv_peer(sock)))
    return hs.server, hs.on_ok(_recv_body(sock))


def server_handshake(
    sock: socket.socket,
    node: str,
    secret: bytes | None,
    peer: str,
    require_encryption: bool = False,
) -> tuple[str, Channel]:
    """Check the client's proof; returns its node id and the channel. Raises ``PeerError``
    on refusal."""
    hs = ServerHandshake(node, secret, peer, require_encryption)
    try:
        send_peer(sock, hs.on_hello(recv_peer(sock)))
        channel, ok = hs.on_auth(recv_peer(sock))
    except PeerError:
        if hs.refusal is not None:
            send_peer(sock, hs.refusal)
        raise
    _send_body(sock, ok)
    return hs.client, channel
