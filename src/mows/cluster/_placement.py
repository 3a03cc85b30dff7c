"""Capacity-weighted rendezvous hashing: who owns (fetches from origin) each chunk.

Every node computes the same owner from the same member list; nothing is stored. A node that
joins or leaves moves only the chunks whose highest score it gains or loses, in proportion to
its weight (Schindelhauer and Schomaker's weighted variant: score = -w / ln(h), h in (0, 1)).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

__all__ = ["owner", "rendezvous_score"]


def rendezvous_score(node: str, key: str, weight: float) -> float:
    digest = hashlib.blake2b(f"{node}\x00{key}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest, "big") + 0.5) / 2**64  # uniform in (0, 1)
    return -weight / math.log(h)


def owner(key: str, nodes: Sequence[tuple[str, float]]) -> str | None:
    """The node with the highest weighted score for ``key``; None if there are no nodes."""
    best, best_score = None, -1.0
    for node, weight in nodes:
        if weight <= 0:
            continue
        score = rendezvous_score(node, key, weight)
        if score > best_score or (score == best_score and best is not None and node < best):
            best, best_score = node, score
    return best
