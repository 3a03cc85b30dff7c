"""A single-node soak: one real daemon under random opens, reads, updates and reloads for a while.

    python bench/soak.py [--minutes 30] [--seed N] [--clients 4] [--quick]

A real `mows serve` with a 96 MiB cap fills its pool (a tmpfs mounted for the run when root,
so `statvfs` counts every pool page, unlinked-but-mapped ones included; a plain directory
otherwise, and the output says so) from six generated safetensors models, 140 MiB in all: the
two largest exceed a client's share of the cap, so the pool evicts. `--clients` worker
processes (each its own connection, so its own pins) run a seeded random mix: open a model
(holding up to two at once), read random tensor ranges, read whole pool files, close, hold,
stream a model file by file, ask for status; after each operation a worker checks that it maps
no file the pool has evicted. A worker ends after a random lifetime (closing everything, or as
an engine does, tensors alive) or is SIGKILLed, and a new one takes its place. Meanwhile the
origin updates models (a directory swapped atomically for a new generation: a new version),
the model list is rewritten and reloaded (`mows reload` and the Reload API), and models are
queued for prefetch (`mows prefetch` and the API). Every read is compared bitwise with the
generation its handle opened. A mismatch, a pool above the cap, an unexpected error or a hung
operation stops the run with the seed printed (and keeps its work directory: daemon and worker
logs). The daemon's memory is sampled over time and the last third of the run compared with
the middle third. Prints a table and writes bench/results/soak.json (--quick, 2 minutes:
soak-quick.json). --minutes 30 is the documented run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import functools
import gc
import hashlib
import json
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from safetensors.numpy import save

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import table, write_json  # noqa: E402

from tests.daemons import DaemonProcess  # noqa: E402

MiB = 2**20
CAP = 96 * MiB
MODELS = [(6, 2), (10, 2), (16, 2), (24, 3), (36, 3), (48, 3)]  # (MiB, files)
DTYPES = [np.float32, np.float16, np.int32, np.uint8]
TENSORS = 6  # per file
MAX_HELD = 2  # handles a worker holds at once: 4 workers x 2 x up to 48 MiB >> the cap
LOAD_TIMEOUT = 10  # --load-timeout: a load queued for space gives up (CapacityError) after it
HANG_S = 90.0  # no operation may take longer: the load timeout plus fills on a busy 2-core VM
GRACE_S = 5.0  # an open that began this soon after an update may still see the old version
# Above the cap on the pool filesystem: its small metadata files (.mows-locations.json, one
# .mows-version.json per version), a page each; 64 pages is room for more versions than a run
# keeps, and far below any model file (>= 1 MiB), so a file over the cap cannot hide in it.
SLACK = 64 * 4096
OPS = {"open": 3, "read": 8, "read_file": 1, "close": 2, "hold": 1, "stream": 0.5, "status": 0.5}
# Errors a client may see here without anything being wrong. CapacityError: the held models
# (pins) leave no room, or a load waited --load-timeout in line. IntegrityError, SourceError,
# ManifestError and "version no longer known" (DaemonError): only while the model's origin is
# replaced under a fill or a stream (bytes of the new generation under the old CRCs are refused),
# so they count as expected only within GRACE_S of an update of that very model.
UPDATE_RACE = ("IntegrityError", "SourceError", "SourceNotFoundError", "ManifestError")
EXPECTED = (
    "CapacityError: room held by pins, or --load-timeout in line; "
    f"{', '.join(UPDATE_RACE)}, version no longer known: within {GRACE_S:g} s of an update of "
    "that model (the origin swapped under a fill or a stream)"
)
# Growth allowed from the middle third of the run to the last (medians, after a first third of
# warm-up). Anonymous RSS (the pool's shared pages, mapped while filling, are left out: the cap
# check bounds them) stayed within 0.2 MiB for 10 minutes on a busy 2-core VM; 8 MiB + 10% is
# 40x that, and a leak of 1 KiB an operation passes it within a 30-minute run. Descriptors
# (client sockets subtracted), threads and versions known are small integers bounded by design
# (a source per model, executors that fill up, versions pinned or read by live connections),
# so a few of slack separates a leak from one last executor thread starting late.
BOUNDS: dict[str, Callable[[float], float]] = {
    "rss_anon": lambda mid: 8 * MiB + 0.10 * mid,
    "fds_other": lambda mid: 4,
    "threads": lambda mid: 4,
    "versions": lambda mid: len(MODELS),
}


ALIVE: list[object] = []  # what a worker leaves alive for interpreter exit


class Failure(Exception):
    """What stops the run."""


class Expected(Exception):
    """A typed error from mows that may be expected (see UPDATE_RACE), with its model."""

    def __init__(self, e: Exception, m: int) -> None:
        super().__init__(str(e))
        self.e, self.m = e, m


# -- generated models ---------------------------------------------------------------------------
def file_names(m: int) -> list[str]:
    files = MODELS[m][1]
    return [f"model-{i:05d}-of-{files:05d}.safetensors" for i in range(files)]


@functools.lru_cache(maxsize=64)
def ref_tensor(seed: int, m: int, gen: int, i: int, j: int) -> np.ndarray:
    """Tensor j of file i of model m at generation gen: same shape in every generation, new
    bytes; each from its own generator, so one can be checked without making the rest."""
    mib, files = MODELS[m]
    dt = np.dtype(DTYPES[j % len(DTYPES)])
    n = mib * MiB // files // TENSORS // dt.itemsize // 64 * 64
    raw = np.random.default_rng([seed, m, gen, i, j]).bytes(n * dt.itemsize)
    return np.frombuffer(raw, dt).reshape(-1, 64)


def ref_flat(seed: int, m: int, gen: int, name: str) -> np.ndarray:
    """Tensor ``f<i>.t<j>``'s bytes."""
    i, j = (int(x[1:]) for x in name.split("."))
    return ref_tensor(seed, m, gen, i, j).reshape(-1).view(np.uint8)


@functools.lru_cache(maxsize=4)
def ref_file(seed: int, m: int, gen: int, rel: str) -> bytes:
    if rel == "config.json":
        return json.dumps({"model": m, "gen": gen}).encode()
    i = file_names(m).index(rel)
    tensors = {f"f{i}.t{j}": ref_tensor(seed, m, gen, i, j) for j in range(TENSORS)}
    # One metadata key: safetensors writes several in a per-process random (hash) order.
    return save(tensors, metadata={"soak": f"{m}.{gen}"})


def content_key(crcs: list[tuple[str, int]]) -> str:
    """A generation's identity as the daemon's manifest shows it: file names and CRC-32s."""
    return hashlib.sha1("\n".join(sorted(f"{r}:{c:08x}" for r, c in crcs)).encode()).hexdigest()


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE): the daemon sees either
    generation whole, never a mix of the two."""
    if _libc.renameat2(-100, bytes(a), -100, bytes(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


class Origin:
    """The models' directories, each generation registered (by content key) before it shows."""

    def __init__(self, base: Path, seed: int) -> None:
        self.seed, self.root = seed, base / "models"
        self.registry, self.updates = base / "registry", base / "updates"
        for d in (self.root, self.registry, self.updates):
            d.mkdir(parents=True)
        self.gens = [0] * len(MODELS)
        self.log: list[list[list[Any]]] = [[] for _ in MODELS]  # [gen, start, end] per model
        for m in range(len(MODELS)):
            self._write(self.path(m), m, 0)
            write_json_atomic(self.updates / f"m{m}.json", [])

    def path(self, m: int) -> Path:
        return self.root / f"m{m}"

    def _write(self, d: Path, m: int, gen: int) -> None:
        d.mkdir()
        crcs = []
        for rel in [*file_names(m), "config.json"]:
            data = ref_file(self.seed, m, gen, rel)
            (d / rel).write_bytes(data)
            crcs.append((rel, zlib.crc32(data)))
        (d / "crc32.txt").write_text("".join(f"{c:08x} {r}\n" for r, c in crcs))
        (self.registry / content_key(crcs)).write_text(f"{m} {gen}")

    def update(self, m: int) -> None:
        gen = self.gens[m] + 1
        stage = self.root / f".m{m}.next"
        self._write(stage, m, gen)
        entry = [gen, time.monotonic(), None]
        self.log[m] = [*self.log[m][-15:], entry]
        write_json_atomic(self.updates / f"m{m}.json", self.log[m])  # before it can be seen
        exchange(stage, self.path(m))
        shutil.rmtree(stage)  # the previous generation, swapped out
        self.gens[m], entry[2] = gen, time.monotonic()
        write_json_atomic(self.updates / f"m{m}.json", self.log[m])


# -- a client worker (a process of its own) ------------------------------------------------------
def worker(a: argparse.Namespace) -> int:
    import torch

    import mows
    import mows.client

    base, rng, seed = Path(a.base), random.Random(a.worker_seed), a.seed
    pool = f"{base}/shm/pool/"
    held: list[tuple[Any, int, int]] = []  # (handle, model, generation)
    seen: dict[str, str] = {}  # version id -> content key: one content per id

    def say(**msg: object) -> None:
        print(json.dumps(msg), flush=True)

    def trace(*what: object) -> None:  # the worker's log, kept with a failed run
        print(f"{time.monotonic():.3f}", *what, file=sys.stderr, flush=True)

    def updates(m: int) -> list[list[Any]]:
        return list(json.loads((base / "updates" / f"m{m}.json").read_text()))

    def racing_update(m: int, t0: float) -> bool:
        return any(end is None or end >= t0 - GRACE_S for _, _, end in updates(m))

    def flat(t: Any) -> np.ndarray:
        return np.asarray(t.reshape(-1).view(torch.uint8).numpy())

    def check_tensor(h: Any, m: int, g: int, whole: bool) -> int:
        name = rng.choice(sorted(h.keys()))
        want = ref_flat(seed, m, g, name)
        got = flat(h.get_tensor(name))
        lo = 0 if whole else rng.randrange(len(want))
        hi = len(want) if whole else rng.randrange(lo, len(want)) + 1
        if len(got) != len(want) or not np.array_equal(got[lo:hi], want[lo:hi]):
            raise Failure(f"mismatch: m{m} gen {g} version {h.version} {name}[{lo}:{hi}]")
        return hi - lo

    def open_one(m: int, t0: float) -> tuple[Any, int, bool]:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h = mows.open_model(base / "models" / f"m{m}", socket=a.socket, fallback=False)
        stale = any(issubclass(w.category, mows.OriginUnreachableWarning) for w in caught)
        crcs = [(e.path, e.crc32) for e in h.manifest.files if e.crc32 is not None]
        key = content_key(crcs)
        if seen.setdefault(h.version, key) != key:
            raise Failure(f"version {h.version} named two contents")
        reg = base / "registry" / key
        if not reg.exists():
            raise Failure(f"m{m}: version {h.version} matches no generation the soak wrote")
        m2, g = map(int, reg.read_text().split())
        names = {f"f{i}.t{j}" for i in range(MODELS[m][1]) for j in range(TENSORS)}
        if m2 != m or h.metadata().get("soak") != f"{m}.{g}" or set(h.keys()) != names:
            raise Failure(f"m{m}: version {h.version} is not generation {g} of m{m}")
        done = [gen for gen, _, end in updates(m) if end is not None and end < t0 - GRACE_S]
        if not stale and g < max(done, default=0):
            raise Failure(f"m{m}: an open after generation {max(done)} got generation {g}")
        return h, g, stale

    def stream(m: int) -> int:
        path, n, count, gen = base / "models" / f"m{m}", 0, 0, -1
        latest = max([0, *(g for g, _, _ in updates(m))])
        for name, t in mows.iter_weights(path, socket=a.socket, fallback=False, stream=True):
            got = flat(t)
            if gen < 0:  # the stream's version: the generation its first tensor comes from
                near = range(latest, max(-1, latest - 4), -1)
                same = (g for g in near if np.array_equal(got, ref_flat(seed, m, g, name)))
                gen = next(same, -1)
                if gen < 0:
                    raise Failure(f"stream of m{m}: {name} is none of generations <= {latest}")
            elif not np.array_equal(got, ref_flat(seed, m, gen, name)):
                raise Failure(f"stream of m{m}: {name} is not generation {gen} (mixed versions?)")
            n, count = n + len(got), count + 1
            del t, got
        if count != MODELS[m][1] * TENSORS:
            raise Failure(f"stream of m{m}: {count} tensors")
        return n

    def step(op: str, t0: float) -> tuple[int, bool]:
        if op in ("read", "read_file", "close", "hold") and not held:
            op = "open"
        if op == "open":
            while len(held) >= MAX_HELD:
                held[0][0].close()
                trace("close", held.pop(0)[0].version)
            m = rng.randrange(len(MODELS))
            try:
                h, g, stale = open_one(m, t0)
            except mows.MowsError as e:
                raise Expected(e, m) from None
            held.append((h, m, g))
            trace("opened", m, g, h.version)
            return check_tensor(h, m, g, whole=True), stale
        if op == "read":
            h, m, g = rng.choice(held)
            return sum(check_tensor(h, m, g, whole=False) for _ in range(rng.randint(1, 8))), False
        if op == "read_file":
            h, m, g = rng.choice(held)
            rel = rng.choice(sorted(h.files))
            path = Path(h.file_path(rel))
            if path.parent.name != h.version:
                raise Failure(f"{path} lies outside its version's directory {h.version}")
            data, want = path.read_bytes(), ref_file(seed, m, g, rel)
            if data != want:
                at = next(
                    (k for k, (x, y) in enumerate(zip(data, want, strict=False)) if x != y),
                    len(want),
                )
                raise Failure(f"mismatch: pool file {path} is not m{m} gen {g}: byte {at}")
            return path.stat().st_size, False
        if op == "close":
            h = held.pop(rng.randrange(len(held)))[0]
            h.close()
            trace("close", h.version)
        elif op == "hold":
            time.sleep(rng.uniform(0.5, 3.0))
        elif op == "stream":
            m = rng.randrange(len(MODELS))
            try:
                return stream(m), False
            except mows.MowsError as e:
                raise Expected(e, m) from None
        elif op == "status":
            st = mows.client.get_session(a.socket).status()
            if int(st["used_bytes"]) > int(st["capacity_bytes"]):  # type: ignore[call-overload]
                raise Failure(f"the daemon counts {st['used_bytes']} bytes over its cap")
        return 0, False

    def unpinned_maps() -> list[str]:
        """Pool files this process maps that are gone from the pool: mapped, yet not pinned."""
        maps = Path("/proc/self/maps").read_text().splitlines()
        return [ln.split(None, 5)[-1] for ln in maps if pool in ln and "(deleted)" in ln]

    deadline = time.monotonic() + a.lifetime
    stop = base / "stop"
    trace("pid", os.getpid())
    names, weights = list(OPS), list(OPS.values())
    try:
        while time.monotonic() < deadline and not stop.exists():
            op = rng.choices(names, weights)[0]
            say(b=op)
            trace("begin", op, [h.version for h, _, _ in held])
            t0 = time.monotonic()
            try:
                n, stale = step(op, t0)
                say(e=op, n=n, stale=stale)
            except Expected as x:
                kind = getattr(x.e, "kind", None) or type(x.e).__name__
                race = kind in UPDATE_RACE or "no longer known" in str(x.e)
                if not (kind == "CapacityError" or (race and racing_update(x.m, t0))):
                    raise Failure(f"unexpected {kind} on m{x.m}: {x.e}") from None
                trace("error", op, kind, str(x.e)[:300])
                say(e=op, n=0, err=kind)
            if gone := unpinned_maps():
                raise Failure(f"after {op}: this client maps evicted pool files {gone}")
            time.sleep(rng.uniform(0, 0.05))
        if rng.random() < 0.5:  # a clean exit: nothing mapped is left when it ends
            for h, _, _ in held:
                h.close()
            held.clear()
            gc.collect()
        else:  # as an engine ends: handles open and tensors alive until the process is gone
            ALIVE.extend([held, *(h.get_tensor(rng.choice(h.keys())) for h, _, _ in held)])
    except Failure as f:
        say(fail=str(f))
        return 1
    except Exception as e:
        say(fail=f"unexpected {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return 1
    say(done=True)
    return 0


# -- the run -------------------------------------------------------------------------------------
class Worker:
    def __init__(self, wid: int, seed: int, a: argparse.Namespace, base: Path, sock: str) -> None:
        self.killed, self.op, self.since = False, "", 0.0
        self.err: IO[str] = open(base / f"worker-{seed}.err", "w")  # noqa: SIM115 - closed at end
        # Then it exits, and another takes its place: short runs churn faster, so that what
        # connections hold (pins, versions they read) reaches its steady state early.
        life = random.Random(seed).uniform(*((15, 45) if a.minutes <= 5 else (30, 120)))
        argv = f"--worker --seed {a.seed} --base {base} --socket {sock} --worker-seed {seed} "
        argv += f"--lifetime {life:.1f}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *argv.split()],
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def stderr_tail(self) -> str:
        return Path(self.err.name).read_text(errors="replace")[-3000:]


def within(seconds: float, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a daemon thread: a call into the daemon that never returns is a hang."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["v"] = fn()
        except BaseException as e:
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise Failure(f"hang: {what} did not return in {seconds:.0f} s")
    if "e" in box:
        raise box["e"]
    return box["v"]


def proc_mem(pid: int) -> dict[str, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    kib = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}
    return {
        "rss": kib["VmRSS"],
        "rss_anon": kib["RssAnon"],
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def growth(samples: list[dict[str, Any]]) -> dict[str, dict[str, float | bool]]:
    """Median of the last third minus that of the middle third (the first third is warm-up),
    and a least-squares slope per hour over both, for each metric."""
    end = samples[-1]["t"]
    mid = [s for s in samples if end / 3 <= s["t"] < 2 * end / 3]
    last = [s for s in samples if s["t"] >= 2 * end / 3]
    out: dict[str, dict[str, float | bool]] = {}
    for k in ("rss", "rss_anon", "fds_other", "threads", "versions", "pool_used"):
        a, b = statistics.median(s[k] for s in mid), statistics.median(s[k] for s in last)
        xs, ys = [s["t"] for s in mid + last], [s[k] for s in mid + last]
        slope = statistics.linear_regression(xs, ys).slope * 3600 if len(set(xs)) > 1 else 0.0
        bound = BOUNDS[k](a) if k in BOUNDS else None
        out[k] = {"mid": a, "last": b, "growth": b - a, "slope_per_hour": slope}
        if bound is not None:
            out[k] |= {"bound": bound, "ok": b - a <= bound}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="2 minutes (CI)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--base", "--socket", "--worker-seed", "--lifetime"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.worker_seed, a.lifetime = int(a.worker_seed), float(a.lifetime)
        return worker(a)
    a.minutes = 2.0 if a.quick else a.minutes
    a.seed = random.SystemRandom().randrange(2**31) if a.seed is None else a.seed
    # SIGTERM unwinds like Ctrl-C: workers, daemon and the mount are cleaned up either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Path(tempfile.mkdtemp(prefix="mows-soak-"))
    mnt, mounted, failed = base / "shm", False, True
    workers: list[Worker] = []
    daemon: DaemonProcess | None = None
    print(f"soak: seed {a.seed}, {a.minutes:g} min, {a.clients} clients, work dir {base}")
    try:
        mnt.mkdir()
        why = "not root: no tmpfs of its own"
        if os.geteuid() == 0:
            size = f"size={2 * CAP}"  # above the cap: an overshoot is measured, not ENOSPC
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(mnt)], capture_output=True
            )
            mounted, why = r.returncode == 0, f"mount failed: {r.stderr.decode().strip()}"
        if not mounted:
            print(
                f"WARNING: {why}; the pool is a plain directory and its use the sum of its "
                "files' blocks, which misses unlinked pages clients still map"
            )
        origin = Origin(base, a.seed)
        conf = base / "mows.toml"
        conf.write_text(f"model_path = {json.dumps([str(origin.path(0))])}\n")
        daemon = DaemonProcess(
            base,
            roots=[origin.root],
            max_memory=f"{CAP // MiB}MiB",
            extra=f"--config {conf} --load-timeout {LOAD_TIMEOUT} --prefetch-delay 1".split(),
            pool_dir=mnt / "pool",
        )
        # INFO (opens, evictions) for the log a failed run keeps; debug lines cost too much here
        daemon.args = ["-v" if x in ("-v", "-vv") else x for x in daemon.args]
        daemon.start()
        report = Soak(a, base, mnt if mounted else None, origin, conf, daemon, workers).run()
        print_report(report, a)
        failed = report["failure"] is not None
        return int(failed)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            w.err.close()
        if daemon is not None:
            daemon.stop()
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
            if os.path.ismount(mnt):  # still busy: detach it now, freed when last let go
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        if failed:
            print(f"kept {base} (daemon log, worker logs)")
        else:
            shutil.rmtree(base, ignore_errors=True)


class Soak:
    """The run: workers, origin updates, reloads, prefetches, kills and samples, on one loop."""

    def __init__(
        self,
        a: argparse.Namespace,
        base: Path,
        tmpfs: Path | None,
        origin: Origin,
        conf: Path,
        daemon: DaemonProcess,
        workers: list[Worker],
    ) -> None:
        from mows.client import Session

        assert daemon.proc is not None
        self.a, self.base, self.tmpfs, self.origin, self.conf = a, base, tmpfs, origin, conf
        self.daemon, self.proc, self.workers = daemon, daemon.proc, workers
        self.rng = random.Random(a.seed)
        self.paths = [str(origin.path(m)) for m in range(len(MODELS))]
        self.session = Session(daemon.socket)
        self.ops: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.acts: collections.Counter[str] = collections.Counter()
        self.samples: list[dict[str, Any]] = []
        self.max_pool = self.bytes = self.stale = self.spawned = 0
        self.failure: str | None = None
        self.done, self.start = False, time.monotonic()

    def pool_used(self) -> int:
        if self.tmpfs is not None:
            st = os.statvfs(self.tmpfs)
            return (st.f_blocks - st.f_bfree) * st.f_frsize
        pool = self.daemon.pool_dir
        return sum(p.stat().st_blocks * 512 for p in pool.rglob("*") if p.is_file())

    def watch_pool(self) -> None:  # the cap, measured often: a fill's overshoot lasts moments
        while self.failure is None and not self.done:
            with contextlib.suppress(OSError):  # (the directory fallback racing an eviction)
                used = self.pool_used()
                self.max_pool = max(self.max_pool, used)
                if used > CAP + SLACK:
                    self.failure = (
                        f"cap violated: {used} bytes on the pool filesystem > {CAP}\n"
                        + pool_diagnosis(self.daemon.pool_dir)
                    )
            time.sleep(0.05 if self.tmpfs is not None else 0.25)

    def spawn(self, slot: int) -> None:
        self.spawned += 1
        w = Worker(slot, self.a.seed * 1000 + self.spawned, self.a, self.base, self.daemon.socket)
        if slot < len(self.workers):
            self.workers[slot].err.close()
            self.workers[slot] = w
        else:
            self.workers.append(w)

    def cli(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "mows", *args, "--socket", self.daemon.socket]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S)
        except subprocess.TimeoutExpired:
            raise Failure(f"hang: mows {' '.join(args)} ran {HANG_S:.0f} s") from None
        if r.returncode != 0:
            raise Failure(f"mows {' '.join(args)} failed: {r.stderr.strip()[-500:]}")
        return r.stdout

    def drain(self, slot: int, now: float) -> None:
        """What worker ``slot`` reported; a worker that ended is replaced."""
        w = self.workers[slot]
        while not w.lines.empty():
            msg = w.lines.get()
            if msg is None:
                rc = w.proc.wait(30)
                if rc != 0 and not w.killed:
                    raise Failure(f"worker {slot} exited {rc}:\n{w.stderr_tail()}")
                return self.spawn(slot)
            if "fail" in msg:
                raise Failure(f"worker {slot}: {msg['fail']}")
            if "b" in msg:
                w.op, w.since = msg["b"], now
            elif "e" in msg:
                w.op = ""
                self.ops[msg["e"]] += 1
                self.bytes += msg["n"]
                self.stale += bool(msg.get("stale"))
                self.errors.update([msg["err"]] if msg.get("err") else [])
        if w.op and now - w.since > HANG_S:
            raise Failure(f"hang: worker {slot}'s {w.op} ran {now - w.since:.0f} s")

    # What the operator does, each every few seconds (the range of its interval).
    def update(self) -> None:  # a new generation at the origin: a new version
        self.origin.update(self.rng.randrange(len(MODELS)))

    def reload(self) -> None:  # a new model list, re-read through the API or the CLI
        chosen = self.rng.sample(self.paths, self.rng.randint(1, len(self.paths)))
        self.conf.write_text(f"model_path = {json.dumps(chosen)}\n")
        if self.rng.random() < 0.5:
            got = within(HANG_S, "Reload", self.session.reload)
            if got.get("reloaded") is not True:
                raise Failure(f"reload answered {got}")
        else:
            self.cli("reload")

    def prefetch(self) -> None:
        path = self.rng.choice(self.paths)
        if self.rng.random() < 0.5:
            within(HANG_S, "Prefetch", functools.partial(self.session.prefetch, path))
        else:
            self.cli("prefetch", path)

    def kill(self) -> None:  # a client killed holding its pins: they go with its connection
        victim = self.rng.choice([w for w in self.workers if w.proc.poll() is None] or self.workers)
        victim.killed = True
        victim.proc.kill()

    def status_cli(self) -> None:
        json.loads(self.cli("status", "--json"))

    def sample(self) -> None:
        st = within(HANG_S, "Status", self.session.status)
        if st["used_bytes"] > CAP:
            raise Failure(f"the daemon counts {st['used_bytes']} bytes, over its cap")
        mem = proc_mem(self.proc.pid)
        clients, versions = int(st["clients"]), len(st["versions"])
        self.samples.append(
            {
                "t": round(time.monotonic() - self.start, 1),
                **mem,
                "fds_other": mem["fds"] - clients,
                "clients": clients,
            }
            | {"versions": versions, "used_bytes": st["used_bytes"], "pool_used": self.pool_used()}
        )

    def wind_down(self) -> None:
        """Every worker finishes its operation and closes its handles; then nothing may stay
        pinned (pins live with connections)."""
        (self.base / "stop").touch()
        for slot, w in enumerate(self.workers):
            try:
                rc = w.proc.wait(HANG_S)
            except subprocess.TimeoutExpired:
                raise Failure(f"hang: worker {slot} did not stop in {HANG_S:.0f} s") from None
            if rc != 0 and not w.killed:
                raise Failure(f"worker {slot} exited {rc}:\n{w.stderr_tail()}")
        self.session.close()
        deadline = time.monotonic() + 15
        while (st := fast_status(self.daemon.socket))["clients"] > 1 or st["pinned_bytes"]:
            if time.monotonic() > deadline:
                raise Failure(f"{st['pinned_bytes']} bytes pinned after every client left")
            time.sleep(0.2)

    def run(self) -> dict[str, Any]:
        threading.Thread(target=self.watch_pool, daemon=True).start()
        for slot in range(self.a.clients):
            self.spawn(slot)
        every = {
            self.update: (4, 12),
            self.reload: (10, 30),
            self.prefetch: (8, 20),
            self.kill: (20, 60),
            self.status_cli: (30, 30),
            self.sample: (2, 2) if self.a.minutes <= 5 else (5, 5),
        }
        start = self.start = time.monotonic()
        due = {act: start + (0 if act == self.sample else self.rng.uniform(1, 5)) for act in every}
        try:
            while (now := time.monotonic()) < start + self.a.minutes * 60 and not self.failure:
                if self.proc.poll() is not None:
                    raise Failure(f"the daemon exited ({self.proc.returncode})")
                for slot in range(len(self.workers)):
                    self.drain(slot, now)
                for act, (lo, hi) in every.items():
                    if now >= due[act]:
                        act()
                        self.acts[act.__name__] += 1
                        due[act] = now + self.rng.uniform(lo, hi)
                time.sleep(0.1)
            if self.failure is not None:
                raise Failure(self.failure)
            self.wind_down()
        except Failure as e:
            self.failure = str(e)
        self.done = True
        return self.report(time.monotonic() - start)

    def report(self, seconds: float) -> dict[str, Any]:
        failure, samples = self.failure, self.samples
        if failure is None and "Traceback" in self.daemon.log():
            failure = "the daemon logged a traceback"
        final = fast_status(self.daemon.socket) if self.proc.poll() is None else {}
        mem = growth(samples) if len(samples) >= 6 else {}
        if failure is None and not all(v.get("ok", True) for v in mem.values()):
            failure = "growth: " + ", ".join(k for k, v in mem.items() if not v.get("ok", 1))
        if failure is None and not self.ops:
            failure = "no operation completed"
        keys = ("evictions", "evicted_bytes", "hits", "misses", "loads_failed", "stale_opens")
        return {
            "seed": self.a.seed,
            "minutes": self.a.minutes,
            "clients": self.a.clients,
            "seconds": round(seconds, 1),
            "pool_fs": "tmpfs" if self.tmpfs is not None else "directory",
            "cap_bytes": CAP,
            "slack_bytes": SLACK,
            "models_mib": [mib for mib, _ in MODELS],
            "ops": dict(self.ops),
            "completed_ops": sum(self.ops.values()),
            "errors": dict(self.errors),
            "expected_errors": EXPECTED,
            "stale_opens": self.stale,
            "bytes_checked": self.bytes,
            "max_pool_used_bytes": self.max_pool,
            "cap_violations": int(str(failure).startswith("cap violated")),
            "mismatches": int("mismatch" in str(failure)),
            "operator": dict(self.acts),
            "worker_starts": self.spawned,
            "daemon": {k: final.get(k) for k in ("integrity_failures", *keys)},
            "memory": {
                "start": samples[0] if samples else None,
                "mid": samples[len(samples) // 2] if samples else None,
                "end": samples[-1] if samples else None,
                "growth": mem,
                "samples": samples,
            },
            "verdict": "ok" if failure is None else "fail",
            "failure": failure,
        }


def pool_diagnosis(pool: Path) -> str:
    """What holds the pool's pages now: its files, and mappings of deleted pool files."""
    lines = [
        f"  {p.relative_to(pool)} {p.stat().st_blocks * 512}"
        for p in sorted(pool.rglob("*"))
        if p.is_file()
    ]
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            maps = [
                ln
                for ln in (d / "maps").read_text().splitlines()
                if str(pool) in ln and "(deleted)" in ln
            ]
            if maps:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:80].decode()
                lines += [f"  pid {d.name} ({cmd}) maps deleted:"] + [f"    {m}" for m in maps]
    return "\n".join(lines)


def fast_status(sock: str) -> dict[str, Any]:
    from mows.client import Session

    def ask() -> dict[str, Any]:
        s = Session(sock)
        try:
            return dict(s.status())
        finally:
            s.close()

    return dict(within(30, "Status", ask))


def print_report(r: dict[str, Any], a: argparse.Namespace) -> None:
    m, acts = r["memory"], r["operator"]
    rows: list[list[object]] = [
        ["seed", r["seed"]],
        ["pool filesystem", r["pool_fs"]],
        ["ops", ", ".join(f"{k} {v}" for k, v in sorted(r["ops"].items()))],
        ["expected errors", ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items()))],
        ["bytes checked (MiB)", r["bytes_checked"] // MiB],
        ["operator", ", ".join(f"{k} {v}" for k, v in sorted(acts.items()))],
        ["workers started", r["worker_starts"]],
        ["evictions", r["daemon"]["evictions"]],
        ["max pool use / cap (MiB)", f"{r['max_pool_used_bytes'] / MiB:.1f} / {CAP // MiB}"],
    ]
    for k in ("rss", "rss_anon", "fds_other", "threads", "versions") if m["start"] else ():
        unit, g = MiB if k.startswith("rss") else 1, m["growth"].get(k, {})
        ends = " / ".join(f"{m[w][k] / unit:.0f}" for w in ("start", "mid", "end"))
        bound = f", bound {g['bound'] / unit:.1f}" if "bound" in g else ""
        change = f"{g.get('growth', 0) / unit:+.1f}{bound}"
        rows.append([f"daemon {k}" + (" MiB" if unit > 1 else ""), f"{ends} ({change})"])
    why = f": {r['failure'].splitlines()[0][:150]}" if r["failure"] else ""
    rows.append(["verdict", r["verdict"] + why])
    print(table(["soak", "value"], rows))
    print(f"wrote {write_json('soak-quick' if a.quick else 'soak', r)}")
    if r["failure"]:
        print(f"FAILED (rerun with --seed {r['seed']}): {r['failure']}")


if __name__ == "__main__":
    sys.exit(main())
