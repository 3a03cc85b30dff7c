"""The one chunk fetcher that loads and prefetch share: a peer holding the chunk, else the
origin, with a circuit breaker per peer.

Which peer holds a chunk is not in etcd (it records files, see mows.cluster): a node holding
the file whole is asked first; else the chunk's owner, which on a cold cluster is fetching it
from the origin: the chunk waits for the owner to report it (below), then is fetched from it;
for a chunk this node came to own when a member came or went, its previous owner (it may have
read it already); else a node holding part of the file whose ``Have`` lists it; else the
origin. A read queued for the origin looks at the owners again when its turn comes: if the
chunk moved meanwhile to a node that fills its file, it waits for that node instead. Members
join a load over seconds, not at once; without these two, each chunk that moved left the
origin twice.

Waiting for owners holds no transfer thread: this node keeps one long poll (``watch``) per
(version, owner) it waits on, answered with every chunk the owner read from the origin, as
each lands, and with those it came to own holding them already (a dead owner's chunks it got
from that owner: without this its peers would wait on it until it held their whole file); a
chunk that starts waiting on an owner whose watch reported it already is fetched at once. So
the transfer threads only carry chunks their holder has: with thousands of chunks waiting at
hundreds of owners, a chunk that landed is never queued behind requests waiting for chunks
that have not.

A chunk goes straight into its pool file's mapping from a worker thread. Peer transfers have
workers of their own: queued behind origin reads they would wait for the origin, and a cold
cluster would lose its pipelining. A peer that fails, stalls or sends bad bytes opens its
breaker: it is skipped by every fetch for a while (longer each time it fails again) instead of
each chunk remembering whom it tried. An owner whose connection failed while its record still
stands is waited for a grace period (it died: its lease ends and a new owner takes its
chunks), not replaced by the origin at once: on a cold 700 GB load, every node reading a dead
owner's chunks from the origin would be a stampede.

Origin reads are paced by the cluster's size: each node reads at most ``origin_streams``
chunks from the origin at once, about CLUSTER_ORIGIN_STREAMS over all the version's members.
With every member's ``workers`` reading at once, a cold load of 1,000 nodes kept ~4,000 reads
sharing the origin link: they all ended together, so first copies landed in waves, the peer
links idled between them and nothing overlapped the last one. A read or two per node lands
first copies four times as often, and the peers pass each on while the next is read.

While etcd is out (the cluster ``degraded``), peers are still tried, and owners waited for,
from the last view (a watch needs no etcd), and origin reads of all loads on this node are
capped at half the workers: chunks whose peers fail must not stampede the origin.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._config import DaemonConfig
from .._errors import PeerError
from ..manifest import Chunk
from ..pool import Version
from ..sources import Source
from ..transport import Received
from ._fill import FileFill, fetch_chunk
from ._metrics import Metrics
from ._peering import Peering

__all__ = ["ChunkFetcher", "Counters", "FillTarget", "origin_streams"]

log = logging.getLogger("mows.daemon")

T = TypeVar("T")

BREAKER_BASE = 1.0  # seconds a failed peer is skipped, doubled per failure in a row
BREAKER_MAX = 30.0
QUARANTINE = 300.0  # seconds a peer that sent bytes failing their checks is skipped
WAIT_MAX = 10.0  # seconds a watch is held at an owner, and a waiting chunk looks again
OWNER_GRACE = 10.0  # seconds, at least 2 x lease_ttl: a failed owner is waited for
OWNER_RETRIES = 3  # times a chunk waits again for an owner that failed it
REDECIDE = 3  # times a chunk queued for the origin goes back to a new owner
WATCH_THREADS = 1024  # long polls at once (one per owner waited on: every node, at scale)
HAVE_TTL = 2.0  # seconds a peer's Have answer is reused
HAVE_ASKS = 64  # partial holders asked for their Have per chunk, at most
HAVE_CACHE = 4096  # Have answers kept
CLUSTER_ORIGIN_STREAMS = 64  # origin reads at once over a version's members: enough streams
# to fill an object store's link (a stream gets ~100-300 MB/s), few enough to land in order


def origin_streams(workers: int, members: int) -> int:
    """Origin reads at once on one node of a version with ``members`` members."""
    return max(1, min(workers, -(-CLUSTER_ORIGIN_STREAMS // max(1, members))))


@dataclass
class Counters:
    """The node's counters, shown by status and metrics."""

    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    bytes_from_pool: int = 0
    hits: int = 0
    misses: int = 0
    integrity_failures: int = 0
    loads_failed: int = 0
    peer_failures: int = 0
    corrupt_from_peers: int = 0
    stale_opens: int = 0  # warm opens served while the origin could not be reached
    origin_reads_redecided: int = 0  # queued for the origin, then waited for a new owner


@dataclass
class FillTarget:
    """One pool file being filled: where chunks go, and the reads still writing into it
    (a failed fill waits for them before unmapping)."""

    source: Source
    version: Version
    fill: FileFill
    running: set[concurrent.futures.Future[Any]] = field(default_factory=set)
    from_origin: int = 0  # bytes this fill got from the origin
    from_peers: int = 0
    origin_only: bool = False  # peers' bytes failed this file's digest before: origin only

    async def drain(self) -> None:
        running = [f for f in self.running if not f.done()]
        if running:
            await asyncio.get_running_loop().run_in_executor(None, concurrent.futures.wait, running)


@dataclass
class _Wait:
    """A chunk waiting for ``node`` (its owner) to report it: ``woken`` when it does, or
    when the watch ends."""

    node: str
    woken: asyncio.Future[None]


@dataclass
class _Breaker:
    failures: int = 0
    open_until: float = 0.0


class ChunkFetcher:
    def __init__(
        self,
        config: DaemonConfig,
        counters: Counters,
        metrics: Metrics,
        peering: Peering | None,
    ) -> None:
        self.config = config
        self.counters = counters
        self.metrics = metrics
        self.peering = peering
        self._origin = ThreadPoolExecutor(config.workers, thread_name_prefix="mows-fetch")
        self._peers = _RandomOrderExecutor(
            4 * config.peer_connections, thread_name_prefix="mows-peer"
        )
        self._inflight: dict[str, int] = {}  # peer node -> chunk requests in flight
        self._breakers: dict[str, _Breaker] = {}
        self._haves: dict[tuple[str, str, str], tuple[float, bytes]] = {}  # (node, vid, path)
        # Origin reads: a gate per version (``origin_streams`` of its members) inside one
        # for the node (its workers; half of them while the cluster is degraded).
        self._origin_gates: dict[str, _Gate] = {}
        self._node_gate = _Gate(self._node_origin_limit)
        self._grace = max(OWNER_GRACE, 2 * config.lease_ttl)
        # Waiting for owners: (vid, path, index) -> its wait; (vid, node) -> the chunks
        # waiting on it and the watch that reports them; chunk -> who reported it.
        self._waits: dict[tuple[str, str, int], _Wait] = {}
        self._watched: dict[tuple[str, str], set[tuple[str, str, int]]] = {}
        self._watches: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._reported: dict[tuple[str, str, int], str] = {}
        # (vid, node) -> the chunks its running watch reported: a chunk that waits on the
        # node only later (its owner changed) is not reported again by the same watch.
        self._seen: dict[tuple[str, str], set[tuple[str, int]]] = {}
        self._watch_threads = ThreadPoolExecutor(WATCH_THREADS, thread_name_prefix="mows-watch")

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Workers for blocking origin work (manifests, re-verification)."""
        return self._origin

    def close(self) -> None:
        for task in self._watches.values():
            task.cancel()
        self._origin.shutdown(wait=True, cancel_futures=True)
        self._peers.shutdown(wait=True, cancel_futures=True)
        self._watch_threads.shutdown(wait=False, cancel_futures=True)  # held at most WAIT_MAX

    def breakers(self) -> dict[str, float]:
        """Peers skipped now -> seconds until they are tried again."""
        now = time.monotonic()
        return {n: b.open_until - now for n, b in self._breakers.items() if b.open_until > now}

    async def obtain(self, target: FillTarget, chunk: Chunk, *, wait_for_owner: bool) -> int:
        """One chunk into the target's mapping; returns its CRC-32 (checked against the
        holder's for peer bytes). ``wait_for_owner``: on a cold cluster, wait for the node
        that owns the chunk to fetch it rather than reading the origin ourselves."""
        peering = self.peering is not None
        crc: int
        digest: bytes | None
        for turn in itertools.count():
            got = None
            if not target.origin_only:
                got = await self._from_peers(target, chunk, wait_for_owner)
            if got is not None:
                crc, digest = got.crc, got.digest
                break
            again = wait_for_owner and turn < REDECIDE and peering
            decided = await self._owner(target, chunk) if again else None
            async with self._origin_slot(target.version.id):
                # The owners changed while this read waited its turn (a member came or
                # went): if the chunk's new owner fills it, wait for it instead, or the
                # chunk leaves the origin twice.
                if again and await self._moved_to(target, chunk, decided):
                    continue
                started = time.perf_counter()
                crc, digest = await self._in_worker(
                    target, self._origin, fetch_chunk, target.source, target.fill, chunk, peering
                )
            self.metrics.fetch_seconds.labels("origin").observe(time.perf_counter() - started)
            self.counters.bytes_from_origin += chunk.length
            target.from_origin += chunk.length
            break
        if self.peering is not None:
            # Reported to the peers that wait on us if read here, or ours to report (we own it,
            # and got it from a whole-file holder or a reporter first): they wait on its owner.
            v, cluster = target.version, self.peering.cluster
            first = got is None
            if not first:
                first = await self._owner(target, chunk) == cluster.node_id
            self.peering.held(v, chunk, crc, digest, first_copy=first)
        return crc

    async def _owner(self, target: FillTarget, chunk: Chunk) -> str | None:
        """The chunk's owner in the current table (None without a cluster)."""
        if self.peering is None:
            return None
        v, cluster = target.version, self.peering.cluster
        await cluster.owners_ready(v.id)  # a large table is computed off the loop
        return cluster.chunk_owner(v.id, v.chunk_range(chunk.path)[chunk.index])

    async def _moved_to(self, target: FillTarget, chunk: Chunk, decided: str | None) -> bool:
        """Did the chunk change owner since ``decided``, to another node that fills its file
        now (and answers)?"""
        owner = await self._owner(target, chunk)
        if self.peering is None or owner in (decided, self.peering.cluster.node_id):
            return False
        assert owner is not None
        v = target.version
        state = self.peering.cluster.state(v.id, owner, v.file_index(chunk.path))
        if state.loading and self._closed(owner, time.monotonic()):
            self.counters.origin_reads_redecided += 1
            return True
        return False

    @contextlib.asynccontextmanager
    async def _origin_slot(self, vid: str) -> AsyncIterator[None]:
        """A turn to read from the origin: ``origin_streams`` at once, half the workers while
        the cluster is degraded."""
        if self.peering is None:
            yield  # the origin workers are the limit
            return
        gate = self._origin_gates.get(vid)
        if gate is None:
            gate = self._origin_gates[vid] = _Gate(lambda: self._origin_limit(vid))
        asked = time.monotonic()
        try:
            await gate.enter()
        except BaseException:
            if gate.idle and self._origin_gates.get(vid) is gate:
                del self._origin_gates[vid]
            raise
        try:
            await self._node_gate.enter()
        except BaseException:
            self._leave(vid, gate)
            raise
        if time.monotonic() - asked > WAIT_MAX:
            log.debug("waited %.0fs for an origin read's turn", time.monotonic() - asked)
        try:
            yield
        finally:
            self._node_gate.leave()
            self._leave(vid, gate)

    def _leave(self, vid: str, gate: _Gate) -> None:
        gate.leave()
        if gate.idle and self._origin_gates.get(vid) is gate:
            del self._origin_gates[vid]

    def _origin_limit(self, vid: str) -> int:
        assert self.peering is not None
        return origin_streams(self.config.workers, len(self.peering.cluster.interested(vid)))

    def _node_origin_limit(self) -> int:
        workers = self.config.workers
        degraded = self.peering is not None and self.peering.cluster.degraded
        return max(1, workers // 2) if degraded else workers

    async def _from_peers(
        self, target: FillTarget, chunk: Chunk, wait_for_owner: bool
    ) -> Received | None:
        """The chunk from a peer, or None: the origin's turn. Asked, in order: a node holding
        the file whole; a node that reported reading it from the origin; the chunk's owner
        (waited for, while it loads, until it reports the chunk); its previous owner, if we
        own it now; a node holding the file in part whose ``Have`` lists the chunk."""
        peering = self.peering
        if peering is None:
            return None
        cluster = peering.cluster
        v = target.version
        vid, f = v.id, v.file_index(chunk.path)
        key = (vid, chunk.path, chunk.index)
        index = v.chunk_range(chunk.path)[chunk.index]
        want = cluster.chunk_crc(vid, f, chunk.index)  # None: the file's CRC checks it
        asked: set[str] = set()  # asked already: not asked again for this chunk
        failed_owner_since: float | None = None
        reasked = 0  # owners asked again after they failed
        try:
            while cluster.view_usable:
                now = time.monotonic()
                holders = [
                    n for n in cluster.holders(vid, f) if n not in asked and self._closed(n, now)
                ]
                reported = self._reported.get(key)
                if not holders and reported is not None and reported not in asked:
                    holders = [reported] if self._closed(reported, now) else []
                if holders:
                    node = min(holders, key=lambda n: (self._inflight.get(n, 0), random.random()))
                    asked.add(node)  # asked once: a record saying more than the node holds
                    got = await self._from_peer(target, chunk, node, want)
                    if got is not None:
                        return got
                    continue
                if await cluster.owners_ready(vid):
                    continue  # waited for the owner table: look at the holders again
                owner = cluster.chunk_owner(vid, index)
                state = cluster.state(vid, owner, f)
                # An owner asked already is passed over, unless it failed (its breaker is
                # open) while its record stands: then it is waited for like one whose watch
                # failed, not replaced by the origin at every node at once; and once its
                # breaker closes, it is waited for again (a dead one's watch fails until its
                # lease ends and a new owner takes the chunk), not passed over.
                failed = owner in asked and not self._closed(owner, now)
                again = owner in asked and not failed and failed_owner_since is not None
                if again and reasked < OWNER_RETRIES:  # not forever: it may fail this one only
                    reasked += 1
                    asked.discard(owner)
                ask: str | None = None  # the owner, or its previous one, asked now
                if owner != cluster.node_id and (owner not in asked or failed):
                    if state.loading and wait_for_owner:
                        # No deadline while the owner answers and its record says it fills
                        # the file: on a model 100x the origin link's second, a chunk may
                        # reach its owner minutes after the load starts, and a deadline
                        # would send every waiter to the origin then.
                        if self._closed(owner, now):
                            failed_owner_since = None
                            await self._await_report(vid, owner, key)
                            continue
                        failed_owner_since = failed_owner_since or now
                        if now - failed_owner_since < self._grace:
                            await asyncio.sleep(1.0)  # its lease ends, or its breaker closes
                            continue
                    elif (state.loading or state.partial) and self._closed(owner, now):
                        ask = owner
                elif owner == cluster.node_id:
                    # Ours since a member came or went: its previous owner, if it holds part
                    # of the file, may have read it from the origin already (else it answers
                    # "missing" at once). Without this ask every moved chunk left the origin
                    # twice. One holding nothing of it (a cold start's) is not asked.
                    prev = cluster.previous_owner(vid, index)
                    if (
                        prev is not None
                        and prev != owner
                        and prev not in asked
                        and cluster.state(vid, prev, f).partial
                        and self._closed(prev, now)
                    ):
                        ask = prev
                if ask is not None:
                    asked.add(ask)
                    got = await self._from_peer(target, chunk, ask, want)
                    if got is not None:
                        return got
                    continue
                chunks = len(v.chunks(chunk.path))
                part = await self._partial_holder(vid, f, chunk, chunks, asked)
                if part is None:
                    log.debug(
                        "%s chunk %d from the origin: owner %s %s, asked %s",
                        chunk.path,
                        chunk.index,
                        owner,
                        state,
                        sorted(asked),
                    )
                    return None
                asked.add(part)
                got = await self._from_peer(target, chunk, part, want)
                if got is not None:
                    return got
            return None
        finally:
            self._reported.pop(key, None)
            w = self._waits.pop(key, None)
            if w is not None:
                self._unwatch(vid, w.node, key)

    async def _await_report(self, vid: str, node: str, key: tuple[str, str, int]) -> None:
        """Wait (at most WAIT_MAX) for ``node``'s watch to report the chunk ``key``."""
        w = self._waits.get(key)
        if w is not None and w.node != node:  # its owner changed
            self._unwatch(vid, w.node, key)
            w = None
        if w is None:
            w = self._waits[key] = _Wait(node, asyncio.get_running_loop().create_future())
            self._watched.setdefault((vid, node), set()).add(key)
        elif w.woken.done():
            w.woken = asyncio.get_running_loop().create_future()
        if key[1:] in self._seen.get((vid, node), ()):
            self._reported[key] = node  # reported before this chunk waited on it
            return
        task = self._watches.get((vid, node))
        if task is None or task.done():  # none yet, or it ended (e.g. it failed before)
            self._watches[(vid, node)] = asyncio.ensure_future(self._watch(vid, node))
        done, _ = await asyncio.wait([w.woken], timeout=WAIT_MAX)
        if not done:
            log.debug("%s chunk %d: still waiting for its owner %s to report it", *key[1:], node)

    def _unwatch(self, vid: str, node: str, key: tuple[str, str, int]) -> None:
        keys = self._watched.get((vid, node))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._watched[(vid, node)]  # its watch ends after its current poll

    async def _watch(self, vid: str, node: str) -> None:
        """Long-poll ``node`` for the chunks of ``vid`` it reads from the origin, while
        chunks here wait on it; each report wakes the chunk's waiter. A failed watch opens
        the node's breaker and wakes every chunk waiting on it."""
        assert self.peering is not None
        peering = self.peering
        epoch = since = 0
        run = asyncio.get_running_loop().run_in_executor
        try:
            while self._watched.get((vid, node)):
                address = peering.cluster.address(node)
                if address is None:
                    return
                try:
                    landed = await run(
                        self._watch_threads,
                        peering.client.watch,
                        address,
                        vid,
                        epoch,
                        since,
                        WAIT_MAX,
                        node,
                    )
                except PeerError as e:
                    log.warning("%s; chunks waiting on %s look elsewhere", e, node)
                    self._trip(node)
                    self.counters.peer_failures += 1
                    return
                seen = self._seen.setdefault((vid, node), set())
                if landed.epoch != epoch:
                    seen.clear()  # its log changed: read again from its start
                epoch, since = landed.epoch, landed.next
                for path, indices in landed.chunks.items():
                    for i in indices:
                        seen.add((path, i))
                        w = self._waits.get((vid, path, i))
                        if w is not None:
                            self._reported[(vid, path, i)] = node
                            if not w.woken.done():
                                w.woken.set_result(None)
        finally:
            if self._watches.get((vid, node)) is asyncio.current_task():
                del self._watches[(vid, node)]
                self._seen.pop((vid, node), None)
            for key in self._watched.get((vid, node), ()):
                w = self._waits.get(key)
                if w is not None and not w.woken.done():
                    w.woken.set_result(None)  # look again: the breaker, the records

    async def _partial_holder(
        self, vid: str, f: int, chunk: Chunk, chunks: int, asked: set[str]
    ) -> str | None:
        """A node holding part of the file whose ``Have`` (at most HAVE_TTL old) lists the
        chunk: e.g. one that prefetched its share before the owners changed."""
        assert self.peering is not None
        cluster = self.peering.cluster
        now = time.monotonic()
        nodes = [
            n for n in cluster.partial_holders(vid, f) if n not in asked and self._closed(n, now)
        ]
        random.shuffle(nodes)
        for node in nodes[:HAVE_ASKS]:
            key = (node, vid, chunk.path)
            seen = self._haves.get(key)
            if seen is None or now - seen[0] > HAVE_TTL:
                address = cluster.address(node)
                if address is None:
                    continue
                try:
                    held = await asyncio.get_running_loop().run_in_executor(
                        self._peers, self.peering.client.have, address, vid, chunk.path, node
                    )
                except PeerError as e:
                    log.debug("%s: %s", node, e)
                    held = b""
                # Kept only as long as the file's bitmap: a peer's Have may be far longer.
                seen = self._haves[key] = (now, held[: (chunks + 7) // 8])
                if len(self._haves) > HAVE_CACHE:
                    self._haves.pop(next(iter(self._haves)))
            held = seen[1]
            i = chunk.index
            if i >> 3 < len(held) and held[i >> 3] >> (i & 7) & 1:
                return node
        return None

    async def _from_peer(
        self, target: FillTarget, chunk: Chunk, node: str, want: int | None
    ) -> Received | None:
        assert self.peering is not None
        address = self.peering.cluster.address(node)
        if address is None:
            self._trip(node)
            return None
        self._inflight[node] = self._inflight.get(node, 0) + 1
        started = time.perf_counter()
        try:
            got = await self._in_worker(
                target,
                self._peers,
                _fetch_from_peer,
                self.peering,
                address,
                node,
                target,
                chunk,
                want,
            )
        except PeerError as e:
            if e.missing:  # it does not hold the chunk (yet): no fault of the peer's
                return None
            self._trip(node, quarantine=e.corrupt)
            self.counters.peer_failures += 1
            if e.corrupt:
                self.counters.corrupt_from_peers += 1
                log.error(
                    "%s; peer %s quarantined for %.0fs, %s chunk %d fetched elsewhere",
                    e,
                    node,
                    QUARANTINE,
                    chunk.path,
                    chunk.index,
                )
            else:
                log.warning("%s; retrying %s chunk %d elsewhere", e, chunk.path, chunk.index)
            return None
        finally:
            self._inflight[node] -= 1
        b = self._breakers.get(node)
        if b is not None and b.open_until <= time.monotonic():  # a quarantine runs its course
            del self._breakers[node]
        self.metrics.fetch_seconds.labels("peers").observe(time.perf_counter() - started)
        self.counters.bytes_from_peers += chunk.length
        target.from_peers += chunk.length
        return got

    def _closed(self, node: str, now: float) -> bool:
        b = self._breakers.get(node)
        return b is None or b.open_until <= now

    def _trip(self, node: str, quarantine: bool = False) -> None:
        b = self._breakers.setdefault(node, _Breaker())
        b.failures += 1
        wait = QUARANTINE if quarantine else min(BREAKER_MAX, BREAKER_BASE * 2 ** (b.failures - 1))
        # Fetches run concurrently: a timeout seen after a quarantine must not shorten it.
        b.open_until = max(b.open_until, time.monotonic() + wait)

    async def _in_worker(
        self,
        target: FillTarget,
        pool: ThreadPoolExecutor,
        fn: Callable[..., T],
        *args: object,
    ) -> T:
        """Run a blocking read in a worker, tracked so a failed fill can wait for it."""
        cf = pool.submit(fn, *args)
        target.running.add(cf)
        try:
            return await asyncio.wrap_future(cf)
        finally:
            target.running.discard(cf)


class _Gate:
    """At most ``limit()`` holders at once, the limit read again at each turn (a version's
    members come and go). First come, first served: a slot that frees is handed to the
    longest waiter, never taken by a newcomer."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def idle(self) -> bool:
        return not self.busy and not self._waiters

    async def enter(self) -> None:
        if not self._waiters and self.busy < self.limit():
            self.busy += 1
            return
        handed = asyncio.get_running_loop().create_future()
        self._waiters.append(handed)
        try:
            await handed  # the slot is ours when this is set (``_hand`` counted it)
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self.leave()  # handed a slot, then cancelled: it passes on
            raise

    def leave(self) -> None:
        self.busy -= 1
        self._hand()

    def _hand(self) -> None:
        while self._waiters and self.busy < self.limit():  # (the limit may have risen)
            w = self._waiters.popleft()
            if not w.done():
                self.busy += 1
                w.set_result(None)


class _RandomOrderExecutor(ThreadPoolExecutor):
    """Peer transfers, taken from the queue in random order: every node hears of a chunk
    landing at its owner at the same moment, and served first-come-first-served they would
    all ask the same few owners for the same few chunks at once (a convoy) while the other
    owners' uplinks idle."""

    def __init__(self, workers: int, thread_name_prefix: str) -> None:
        super().__init__(workers, thread_name_prefix=thread_name_prefix)
        self._work_queue = _RandomQueue()  # type: ignore[assignment]


class _RandomQueue(queue.Queue[Any]):
    def _init(self, maxsize: int) -> None:
        self.queue: list[Any] = []

    def _qsize(self) -> int:
        return len(self.queue)

    def _put(self, item: Any) -> None:
        self.queue.append(item)

    def _get(self) -> Any:
        q = self.queue
        i = random.randrange(len(q))
        q[i], q[-1] = q[-1], q[i]
        return q.pop()


def _fetch_from_peer(
    peering: Peering,
    address: str,
    node: str,
    target: FillTarget,
    chunk: Chunk,
    crc: int | None,
) -> Received:
    view = target.fill.chunk_view(chunk)

    def sink(at: int, block: memoryview) -> None:
        target.fill.write(chunk.offset + at, block)

    try:
        return peering.client.fetch(
            address, target.version.id, chunk.path, chunk.index, view, crc, node, sink
        )
    finally:
        view.release()
