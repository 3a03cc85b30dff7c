"""Model versions as first-class objects of the daemon, with real processes and real memory.

The contract these tests hold the daemon to:

- a version is identified by content (file names, sizes, crc32.txt values, chunk size), never
  by path or timestamps; ``handle.version`` names it and pool files live under
  ``<pool_dir>/<version>/``, so a pool path never changes content;
- an open is bound to the version it got, whatever happens to the origin afterwards;
- warm opens need no origin (``OriginUnreachableWarning``, ``"origin": "unreachable"``);
- the crc32 file is the daemon's setting, not the client's;
- under memory pressure nothing deadlocks, the cap holds on the pool filesystem, and the only
  error a client may see is ``CapacityError``.

Pool memory is measured with ``statvfs`` on a tmpfs mounted for the test alone: it counts pages
of unlinked files still mapped by a client, which ``st_blocks`` of the visible files does not.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from safetensors.numpy import load_file as load_numpy

import mows
from mows.client import Session
from tests.conftest import free_port
from tests.daemons import POOL_METADATA as SLACK
from tests.daemons import fs_used, generate_crc32, make_random_model
from tests.integration.test_daemon import _wait, assert_same_as_files

MiB = 2**20

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="measuring the pool needs a dedicated tmpfs, and mount -t tmpfs needs root",
)


# -- fixtures and helpers ------------------------------------------------------------------------


def fast_status(sock: str) -> dict[str, Any]:
    """``status()`` over the socket, without starting a ``mows status`` process."""
    session = Session(sock)
    try:
        return dict(session.status())
    finally:
        session.close()


def wait_unpinned(sock: str, timeout: float = 10.0) -> None:
    """Releases are sent asynchronously: wait until the daemon has seen them all."""
    _wait(lambda: fast_status(sock)["pinned_bytes"] == 0, timeout=timeout)


def model_entry(st: dict[str, Any], location: str) -> dict[str, Any]:
    for m in st["models"]:
        if m["path"] == location:
            return dict(m)
    raise AssertionError(f"no status entry for {location}: {[m['path'] for m in st['models']]}")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digests(model: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes in the model's safetensors files."""
    out: dict[str, str] = {}
    for f in sorted(model.glob("*.safetensors")):
        for name, arr in load_numpy(str(f)).items():
            out[name] = digest(arr.tobytes())
    return out


def tensor_digests(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: digest(t.reshape(-1).view(torch.uint8).numpy().tobytes()) for n, t in sd.items()}


def tensor_bytes(model: Path) -> int:
    """Bytes of the model's safetensors files: a lower bound of what the pool must hold."""
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


# A client in its own process (its own connection, so its own pins): opens a model, reads every
# tensor, prints one JSON line (version, pool files, tensor digests), holds the model until a
# line arrives on stdin, closes it and says so. A MowsError on open is printed, not raised.
HOLD = r"""
import hashlib, json, sys
import mows, torch

sock, path = sys.argv[1], sys.argv[2]
try:
    h = mows.open_model(path, socket=sock, fallback=False)
except mows.MowsError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
    sys.exit(0)
sd = h.state_dict()
print(json.dumps({
    "version": h.version,
    "files": {rel: h.file_path(rel) for rel in h.files},
    "stats": h.stats,
    "digests": {
        n: hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, t in sd.items()
    },
}), flush=True)
sys.stdin.readline()
del sd
h.close()
print(json.dumps({"closed": True}), flush=True)
"""


class HeldClient:
    """Another process holding a model open (see ``HOLD``); ``close()`` lets it go."""

    def __init__(self, sock: str, path: str | Path) -> None:
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, sock, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def next(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the client said nothing in {timeout} s") from None
        if line is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            raise AssertionError(
                f"the client exited ({self.proc.returncode}) early:\n{self.stderr()}"
            )
        return dict(json.loads(line))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.next() == {"closed": True}
        assert self.proc.wait(30) == 0, self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr.close()


@contextlib.contextmanager
def held(sock: str, path: str | Path) -> Iterator[HeldClient]:
    client = HeldClient(sock, path)
    try:
        yield client
    finally:
        client.kill()


class Sampler:
    """Measures the pool filesystem every 20 ms in a thread; errors are kept, not lost."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.samples: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.samples.append(fs_used(self.mnt))
                time.sleep(0.02)
        except BaseException as e:  # collected and asserted on by the test
            self.errors.append(repr(e))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def run_all(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every process under one hard deadline; kill all and fail on a hang."""
    deadline = time.monotonic() + timeout
    out: list[tuple[int, str, str]] = []
    try:
        for p in procs:
            try:
                stdout, stderr = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"clients still running after {timeout} s: a deadlock?"
                ) from None
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def replace_in_place(model: Path, mib: int, *, files: int, seed: int) -> None:
    """New bytes under the same names and sizes, and a new crc32.txt: a new version."""
    make_random_model(model, mib, files=files, seed=seed)
    generate_crc32(model)


# -- 1. a version is its content -----------------------------------------------------------------


@needs_root
def test_identical_bytes_at_two_paths_are_one_version(
    dedicated_tmpfs: Path, daemon_factory: Any, tmp_path: Path
) -> None:
    """Two directories with the same bytes (different mtimes) are one version, held once:
    same ``handle.version``, same pool files under ``<pool_dir>/<version>/``, the second open
    fetches nothing, and the pool (daemon count and filesystem) holds about one model."""
    a = make_random_model(tmp_path / "models" / "a", 8, files=2, seed=1)
    generate_crc32(a)
    b = tmp_path / "models" / "b"
    # copyfile, not copy2: new mtimes, so only content can make the two one version
    shutil.copytree(a, b, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns("crc32*"))
    generate_crc32(b)
    assert (a / "crc32.txt").read_text() == (b / "crc32.txt").read_text()
    pool = dedicated_tmpfs / "pool"
    d = daemon_factory(roots=[a, b], max_memory="64MiB", pool_dir=pool)
    size = tensor_bytes(a)

    with (
        mows.open_model(a, socket=d.socket, fallback=False) as ha,
        mows.open_model(b, socket=d.socket, fallback=False) as hb,
    ):
        assert isinstance(ha.version, str) and ha.version
        assert ha.version == hb.version
        assert hb.stats["bytes_from_origin"] == 0, hb.stats  # served from a's copy
        assert_same_as_files(ha.state_dict(), a)
        assert_same_as_files(hb.state_dict(), b)
        for rel in ha.files:
            assert ha.file_path(rel) == hb.file_path(rel), rel
            assert Path(ha.file_path(rel)).relative_to(pool).parts[0] == ha.version, rel
        st = fast_status(d.socket)
        assert size <= st["used_bytes"] < 1.5 * size, (st["used_bytes"], size)
        measured = fs_used(dedicated_tmpfs)
        assert size <= measured < 1.5 * size, (measured, size)


# -- 2. an open is bound to its version ----------------------------------------------------------


@needs_root
def test_open_is_bound_to_its_version_across_an_origin_update(
    dedicated_tmpfs: Path, daemon_factory: Any, tmp_path: Path
) -> None:
    """Client A opens M and touches one file; M is rewritten in place; client B gets the new
    bytes under a new version while A still reads only the old bytes, from files mapped after
    the update. Both versions count against the cap (daemon and filesystem). Once A is gone,
    a load that needs room evicts the old version before the current one."""
    models = tmp_path / "models"
    m = make_random_model(models / "m", 8, files=4, seed=1)
    generate_crc32(m)
    x = make_random_model(models / "x", 8, files=4, seed=3)
    generate_crc32(x)
    cap = 20 * MiB  # two versions of M fit; a third 8 MiB model does not
    d = daemon_factory(roots=[models], max_memory="20MiB", pool_dir=dedicated_tmpfs / "pool")
    old = file_digests(m)

    a = mows.open_model(m, socket=d.socket, fallback=False)
    first = a.get_tensor("layer0.w0")  # maps the first file only; the others are lazy
    assert tensor_digests({"layer0.w0": first}) == {"layer0.w0": old["layer0.w0"]}
    old_files = {rel: a.file_path(rel) for rel in a.files}

    replace_in_place(m, 8, files=4, seed=2)
    new = file_digests(m)
    assert set(new) == set(old) and all(new[k] != old[k] for k in old)

    with held(d.socket, m) as b:
        got = b.next()
        assert "error" not in got, got
        assert got["digests"] == new
        assert got["version"] != a.version
        # A maps its other files only now: still the old version's bytes.
        sd = a.state_dict()
        assert tensor_digests(sd) == old
        st = fast_status(d.socket)
        measured = fs_used(dedicated_tmpfs)
        assert measured <= cap + SLACK, measured
        assert 2 * tensor_bytes(m) <= st["used_bytes"] <= cap, st["used_bytes"]
        new_version, new_files = got["version"], got["files"]
        b.close()  # the current version is released first: plain LRU would evict it first

    a.close()
    del a, first, sd
    gc.collect()
    wait_unpinned(d.socket)

    with mows.open_model(x, socket=d.socket, fallback=False) as hx:
        assert_same_as_files(hx.state_dict(), x)
        assert fs_used(dedicated_tmpfs) <= cap + SLACK
    gone = [rel for rel, path in old_files.items() if not os.path.exists(path)]
    assert gone, "room for x was made without evicting any file of the old version"
    lost = [rel for rel, path in new_files.items() if not os.path.exists(path)]
    assert not lost, f"files of the current version were evicted before the old one: {lost}"
    with mows.open_model(m, socket=d.socket, fallback=False) as again:
        assert again.version == new_version
        assert again.stats["bytes_from_origin"] == 0, again.stats
        assert tensor_digests(again.state_dict()) == new


# -- 3. warm opens need no origin ----------------------------------------------------------------


def _origin(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, Path, str]:
    """A 4 MiB model with crc32.txt; returns (location to open, its directory, allowed root)."""
    src = make_random_model(tmp_path / "src" / "m", 4, files=2, seed=5)
    generate_crc32(src)
    if kind == "local":
        return str(src), src, str(src.parent)
    url, root = request.getfixturevalue("nginx_root")
    name = f"v-{uuid.uuid4().hex[:10]}"
    shutil.copytree(src, root / name)

    def remove() -> None:  # the model and its renamed-away copy; nginx_root outlives the test
        for p in root.glob(f"{name}*"):
            shutil.rmtree(p, ignore_errors=True)

    request.addfinalizer(remove)
    return f"{url}/{name}", root / name, url


def _open_without_origin(
    sock: str, location: str, reference: Path, version: str
) -> mows.ModelHandle:
    """Open with the origin gone: the cached version, with one OriginUnreachableWarning."""
    assert issubclass(mows.OriginUnreachableWarning, UserWarning)
    with pytest.warns(mows.OriginUnreachableWarning):
        h = mows.open_model(location, socket=sock, fallback=False)
    assert h.version == version
    assert h.stats["bytes_from_origin"] == 0, h.stats
    assert_same_as_files(h.state_dict(), reference)
    return h


@pytest.mark.parametrize("kind", ["local", "http"])
def test_warm_open_needs_no_origin(
    kind: str, daemon_factory: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Load a model, then make its origin unreachable (directory renamed away; over HTTP that
    is a 404 for crc32.txt and for the listing): the next open is served the cached version,
    warns with OriginUnreachableWarning, and status says so (``origin``, ``stale_opens``)."""
    location, directory, root = _origin(kind, tmp_path, request)
    d = daemon_factory(roots=[root])
    with mows.open_model(location, socket=d.socket, fallback=False) as h:
        version = h.version
        assert_same_as_files(h.state_dict(), directory)
    # A warm open with the origin present does not warn.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mows.open_model(location, socket=d.socket, fallback=False) as h:
            assert h.version == version
    assert not [w for w in caught if issubclass(w.category, mows.OriginUnreachableWarning)]
    assert model_entry(fast_status(d.socket), location).get("origin") != "unreachable"
    wait_unpinned(d.socket)

    away = directory.with_name(directory.name + "-gone")
    directory.rename(away)
    _open_without_origin(d.socket, location, away, version).close()
    st = fast_status(d.socket)
    assert model_entry(st, location)["origin"] == "unreachable"
    assert st["stale_opens"] >= 1


@pytest.mark.parametrize("kind", ["local", "http"])
def test_restarted_daemon_serves_the_adopted_version_without_origin(
    kind: str, daemon_factory: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Load a model, stop the daemon, make the origin unreachable, start a new daemon on the
    same pool: the open is served from the adopted pool files, with the warning."""
    location, directory, root = _origin(kind, tmp_path, request)
    d = daemon_factory(roots=[root])
    with mows.open_model(location, socket=d.socket, fallback=False) as h:
        version = h.version
    pool = d.pool_dir
    d.stop(clean=False)
    away = directory.with_name(directory.name + "-gone")
    directory.rename(away)
    d2 = daemon_factory(roots=[root], pool_dir=pool)
    _open_without_origin(d2.socket, location, away, version).close()
    st = fast_status(d2.socket)
    assert model_entry(st, location)["origin"] == "unreachable"
    assert st["stale_opens"] >= 1
    assert st["bytes_from_origin"] == 0


def test_an_emptied_origin_directory_serves_the_cached_version(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A mount that comes back empty is not a new, empty model: the cached version is opened,
    with the warning (regression: an empty listing used to become an empty version)."""
    m = make_random_model(tmp_path / "models" / "m", 4, files=2, seed=7)
    generate_crc32(m)
    keep = tmp_path / "kept"
    shutil.copytree(m, keep)
    d = daemon_factory(roots=[tmp_path / "models"])
    with mows.open_model(m, socket=d.socket, fallback=False) as h:
        version = h.version
    wait_unpinned(d.socket)
    for f in m.iterdir():
        f.unlink()
    _open_without_origin(d.socket, str(m), keep, version).close()


def test_crc32_written_before_its_weights_does_not_poison_the_location(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """An upload that writes the new crc32.txt first and the weights after: an open in
    between fails cleanly (IntegrityError or a source error), and once the upload is complete
    the next open gets the new model (regression: the half-uploaded sizes stayed bound to the
    crc32 file's digest, and every later open failed)."""
    m = make_random_model(tmp_path / "models" / "m", 4, files=2, seed=8)
    generate_crc32(m)
    d = daemon_factory(roots=[tmp_path / "models"])
    with mows.open_model(m, socket=d.socket, fallback=False) as h:
        old = h.version
    wait_unpinned(d.socket)
    new = make_random_model(tmp_path / "upload", 6, files=2, seed=9)  # other sizes too
    generate_crc32(new)
    shutil.copyfile(new / "crc32.txt", m / "crc32.txt")
    for f in sorted(new.glob("*.safetensors")):  # half of each new file so far
        data = f.read_bytes()
        (m / f.name).write_bytes(data[: len(data) // 2])
    with pytest.raises((mows.IntegrityError, mows.SourceError)):
        mows.open_model(m, socket=d.socket, fallback=False).close()
    for f in sorted(new.glob("*")):  # the upload completes
        shutil.copyfile(f, m / f.name)
    with mows.open_model(m, socket=d.socket, fallback=False) as h:
        assert h.version != old
        assert_same_as_files(h.state_dict(), new)


# -- 4. integrity is the daemon's -----------------------------------------------------------------


def test_client_cannot_choose_the_crc32_file(daemon_factory: Any, tmp_path: Path) -> None:
    """A client asking for another crc32 file than the daemon's gets a ConfigError that names
    the daemon's crc32 file; nothing is loaded for it."""
    m = make_random_model(tmp_path / "m", 2, files=1)
    generate_crc32(m)
    (m / "other.txt").write_text((m / "crc32.txt").read_text())
    d = daemon_factory(roots=[m])
    with pytest.raises(mows.ConfigError, match=r"crc32\.txt"):
        mows.open_model(m, socket=d.socket, fallback=False, crc32_file="other.txt")
    assert fast_status(d.socket)["used_bytes"] == 0
    with mows.open_model(m, socket=d.socket, fallback=False) as h:  # the default still works
        assert_same_as_files(h.state_dict(), m)


CORRUPT_RACE = """
import json, os, sys, time
import mows
sock, path, crc32_file, ready, go = sys.argv[1:6]
kwargs = {} if crc32_file == "-" else {"crc32_file": crc32_file}
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
outcomes = []
end = time.monotonic() + 3
while time.monotonic() < end:
    try:
        mows.open_model(path, socket=sock, fallback=False, **kwargs).close()
        outcomes.append("opened")
    except mows.MowsError as e:
        outcomes.append(type(e).__name__)
print(json.dumps(outcomes))
"""


def test_corrupt_origin_is_never_served_even_with_a_concurrent_override(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A byte flipped after crc32.txt was made: every cold open raises IntegrityError and no
    pool file of that shard appears, while another process hammers the same model with
    ``crc32_file="nothing.txt"`` (which must be refused, never fill the pool).

    The two openers are processes, not threads: a process has one connection to the daemon
    and its requests are serialised on it, so threads of one process never race in the daemon.
    """
    m = make_random_model(tmp_path / "m", 4, files=2, seed=9)
    generate_crc32(m)
    shard = sorted(m.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x40
    shard.write_bytes(bytes(data))
    d = daemon_factory(roots=[m])

    with pytest.raises(mows.IntegrityError) as e:
        mows.open_model(m, socket=d.socket, fallback=False)
    assert shard.name in str(e.value)

    go = tmp_path / "go"
    ready = [tmp_path / "ready-override", tmp_path / "ready-default"]
    override = spawn(CORRUPT_RACE, d.socket, str(m), "nothing.txt", str(ready[0]), str(go))
    default = spawn(CORRUPT_RACE, d.socket, str(m), "-", str(ready[1]), str(go))
    try:
        _wait(lambda: all(r.exists() for r in ready), timeout=60)
    finally:
        go.touch()  # both loops start together (or at once, if one never got ready)
    (rc_o, out_o, err_o), (rc_d, out_d, err_d) = run_all([override, default], timeout=60)
    assert rc_o == 0, err_o
    assert rc_d == 0, err_d
    overridden, defaulted = json.loads(out_o), json.loads(out_d)
    assert overridden and defaulted
    assert set(defaulted) == {"IntegrityError"}, defaulted
    assert set(overridden) == {"ConfigError"}, overridden
    assert not any(p.name.startswith(shard.name) for p in d.pool_dir.rglob("*"))
    assert fast_status(d.socket)["integrity_failures"] >= 1


# -- 5. no deadlock under a tight cap ------------------------------------------------------------

LOADER = """
import sys, time
from pathlib import Path
import mows, torch
from safetensors.torch import load_file

sock, hold, paths = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
for path in paths:
    ref = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        ref.update(load_file(f))
    try:
        h = mows.open_model(path, socket=sock, fallback=False)
    except mows.CapacityError as e:
        print("CAPACITY", path, str(e).replace("\\n", " "), flush=True)
        continue
    sd = h.state_dict()
    assert sorted(sd) == sorted(ref), path
    for name, t in ref.items():
        assert torch.equal(sd[name].view(torch.uint8), t.view(torch.uint8)), (path, name)
    time.sleep(hold)
    del sd
    h.close()
    print("LOADED", path, flush=True)
"""


def _four_models(root: Path) -> list[Path]:
    models = [make_random_model(root / f"m{i}", 20, files=2, seed=20 + i) for i in range(4)]
    for m in models:
        generate_crc32(m)
    return models


def _run_loaders(mnt: Path, sock: str, jobs: list[list[Path]]) -> list[str]:
    """Start one LOADER per job at once under a 90 s deadline; return every marker line."""
    with Sampler(mnt) as sampler:
        procs = [spawn(LOADER, sock, "2", *map(str, job)) for job in jobs]
        results = run_all(procs, timeout=90)
    assert not sampler.errors, sampler.errors
    assert sampler.samples
    assert max(sampler.samples) <= 48 * MiB + SLACK, max(sampler.samples)
    markers: list[str] = []
    for (rc, out, err), job in zip(results, jobs, strict=True):
        assert rc == 0, f"{job}: exit {rc}\n{err}"
        lines = [
            line for line in out.splitlines() if line.split(" ", 1)[0] in {"LOADED", "CAPACITY"}
        ]
        assert [line.split(" ")[1] for line in lines] == [str(p) for p in job], out
        markers += lines
    return markers


@pytest.mark.slow
@needs_root
def test_four_clients_four_models_no_deadlock(
    dedicated_tmpfs: Path, daemon_factory: Any, tmp_path: Path
) -> None:
    """4 processes open 4 different 20 MiB models at once in a 48 MiB pool: each ends with its
    model bitwise-correct or a clean CapacityError within 90 s, at least one loads, and the
    pool filesystem never exceeds the cap."""
    models = _four_models(tmp_path / "models")
    d = daemon_factory(
        roots=[tmp_path / "models"], max_memory="48MiB", pool_dir=dedicated_tmpfs / "pool"
    )
    markers = _run_loaders(dedicated_tmpfs, d.socket, [[m] for m in models])
    assert any(line.startswith("LOADED") for line in markers), markers
    assert "Traceback" not in d.log()


@pytest.mark.slow
@needs_root
def test_four_clients_two_models_each_in_sequence_no_deadlock(
    dedicated_tmpfs: Path, daemon_factory: Any, tmp_path: Path
) -> None:
    """As above, each process opening two models one after the other (closing the first
    before opening the second)."""
    models = _four_models(tmp_path / "models")
    d = daemon_factory(
        roots=[tmp_path / "models"], max_memory="48MiB", pool_dir=dedicated_tmpfs / "pool"
    )
    jobs = [[models[i], models[(i + 1) % 4]] for i in range(4)]
    markers = _run_loaders(dedicated_tmpfs, d.socket, jobs)
    assert any(line.startswith("LOADED") for line in markers), markers
    assert "Traceback" not in d.log()


def test_load_waiting_for_space_times_out_naming_the_holder(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """``--load-timeout 2``: while another client holds a 30 MiB model in a 48 MiB pool, a
    30 MiB load gets a CapacityError about pinned/held bytes within 10 s; once the holder
    leaves, the same load succeeds."""
    a = make_random_model(tmp_path / "models" / "a", 30, files=2, seed=30)
    b = make_random_model(tmp_path / "models" / "b", 30, files=2, seed=31)
    d = daemon_factory(
        roots=[tmp_path / "models"], max_memory="48MiB", extra=["--load-timeout", "2"]
    )
    with held(d.socket, a) as holder:
        got = holder.next()
        assert "error" not in got, got
        start = time.monotonic()
        with pytest.raises(mows.CapacityError) as e:
            mows.open_model(b, socket=d.socket, fallback=False)
        elapsed = time.monotonic() - start
        assert elapsed < 10, elapsed
        assert re.search(r"pinned|held", str(e.value), re.IGNORECASE), str(e.value)
        holder.close()
    wait_unpinned(d.socket)
    with mows.open_model(b, socket=d.socket, fallback=False) as h:
        assert_same_as_files(h.state_dict(), b)


# -- 6. evict-before-pin ------------------------------------------------------------------------

LOOPER = """
import json, sys, time
from pathlib import Path
import mows, torch
from safetensors.torch import load_file

sock, seconds, start, paths = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
refs = {}
for path in paths:
    refs[path] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        refs[path].update(load_file(f))
loaded = capacity = 0
i = start
end = time.monotonic() + seconds
while time.monotonic() < end:
    path = paths[i % len(paths)]
    i += 1
    try:
        h = mows.open_model(path, socket=sock, fallback=False)
    except mows.CapacityError:
        capacity += 1
        time.sleep(0.02)
        continue
    sd = h.state_dict()
    assert sorted(sd) == sorted(refs[path]), path
    for name, t in refs[path].items():
        assert torch.equal(sd[name].view(torch.uint8), t.view(torch.uint8)), (path, name)
    del sd
    h.close()
    loaded += 1
print(json.dumps({"loaded": loaded, "capacity": capacity}))
"""


@pytest.mark.slow
def test_alternating_opens_under_pressure_see_only_capacity_errors(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Three processes open X and Y in turn for 15 s, the cap fitting one of them: every open
    either maps bitwise-correct tensors or raises CapacityError; never FileNotFoundError (a
    file evicted between the daemon's answer and the client's mapping) or anything else."""
    x = make_random_model(tmp_path / "models" / "x", 8, files=2, seed=40)
    y = make_random_model(tmp_path / "models" / "y", 8, files=2, seed=41)
    generate_crc32(x)
    generate_crc32(y)
    d = daemon_factory(roots=[tmp_path / "models"], max_memory="12MiB")
    procs = [spawn(LOOPER, d.socket, "15", str(k), str(x), str(y)) for k in range(3)]
    results = run_all(procs, timeout=90)
    loaded = 0
    for rc, out, err in results:
        assert rc == 0, err
        assert "FileNotFoundError" not in err
        counts = json.loads(out)
        loaded += counts["loaded"]
    assert loaded >= 3, results
    st = fast_status(d.socket)
    assert st["used_bytes"] <= st["capacity_bytes"]
    assert "Traceback" not in d.log()


# -- 7. prefetch evicted mid-chunk ---------------------------------------------------------------


def _prefetch(sock: str, model: Path) -> dict[str, Any]:
    for m in fast_status(sock)["prefetch"]["models"]:
        if m["path"] == str(model):
            return dict(m)
    return {}


def test_prefetch_recovers_from_its_partial_files_being_evicted(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A full prefetch of M1 at 2 MiB/s in a 12 MiB pool; mid-way a client loads the 8 MiB M2,
    which can only fit by evicting M1's partial files (held chunk by chunk, so never mid-write).
    Prefetch never evicts, so while M2 stays cached it must say the pool is full (not claim
    "done"); it keeps running, and once a client opens M1 (evicting M2) its next pass finds the
    model whole. M1 opens bitwise-correct; no traceback in the log."""
    m1 = make_random_model(tmp_path / "m1", 8, files=2, seed=50)
    m2 = make_random_model(tmp_path / "roots" / "m2", 8, files=2, seed=51)
    generate_crc32(m1)
    generate_crc32(m2)
    cap = 12 * MiB
    d = daemon_factory(
        roots=[tmp_path / "roots"],
        max_memory="12MiB",
        extra=[
            "--model-path",
            str(m1),
            "--prefetch",
            "full",
            "--prefetch-rate",
            "2MiB",
            "--prefetch-delay",
            "0",
        ],
    )
    need = cap - tensor_bytes(m2)  # held beyond this: M2 fits only by evicting prefetched bytes

    def far_enough() -> bool:
        pf = _prefetch(d.socket, m1)
        assert pf.get("state") != "done", f"prefetch finished before the client came: {pf}"
        return pf.get("state") in {"running", "paused"} and pf.get("held_bytes", 0) > need

    _wait(far_enough, timeout=30)
    with mows.open_model(m2, socket=d.socket, fallback=False) as h:
        assert_same_as_files(h.state_dict(), m2)
        st = fast_status(d.socket)
        assert st["used_bytes"] <= cap
        assert _prefetch(d.socket, m1)["held_bytes"] < _prefetch(d.socket, m1)["target_bytes"]
    gc.collect()
    wait_unpinned(d.socket)

    last: list[dict[str, Any]] = [{}]

    def settled(want: str) -> Callable[[], bool]:
        def check() -> bool:
            pf = last[0] = _prefetch(d.socket, m1)
            if pf.get("state") == "done":
                assert pf["held_bytes"] == pf["target_bytes"], f"claims done, holds part: {pf}"
            return pf.get("state") == want

        return check

    try:
        _wait(settled("stopped: the pool is full"), timeout=30)
    except AssertionError as e:
        raise AssertionError(f"{e}: prefetch state {last[0]}\n{d.log()[-3000:]}") from None
    assert last[0]["held_bytes"] < last[0]["target_bytes"]
    with mows.open_model(m1, socket=d.socket, fallback=False) as h:
        assert_same_as_files(h.state_dict(), m1)
    gc.collect()
    _wait(settled("done"), timeout=30)  # the loop survived: its next pass finds M1 whole
    assert last[0]["held_bytes"] == last[0]["target_bytes"]
    assert fast_status(d.socket)["used_bytes"] <= cap
    assert "Traceback" not in d.log()


# -- 8. metrics while loading -------------------------------------------------------------------


def test_metrics_answer_while_models_load_and_update(daemon_factory: Any, tmp_path: Path) -> None:
    """/metrics scraped in a tight loop while three models load in turn (with evictions) and
    one is updated at its origin: every scrape is a 200 that parses and has the pool gauge."""
    models = [
        make_random_model(tmp_path / "models" / f"m{i}", 4, files=2, seed=60 + i) for i in range(3)
    ]
    for m in models:
        generate_crc32(m)
    port = free_port()
    d = daemon_factory(
        roots=[tmp_path / "models"],
        max_memory="12MiB",
        extra=["--metrics-listen", f"127.0.0.1:{port}"],
    )
    errors: list[str] = []
    scrapes: list[dict[str, float]] = []
    stop = threading.Event()

    def scrape_loop() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    if r.status != 200:
                        errors.append(f"status {r.status}")
                        continue
                    text = r.read().decode()
                values = {}
                for line in text.splitlines():
                    if line and not line.startswith("#"):
                        name, _, value = line.rpartition(" ")
                        values[name] = float(value)
                if "mows_pool_used_bytes" not in values:
                    errors.append("no mows_pool_used_bytes in a scrape")
                scrapes.append(values)
            except Exception as e:  # collected and asserted on below
                errors.append(repr(e))

    def load(m: Path) -> str:
        with mows.open_model(m, socket=d.socket, fallback=False) as h:
            assert_same_as_files(h.state_dict(), m)
            version = str(h.version)
        gc.collect()
        wait_unpinned(d.socket)
        return version

    thread = threading.Thread(target=scrape_loop)
    thread.start()
    try:
        first = load(models[0])
        load(models[1])
        load(models[2])
        replace_in_place(models[0], 4, files=2, seed=70)
        assert load(models[0]) != first
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors[:5]
    assert len(scrapes) >= 5, len(scrapes)
    last = scrapes[-1]
    assert last["mows_pool_used_bytes"] <= 12 * MiB
    assert last["mows_evictions_total"] >= 1
