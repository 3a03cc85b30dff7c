"""The S3 source against the HTTP source, serving the same model files.

    python bench/sources.py [--size-mib 256] [--repeat 3] [--quick]

S3: moto's standalone server on loopback (real HTTP, SigV4), the model uploaded under a prefix.
HTTP: the CountingOrigin of bench/_common.py (Python's http.server, range reads) on the same
files. Each run loads the model (crc32.txt present, 16 MiB chunks) through a fresh daemon
(fresh pool); reported: origin bytes/s into the pool (bytes_from_origin / load seconds) and
the daemon's CPU seconds per GiB (psutil, its whole process), medians of interleaved runs.
Both origins are single Python processes that share the two cores with the daemon: the
absolute rates are theirs as much as the daemon's; the CPU per GiB is the daemon's own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import CountingOrigin, median, table, write_json  # noqa: E402

from tests.daemons import (  # noqa: E402
    DaemonProcess,
    MotoServer,
    generate_crc32,
    make_random_model,
    mows_load,
)


def one(work: Path, url: str, env: dict[str, str]) -> tuple[float, float]:
    """(origin bytes/s, daemon CPU s/GiB) of one cold load through a fresh daemon."""
    work.mkdir()
    root = url.rsplit("/", 1)[0]
    extra = ["--chunk-size", "16MiB", "--prefetch", "off"]
    d = DaemonProcess(work, roots=[root], max_memory="4GiB", extra=extra, env=env).start()
    try:
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        c0 = proc.cpu_times()
        out = mows_load(d.socket, url)  # type: ignore[arg-type]
        c1 = proc.cpu_times()
        origin = int(out["bytes_from_origin"])
        assert origin > 0, out
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        return origin / float(out["seconds"]), cpu / (origin / 2**30)
    finally:
        d.stop()
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.repeat = 64, 1
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = make_random_model(base / "www" / "model", args.size_mib, files=4)
        generate_crc32(model)
        moto = MotoServer(base).start()
        http = CountingOrigin(base / "www")
        try:
            s3_url = moto.upload("bench", "models/model", model)
            urls = {"s3 (moto)": (s3_url, moto.env), "http": (f"{http.url}/model", moto.env)}
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in urls}
            for i in range(args.repeat):  # interleaved: drift hits both alike
                for name, (url, env) in urls.items():
                    samples[name].append(one(base / f"run{i}-{name.split()[0]}", url, env))
        finally:
            http.shutdown()
            moto.stop()
    rows, results = [], {}
    for name, s in samples.items():
        rate = median([r for r, _ in s]) / 2**20
        cpu = median([c for _, c in s])
        rows.append([name, rate, cpu])
        results[name] = {"origin_mib_per_s": rate, "daemon_cpu_s_per_gib": cpu, "samples": s}
    print(table(["source", "origin MiB/s", "daemon CPU s/GiB"], rows))
    out: dict[str, Any] = {"args": vars(args), "results": results}
    path = write_json("sources-quick" if args.quick else "sources", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
