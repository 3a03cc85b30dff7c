"""Membership and the model directory, kept in etcd v3: little of it, written when it changes.

Layout under ``/mows/<cluster>/`` (all values msgpack; bytes never pass through etcd):
  nodes/<node>                      NodeInfo, under the node's lease: a dead node vanishes in
                                    one TTL
  holdings/<version>/<node>         the node's state for one version, at file granularity:
                                    files held whole (verified), files partly held (a share
                                    prefetch), and whether a load or prefetch of it runs there
                                    now; under the same lease, deleted when the node holds
                                    nothing of the version and loads none of it
  manifests/<version>/<file>/<page> the chunk CRC-32s of one verified file, at most PAGE
                                    chunks a key; written once (put if absent), not under a
                                    lease, deleted when no node holds the version
A version is keyed by its id (``mows.manifest.version_id``: file names, sizes, CRCs, chunk
size), so nodes that mount the same storage at different paths still share. No record grows
with the chunk count but the CRC pages, which are split: no value passes 64 KiB (``MAX_VALUE``)
whatever the model's size, and the reads that may return many keys are paged.

Which chunk a peer holds is not in etcd. It is derived from placement and the file states:
a file held whole is served by every node that says so; a chunk of a file still loading is
asked of its owner (the member that fetches it from the origin), which holds the request
until the chunk lands (``wait`` in the request: the waiting fetch is woken by the chunk's
own arrival, not by directory events); a partly held file's chunks are found by asking its
holders which they have (``Have``, on the peer connection). Ownership is computed, never
stored: each version has a table of its chunks' owners among its members (the live nodes
loading it, which read the origin, or holding parts of it: a share prefetch fetched the
chunks it owned, and is asked for them first), loads bounded (``owner_table``), computed again
only when the members or their capacities change, in a worker thread when it is large
(``owners_ready``). When members only leave, the table is the one computed when the last
member came, shrunk (``shrunk_table``): a chunk stays with a member that stays, which may have
read it already. Joins and leaves are etcd events, seen in the same order by every node (our
own join is the write that made us a member, when the watch brings it back: _put_holding), so
every node shrinks from the same table; a view read again keeps its base unless a member came
meanwhile.

What is written, and when: NodeInfo when it changes (address or capacity at once; ``used``
and the byte counters, which only status shows, once they settle or at most every
INFO_REFRESH seconds while they keep changing); a holding when its content changes (a load
starts or ends, a file completes or goes: O(files) writes a load); a file's CRC pages once
for the cluster. An idle node writes nothing: lease keepalives are its only traffic.

When etcd is unreachable the node is ``degraded``: it keeps the last view (members, holdings)
for ``grace`` seconds, since peers remain the best source (every chunk is checked, a dead peer
fails fast and trips its breaker) and dropping the view would send every load to the origin at
once. It reconnects with jittered backoff, keeping its lease if that outlived the outage (then
nothing of ours vanished and nothing is rewritten); peers whose leases expired meanwhile are
still tried as holders until they re-register. Past the grace the view is dropped: loads use
the origin until etcd is back.

etcd is an untrusted input: whoever can write under the prefix must not crash a node, make it
allocate without bound or capture placement. Every record is size-checked before it is
decoded and validated after (a node's id must match its key, its address must be HOST:PORT,
a holding must describe the version as this node's own manifest does, a file's CRC pages
must combine to the file's CRC-32 from crc32.txt); records of versions this node has not
joined are not decoded at all. A bad record is ignored, counted in ``rejected_records`` and
logged once per key; it also withdraws what its key said before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec

from .._crc import combine_chunks
from .._errors import ConfigError, ProtocolError
from ..manifest import Manifest, chunk_count
from ._bitmap import decode_bitmap, decode_crcs, encode_bitmap, encode_crcs
from ._etcd import EtcdSecurity, KeyValue, get_prefix_paged, open_client, parse_endpoint
from ._placement import Base, is_subset, owner, owner_table, table_cost, table_for

__all__ = ["ChunkCrcs", "Cluster", "Holding", "NodeInfo", "PeerState"]

log = logging.getLogger("mows.cluster")


class NodeInfo(msgspec.Struct, frozen=True):
    id: str
    address: str
    capacity: int
    used: int = 0
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    bytes_served: int = 0


class Holding(msgspec.Struct, frozen=True):
    """A node's state for one version, at file granularity (file indexes as in the manifest)."""

    node: str
    files: int  # the version's file count: the bound of the bitmaps
    complete: bytes  # encode_bitmap: files held whole, verified
    partial: bytes  # encode_bitmap: files of which some chunks are held
    loading: bytes  # encode_bitmap: files a load or prefetch is filling on the node now


class ChunkCrcs(msgspec.Struct, frozen=True):
    """One page of a verified file's chunk CRC-32s: chunks [page x PAGE, ...)."""

    file: int
    page: int
    chunks: int  # in this page
    crcs: bytes  # encode_crcs


class PeerState(msgspec.Struct, frozen=True):
    """What a member's holding says of one file."""

    complete: bool
    partial: bool
    loading: bool


_enc = msgspec.msgpack.Encoder()
_dec_node = msgspec.msgpack.Decoder(NodeInfo)
_dec_holding = msgspec.msgpack.Decoder(Holding)
_dec_crcs = msgspec.msgpack.Decoder(ChunkCrcs)

MAX_VALUE = 64 << 10  # no record the directory writes or reads is larger
MAX_NODE_RECORD = 4 << 10  # a NodeInfo is ~100 bytes
MAX_FILES = 1 << 16  # files a version may have: two bitmaps of 8 KiB at most
PAGE = 8192  # chunk CRCs a manifest key: 32 KiB (CRCs of random data do not compress)
# Placement weight cap, as a multiple of this node's capacity: nodes of different sizes
# exist, but one record claiming a huge capacity must not make its node own every chunk.
MAX_WEIGHT_RATIO = 4
_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")
_LOGGED_KEYS = 1024  # rejects are logged once per key, for at most this many keys
INFO_CHECK = 1.0  # seconds between looks at our NodeInfo
INFO_REFRESH = 60.0  # status-only fields are rewritten at most this often while changing
RETRY_BASE, RETRY_MAX = 0.5, 5.0  # reconnect backoff (full jitter), seconds
# Raw holdings of versions not joined, as the watch delivered them, so that a join (even while
# etcd is out) knows the holders at once; bounded: past it, a join reads etcd as before.
STASH_MAX = 16 << 20
# Owner tables costing more hashes than this (~1 us each) are computed in a worker thread.
TABLE_INLINE = 8192
_NONE = PeerState(False, False, False)


def check_node(info: NodeInfo, node: str) -> None:
    """Raise ProtocolError unless ``info`` is a sane record for the key ``nodes/<node>``."""
    if info.id != node:
        raise ProtocolError(f"record of node {info.id!r} under another node's key")
    m = _ADDRESS.fullmatch(info.address)
    if m is None or not 0 < int(m.group(1)) < 65536:
        raise ProtocolError(f"address {info.address[:100]!r} is not HOST:PORT")
    sizes = (info.capacity, info.used, info.bytes_from_origin, info.bytes_from_peers)
    if min(*sizes, info.bytes_served) < 0:
        raise ProtocolError("negative size")


def placement_weight(capacity: int, own_capacity: int) -> float:
    """A peer's rendezvous weight: its published capacity, within [0, 4 x ours]."""
    return float(min(max(capacity, 0), MAX_WEIGHT_RATIO * max(own_capacity, 0)))


class _Held(msgspec.Struct, frozen=True):
    complete: frozenset[int]
    partial: frozenset[int]
    loading: frozenset[int]

    @property
    def member(self) -> bool:
        """Loading the version, or holding shares of it: in its owner table."""
        return bool(self.loading or self.partial)


_Others = dict[str, _Held]
_Stash = dict[str, dict[str, tuple[int, bytes]]]  # version -> node -> (revision, raw holding)
_Members = tuple[tuple[str, float], ...]  # (node, placement weight), sorted
_Tables = tuple[list[str], dict[int, str] | None, Base]  # Cluster._tables' answer


class _Model:
    """What this node knows of one version: its files, its own state and every member's."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.sizes = [chunk_count(f.size, manifest.chunk_size) for f in manifest.files]
        self.chunks = sum(self.sizes)
        self.complete: set[int] = set()  # ours
        self.partial: set[int] = set()
        self.loading: dict[int, int] = {}  # file -> fills of it running here (loads, prefetch)
        self.others: _Others = {}
        # node -> etcd mod_revision of the last record (or deletion) applied: a re-read of the
        # version's holdings racing the watch must not bring back an older record.
        self.revs: dict[str, int] = {}
        self.gen = 0  # bumped when the set of nodes in ``others`` changes
        self.crcs: dict[int, list[int]] = {}  # file -> its chunks' CRCs, checked
        self.pages: dict[int, dict[int, list[int]]] = {}  # file -> page -> CRCs, until whole
        self.published: set[int] = set()  # files whose CRCs etcd has (or we wrote)
        # The owner table, for ``members``; ``stamp`` says for which generations it was
        # checked (Cluster._stamp): while it matches, the table is current without a look.
        self.table: list[str] = []
        self.members: _Members | None = None
        # The members when the last one came (each join sets it, in etcd's order: every
        # node sees the same), and its table: the owner table shrinks from it as members
        # leave, so a chunk stays with a member that stays (``shrunk_table``).
        self.since: _Members | None = None
        self.since_pending = False  # a member came: ``since`` is the members before one leaves
        self.base: Base | None = None
        self.joined_at = 0  # the revision of our write that made us a member, for all to see
        self.written = False  # a holding of ours was written for this model (this object)
        self.own_rev = 0  # the newest revision of our holding the watch brought back
        self.stamp: tuple[int, int, int] | None = None
        self.computing: tuple[tuple[_Members, _Members], asyncio.Future[_Tables]] | None = None
        self.previous: dict[int, str] = {}  # chunk -> its owner before the table last moved it
        # Set once the records published before we joined are read (``records_read``).
        self.read = asyncio.Event()

    def record(self, node: str) -> Holding:
        n = len(self.sizes)
        return Holding(
            node,
            n,
            encode_bitmap(self.complete, n),
            encode_bitmap(self.partial - self.complete, n),
            encode_bitmap(self.loading, n),
        )

    @property
    def empty(self) -> bool:
        return not (self.complete or self.partial or self.loading)

    def add_page(self, rec: ChunkCrcs) -> None:
        """Take one CRC page; a file's CRCs count once all its pages are in and combine to
        the file's CRC-32 (else ProtocolError, and the file's pages are dropped)."""
        f = rec.file
        if not 0 <= f < len(self.sizes):
            raise ProtocolError(f"file {f} of {len(self.sizes)}")
        entry = self.manifest.files[f]
        if entry.crc32 is None:
            return  # nothing to check them against: not used
        want = min(PAGE, self.sizes[f] - rec.page * PAGE)
        if rec.page < 0 or want <= 0 or rec.chunks != want:
            raise ProtocolError(f"page {rec.page} of {rec.chunks} chunks, file has {self.sizes[f]}")
        pages = self.pages.setdefault(f, {})
        pages[rec.page] = decode_crcs(rec.crcs, rec.chunks)
        if len(pages) < -(-self.sizes[f] // PAGE):
            return  # more to come
        del self.pages[f]
        crcs = [c for p in sorted(pages) for c in pages[p]]
        lengths = [
            min(self.manifest.chunk_size, entry.size - i * self.manifest.chunk_size)
            for i in range(self.sizes[f])
        ]
        if combine_chunks(zip(crcs, lengths, strict=True)) != entry.crc32:
            raise ProtocolError(f"chunk CRCs of {entry.path} do not combine to its CRC-32")
        self.crcs[f] = crcs
        self.published.add(f)


class Cluster:
    def __init__(
        self,
        endpoints: list[str],
        name: str,
        node_info: Callable[[], NodeInfo],
        *,
        ttl: int = 5,
        publish_interval: float = 0.2,
        security: EtcdSecurity | None = None,
    ) -> None:
        self.security = security or EtcdSecurity()
        for endpoint in endpoints:
            _, _, tls = parse_endpoint(endpoint)
            if self.security.tls_settings and not tls:
                raise ConfigError(
                    f"etcd: {endpoint} is plaintext but etcd_ca_file/etcd_cert_file are set:"
                    " use https://"
                )
            if self.security.user and not tls:
                log.warning("etcd %s: the etcd password crosses the network in clear", endpoint)
        self.endpoints = endpoints
        self.name = name
        self.prefix = f"/mows/{name}/".encode()
        self._node_info = node_info
        self.node_id = node_info().id
        self.ttl = ttl
        self.publish_interval = publish_interval
        self.healthy = False  # connected now
        self.degraded = False  # disconnected, the last view kept (see ``grace``)
        self._lost_at = 0.0
        self._drop_timer: asyncio.TimerHandle | None = None
        # The last view's nodes, after a reconnect from degraded: see _linger.
        self._lingering: dict[str, NodeInfo] = {}
        self._linger_timer: asyncio.TimerHandle | None = None
        self.etcd_errors = 0
        self.last_error = ""  # why etcd last failed us; empty while connected
        self.rejected_records = 0
        self._logged: set[bytes] = set()
        self.nodes: dict[str, NodeInfo] = {}
        self.models: dict[str, _Model] = {}
        self._dirty: set[str] = set()
        self._leaving: set[str] = set()  # versions whose holding we delete (see leave)
        self._sweep: set[str] = set()  # versions whose CRC pages may have no holder left
        self._written: dict[str, bytes] = {}  # version -> our holding as etcd has it
        self._info: NodeInfo | None = None  # our NodeInfo as etcd has it (None: to write)
        self._info_at = 0.0
        self._info_seen: NodeInfo | None = None  # as it was at the previous look
        self._stash: _Stash = {}
        self._stash_bytes = 0
        self._crcs_pending: dict[tuple[str, int], list[int]] = {}  # (version, file) -> CRCs
        # Called with (version, its new owner table) whenever the table changes: chunks this
        # node now owns but got from a peer must be announced to the peers that wait on it.
        self.on_owners: Callable[[str, list[str]], None] | None = None
        self._gen = 0  # bumped when a node comes, goes or changes capacity, or the view is replaced
        self._replaying = False  # _load_snapshot is applying a whole view
        self._came: set[_Model] = set()  # versions we joined in the view it applies
        self._unread: set[str] = set()  # joined versions whose records are still to be read
        self._wake_reader = asyncio.Event()
        self._wake_publisher = asyncio.Event()
        self._published = asyncio.Event()  # set (and replaced) after each publishing pass
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._lease: int | None = None  # lease id, kept across reconnects while etcd has it
        self.puts = 0  # writes to etcd (puts, deletes, transactions): bench/scale.py reads it

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def view_usable(self) -> bool:
        """May holders and owners be read: connected, or degraded within the grace."""
        return self.healthy or self.degraded

    @property
    def grace(self) -> float:
        """Seconds a degraded node keeps its last view."""
        return max(3.0 * self.ttl, 15.0)

    @property
    def degraded_seconds(self) -> float:
        return time.monotonic() - self._lost_at if self.degraded else 0.0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.healthy

    async def close(self) -> None:
        """Deregister (revoke the lease, removing our keys at once) and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for timer in (self._drop_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        if self._lease is not None and self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.revoke_lease(self._lease), 2)
        await self._drop_client()

    async def _drop_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.close(), 2)
        self._client = None

    async def _run(self) -> None:
        """Connect, register, follow the directory; on any etcd failure, retry."""
        attempt = 0
        while True:
            endpoint = self.endpoints[self.etcd_errors % len(self.endpoints)]
            try:
                self._client = open_client(endpoint, self.security)
                await self._client.connect()
                await self._register()
                await self._publish_dirty()
                revision = await self._load_snapshot()
                self._set_connected()
                attempt = 0
                await self._follow(revision)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # aetcd/grpc errors of every kind: translate to "unhealthy"
                self.etcd_errors += 1
                error = f"{endpoint}: {type(e).__name__}: {e}"
                if self.healthy or error != self.last_error:  # a lasting failure, logged once
                    log.warning("etcd %s", error)
                self.last_error = error
                self._set_disconnected()
                await self._drop_client()
                # Full jitter: nodes cut off together must not all come back at once.
                backoff = min(RETRY_MAX, RETRY_BASE * 2 ** min(attempt, 8))
                await asyncio.sleep(random.uniform(0, backoff))
                attempt += 1

    async def _register(self) -> None:
        """Keep our lease if etcd still has it (our keys are intact: only what changed is
        written), else take a new one and write everything again under it."""
        if self._lease is not None:
            reply = await self._client.refresh_lease(self._lease)
            if reply is not None and reply.TTL > 0:
                return
        self._lease = (await self._client.lease(self.ttl)).id
        self._info = None
        self._written.clear()
        self._dirty.update(self.models)
        await self._publish_info()

    def _set_connected(self) -> None:
        if not self.healthy:
            log.info("cluster %s: connected", self.name)
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        self.healthy, self.degraded, self.last_error = True, False, ""

    def _set_disconnected(self) -> None:
        if not self.healthy:
            return  # still down (degraded, or the view dropped already)
        log.warning(
            "cluster %s: etcd lost: degraded, peers tried from the last view for %.0fs",
            self.name,
            self.grace,
        )
        self.healthy, self.degraded, self._lost_at = False, True, time.monotonic()
        self._drop_timer = asyncio.get_running_loop().call_later(self.grace, self._drop_view)

    def _drop_view(self) -> None:
        log.warning(
            "cluster %s: etcd out for %.0fs: view dropped, loads use origin", self.name, self.grace
        )
        self._drop_timer = None
        self.degraded = False
        for m in self.models.values():
            self._settle(m)
        self.nodes.clear()
        self._lingering.clear()
        for m in self.models.values():
            m.others.clear()
            m.revs.clear()
        self._stash.clear()
        self._stash_bytes = 0
        self._gen += 1

    async def _put(self, key: str, value: bytes) -> None:
        self.puts += 1
        await self._client.put(self.prefix + key.encode(), value, lease=self._lease)

    async def _read(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await get_prefix_paged(self._client, self.prefix + prefix.encode())

    async def _load_snapshot(self) -> int:
        """Read the members, then the records of the versions we joined (never the whole
        prefix), and only then replace the view: a degraded node keeps using its last one
        until the new one is whole. The watch starts at the members' revision, so what
        changed during the later reads is replayed; per-key revisions keep the newest."""
        nodes, revision = await self._read("nodes/")
        vids = list(self.models)
        self._unread.difference_update(vids)  # joined later: left to the reader
        records: list[KeyValue] = []
        for vid in vids:
            records += (await self._read(f"holdings/{vid}/"))[0]
            records += (await self._read(f"manifests/{vid}/"))[0]
        others = {vid: m.others for vid, m in self.models.items()}
        for m in self.models.values():
            self._settle(m)
        since = {vid: m.since for vid, m in self.models.items()}
        last = ({**self._lingering, **self.nodes}, others, self._stash)
        self.nodes.clear()
        for m in self.models.values():
            m.others = {}
            m.revs.clear()
        # What the watch stashed is not replayed across the gap: it may be stale.
        self._stash, self._stash_bytes = {}, 0
        self._replaying = True  # members re-read are not members coming: see below
        self._came.clear()
        try:
            for kv in [*nodes, *records]:
                self._apply(kv.key, kv.value, kv.mod_revision, deleted=False)
        finally:
            self._replaying = False
        for vid, m in self.models.items():
            # If none came while we were away (only some left), the others still shrink
            # their tables from the same base: so do we. Else the members now are the best
            # guess (the others reset at a join we missed, perhaps before some left).
            members, old = self._members(m), since.get(vid)
            kept = old is not None and m not in self._came and is_subset(members, old)
            m.since, m.since_pending = (old if kept else members), False
            m.members, m.gen = None, m.gen + 1
        if self.degraded:
            self._linger(*last)
        for vid in vids:
            if vid in self.models:
                self.models[vid].read.set()
        self._gen += 1  # the view was replaced
        return revision

    def _linger(
        self, nodes: dict[str, NodeInfo], others: dict[str, _Others], stash: _Stash
    ) -> None:
        """After an outage the last view's nodes may vanish from etcd (their leases expired
        while it was out of reach), to re-register seconds later (backoff). Until they do, or
        for a grace, their last holdings stay usable as while degraded: dropping them would
        send our loads to the origin meanwhile. They are tried as holders only, never counted
        as owners or copies; one that is really gone fails fast and trips its breaker."""
        self._lingering = {n: i for n, i in nodes.items() if n != self.node_id}
        gone = self._lingering.keys() - self.nodes.keys()
        for fp, m in self.models.items():
            held = others.get(fp, {})
            for node in gone & held.keys():
                m.others[node] = held[node]
        for fp, records in stash.items():
            for node in gone & records.keys():
                self._stash_holding(fp, node, *records[node])
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._linger_timer = asyncio.get_running_loop().call_later(self.grace, self._end_linger)

    def _end_linger(self) -> None:
        self._linger_timer = None
        gone = self._lingering.keys() - self.nodes.keys()
        for m in self.models.values():
            for node in gone:
                m.others.pop(node, None)
        for fp, records in list(self._stash.items()):
            for node in gone & records.keys():
                self._stash_holding(fp, node, 0, None)
        self._lingering.clear()

    async def _read_version(self, vid: str) -> None:
        for prefix in (f"holdings/{vid}/", f"manifests/{vid}/"):
            for kv in (await self._read(prefix))[0]:
                self._apply(kv.key, kv.value, kv.mod_revision, deleted=False)
        m = self.models.get(vid)
        if m is not None:
            m.read.set()

    async def _reader(self) -> None:
        """Read the records of each version joined since the snapshot: they are decoded only
        for joined versions, so those published before the join are fetched now."""
        while True:
            await self._wake_reader.wait()
            self._wake_reader.clear()
            while self._unread:
                await self._read_version(self._unread.pop())

    async def _follow(self, revision: int) -> None:
        watch = await self._client.watch_prefix(self.prefix, start_revision=revision + 1)
        keepalive = asyncio.ensure_future(self._keepalive())
        publisher = asyncio.ensure_future(self._publisher())
        reader = asyncio.ensure_future(self._reader())
        try:
            events = asyncio.ensure_future(self._consume(watch))
            done, _ = await asyncio.wait(
                {keepalive, publisher, reader, events}, return_when=asyncio.FIRST_COMPLETED
            )
            for t in done:
                t.result()  # re-raise the failure that ended the session
            raise ConnectionError("etcd watch ended")
        finally:
            for t in (keepalive, publisher, reader):
                t.cancel()
            with contextlib.suppress(Exception):
                await watch.cancel()

    async def _consume(self, watch: Any) -> None:
        async for ev in watch:
            deleted = str(ev.kind).endswith("DELETE")
            self._apply(ev.kv.key, ev.kv.value, ev.kv.mod_revision, deleted=deleted)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            reply = await asyncio.wait_for(self._client.refresh_lease(self._lease), self.ttl / 2)
            if reply is None or reply.TTL <= 0:  # etcd revoked it: our keys are gone
                self._lease = None
                raise ConnectionError("our etcd lease expired")

    async def _publisher(self) -> None:
        next_info = 0.0
        while True:
            with contextlib.suppress(TimeoutError):  # a tick, or woken (records_read)
                await asyncio.wait_for(self._wake_publisher.wait(), self.publish_interval)
            self._wake_publisher.clear()
            await self._publish_dirty()
            self._published.set()
            self._published = asyncio.Event()
            if time.monotonic() >= next_info:
                next_info = time.monotonic() + INFO_CHECK
                await self._publish_info()

    async def _publish_info(self) -> None:
        """Write our NodeInfo if it changed: at once when placement reads the change (address,
        capacity); the fields only status shows (``used``, byte counters) once they have
        settled (unchanged since the last look) or, while they keep changing, at most every
        INFO_REFRESH seconds. An idle node writes nothing."""
        info, last, now = self._node_info(), self._info, time.monotonic()
        seen, self._info_seen = self._info_seen, info
        if info == last:
            return
        if (
            last is None
            or (info.address, info.capacity) != (last.address, last.capacity)
            or info == seen
            or now - self._info_at >= INFO_REFRESH
        ):
            await self._put(f"nodes/{self.node_id}", _enc.encode(info))
            self._info, self._info_at = info, now

    async def _publish_dirty(self) -> None:
        while self._leaving:
            vid = self._leaving.pop()
            if vid in self.models:
                continue  # joined again meanwhile
            self._written.pop(vid, None)  # first: the delete's own event must not rewrite it
            try:
                self.puts += 1
                await self._client.delete(self.prefix + f"holdings/{vid}/{self.node_id}".encode())
            except BaseException:
                self._leaving.add(vid)
                raise
        unread: set[str] = set()
        while self._dirty:
            vid = self._dirty.pop()
            m = self.models.get(vid)
            if m is None:
                continue
            if not m.read.is_set():
                # Not before we know its members: our coming is an event every node applies
                # in etcd's order (``_member_came``), and ours must see what theirs do.
                unread.add(vid)
                continue
            if m.empty:  # neither holding nor loading it: no record (not a member)
                if self._written.pop(vid, None) is not None:
                    self.puts += 1
                    try:
                        await self._client.delete(
                            self.prefix + f"holdings/{vid}/{self.node_id}".encode()
                        )
                    except BaseException:
                        self._written[vid] = b""  # still there, as far as we know
                        self._dirty.add(vid)
                        raise
                continue
            blob = _enc.encode(m.record(self.node_id))
            if self._written.get(vid) == blob:
                continue  # e.g. a re-join on revalidation: etcd has it already
            try:
                await self._put_holding(vid, m, blob)
            except BaseException:
                self._dirty.add(vid)
                raise
            self._written[vid] = blob
        self._dirty.update(unread)
        while self._crcs_pending:
            (vid, f), crcs = self._crcs_pending.popitem()
            m = self.models.get(vid)
            if m is None or f in m.published:
                continue
            try:
                await self._put_crcs(vid, f, crcs)
            except BaseException:
                self._crcs_pending[(vid, f)] = crcs
                raise
            m.published.add(f)
        while self._sweep:
            await self._sweep_manifest(self._sweep.pop())

    async def _put_holding(self, vid: str, m: _Model, blob: bytes) -> None:
        """Write our holding; note the revision at which it made us a member (a member
        record where etcd had none, or one that was not a member's), as every node sees it."""
        key = self.prefix + f"holdings/{vid}/{self.node_id}".encode()
        member = bool(m.loading or m.partial - m.complete)
        self.puts += 1
        reply = await self._client.put(key, blob, lease=self._lease, prev_kv=member)
        if not member:
            m.written = True
            return
        prev = reply.prev_kv.value if reply.prev_kv is not None else b""
        was = False
        if prev:
            with contextlib.suppress(ProtocolError, msgspec.DecodeError):
                was = self._decode_holding(m, self.node_id, prev).member
        if was and not m.written:
            # A member's record this model never wrote (a previous process's, or ours before
            # we left and came back within a publish tick): to the others we did not come,
            # while we have no view of the members since one last came. Come again, for all.
            self._written.pop(vid, None)  # the delete's own event must not rewrite it
            self.puts += 2
            await self._client.delete(key)
            reply = await self._client.put(key, blob, lease=self._lease)
            was = False
        m.written = True
        if not was:
            m.joined_at = reply.header.revision
            if m.own_rev >= m.joined_at:  # the watch brought it back before the reply came
                self._member_came(m, own=True)

    async def _put_crcs(self, vid: str, f: int, crcs: list[int]) -> None:
        """Write a file's CRC pages unless a page is there already (a transaction: the first
        node to verify the file writes them, for the cluster; not under our lease)."""
        tx = self._client.transactions
        for page in range(-(-len(crcs) // PAGE)):
            part = crcs[page * PAGE : (page + 1) * PAGE]
            rec = ChunkCrcs(f, page, len(part), encode_crcs(dict(enumerate(part)), len(part)))
            key = self.prefix + f"manifests/{vid}/{f}/{page}".encode()
            self.puts += 1
            await self._client.transaction(
                compare=[tx.version(key) == 0],
                success=[tx.put(key, _enc.encode(rec))],
                failure=[],
            )

    async def _sweep_manifest(self, vid: str) -> None:
        """Delete a version's CRC pages if no node holds the version any more."""
        left, _ = await get_prefix_paged(
            self._client, self.prefix + f"holdings/{vid}/".encode(), page=1, keys_only=True
        )
        if not left:
            self.puts += 1
            await self._client.delete_prefix(self.prefix + f"manifests/{vid}/".encode())

    def _apply(self, key: bytes, value: bytes, revision: int, *, deleted: bool) -> None:
        try:
            parts = key[len(self.prefix) :].decode().split("/")
            if parts[0] == "nodes":
                self._apply_node(parts, value, deleted)
            elif parts[0] == "holdings":
                self._apply_holding(parts, value, revision, deleted)
            elif parts[0] == "manifests":
                self._apply_crcs(parts, value, deleted)
        except (UnicodeDecodeError, msgspec.DecodeError, ProtocolError) as e:
            self._reject(key, str(e))

    def _apply_node(self, parts: list[str], value: bytes, deleted: bool) -> None:
        if len(parts) != 2 or not parts[1]:
            raise ProtocolError("not nodes/<node>")
        node = parts[1]
        for m in self.models.values():
            held = m.others.get(node)
            if held is not None and held.member:
                self._settle(m)  # it may leave: ``since`` is the members before
        old = self.nodes.pop(node, None)  # deleted, or replaced: a bad record withdraws the old one
        try:
            self._apply_node_record(node, value, deleted)
        finally:
            new = self.nodes.get(node)
            if (old is None) != (new is None) or (old and new and old.capacity != new.capacity):
                self._gen += 1  # owners may have changed
                if new is not None:  # it came back, or its weight changed: as if it came
                    for m in self.models.values():
                        held = m.others.get(node)
                        if node == self.node_id or (held is not None and held.member):
                            self._member_came(m)

    def _apply_node_record(self, node: str, value: bytes, deleted: bool) -> None:
        if deleted:
            if node == self.node_id:
                self._info = None  # deleted behind our back: the publisher writes it again
            if node in self._lingering:
                return  # its lease expired in an outage: see _linger
            for m in self.models.values():
                if m.others.pop(node, None) is not None:
                    m.gen += 1
            return
        self._lingering.pop(node, None)  # back: the ordinary rules again
        if len(value) > MAX_NODE_RECORD:
            raise ProtocolError(f"{len(value)} bytes, more than {MAX_NODE_RECORD}")
        info = _dec_node.decode(value)
        check_node(info, node)
        self.nodes[node] = info

    def _apply_holding(self, parts: list[str], value: bytes, revision: int, deleted: bool) -> None:
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ProtocolError("not holdings/<version>/<node>")
        vid, node = parts[1], parts[2]
        if deleted and self._janitor(vid):
            self._sweep.add(vid)  # perhaps the last holder gone: its CRC pages with it
        if node == self.node_id:
            if deleted and self._written.pop(vid, None) is not None:
                self._dirty.add(vid)  # deleted behind our back: write it again
            own = self.models.get(vid)
            if own is not None and not deleted:
                if revision == own.joined_at and own.own_rev < revision:  # once: not re-reads
                    self._member_came(own, own=True)  # we came, for the others: now
                own.own_rev = max(own.own_rev, revision)
            return
        if deleted and node in self._lingering:
            return  # its lease expired in an outage: see _linger
        m = self.models.get(vid)
        if m is None:  # not a version we joined (nothing to check it against): kept raw
            self._stash_holding(vid, node, revision, None if deleted else value)
            return
        if revision < m.revs.get(node, 0):
            return  # older than what we applied: a re-read that raced the watch
        m.revs[node] = revision
        held = m.others.get(node)
        if held is not None and held.member:
            self._settle(m)  # it may leave: ``since`` is the members before
        prev = m.others.pop(node, None)
        try:
            if not deleted:
                m.others[node] = self._decode_holding(m, node, value)
        finally:
            now = m.others.get(node)
            if bool(prev and prev.member) != bool(now and now.member):
                m.gen += 1  # a member came or went: its owners may have changed
                if now and now.member and node in self.nodes:
                    self._member_came(m)

    @staticmethod
    def _decode_holding(m: _Model, node: str, value: bytes) -> _Held:
        if len(value) > MAX_VALUE:
            raise ProtocolError(f"{len(value)} bytes, more than {MAX_VALUE}")
        rec = _dec_holding.decode(value)
        if rec.node != node:
            raise ProtocolError(f"holding of node {rec.node!r} under another node's key")
        n = len(m.sizes)
        if rec.files != n:  # our own manifest says how many: the bound of the decode
            raise ProtocolError(f"{rec.files} files, the version has {n}")
        return _Held(
            frozenset(decode_bitmap(rec.complete, n)),
            frozenset(decode_bitmap(rec.partial, n)),
            frozenset(decode_bitmap(rec.loading, n)),
        )

    def _apply_crcs(self, parts: list[str], value: bytes, deleted: bool) -> None:
        m = self.models.get(parts[1]) if len(parts) > 1 else None
        if m is None:
            return  # decoded only for joined versions
        if len(parts) != 4 or not all(parts[1:]):
            raise ProtocolError("not manifests/<version>/<file>/<page>")
        if deleted:  # swept while we joined: what we hold whole is written again
            f = int(parts[2]) if parts[2].isdigit() else -1
            m.published.discard(f)
            if f in m.complete and f in m.crcs:
                self._crcs_pending[(parts[1], f)] = m.crcs[f]
            return
        if len(value) > MAX_VALUE:
            raise ProtocolError(f"{len(value)} bytes, more than {MAX_VALUE}")
        rec = _dec_crcs.decode(value)
        if f"{rec.file}/{rec.page}" != f"{parts[2]}/{parts[3]}":
            raise ProtocolError("page under another page's key")
        if rec.file in m.crcs:
            return
        try:
            m.add_page(rec)
        except ProtocolError:
            m.pages.pop(rec.file, None)
            raise

    def _janitor(self, vid: str) -> bool:
        """Are we the live node that deletes the version's CRC pages when its last holder
        goes? One node (rendezvous over all live nodes), so one read, not one per node."""
        members = tuple((n, 1.0) for n in sorted({*self.nodes, self.node_id}))
        return self.healthy and owner(f"janitor/{vid}", members) == self.node_id

    def _stash_holding(self, vid: str, node: str, revision: int, value: bytes | None) -> None:
        held = self._stash.setdefault(vid, {})
        old = held.pop(node, None)
        if old is not None:
            self._stash_bytes -= len(vid) + len(node) + len(old[1])
        if value is not None and len(value) <= MAX_VALUE:
            size = len(vid) + len(node) + len(value)
            if self._stash_bytes + size <= STASH_MAX:
                held[node] = (revision, value)
                self._stash_bytes += size
        if not held:
            del self._stash[vid]

    def _reject(self, key: bytes, why: str) -> None:
        self.rejected_records += 1
        short = key[len(self.prefix) : len(self.prefix) + 200]
        if short not in self._logged and len(self._logged) < _LOGGED_KEYS:
            self._logged.add(short)
            log.warning("ignoring directory record %r: %s (logged once per key)", short, why)

    # -- what this node tells the directory ----------------------------------------------------
    def join(self, vid: str, manifest: Manifest) -> None:
        """Take part in this version: hold records of it, be told of its members."""
        existing = self.models.get(vid)
        if existing is not None:
            return
        m = self.models[vid] = _Model(manifest)
        # Written by this model, whatever etcd holds of ours (we may have left and come back
        # within a publish tick): see _put_holding.
        self._written.pop(vid, None)
        if len(m.sizes) > MAX_FILES:
            raise ConfigError(f"{len(m.sizes)} files: a version has at most {MAX_FILES}")
        # Records are decoded only for joined versions: those the watch brought are known now
        # (even with etcd out); those published before we connected are read.
        for node, (revision, value) in self._stash.pop(vid, {}).items():
            self._stash_bytes -= len(vid) + len(node) + len(value)
            key = self.prefix + f"holdings/{vid}/{node}".encode()
            self._apply(key, value, revision, deleted=False)
        self._unread.add(vid)
        self._wake_reader.set()
        self._dirty.add(vid)

    def begin_loading(self, vid: str, files: list[int]) -> None:
        """A load or prefetch filling ``files`` of the version starts here: we are a member
        (an owner of chunks others ask us for, and wait on), until ``end_loading``."""
        m = self.models[vid]
        for f in files:
            m.loading[f] = m.loading.get(f, 0) + 1
            if m.loading[f] == 1:
                self._dirty.add(vid)

    def end_loading(self, vid: str, files: list[int]) -> None:
        m = self.models.get(vid)
        if m is None:
            return
        for f in files:
            left = m.loading.pop(f, 0) - 1
            if left > 0:
                m.loading[f] = left
            elif left == 0:
                self._dirty.add(vid)

    def chunk_held(self, vid: str, f: int) -> None:
        """Some chunk of file ``f`` is held here (a partial file: its owned chunks are
        asked of us)."""
        m = self.models[vid]
        if f not in m.partial and f not in m.complete:
            m.partial.add(f)
            self._dirty.add(vid)

    def file_complete(self, vid: str, f: int, crcs: list[int] | None = None) -> None:
        """File ``f`` is held whole and verified; ``crcs``, its chunk CRC-32s (checked
        against crc32.txt), are written for the cluster if etcd has none yet."""
        m = self.models[vid]
        if f not in m.complete:
            m.complete.add(f)
            m.partial.discard(f)
            self._dirty.add(vid)
        if crcs is not None and f not in m.published and m.manifest.files[f].crc32 is not None:
            m.crcs[f] = list(crcs)
            self._crcs_pending[(vid, f)] = list(crcs)

    def file_dropped(self, vid: str, f: int) -> None:
        m = self.models.get(vid)
        if m is not None and (f in m.complete or f in m.partial):
            m.complete.discard(f)
            m.partial.discard(f)
            self._dirty.add(vid)

    def is_loading(self, vid: str) -> bool:
        m = self.models.get(vid)
        return m is not None and bool(m.loading)

    def leave(self, vid: str) -> None:
        """We hold none of this version and load none of it: delete our holding, so we are no
        longer a member (an owner a new cold load would wait on, a holder to ask)."""
        if self.models.pop(vid, None) is None:
            return
        self._dirty.discard(vid)
        self._leaving.add(vid)

    # -- what the fetch scheduler asks ---------------------------------------------------------
    def holders(self, vid: str, f: int) -> list[str]:
        """Live nodes (not us) that hold file ``f`` whole."""
        return self._holding(vid, f, whole=True)

    def partial_holders(self, vid: str, f: int) -> list[str]:
        """Live nodes (not us) that hold some chunks of file ``f`` and do not fill it now
        (a share prefetch's): one still filling it is asked as the owner of its chunks."""
        return self._holding(vid, f, whole=False)

    def _holding(self, vid: str, f: int, *, whole: bool) -> list[str]:
        m = self.models.get(vid)
        if m is None or not self.view_usable:
            return []
        return [
            node
            for node, held in m.others.items()
            if (f in held.complete if whole else f in held.partial and f not in held.loading)
            and (node in self.nodes or node in self._lingering)
        ]

    def state(self, vid: str, node: str, f: int) -> PeerState:
        """What ``node``'s holding says of file ``f`` (nothing if it has none)."""
        m = self.models.get(vid)
        held = m.others.get(node) if m is not None and self.view_usable else None
        if held is None:
            return _NONE
        return PeerState(f in held.complete, f in held.partial, f in held.loading)

    def chunk_crc(self, vid: str, f: int, index: int) -> int | None:
        """Chunk ``index`` of file ``f``'s CRC-32 as the version's CRC pages give it (checked
        to combine to the file's CRC-32), if etcd has them."""
        m = self.models.get(vid)
        crcs = m.crcs.get(f) if m is not None else None
        return crcs[index] if crcs is not None and 0 <= index < len(crcs) else None

    async def records_read(self, vid: str, timeout: float) -> None:
        """Wait, at most ``timeout`` and only while etcd is reachable, until the records of
        ``vid`` published before we joined it are read (until then its holders and members
        look absent, and a fill would take itself for the only member, reading the origin or
        waiting as on a cold cluster), and our own record is written."""
        m = self.models.get(vid)
        if m is None or not self.healthy:
            return
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(m.read.wait(), timeout)
            # And until our own record is written: the others must know we fill files of
            # it before we read any of its chunks from the origin, or they read them too.
            while vid in self._dirty or vid not in self._written:
                self._wake_publisher.set()
                left = deadline - time.monotonic()
                if left <= 0 or not self.healthy:
                    return
                await asyncio.wait_for(self._published.wait(), left)

    def anyone_holds(self, vid: str) -> bool:
        m = self.models.get(vid)
        return m is not None and any(
            h.complete or h.partial for node, h in m.others.items() if node in self.nodes
        )

    def interested(self, vid: str) -> frozenset[str]:
        """Live members of the version, us included."""
        m = self.models.get(vid)
        others = [n for n, h in (m.others if m else {}).items() if h.member and n in self.nodes]
        return frozenset([self.node_id, *others])

    def live_peers(self) -> list[NodeInfo]:
        return [n for nid, n in self.nodes.items() if nid != self.node_id]

    def owner(self, vid: str, key: str) -> str:
        """The live member that should fetch ``key`` from origin (us if unsure). A chunk's
        key, ``f"{vid}/{index}"``, is looked up in the version's owner table (as
        ``chunk_owner``); any other key gets plain rendezvous among the same members."""
        m = self.models.get(vid)
        if not self.view_usable or m is None:
            return self.node_id
        index = key[len(vid) + 1 :] if key.startswith(f"{vid}/") else ""
        if index.isdigit() and int(index) < m.chunks:
            return self.chunk_owner(vid, int(index))
        return owner(key, self._members(m)) or self.node_id

    def chunk_owner(self, vid: str, index: int) -> str:
        """The owner of chunk ``index`` (of the version's flat chunk range) in the owner
        table: computed here if not current (``owners_ready`` computes a large one off the
        loop)."""
        m = self.models.get(vid)
        if not self.view_usable or m is None or not 0 <= index < m.chunks:
            return self.node_id
        stamp = self._stamp(m)
        if m.stamp != stamp:
            members = self._members(m)
            if members != m.members:
                since = self._since(m, members)
                self._set_table(vid, m, *self._tables(vid, m, members, since, m.base), members)
            m.stamp = stamp
        return m.table[index] if m.table else self.node_id

    def _tables(
        self, vid: str, m: _Model, members: _Members, since: _Members, base: Base | None
    ) -> _Tables:
        """The owner table for ``members`` (shrunk from ``since``'s: ``table_for``), its
        base and, the first time (we had none: we are joining a load others started), the
        owners the chunks now ours had without us."""
        table, base = table_for(vid, m.chunks, members, since, base)
        if m.table:
            return table, None, base
        others = [x for x in members if x[0] != self.node_id]
        if not others:
            return table, {}, base
        without = owner_table(vid, m.chunks, others)
        mine = self.node_id
        return (
            table,
            {i: w for i, (w, o) in enumerate(zip(without, table, strict=True)) if o == mine},
            base,
        )

    def _since(self, m: _Model, members: _Members) -> _Members:
        """The members when the last one came; ``members`` themselves if one came that no
        event told of (a capacity changed)."""
        self._settle(m)
        if m.since is None or not is_subset(members, m.since):
            m.since = members
        return m.since

    def _member_came(self, m: _Model, *, own: bool = False) -> None:
        """A member came: ``since`` becomes the members as they are until one leaves (set
        then, or at the next table: O(members) once, not at every join)."""
        if self._replaying:  # _load_snapshot decides once the view is whole
            self._came.update([m] if own else [])  # our own join: the others saw it
            return
        m.since_pending = True
        m.members, m.gen = None, m.gen + 1  # computed again, even for the same members

    def _settle(self, m: _Model) -> None:
        if m.since_pending:
            m.since, m.since_pending = self._members(m), False

    def _set_table(
        self,
        vid: str,
        m: _Model,
        table: list[str],
        previous: dict[int, str] | None,
        base: Base,
        members: _Members,
    ) -> None:
        old = m.table
        if previous is not None:
            m.previous = previous
        elif len(old) == len(table):
            for i, (was, now) in enumerate(zip(old, table, strict=True)):
                if was != now:
                    m.previous[i] = was
        m.table, m.base, m.members = table, base, members
        if self.on_owners is not None and table:
            self.on_owners(vid, table)

    def previous_owner(self, vid: str, index: int) -> str | None:
        """The owner chunk ``index`` had before the last table change that moved it (a
        member left or came): it may have read the chunk from the origin already."""
        m = self.models.get(vid)
        return m.previous.get(index) if m is not None else None

    async def owners_ready(self, vid: str) -> bool:
        """Make the version's owner table current, computing a large one in a worker thread
        (one computation for all the fetches that ask). True if it waited for one (the
        directory may have changed meanwhile)."""
        waited = False
        for _ in range(3):  # members that keep changing: chunk_owner computes it inline
            m = self.models.get(vid)
            if m is None or not self.view_usable:
                return waited
            stamp = self._stamp(m)
            if m.stamp == stamp:
                return waited
            members = self._members(m)
            if members == m.members:
                m.stamp = stamp
                return waited
            if table_cost(m.chunks, len(members)) <= TABLE_INLINE:
                since = self._since(m, members)
                self._set_table(vid, m, *self._tables(vid, m, members, since, m.base), members)
                m.stamp = stamp
                return waited
            since = self._since(m, members)
            if m.computing is None or m.computing[0] != (members, since):
                loop = asyncio.get_running_loop()
                m.computing = (
                    (members, since),
                    loop.run_in_executor(None, self._tables, vid, m, members, since, m.base),
                )
            job = m.computing[1]
            table, previous, base = await asyncio.shield(job)
            waited = True
            if m.computing is not None and m.computing[1] is job:
                m.computing = None
            if self.models.get(vid) is m and m.members != members and m.since == since:
                self._set_table(vid, m, table, previous, base, members)
                m.stamp = None  # checked on the next turn
        return waited

    def _stamp(self, m: _Model) -> tuple[int, int, int]:
        return (self._gen, m.gen, self._node_info().capacity)

    def _members(self, m: _Model) -> _Members:
        own = self._node_info().capacity
        members = [(self.node_id, float(own))]
        members += [
            (nid, placement_weight(self.nodes[nid].capacity, own))
            for nid, held in m.others.items()
            if held.member and nid in self.nodes
        ]
        return tuple(sorted(members))

    def address(self, node: str) -> str | None:
        info = self.nodes.get(node) or self._lingering.get(node)
        return info.address if info else None

    def copies(self, vid: str) -> list[int]:
        """How many live nodes (us included) hold each file of the version whole."""
        m = self.models.get(vid)
        if m is None:
            return []
        live = [h.complete for node, h in m.others.items() if node in self.nodes]
        return [(f in m.complete) + sum(f in c for c in live) for f in range(len(m.sizes))]

    def file_copies(self, vid: str, f: int) -> int:
        """How many live nodes (us included) hold file ``f`` whole."""
        m = self.models.get(vid)
        if m is None:
            return 0
        live = [h.complete for node, h in m.others.items() if node in self.nodes]
        return (f in m.complete) + sum(f in c for c in live)
