"""Cluster mode: membership and the chunk directory in etcd, placement by rendezvous hashing."""

from __future__ import annotations

from ._directory import ChunkCrcs, Cluster, Holding, NodeInfo, PeerState
from ._placement import owner, rendezvous_score

__all__ = [
    "ChunkCrcs",
    "Cluster",
    "Holding",
    "NodeInfo",
    "PeerState",
    "owner",
    "rendezvous_score",
]
