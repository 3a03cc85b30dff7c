"""The cluster at the mission's scale, by simulation: 10, 100 and 1,000 nodes, a 700 GB model.

    python bench/scale.py [--nodes 10,100,1000] [--scenarios cold,scale-out] [--model-gb 700]
                          [--files 163] [--origin-gbit 10] [--node-gbit 25] [--kill 0.05]
                          [--workers 4] [--agents N] [--no-etcd] [--quick]

What is real, what is simulated, what is sampled:

* Placement is real: every owner table is ``mows.cluster._placement.table_for`` over the
  version's members (the live nodes filling files of it: idle holders of whole files are not
  members), timed; it is computed again when the members change (a killed node's lease
  expires, ``lease_ttl`` after the kill; a node's fills all end): members only leave once
  the loads start, so each later table is the first one shrunk (``shrunk_table``: a chunk
  stays with a member that stays).
* The fetch-scheduling policy is the daemon's, re-enacted chunk by chunk in simulated time
  (one event loop, heapq): ``ChunkFetcher._from_peers`` as it is (``Sim`` has it turn by
  turn) - a whole-file holder (least in flight, random ties), else the node whose watch
  reported reading the chunk from the origin: a plain request; else, while the chunk's owner
  (not asked yet) says it fills the file, the chunk waits for the owner's report, holding no
  thread: one long-poll watch a (node, owner), answered with the owner's first copies (the
  chunks it read from the origin) as they land; the owner's breaker open (its connection
  failed), a grace (OWNER_GRACE) re-evaluated every second, its lease ending meanwhile and a
  new owner taking the chunk; for a chunk the node came to own since, its previous owner
  if that one holds it; else partial holders' Have (only of nodes holding part of the
  file and not filling it: none here, nobody prefetches shares); else the origin, where a
  read whose turn comes after its chunk moved to another filling node goes back to wait
  for that node (``REDECIDE`` times at most). A load's
  chunk tasks all start when its fills start (after a cold fill's 3 publish intervals):
  plain requests queue on ``4 x peer_connections`` transfer threads (all they carry), each
  free thread taking a uniformly random one (``_RandomOrderExecutor``),
  ``peer_connections`` connections a peer; origin reads FIFO, ``origin_streams(workers,
  members)`` at once (64 over the version's members, at most ``workers`` a node);
  circuit breakers (BREAKER_BASE doubling). The constants and the defaults are imported from
  the daemon, so the simulation follows the code.
* Data moves as timed transfers on links, not bytes: the origin link shared fairly by every
  origin read in flight (processor sharing, exact); each node a full-duplex link, each
  transfer at min(uplink / its transfers, downlink / its transfers), a fluid model stepped
  every ``dt`` (a chunk's time at the node rate) with exact completion times inside a step;
  a fixed latency before each answer (0.5 ms peer, 20 ms origin). Origin reads do not take
  node downlink. The directory's view is etcd's, instant (a write's propagation, ~ms, is not
  modelled) but for a dead node, whose records stand until its lease expires. Why a fluid
  step and not an event per rate change: with ~16,000 transfers in flight at 1,000 nodes,
  each start or end changes the rates of the ~30 others on its two links; re-timing them
  per event is ~1e8 heap operations in Python, the vectorised step (numpy) is ~5e4 steps;
  the ~1e7 chunk deliveries cost ~10 us each. The owner table follows the members at most
  once a simulated second (a real node recomputes it on each change, ~0.2 s at 1,000).
  Not modelled but counted: the peer server's connection cap (MAX_CONNECTIONS): the most
  connections at one server, one per client that asked within IDLE_TIMEOUT (each keeps a
  connection open that long) and one per watch (a connection per (watcher, version,
  server)) running or used within IDLE_TIMEOUT, is reported as an extra check. Every
  TRACE_EVERY simulated seconds the JSON gets a trace of the cluster (its chunks by state,
  transfers, uploading nodes, peer throughput, the origin's reads).
* The directory is real, against a real etcd (Debian's, on loopback, one member): the
  simulated timeline (each node's join and fills, each file's first chunk and completion,
  the kills) is replayed, time-compressed (``--max-compression``, and slower when etcd or
  the agents need it), by EVERY node: a sample of them (``--agents``: 20, or 4 past 100
  nodes, half of them warm in a scale-out) are real ``Cluster`` agents (their own client,
  lease, watch of the whole prefix, publisher, the directory calls a daemon makes, its
  NodeInfo timers compressed alike), the others lightweight writers that write what their
  ``Cluster`` would (the real ``_Model.record`` and msgpack, the same keys, the same lease
  TTL, kept alive in one batched stream, coalesced at the same publish ticks; a file's CRC
  pages by the same put-if-absent transaction unless the first writer's pages reached them;
  NodeInfo by the same INFO_CHECK/INFO_REFRESH rules). A killed node stops without revoking
  its lease. Measured: etcd's own counters before/after (puts, put bytes, db size, gRPC
  bytes), the writes of each kind per load, every key read back with the paged read
  (``get_prefix_paged``) for the largest value, each agent's ``_apply`` time per event, its
  process's CPU per event, its directory state (a deep size of its nodes and models), and
  its owner table against the simulation's. Why not all 1,000 as full agents: each watches
  the whole prefix, so every write reaches every agent (~4e5 events each at 1,000 nodes, x
  1,000 agents) - not on 2 cores; the per-event and per-daemon figures do not depend on how
  many others watch. The lightweight writers' keepalives run in a thread of their own (a
  lease lost all the same is taken again and counted: ``writer_leases_lost``).

Scenarios, for each N: ``cold``: N nodes load at once, nothing cached; ``scale-out``: N warm
nodes hold the model (idle, not members), N/10 new nodes (at least one) load it at once.
In both, 5% of the nodes (at least one; in a scale-out drawn from all, warm or new) are
killed at half the ideal time. Ideal: a lower bound, the model over the narrowest link (the
origin, cold; a new node's downlink, or the warm uplinks, scale-out) plus one chunk's
pipeline (over the origin link, then a node link). Served max/mean is over the nodes that
serve by design: all, cold; the warm ones, scale-out (the new ones start with nothing; the
figure over all live nodes is in the JSON). A simulation stops at ``--max-ratio`` x
ideal (3) or after ``--sim-budget`` wall seconds: a load not done by then is reported not
done. Defaults: 700 GB in 163 files (a DeepSeek-V3 checkpoint's count), the daemon's chunk
size for it (64 MiB), origin 10 Gbit/s, nodes 25 Gbit/s. ``--quick``: 10 nodes, 2 GB in 8
files, stopped at 20 x ideal at the earliest (its ideal is shorter than a lease). Prints a
table and the targets at the largest N; writes bench/results/scale.json (scale-quick.json).
"""

from __future__ import annotations

import argparse
import array
import heapq
import inspect
import math
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import table, write_json  # noqa: E402

from mows._config import DaemonConfig  # noqa: E402
from mows._crc import combine_chunks  # noqa: E402
from mows.cluster import Cluster  # noqa: E402
from mows.cluster._placement import Base, is_subset, table_for  # noqa: E402
from mows.daemon._fetcher import (  # noqa: E402
    BREAKER_BASE,
    BREAKER_MAX,
    OWNER_GRACE,
    OWNER_RETRIES,
    REDECIDE,
    WAIT_MAX,
    origin_streams,
)
from mows.manifest import FileEntry, Manifest, chunk_count, version_id  # noqa: E402
from mows.manifest._model import choose_chunk_size  # noqa: E402
from mows.transport._tcp import IDLE_TIMEOUT, MAX_CONNECTIONS  # noqa: E402

INF = float("inf")
GB = 10**9
_DEFAULTS = DaemonConfig(max_memory=1 << 30)
LATER_TABLES = 40  # tables after members left that the real agents' tables are checked against
PUBLISH_INTERVAL: float = inspect.signature(Cluster.__init__).parameters["publish_interval"].default


# -- the model --------------------------------------------------------------------------------
@dataclass
class Model:
    manifest: Manifest
    vid: str
    sizes: list[int]  # chunk sizes, flat
    file_of: list[int]  # flat chunk -> file
    first: list[int]  # file -> its first flat chunk
    counts: list[int]  # file -> its chunk count
    crcs: list[list[int]]  # file -> its chunks' CRC-32s (random, combining to the file's)

    @property
    def total(self) -> int:
        return self.manifest.total_bytes

    @property
    def chunks(self) -> int:
        return len(self.sizes)


def make_model(total: int, files: int, seed: int = 0) -> Model:
    """A model of ``total`` bytes in ``files`` equal files (the last takes the remainder),
    its chunk size chosen as the daemon chooses it, random chunk CRCs that combine to each
    file's CRC-32 (what the directory's CRC pages are checked against)."""
    rng = random.Random(seed)
    chunk = choose_chunk_size(total)
    each = total // files
    entries: list[FileEntry] = []
    sizes: list[int] = []
    file_of: list[int] = []
    first: list[int] = []
    counts: list[int] = []
    crcs: list[list[int]] = []
    for f in range(files):
        size = each if f < files - 1 else total - each * (files - 1)
        n = chunk_count(size, chunk)
        lengths = [min(chunk, size - i * chunk) for i in range(n)]
        cs = [rng.getrandbits(32) for _ in range(n)]
        name = f"model-{f + 1:05d}-of-{files:05d}.safetensors"
        entries.append(
            FileEntry(name, size, 0, crc32=combine_chunks(zip(cs, lengths, strict=True)))
        )
        first.append(len(sizes))
        counts.append(n)
        crcs.append(cs)
        sizes += lengths
        file_of += [f] * n
    manifest = Manifest("sim://model", chunk, tuple(entries))
    return Model(manifest, version_id(manifest), sizes, file_of, first, counts, crcs)


def node_name(i: int) -> str:
    return f"n{i:05d}.sim:7070"  # a node id is its HOST:PORT address, as the daemon's


# -- the data plane, simulated ------------------------------------------------------------------
@dataclass
class SimParams:
    nodes: int  # the cluster's size N: cold, N load at once; scale-out, N warm + N/10 new
    scenario: str  # "cold" | "scale-out"
    origin_bps: float  # bytes/s, shared fairly by every origin read in flight
    node_bps: float  # bytes/s each way, shared fairly by the transfers on each end
    kill_fraction: float = 0.05
    kill_at: float = 0.5  # the kills happen at this fraction of the ideal load time
    peer_latency: float = 0.0005  # seconds before a peer's answer (or its bytes) start
    origin_latency: float = 0.02  # seconds before an origin read's bytes start
    dt: float = 0.0  # step of the fluid model, seconds (0: one chunk's time at node rate)
    max_ratio: float = 3.0  # stop at this multiple of the ideal time (a FAIL anyway)
    budget: float = 600.0  # wall seconds: stop simulating past them (a FAIL anyway)
    seed: int = 1
    # The daemon's own settings and constants (DaemonConfig's defaults, the fetcher's).
    workers: int = _DEFAULTS.workers
    peer_threads: int = 4 * _DEFAULTS.peer_connections
    connections: int = _DEFAULTS.peer_connections
    ttl: float = float(_DEFAULTS.lease_ttl)
    publish_interval: float = PUBLISH_INTERVAL


(
    E_ORIGIN,
    E_MISS,
    E_FAIL,
    E_KILL,
    E_LEASE,
    E_START,
    E_SAMPLE,
    E_DECIDE,
    E_REPORT,
    E_WATCH,
    E_WFAIL,
    E_TABLE,
) = range(12)
# A chunk's fetch at a loading node (Sim.ST): its state.
NEW, DEFER, ASKING, READING, HELD, WAITING, GRACE = range(-1, -8, -1)
STATES = {
    "deciding": NEW,
    "waiting_for_table": DEFER,
    "asking": ASKING,  # a plain request queued or in flight
    "origin": READING,  # an origin read queued or in flight
    "held": HELD,
    "waiting": WAITING,  # for a report (3a)
    "grace": GRACE,  # its owner's breaker open (3b)
}


class OriginPS:
    """The origin link, processor-shared: every read in flight gets rate / reads (exact:
    virtual time advances at rate / reads; a read ends when it has had its size)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.v = 0.0  # virtual time: bytes each read in flight has had since v = 0
        self.t = 0.0
        self.n = 0
        self.heap: list[tuple[float, int, int, int]] = []  # (virtual end, seq, node, chunk)
        self.seq = 0
        self.dead: set[int] = set()
        self.active: Counter[int] = Counter()
        self.busy = 0.0  # seconds with at least one read in flight

    def _advance(self, t: float) -> None:
        if self.n:
            self.v += (t - self.t) * self.rate / self.n
            self.busy += t - self.t
        self.t = t

    def add(self, t: float, node: int, c: int, size: int) -> None:
        self._advance(t)
        self.seq += 1
        heapq.heappush(self.heap, (self.v + size, self.seq, node, c))
        self.n += 1
        self.active[node] += 1

    def next_time(self) -> float:
        heap = self.heap
        while heap and heap[0][2] in self.dead:
            heapq.heappop(heap)
        if not heap:
            return INF
        return self.t + (heap[0][0] - self.v) * self.n / self.rate

    def pop(self, t: float) -> tuple[int, int]:
        self._advance(t)
        _, _, node, c = heapq.heappop(self.heap)
        self.n -= 1
        self.active[node] -= 1
        return node, c

    def kill(self, t: float, node: int) -> None:
        self._advance(t)
        self.n -= self.active.pop(node, 0)
        self.dead.add(node)


@dataclass
class SimResult:
    params: SimParams
    total_nodes: int
    loaders: list[int]
    killed: list[int]
    t0: float
    ideal: float
    done: list[float]  # per node: when its load ended (INF: not ended)
    origin_bytes: list[int]
    peer_bytes: list[int]
    served: list[int]
    timeline: list[tuple[float, int, str, int]]  # (t, node, op, file): b p c e k
    active: list[tuple[float, float]]  # per node: its counters change within (first, last)
    table_seconds: list[float]  # real owner_table computations (initial, after each expiry)
    first_members: list[str]  # the owner table's members when the loads began, and the table
    first_table: list[str]
    # the tables computed after members left (shrunk from the first), by their members
    later_tables: dict[tuple[str, ...], list[str]]
    peak_clients: int  # most distinct clients (askers or watchers) at one server
    peak_connections: int  # most connections at one server: askers' + watches (see Sim)
    counters: dict[str, int] = field(default_factory=dict)
    trace: list[dict[str, float]] = field(default_factory=list)  # every TRACE_EVERY s
    wall_s: float = 0.0
    sim_end: float = 0.0
    stopped: bool = False  # at max_ratio x ideal, loads still running


TRACE_EVERY = 10.0  # simulated seconds between two samples of the cluster's state (the trace)


def _was_asked(a1: int, ax: set[int] | None, h: int) -> bool:
    return a1 == h or (ax is not None and h in ax)


class Sim:
    """Every node's chunk fetches, as the daemon runs them, in simulated time.

    Per node: the load's chunk tasks, all started when the fill starts, each running the
    fetcher's ``_from_peers`` loop for its chunk c of file f (``asked``: the nodes this chunk
    asked already), each turn in this order:

    1. a whole-file holder of f, not asked, breaker closed: the least in flight (random
       ties); else the node whose watch reported reading c from the origin (its first copy;
       the latest report), not asked, breaker closed: a plain request, the node then asked;
    2. (the owner table made current first: ``owners_ready``) o = chunk_owner(c); if o is not
       this node and not asked, and its record says it fills f (loading f, in view: a dead
       node's record stands until its lease expires): (a) o's breaker closed: c waits for
       o's report, holding no thread (``_await_report``: c is registered on o, a watch of o
       started if this node has none running; at most WAIT_MAX, then a new turn); (b) o's
       breaker open: a new turn in 1 s, for at most the grace (OWNER_GRACE, 2 x lease_ttl at
       least) from the first turn in a row that found it open; then on to 3. An owner asked
       already (it reported c and was asked for it) whose breaker is open (the request
       failed: it died) is waited for alike, (b); one whose breaker is closed (it answered
       "not held", or its breaker closed again) is passed over: 3;
    3. partial holders' Have (only nodes holding part of f and not filling it: none here);
       else the origin.

    The watches (``_watch``): one a (node, owner) while chunks here are registered on that
    owner (a chunk stays registered until its fetch ends: a woken chunk queued for a transfer
    keeps it); each poll is answered with the owner's first copies (the chunks it read from
    the origin: its log) past the watcher's position, as soon as there is one; a new watch
    gets the whole log. A report sets the chunk's reporter and wakes it, if the chunk is
    registered here (on whichever owner). A watch whose poll fails (its owner died) trips
    the owner's breaker and wakes every chunk waiting on it, then ends; the next chunk to wait
    on that owner starts it again (failing again, tripping the breaker again, while the
    owner is dead).
    Plain requests queue on ``4 x peer_connections`` transfer threads, each free thread
    taking a uniformly random queued one (``_RandomOrderExecutor``),
    ``peer_connections`` connections a peer (a request waiting for one holds its thread), and
    are all the threads carry; origin reads queue FIFO, ``origin_streams`` at once.
    Breakers: BREAKER_BASE doubling to BREAKER_MAX.

    Time: a report reaches the watchers one peer latency after the chunk landed; a watch's
    first answer (or failure) one latency after it starts; a request to a dead node fails in
    one latency. Re-evaluation: the daemon's waiting chunk takes a new turn every WAIT_MAX;
    here only where the outcome can change: a report or a failed watch (at once); the owner
    table changing (computed at most once a simulated second, the turns needing the owners
    meanwhile waiting for it, as ``owners_ready`` does): chunks waiting on an owner that is
    not theirs now take a turn at now + uniform(0, WAIT_MAX); f's first whole-file holder
    appearing: f's waiting chunks likewise.

    Links: the origin processor-shared among its reads (exact); each node's link full duplex,
    each transfer at min(up / transfers up, down / transfers down), a fluid model stepped
    every ``dt`` with exact completion times within a step.

    Memory, at 1,000 nodes x ~10,400 chunks: per (node, chunk) four int32 (its state, the
    owner it is registered on, its reporter, the first node it asked) and a float64 (when it
    landed), flat arrays with numpy views for the scans (a report's watchers, a kill's
    waiters, a new table's); per (node, owner) its registered chunks and its watch."""

    def __init__(self, p: SimParams, model: Model) -> None:
        self.p = p
        self.m = model
        self.rng = random.Random(p.seed)
        self.nrng = np.random.default_rng(p.seed)
        random.seed(p.seed)
        N = p.nodes
        if p.scenario == "cold":
            self.warm = []
            self.loaders = list(range(N))
        else:
            self.warm = list(range(N))
            self.loaders = list(range(N, N + max(1, N // 10)))
        self.total = T = len(self.warm) + len(self.loaders)
        self.names = [node_name(i) for i in range(T)]
        self.index = {n: i for i, n in enumerate(self.names)}
        C = self.C = model.chunks
        self.P = p.peer_threads
        self.dt = p.dt or model.manifest.chunk_size / p.node_bps
        self.grace = max(OWNER_GRACE, 2 * p.ttl)
        # the view (etcd's, as every node sees it: propagation not modelled)
        self.alive = bytearray([1]) * T
        self.inview = bytearray([1]) * T
        self.loading = bytearray(T)
        nf = len(model.counts)
        self.holders: list[set[int]] = [set(self.warm) for _ in range(nf)]
        # per (node, chunk), at node x C + chunk: flat arrays, and numpy views of them
        self.ST = array.array("i", [HELD]) * (T * C)  # the chunk's fetch: its state
        self.REG = array.array("i", [-1]) * (T * C)  # the owner it is registered on
        self.REP = array.array("i", [-1]) * (T * C)  # the node that reported it
        self.ASK = array.array("i", [-1]) * (T * C)  # the first node it asked
        self.LANDED = array.array("d", [0.0]) * (T * C)  # when it landed there
        self.st2 = np.frombuffer(self.ST, dtype=np.int32).reshape(T, C)
        self.reg2 = np.frombuffer(self.REG, dtype=np.int32).reshape(T, C)
        landed2 = np.frombuffer(self.LANDED, dtype=np.float64).reshape(T, C)
        self.st2[self.loaders] = NEW
        landed2[self.loaders] = INF
        self.askedx: dict[int, set[int]] = {}  # node x C + chunk -> the others it asked
        self.gsince: dict[int, float] = {}  # ... -> the first turn in a row its owner failed
        self.reasked: dict[int, int] = {}  # ... -> owners asked again after they failed
        # per (node, owner), at node x T + owner: chunks registered, the watch (1 running,
        # 2 ending: nothing registered, its last poll out until a report or wend)
        self.WC = array.array("i", [0]) * (T * T)
        self.WT = bytearray(T * T)
        self.wc2 = np.frombuffer(self.WC, dtype=np.int32).reshape(T, T)
        self.wt2 = np.frombuffer(self.WT, dtype=np.uint8).reshape(T, T)
        self.wend: dict[int, float] = {}
        self.wclosed: list[dict[int, float]] = [{} for _ in range(T)]  # watcher -> last used
        self.log: list[list[int]] = [[] for _ in range(T)]  # each node's first copies
        self.logged: list[set[int]] = [set() for _ in range(T)]  # (and owned copies)
        self.file_left: list[list[int]] = [[] for _ in range(T)]
        self.remaining = [0] * T
        self.done = [INF] * T
        self.origin_bytes = [0] * T
        self.peer_bytes = [0] * T
        self.served = [0] * T
        self.last_active = [0.0] * T  # the last transfer it took part in
        self.timeline: list[tuple[float, int, str, int]] = []
        # per node: the fetcher's pools
        self.pq: list[list[int]] = [[] for _ in range(T)]  # chunk << 16 | peer: random order
        self.oq: list[deque[int]] = [deque() for _ in range(T)]
        self.obusy = [0] * T  # origin reads running, at most origin_streams()
        self.free: list[list[int]] = [list(range(n * self.P, (n + 1) * self.P)) for n in range(T)]
        self.inflight: list[dict[int, int]] = [{} for _ in range(T)]
        self.pick_heap: list[list[tuple[int, float, int]] | None] = [None] * T
        self.breakers: list[dict[int, list[float]]] = [{} for _ in range(T)]
        self.conns: list[dict[int, int]] = [{} for _ in range(T)]
        self.connwait: list[dict[int, deque[int]]] = [{} for _ in range(T)]
        self.clients: list[dict[int, float]] = [{} for _ in range(T)]  # client -> last ask
        self.peak_clients = 0
        self.peak_connections = 0
        # threads (tid = node x P + k) and their transfers (the fluid model's arrays)
        NT = T * self.P
        self.titem: list[int] = [-1] * NT
        self.f_active = np.zeros(NT, dtype=bool)
        self.f_rem = np.zeros(NT)
        self.f_from = np.zeros(NT)
        self.f_src = np.zeros(NT, dtype=np.int64)
        self.f_dst = np.arange(NT, dtype=np.int64) // self.P
        self.f_serial = [0] * NT
        self.origin = OriginPS(p.origin_bps)
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.counters: Counter[str] = Counter()
        self.trace: list[dict[str, float]] = []
        self.t0 = 0.0
        self.table_seconds: list[float] = []
        self.table_dirty = False  # the members changed since the table was computed
        self.table_at = -INF
        self.table_due = INF  # when the next computation is scheduled
        self.table: list[int] = []
        # node x C + chunk -> the owner when its origin read was queued; times it went back
        self.odecided: dict[int, int] = {}
        self.redecided: dict[int, int] = {}
        # chunk -> its owner before the last table change that moved it (Cluster.previous_owner)
        self.prev_owner: dict[int, int] = {}
        self.first_table: list[str] = []
        self.members: list[str] = []
        self.since: list[tuple[str, float]] | None = None  # Cluster._since
        self.later_tables: dict[tuple[str, ...], list[str]] = {}
        self.base: Base | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    def push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def compute_table(self, now: float) -> None:
        """The version's owner table, by the real ``table_for``, over its members (the live
        nodes whose record says they fill files of it; idle whole-file holders are not):
        what every node computes, timed. Members only leave once the loads start: the
        table is the first one's, shrunk (``shrunk_table``)."""
        self.members = [
            self.names[i] for i in range(self.total) if self.inview[i] and self.loading[i]
        ]
        self.table_dirty, self.table_at, self.table_due = False, now, INF
        started = time.perf_counter()
        members = [(n, 1.0) for n in self.members]
        if self.since is None or not is_subset(members, self.since):
            self.since = members
        names, self.base = table_for(self.m.vid, self.C, members, self.since, self.base)
        if self.first_table and len(self.later_tables) < LATER_TABLES:
            self.later_tables[tuple(sorted(self.members))] = names
        self.table_seconds.append(time.perf_counter() - started)
        index = self.index
        self.table = [index[n] for n in names]

    def members_changed(self, now: float) -> None:
        """A lease expired or a node's fills ended: the table is computed again (at most once
        a simulated second; every node recomputes it on each change, ~0.2 s at 1,000)."""
        self.table_dirty = True
        if self.table_due == INF:
            self.table_due = max(now, self.table_at + 1.0)
            self.push(self.table_due, E_TABLE)

    def update_table(self, now: float) -> None:
        """The new table. Chunks waiting on an owner that is not theirs now take a turn
        within WAIT_MAX (those in a grace have theirs within a second)."""
        old = self.table
        self.compute_table(now)
        new = self.table
        if not old or not new:
            return
        changed = np.flatnonzero(np.asarray(old) != np.asarray(new))
        if not changed.size:
            return
        for c in changed.tolist():
            self.prev_owner[c] = old[c]
        # Peering.owners_changed: a new owner announces the chunks it holds already (got
        # from a peer, e.g. from the dead owner before it died)
        C, alive, LANDED = self.C, self.alive, self.LANDED
        for c in changed.tolist():
            o = new[c]
            if alive[o] and LANDED[o * C + c] <= now and c not in self.logged[o]:
                self.announce(o, c, now)
                self.counters["owned copies announced: owner changed"] += 1
        waiting = self.st2[:, changed] == WAITING
        cols = np.flatnonzero(waiting.any(axis=0))
        C, T, WT, REG = self.C, self.total, self.WT, self.REG
        for k in cols.tolist():
            c = int(changed[k])
            for n in np.flatnonzero(waiting[:, k]).tolist():
                o = REG[n * C + c]
                if o != new[c] and WT[n * T + o]:
                    self.push(now + self.rng.uniform(0, WAIT_MAX), E_DECIDE, n, c)
                    self.counters["turns: owner changed"] += 1

    def inc(self, n: int, h: int, d: int) -> None:
        inf = self.inflight[n]
        k = inf.get(h, 0) + d
        inf[h] = k
        heap = self.pick_heap[n]
        if heap is not None:
            heapq.heappush(heap, (k, random.random(), h))

    def closed(self, n: int, h: int, now: float) -> bool:
        b = self.breakers[n].get(h)
        return b is None or b[1] <= now

    def trip(self, n: int, h: int, now: float) -> None:
        b = self.breakers[n].setdefault(h, [0, 0.0])
        b[0] += 1
        b[1] = max(b[1], now + min(BREAKER_MAX, BREAKER_BASE * 2 ** (b[0] - 1)))
        self.counters["breaker trips"] += 1

    # -- the policy: ChunkFetcher._from_peers --------------------------------------------------
    def decide(self, n: int, c: int, now: float) -> None:
        """One turn of _from_peers for chunk c at node n (new, woken, its wait or grace
        over, its request failed)."""
        C = self.C
        i = n * C + c
        f = self.m.file_of[c]
        ASK, ST = self.ASK, self.ST
        while True:
            a1, ax = ASK[i], self.askedx.get(i)
            # 1. a whole-file holder, least in flight; else the node that reported it
            H = self.holders[f]
            h = self.pick_holder(n, H, a1, ax, now) if H else -1
            kind = "asked a holder"
            if h < 0:
                x = self.REP[i]
                if x >= 0 and not _was_asked(a1, ax, x) and self.closed(n, x, now):
                    h, kind = x, "asked a reporter"
            if h < 0:
                break
            self.ask(i, h)
            if not self.inview[h]:  # _from_peer: no address (its record went): tripped
                self.trip(n, h, now)
                continue
            self.counters[kind] += 1
            ST[i] = ASKING
            self.inc(n, h, 1)
            self.pq[n].append(c << 16 | h)
            self.pump(n, now)
            return
        # owners_ready(): a table older than the members is computed again first
        if self.table_dirty:
            if now < self.table_at + 1.0:
                ST[i] = DEFER
                self.push(self.table_at + 1.0, E_DECIDE, n, c)
                self.counters["turns waiting for the owner table"] += 1
                return
            self.update_table(now)
        # 2. the owner, while its record says it fills f (wait_for_owner: a load's fetch)
        o = self.table[c] if self.table else n  # chunk_owner: us, if no table
        asked = o != n and _was_asked(ASK[i], self.askedx.get(i), o)
        # asked already and failed (breaker open): waited for in the grace, as in (b); its
        # breaker closed again after it failed: waited for again, OWNER_RETRIES times at most
        failed = asked and not self.closed(n, o, now)
        if asked and not failed and i in self.gsince and self.reasked.get(i, 0) < OWNER_RETRIES:
            self.reasked[i] = self.reasked.get(i, 0) + 1
            self.unask(i, o)
            asked = False
            self.counters["owners asked again after they failed"] += 1
        if o != n and (not asked or failed):
            if self.inview[o] and self.loading[o] and self.file_left[o][f] > 0:
                if not failed and self.closed(n, o, now):
                    self.gsince.pop(i, None)
                    self.await_report(n, c, i, o, now)
                    return
                since = self.gsince.setdefault(i, now)
                if now - since < self.grace:
                    if ST[i] != GRACE:
                        self.counters["grace waits"] += 1
                        if failed:
                            self.counters["grace waits: owner asked, failed"] += 1
                    ST[i] = GRACE
                    self.push(now + 1.0, E_DECIDE, n, c)
                    return
                self.counters["origin reads: grace over"] += 1
        elif asked:
            self.counters["origin reads: owner asked already"] += 1
        # 3. a chunk that came to be ours: its previous owner may have read it already
        # (_previous_owner; a node without it answers "missing" at once: asked only if it has it)
        if o == n:
            p = self.prev_owner.get(c, -1)
            if (
                p >= 0
                and p != n
                and self.alive[p]
                and self.inview[p]
                and self.LANDED[p * C + c] <= now
                and not _was_asked(ASK[i], self.askedx.get(i), p)
                and self.closed(n, p, now)
            ):
                self.ask(i, p)
                self.counters["asked the previous owner"] += 1
                ST[i] = ASKING
                self.inc(n, p, 1)
                self.pq[n].append(c << 16 | p)
                self.pump(n, now)
                return
        # 4. _partial_holder(): Have is asked only of nodes holding part of the file and not
        # filling it (a share prefetch's): none here. Else the origin.
        self.finish(n, c, i, now)
        ST[i] = READING
        self.counters["origin reads"] += 1
        self.odecided[i] = o
        self.oq[n].append(c)
        self.pump_origin(n, now)

    def await_report(self, n: int, c: int, i: int, o: int, now: float) -> None:
        """_await_report: c registered on o (a watch of o started unless one is running: a
        failed one is started again), waiting for a report, at most WAIT_MAX."""
        T = self.total
        r = self.REG[i]
        if r >= 0 and r != o:  # its owner changed
            self.unregister(n, i, r, now)
            r = -1
        j = n * T + o
        if r < 0:
            self.REG[i] = o
            self.WC[j] += 1
        if self.WT[j] and c in self.logged[o]:  # its running watch reported c already
            self.REP[i] = o
            self.ST[i] = WAITING
            self.push(now, E_DECIDE, n, c)
            self.counters["reported before it waited"] += 1
            return
        if self.WT[j] == 0:  # no watch running (none yet, or it failed): one starts
            self.wclosed[o].pop(n, None)
            self.counters["watches started"] += 1
            kind = E_WATCH if self.alive[o] else E_WFAIL
            self.push(now + self.p.peer_latency, kind, n, o)
        self.WT[j] = 1  # an ending one goes on
        if self.ST[i] != WAITING:
            self.counters["watch waits"] += 1
        self.ST[i] = WAITING

    def unregister(self, n: int, i: int, o: int, now: float) -> None:
        self.REG[i] = -1
        j = n * self.total + o
        k = self.WC[j] - 1
        self.WC[j] = k
        if k == 0 and self.WT[j]:  # the watch ends after its current poll
            self.WT[j] = 2
            self.wend[j] = now + WAIT_MAX
            self.wclosed[o][n] = now + WAIT_MAX

    def finish(self, n: int, c: int, i: int, now: float) -> None:
        """_from_peers returns (the chunk, or None: the origin): its registration ends."""
        r = self.REG[i]
        if r >= 0:
            self.unregister(n, i, r, now)
        self.REP[i] = -1
        if self.gsince:
            self.gsince.pop(i, None)
        if self.reasked:
            self.reasked.pop(i, None)

    def ask(self, i: int, h: int) -> None:
        a1 = self.ASK[i]
        if a1 < 0:
            self.ASK[i] = h
        elif a1 != h:
            self.askedx.setdefault(i, set()).add(h)

    def unask(self, i: int, h: int) -> None:
        if self.ASK[i] == h:
            self.ASK[i] = -1
        else:
            self.askedx.get(i, set()).discard(h)

    def deliver(self, n: int, c: int, x: int, now: float) -> None:
        """x's watch at n reports c: its reporter, and a turn if it waits."""
        i = n * self.C + c
        if self.REG[i] < 0:  # not registered here (no _Wait): ignored
            return
        self.REP[i] = x
        self.counters["reports"] += 1
        if self.ST[i] == WAITING:
            self.ST[i] = NEW
            self.counters["waiters woken"] += 1
            self.decide(n, c, now)

    def report(self, c: int, x: int, now: float) -> None:
        """x read c from the origin: every watch of x is answered."""
        if not self.alive[x]:
            return  # dead before it answered: its watchers saw the watch fail instead
        T, WT = self.total, self.WT
        col = self.wt2[:, x]
        ending = np.flatnonzero(col == 2).tolist()
        watching = np.flatnonzero((col > 0) & (self.reg2[:, c] >= 0)).tolist()
        for n in ending:  # an ending watch's last poll: answered, then it ends
            j = n * T + x
            WT[j] = 0
            self.wclosed[x][n] = now
            if self.wend.pop(j, INF) < now:
                watching = [m for m in watching if m != n]  # over before: answered nothing
        alive = self.alive
        for n in watching:
            if alive[n]:
                self.deliver(n, c, x, now)

    def watch_started(self, n: int, o: int, now: float) -> None:
        """A new watch's first answer: o's whole log."""
        if not self.WT[n * self.total + o] or not self.alive[n]:
            return
        for c in self.log[o]:
            self.deliver(n, c, o, now)

    def watch_failed(self, n: int, o: int, now: float) -> None:
        """n's watch of o failed (o is dead): o's breaker trips at n, and every chunk waiting
        on o there takes a turn; the watch ends."""
        j = n * self.total + o
        if not self.WT[j] or not self.alive[n]:
            return
        self.WT[j] = 0
        self.wclosed[o][n] = now
        self.trip(n, o, now)
        self.counters["watches failed"] += 1
        C = self.C
        ST = self.ST
        row = np.flatnonzero((self.reg2[n] == o) & (self.st2[n] == WAITING)).tolist()
        for c in row:
            if ST[n * C + c] == WAITING:
                ST[n * C + c] = NEW
                self.decide(n, c, now)

    def holders_appeared(self, f: int, now: float) -> None:
        """f's first whole-file holder: f's chunks waiting take a turn within WAIT_MAX (those
        in a grace have theirs within a second)."""
        lo = self.m.first[f]
        hi = lo + self.m.counts[f]
        ns, cs = np.nonzero(self.st2[:, lo:hi] == WAITING)
        C, T, REG, WT = self.C, self.total, self.REG, self.WT
        for n, k in zip(ns.tolist(), cs.tolist(), strict=True):
            c = lo + k
            if WT[n * T + REG[n * C + c]]:
                self.push(now + self.rng.uniform(0, WAIT_MAX), E_DECIDE, n, c)
                self.counters["turns: a holder appeared"] += 1

    def pick_holder(self, n: int, H: set[int], a1: int, ax: set[int] | None, now: float) -> int:
        """min(holders, key=(in flight, random)) over holders not asked, breaker closed."""
        inf = self.inflight[n]
        br = self.breakers[n]
        if len(H) <= 64:
            best, ties = 1 << 60, []
            for h in H:
                if h == n or _was_asked(a1, ax, h):
                    continue
                b = br.get(h)
                if b is not None and b[1] > now:
                    continue
                k = inf.get(h, 0)
                if k < best:
                    best, ties = k, [h]
                elif k == best:
                    ties.append(h)
            return random.choice(ties) if ties else -1
        heap = self.pick_heap[n]
        if heap is None:  # every node, by (in flight, random): kept current by inc()
            heap = [(inf.get(h, 0), random.random(), h) for h in range(self.total) if h != n]
            heapq.heapify(heap)
            self.pick_heap[n] = heap
        aside = []
        found = -1
        inview = self.inview
        while heap:
            k, _, h = heap[0]
            if k != inf.get(h, 0) or not inview[h]:
                heapq.heappop(heap)  # stale
                continue
            b = br.get(h)
            if h not in H or _was_asked(a1, ax, h) or (b is not None and b[1] > now):
                aside.append(heapq.heappop(heap))
                continue
            found = h
            break
        for e in aside:
            heapq.heappush(heap, e)
        return found

    # -- pools, connections, requests ----------------------------------------------------------
    def pump(self, n: int, now: float) -> None:
        """The node's transfer threads take plain requests (chunk << 16 | peer), a uniformly
        random one each time (``_RandomOrderExecutor``: swap with the last, pop)."""
        free = self.free[n]
        q = self.pq[n]
        cn = self.conns[n]
        cap = self.p.connections
        titem = self.titem
        rand = random.random
        while free and q:
            k = int(rand() * len(q))
            item = q[k]
            q[k] = q[-1]
            q.pop()
            tid = free.pop()
            titem[tid] = item
            target = item & 0xFFFF
            k = cn.get(target, 0)
            if k >= cap:  # TcpPeerClient._acquire blocks, holding the thread
                self.connwait[n].setdefault(target, deque()).append(tid)
                continue
            cn[target] = k + 1
            c = item >> 16
            if self.alive[target] and self.LANDED[target * self.C + c] <= now:
                self.clients[target][n] = now
                self.start_flow(tid, target, c, now)  # the common case, inline
            else:
                self.go(tid, now)

    def go(self, tid: int, now: float) -> None:
        """The request is on the wire (a connection held)."""
        item = self.titem[tid]
        c, target = item >> 16, item & 0xFFFF
        lat = self.p.peer_latency
        if not self.alive[target]:
            self.push(now + lat, E_FAIL, tid)
            return
        self.clients[target][tid // self.P] = now
        if self.LANDED[target * self.C + c] <= now:
            self.start_flow(tid, target, c, now)
            return
        self.push(now + lat, E_MISS, tid)  # it does not hold c: no fault of the peer's

    def sample_clients(self, now: float) -> None:
        """Connections at a sample of servers: one per client that asked within IDLE_TIMEOUT
        (a client keeps its idle connections; the server closes them after IDLE_TIMEOUT), at
        least, and one per watch (a watch connection per (watcher, version, server)) running
        or last used within IDLE_TIMEOUT."""
        alive = self.alive
        for s in random.sample(range(self.total), min(self.total, 32)):
            seen = self.clients[s]
            for c in [c for c, t in seen.items() if t < now - IDLE_TIMEOUT]:
                del seen[c]
            closed = self.wclosed[s]
            for c in [c for c, t in closed.items() if t < now - IDLE_TIMEOUT]:
                del closed[c]
            watchers = {n for n in np.flatnonzero(self.wt2[:, s]).tolist() if alive[n]}
            watchers.update(closed)
            self.peak_clients = max(self.peak_clients, len(watchers | seen.keys()))
            self.peak_connections = max(self.peak_connections, len(seen) + len(watchers))

    def sample_trace(self, now: float) -> None:
        """The cluster's state now (every TRACE_EVERY simulated seconds, into the JSON):
        where the loading nodes' time goes."""
        self.origin._advance(now)
        idx = np.flatnonzero(self.f_active)
        loaders = [n for n in self.loaders if self.alive[n] and self.remaining[n] > 0]
        up = np.bincount(self.f_src[idx], minlength=self.total)
        down = np.bincount(self.f_dst[idx], minlength=self.total)
        st = self.st2[loaders] if loaders else self.st2[:0]
        counts = {k: int(np.count_nonzero(st == v)) for k, v in STATES.items()}
        rate = self.p.node_bps / np.maximum(up[self.f_src[idx]], down[self.f_dst[idx]])
        self.trace.append(
            {
                "t": now - self.t0,
                "loading": len(loaders),
                "held_mean": counts["held"] / max(1, len(loaders)),
                **{f"chunks_{k}": v for k, v in counts.items() if k != "held"},
                "transfers": int(idx.size),
                "uploading_nodes": int(np.count_nonzero(up)),
                "uploads_max": int(up.max()) if idx.size else 0,
                "downloading_nodes": int(np.count_nonzero(down)),
                "peer_gbit_s": float(rate.sum()) * 8e-9,
                "origin_reads": self.origin.n,
                "origin_busy_s": self.origin.busy,
                "queued_requests": sum(len(self.pq[n]) for n in loaders),
                "first_copies": sum(len(x) for x in self.log),
            }
        )

    def release(self, tid: int, now: float) -> None:
        n = tid // self.P
        target = self.titem[tid] & 0xFFFF
        self.titem[tid] = -1
        cn = self.conns[n]
        cn[target] -= 1
        cw = self.connwait[n]
        wq = cw.get(target) if cw else None
        if wq:
            t2 = wq.popleft()
            cn[target] += 1
            self.go(t2, now)
        self.free[n].append(tid)
        self.pump(n, now)

    def start_flow(self, tid: int, src: int, c: int, now: float) -> None:
        self.f_active[tid] = True
        self.f_rem[tid] = self.m.sizes[c]
        self.f_from[tid] = now + self.p.peer_latency
        self.f_src[tid] = src
        self.f_serial[tid] += 1

    def pump_origin(self, n: int, now: float) -> None:
        q = self.oq[n]
        limit = origin_streams(self.p.workers, len(self.members))
        while self.obusy[n] < limit and q:
            c = q.popleft()
            i = n * self.C + c
            decided = self.odecided.pop(i, -1)
            # obtain(): its turn come, a chunk whose owner changed meanwhile to a node that
            # fills its file goes back to wait for it (_moved_to), REDECIDE times at most
            o = self.table[c] if self.table else n
            if (
                o not in (n, decided)
                and self.redecided.get(i, 0) < REDECIDE
                and self.inview[o]
                and self.loading[o]
                and self.file_left[o][self.m.file_of[c]] > 0
                and self.closed(n, o, now)
            ):
                self.redecided[i] = self.redecided.get(i, 0) + 1
                self.counters["origin reads redecided"] += 1
                self.ST[i] = DEFER
                self.push(now, E_DECIDE, n, c)
                continue
            self.obusy[n] += 1
            self.push(now + self.p.origin_latency, E_ORIGIN, n, c)

    # -- outcomes ------------------------------------------------------------------------------
    def flow_done(self, tid: int, now: float) -> None:
        n = tid // self.P
        item = self.titem[tid]
        c, s = item >> 16, item & 0xFFFF
        self.f_active[tid] = False
        size = self.m.sizes[c]
        self.served[s] += size
        self.peer_bytes[n] += size
        if now > self.last_active[s]:
            self.last_active[s] = now
        inf = self.inflight[n]
        k = inf[s] - 1
        inf[s] = k
        if self.pick_heap[n] is not None:
            heapq.heappush(self.pick_heap[n], (k, random.random(), s))  # type: ignore[arg-type]
        br = self.breakers[n]
        if br:
            b = br.get(s)
            if b is not None and b[1] <= now:
                del br[s]
        self.release(tid, now)
        self.landed_at(n, c, now, first=False)

    def landed_at(self, n: int, c: int, now: float, *, first: bool) -> None:
        i = n * self.C + c
        self.LANDED[i] = now
        self.finish(n, c, i, now)
        self.ST[i] = HELD
        self.last_active[n] = now
        # read from the origin here (a first copy), or got from a peer but ours (the owner
        # table says so): in its log, its watches told (``ChunkFetcher.obtain``)
        owned = not first and bool(self.table) and self.table[c] == n
        if first or owned:
            self.announce(n, c, now)
            self.counters["first copies" if first else "owned copies announced"] += 1
        f = self.m.file_of[c]
        left = self.file_left[n]
        if left[f] == self.m.counts[f]:
            self.timeline.append((now, n, "p", f))  # chunk_held: the file is partly held
        left[f] -= 1
        if left[f] == 0:  # file_complete, and its fill's end_loading
            if not self.holders[f]:
                self.holders_appeared(f, now)
            self.holders[f].add(n)
            self.timeline.append((now, n, "c", f))
        self.remaining[n] -= 1
        if self.remaining[n] == 0:  # fills nothing now, holds whole files: not a member
            self.done[n] = now
            self.loading[n] = 0
            self.members_changed(now)
            self.timeline.append((now, n, "e", -1))
            self.left -= 1

    def announce(self, n: int, c: int, now: float) -> None:
        if c not in self.logged[n]:
            self.logged[n].add(c)
            self.log[n].append(c)
            self.push(now + self.p.peer_latency, E_REPORT, c, n)

    def retry(self, tid: int, now: float, *, failed: bool) -> None:
        """The request came back without the chunk: _from_peers loops."""
        n = tid // self.P
        item = self.titem[tid]
        c, target = item >> 16, item & 0xFFFF
        self.inc(n, target, -1)
        if failed:
            self.trip(n, target, now)
        self.release(tid, now)
        self.ST[n * self.C + c] = NEW
        self.decide(n, c, now)

    def kill(self, k: int, now: float) -> None:
        self.alive[k] = 0
        self.timeline.append((now, k, "k", -1))
        for tid in np.flatnonzero(self.f_active & (self.f_src == k)).tolist():
            self.f_active[tid] = False  # transfers from it: the connection drops
            self.push(now, E_FAIL, int(tid))
        lo, hi = k * self.P, (k + 1) * self.P
        self.f_active[lo:hi] = False
        self.origin.kill(now, k)
        self.wt2[k] = 0  # its own watches end with it
        # Its watches' polls fail at once: at every node watching it, its breaker trips and
        # the chunks waiting on it take a turn (landing in the grace: its record stands).
        for n in np.flatnonzero(self.wt2[:, k]).tolist():
            self.watch_failed(n, k, now)
        if self.remaining[k] > 0 and k in self.loader_set:
            self.left -= 1
        self.push(now + self.p.ttl, E_LEASE, k)

    def lease_expired(self, k: int, now: float) -> None:
        """etcd deletes its keys: every node drops it (holders, members) and recomputes owners."""
        self.inview[k] = 0
        self.loading[k] = 0
        for f in range(len(self.holders)):
            self.holders[f].discard(k)
        self.members_changed(now)

    # -- the run -------------------------------------------------------------------------------
    def start(self, n: int, now: float) -> None:
        self.loading[n] = 1
        self.timeline.append((now, n, "b", -1))
        self.remaining[n] = self.C
        self.file_left[n] = list(self.m.counts)

    def ideal(self) -> float:
        """A lower bound: the bytes over the narrowest link plus one chunk's pipeline
        (over the origin link, then over a node link)."""
        p, S, chunk = self.p, self.m.total, self.m.manifest.chunk_size
        depth = chunk / p.node_bps
        if self.warm:  # scale-out: no origin; each new node's link, or the warm uplinks
            return (
                max(S / p.node_bps, len(self.loaders) * S / (len(self.warm) * p.node_bps)) + depth
            )
        return max(S / p.origin_bps, S / p.node_bps) + chunk / p.origin_bps + depth

    def run(self) -> SimResult:
        wall = time.perf_counter()
        p = self.p
        self.loader_set = set(self.loaders)
        self.left = len(self.loaders)
        for n in self.loaders:  # all begin at once: members of each other's tables
            self.loading[n] = 1
        self.compute_table(0.0)
        self.first_table = [self.names[i] for i in self.table]
        self.first_members = self.members
        # A cold fill sleeps 3 publish intervals (others announce themselves), then computes
        # the owner table; a warm cluster's does not wait.
        t0 = self.table_seconds[0] + (3 * p.publish_interval if not self.warm else 0.0)
        ideal = self.ideal()
        if self.warm:
            for n in self.loaders:
                self.push(t0, E_START, n)
        else:
            self.push(t0, E_START, -1)  # all at once
        self.push(t0 + TRACE_EVERY, E_SAMPLE)
        candidates = self.loaders if not self.warm else list(range(self.total))
        kills = max(1, round(p.kill_fraction * len(candidates))) if p.kill_fraction > 0 else 0
        victims = sorted(self.rng.sample(candidates, kills))
        for k in victims:
            self.push(t0 + p.kill_at * ideal, E_KILL, k)
        cap = t0 + p.max_ratio * ideal
        self.t0 = t0
        t = 0.0
        B = p.node_bps
        heap, origin = self.heap, self.origin
        f_active, f_rem, f_from, f_src, f_dst = (
            self.f_active,
            self.f_rem,
            self.f_from,
            self.f_src,
            self.f_dst,
        )
        stopped = False
        steps = 0
        while True:
            if self.left <= 0 and not heap:
                break
            if self.left <= 0:
                break
            if t > cap or time.perf_counter() - wall > p.budget:
                stopped = True
                break
            idx = np.flatnonzero(f_active)
            te = min(heap[0][0] if heap else INF, origin.next_time())
            done_t: list[float] = []
            done_tid: list[int] = []
            done_ser: list[int] = []
            if idx.size == 0:
                if te == INF:
                    break  # nothing left to happen: loads stuck
                t_next = max(te, t)
            else:
                steps += 1
                src = f_src[idx]
                dst = f_dst[idx]
                up = np.bincount(src, minlength=self.total)
                down = np.bincount(dst, minlength=self.total)
                rate = B / np.maximum(up[src], down[dst])
                frm = f_from[idx]
                rem = f_rem[idx]
                eta = rem / rate + np.maximum(frm - t, 0.0)
                step = min(max(float(eta.min()), self.dt), 8 * self.dt)
                t_next = t + step
                el = np.maximum(t_next - frm, 0.0)
                rem = rem - rate * el
                f_rem[idx] = rem
                f_from[idx] = np.maximum(frm, t_next)
                fin = np.flatnonzero(rem <= 0.5)
                if fin.size:
                    ends = t_next + rem[fin] / rate[fin]
                    order = np.argsort(ends, kind="stable")
                    done_t = ends[order].tolist()
                    done_tid = idx[fin][order].tolist()
                    serial = self.f_serial
                    done_ser = [serial[x] for x in done_tid]
            i, nd = 0, len(done_t)
            while True:
                tf = done_t[i] if i < nd else INF
                th = heap[0][0] if heap else INF
                to = origin.next_time()
                tm = min(tf, th, to)
                if tm > t_next:
                    break
                if tm == tf:
                    tid = done_tid[i]
                    i += 1
                    if f_active[tid] and self.f_serial[tid] == done_ser[i - 1]:
                        self.flow_done(tid, tf)
                elif tm == to:
                    n, c = origin.pop(to)
                    self.obusy[n] -= 1
                    self.origin_bytes[n] += self.m.sizes[c]
                    self.landed_at(n, c, to, first=True)
                    self.pump_origin(n, to)
                else:
                    _, _, kind, a, b = heapq.heappop(heap)
                    self.event(kind, a, b, th)
            t = t_next
        self.counters["fluid steps"] = steps
        self.sample_clients(t)
        self.sample_trace(t)
        return SimResult(
            params=p,
            total_nodes=self.total,
            loaders=self.loaders,
            killed=victims,
            t0=t0,
            ideal=ideal,
            done=self.done,
            origin_bytes=self.origin_bytes,
            peer_bytes=self.peer_bytes,
            served=self.served,
            timeline=self.timeline,
            active=[(t0, x) for x in self.last_active],
            table_seconds=self.table_seconds,
            first_members=self.first_members,
            first_table=self.first_table,
            later_tables=self.later_tables,
            peak_clients=self.peak_clients,
            peak_connections=self.peak_connections,
            counters=dict(self.counters),
            trace=self.trace,
            wall_s=time.perf_counter() - wall,
            sim_end=t,
            stopped=stopped,
        )

    def event(self, kind: int, a: int, b: int, now: float) -> None:
        if kind == E_ORIGIN:
            if self.alive[a]:
                self.origin.add(now, a, b, self.m.sizes[b])
        elif kind == E_REPORT:
            self.report(a, b, now)
        elif kind in (E_MISS, E_FAIL):
            if self.alive[a // self.P] and self.titem[a] >= 0:
                self.retry(a, now, failed=kind == E_FAIL)
        elif kind == E_DECIDE:  # a turn: a wait or grace over, the owner table ready
            if self.alive[a] and self.ST[a * self.C + b] in (WAITING, GRACE, DEFER):
                self.decide(a, b, now)
        elif kind == E_WATCH:
            self.watch_started(a, b, now)
        elif kind == E_WFAIL:
            self.watch_failed(a, b, now)
        elif kind == E_TABLE:
            if self.table_dirty:
                if now >= self.table_at + 1.0:
                    self.update_table(now)
                else:
                    self.table_due = INF
                    self.members_changed(now)
        elif kind == E_KILL:
            self.kill(a, now)
        elif kind == E_LEASE:
            self.lease_expired(a, now)
        elif kind == E_START:
            if a < 0:
                self.start_cold(now)
            else:
                self.start_load(a, now)
        elif kind == E_SAMPLE:
            self.sample_clients(now)
            self.sample_trace(now)
            if self.left > 0:
                self.push(now + TRACE_EVERY, E_SAMPLE)

    def start_load(self, n: int, now: float) -> None:
        self.start(n, now)
        for c in range(self.C):
            self.decide(n, c, now)

    def start_cold(self, now: float) -> None:
        """Every node's load starts at once, nothing held anywhere: each chunk's first turn
        at each node, in bulk. No holder, no reporter, every owner filling the whole version:
        a chunk we own goes to the origin (queued in index order), every other one waits for
        its owner's report, registered on it (a watch of each owner: none has a log yet)."""
        for n in self.loaders:
            self.start(n, now)
        table, T, C = self.table, self.total, self.C
        assert table and self.loaders == list(range(T))
        tab = np.asarray(table, dtype=np.int32)
        owned = np.bincount(tab, minlength=T).astype(np.int32)
        self.reg2[:] = tab
        self.st2[:] = WAITING
        self.wc2[:] = owned
        np.fill_diagonal(self.wc2, 0)
        self.wt2[:] = owned > 0
        np.fill_diagonal(self.wt2, 0)
        for n in self.loaders:
            mine = np.flatnonzero(tab == n)
            self.reg2[n, mine] = -1
            self.st2[n, mine] = READING
            self.oq[n].extend(mine.tolist())
            self.pump_origin(n, now)
        self.counters["watch waits"] += T * C - C
        self.counters["watches started"] += int(np.count_nonzero(self.wt2))
        self.counters["origin reads"] += C


# -- the directory's writes, scheduled from the simulated timeline -----------------------------
CAPACITY = 4 << 40  # each node's pool: bytes (placement weights are equal)
AGENT_EVENT_CPU = 100e-6  # seconds of an agent's CPU an etcd event (measured: ~50-100 us)
PROPAGATION = 0.01  # seconds (simulated) for a write to reach the other nodes' watches


@dataclass
class Write:
    t: float  # simulated seconds
    kind: str  # "holding" | "crc" (a put-if-absent transaction) | "info"
    key: str  # under the cluster's prefix
    value: bytes


@dataclass
class NodePlan:
    """One node's part in the replay: its writes (a lightweight writer) or its directory
    calls (a real ``Cluster`` agent), its kill time, its counters for NodeInfo."""

    name: str
    role: str  # "loader" | "warm"
    writes: list[Write]
    ops: list[tuple[float, str, int]]  # (simulated t, b p c e, file)
    kill: float | None
    window: tuple[float, float]  # its NodeInfo counters change within this span
    totals: tuple[int, int, int, int]  # used, from origin, from peers, served: at the end


def info_at(plan: NodePlan, t: float, total: int) -> Any:
    """The node's NodeInfo at simulated time ``t``: counters interpolated over its window."""
    from mows.cluster import NodeInfo

    lo, hi = plan.window
    frac = 1.0 if t >= hi else 0.0 if t <= lo else (t - lo) / (hi - lo)
    used, origin, peers, served = plan.totals
    if plan.role == "warm":
        return NodeInfo(plan.name, plan.name, CAPACITY, total, 0, 0, int(frac * served))
    return NodeInfo(
        plan.name,
        plan.name,
        CAPACITY,
        int(frac * used),
        int(frac * origin),
        int(frac * peers),
        int(frac * served),
    )


def plan_nodes(r: SimResult, model: Model, names: list[str], seed: int) -> list[NodePlan]:
    """Every node's directory writes, as its ``Cluster`` would make them: the holding (the
    real ``_Model.record``, msgpack) written at the node's next publish tick when it changed
    (changes within one tick coalesce); a completed file's CRC pages by a put-if-absent
    transaction unless the first writer's pages reached the node first; NodeInfo every
    INFO_REFRESH while its counters change and once when they settle."""
    from mows.cluster._bitmap import encode_crcs
    from mows.cluster._directory import (
        INFO_CHECK,
        INFO_REFRESH,
        PAGE,
        ChunkCrcs,
        _enc,
        _Model,
    )

    rng = random.Random(seed)
    pi = r.params.publish_interval
    vid = model.vid
    ops: dict[int, list[tuple[float, str, int]]] = {}
    killed: dict[int, float] = {}
    for t, n, op, f in r.timeline:
        if op == "k":
            killed[n] = t
        else:
            ops.setdefault(n, []).append((t, op, f))
    phases = [rng.uniform(0, pi) for _ in names]

    def tick(n: int, t: float) -> float:
        return phases[n] + math.ceil((t - phases[n]) / pi) * pi

    # file -> when its CRC pages were first written (a warm cluster's: before the window)
    warm_cluster = r.total_nodes > len(r.loaders)
    first: dict[int, float] = dict.fromkeys(range(len(model.counts)), -INF if warm_cluster else INF)
    for t, n, op, f in r.timeline:
        if op == "c":
            first[f] = min(first[f], tick(n, t))
    pages: dict[int, list[tuple[str, bytes]]] = {}
    for f, crcs in enumerate(model.crcs):
        pages[f] = []
        for page in range(-(-len(crcs) // PAGE)):
            part = crcs[page * PAGE : (page + 1) * PAGE]
            rec = ChunkCrcs(f, page, len(part), encode_crcs(dict(enumerate(part)), len(part)))
            pages[f].append((f"manifests/{vid}/{f}/{page}", _enc.encode(rec)))
    warm = set(range(r.total_nodes)) - set(r.loaders)
    plans = []
    for n in range(r.total_nodes):
        name = names[n]
        kill = killed.get(n)
        writes: list[Write] = []
        mine = sorted(ops.get(n, []))
        m = _Model(model.manifest)
        last = b""
        groups: dict[float, list[tuple[str, int]]] = {}
        for t, op, f in mine:
            groups.setdefault(tick(n, t), []).append((op, f))
        for at in sorted(groups):
            crc_files = []
            for op, f in groups[at]:
                if op == "b":  # every file's fill begins (begin_loading)
                    m.loading.update(dict.fromkeys(range(len(model.counts)), 1))
                elif op == "p":
                    m.partial.add(f)
                elif op == "c":  # file_complete, then its fill's end_loading
                    m.complete.add(f)
                    m.partial.discard(f)
                    m.loading.pop(f, None)
                    if at < first[f] + PROPAGATION:  # not seen published yet: written
                        crc_files.append(f)
            blob = _enc.encode(m.record(name))
            if blob != last:
                writes.append(Write(at, "holding", f"holdings/{vid}/{name}", blob))
                last = blob
            for f in crc_files:
                writes += [Write(at, "crc", k, v) for k, v in pages[f]]
        role = "warm" if n in warm else "loader"
        end = r.done[n] if r.done[n] < INF else r.sim_end
        lo, hi = r.t0, max(r.active[n][1], end if role == "loader" else r.t0)
        if kill is not None:
            hi = min(hi, kill)
        plan = NodePlan(
            name,
            role,
            writes,
            mine,
            kill,
            (lo, hi),
            (model.total, r.origin_bytes[n], r.peer_bytes[n], r.served[n]),
        )
        # NodeInfo: checked every INFO_CHECK; written when changed and settled, or after
        # INFO_REFRESH while it keeps changing.
        if hi > lo:
            t, written_at, seen = lo, lo, None
            written = info_at(plan, lo, model.total)
            while True:
                t += INFO_CHECK
                info = info_at(plan, t, model.total)
                if info != written and (info == seen or t - written_at >= INFO_REFRESH):
                    writes.append(Write(t, "info", f"nodes/{name}", _enc.encode(info)))
                    written, written_at = info, t
                seen = info
                if t > hi and info == written:
                    break
        writes.sort(key=lambda w: w.t)
        if kill is not None:
            writes = [w for w in writes if w.t < kill]
        plan.writes = writes
        plans.append(plan)
    return plans


def setup_writes(plan: NodePlan, model: Model, crc_writer: bool) -> list[tuple[str, bytes, bool]]:
    """What a node wrote before the measured window: its registration (NodeInfo), and for a
    warm node its holding of the whole version (and, for one of them, the CRC pages)."""
    from mows.cluster._bitmap import encode_crcs
    from mows.cluster._directory import PAGE, ChunkCrcs, _enc, _Model

    out = [(f"nodes/{plan.name}", _enc.encode(info_at(plan, plan.window[0], model.total)), True)]
    if plan.role == "warm":
        m = _Model(model.manifest)
        m.complete.update(range(len(model.counts)))
        out.append((f"holdings/{model.vid}/{plan.name}", _enc.encode(m.record(plan.name)), True))
        if crc_writer:
            for f, crcs in enumerate(model.crcs):
                for page in range(-(-len(crcs) // PAGE)):
                    part = crcs[page * PAGE : (page + 1) * PAGE]
                    rec = ChunkCrcs(
                        f, page, len(part), encode_crcs(dict(enumerate(part)), len(part))
                    )
                    out.append((f"manifests/{model.vid}/{f}/{page}", _enc.encode(rec), False))
    return out


# -- the replay against a real etcd --------------------------------------------------------
def _writer_main(
    conn: Any,
    endpoint: str,
    prefix: bytes,
    plans: list[NodePlan],
    setup: list[list[tuple[str, bytes, bool]]],
    compression: float,
    ttl: int,
) -> None:
    import asyncio

    asyncio.run(_writer(conn, endpoint, prefix, plans, setup, compression, ttl))


async def _writer(
    conn: Any,
    endpoint: str,
    prefix: bytes,
    plans: list[NodePlan],
    setup: list[list[tuple[str, bytes, bool]]],
    compression: float,
    ttl: int,
) -> None:
    """Lightweight nodes: each its own lease (the daemon's TTL, kept alive in one batched
    stream by a thread of its own: hundreds of nodes share this loop), its scheduled writes
    at their compressed times, one after another as its publisher makes them; a kill stops
    its keepalives (the lease expires: no revoke). A lease lost all the same (the process
    starved) is taken again, as ``Cluster._register`` does, and counted."""
    import asyncio
    import threading

    from aetcd.exceptions import ClientError

    from mows.cluster._etcd import EtcdSecurity, open_client

    loop = asyncio.get_running_loop()
    client = open_client(endpoint, EtcdSecurity(), timeout=60)
    await client.connect()
    leases = {p.name: (await client.lease(ttl)).id for p in plans}
    live = set(leases)
    tx = client.transactions
    for p, writes in zip(plans, setup, strict=True):
        for key, value, leased in writes:
            if leased:
                await client.put(prefix + key.encode(), value, lease=leases[p.name])
            else:
                k = prefix + key.encode()
                await client.transaction(
                    compare=[tx.version(k) == 0], success=[tx.put(k, value)], failure=[]
                )

    stop = threading.Event()
    keeper = threading.Thread(
        target=_keepalive_thread, args=(endpoint, leases, live, ttl, stop), daemon=True
    )
    keeper.start()
    conn.send(("ready",))
    t0 = (await loop.run_in_executor(None, conn.recv))[1]
    stats: dict[str, Any] = {
        "writes": Counter(),
        "bytes": Counter(),
        "max_value": 0,
        "lag": 0.0,
        "leases_lost": 0,
    }
    per_node: dict[str, int] = {}

    async def play(p: NodePlan) -> None:
        done = 0
        for w in p.writes:
            delay = t0 + w.t / compression - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                stats["lag"] = max(stats["lag"], -delay)
            k = prefix + w.key.encode()
            if w.kind == "crc":
                await client.transaction(
                    compare=[tx.version(k) == 0], success=[tx.put(k, w.value)], failure=[]
                )
            else:
                try:
                    await client.put(k, w.value, lease=leases[p.name])
                except ClientError as e:
                    if "lease not found" not in str(e):
                        raise
                    stats["leases_lost"] += 1
                    leases[p.name] = (await client.lease(ttl)).id
                    await client.put(k, w.value, lease=leases[p.name])
            done += 1
            stats["writes"][(p.role, w.kind)] += 1
            stats["bytes"][(p.role, w.kind)] += len(k) + len(w.value)
            stats["max_value"] = max(stats["max_value"], len(w.value))
        per_node[p.name] = done
        if p.kill is not None:
            delay = t0 + p.kill / compression - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            live.discard(p.name)  # crashed: no more keepalives, no revoke

    await asyncio.gather(*(play(p) for p in plans))
    stats["per_node"] = per_node
    conn.send(("done", stats))
    await loop.run_in_executor(None, conn.recv)  # stop
    stop.set()
    keeper.join(30)
    await client.close()


def _keepalive_thread(
    endpoint: str, leases: dict[str, int], live: set[str], ttl: int, stop: Any
) -> None:
    """Every ttl / 3, one LeaseKeepAlive stream for every live lease of the process."""
    import asyncio

    from aetcd import rpc

    from mows.cluster._etcd import EtcdSecurity, open_client

    async def run() -> None:
        client = open_client(endpoint, EtcdSecurity(), timeout=30)
        await client.connect()
        try:
            while not stop.is_set():
                ids = [leases[n] for n in list(live)]
                if ids:
                    got = 0
                    reqs = [rpc.LeaseKeepAliveRequest(ID=i) for i in ids]
                    async for _ in client.leasestub.LeaseKeepAlive(reqs, timeout=30):
                        got += 1
                        if got == len(ids):
                            break
                await asyncio.sleep(ttl / 3)
        finally:
            await client.close()

    asyncio.run(run())


def _agent_main(
    conn: Any,
    endpoint: str,
    cluster: str,
    plans: list[NodePlan],
    model: Model,
    compression: float,
    ttl: int,
    expect: tuple[list[str], list[str], dict[tuple[str, ...], list[str]]],
) -> None:
    import asyncio

    asyncio.run(_agent(conn, endpoint, cluster, plans, model, compression, ttl, expect))


def deep_size(obj: Any, skip: tuple[Any, ...] = ()) -> int:
    """Bytes of ``obj`` and everything it references (each object once), but ``skip``."""
    import gc
    import types

    import msgspec

    seen = {id(s) for s in skip}
    stack, total = [obj], 0
    atomic = (type, types.ModuleType, types.FunctionType, types.MethodType)
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, atomic):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack += o.keys()
            stack += o.values()
        elif isinstance(o, (list, tuple, set, frozenset, deque)):
            stack += o
        elif isinstance(o, msgspec.Struct):
            stack += [getattr(o, f) for f in o.__struct_fields__]
        elif hasattr(o, "__dict__"):
            stack.append(o.__dict__)
        elif not isinstance(o, (int, float, str, bytes, bool)):
            stack += gc.get_referents(o)
    return total


async def _agent(
    conn: Any,
    endpoint: str,
    cluster_name: str,
    plans: list[NodePlan],
    model: Model,
    compression: float,
    ttl: int,
    expect: tuple[list[str], list[str], dict[tuple[str, ...], list[str]]],
) -> None:
    """Real ``Cluster`` agents: each connects, registers, watches the whole prefix and makes
    its node's directory calls at their compressed times (the publish interval and NodeInfo
    timers compressed alike); ``_apply`` is timed per event. ``expect``: the simulation's
    first members and owner table, and its later tables by their members, which the agents'
    own tables are compared with (when their members are the same)."""
    import asyncio
    import contextlib

    from mows.cluster import _directory

    _directory.INFO_CHECK /= compression
    _directory.INFO_REFRESH /= compression
    vid = model.vid
    loop = asyncio.get_running_loop()
    clock = {"t0": INF}

    def sim_now() -> float:
        return (time.time() - clock["t0"]) * compression

    agents = []
    for p in plans:

        def info(p: NodePlan = p) -> Any:
            return info_at(p, max(sim_now(), p.window[0]), model.total)

        cl = Cluster(
            [endpoint], cluster_name, info, ttl=ttl, publish_interval=PUBLISH_INTERVAL / compression
        )
        st: dict[str, Any] = {
            "events": 0,
            "apply_s": 0.0,
            "apply_max": 0.0,
            "rev": 0,
            "owners_s": [],
            "match": None,
            "later": {},  # members -> the agent's table = the simulation's
        }
        apply = cl._apply

        def timed(
            key: bytes,
            value: bytes,
            revision: int,
            *,
            deleted: bool,
            apply: Any = apply,
            st: dict[str, Any] = st,
        ) -> None:
            started = time.perf_counter()
            apply(key, value, revision, deleted=deleted)
            spent = time.perf_counter() - started
            st["events"] += 1
            st["apply_s"] += spent
            st["apply_max"] = max(st["apply_max"], spent)
            st["rev"] = max(st["rev"], revision)

        cl._apply = timed  # type: ignore[method-assign]
        cl.start()
        agents.append((p, cl, st))
    for _, cl, _ in agents:
        if not await cl.wait_healthy(60):
            raise RuntimeError(f"agent {cl.node_id}: etcd not reachable")
    for p, cl, _ in agents:
        if p.role == "warm":
            cl.join(vid, model.manifest)
            for f, crcs in enumerate(model.crcs):
                cl.file_complete(vid, f, crcs)
    while any(cl._dirty or cl._crcs_pending for _, cl, _ in agents):
        await asyncio.sleep(0.05)
    conn.send(("ready",))
    clock["t0"] = (await loop.run_in_executor(None, conn.recv))[1]
    cpu0 = time.process_time()
    for _, cl, st in agents:
        st["puts0"] = cl.puts  # writes before the window (registration, a warm node's holding)

    async def owners(cl: Cluster, st: dict[str, Any]) -> None:
        started = time.perf_counter()
        await cl.owners_ready(vid)
        st["owners_s"].append(time.perf_counter() - started)
        m = cl.models.get(vid)
        members = sorted(n for n, _ in m.members) if m and m.members else None
        if st["match"] is None and members == expect[0]:  # the simulation's first members
            cl.chunk_owner(vid, 0)  # the table current
            st["match"] = m is not None and m.table == expect[1]
        key = tuple(members) if members else ()
        if key in expect[2] and key not in st["later"]:
            cl.chunk_owner(vid, 0)
            st["later"][key] = m is not None and m.table == expect[2][key]

    async def play(p: NodePlan, cl: Cluster, st: dict[str, Any]) -> None:
        for t, op, f in p.ops:
            delay = clock["t0"] + t / compression - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if op == "b":  # the load's fills begin, one a file, at once
                cl.join(vid, model.manifest)
                cl.begin_loading(vid, list(range(len(model.counts))))
                await asyncio.sleep(3 * cl.publish_interval)  # a cold fill's wait, then owners
                await owners(cl, st)
            elif op == "p":
                cl.chunk_held(vid, f)
            elif op == "c":
                cl.file_complete(vid, f, model.crcs[f])
                cl.end_loading(vid, [f])

    async def refresh(cl: Cluster, st: dict[str, Any]) -> None:
        while True:  # the fetcher asks for owners as it goes: the table follows the members
            await asyncio.sleep(1.0)
            if vid in cl.models:
                await owners(cl, st)

    refreshers = [asyncio.ensure_future(refresh(cl, st)) for _, cl, st in agents]
    await asyncio.gather(*(play(p, cl, st) for p, cl, st in agents))
    conn.send(("played",))
    final_rev = (await loop.run_in_executor(None, conn.recv))[1]
    deadline = time.monotonic() + 300
    while any(st["rev"] < final_rev for _, _, st in agents) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    for r in refreshers:
        r.cancel()
    cpu = time.process_time() - cpu0
    out = []
    for p, cl, st in agents:
        await owners(cl, st)
        m = cl.models.get(vid)
        members = [n for n, _ in cl._members(m)] if m is not None else []
        state = {
            "nodes": deep_size(cl.nodes),
            "holdings": deep_size(m.others) if m else 0,
            "owner_table": deep_size(m.table) - sum(sys.getsizeof(s) for s in set(m.table))
            if m
            else 0,
            "crcs": deep_size((m.crcs, m.pages, m.published)) if m else 0,
            "revs": deep_size(m.revs) if m else 0,
        }
        state["total"] = deep_size(
            (cl.nodes, cl.models, cl._stash, cl._written, cl._lingering),
            skip=(model.manifest, *(mm.manifest for mm in cl.models.values())),
        )
        out.append(
            {
                "node": p.name,
                "role": p.role,
                "puts": cl.puts - st["puts0"],
                "events": st["events"],
                "apply_s": st["apply_s"],
                "apply_max_s": st["apply_max"],
                "caught_up": st["rev"] >= final_rev,
                "owners_ready_s": max(st["owners_s"], default=0.0),
                "members": len(members),
                "table_match": st["match"],
                "later_tables": list(st["later"].values()),
                "state": state,
                "rejected": cl.rejected_records,
            }
        )
    conn.send(("stats", {"agents": out, "cpu_s": cpu}))
    await loop.run_in_executor(None, conn.recv)  # stop
    for _, cl, _ in agents:
        with contextlib.suppress(Exception):
            await cl.close()


def etcd_metrics(endpoint: str) -> dict[str, float]:
    """etcd's own counters (unlabelled lines of /metrics) that the replay reports."""
    import urllib.request

    wanted = {
        "etcd_mvcc_put_total",
        "etcd_mvcc_delete_total",
        "etcd_mvcc_txn_total",
        "etcd_debugging_mvcc_total_put_size_in_bytes",
        "etcd_debugging_mvcc_events_total",
        "etcd_debugging_mvcc_slow_watcher_total",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "etcd_network_client_grpc_received_bytes_total",
        "etcd_network_client_grpc_sent_bytes_total",
    }
    out = {}
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                out[name] = float(value)
    return out


async def read_back(endpoint: str, prefix: bytes) -> tuple[list[tuple[bytes, int]], int]:
    """Every key under the prefix (a paged read, as the daemon reads): (key, value size)."""
    from mows.cluster._etcd import EtcdSecurity, get_prefix_paged, open_client

    client = open_client(endpoint, EtcdSecurity(), timeout=60)
    await client.connect()
    try:
        kvs, revision = await get_prefix_paged(client, prefix)
    finally:
        await client.close()
    return [(kv.key, len(kv.value)) for kv in kvs], revision


def replay(
    r: SimResult, model: Model, names: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """The simulated loads' directory traffic, played against a real etcd (see the module
    doc): every node writes; ``args.agents`` of them are real ``Cluster`` agents."""
    import asyncio
    import multiprocessing as mp
    import tempfile

    from tests.daemons import EtcdProcess

    started = time.perf_counter()
    plans = plan_nodes(r, model, names, r.params.seed)
    victims = set(r.killed)
    survivors = [n for n in range(r.total_nodes) if n not in victims]
    loaders = [n for n in survivors if plans[n].role == "loader"]
    warm = [n for n in survivors if plans[n].role == "warm"]
    # Agents: surviving nodes spread over the range, half of them warm in a scale-out.
    want = min(args.agents or (20 if r.params.nodes <= 100 else 4), len(survivors))
    n_warm = min(len(warm), want // 2)
    n_load = min(len(loaders), want - n_warm)
    n_warm = min(len(warm), want - n_load)

    def spread(xs: list[int], k: int) -> list[int]:
        return [xs[i * len(xs) // k] for i in range(k)]

    chosen = spread(loaders, n_load) + spread(warm, n_warm)
    agent_set = set(chosen)
    writes = sum(len(p.writes) for p in plans)
    span = max(
        [w.t for p in plans for w in p.writes]
        + [t for p in plans for t, _, _ in p.ops]
        + [p.kill for p in plans if p.kill is not None]
    )
    # Real seconds for the simulated span: at most ``replay_rate`` writes a second, at most
    # ``max_compression`` x faster than simulated (the agents' timers run compressed too),
    # and long enough that the agents (every one receives every event) use about one core
    # in all at AGENT_EVENT_CPU an event.
    window = max(
        args.replay_min,
        writes / args.replay_rate,
        span / args.max_compression,
        len(chosen) * writes * AGENT_EVENT_CPU,
    )
    compression = max(1.0, span / window)
    ttl = int(r.params.ttl)
    cluster_name = f"scale-{r.params.scenario}-{r.params.nodes}"
    prefix = f"/mows/{cluster_name}/".encode()
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="mows-scale-") as tmp:
        etcd = EtcdProcess(Path(tmp)).start()
        try:
            writer_plans = [p for n, p in enumerate(plans) if n not in agent_set]
            crc_writer = next((p.name for p in writer_plans if p.role == "warm"), None)
            groups = [writer_plans[i :: args.writer_procs] for i in range(args.writer_procs)]
            agent_plans = [plans[n] for n in chosen]
            expect = (sorted(r.first_members), r.first_table, r.later_tables)
            per = max(1, -(-len(agent_plans) // args.agent_procs))
            agent_groups = [agent_plans[i : i + per] for i in range(0, len(agent_plans), per)]
            writers, agents = [], []
            for g in groups:
                if not g:
                    continue
                setup = [setup_writes(p, model, p.name == crc_writer) for p in g]
                a, b = ctx.Pipe()
                proc = ctx.Process(
                    target=_writer_main,
                    args=(b, etcd.endpoint, prefix, g, setup, compression, ttl),
                    daemon=True,
                )
                proc.start()
                procs.append(proc)
                writers.append(a)
            for g in agent_groups:
                a, b = ctx.Pipe()
                proc = ctx.Process(
                    target=_agent_main,
                    args=(b, etcd.endpoint, cluster_name, g, model, compression, ttl, expect),
                    daemon=True,
                )
                proc.start()
                procs.append(proc)
                agents.append(a)

            def recv(c: Any, what: str, timeout: float = 600) -> Any:
                if not c.poll(timeout):
                    raise RuntimeError(f"replay: no {what!r} from a worker in {timeout}s")
                msg = c.recv()
                if msg[0] != what:
                    raise RuntimeError(f"replay: expected {what!r}, got {msg[0]!r}")
                return msg

            for c in writers + agents:
                recv(c, "ready")
            time.sleep(1.0)  # setup settled: nothing pending but keepalives
            before = etcd_metrics(etcd.endpoint)
            t0 = time.time() + 1.0
            for c in writers + agents:
                c.send(("go", t0))
            wstats = [recv(c, "done", 3600)[1] for c in writers]
            for c in agents:
                recv(c, "played", 3600)
            last_kill = max((p.kill for p in plans if p.kill is not None), default=0.0)
            wait = t0 + last_kill / compression + ttl + 2 - time.time()
            if wait > 0:
                time.sleep(wait)  # the killed nodes' leases expire: their keys go
            keys, final_rev = asyncio.run(read_back(etcd.endpoint, prefix))
            for c in agents:
                c.send(("finish", final_rev))
            astats = [recv(c, "stats", 900)[1] for c in agents]
            after = etcd_metrics(etcd.endpoint)
            keys, _ = asyncio.run(read_back(etcd.endpoint, prefix))
            for c in writers + agents:
                c.send(("stop",))
            for proc in procs:
                proc.join(30)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            etcd.stop()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    loads = len(r.loaders)
    # what the nodes wrote in the window, by role and kind (writers', agents' counted alike)
    by_kind: Counter[tuple[str, str]] = Counter()
    by_bytes: Counter[tuple[str, str]] = Counter()
    max_value = 0
    for s in wstats:
        by_kind.update(s["writes"])
        by_bytes.update(s["bytes"])
        max_value = max(max_value, s["max_value"])
    agent_rows = [a for s in astats for a in s["agents"]]
    agent_events = sum(a["events"] for a in agent_rows)
    # the agents' own writes, as their Cluster counted them (puts, deletes, transactions)
    agent_puts = {a["node"]: a["puts"] for a in agent_rows}
    for p in plans:
        if p.name in agent_puts:  # its planned writes, by kind, for the per-load breakdown
            for w in p.writes:
                by_kind[(p.role, w.kind)] += 1
                by_bytes[(p.role, w.kind)] += len(prefix) + len(w.key) + len(w.value)
                max_value = max(max_value, len(w.value))
    loader_writes = {k: v for (role, k), v in by_kind.items() if role == "loader"}
    lw = sum(loader_writes.values())
    # the real agents' tables against the simulation's (same members: same owners)
    matches = [a["table_match"] for a in agent_rows if a["table_match"] is not None]
    table_match = all(matches) if matches else None
    later = [ok for a in agent_rows for ok in a["later_tables"]]
    loader_agents = [a for a in agent_rows if a["role"] == "loader"]
    planned_agent = {p.name: len(p.writes) for p in plans if p.name in agent_puts}
    return {
        "compression": compression,
        "span_s": span,
        "writes_planned": writes,
        "agents": len(agent_rows),
        "agent_nodes": [a["node"] for a in agent_rows],
        "writer_procs": len(writers),
        "agent_procs": len(agents),
        "loads": loads,
        "etcd": delta,
        "etcd_after": after,
        "final_revision": final_rev,
        "writes_by_kind": {f"{a}/{b}": v for (a, b), v in sorted(by_kind.items())},
        "bytes_by_kind": {f"{a}/{b}": v for (a, b), v in sorted(by_bytes.items())},
        "writes_per_load": lw / loads,
        "writes_per_load_by_kind": {k: v / loads for k, v in sorted(loader_writes.items())},
        "etcd_puts_per_load": delta.get("etcd_mvcc_put_total", 0.0) / loads,
        "etcd_put_bytes_per_load": delta.get("etcd_debugging_mvcc_total_put_size_in_bytes", 0.0)
        / loads,
        "grpc_received_bytes_per_load": delta.get(
            "etcd_network_client_grpc_received_bytes_total", 0.0
        )
        / loads,
        "largest_value_written": max_value,
        "largest_value_read_back": max((size for _, size in keys), default=0),
        "keys_read_back": len(keys),
        "state_bytes_max": max((a["state"]["total"] for a in agent_rows), default=0),
        "state_bytes": {a["node"]: a["state"] for a in agent_rows},
        "apply_us_per_event": 1e6 * sum(a["apply_s"] for a in agent_rows) / max(1, agent_events),
        "apply_us_max": 1e6 * max((a["apply_max_s"] for a in agent_rows), default=0.0),
        "loop_cpu_us_per_event": 1e6 * sum(s["cpu_s"] for s in astats) / max(1, agent_events),
        "events_per_agent": agent_events / max(1, len(agent_rows)),
        "agents_caught_up": all(a["caught_up"] for a in agent_rows),
        # owners_ready in the agents, several of which share a process (and its GIL, and two
        # cores with etcd and the writers): not the per-daemon figure (ownership_s is)
        "owners_ready_s_max_shared_process": max(
            (a["owners_ready_s"] for a in agent_rows), default=0.0
        ),
        "agent_puts": agent_puts,
        "agent_puts_planned": planned_agent,
        "agent_loader_puts_mean": sum(a["puts"] for a in loader_agents)
        / max(1, len(loader_agents)),
        "owner_tables_match_simulation": table_match,
        # after members left: (checked, equal), over the agents and the simulation's tables
        "shrunk_tables_match_simulation": [len(later), sum(later)],
        "rejected_records": sum(a["rejected"] for a in agent_rows),
        "writer_lag_s_max": max((s["lag"] for s in wstats), default=0.0),
        "writer_leases_lost": sum(s["leases_lost"] for s in wstats),  # a starved writer's
        "wall_s": time.perf_counter() - started,
    }


# -- the report ---------------------------------------------------------------------------
def summarize(r: SimResult, model: Model) -> dict[str, Any]:
    victims = set(r.killed)
    alive = [n for n in range(r.total_nodes) if n not in victims]
    loaders = [n for n in r.loaders if n not in victims]
    done = [r.done[n] for n in loaders]
    # None: a surviving load was not done when the simulation stopped (at sim_end_s)
    completion = max(done) if done and max(done) < INF else None
    # Balance among the nodes that serve by design: every node in a cold start (each owns its
    # share), the warm holders in a scale-out (the new ones start with nothing to serve).
    servers = [n for n in alive if n not in r.loaders] or alive
    served = [r.served[n] for n in servers]
    served_all = [r.served[n] for n in alive]
    origin = [r.origin_bytes[n] for n in alive]
    mean_served = sum(served) / len(served)
    mean_origin = sum(origin) / len(origin)
    return {
        "nodes": r.params.nodes,
        "scenario": r.params.scenario,
        "total_nodes": r.total_nodes,
        "loads": len(r.loaders),
        "killed": len(r.killed),
        "surviving_loads": len(loaders),
        "completed_loads": sum(d < INF for d in done),
        "stopped_at_cap": r.stopped,
        "completion_s": completion,
        "mean_completion_s": sum(d for d in done if d < INF) / max(1, sum(d < INF for d in done)),
        "ideal_s": r.ideal,
        "ratio": completion / r.ideal if completion is not None else None,
        "t0_s": r.t0,
        "origin_total_over_model": sum(r.origin_bytes) / model.total,
        "origin_max_over_mean": max(origin) / mean_origin if mean_origin else 0.0,
        "origin_max_bytes": max(origin),
        "served_max_over_mean": max(served) / mean_served if mean_served else 0.0,
        "served_over": "the warm nodes" if len(servers) < len(alive) else "all nodes",
        "served_max_over_mean_all_nodes": max(served_all) / (sum(served_all) / len(served_all))
        if sum(served_all)
        else 0.0,
        "served_max_bytes": max(served),
        "served_mean_bytes": mean_served,
        "ownership_s": max(r.table_seconds),
        "members_max": len(r.first_members),
        "chunks": model.chunks,
        "ownership_s_all": r.table_seconds,
        "peak_clients_per_server": r.peak_clients,
        "peak_connections_per_server": r.peak_connections,
        "counters": r.counters,
        "sim_wall_s": r.wall_s,
        "sim_end_s": r.sim_end,
        "trace": r.trace,
    }


def checks(s: dict[str, Any], files: int) -> list[tuple[str, bool, str]]:
    """The issue's targets (for the 1,000-node rows), PASS/FAIL each."""
    e = s.get("etcd") or {}
    out = []
    if e:
        out.append(
            (
                "no value over 64 KiB",
                max(e["largest_value_written"], e["largest_value_read_back"]) <= 64 << 10,
                f"largest {max(e['largest_value_written'], e['largest_value_read_back'])} B",
            )
        )
        k = e["writes_per_load_by_kind"]
        directory = k.get("holding", 0) + k.get("crc", 0)
        end = s["mean_completion_s"] if s["completed_loads"] else s["sim_end_s"]
        load_s = end - s["t0_s"]
        from mows.cluster._directory import INFO_REFRESH

        ok = directory <= 3 * files + 2 and k.get("info", 0) <= load_s / INFO_REFRESH + 3
        out.append(
            (
                "etcd writes per load O(files)",
                ok,
                f"{e['writes_per_load']:.0f}/load for {files} files: holdings "
                f"{k.get('holding', 0):.0f} + CRC pages {k.get('crc', 0):.0f} (<= 3 x files + 2)"
                f" + NodeInfo {k.get('info', 0):.0f} (one per {INFO_REFRESH:.0f}s of load)",
            )
        )
    owners = s["ownership_s"]
    out.append(
        (
            "ownership of every chunk <= 1 s",
            owners <= 1.0,
            f"{owners:.3f} s (owner_table over {s['members_max']} members, {s['chunks']} chunks)",
        )
    )
    out.append(
        (
            "served max/mean <= 1.1",
            s["served_max_over_mean"] <= 1.1,
            f"{s['served_max_over_mean']:.2f} over {s['served_over']}"
            f" ({s['served_max_over_mean_all_nodes']:.2f} over all live nodes)",
        )
    )
    out.append(("completion <= 1.2 x ideal", bool(s["ratio"] and s["ratio"] <= 1.2), done_text(s)))
    out.append(
        (
            "every load completes despite the kills",
            s["completed_loads"] == s["surviving_loads"],
            f"{s['completed_loads']}/{s['surviving_loads']} ({s['killed']} nodes killed)",
        )
    )
    out.append(
        (
            f"(extra) peer connections at one server <= MAX_CONNECTIONS {MAX_CONNECTIONS}",
            s["peak_connections_per_server"] <= MAX_CONNECTIONS,
            f"{s['peak_connections_per_server']} (askers within {IDLE_TIMEOUT:.0f}s, one each,"
            f" + watches; {s['peak_clients_per_server']} distinct clients)",
        )
    )
    return out


def done_text(s: dict[str, Any]) -> str:
    if s["ratio"] is not None:
        return f"{s['completion_s']:.0f} s / {s['ideal_s']:.0f} s = {s['ratio']:.2f}"
    return (
        f"not done: stopped at {s['sim_end_s']:.0f} s = {s['sim_end_s'] / s['ideal_s']:.1f} x"
        f" {s['ideal_s']:.0f} s, the origin having sent {s['origin_total_over_model']:.2f} x"
        " the model"
    )


def gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", default="10,100,1000", help="cluster sizes [10,100,1000]")
    ap.add_argument("--scenarios", default="cold,scale-out")
    ap.add_argument("--model-gb", type=float, default=700.0)
    ap.add_argument("--files", type=int, default=163)
    ap.add_argument("--origin-gbit", type=float, default=10.0)
    ap.add_argument("--node-gbit", type=float, default=25.0)
    ap.add_argument("--kill", type=float, default=0.05, help="fraction of nodes killed [0.05]")
    ap.add_argument("--kill-at", type=float, default=0.5, help="... at this fraction of the ideal")
    ap.add_argument("--peer-latency", type=float, default=0.0005)
    ap.add_argument("--origin-latency", type=float, default=0.02)
    ap.add_argument("--workers", type=int, default=_DEFAULTS.workers)
    ap.add_argument("--max-ratio", type=float, default=3.0, help="stop at this x ideal [3]")
    ap.add_argument("--sim-budget", type=float, default=600.0, help="wall s a simulation [600]")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--agents", type=int, default=0, help="real Cluster agents a replay [20; 4 past 100 nodes]"
    )
    ap.add_argument("--max-compression", type=float, default=10.0, help="replay speed-up [10]")
    ap.add_argument("--writer-procs", type=int, default=2)
    ap.add_argument("--agent-procs", type=int, default=2)
    ap.add_argument("--replay-rate", type=float, default=2500.0, help="writes/s at most [2500]")
    ap.add_argument("--replay-min", type=float, default=20.0, help="replay seconds at least [20]")
    ap.add_argument("--no-etcd", action="store_true", help="the simulation only")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.model_gb, args.files, args.replay_min = "10", 2.0, 8, 5.0
        # Its ideal (~1.6 s) is shorter than a lease: a dead owner's chunks wait for its
        # lease to end (then a new owner), seconds whatever the model's size.
        args.max_ratio = max(args.max_ratio, 20.0)
    model = make_model(int(args.model_gb * GB), args.files)
    rows, runs = [], []
    started = time.perf_counter()
    for n in [int(x) for x in args.nodes.split(",")]:
        for scenario in args.scenarios.split(","):
            p = SimParams(
                n,
                scenario,
                args.origin_gbit * 1e9 / 8,
                args.node_gbit * 1e9 / 8,
                kill_fraction=args.kill,
                kill_at=args.kill_at,
                peer_latency=args.peer_latency,
                origin_latency=args.origin_latency,
                max_ratio=args.max_ratio,
                budget=args.sim_budget,
                seed=args.seed,
                workers=args.workers,
            )
            sim = Sim(p, model)
            r = sim.run()
            s = summarize(r, model)
            print(f"N={n} {scenario}: simulated in {r.wall_s:.0f}s: {done_text(s)}", flush=True)
            print("  " + ", ".join(f"{k} {v}" for k, v in r.counters.items()), flush=True)
            if not args.no_etcd:
                s["etcd"] = replay(r, model, sim.names, args)
                e = s["etcd"]
                print(
                    f"  replayed against etcd in {e['wall_s']:.0f}s: {r.total_nodes} nodes write,"
                    f" {e['agents']} of them real Cluster agents; {e['compression']:.1f}x faster"
                    " than simulated",
                    flush=True,
                )
            s["checks"] = [
                {"target": t, "pass": ok, "value": v} for t, ok, v in checks(s, len(model.counts))
            ]
            runs.append(s)
    for s in runs:
        e = s.get("etcd") or {}
        rows.append(
            [
                s["nodes"],
                s["scenario"],
                f"{s['completed_loads']}/{s['surviving_loads']} ({s['killed']}k)",
                f"{s['completion_s']:.0f}" if s["ratio"] else f">{s['sim_end_s']:.0f}",
                f"{s['ideal_s']:.0f}",
                f"{s['ratio']:.2f}" if s["ratio"] else f">{s['sim_end_s'] / s['ideal_s']:.1f}",
                f"{s['origin_total_over_model']:.2f}",
                f"{s['origin_max_over_mean']:.2f}",
                f"{s['served_max_over_mean']:.2f}",
                f"{gib(s['served_max_bytes'])}",
                f"{s['ownership_s']:.2f}",
                f"{e['writes_per_load']:.0f}" if e else "-",
                f"{e['etcd_puts_per_load']:.0f}" if e else "-",
                f"{e['etcd_put_bytes_per_load'] / 1024:.0f}" if e else "-",
                max(e["largest_value_written"], e["largest_value_read_back"]) if e else "-",
                f"{e['state_bytes_max'] / 1024:.0f}" if e else "-",
                f"{e['apply_us_per_event']:.0f}/{e['loop_cpu_us_per_event']:.0f}" if e else "-",
            ]
        )
    headers = [
        "N",
        "scenario",
        "loads done",
        "done s",
        "ideal s",
        "x ideal",
        "origin/S",
        "origin max/mean",
        "served max/mean",
        "served max GiB",
        "owners s",
        "writes/load",
        "etcd puts/load",
        "KiB/load",
        "largest B",
        "state KiB",
        "us/event",
    ]
    print()
    print(
        f"{gib(model.total)} GiB model ({args.model_gb:g} GB), {len(model.counts)} files, "
        f"{model.chunks} chunks of {model.manifest.chunk_size >> 20} MiB; origin "
        f"{args.origin_gbit:g} Gbit/s, nodes {args.node_gbit:g} Gbit/s; {args.kill:.0%} of nodes "
        f"killed at {args.kill_at:.0%} of the ideal time"
    )
    print(table(headers, rows))
    print(
        "loads done: surviving loads completed (k: nodes killed); done s: the last load's end"
        " (>: stopped, not done); origin/S: origin bytes / model; served: over the serving"
        " nodes (all, cold; the warm ones, scale-out);\nwrites/load: a loading"
        " node's own writes; etcd puts/load and KiB/load: etcd's counters over the window / loads"
        " (warm nodes' NodeInfo included);\nus/event: Cluster._apply / the agent process's CPU,"
        " per etcd event; state: a real agent's directory state (max)"
    )
    for s in runs:
        e = s.get("etcd")
        if e:
            d = e["etcd"]
            print(
                f"  N={s['nodes']} {s['scenario']}: {s['total_nodes']} nodes wrote to etcd, "
                f"{e['agents']} of them real Cluster agents, {e['compression']:.1f}x faster than"
                f" simulated; etcd +{d['etcd_mvcc_put_total']:.0f} puts,"
                f" +{d['etcd_debugging_mvcc_total_put_size_in_bytes'] / 1e3:.0f} kB put,"
                f" db +{d['etcd_mvcc_db_total_size_in_bytes'] / 2**10:.0f} KiB, gRPC in"
                f" {d['etcd_network_client_grpc_received_bytes_total'] / 1e3:.0f} kB; agents:"
                f" {e['events_per_agent']:.0f} events each, caught up {e['agents_caught_up']},"
                f" owner tables = simulation's {e['owner_tables_match_simulation']}"
                f" (after members left: {e['shrunk_tables_match_simulation'][1]} of"
                f" {e['shrunk_tables_match_simulation'][0]} checked)"
                + (
                    f"; {e['writer_leases_lost']} writer leases lost (starved) and taken again"
                    if e["writer_leases_lost"]
                    else ""
                )
            )
    biggest = max(int(x) for x in args.nodes.split(","))
    for s in runs:
        if s["nodes"] != biggest:
            continue
        print(f"\ntargets at N={biggest}, {s['scenario']}:")
        for c in s["checks"]:
            print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['target']}: {c['value']}")
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f}s")
    out = write_json(
        "scale-quick" if args.quick else "scale",
        {
            "args": vars(args),
            "model": {
                "bytes": model.total,
                "files": len(model.counts),
                "chunks": model.chunks,
                "chunk_size": model.manifest.chunk_size,
            },
            "runs": runs,
            "wall_s": wall,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
