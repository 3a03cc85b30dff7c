"""Membership and the chunk directory, kept in etcd v3.

Layout under ``/mows/<cluster>/`` (all values msgpack; bytes never pass through etcd):
  nodes/<node>              NodeInfo, under the node's lease: a dead node vanishes in one TTL
  manifests/<model>         the model's manifest (files, sizes, tensor index), zlib+msgpack,
                            written once, not under a lease
  holdings/<model>/<node>   which chunks of a model the node holds (a compressed bitmap) and
                            their CRC-32s, under the same lease; written in batches
A model is keyed by its version id (``mows.manifest.version_id``: file names, sizes, CRCs,
chunk size), so nodes that mount the same storage at different paths still share.
Ownership is computed, never stored: each model has a table of its chunks' owners, loads
bounded (``owner_table``), computed again only when the model's members (live nodes that
joined it) or their capacities change, in a worker thread when it is large (``owners_ready``).

A chunk waiting for its owner (``wait_chunk``) is woken when a holding newly shows it held,
and every waiter of a model when its owners may have changed (a member came or went, a
capacity changed) or the view did (connected, degraded, dropped, re-read): not by every
directory event, which would cost each waiting chunk a look at every record applied.

What is written, and when: NodeInfo when it changes (address or capacity at once; ``used``
and the byte counters, which only status shows, once they settle or at most every
INFO_REFRESH seconds while they keep changing); a holding when its content changed; a manifest
once. An idle node writes nothing: lease keepalives are its only traffic.

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
a holding must describe the model as this node's own manifest does); holdings of models this
node has not joined are not decoded at all. A bad record is ignored, counted in
``rejected_records`` and logged once per key; it also withdraws what its key said before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
import zlib
from collections.abc import Callable
from typing import Any

import msgspec

from .._errors import ConfigError, ProtocolError
from ..manifest import Manifest
from ._bitmap import decode_bitmap, decode_crcs, encode_bitmap, encode_crcs
from ._etcd import EtcdSecurity, open_client, parse_endpoint
from ._placement import owner, owner_table, table_cost

__all__ = ["Cluster", "Holding", "NodeInfo"]

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
    node: str
    chunks: int
    held: bytes  # encode_bitmap
    crcs: bytes  # encode_crcs


_enc = msgspec.msgpack.Encoder()
_dec_node = msgspec.msgpack.Decoder(NodeInfo)
_dec_holding = msgspec.msgpack.Decoder(Holding)

MAX_NODE_RECORD = 4 << 10  # a NodeInfo is ~100 bytes
# A holding is two zlib streams of at most MAX_CHUNKS/8 and 4 bytes a chunk; CRCs of random
# data do not compress: 8 MiB holds 2M chunks (128 TiB of 64 MiB chunks).
MAX_HOLDING_RECORD = 8 << 20
# Placement weight cap, as a multiple of this node's capacity: nodes of different sizes
# exist, but one record claiming a huge capacity must not make its node own every chunk.
MAX_WEIGHT_RATIO = 4
_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")
_LOGGED_KEYS = 1024  # rejects are logged once per key, for at most this many keys
INFO_CHECK = 1.0  # seconds between looks at our NodeInfo
INFO_REFRESH = 10.0  # status-only fields are rewritten at most this often while changing
RETRY_BASE, RETRY_MAX = 0.5, 5.0  # reconnect backoff (full jitter), seconds
# Raw holdings of models not joined, as the watch delivered them, so that a join (even while
# etcd is out) knows the holders at once; bounded: past it, a join reads etcd as before.
STASH_MAX = 64 << 20
# Owner tables costing more hashes than this (~1 us each) are computed in a worker thread.
TABLE_INLINE = 8192


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


_Others = dict[str, tuple[set[int], list[int]]]  # node -> (held, crcs)
_Stash = dict[str, dict[str, tuple[int, bytes]]]  # model -> node -> (revision, raw holding)
_Members = tuple[tuple[str, float], ...]  # (node, placement weight), sorted


class _Model:
    """What this node knows of one model: its own chunks and every live node's."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.mine: dict[int, int] = {}  # chunk -> crc
        self.others: _Others = {}  # node -> (held, crcs)
        # node -> etcd mod_revision of the last record (or deletion) applied: a re-read of the
        # model's holdings racing the watch must not bring back an older record.
        self.revs: dict[str, int] = {}
        self.gen = 0  # bumped when the set of nodes in ``others`` changes
        # The owner table, for ``members``; ``stamp`` says for which generations it was
        # checked (Cluster._stamp): while it matches, the table is current without a look.
        self.table: list[str] = []
        self.members: _Members | None = None
        self.stamp: tuple[int, int, int] | None = None
        self.computing: tuple[_Members, asyncio.Future[list[str]]] | None = None


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
        self._leaving: set[str] = set()  # models whose holding we delete (see leave)
        self._written: dict[str, bytes] = {}  # fingerprint -> our holding as etcd has it
        self._info: NodeInfo | None = None  # our NodeInfo as etcd has it (None: to write)
        self._info_at = 0.0
        self._info_seen: NodeInfo | None = None  # as it was at the previous look
        self._stash: _Stash = {}
        self._stash_bytes = 0
        self._manifests_pending: dict[str, bytes] = {}  # fingerprint -> compressed manifest
        self._manifests_published: set[str] = set()
        self._changed = asyncio.Event()
        self._gen = 0  # bumped when a node comes, goes or changes capacity, or the view is replaced
        # model -> chunk index -> futures of the fetches waiting for the chunk (wait_chunk)
        self._waiters: dict[str, dict[int, list[asyncio.Future[None]]]] = {}
        self._unread: set[str] = set()  # joined models whose holdings are still to be read
        self._wake_reader = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._lease: int | None = None  # lease id, kept across reconnects while etcd has it

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
        self._notify()
        self._wake_all()

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
        self._notify()
        self._wake_all()  # degraded: owners are not waited for

    def _drop_view(self) -> None:
        log.warning(
            "cluster %s: etcd out for %.0fs: view dropped, loads use origin", self.name, self.grace
        )
        self._drop_timer = None
        self.degraded = False
        self.nodes.clear()
        self._lingering.clear()
        for m in self.models.values():
            m.others.clear()
            m.revs.clear()
        self._stash.clear()
        self._stash_bytes = 0
        self._gen += 1
        self._notify()
        self._wake_all()

    async def _put(self, key: str, value: bytes) -> None:
        await self._client.put(self.prefix + key.encode(), value, lease=self._lease)

    async def _load_snapshot(self) -> int:
        """Read the members, then the holdings of the models we joined (never the whole
        prefix: manifests accumulate there), and only then replace the view: a degraded node
        keeps using its last one until the new one is whole. The watch starts at the members'
        revision, so what changed during the later reads is replayed; per-key revisions keep
        the newest."""
        result = await self._client.get_prefix(self.prefix + b"nodes/")
        fps = list(self.models)
        self._unread.difference_update(fps)  # joined later: left to the reader
        holdings = [
            kv
            for fp in fps
            for kv in await self._client.get_prefix(self.prefix + f"holdings/{fp}/".encode())
        ]
        others = {fp: m.others for fp, m in self.models.items()}
        last = ({**self._lingering, **self.nodes}, others, self._stash)
        self.nodes.clear()
        for m in self.models.values():
            m.others = {}
            m.revs.clear()
        # What the watch stashed is not replayed across the gap: it may be stale.
        self._stash, self._stash_bytes = {}, 0
        for kv in [*result, *holdings]:
            self._apply(kv.key, kv.value, kv.mod_revision, deleted=False)
        if self.degraded:
            self._linger(*last)
        self._gen += 1  # the view was replaced
        self._wake_all()
        return int(result.header.revision)

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
        self._notify()
        self._wake_all()

    async def _read_holdings(self, fp: str) -> None:
        result = await self._client.get_prefix(self.prefix + f"holdings/{fp}/".encode())
        for kv in result:
            self._apply(kv.key, kv.value, kv.mod_revision, deleted=False)

    async def _reader(self) -> None:
        """Read the holdings of each model joined since the snapshot: they are decoded only
        for joined models, so those published before the join are fetched now."""
        while True:
            await self._wake_reader.wait()
            self._wake_reader.clear()
            while self._unread:
                await self._read_holdings(self._unread.pop())

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
            await asyncio.sleep(self.publish_interval)
            await self._publish_dirty()
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
        for fp, blob in list(self._manifests_pending.items()):
            # Not under the lease: a model's manifest outlives the nodes that loaded it.
            await self._client.put(self.prefix + f"manifests/{fp}".encode(), blob)
            self._manifests_published.add(fp)
            del self._manifests_pending[fp]
        while self._leaving:
            fp = self._leaving.pop()
            if fp in self.models:
                continue  # joined again meanwhile
            self._written.pop(fp, None)  # first: the delete's own event must not rewrite it
            try:
                await self._client.delete(self.prefix + f"holdings/{fp}/{self.node_id}".encode())
            except BaseException:
                self._leaving.add(fp)
                raise
        while self._dirty:
            fp = self._dirty.pop()
            m = self.models.get(fp)
            if m is None:
                continue
            rec = Holding(
                self.node_id,
                m.chunks,
                encode_bitmap(m.mine, m.chunks),
                encode_crcs(m.mine, m.chunks),
            )
            blob = _enc.encode(rec)
            if self._written.get(fp) == blob:
                continue  # e.g. a re-join on revalidation: etcd has it already
            try:
                await self._put(f"holdings/{fp}/{self.node_id}", blob)
            except BaseException:
                self._dirty.add(fp)
                raise
            self._written[fp] = blob

    def _apply(self, key: bytes, value: bytes, revision: int, *, deleted: bool) -> None:
        try:
            parts = key[len(self.prefix) :].decode().split("/")
            if parts[0] == "nodes":
                self._apply_node(parts, value, deleted)
            elif parts[0] == "holdings":
                self._apply_holding(parts, value, revision, deleted)
        except (UnicodeDecodeError, msgspec.DecodeError, ProtocolError) as e:
            self._reject(key, str(e))
        self._notify()

    def _apply_node(self, parts: list[str], value: bytes, deleted: bool) -> None:
        if len(parts) != 2 or not parts[1]:
            raise ProtocolError("not nodes/<node>")
        node = parts[1]
        old = self.nodes.pop(node, None)  # deleted, or replaced: a bad record withdraws the old one
        try:
            self._apply_node_record(node, value, deleted)
        finally:
            new = self.nodes.get(node)
            if (old is None) != (new is None) or (old and new and old.capacity != new.capacity):
                self._gen += 1  # owners may have changed
                self._wake_all()

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
            raise ProtocolError("not holdings/<model>/<node>")
        fp, node = parts[1], parts[2]
        if node == self.node_id:
            if deleted and self._written.pop(fp, None) is not None:
                self._dirty.add(fp)  # deleted behind our back: write it again
            return
        if deleted and node in self._lingering:
            return  # its lease expired in an outage: see _linger
        m = self.models.get(fp)
        if m is None:  # not a model we joined (nothing to check it against): kept raw
            self._stash_holding(fp, node, revision, None if deleted else value)
            return
        if revision < m.revs.get(node, 0):
            return  # older than what we applied: a re-read that raced the watch
        m.revs[node] = revision
        prev = m.others.pop(node, None)
        try:
            self._apply_holding_record(m, node, value, deleted)
        finally:
            self._holding_changed(fp, m, node, prev)

    def _apply_holding_record(self, m: _Model, node: str, value: bytes, deleted: bool) -> None:
        if deleted:
            return
        if len(value) > MAX_HOLDING_RECORD:
            raise ProtocolError(f"{len(value)} bytes, more than {MAX_HOLDING_RECORD}")
        rec = _dec_holding.decode(value)
        if rec.node != node:
            raise ProtocolError(f"holding of node {rec.node!r} under another node's key")
        if rec.chunks != m.chunks:  # our own manifest says how many: the bound of the decode
            raise ProtocolError(f"{rec.chunks} chunks, the model has {m.chunks}")
        m.others[node] = (decode_bitmap(rec.held, m.chunks), decode_crcs(rec.crcs, m.chunks))

    def _holding_changed(
        self, fp: str, m: _Model, node: str, prev: tuple[set[int], list[int]] | None
    ) -> None:
        """Wake the fetches waiting for chunks this record newly shows held; all of the
        model's if the node joined or left it (its owners may have changed)."""
        now = m.others.get(node)
        if (prev is None) != (now is None):
            m.gen += 1
            self._wake_model(fp)
            return
        waiting = self._waiters.get(fp)
        if now is None or not waiting:
            return
        held, before = now[0], prev[0] if prev is not None else set()
        for index in [i for i in waiting if i in held and i not in before]:
            self._wake(waiting.pop(index))
        if not waiting:
            del self._waiters[fp]

    def _stash_holding(self, fp: str, node: str, revision: int, value: bytes | None) -> None:
        held = self._stash.setdefault(fp, {})
        old = held.pop(node, None)
        if old is not None:
            self._stash_bytes -= len(fp) + len(node) + len(old[1])
        if value is not None and len(value) <= MAX_HOLDING_RECORD:
            size = len(fp) + len(node) + len(value)
            if self._stash_bytes + size <= STASH_MAX:
                held[node] = (revision, value)
                self._stash_bytes += size
        if not held:
            del self._stash[fp]

    def _reject(self, key: bytes, why: str) -> None:
        self.rejected_records += 1
        short = key[len(self.prefix) : len(self.prefix) + 200]
        if short not in self._logged and len(self._logged) < _LOGGED_KEYS:
            self._logged.add(short)
            log.warning("ignoring directory record %r: %s (logged once per key)", short, why)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- what the fetch scheduler asks ------------------------------------------------------------
    def join(self, fp: str, chunks: int, manifest: Manifest | None = None) -> None:
        """Say we want this model (an empty holding counts as interest in ownership), and
        publish its manifest once for the cluster."""
        existing = self.models.get(fp)
        if existing is None or existing.chunks != chunks:
            self.models[fp] = _Model(chunks)
            # Holdings are decoded only for joined models: those the watch brought are known
            # now (even with etcd out); those published before we connected are read.
            for node, (revision, value) in self._stash.pop(fp, {}).items():
                self._stash_bytes -= len(fp) + len(node) + len(value)
                key = self.prefix + f"holdings/{fp}/{node}".encode()
                self._apply(key, value, revision, deleted=False)
            self._unread.add(fp)
            self._wake_reader.set()
        if manifest is not None and fp not in self._manifests_published:
            self._manifests_pending[fp] = zlib.compress(_enc.encode(manifest), 6)
        self._dirty.add(fp)

    def mark_held(self, fp: str, index: int, crc: int) -> None:
        m = self.models[fp]
        m.mine[index] = crc
        self._dirty.add(fp)

    def leave(self, fp: str) -> None:
        """We hold none of this model and load none of it: delete our holding, so we are no
        longer interested (an owner a new cold load would wait on, a holder to ask)."""
        if self.models.pop(fp, None) is None:
            return
        self._dirty.discard(fp)
        self._leaving.add(fp)
        self._notify()

    def drop(self, fp: str, indexes: list[int]) -> None:
        m = self.models.get(fp)
        if m is not None:
            for i in indexes:
                m.mine.pop(i, None)
            self._dirty.add(fp)

    def anyone_holds(self, fp: str) -> bool:
        m = self.models.get(fp)
        return m is not None and any(
            held for node, (held, _) in m.others.items() if node in self.nodes
        )

    def interested(self, fp: str) -> frozenset[str]:
        """Live nodes (us included) that have registered the model."""
        m = self.models.get(fp)
        others = [n for n in (m.others if m else {}) if n in self.nodes]
        return frozenset([self.node_id, *others])

    def live_peers(self) -> list[NodeInfo]:
        return [n for nid, n in self.nodes.items() if nid != self.node_id]

    def holders(self, fp: str, index: int) -> dict[str, int]:
        """Live nodes (not us) holding the chunk -> the CRC each published for it."""
        m = self.models.get(fp)
        if m is None or not self.view_usable:
            return {}
        return {
            node: crcs[index]
            for node, (held, crcs) in m.others.items()
            if index in held and (node in self.nodes or node in self._lingering)
        }

    def owner(self, fp: str, key: str) -> str:
        """The live, interested node that should fetch ``key`` from origin (us if unsure).
        A chunk's key, ``f"{fp}/{index}"``, is looked up in the model's owner table (as
        ``chunk_owner``); any other key gets plain rendezvous among the same members."""
        m = self.models.get(fp)
        if not self.view_usable or m is None:
            return self.node_id
        index = key[len(fp) + 1 :] if key.startswith(f"{fp}/") else ""
        if index.isdigit() and int(index) < m.chunks:
            return self.chunk_owner(fp, int(index))
        return owner(key, self._members(m)) or self.node_id

    def chunk_owner(self, fp: str, index: int) -> str:
        """The owner of chunk ``index`` (of the model's flat chunk range) in the owner table:
        computed here if not current (``owners_ready`` computes a large one off the loop)."""
        m = self.models.get(fp)
        if not self.view_usable or m is None or not 0 <= index < m.chunks:
            return self.node_id
        stamp = self._stamp(m)
        if m.stamp != stamp:
            members = self._members(m)
            if members != m.members:
                m.table, m.members = owner_table(fp, m.chunks, members), members
            m.stamp = stamp
        return m.table[index] if m.table else self.node_id

    async def owners_ready(self, fp: str) -> bool:
        """Make the model's owner table current, computing a large one in a worker thread
        (one computation for all the fetches that ask). True if it waited for one (the
        directory may have changed meanwhile)."""
        waited = False
        for _ in range(3):  # members that keep changing: chunk_owner computes it inline
            m = self.models.get(fp)
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
                m.table, m.members, m.stamp = owner_table(fp, m.chunks, members), members, stamp
                return waited
            if m.computing is None or m.computing[0] != members:
                loop = asyncio.get_running_loop()
                m.computing = (
                    members,
                    loop.run_in_executor(None, owner_table, fp, m.chunks, members),
                )
            job = m.computing[1]
            table = await asyncio.shield(job)
            waited = True
            if m.computing is not None and m.computing[1] is job:
                m.computing = None
            if self.models.get(fp) is m and m.members != members:
                m.table, m.members, m.stamp = table, members, None  # checked on the next turn
        return waited

    def _stamp(self, m: _Model) -> tuple[int, int, int]:
        return (self._gen, m.gen, self._node_info().capacity)

    def _members(self, m: _Model) -> _Members:
        own = self._node_info().capacity
        members = [(self.node_id, float(own))]
        members += [
            (nid, placement_weight(self.nodes[nid].capacity, own))
            for nid in m.others
            if nid in self.nodes
        ]
        return tuple(sorted(members))

    async def wait_chunk(self, fp: str, index: int, timeout: float) -> bool:
        """Wait until a holding newly shows chunk ``index`` of ``fp`` held, or the model's
        owners or the view may have changed; False on timeout."""
        f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(fp, {}).setdefault(index, []).append(f)
        try:
            await asyncio.wait_for(f, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiting = self._waiters.get(fp, {})
            fs = waiting.get(index, [])
            if f in fs:  # not woken (a wake takes the list away)
                fs.remove(f)
                if not fs:
                    del waiting[index]
                if not waiting:
                    del self._waiters[fp]

    @staticmethod
    def _wake(futures: list[asyncio.Future[None]]) -> None:
        for f in futures:
            if not f.done():
                f.set_result(None)

    def _wake_model(self, fp: str) -> None:
        for futures in self._waiters.pop(fp, {}).values():
            self._wake(futures)

    def _wake_all(self) -> None:
        for fp in list(self._waiters):
            self._wake_model(fp)

    def address(self, node: str) -> str | None:
        info = self.nodes.get(node) or self._lingering.get(node)
        return info.address if info else None

    async def wait_change(self, timeout: float) -> bool:
        """Wait for any directory change; False on timeout."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def min_copies(self, fp: str, start: int, stop: int) -> int:
        """The fewest live copies (us included) of any chunk in ``[start, stop)``: only that
        range is counted, so eviction can ask it for every candidate file cheaply."""
        m = self.models.get(fp)
        if m is None or start >= stop:
            return 0
        holders = [held for node, (held, _) in m.others.items() if node in self.nodes]
        return min((i in m.mine) + sum(i in held for held in holders) for i in range(start, stop))

    def copies(self, fp: str) -> list[int]:
        """How many live nodes (us included) hold each chunk of the model."""
        m = self.models.get(fp)
        if m is None:
            return []
        counts = [0] * m.chunks
        for i in m.mine:
            counts[i] += 1
        for node, (held, _) in m.others.items():
            if node in self.nodes:
                for i in held:
                    counts[i] += 1
        return counts
