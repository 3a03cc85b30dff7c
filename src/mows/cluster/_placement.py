"""Capacity-weighted rendezvous hashing: who owns (fetches from origin) each chunk.

Every node computes the same owner from the same member list; nothing is stored. A node that
joins or leaves moves only the chunks whose highest score it gains or loses, in proportion to
its weight (Schindelhauer and Schomaker's weighted variant: score = -w / ln(h), h in (0, 1)).

Plain rendezvous balances only on average: 257 chunks over 8 equal nodes give the busiest
owner ~1.34x the mean. ``owner_table`` bounds the loads (consistent hashing with bounded
loads, Mirrokni et al.): the chunks, in index order, each go to the best-scoring candidate
whose count is still under ``ceil(SLACK x its weighted share)``. The candidates are every node
while there are at most K of them (the plain owner, unless it is full); past that, the K
distinct nodes that follow the chunk on a hash ring of VNODES points a node, so a table costs
O(chunks x K + nodes x VNODES) whatever the cluster's size. A chunk all of whose candidates
are full goes to the next node round the ring that is not.

Bounded loads cascade: with ~11 chunks a node, 5% of the members leaving moves about as many
chunks between members that stay as the leavers owned, and a member that read a chunk from
the origin and then loses it to another gains one it has not read (at 1,000 nodes the
busiest read 14 chunks where the mean read 11). So a table that only loses members is
``shrunk_table``: every chunk of a member that stays, stays; the leavers' chunks go to the
members with room under ``ceil(their weighted share)``, no slack. It is a function of the
base table (the last one computed whole, when members came) and the members now, so every
node that saw the same base computes the same table, whatever removals it saw in between.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import struct
from collections.abc import Iterable, Sequence

__all__ = [
    "Base",
    "is_subset",
    "owner",
    "owner_table",
    "rendezvous_score",
    "shrunk_table",
    "table_cost",
    "table_for",
]

SLACK = 1.05  # a node owns at most ceil(SLACK x its share) chunks of a version
K = 8  # candidates scored per chunk
VNODES = 64  # ring points a node, when there are more than K nodes

Members = tuple[tuple[str, float], ...]  # (node, weight > 0), sorted
Base = tuple[list[str], Members]  # a table computed whole, and its members


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


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _ring(names: list[str]) -> tuple[list[int], list[int]]:
    """VNODES points a node (one SHAKE-128 stream each), sorted: (points, node index)."""
    ring = sorted(
        (p, n, j)
        for j, n in enumerate(names)
        for p in struct.unpack(f">{VNODES}Q", hashlib.shake_128(n.encode()).digest(8 * VNODES))
    )
    return [p for p, _, _ in ring], [j for _, _, j in ring]


def table_cost(chunks: int, nodes: int) -> int:
    """About how many hashes ``owner_table`` computes (~1 us each)."""
    return chunks * min(nodes, K) + (nodes * VNODES // 16 if nodes > K else 0)


def owner_table(version: str, chunks: int, members: Sequence[tuple[str, float]]) -> list[str]:
    """The owner of each chunk ``f"{version}/{i}"``, loads bounded (see the module's doc);
    empty if no member has a positive weight. The same for any order of ``members``."""
    live = sorted((n, w) for n, w in members if w > 0)
    if not live or chunks <= 0:
        return []
    total = math.fsum(w for _, w in live)
    caps = [math.ceil(SLACK * chunks * w / total) for _, w in live]  # each >= 1; sum > chunks
    return _assign(version, range(chunks), live, caps, [0] * len(live), [""] * chunks)


def table_for(
    version: str,
    chunks: int,
    members: Sequence[tuple[str, float]],
    since: Sequence[tuple[str, float]],
    base: Base | None,
) -> tuple[list[str], Base]:
    """The owner table for ``members``, some of ``since`` (the members when the last one
    came: none came since, some left): ``owner_table(since)``, shrunk to ``members``. Also
    that base table, to give the next call (``base``, if it is ``since``'s, is used)."""
    live: Members = tuple(sorted((n, w) for n, w in members if w > 0))
    first: Members = tuple(sorted((n, w) for n, w in since if w > 0))
    if base is None or base[1] != first:
        base = (owner_table(version, chunks, first), first)
    return (base[0] if live == first else shrunk_table(version, base[0], live)), base


def is_subset(members: Sequence[tuple[str, float]], since: Sequence[tuple[str, float]]) -> bool:
    """Are ``members`` some of ``since``, with the same weights (only removals between)?"""
    weights = dict(since)
    return all(weights.get(n) == w for n, w in members)


def shrunk_table(
    version: str, base: Sequence[str], members: Sequence[tuple[str, float]]
) -> list[str]:
    """``base`` (an ``owner_table`` of a superset of ``members``) with the chunks of the
    nodes not in ``members`` given to those that are, each up to ``ceil(its weighted
    share)`` counting the chunks it keeps; the others stay (see the module's doc). The same
    for any order of ``members``."""
    live = sorted((n, w) for n, w in members if w > 0)
    if not live or not base:
        return []
    index = {n: j for j, (n, _) in enumerate(live)}
    counts = [0] * len(live)
    table = list(base)
    orphans = []
    for i, o in enumerate(base):
        j = index.get(o)
        if j is None:
            orphans.append(i)
        else:
            counts[j] += 1
    if not orphans:
        return table
    total = math.fsum(w for _, w in live)
    caps = [math.ceil(len(base) * w / total) for _, w in live]  # room sums to the orphans
    return _assign(version, orphans, live, caps, counts, table)


def _assign(
    version: str,
    chunks: Iterable[int],
    live: list[tuple[str, float]],
    caps: list[int],
    counts: list[int],
    table: list[str],
) -> list[str]:
    """Give each of ``chunks``, in order, to its best-scoring candidate under its cap (see
    the module's doc); ``counts`` (updated) are the members' chunks so far, in ``table``."""
    names = [n for n, _ in live]
    weights = [w for _, w in live]
    # rendezvous_score's hash, its node prefix hashed once: only the key is added per chunk.
    bases = [hashlib.blake2b(f"{n}\x00".encode(), digest_size=8) for n in names]
    everyone = list(range(len(live)))
    points: list[int] = []
    at: list[int] = []
    if len(live) > K:
        points, at = _ring(names)
    size, log, from_bytes = len(points), math.log, int.from_bytes
    for i in chunks:
        key = f"{version}/{i}"
        raw = key.encode()
        if size:
            start = bisect.bisect_left(points, _point(key))
            window: list[int] = []
            step = 0
            while len(window) < K:
                j = at[(start + step) % size]
                step += 1
                if j not in window:
                    window.append(j)
        else:
            window = everyone
        # The best score among the candidates not full (ties: the smaller node id).
        pick, best = -1, -1.0
        for j in window:
            if counts[j] >= caps[j]:
                continue
            h = bases[j].copy()
            h.update(raw)
            score = -weights[j] / log((from_bytes(h.digest(), "big") + 0.5) / 2**64)
            if score > best or (score == best and names[j] < names[pick]):
                pick, best = j, score
        while pick < 0 and size and step < size + K * VNODES:  # all full: on round the ring
            j = at[(start + step) % size]
            step += 1
            if counts[j] < caps[j]:
                pick = j
        if pick < 0:  # cannot happen (the caps sum past the chunks); kept total all the same
            pick = min(range(len(live)), key=lambda j: (counts[j] - caps[j], names[j]))
        counts[pick] += 1
        table[i] = names[pick]
    return table
