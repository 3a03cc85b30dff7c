"""Peer transfer between two daemons on loopback vs a bare Python sendfile -> recv_into.

    python bench/peer.py [--size-mib 1024] [--repeat 3] [--quick]

Node A holds the model (warm); node B, with a fresh pool, loads it from A only. The baseline
moves the same bytes the same way with no mows at all: sendfile from a /dev/shm file, recv_into
a new /dev/shm mapping (fresh pages, as B's pool is), 64 MiB chunks over 4 connections (the
daemon's default workers), and also over 1 connection, and into pre-faulted pages for reference.
Interleaved, medians, one run.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
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


def bare_transfer(src: str, conns: int, prefault: bool) -> float:
    """Seconds to move ``src`` over loopback into a new shared-memory mapping."""
    size = os.path.getsize(src)
    dst = tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="mows-bench-peer-")  # noqa: SIM115
    os.ftruncate(dst.fileno(), size)
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
    mm = mmap.mmap(dst.fileno(), size, flags=flags)
    view = memoryview(mm)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    sfd = os.open(src, os.O_RDONLY)

    def serve() -> None:
        def one(conn: socket.socket) -> None:
            with conn:
                while True:
                    req = conn.recv(16)
                    if len(req) < 16:
                        return
                    off, n = int.from_bytes(req[:8], "big"), int.from_bytes(req[8:], "big")
                    sent = 0
                    while sent < n:
                        sent += os.sendfile(conn.fileno(), sfd, off + sent, n - sent)

        for _ in range(conns):
            c, _ = server.accept()
            threading.Thread(target=one, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    free = list(socks)
    lock = threading.Lock()

    def fetch(off: int) -> None:
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

    start = time.perf_counter()
    with ThreadPoolExecutor(conns) as ex:
        list(ex.map(fetch, range(0, size, CHUNK)))
    seconds = time.perf_counter() - start
    for s in socks:
        s.close()
    server.close()
    os.close(sfd)
    view.release()
    mm.close()
    dst.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.repeat = 128, 2

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = make_random_model(base / "model", args.size_mib, files=4)
        size = sum(f.stat().st_size for f in model.iterdir() if f.is_file())
        etcd = EtcdProcess(base).start()
        extra = ["--etcd", etcd.endpoint, "--listen", "127.0.0.1:0", "--chunk-size", "64MiB"]
        (base / "a").mkdir()
        a = DaemonProcess(base / "a", roots=[base], max_memory="8GiB", extra=extra).start()
        try:
            mows_load(a.socket, model)
            # The baseline's source: the same number of bytes in one warm /dev/shm file.
            src = tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="mows-bench-src-")  # noqa: SIM115
            for f in sorted(a.pool_dir.rglob("*")):
                if f.is_file():
                    src.write(f.read_bytes())
            src.flush()
            pool_src = src.name
            t_mows: list[float] = []
            t_bare4: list[float] = []
            t_bare1: list[float] = []
            t_pre4: list[float] = []
            for i in range(args.repeat):
                (base / f"b{i}").mkdir()
                b = DaemonProcess(
                    base / f"b{i}", roots=[base], max_memory="8GiB", extra=extra
                ).start()
                try:
                    deadline = time.monotonic() + 15
                    while len(b.status()["cluster"]["nodes"]) < 2:
                        if time.monotonic() > deadline:
                            raise RuntimeError("B did not see A")
                        time.sleep(0.1)
                    summary = mows_load(b.socket, model)
                    assert summary["bytes_from_peers"] == summary["bytes"], summary
                    t_mows.append(summary["seconds"])
                finally:
                    b.stop()
                time.sleep(1)
                t_bare4.append(bare_transfer(pool_src, 4, prefault=False))
                t_bare1.append(bare_transfer(pool_src, 1, prefault=False))
                t_pre4.append(bare_transfer(pool_src, 4, prefault=True))
                time.sleep(1)
            src.close()
        finally:
            a.stop()
            etcd.stop()
            shutil.rmtree(a.pool_dir, ignore_errors=True)

    gib = size / 2**30
    rows = []
    for name, ts in (
        ("mows: node B loads from node A (4 workers, fresh pool)", t_mows),
        ("bare sendfile -> recv_into, 4 conns, fresh pages", t_bare4),
        ("bare sendfile -> recv_into, 1 conn, fresh pages", t_bare1),
        ("bare sendfile -> recv_into, 4 conns, pre-faulted", t_pre4),
    ):
        results[name] = {"runs_s": ts, "median_s": median(ts), "gib_per_s": gib / median(ts)}
        rows.append([name, median(ts), f"{gib / median(ts):.2f}"])
    ratio = median(t_bare4) / median(t_mows)
    print(f"{size / 2**20:.0f} MiB model, median of {args.repeat}, loopback")
    print(table(["transfer", "seconds", "GiB/s"], rows))
    print(f"mows / bare (4 conns, fresh pages) = {ratio:.2f} (target >= 0.70)")
    out = write_json(
        "peer-quick" if args.quick else "peer", {"bytes": size, "results": results, "ratio": ratio}
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
