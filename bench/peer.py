"""Peer transfer between two daemons on loopback vs a bare Python sendfile -> recv_into.

    python bench/peer.py [--size-mib 1024] [--repeat 3] [--quick]

Node A holds the model (warm); node B, with a fresh pool, loads it from A only. mows runs twice:
without a cluster secret (no frame tags; chunk digests still checked) and with one
(authentication on). Each has its own node A, in its own cluster on the same etcd. A sender
computes a chunk's BLAKE3 digest the first time a peer asks for it, so one untimed load from
each A (a throwaway B) comes first: the timed runs are the steady state, and that first load is
reported apart ("cold digests"). The baseline moves the same bytes the same way with no mows at
all: sendfile from a /dev/shm file, recv_into a new /dev/shm mapping (fresh pages, as B's pool
is), 64 MiB requests over 4 connections (the daemon's default workers), and also over 1
connection, and into pre-faulted pages for reference. CPU seconds per GiB on both ends: for
mows, utime+stime of B's daemon (receiver) and A's daemon (sender) over B's load; for the
baseline, the thread CPU time of the receiving and of the sending threads. Loopback puts much
of the receive path's kernel work on the sending thread. Interleaved, medians, one run.
"""

from __future__ import annotations

import argparse
import mmap
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import median, table, write_json  # noqa: E402

from tests.daemons import DaemonProcess, EtcdProcess, make_random_model, mows_load  # noqa: E402

CHUNK = 64 * 2**20
TICK = os.sysconf("SC_CLK_TCK")

# (seconds, receiver CPU-s, sender CPU-s) of one transfer
Run = tuple[float, float, float]


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds (/proc/PID/stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields[0] is field 3


def bare_transfer(src: str, conns: int, prefault: bool) -> Run:
    """Move ``src`` over loopback into a new shared-memory mapping."""
    size = os.path.getsize(src)
    dst = tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="mows-bench-peer-")  # noqa: SIM115
    os.ftruncate(dst.fileno(), size)
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
    mm = mmap.mmap(dst.fileno(), size, flags=flags)
    view = memoryview(mm)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    sfd = os.open(src, os.O_RDONLY)
    cpu = {"recv": 0.0, "send": 0.0}
    lock = threading.Lock()
    servers: list[threading.Thread] = []

    def serve() -> None:
        def one(conn: socket.socket) -> None:
            t0 = time.thread_time()
            with conn:
                while True:
                    req = conn.recv(16)
                    if len(req) < 16:
                        break
                    off, n = int.from_bytes(req[:8], "big"), int.from_bytes(req[8:], "big")
                    sent = 0
                    while sent < n:
                        sent += os.sendfile(conn.fileno(), sfd, off + sent, n - sent)
            with lock:
                cpu["send"] += time.thread_time() - t0

        for _ in range(conns):
            c, _ = server.accept()
            t = threading.Thread(target=one, args=(c,), daemon=True)
            servers.append(t)
            t.start()

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    free = list(socks)

    def fetch(off: int) -> None:
        t0 = time.thread_time()
        with lock:
            s = free.pop()
        n = min(CHUNK, size - off)
        s.sendall(off.to_bytes(8, "big") + n.to_bytes(8, "big"))
        got = 0
        part = view[off : off + n]
        while got < n:
            got += s.recv_into(part[got:])
        part.release()
        with lock:
            free.append(s)
            cpu["recv"] += time.thread_time() - t0

    acceptor.join()  # every connection accepted, its server thread started
    start = time.perf_counter()
    with ThreadPoolExecutor(conns) as ex:
        list(ex.map(fetch, range(0, size, CHUNK)))
    seconds = time.perf_counter() - start
    for s in socks:
        s.close()
    for t in servers:
        t.join()
    server.close()
    os.close(sfd)
    view.release()
    mm.close()
    dst.close()
    return seconds, cpu["recv"], cpu["send"]


def mows_transfer(dirname: Path, a: DaemonProcess, model: Path, extra: list[str]) -> Run:
    """A fresh node B (``extra``: A's cluster and secret) loads ``model``, from A only."""
    dirname.mkdir()
    b = DaemonProcess(dirname, roots=[dirname.parent], max_memory="8GiB", extra=extra).start()
    try:
        deadline = time.monotonic() + 15
        while len(b.status()["cluster"]["nodes"]) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("B did not see A")
            time.sleep(0.1)
        assert a.proc is not None and b.proc is not None
        a0, b0 = proc_cpu(a.proc.pid), proc_cpu(b.proc.pid)
        summary = mows_load(b.socket, model)
        a1, b1 = proc_cpu(a.proc.pid), proc_cpu(b.proc.pid)
        assert summary["bytes_from_peers"] == summary["bytes"], summary
        return summary["seconds"], b1 - b0, a1 - a0
    finally:
        b.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--chunk-size", default="auto", help="the daemons' --chunk-size [auto: their default]"
    )
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.repeat = 128, 2

    names = {
        "plain": "mows: B loads from A, no cluster secret (4 workers, fresh pool)",
        "auth": "mows: B loads from A, cluster secret (authenticated)",
        "bare4": "bare sendfile -> recv_into, 4 conns, fresh pages",
        "bare1": "bare sendfile -> recv_into, 1 conn, fresh pages",
        "pre4": "bare sendfile -> recv_into, 4 conns, pre-faulted",
    }
    runs: dict[str, list[Run]] = {k: [] for k in names}
    cold: dict[str, Run] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = make_random_model(base / "model", args.size_mib, files=4)
        size = sum(f.stat().st_size for f in model.iterdir() if f.is_file())
        secret = base / "secret"
        secret.write_text(secrets.token_hex(32))  # 64 bytes; nothing for the reader to strip
        secret.chmod(0o600)
        etcd = EtcdProcess(base).start()
        common = ["--etcd", etcd.endpoint, "--listen", "127.0.0.1:0"]
        common += ["--chunk-size", args.chunk_size]  # auto: 4 MiB for a 1 GiB model
        extra = {
            "plain": [*common, "--cluster", "bench-plain"],
            "auth": [*common, "--cluster", "bench-auth", "--cluster-secret-file", str(secret)],
        }
        nodes: dict[str, DaemonProcess] = {}
        try:
            for k in ("plain", "auth"):
                (base / f"a-{k}").mkdir()
                nodes[k] = DaemonProcess(
                    base / f"a-{k}", roots=[base], max_memory="8GiB", extra=extra[k]
                ).start()
                mows_load(nodes[k].socket, model)
            # The baseline's source: the same number of bytes in one warm /dev/shm file.
            src = tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="mows-bench-src-")  # noqa: SIM115
            for f in sorted(nodes["plain"].pool_dir.rglob("*")):
                if f.is_file():
                    src.write(f.read_bytes())
            src.flush()
            for k in ("plain", "auth"):  # untimed: each A computes its digests here
                cold[k] = mows_transfer(base / f"b-{k}-cold", nodes[k], model, extra[k])
            for i in range(args.repeat):
                for k in ("plain", "auth"):
                    runs[k].append(mows_transfer(base / f"b-{k}{i}", nodes[k], model, extra[k]))
                    time.sleep(1)
                runs["bare4"].append(bare_transfer(src.name, 4, prefault=False))
                runs["bare1"].append(bare_transfer(src.name, 1, prefault=False))
                runs["pre4"].append(bare_transfer(src.name, 4, prefault=True))
                time.sleep(1)
            src.close()
        finally:
            for a in nodes.values():
                a.stop()
            etcd.stop()

    gib = size / 2**30
    med: dict[str, dict[str, float]] = {}
    rows = []
    for k, name in names.items():
        secs, recv, send = (median([r[j] for r in runs[k]]) for j in range(3))
        med[k] = {"s": secs, "gibs": gib / secs, "recv": recv / gib, "send": send / gib}
        rows.append([name, secs, f"{gib / secs:.2f}", f"{recv / gib:.2f}", f"{send / gib:.2f}"])
    for k in ("plain", "auth"):
        secs, recv, send = cold[k]
        rows.append(
            [
                f"  first load from A ({k}, cold digests, not in medians)",
                secs,
                f"{gib / secs:.2f}",
                f"{recv / gib:.2f}",
                f"{send / gib:.2f}",
            ]
        )
    ratio = med["bare4"]["s"] / med["auth"]["s"]
    ratio_plain = med["bare4"]["s"] / med["plain"]["s"]
    auth_cost = med["plain"]["s"] / med["auth"]["s"]
    auth_cpu = med["auth"]["recv"] - med["plain"]["recv"]
    cpu_ratio = med["auth"]["recv"] / med["bare4"]["recv"]
    cpu_ratio_plain = med["plain"]["recv"] / med["bare4"]["recv"]
    print(f"{size / 2**20:.0f} MiB model, median of {args.repeat}, loopback")
    headers = ["transfer", "seconds", "GiB/s", "receiver CPU-s/GiB", "sender CPU-s/GiB"]
    print(table(headers, rows))
    print(f"mows (secret) / bare (4 conns, fresh pages) throughput = {ratio:.2f} (target >= 0.9)")
    print(f"mows (no secret) / bare throughput = {ratio_plain:.2f}")
    print(
        f"authentication: secret / no secret throughput = {auth_cost:.2f}, "
        f"receiver CPU {auth_cpu:+.2f} s/GiB"
    )
    print(
        f"receiver CPU-s/GiB, mows / bare (4 conns): secret {cpu_ratio:.2f}x, "
        f"no secret {cpu_ratio_plain:.2f}x (target <= 1.5x)"
    )

    def one(r: Run) -> dict[str, float]:
        return {"s": r[0], "receiver_cpu_s": r[1], "sender_cpu_s": r[2]}

    results: dict[str, Any] = {
        names[k]: {
            "runs": [one(r) for r in runs[k]],
            "runs_s": [r[0] for r in runs[k]],
            "median_s": med[k]["s"],
            "gib_per_s": med[k]["gibs"],
            "receiver_cpu_s_per_gib": med[k]["recv"],
            "sender_cpu_s_per_gib": med[k]["send"],
        }
        for k in names
    }
    out = write_json(
        "peer-quick" if args.quick else "peer",
        {
            "bytes": size,
            "results": results,
            "first_load_cold_digests": {k: one(r) for k, r in cold.items()},
            "ratio": ratio,  # mows with a cluster secret / bare, 4 conns, fresh pages
            "ratio_no_secret": ratio_plain,
            "auth_throughput_ratio": auth_cost,
            "auth_receiver_cpu_s_per_gib": auth_cpu,
            "receiver_cpu_ratio": cpu_ratio,
            "receiver_cpu_ratio_no_secret": cpu_ratio_plain,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
