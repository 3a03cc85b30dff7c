"""Single-node figures: cold fill, warm open, touching every byte, memory of N processes.

    python bench/local.py [--quick] [--repeat 5] [--workdir DIR] [--parts abcde]

(a) cold load through mows (the daemon fills a fresh pool from a local source whose files are
    in the page cache) vs `cp` of the same files into a fresh directory in /dev/shm;
(b) warm open by another process: time until `load_state_dict` returns, for two model sizes,
    vs an eager `safetensors.torch.load(open(f, "rb").read())` of the same files;
(c) copying every tensor of the warm model into a preallocated destination (as an engine does
    on its way to the GPU), in a fresh process, vs the same copy from an anonymous buffer;
(d) memory (sum of PSS growth) of 4 processes holding the model via mows vs eager safetensors;
(e) origin requests of an open over HTTP (a counting origin server on loopback): cold, warm,
    and a warm open with the origin stopped (served from the pool, with a warning).
All sides are measured interleaved in one run; medians are printed and written to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import CountingOrigin, median, table, write_json  # noqa: E402

from tests.daemons import DaemonProcess, mows_load  # noqa: E402


def make_model(path: Path, mib: int, files: int = 4, tensors: int = 32) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(mib)
    per_tensor = mib * 2**20 // files // tensors // 2
    for i in range(files):
        data = {
            f"f{i}.t{j}": rng.integers(0, 2**16, per_tensor, dtype=np.uint16).view(np.float16)
            for j in range(tensors)
        }
        save_file(data, str(path / f"model-{i:05d}-of-{files:05d}.safetensors"))
    subprocess.run([sys.executable, "-m", "mows", "crc32", "generate", str(path)], check=True)
    return path


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user, system) a live process has used, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def child(code: str, *args: str) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one JSON value."""
    prog = "import sys, json, time, os\n" + code
    out = subprocess.run(
        [sys.executable, "-c", prog, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


WARM_OPEN = """
import mows, torch
t = time.perf_counter()
sd = mows.load_state_dict(sys.argv[1], socket=sys.argv[2], fallback=False)
print(json.dumps(time.perf_counter() - t))
"""

EAGER_OPEN = """
import glob, torch
from safetensors.torch import load
t = time.perf_counter()
sd = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    with open(f, "rb") as fh:
        sd.update(load(fh.read()))
print(json.dumps(time.perf_counter() - t))
"""

COPY = """
import mows, torch
torch.set_num_threads(1)
mode, path, sock = sys.argv[1:4]
sd = mows.load_state_dict(path, socket=sock, fallback=False)
if mode == "anon":  # the same bytes in ordinary, already-touched process memory
    sd = {k: v.clone() for k, v in sd.items()}
dst = {k: torch.empty_like(v) for k, v in sd.items()}
for v in dst.values():
    v.fill_(0)  # pre-fault the destination
t = time.perf_counter()
for k, v in sd.items():
    dst[k].copy_(v)
print(json.dumps(time.perf_counter() - t))
"""

HOLD = """
import mows, torch, glob
from safetensors.torch import load
def pss():
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
mode, path, sock = sys.argv[1:4]
before = pss()
if mode == "mows":
    sd = mows.load_state_dict(path, socket=sock, fallback=False)
else:
    sd = {}
    for f in sorted(glob.glob(path + "/*.safetensors")):
        with open(f, "rb") as fh:
            sd.update(load(fh.read()))
total = sum(float(v.view(-1)[:: 1024].float().sum()) for v in sd.values())  # touch pages
for v in sd.values():
    v.view(torch.uint8).sum()  # every byte
print("held", flush=True)
sys.stdin.readline()  # measure only while all N processes hold the model
print(json.dumps(pss() - before), flush=True)
sys.stdin.readline()
"""


WARM_REQUESTS = """
import mows, warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    t = time.perf_counter()
    with mows.open_model(sys.argv[1], socket=sys.argv[2], fallback=False) as h:
        n = len(h.keys())
    s = time.perf_counter() - t
print(json.dumps({"seconds": s, "tensors": n,
                  "warnings": [type(x.message).__name__ for x in w]}))
"""


def origin_requests(base: Path, model: Path, sock_dir: Path) -> dict[str, Any]:
    """(e) Requests the origin answers for a cold open, a warm one, and a warm open with the
    origin stopped."""
    www = base / "www"
    shutil.copytree(model, www / "m")
    origin = CountingOrigin(www)
    url = f"{origin.url}/m"
    # The daemon's default chunk size (auto), not the tests' 1 MiB: requests per open are
    # what an operator would see.
    d = DaemonProcess(
        sock_dir, roots=[origin.url], max_memory="8GiB", extra=["--chunk-size", "auto"]
    ).start()
    out: dict[str, Any] = {"files": len(list(model.iterdir()))}
    try:
        for kind in ("cold", "warm"):
            before = len(origin.requests)
            r = child(WARM_REQUESTS, url, d.socket)
            out[kind] = {"requests": len(origin.requests) - before, "seconds": r["seconds"]}
        out["warm_request_list"] = origin.requests[-out["warm"]["requests"] :]
        origin.down = True
        origin.shutdown()
        origin.server_close()
        r = child(WARM_REQUESTS, url, d.socket)
        out["origin_down"] = {"seconds": r["seconds"], "warnings": r["warnings"]}
    finally:
        d.stop()
    return out


def hold_memory(mode: str, path: Path, sock: str, n: int = 4) -> int:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "import sys, json\n" + HOLD, mode, str(path), sock],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for p in procs:  # all hold the model at once before anyone measures
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
    total = 0
    for p in procs:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("\n")
        p.stdin.flush()
        total += int(json.loads(p.stdout.readline()))
    for p in procs:
        p.communicate("\n", timeout=60)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Small models and few repeats.")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--parts",
        default="abcde",
        help="Which parts to run, e.g. 'a' for the cold fill alone [abcde]. A subset\n"
        "writes results/local[-quick]-<parts>.json, not the full run's file.",
    )
    args = ap.parse_args()
    parts = set(args.parts)
    if not parts or not parts <= set("abcde"):
        ap.error("--parts: letters among abcde")
    small, big, cold = (64, 256, 128) if args.quick else (512, 2048, 1024)
    repeat = 3 if args.quick else args.repeat

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        base = Path(tmp)
        m_cold = make_model(base / "cold", cold) if "a" in parts else base / "cold"
        warm = parts & set("bcde")
        m_small = make_model(base / "small", small) if warm else base / "small"
        m_big = make_model(base / "big", big) if parts & set("bc") else base / "big"
        for m in (m_cold, m_small, m_big):
            if m.exists():
                subprocess.run(
                    ["cat", *map(str, m.glob("*"))], stdout=subprocess.DEVNULL, check=True
                )

        sock_dir = base / "sock"
        sock_dir.mkdir()
        if "a" in parts:
            results["a_cold"] = cold_fill(base, m_cold, sock_dir, repeat)
        if parts & set("bcd"):
            results.update(warm_daemon(base, m_small, m_big, sock_dir, repeat, parts))
        if "e" in parts:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results["e_origin"] = origin_requests(base, m_small, sock_dir)

    print(f"median of {repeat}, interleaved")
    print(table(["what", "model", "seconds", "rate/memory", "figure (target)"], rows_of(results)))
    name = "local-quick" if args.quick else "local"
    if parts != set("abcde"):
        name += "-" + "".join(sorted(parts))
    out = write_json(name, {"repeat": repeat, "results": results})
    print(f"wrote {out}")


def cold_fill(base: Path, m_cold: Path, sock_dir: Path, repeat: int) -> dict[str, Any]:
    """(a) cold fill vs cp into /dev/shm, interleaved; CPU-s/GiB of each, the daemon's also
    split into user and system (a fill's cost is mostly the kernel's)."""
    t_cp, t_mows, cpu_cp, cpu_mows, sys_mows = [], [], [], [], []
    gib = size_of(m_cold) / 2**30
    for _ in range(repeat):
        dst = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="mows-bench-cp-"))
        files = [str(f) for f in sorted(m_cold.glob("*.safetensors"))]
        before = children_cpu()
        t = time.perf_counter()
        subprocess.run(["cp", *files, str(dst)], check=True)
        t_cp.append(time.perf_counter() - t)
        cpu_cp.append((children_cpu() - before) / gib)
        shutil.rmtree(dst)
        time.sleep(1)
        d = DaemonProcess(
            sock_dir, roots=[base], max_memory="8GiB", extra=["--chunk-size", "auto"]
        ).start()
        try:
            assert d.proc is not None
            user, system = process_cpu(d.proc.pid)
            summary = mows_load(d.socket, m_cold)
            user2, system2 = process_cpu(d.proc.pid)
            cpu_mows.append((user2 - user + system2 - system) / gib)
            sys_mows.append((system2 - system) / gib)
            t_mows.append(summary["seconds"])
        finally:
            d.stop()
        time.sleep(1)
    return {
        "bytes": size_of(m_cold),
        "cp_s": t_cp,
        "mows_s": t_mows,
        "cp_gib_s": gib / median(t_cp),
        "mows_gib_s": gib / median(t_mows),
        "ratio": median(t_cp) / median(t_mows),
        "cp_cpu_s_per_gib": cpu_cp,
        "mows_cpu_s_per_gib": cpu_mows,
        "mows_system_s_per_gib": sys_mows,
        "cpu_ratio": median(cpu_mows) / median(cpu_cp),
    }


def warm_daemon(
    base: Path, m_small: Path, m_big: Path, sock_dir: Path, repeat: int, parts: set[str]
) -> dict[str, Any]:
    """(b)-(d) on one warm daemon."""
    results: dict[str, Any] = {}
    d = DaemonProcess(sock_dir, roots=[base], max_memory="8GiB").start()
    try:
        for m in (m_small, m_big):
            if m.exists():
                mows_load(d.socket, m)
        if "b" in parts:
            for name, m in (("small", m_small), ("big", m_big)):
                warm, eager = [], []
                for _ in range(repeat):
                    warm.append(child(WARM_OPEN, str(m), d.socket))
                    eager.append(child(EAGER_OPEN, str(m)))
                results[f"b_warm_{name}"] = {
                    "bytes": size_of(m),
                    "warm_s": warm,
                    "eager_s": eager,
                    "speedup": median(eager) / median(warm),
                }
            results["b_growth"] = median(results["b_warm_big"]["warm_s"]) / median(
                results["b_warm_small"]["warm_s"]
            )
        if "c" in parts:
            t_map, t_anon = [], []
            for _ in range(repeat):
                t_map.append(child(COPY, "mows", str(m_big), d.socket))
                t_anon.append(child(COPY, "anon", str(m_big), d.socket))
            results["c_copy"] = {
                "bytes": size_of(m_big),
                "pool_s": t_map,
                "anon_s": t_anon,
                "ratio": median(t_anon) / median(t_map),
            }
        if "d" in parts:
            mem_mows = hold_memory("mows", m_small, d.socket)
            mem_eager = hold_memory("eager", m_small, d.socket)
            results["d_memory"] = {
                "bytes": size_of(m_small),
                "mows_total": mem_mows,
                "eager_total": mem_eager,
                "mows_x_model": mem_mows / size_of(m_small),
                "eager_x_model": mem_eager / size_of(m_small),
            }
    finally:
        d.stop()
    return results


def rows_of(results: dict[str, Any]) -> list[list[object]]:
    """The table's rows for the parts that ran."""
    mib = 2**20
    rows: list[list[object]] = []
    if "a_cold" in results:
        a = results["a_cold"]
        system = median(a["mows_system_s_per_gib"]) / median(a["mows_cpu_s_per_gib"])
        rows += [
            [
                "(a) cold fill, cp -> /dev/shm",
                f"{a['bytes'] // mib} MiB",
                median(a["cp_s"]),
                f"{a['cp_gib_s']:.2f} GiB/s, {median(a['cp_cpu_s_per_gib']):.2f} CPU-s/GiB",
                "",
            ],
            [
                "(a) cold fill, mows daemon",
                f"{a['bytes'] // mib} MiB",
                median(a["mows_s"]),
                f"{a['mows_gib_s']:.2f} GiB/s, {median(a['mows_cpu_s_per_gib']):.2f} CPU-s/GiB"
                f" ({system:.0%} system)",
                f"{a['ratio']:.2f}x cp (>= 0.8); CPU {a['cpu_ratio']:.2f}x cp (<= 1.5)",
            ],
        ]
    if "b_warm_small" in results:
        bs, bb = results["b_warm_small"], results["b_warm_big"]
        rows += [
            ["(b) warm open, mows", f"{bs['bytes'] // mib} MiB", median(bs["warm_s"]), "", ""],
            [
                "(b) warm open, eager safetensors",
                f"{bs['bytes'] // mib} MiB",
                median(bs["eager_s"]),
                "",
                f"mows {bs['speedup']:.0f}x faster (>= 50)",
            ],
            [
                "(b) warm open, mows",
                f"{bb['bytes'] // mib} MiB",
                median(bb["warm_s"]),
                "",
                f"{results['b_growth']:.2f}x the small one (<= 1.5)",
            ],
            [
                "(b) warm open, eager safetensors",
                f"{bb['bytes'] // mib} MiB",
                median(bb["eager_s"]),
                "",
                f"mows {bb['speedup']:.0f}x faster (>= 50)",
            ],
        ]
    if "c_copy" in results:
        c = results["c_copy"]
        rows += [
            [
                "(c) copy every tensor, from anon memory",
                f"{c['bytes'] // mib} MiB",
                median(c["anon_s"]),
                "",
                "",
            ],
            [
                "(c) copy every tensor, from the pool",
                f"{c['bytes'] // mib} MiB",
                median(c["pool_s"]),
                "",
                f"{c['ratio']:.2f}x anon (>= 0.8)",
            ],
        ]
    if "d_memory" in results:
        dm = results["d_memory"]
        rows += [
            [
                "(d) 4 processes hold it, eager",
                f"{dm['bytes'] // mib} MiB",
                "",
                f"{dm['eager_total'] / mib:.0f} MiB",
                f"{dm['eager_x_model']:.2f}x model",
            ],
            [
                "(d) 4 processes hold it, mows",
                f"{dm['bytes'] // mib} MiB",
                "",
                f"{dm['mows_total'] / mib:.0f} MiB",
                f"{dm['mows_x_model']:.2f}x model (<= 1.1)",
            ],
        ]
    if "e_origin" in results:
        e = results["e_origin"]
        rows += [
            [
                "(e) cold open over HTTP: origin requests",
                f"{e['files']} files",
                e["cold"]["seconds"],
                f"{e['cold']['requests']} requests",
                "",
            ],
            [
                "(e) warm open over HTTP: origin requests",
                f"{e['files']} files",
                e["warm"]["seconds"],
                f"{e['warm']['requests']} requests",
                "<= 1",
            ],
            [
                "(e) warm open, origin stopped",
                f"{e['files']} files",
                e["origin_down"]["seconds"],
                ",".join(e["origin_down"]["warnings"]) or "no warning",
                "opens, warns",
            ],
        ]
    return rows


if __name__ == "__main__":
    main()
