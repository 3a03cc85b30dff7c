"""The peer transport contract: a server that serves held chunks, a client that fetches them.

One contract test suite runs against every implementation (``--nic tcp``; UCX would join it).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ._wire import Have, HaveRequest, Landed, Received, WatchRequest

__all__ = ["ChunkStore", "PeerClient", "PeerServer", "Received", "ServedChunk", "Sink"]

Sink = Callable[[int, memoryview], None]  # (offset in the chunk, block): write it there


@dataclass(frozen=True)
class ServedChunk:
    fd: int  # a descriptor the server owns: ``close`` the chunk once the send ends
    offset: int
    length: int
    crc: int
    digest: bytes  # BLAKE3 of the chunk, announced in the (tagged) header
    # The store's: called once the send ended and ``fd`` is closed (it counts sends in
    # flight: a pool file is not evicted while its pages are being sent from).
    on_close: Callable[[], None] | None = None
    _closed: bool = field(default=False, compare=False, repr=False)

    def close(self) -> None:
        """The send ended (done or failed): closes ``fd``, then tells the store. Once: a
        second call does nothing (the store counts sends in flight)."""
        if self._closed:
            return
        object.__setattr__(self, "_closed", True)
        try:
            os.close(self.fd)
        finally:
            if self.on_close is not None:
                self.on_close()


class ChunkStore(Protocol):
    """What a peer server reads from: the local pool's held chunks (thread-safe)."""

    def open_chunk(self, model: str, path: str, index: int) -> ServedChunk | None:
        """A held, verified chunk with a fresh fd and its digest; None if this node does not
        hold it (or no longer can vouch for it)."""
        ...

    def watch(self, model: str, epoch: int, since: int, wait: float) -> Landed:
        """The chunks of ``model`` read from the origin here past ``since`` (see
        ``WatchRequest``), waiting up to ``wait`` seconds for one (blocks the caller)."""
        ...

    def have(self, model: str, path: str) -> bytes:
        """A bitmap of the file's chunks ``open_chunk`` would serve now (see ``Have``)."""
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
        node: str | None = None,
        sink: Sink | None = None,
    ) -> Received:
        """Fetch one chunk into ``dest`` (exactly its length); return its CRC-32 and digest.
        ``sink(at, block)``: writes ``block`` at offset ``at`` of ``dest``'s storage; a
        transport that receives in blocks may use it instead of writing ``dest`` itself.

        ``node``: the node id the directory gave for ``address``; a server proving another
        id is refused. Raises ``PeerError`` when the peer fails, stalls, refuses, lacks the chunk
        (``missing=True``), or sends bytes that do not match the digest it announced or whose
        CRC differs from ``expected_crc`` (``corrupt=True``); ``dest`` then holds garbage.
        """

    def have(self, address: str, model: str, path: str, node: str | None = None) -> bytes:
        """The peer's bitmap of the file's chunks it holds now (see ``Have``); PeerError if
        it cannot be asked."""
        reply = self._exchange(address, HaveRequest(model, path), node)
        assert isinstance(reply, Have)
        return reply.held

    def watch(
        self, address: str, model: str, epoch: int, since: int, wait: float, node: str | None = None
    ) -> Landed:
        """The chunks of ``model`` the peer read from the origin past ``since`` in its log of
        ``epoch``, as soon as there are any or after ``wait`` seconds (a long poll, on
        connections of its own); PeerError if it cannot be asked."""
        reply = self._exchange(address, WatchRequest(model, epoch, since, wait), node)
        assert isinstance(reply, Landed)
        return reply

    @abstractmethod
    def _exchange(
        self, address: str, request: HaveRequest | WatchRequest, node: str | None
    ) -> Have | Landed:
        """Send ``request`` and return its reply (``Have`` to a ``HaveRequest``, ``Landed``
        to a ``WatchRequest``: anything else is a PeerError). Watches, held up to their
        ``wait``, go on connections of their own."""

    @abstractmethod
    def close(self) -> None:
        """Close every pooled connection."""
