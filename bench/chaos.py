"""Chaos: a cluster under a steady load stream while a seeded schedule injects faults.

    sudo python bench/chaos.py [--seed S] [--duration 300] [--nodes 6] [--slots 2]
                               [--cap-mib 48] [--baseline S] [--hang-timeout 150]
                               [--prefetch share|full|off] [--keep] [--quick]

Topology (network namespaces, as bench/cluster.py, whose Net/Procs it reuses): a bridge; an
origin (nginx, access log counting body bytes); a 3-member etcd, one member per namespace;
N nodes, each a daemon whose pool is a tmpfs of its own (so the cap is measured with
``statfs``, unlinked-but-mapped pages included) and ``--slots`` client processes that load
models one after another (``mows.iter_weights``: models that fit are opened, the one bigger
than the cap streams) and compare every tensor byte with a pristine copy of the model. The
last node advertises a relay in its namespace (``--advertise``): peers fetching from it go
through the relay, which edits chunk payloads (keeping their CRC-32) while tampering is on.

Faults (a seeded schedule; each kind at least once, rounds of shuffled kinds):
  daemon_kill       SIGKILL a daemon, restart it on the same pool after the window
  client_kill       SIGKILL a client process in the middle of a load; a new one takes over
  etcd_leader_kill  SIGKILL the etcd leader, restart it on its data directory
  link_cut          ``ip link set down`` on a node's link, up after the window
  packet_loss       nftables ``numgen random`` drop (10-30%) on a node, in and out (tc
                    netem where nft is absent; neither: the kind is listed unavailable)
  pool_flip         one byte of a node's pool file flipped in memory (tmpfs); at the
                    window's end a new local open of that file is probed
  origin_corrupt    4 KiB of a model file overwritten at the origin (crc32.txt unchanged)
  peer_tamper       the relay edits every chunk it carries

Invariants (any broken: the run stops, prints the seed and the fault log, exits 1):
  hung loads (no tensor for --hang-timeout seconds) = 0; loads failing untyped (not a
  mows.MowsError, or a client that died) = 0; corrupted bytes delivered = 0; cap violations
  (tmpfs used > cap + metadata slack, sampled every 0.1 s; the holders of unlinked pages are
  listed) = 0. Bytes served by a node to its own new opens from a pool file flipped behind
  its back are attributed to the flip (exact file, offset, value) and counted apart as
  ``rot_served_locally``: mows re-checks pool bytes only before serving them to a peer
  (README), so that count is a finding to decide on, not hidden and not a stop. On a break,
  every daemon's status is saved in the JSON (``status_at_break``); --keep keeps the logs.

Time to recover (per fault): from the end of its window (restore) until, on every affected
node (the target; all nodes for etcd, origin and relay faults), a load that started after it has
completed; null if none did before the run ended. Origin bytes: nginx's body bytes, compared
with a fault-free phase of the same load stream run first (``--baseline`` seconds; 0 under
--quick, which reports origin bytes against the bytes loaded instead). Writes
bench/results/chaos.json (chaos-quick.json). Namespaces, mounts and processes are removed on
exit, failure and Ctrl-C included.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import cluster as netbench  # noqa: E402
from _common import table, write_json  # noqa: E402

from tests.etcd_cluster import EtcdCluster  # noqa: E402

PREFIX = netbench.PREFIX = "mowsc"  # namespaces of our own, apart from bench/cluster.py's
SUBNET = "10.251.0"
ORIGIN_IP = f"{SUBNET}.2"
PY = sys.executable
KINDS = (
    "daemon_kill",
    "client_kill",
    "etcd_leader_kill",
    "link_cut",
    "packet_loss",
    "pool_flip",
    "origin_corrupt",
    "peer_tamper",
)
CLUSTER_WIDE = ("etcd_leader_kill", "origin_corrupt", "peer_tamper")
LOG_PATTERNS = {  # daemon log lines counted at the end
    "crc_mismatch": "CRC-32 mismatch",
    "peer_digest_mismatch": "do not match their BLAKE3 digest",
    "rotten_withheld": "no longer matches its CRC: withheld",
    "rotten_dropped": "rotted in memory",
    "tracebacks": "Traceback (most recent call last)",
}
SLACK = 256 << 10  # tmpfs bytes beyond the cap: version metadata and locations files
in_ns, sh = netbench.in_ns, netbench.sh


@dataclass
class Fault:
    index: int
    kind: str
    start: float  # seconds into the chaos phase
    duration: float
    node: int
    detail: dict[str, Any] = field(default_factory=dict)
    applied: float | None = None
    restored: float | None = None
    recovery_s: float | None = None


@dataclass
class Load:
    id: int
    node: int
    slot: int
    model: str
    start: float
    end: float = 0.0
    outcome: str = ""  # ok, typed, untyped, hung, killed
    error: str = ""
    bytes: int = 0
    corrupt: int = 0
    rot_local: int = 0


class NsEtcd(EtcdCluster):
    """tests/etcd_cluster.py's members, each in a namespace of its own on the bridge."""

    def __init__(self, base: Path, net: netbench.Net) -> None:
        super().__init__(base, 3)
        self.ips = [f"{SUBNET}.{3 + i}" for i in range(3)]
        self.ns = [net.host(f"etcd{i}", ip, None, None) for i, ip in enumerate(self.ips)]

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{ip}:2379" for ip in self.ips]

    def _spawn(self, i: int) -> None:
        peers = ",".join(
            f"{n}=http://{ip}:2380" for n, ip in zip(self.names, self.ips, strict=True)
        )
        peer = f"http://{self.ips[i]}:2380"
        self._logs[i] = log = open(self.log_path(i), "ab")  # noqa: SIM115 - closed by kill/stop
        args = [self.binary, "--name", self.names[i], "--data-dir", str(self.data_dir(i))]
        args += ["--listen-client-urls", self.endpoints[i], "--advertise-client-urls"]
        args += [self.endpoints[i], "--listen-peer-urls", peer, "--initial-advertise-peer-urls"]
        args += [peer, "--initial-cluster", peers, "--initial-cluster-token", self.token]
        args += ["--initial-cluster-state", "new"]
        self.procs[i] = subprocess.Popen(in_ns(self.ns[i], *args), stdout=log, stderr=log)

    def _wait_port(self, i: int, deadline: float) -> None:
        while self._curl(i, "/version", 1.0) is None:
            if not self.alive(i) or time.monotonic() > deadline:
                raise RuntimeError(f"etcd member {i} did not listen:\n{self.log(i)[-2000:]}")
            time.sleep(0.1)

    def _curl(self, i: int, path: str, timeout: float, post: bool = False) -> str | None:
        extra = ["-X", "POST", "-d", "{}"] if post else []
        url = self.endpoints[i] + path
        r = sh(*in_ns(self.ns[i], "curl", "-sf", "-m", str(timeout), *extra, url), check=False)
        return r.stdout if r.returncode == 0 else None

    def member_status(self, i: int, timeout: float = 2.0) -> tuple[str, str] | None:
        body = (
            self._curl(i, "/v3/maintenance/status", timeout, post=True) if self.alive(i) else None
        )
        if body is None:
            return None
        try:
            st = json.loads(body)
        except ValueError:
            return None
        member = str(st.get("header", {}).get("member_id", ""))
        return (member, str(st.get("leader", "0"))) if member else None


# -- the processes that run inside the nodes' namespaces ---------------------------------------


def client_main(sock: str, models: dict[str, dict[str, Any]]) -> None:
    """A client process: loads the models it is told to (one "ID NAME" line each on stdin)
    and answers "R {json}": every tensor compared with the pristine copy."""
    import traceback
    import warnings

    import numpy as np
    import torch

    import mows

    refs: dict[str, dict[str, tuple[Any, int, int]]] = {}

    def reference(name: str) -> dict[str, tuple[Any, int, int]]:
        if name not in refs:
            index: dict[str, tuple[Any, int, int]] = {}
            for f in sorted(Path(models[name]["ref"]).glob("*.safetensors")):
                raw = f.read_bytes()
                n = int.from_bytes(raw[:8], "little")
                m = np.memmap(f, dtype=np.uint8, mode="r")
                for t, info in json.loads(raw[8 : 8 + n]).items():
                    if t != "__metadata__":
                        a, b = info["data_offsets"]
                        index[t] = (m, 8 + n + a, b - a)
            refs[name] = index
        return refs[name]

    def load(name: str, out: dict[str, Any]) -> None:
        ref, seen, beat = reference(name), set(), [time.monotonic()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for tname, tensor in mows.iter_weights(
                models[name]["url"], socket=sock, fallback=False
            ):
                m, start, n = ref[tname]
                got = tensor.reshape(-1).view(torch.uint8).numpy()
                want = m[start : start + n]
                if not np.array_equal(got, want):
                    bad = np.flatnonzero(got != want)
                    out["corrupt"] += len(bad)
                    rel = Path(m.filename).name
                    out["mismatches"] += [[rel, start + int(k), int(got[k])] for k in bad[:64]]
                out["bytes"] += n
                seen.add(tname)
                del tensor, got
                if time.monotonic() - beat[0] > 1.0:  # progress: this load is not hung
                    print("P", flush=True)
                    beat[0] = time.monotonic()
        out["stale"] = sum(isinstance(w.message, mows.OriginUnreachableWarning) for w in caught)
        if seen != set(ref):
            raise RuntimeError(f"tensors missing from the load: {sorted(set(ref) - seen)[:3]}")

    print("ready", flush=True)
    for line in sys.stdin:
        lid, name = line.split()
        out: dict[str, Any] = {"id": int(lid), "bytes": 0, "corrupt": 0, "mismatches": []}
        try:
            load(name, out)
            out["ok"] = True
        except mows.MowsError as e:
            out.update(ok=False, error=type(e).__name__, message=str(e)[:300])
        except Exception as e:
            traceback.print_exc()
            out.update(ok=False, untyped=True, error=type(e).__name__, message=str(e)[:300])
        print("R " + json.dumps(out), flush=True)


def probe_main(sock: str, url: str, rel: str, offset: int) -> None:
    """A new local open of one file: prints the byte it is served at ``offset``."""
    import mows
    from mows.client import get_session

    try:
        s = get_session(sock)
        ready = s.open(url, files=[rel])
        with open(ready.files[rel], "rb") as fh:
            print(json.dumps({"byte": os.pread(fh.fileno(), 1, offset)[0]}))
        s.release(ready.model, [rel])
    except mows.MowsError as e:
        print(json.dumps({"error": type(e).__name__}))


def relay_main(listen: str, upstream: str, stats: str) -> None:
    """A peer-port relay: passes the handshake and frames unchanged; while tampering (SIGUSR1
    on, SIGUSR2 off) it edits every chunk's payload keeping its CRC-32, so only the chunk's
    digest (and the tag over it) can tell."""
    import msgspec

    from mows._protocol import recv_exact
    from mows.transport._wire import TAG_BYTES, ChunkHeader, PeerMessage
    from tests.crc_forge import crc_preserving_delta

    decode = msgspec.msgpack.Decoder(PeerMessage).decode
    state = {"on": False, "edited": 0}
    signal.signal(signal.SIGUSR1, lambda *_: state.update(on=True))
    signal.signal(signal.SIGUSR2, lambda *_: state.update(on=False))
    host, port = upstream.rsplit(":", 1)

    def header(body: bytes) -> ChunkHeader | None:
        for candidate in (body[:-TAG_BYTES], body):  # tagged after the handshake
            with contextlib.suppress(msgspec.DecodeError):
                msg = decode(candidate)
                return msg if isinstance(msg, ChunkHeader) else None
        return None

    def pipe(src: socket.socket, dst: socket.socket, edit: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                if not edit:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
                    continue
                size = recv_exact(src, 4)
                body = recv_exact(src, int.from_bytes(size, "big"))
                h = header(body)
                payload = bytearray(recv_exact(src, h.length) if h is not None else b"")
                if h is not None and state["on"] and h.length >= 16:
                    at = h.length // 2
                    for i, b in enumerate(crc_preserving_delta(h.length, at)):
                        payload[at + i] ^= b
                    state["edited"] += 1
                    Path(stats).write_text(str(state["edited"]))
                dst.sendall(size + body + payload)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    server = socket.create_server((listen.rsplit(":", 1)[0], int(listen.rsplit(":", 1)[1])))
    while True:
        down, _ = server.accept()
        try:
            up = socket.create_connection((host, int(port)), timeout=5)
            up.settimeout(None)
        except OSError:
            down.close()
            continue
        threading.Thread(target=pipe, args=(down, up, False), daemon=True).start()
        threading.Thread(target=pipe, args=(up, down, True), daemon=True).start()


# -- the controller -------------------------------------------------------------------------

NGINX = """daemon off; user root root; worker_processes 1; pid {base}/nginx.pid;
error_log {base}/nginx-error.log warn; events {{ worker_connections 1024; }}
http {{ log_format bytes '$body_bytes_sent'; access_log {base}/access.log bytes; sendfile on;
client_body_temp_path {base}/nb; proxy_temp_path {base}/np; fastcgi_temp_path {base}/nf;
uwsgi_temp_path {base}/nu; scgi_temp_path {base}/ns; types {{ }}
default_type application/octet-stream;
server {{ listen {ip}:8080; root {root}; location / {{ autoindex on; autoindex_format json; }} }} }}
"""


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cap = args.cap_mib << 20
        self.base = Path(tempfile.mkdtemp(prefix="mows-chaos-"))
        self.net = netbench.Net()
        self.procs = netbench.Procs()
        self.daemons: dict[int, subprocess.Popen[bytes]] = {}
        self.workers: dict[tuple[int, int], subprocess.Popen[str]] = {}
        self.lines: dict[tuple[int, int], queue.Queue[str | None]] = {}
        self.loading: dict[tuple[int, int], Load] = {}  # slot -> its load in progress
        self.kill_asked: set[tuple[int, int]] = set()
        self.mounts: list[Path] = []
        self.loads: list[Load] = []
        self.faults: list[Fault] = []
        self.flips: dict[tuple[int, str, str, int], int] = {}  # (node, model, file, at) -> byte
        self.max_used = [0] * args.nodes
        self.violations: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.broken: str | None = None
        self.at_break: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.next_id = 0
        self.relay_node = args.nodes - 1
        self.relay: subprocess.Popen[bytes] | None = None
        self.loss: str | None = None  # nftables, else tc netem, else none (set up in setup)
        self.closed = False

    # -- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        from tests.daemons import generate_crc32, make_random_model

        www, ref = self.base / "www", self.base / "ref"
        self.models: dict[str, dict[str, Any]] = {}
        for k, (mib, files) in enumerate(self.args.models):
            name = f"m{k}-{mib}mib"
            make_random_model(ref / name, mib, files=files, seed=k)
            generate_crc32(ref / name)
            shutil.copytree(ref / name, www / name)
            url = f"http://{ORIGIN_IP}:8080/{name}"
            self.models[name] = {"url": url, "ref": str(ref / name), "mib": mib}
        self.net.host("origin", ORIGIN_IP, None, None)
        conf = self.base / "nginx.conf"
        conf.write_text(NGINX.format(base=self.base, ip=ORIGIN_IP, root=www))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        cmd = in_ns(f"{PREFIX}-origin", nginx, "-c", str(conf), "-p", str(self.base))
        self.procs.start(cmd, self.base / "nginx.log")
        self.etcd = NsEtcd(self.base, self.net)
        self.etcd.start()
        self.secret = self.base / "secret"
        self.secret.write_text(os.urandom(24).hex())
        self.secret.chmod(0o600)
        for i in range(self.args.nodes):
            self.net.host(f"n{i}", self.ip(i), None, None)
            mnt = self.base / f"pool{i}"
            mnt.mkdir()
            size = 2 * self.cap + (16 << 20)  # room to measure an overshoot, not to hit ENOSPC
            sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "chaos", str(mnt))
            self.mounts.append(mnt)
        self.loss = self.loss_method()
        relay = [str(HERE / "chaos.py"), "_relay", f"{self.ip(self.relay_node)}:7471"]
        relay += [f"{self.ip(self.relay_node)}:7470", str(self.base / "tampered")]
        self.relay = self.procs.start(
            in_ns(f"{PREFIX}-n{self.relay_node}", PY, *relay), self.base / "relay.log"
        )
        for i in range(self.args.nodes):
            self.start_daemon(i)
        self.wait_members()
        threading.Thread(target=self.sample, daemon=True).start()
        for i in range(self.args.nodes):
            for s in range(self.args.slots):
                self.start_worker((i, s))
        for key in self.workers:
            if self.lines[key].get(timeout=120) != "ready":
                raise RuntimeError(f"client {key} did not start")

    def loss_method(self) -> str | None:
        if shutil.which("nft"):
            return "nftables"
        ns, dev = f"{PREFIX}-n0", "n0-i"
        probe = sh(
            *in_ns(ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "loss", "1%"), check=False
        )
        if probe.returncode != 0:
            return None
        sh(*in_ns(ns, "tc", "qdisc", "del", "dev", dev, "root"))
        return "netem"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def sock(self, i: int) -> str:
        return str(self.base / f"n{i}.sock")

    def start_daemon(self, i: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock(i))
        args = [PY, "-m", "mows", "-v", "serve", "--max-memory", f"{self.args.cap_mib}MiB"]
        for m in self.models.values():
            args += ["--model-path", m["url"]]
        args += ["--socket", self.sock(i), "--pool-dir", str(self.mounts[i])]
        args += ["--etcd", ",".join(self.etcd.endpoints), "--cluster", "chaos"]
        args += ["--listen", f"{self.ip(i)}:7470", "--node-id", f"n{i}"]
        if i == self.relay_node:
            args += ["--advertise", f"{self.ip(i)}:7471"]
        args += ["--cluster-secret-file", str(self.secret), "--lease-ttl", "3"]
        args += ["--peer-timeout", "10", "--load-timeout", "30", "--prefetch-delay", "1"]
        args += ["--prefetch", self.args.prefetch]
        self.daemons[i] = p = self.procs.start(in_ns(f"{PREFIX}-n{i}", *args), self.log(f"n{i}"))
        netbench.wait_for(
            lambda: os.path.exists(self.sock(i)) or p.poll() is not None, 60, f"daemon n{i}"
        )
        if p.poll() is not None:
            raise RuntimeError(f"daemon n{i} exited: see {self.log(f'n{i}')}")

    def log(self, name: str) -> Path:
        return self.base / f"{name}.log"

    def status(self, i: int) -> dict[str, Any] | None:
        r = sh(PY, "-m", "mows", "status", "--json", "--socket", self.sock(i), check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def wait_members(self) -> None:
        def ok() -> bool:
            st = self.status(0)
            return st is not None and len(st["cluster"]["nodes"]) >= self.args.nodes

        netbench.wait_for(ok, 60, "every node in the cluster")

    def start_worker(self, key: tuple[int, int]) -> None:
        i, _ = key
        cmd = in_ns(f"{PREFIX}-n{i}", PY, str(HERE / "chaos.py"), "_client", self.sock(i))
        with open(self.log(f"client-n{i}-{key[1]}"), "ab") as err:
            p = subprocess.Popen(
                [*cmd, json.dumps(self.models)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                bufsize=1,
            )
        lines: queue.Queue[str | None] = queue.Queue()
        self.workers[key], self.lines[key] = p, lines

        def read() -> None:
            assert p.stdout is not None
            for line in p.stdout:
                lines.put(line.strip())
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    # -- invariants --------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def breaks(self, why: str) -> None:
        with self.lock:
            first = self.broken is None
            if first:
                self.broken = f"t={self.now():.1f}s: {why}"
        if first:  # what every daemon says now, for the post-mortem
            self.at_break = {f"n{i}": self.status(i) for i in range(self.args.nodes)}
            self.dump_stacks()
        self.stop.set()

    def dump_stacks(self) -> None:
        """Where a hung load waits: every live daemon logs its tasks' and threads' stacks
        (SIGUSR1), and py-spy (if installed) dumps its threads beside its log (--keep keeps
        them)."""
        for p in list(self.daemons.values()):
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGUSR1)  # its tasks' stacks, into its log
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(spy):
            return
        procs = [(f"n{i}", p) for i, p in self.daemons.items()]
        procs += [(f"client-n{i}-{slot}", p) for (i, slot), p in self.workers.items()]
        for name, p in procs:  # the clients too: where they wait
            if p.poll() is None:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    r = subprocess.run(
                        [spy, "dump", "--pid", str(p.pid)],
                        capture_output=True,
                        text=True,
                        timeout=30,
                    )
                    self.log(f"stacks-{name}").write_text(r.stdout + r.stderr)

    def sample(self) -> None:
        try:
            self._sample()
        except Exception as e:  # a sampler that stopped would let violations pass unseen
            self.breaks(f"the cap sampler failed: {type(e).__name__}: {e}")

    def _sample(self) -> None:
        while not self.stop.is_set():
            for i, mnt in enumerate(self.mounts):
                st = os.statvfs(mnt)
                used = (st.f_blocks - st.f_bfree) * st.f_frsize
                self.max_used[i] = max(self.max_used[i], used)
                if used > self.cap + SLACK:
                    v = {"t": self.now(), "node": i, "used": used, "deleted": deleted_holders(mnt)}
                    self.violations.append(v)
                    self.breaks(f"n{i}: pool tmpfs holds {used:,} bytes, cap {self.cap:,}")
            time.sleep(0.1)

    # -- the load stream -------------------------------------------------------------------------
    def slot(self, key: tuple[int, int], rng: random.Random, until: float) -> None:
        names = sorted(self.models)
        while not self.stop.is_set() and self.now() < until:
            with self.lock:
                self.next_id += 1
                load = Load(self.next_id, key[0], key[1], rng.choice(names), self.now())
                self.loads.append(load)
                self.loading[key] = load
            p = self.workers[key]
            try:
                assert p.stdin is not None
                p.stdin.write(f"{load.id} {load.model}\n")
                p.stdin.flush()
            except OSError:
                pass  # it died: its EOF is in the queue
            try:
                line: str | None = "P"
                while line == "P":  # a load hangs when it makes no progress for that long
                    line = self.lines[key].get(timeout=self.args.hang_timeout)
            except queue.Empty:
                load.outcome, load.end = "hung", self.now()
                self.breaks(f"load {load.id} ({load.model} on n{key[0]}) made no progress")
                return
            finally:
                self.loading.pop(key, None)
            load.end = self.now()
            if line is None:  # the process died
                if key in self.kill_asked:
                    self.kill_asked.discard(key)
                    load.outcome = "killed"
                else:
                    load.outcome, load.error = "untyped", f"client exited {p.wait()}"
                    self.breaks(f"client n{key[0]}/{key[1]} died on load {load.id}")
                    return
                self.start_worker(key)
                if self.lines[key].get(timeout=120) != "ready":
                    self.breaks(f"client n{key[0]}/{key[1]} did not restart")
                    return
                continue
            self.judge(load, json.loads(line.removeprefix("R ")))
            time.sleep(rng.uniform(0.2, 1.5))

    def judge(self, load: Load, r: dict[str, Any]) -> None:
        load.bytes = r["bytes"]
        if r["corrupt"]:
            flips = [
                self.flips.get((load.node, load.model, rel, at)) == got
                for rel, at, got in r["mismatches"]
            ]
            if r["corrupt"] == len(flips) and all(flips):
                load.rot_local = r["corrupt"]  # a flip on this node, served to a local open
            else:
                load.corrupt = r["corrupt"]
                self.breaks(f"load {load.id} ({load.model} on n{load.node}) got corrupt bytes")
        if r["ok"]:
            load.outcome = "ok"
        elif r.get("untyped"):
            load.outcome, load.error = "untyped", f"{r['error']}: {r['message']}"
            self.breaks(f"load {load.id} failed untyped: {load.error}")
        else:
            load.outcome, load.error = "typed", f"{r['error']}: {r['message'][:160]}"

    def phase(self, seconds: float, seed: int, faults: list[Fault]) -> None:
        self.t0 = time.monotonic()
        until = seconds
        threads = [
            threading.Thread(
                target=self.slot, args=(key, random.Random(f"{seed}/{key}"), until), daemon=True
            )
            for key in self.workers
        ]
        threads += [threading.Thread(target=self.inject, args=(f,), daemon=True) for f in faults]
        for t in threads:
            t.start()
        self.stop.wait(seconds)
        deadline = time.monotonic() + self.args.hang_timeout + 30
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def origin_bytes(self) -> int:
        path = self.base / "access.log"
        return sum(int(x) for x in path.read_text().split()) if path.exists() else 0

    def reset(self) -> None:
        """Between the fault-free phase and the chaos: empty pools, a cluster that forgot."""
        for i, p in self.daemons.items():
            self.procs.stop(p)
            for child in self.mounts[i].iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        time.sleep(4)  # leases expire
        for i in range(self.args.nodes):
            self.start_daemon(i)
        self.wait_members()

    # -- faults ------------------------------------------------------------------------------
    def inject(self, f: Fault) -> None:
        time.sleep(max(0.0, f.start - self.now()))
        if self.stop.is_set():
            return
        rng = random.Random(f"{self.args.seed}/fault/{f.index}")
        try:
            restore = getattr(self, f"f_{f.kind}")(f, rng)
            f.applied = self.now()
            self.stop.wait(max(0.0, f.start + f.duration - self.now()))
            if restore is not None:
                restore()
            f.restored = self.now()
        except Exception as e:  # the harness failed, not mows: stop too, saying so
            self.breaks(f"injecting {f.kind} failed: {type(e).__name__}: {e}")

    def f_daemon_kill(self, f: Fault, rng: random.Random) -> Any:
        self.daemons[f.node].kill()
        self.daemons[f.node].wait()
        return lambda: self.start_daemon(f.node)

    def f_client_kill(self, f: Fault, rng: random.Random) -> Any:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            busy = sorted(k for k in list(self.loading) if k[0] == f.node) or sorted(self.loading)
            if busy:
                key = rng.choice(busy)
                f.node, f.detail["slot"] = key[0], key[1]
                self.kill_asked.add(key)
                self.workers[key].kill()
                return None
            time.sleep(0.05)
        raise RuntimeError("no load in progress to kill")

    def f_etcd_leader_kill(self, f: Fault, rng: random.Random) -> Any:
        leader = self.etcd.leader(timeout=30)
        f.detail["member"] = leader
        self.etcd.kill(leader)
        return lambda: self.etcd.restart(leader)

    def f_link_cut(self, f: Fault, rng: random.Random) -> Any:
        ns, dev = f"{PREFIX}-n{f.node}", f"n{f.node}-i"
        sh(*in_ns(ns, "ip", "link", "set", dev, "down"))
        return lambda: sh(*in_ns(ns, "ip", "link", "set", dev, "up"))

    def f_packet_loss(self, f: Fault, rng: random.Random) -> Any:
        ns, pct = f"{PREFIX}-n{f.node}", rng.choice([10, 20, 30])
        f.detail.update(percent=pct, method=self.loss)
        if self.loss == "netem":
            dev = f"n{f.node}-i"
            sh(*in_ns(ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "loss", f"{pct}%"))
            return lambda: sh(*in_ns(ns, "tc", "qdisc", "del", "dev", dev, "root"))
        rules = "table inet chaos {\n"
        for hook in ("input", "output"):
            rules += f"chain {hook} {{ type filter hook {hook} priority 0; policy accept;\n"
            rules += f"numgen random mod 100 < {pct} drop; }}\n"
        subprocess.run(in_ns(ns, "nft", "-f", "-"), input=rules + "}\n", text=True, check=True)
        return lambda: sh(*in_ns(ns, "nft", "delete", "table", "inet", "chaos"))

    def f_pool_flip(self, f: Fault, rng: random.Random) -> Any:
        nodes = [f.node] + [i for i in range(self.args.nodes) if i != f.node]
        for i in nodes:
            files = self.pool_files(i)
            if files:
                break
        else:
            raise RuntimeError("no pool file on any node to flip")
        model, path = rng.choice(files)
        fd = os.open(path, os.O_RDWR)
        try:
            header = int.from_bytes(os.pread(fd, 8, 0), "little") + 8
            at = rng.randrange(header, os.fstat(fd).st_size)
            new = os.pread(fd, 1, at)[0] ^ 0xFF
            os.pwrite(fd, bytes([new]), at)
        finally:
            os.close(fd)
        f.node = i
        f.detail.update(model=model, file=path.name, offset=at)
        self.flips[(i, model, path.name, at)] = new

        def probe() -> None:  # a new local open of that file, after the window
            args = [str(HERE / "chaos.py"), "_probe", self.sock(i), self.models[model]["url"]]
            r = sh(*in_ns(f"{PREFIX}-n{i}", PY, *args, path.name, str(at)), check=False)
            got = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-300:]}
            served = "error" if "error" in got else ("flipped" if got["byte"] == new else "clean")
            f.detail.update(probe=served, probe_detail=got)

        return probe

    def pool_files(self, i: int) -> list[tuple[str, Path]]:
        """(model, path) of the whole (READY) safetensors files in a node's pool."""
        out = []
        for meta in self.mounts[i].glob("*/.mows-version.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                source = json.loads(meta.read_bytes())["manifest"]["source"]
                model = source.rstrip("/").rsplit("/", 1)[1]
                out += [(model, p) for p in sorted(meta.parent.glob("*.safetensors"))]
        return out

    def f_origin_corrupt(self, f: Fault, rng: random.Random) -> Any:
        # The file the fewest pools hold whole: the likeliest to be read from the origin next.
        held: dict[tuple[str, str], int] = {}
        for i in range(self.args.nodes):
            for m, p in self.pool_files(i):
                held[(m, p.name)] = held.get((m, p.name), 0) + 1
        files = [(m, p) for m in sorted(self.models) for p in self.origin_files(m)]
        model, path = min(files, key=lambda mp: (held.get((mp[0], mp[1].name), 0), rng.random()))
        size = path.stat().st_size
        at = rng.randrange(size // 4, size - 4096)
        f.detail.update(model=model, file=path.name, offset=at, length=4096)
        with open(path, "r+b") as fh:
            fh.seek(at)
            fh.write(os.urandom(4096))
        original = (Path(self.models[model]["ref"]) / path.name).read_bytes()[at : at + 4096]

        def restore() -> None:
            with open(path, "r+b") as fh:
                fh.seek(at)
                fh.write(original)

        return restore

    def origin_files(self, model: str) -> list[Path]:
        return sorted((self.base / "www" / model).glob("*.safetensors"))

    def log_tally(self) -> dict[str, int]:
        """What the daemons' logs (kept across restarts) say they caught."""
        text = "".join(
            self.log(f"n{i}").read_text(errors="replace") for i in range(self.args.nodes)
        )
        return {k: text.count(pattern) for k, pattern in LOG_PATTERNS.items()}

    def f_peer_tamper(self, f: Fault, rng: random.Random) -> Any:
        relay = self.relay
        assert relay is not None
        relay.send_signal(signal.SIGUSR1)
        return lambda: relay.send_signal(signal.SIGUSR2)

    # -- tear-down -----------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        for p in self.workers.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.close()
        with contextlib.suppress(Exception):
            self.etcd.stop()
        for mnt in self.mounts:
            sh("umount", "-l", str(mnt), check=False)
        self.mounts.clear()
        self.net.close()
        if self.args.keep:
            print(f"kept the logs in {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)


def deleted_holders(mnt: Path) -> list[str]:
    """Who keeps unlinked files of a pool alive (mapped or open), and their sizes: what a
    cap violation measured on the filesystem is made of."""
    out = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:80].decode()
            for line in (proc / "maps").read_text().splitlines():
                if str(mnt) in line and line.endswith("(deleted)"):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    path = line.split(maxsplit=5)[5]
                    out.add(f"pid {proc.name} ({cmd}) maps {hi - lo} bytes of {path}")
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(str(mnt)) and target.endswith("(deleted)"):
                    out.add(f"pid {proc.name} ({cmd}) has open {target}")
    return sorted(out)


def make_schedule(
    seed: int, nodes: int, duration: float, quick: bool, kinds_used: list[str]
) -> list[Fault]:
    """Rounds of the fault kinds, shuffled, one every ``spacing`` seconds between a warm-up
    and a quiet tail; no kind twice in a row, so one kind's windows never overlap."""
    rng = random.Random(seed)
    start, end = 5.0, duration - 15.0
    spacing = min(8.0, (end - start) / len(kinds_used))
    longest = 6.0 if quick else 10.0
    faults: list[Fault] = []
    kinds: list[str] = []
    t = start
    while t + 2.0 <= end:
        if not kinds:
            kinds = list(kinds_used)
            rng.shuffle(kinds)
            if faults and kinds[0] == faults[-1].kind:
                kinds.append(kinds.pop(0))
        kind = kinds.pop(0)
        d = rng.uniform(2.0, min(longest, 2 * spacing - 0.5, end - t))
        node = nodes - 1 if kind == "peer_tamper" else rng.randrange(nodes)
        faults.append(Fault(len(faults), kind, round(t, 2), round(d, 2), node))
        t += spacing
    return faults


def recoveries(c: Chaos, loads: list[Load]) -> None:
    for f in c.faults:
        if f.restored is None:
            continue
        nodes = range(c.args.nodes) if f.kind in CLUSTER_WIDE else [f.node]
        slot = f.detail.get("slot")
        ends = []
        for i in nodes:
            done = [
                x.end
                for x in loads
                if x.node == i
                and x.outcome == "ok"
                and x.start >= f.restored
                and (slot is None or x.slot == slot)
            ]
            ends.append(min(done) if done else None)
        got = [e for e in ends if e is not None]
        if got and len(got) == len(ends):
            f.recovery_s = round(max(got) - f.restored, 2)


def load_log(loads: list[Load]) -> list[list[Any]]:
    """id, node, slot, model, start, end, outcome, error: one row a load."""
    return [
        [x.id, x.node, x.slot, x.model, round(x.start, 2), round(x.end, 2), x.outcome, x.error]
        for x in loads
    ]


def summary(c: Chaos, loads: list[Load]) -> dict[str, Any]:
    outcomes = {k: sum(x.outcome == k for x in loads) for k in ("ok", "typed", "untyped")}
    typed: dict[str, int] = {}
    for x in loads:
        if x.outcome == "typed":
            cls = x.error.split(":")[0]
            typed[cls] = typed.get(cls, 0) + 1
    return {
        "attempted": len(loads),
        "completed": outcomes["ok"],
        "failed_typed": outcomes["typed"],
        "failed_typed_by_class": typed,
        "failed_untyped": outcomes["untyped"],
        "hung": sum(x.outcome == "hung" for x in loads),
        "killed": sum(x.outcome == "killed" for x in loads),
        "bytes_checked": sum(x.bytes for x in loads if x.outcome == "ok"),
        "corrupted_bytes_delivered": sum(x.corrupt for x in loads),
        "rot_served_locally": {
            "loads": sum(x.rot_local > 0 for x in loads),
            "bytes": sum(x.rot_local for x in loads),
        },
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Chaos]:
    c = Chaos(args)
    atexit.register(c.close)
    out: dict[str, Any] = {"seed": args.seed, "args": vars(args)}
    try:
        c.setup()
        out["models"] = {k: v["mib"] for k, v in c.models.items()}
        if args.baseline > 0:
            print(f"fault-free phase: {args.baseline:.0f} s", flush=True)
            c.phase(args.baseline, args.seed, [])
            base_loads, c.loads = c.loads, []
            out["baseline"] = summary(c, base_loads) | {"origin_bytes": c.origin_bytes()}
            out["baseline_load_log"] = load_log(base_loads)
            if c.broken is None:
                c.reset()
        origin0 = c.origin_bytes()
        kinds = [k for k in KINDS if k != "packet_loss" or c.loss is not None]
        out["unavailable"] = {} if c.loss else {"packet_loss": "neither nft nor tc netem here"}
        c.faults = make_schedule(args.seed, args.nodes, args.duration, args.quick, kinds)
        if c.broken is None:
            print(f"chaos phase: {args.duration:.0f} s, {len(c.faults)} faults", flush=True)
            c.phase(args.duration, args.seed, c.faults)
        loads = c.loads
        recoveries(c, loads)
        out["loads"] = summary(c, loads)
        out["origin"] = {"bytes": c.origin_bytes() - origin0}
        out["cap"] = {
            "cap_bytes": c.cap,
            "slack_bytes": SLACK,
            "violations": len(c.violations),
            "violation_samples": c.violations[:10],
            "max_used_by_node": c.max_used,
        }
        tampered = c.base / "tampered"
        out["tampered_chunks"] = int(tampered.read_text()) if tampered.exists() else 0
        out["packet_loss_method"] = c.loss
        out["daemon_logs"] = c.log_tally()
        out["daemons"] = {}
        for i in range(args.nodes):
            st = c.status(i) or {}
            keys = ("corrupt_chunks_from_peers", "rotten_chunks_withheld", "integrity_failures")
            out["daemons"][f"n{i}"] = {k: st.get(k) for k in (*keys, "peer_failures")}
        out["faults"] = {
            k: sum(f.applied is not None for f in c.faults if f.kind == k) for k in KINDS
        }
        out["fault_log"] = [asdict(f) for f in c.faults]
        out["load_log"] = load_log(loads)
        out["pool_flip_probes"] = {
            k: sum(f.detail.get("probe") == k for f in c.faults)
            for k in ("flipped", "clean", "error")
        }
        out["broken"] = c.broken
        out["status_at_break"] = c.at_break
    finally:
        c.close()
    return out, c


def report(out: dict[str, Any], name: str) -> None:
    ld, origin = out["loads"], out["origin"]
    rows: list[list[object]] = [
        ["loads attempted", ld["attempted"]],
        ["loads completed", ld["completed"]],
        ["failed, typed", f"{ld['failed_typed']} {ld['failed_typed_by_class'] or ''}"],
        ["failed, untyped (must be 0)", ld["failed_untyped"]],
        ["hung (must be 0)", ld["hung"]],
        ["clients killed mid-load", ld["killed"]],
        ["bytes checked bitwise", f"{ld['bytes_checked']:,}"],
        ["corrupted bytes delivered (must be 0)", ld["corrupted_bytes_delivered"]],
        ["flipped pool bytes served to local opens", f"{ld['rot_served_locally']}"],
        ["pool flip probes (new local open)", f"{out['pool_flip_probes']}"],
        ["chunks tampered by the relay", out["tampered_chunks"]],
        ["daemon logs: caught", f"{out['daemon_logs']}"],
        ["cap violations (must be 0)", out["cap"]["violations"]],
        [
            "max pool tmpfs used / cap",
            f"{max(out['cap']['max_used_by_node']) / out['cap']['cap_bytes']:.3f}",
        ],
    ]
    per_byte = origin["bytes"] / max(1, ld["bytes_checked"])
    rows.append(["origin bytes / bytes loaded", f"{per_byte:.3f}"])
    if "baseline" in out:
        b = out["baseline"]
        base = b["origin_bytes"] / max(1, b["bytes_checked"])
        origin["baseline_per_byte_loaded"] = base
        origin["ratio_vs_fault_free"] = per_byte / base if base else None
        rows.append(["  fault-free run, same load stream", f"{base:.3f} ({b['completed']} loads)"])
        rows.append(["  ratio chaos / fault-free", f"{origin['ratio_vs_fault_free'] or 0:.2f}x"])
    origin["per_byte_loaded"] = per_byte
    print(table(["measure", "value"], rows))
    frows = []
    for k in KINDS:
        rec = [f["recovery_s"] for f in out["fault_log"] if f["kind"] == k and f["applied"]]
        got = [r for r in rec if r is not None]
        frows.append(
            [
                k,
                out["faults"][k],
                f"{len(got)}/{len(rec)}",
                f"{statistics.median(got):.1f}" if got else "-",
                f"{max(got):.1f}" if got else "-",
            ]
        )
    print(table(["fault", "injected", "recovered", "median s", "max s"], frows))
    print(f"packet loss through: {out['packet_loss_method']}")
    print(f"wrote {write_json(name, out)}")


def cleanup_leftovers() -> None:
    """Namespaces and mounts a killed earlier run left behind."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        if line.startswith(f"{PREFIX}-"):
            sh("ip", "netns", "del", line.split()[0], check=False)
    for line in Path("/proc/mounts").read_text().splitlines():
        mnt = line.split()[1]
        if "/mows-chaos-" in mnt:
            sh("umount", "-l", mnt, check=False)


def main() -> None:
    sub = sys.argv[1] if len(sys.argv) > 1 else ""
    if sub == "_client":
        return client_main(sys.argv[2], json.loads(sys.argv[3]))
    if sub == "_probe":
        return probe_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    if sub == "_relay":
        return relay_main(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=None, help="Schedule seed [random, printed].")
    ap.add_argument("--duration", type=float, default=300.0, help="Chaos phase seconds [300].")
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--slots", type=int, default=2, help="Client processes per node [2].")
    ap.add_argument("--cap-mib", type=int, default=48, help="Each node's --max-memory [48].")
    ap.add_argument("--baseline", type=float, default=None, help="Fault-free phase seconds.")
    ap.add_argument(
        "--hang-timeout", type=float, default=150.0, help="A load without progress that long hung."
    )
    ap.add_argument("--prefetch", default="share", choices=["share", "full", "off"])
    ap.add_argument("--keep", action="store_true", help="Keep the logs (and models).")
    ap.add_argument("--quick", action="store_true", help="About a minute, 3 nodes, small models.")
    args = ap.parse_args()
    # (MiB, files): models smaller than the cap, and one bigger (streamed)
    args.models = [(8, 2), (16, 2), (24, 3), (96, 8)]
    if args.quick:
        args.duration, args.nodes, args.cap_mib, args.hang_timeout = 60.0, 3, 24, 100.0
        args.models = [(6, 2), (10, 2), (32, 4)]
    if args.baseline is None:
        args.baseline = 0.0 if args.quick else args.duration / 2
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    why = netbench.preflight()
    if why:
        print(f"bench/chaos.py skipped: {why}")
        sys.exit(0 if args.quick else 2)

    def leave(signum: int, _: object) -> None:  # run the finally blocks, uninterrupted
        for sig in (signal.SIGINT, signal.SIGTERM):  # (timeout(1) signals its group too)
            signal.signal(sig, signal.SIG_IGN)
        sys.exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)
    cleanup_leftovers()
    print(f"seed {args.seed}: replay with --seed {args.seed}", flush=True)
    out, _ = run(args)
    name = "chaos-quick" if args.quick else "chaos"
    report(out, name)
    if out["broken"]:
        print(f"\nINVARIANT BROKEN {out['broken']}\nseed {args.seed}; faults so far:")
        for f in out["fault_log"]:
            if f["applied"] is not None:
                print(f"  {f['start']:7.1f}s {f['kind']:<17} n{f['node']} {f['detail']}")
        sys.exit(1)


if __name__ == "__main__":
    main()
