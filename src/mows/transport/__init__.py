"""Moving chunks between nodes: a small contract and its implementations (``--nic``)."""

from __future__ import annotations

from ._base import ChunkStore, PeerClient, PeerServer, Received, ServedChunk
from ._tcp import TcpPeerClient, TcpPeerServer, split_address

__all__ = [
    "ChunkStore",
    "PeerClient",
    "PeerServer",
    "Received",
    "ServedChunk",
    "TcpPeerClient",
    "TcpPeerServer",
    "split_address",
]
