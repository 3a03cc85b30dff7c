"""An emulated cluster: N nodes and a remote origin in network namespaces, links rate-limited.

    sudo python bench/cluster.py [--nodes 2,4,8] [--size-mib 256] [--origin-mbit 200]
                                 [--node-mbit 500] [--chunk-mib auto] [--quick]

Topology: a switch namespace holds a bridge; an origin namespace (nginx serving the model,
egress limited to B_origin with tbf: the shared remote-storage bandwidth), an etcd namespace,
and N node namespaces whose links are limited to B_node in both directions. Scenarios, for
each N:
  (a) pull:      N instances each read the whole model from the origin at once (4 parallel
                 range readers each, as engines reading a network filesystem do);
  (b) cold:      N daemons with empty pools; N `mows load` at once;
  (c) scale-out: N-1 nodes warm, one new node joins and loads.
Every loaded copy is checked against crc32.txt (the daemon refuses anything else, and the
bench re-reads each pool file). Prints a table, writes JSON and a PNG plot to bench/results/.
Namespaces, processes and pools are removed on exit, Ctrl-C or failure included.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import RESULTS, table, write_json  # noqa: E402

from mows.manifest._model import choose_chunk_size  # noqa: E402
from tests.daemons import generate_crc32, make_random_model  # noqa: E402

PREFIX = "mowsb"
SUBNET = "10.250.0"
ORIGIN_IP, ETCD_IP = f"{SUBNET}.2", f"{SUBNET}.3"
PY = sys.executable


def chunk_flag(chunk_mib: str) -> list[str]:
    """``--chunk-size`` for the daemons; none at "auto", the daemon's default."""
    return [] if chunk_mib == "auto" else ["--chunk-size", f"{chunk_mib}MiB"]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


class Net:
    """The namespaces, veths and qdiscs; ``close`` removes every one of them."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.switch = f"{PREFIX}-sw"
        self._add_ns(self.switch)
        sh(*in_ns(self.switch, "ip", "link", "add", "br0", "type", "bridge"))
        sh(*in_ns(self.switch, "ip", "link", "set", "br0", "up"))

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))

    def host(self, name: str, ip: str, mbit_out: float | None, mbit_in: float | None) -> str:
        """A namespace on the bridge; egress and ingress limited to the given rates."""
        ns = f"{PREFIX}-{name}"
        self._add_ns(ns)
        inner, outer = f"{name}-i"[:15], f"{name}-o"[:15]
        sh(
            "ip",
            "link",
            "add",
            inner,
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            outer,
            "netns",
            self.switch,
        )
        sh(*in_ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", inner))
        sh(*in_ns(ns, "ip", "link", "set", inner, "up"))
        sh(*in_ns(self.switch, "ip", "link", "set", outer, "master", "br0"))
        sh(*in_ns(self.switch, "ip", "link", "set", outer, "up"))
        for where, dev, rate in ((ns, inner, mbit_out), (self.switch, outer, mbit_in)):
            if rate:
                sh(
                    *in_ns(
                        where,
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        f"{rate}mbit",
                        "burst",
                        "256kb",
                        "latency",
                        "100ms",
                    )
                )
        return ns

    def link_bytes(self, name: str) -> tuple[int, int]:
        """(bytes sent, bytes received) by a host, read on its side of the link."""
        ns, dev = f"{PREFIX}-{name}", f"{name}-i"[:15]
        out = sh(
            *in_ns(
                ns,
                "cat",
                f"/sys/class/net/{dev}/statistics/tx_bytes",
                f"/sys/class/net/{dev}/statistics/rx_bytes",
            )
        ).stdout.split()
        return int(out[0]), int(out[1])

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


class Procs:
    """Every process the bench starts, stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        fh = open(log, "ab")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        fh.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


NGINX_CONF = """daemon off; user root root; worker_processes 2; pid {base}/nginx.pid;
error_log {base}/nginx-error.log warn; events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; client_body_temp_path {base}/nb; proxy_temp_path {base}/np;
fastcgi_temp_path {base}/nf; uwsgi_temp_path {base}/nu; scgi_temp_path {base}/ns;
types {{ }} default_type application/octet-stream;
server {{ listen {ip}:8080; root {root}; location / {{ autoindex on; autoindex_format json; }} }} }}
"""

PULL = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
from mows.manifest import parse_crc32
from mows.sources import open_source
from mows import crc32
from mows._crc import combine_chunks
url = sys.argv[1]
t = time.perf_counter()
src = open_source(url, connections=4)
files = src.list_files()
crc_size = next(f.size for f in files if f.path == "crc32.txt")
expected = parse_crc32(src.read_range("crc32.txt", 0, crc_size))
block = 4 << 20
def part(f, off):
    buf = bytearray(min(block, f.size - off))
    src.read_into(f.path, off, memoryview(buf))
    return crc32(buf), len(buf)
with ThreadPoolExecutor(4) as ex:
    for f in files:
        if f.path in expected:
            got = combine_chunks(ex.map(lambda o: part(f, o), range(0, f.size, block)))
            assert got == expected[f.path], f.path
print(time.perf_counter() - t)
"""


class Cluster:
    def __init__(self, args: argparse.Namespace, base: Path, model: Path) -> None:
        self.args, self.base, self.model = args, base, model
        self.net = Net()
        self.procs = Procs()
        self.daemons: dict[int, subprocess.Popen[bytes]] = {}
        self.url = f"http://{ORIGIN_IP}:8080/model"
        self.net.host("origin", ORIGIN_IP, args.origin_mbit, None)
        self.net.host("etcd", ETCD_IP, None, None)
        conf = base / "nginx.conf"
        conf.write_text(NGINX_CONF.format(base=base, ip=ORIGIN_IP, root=model.parent))
        self.procs.start(
            in_ns(
                f"{PREFIX}-origin",
                shutil.which("nginx") or "/usr/sbin/nginx",
                "-c",
                str(conf),
                "-p",
                str(base),
            ),
            base / "nginx.log",
        )
        etcd_url = f"http://{ETCD_IP}:2379"
        self.procs.start(
            in_ns(
                f"{PREFIX}-etcd",
                "etcd",
                "--data-dir",
                str(base / "etcd"),
                "--listen-client-urls",
                etcd_url,
                "--advertise-client-urls",
                etcd_url,
                "--listen-peer-urls",
                f"http://{ETCD_IP}:2380",
            ),
            base / "etcd.log",
        )
        self.etcd_url = etcd_url
        self.secret = base / "secret"
        self.secret.write_text(os.urandom(24).hex())
        for i in range(max(args.nodes)):
            self.net.host(f"n{i}", f"{SUBNET}.{10 + i}", args.node_mbit, args.node_mbit)
        wait_for(
            lambda: (
                sh(
                    *in_ns(
                        f"{PREFIX}-n0", "curl", "-sf", "-o", "/dev/null", f"{self.url}/crc32.txt"
                    ),
                    check=False,
                ).returncode
                == 0
            ),
            20,
            "the origin",
        )

    def sock(self, i: int) -> str:
        return str(self.base / f"n{i}.sock")

    def pool(self, i: int) -> str:
        return f"/dev/shm/{PREFIX}-pool-{i}"

    def start_daemon(self, i: int) -> None:
        shutil.rmtree(self.pool(i), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock(i))
        args = [
            PY,
            "-m",
            "mows",
            "serve",
            "--model-path",
            self.url,
            "--max-memory",
            "4",
            "--socket",
            self.sock(i),
            "--pool-dir",
            self.pool(i),
            "--etcd",
            self.etcd_url,
            "--cluster",
            "bench",
            "--listen",
            f"{SUBNET}.{10 + i}:7470",
            "--cluster-secret-file",
            str(self.secret),
            *chunk_flag(self.args.chunk_mib),
            "--lease-ttl",
            "3",
            "--prefetch",
            "off",  # a cold start, measured: no idle prefetch before the loads
        ]
        self.daemons[i] = self.procs.start(in_ns(f"{PREFIX}-n{i}", *args), self.base / f"n{i}.log")
        wait_for(lambda: os.path.exists(self.sock(i)), 30, f"daemon n{i}")

    def stop_daemons(self) -> None:
        for i, p in list(self.daemons.items()):
            self.procs.stop(p)
            shutil.rmtree(self.pool(i), ignore_errors=True)
        self.daemons.clear()
        time.sleep(4)  # leases expire: the next scenario starts from an empty cluster

    def wait_members(self, n: int) -> None:
        def ok() -> bool:
            out = sh(PY, "-m", "mows", "status", "--json", "--socket", self.sock(0), check=False)
            return out.returncode == 0 and len(json.loads(out.stdout)["cluster"]["nodes"]) >= n

        wait_for(ok, 30, f"{n} cluster members")

    def load(self, nodes: list[int]) -> tuple[float, list[dict[str, Any]]]:
        """All ``nodes`` load at once; seconds until the last is done, and each summary."""
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                in_ns(
                    f"{PREFIX}-n{i}",
                    PY,
                    "-m",
                    "mows",
                    "load",
                    "--json",
                    "--no-progress",
                    "--socket",
                    self.sock(i),
                    self.url,
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in nodes
        ]
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"mows load failed: {stderr}")
            out.append(json.loads(stdout))
        seconds = time.perf_counter() - start
        for i in nodes:
            self.check_pool(i)
        return seconds, out

    def check_pool(self, i: int) -> None:
        """Bitwise check of a node's copy: every pool file's CRC equals crc32.txt."""
        from mows import crc32
        from mows.manifest import parse_crc32

        expected = parse_crc32((self.model / "crc32.txt").read_bytes())
        pools = [p for p in Path(self.pool(i)).iterdir() if p.is_dir()]  # one version
        assert len(pools) == 1, pools
        for rel, want in expected.items():
            assert crc32((pools[0] / rel).read_bytes()) == want, f"n{i}: {rel}"

    def pull(self, n: int) -> float:
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                in_ns(f"{PREFIX}-n{i}", PY, "-c", PULL, self.url),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(n)
        ]
        for p in procs:
            _, err = p.communicate(timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(f"pull failed: {err}")
        return time.perf_counter() - start

    def close(self) -> None:
        self.procs.close()
        for i in range(max(self.args.nodes)):
            shutil.rmtree(self.pool(i), ignore_errors=True)
        self.net.close()


def counters(c: Cluster, n: int) -> dict[str, tuple[int, int]]:
    return {name: c.net.link_bytes(name) for name in ["origin", *(f"n{i}" for i in range(n))]}


def delta(after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]) -> dict[str, Any]:
    return {k: {"tx": after[k][0] - before[k][0], "rx": after[k][1] - before[k][1]} for k in after}


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="mows-bench-cluster-"))
    model = make_random_model(base / "www" / "model", args.size_mib, files=4)
    generate_crc32(model)
    size = sum(f.stat().st_size for f in model.iterdir())
    cluster = Cluster(args, base, model)
    atexit.register(cluster.close)
    results: dict[str, Any] = {"bytes": size, "args": vars(args), "runs": []}
    model_bytes = sum(f.stat().st_size for f in model.iterdir() if f.name != "crc32.txt")
    explicit = 0 if args.chunk_mib == "auto" else int(args.chunk_mib) << 20
    results["chunk_size"] = choose_chunk_size(model_bytes, explicit)
    try:
        for n in args.nodes:
            row: dict[str, Any] = {"n": n}
            before = counters(cluster, n)
            row["pull_s"] = cluster.pull(n)
            row["pull_links"] = delta(counters(cluster, n), before)

            for i in range(n):
                cluster.start_daemon(i)
            cluster.wait_members(n)
            before = counters(cluster, n)
            row["cold_s"], summaries = cluster.load(list(range(n)))
            row["cold_links"] = delta(counters(cluster, n), before)
            row["cold_origin_bytes"] = sum(s["bytes_from_origin"] for s in summaries)
            served = [row["cold_links"][f"n{i}"]["tx"] for i in range(n)]
            row["cold_served_max_over_mean"] = max(served) * n / sum(served) if n > 1 else 1.0
            cluster.stop_daemons()

            if n > 1:
                for i in range(n - 1):
                    cluster.start_daemon(i)
                cluster.wait_members(n - 1)
                cluster.load(list(range(n - 1)))
                cluster.start_daemon(n - 1)
                cluster.wait_members(n)
                before = counters(cluster, n)
                row["scale_s"], (summary,) = cluster.load([n - 1])
                row["scale_links"] = delta(counters(cluster, n), before)
                row["scale_origin_bytes"] = summary["bytes_from_origin"]
                row["scale_daemon_s"] = summary["seconds"]
                cluster.stop_daemons()
            results["runs"].append(row)
            print(
                f"N={n}: pull {row['pull_s']:.1f}s, cold {row['cold_s']:.1f}s, "
                f"scale-out {row.get('scale_s', float('nan')):.1f}s",
                flush=True,
            )
    finally:
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
    return results


def report(results: dict[str, Any], args: argparse.Namespace, name: str) -> None:
    size = results["bytes"]
    bits = size * 8 / 1e6  # megabits
    rows = []
    for r in results["runs"]:
        n = r["n"]
        origin_util = r["cold_links"]["origin"]["tx"] * 8 / 1e6 / (r["cold_s"] * args.origin_mbit)
        pull_util = r["pull_links"]["origin"]["tx"] * 8 / 1e6 / (r["pull_s"] * args.origin_mbit)
        node_rx = [r["cold_links"][f"n{i}"]["rx"] for i in range(n)]
        rows.append(
            [
                n,
                "pull",
                r["pull_s"],
                "1.00x",
                f"{r['pull_links']['origin']['tx'] / size:.2f}x",
                f"{pull_util:.0%} origin",
            ]
        )
        rows.append(
            [
                n,
                "mows cold",
                r["cold_s"],
                f"{r['pull_s'] / r['cold_s']:.2f}x",
                f"{r['cold_origin_bytes'] / size:.2f}x",
                f"{origin_util:.0%} origin, node rx max {max(node_rx) / size:.2f}x model, "
                f"served max/mean {r['cold_served_max_over_mean']:.2f}",
            ]
        )
        if "scale_s" in r:
            ideal = bits / args.node_mbit
            rx = r["scale_links"][f"n{n - 1}"]["rx"]
            rows.append(
                [
                    n,
                    "mows scale-out",
                    r["scale_s"],
                    f"{r['pull_s'] / n / r['scale_s']:.2f}x",
                    f"{r['scale_origin_bytes'] / size:.2f}x",
                    f"{rx * 8 / 1e6 / (r['scale_s'] * args.node_mbit):.0%} of its link; "
                    f"{r['scale_s'] / ideal:.2f}x size/B_node",
                ]
            )
    print(
        f"\nmodel {size / 2**20:.0f} MiB, B_origin {args.origin_mbit} Mbit/s, "
        f"B_node {args.node_mbit} Mbit/s, chunks {results['chunk_size'] / 2**20:g} MiB"
        f"{' (auto)' if args.chunk_mib == 'auto' else ''}"
    )
    print(table(["N", "scenario", "seconds", "speedup vs pull", "origin bytes", "links"], rows))
    print("(scale-out speedup: against one instance's share of the pull, pull_s / N)")
    out = write_json(name, results)
    print(f"wrote {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    ns = [r["n"] for r in results["runs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["pull_s"] for r in results["runs"]], "o-", label="pull from origin")
    ax.plot(ns, [r["cold_s"] for r in results["runs"]], "s-", label="mows cold start")
    scale = [(r["n"], r["scale_s"]) for r in results["runs"] if "scale_s" in r]
    if scale:
        ax.plot(*zip(*scale, strict=True), "^-", label="mows scale-out (1 new node)")
    ax.set_xlabel("instances N")
    ax.set_ylabel("seconds until all loaded")
    ax.set_title(
        f"{size / 2**20:.0f} MiB model, origin {args.origin_mbit} Mbit/s, "
        f"links {args.node_mbit} Mbit/s"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    png = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "etcd", "curl"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        return "needs nginx"
    probe = f"{PREFIX}-probe"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "cannot create network namespaces here"
    sh("ip", "netns", "del", probe, check=False)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", default="2,4,8", help="Comma-separated cluster sizes.")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--origin-mbit", type=float, default=200)
    ap.add_argument("--node-mbit", type=float, default=500)
    ap.add_argument(
        "--chunk-mib", default="auto", help="Daemon chunk size in MiB [auto: the daemon's default]."
    )
    ap.add_argument("--quick", action="store_true", help="N=2, a 32 MiB model: a smoke run.")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.size_mib = "2", 32
    args.nodes = [int(x) for x in str(args.nodes).split(",")]
    why = preflight()
    if why:
        print(f"bench/cluster.py skipped: {why}")
        sys.exit(0 if args.quick else 2)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))  # run the finally blocks
    results = run(args)
    report(results, args, "cluster-quick" if args.quick else "cluster")


if __name__ == "__main__":
    main()
