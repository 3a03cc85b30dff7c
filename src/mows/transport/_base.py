"""The peer transport contract: a server that serves held chunks, a client that fetches them.

One contract test suite runs against every implementation (``--nic tcp``; UCX would join it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from .._crc import crc32
from .._errors import PeerError

__all__ = ["ChunkStore", "PeerClient", "PeerServer", "ServedChunk", "check_chunk"]


@dataclass(frozen=True)
class ServedChunk:
    fd: int  # a descriptor the server owns and closes after sending
    offset: int
    length: int
    crc: int


class ChunkStore(Protocol):
    """What a peer server reads from: the local pool's held chunks (thread-safe)."""

    def open_chunk(self, model: str, path: str, index: int) -> ServedChunk | None:
        """A held, verified chunk with a fresh fd; None if this node does not hold it."""
        ...

    def served(self, peer: str, nbytes: int) -> None:
        """Account bytes sent to ``peer``."""
        ...


class PeerServer(ABC):
    node: str  # the name this server proves in handshakes (set once the address is known)

    @property
    @abstractmethod
    def address(self) -> str:
        """``host:port`` it listens on."""

    @abstractmethod
    def close(self) -> None:
        """Stop accepting and drop every connection."""


class PeerClient(ABC):
    @abstractmethod
    def fetch(
        self,
        address: str,
        model: str,
        path: str,
        index: int,
        dest: memoryview,
        expected_crc: int | None,
    ) -> int:
        """Fetch one chunk into ``dest`` (exactly its length) and return its CRC-32.

        Raises ``PeerError`` when the peer fails, stalls, refuses, lacks the chunk, or sends
        bytes whose CRC differs from ``expected_crc`` (or from the one it announced);
        ``dest`` then holds garbage and must not be used.
        """

    @abstractmethod
    def close(self) -> None:
        """Close every pooled connection."""


def check_chunk(
    peer: str, path: str, index: int, data: memoryview, expected: int | None, announced: int
) -> int:
    """CRC-32 of a received chunk; ``PeerError(corrupt=True)`` unless it is the CRC the
    directory published (``expected``) and the one the sender announced."""
    actual = crc32(data)
    for want in (expected, announced):
        if want is not None and actual != want:
            raise PeerError(
                peer, f"{path} chunk {index}: CRC {actual:08x}, expected {want:08x}", corrupt=True
            )
    return actual
