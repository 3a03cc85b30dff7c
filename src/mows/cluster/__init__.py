"""Cluster mode: membership and the chunk directory in etcd, placement by rendezvous hashing."""

from __future__ import annotations

from ._directory import Cluster, Holding, NodeInfo
from ._placement import owner, rendezvous_score

__all__ = ["Cluster", "Holding", "NodeInfo", "owner", "rendezvous_score"]
