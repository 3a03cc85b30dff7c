"""The node daemon with real processes, real sockets and real shared memory."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mows
from mows import AccessDeniedError, CapacityError, DaemonUnavailableError, IntegrityError
from tests.daemons import (
    POOL_METADATA,
    fs_used,
    generate_crc32,
    load_in_parallel,
    make_random_model,
)


def mapping_of(addr: int) -> str:
    """The file that backs ``addr`` in this process, from /proc/self/maps."""
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    return ""


def client(
    code: str, sock: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    prog = "import sys, mows, torch\nsock = sys.argv[1]\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", prog, sock, *args], capture_output=True, text=True, timeout=timeout
    )


def assert_same_as_files(sd: dict[str, torch.Tensor], model: Path) -> None:
    ref: dict[str, torch.Tensor] = {}
    for f in sorted(model.glob("*.safetensors")):
        ref.update(load_file(f))
    assert sorted(sd) == sorted(ref)
    for name, t in ref.items():
        assert sd[name].dtype == t.dtype and sd[name].shape == t.shape
        assert torch.equal(sd[name].view(torch.uint8), t.view(torch.uint8)), name


def test_tensors_are_bitwise_views_of_pool_files(daemon_factory: Any, tiny_qwen2: Path) -> None:
    d = daemon_factory(roots=[tiny_qwen2])
    sd = mows.load_state_dict(tiny_qwen2, socket=d.socket, fallback=False)
    assert_same_as_files(sd, tiny_qwen2)
    for t in sd.values():
        if t.numel():
            assert mapping_of(t.data_ptr()).startswith(str(d.pool_dir)), mapping_of(t.data_ptr())
    with mows.open_model(tiny_qwen2, socket=d.socket) as h:
        name = h.keys()[0]
        assert torch.equal(h.get_slice(name)[:2], h.get_tensor(name)[:2])
        assert h.get_slice(name).get_shape() == list(h.get_tensor(name).shape)
        assert h.metadata().get("format") == "pt"
        names = [n for n, _ in h.iter_weights()]
        assert sorted(names) == sorted(sd)
    st = d.status()
    (m,) = st["models"]
    assert m["cached_fraction"] == 1.0 and m["path"] == str(tiny_qwen2)
    assert st["bytes_from_origin"] == m["bytes"]
    assert st["used_bytes"] <= st["capacity_bytes"]


def test_in_place_writes_do_not_reach_the_pool(daemon_factory: Any, tiny_qwen2: Path) -> None:
    d = daemon_factory(roots=[tiny_qwen2])
    sd = mows.load_state_dict(tiny_qwen2, socket=d.socket)
    name = next(n for n, t in sd.items() if t.numel())
    sd[name].zero_()  # an engine mutating a weight gets a private copy of that page
    other = client(
        """
        sd = mows.load_state_dict(sys.argv[2], socket=sock)
        print(float(sd[sys.argv[3]].abs().sum()))
        """,
        d.socket,
        str(tiny_qwen2),
        name,
    )
    assert other.returncode == 0, other.stderr
    assert float(other.stdout) > 0


PFN_CODE = """
import os, struct
sd = mows.load_state_dict(sys.argv[2], socket=sock)
out = []
with open("/proc/self/pagemap", "rb", buffering=0) as pm:
    for name in sorted(sd):
        t = sd[name]
        if t.nbytes < 8192:
            continue
        addr = t.data_ptr()
        float(t.view(-1)[0])  # touch the page
        pm.seek((addr // 4096) * 8)
        (entry,) = struct.unpack("<Q", pm.read(8))
        out.append(f"{name}={entry & ((1 << 55) - 1)}")
print(" ".join(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="page frame numbers need root")
def test_two_processes_share_physical_pages(daemon_factory: Any, tiny_qwen2: Path) -> None:
    d = daemon_factory(roots=[tiny_qwen2])
    runs = [client(PFN_CODE, d.socket, str(tiny_qwen2)) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    a, b = (dict(x.split("=") for x in r.stdout.split()) for r in runs)
    assert a and a == b
    assert all(int(v) != 0 for v in a.values())


def test_cap_holds_for_models_loaded_in_turn(daemon_factory: Any, tmp_path: Path) -> None:
    models = [make_random_model(tmp_path / f"m{i}", 24, seed=i) for i in range(3)]
    d = daemon_factory(roots=[tmp_path], max_memory="56MiB")
    for m in models * 2:
        sd = mows.load_state_dict(m, socket=d.socket)
        assert_same_as_files(sd, m)
        del sd
        gc.collect()
        st = d.status()
        assert st["used_bytes"] <= st["capacity_bytes"]
        assert _pool_bytes(d.pool_dir) <= st["capacity_bytes"]
    st = d.status()
    assert st["evictions"] >= 4
    assert st["misses"] == 6 and st["hits"] == 0


def _pool_bytes(pool: Path) -> int:
    """Bytes of shared memory the pool's files occupy (files may vanish while we look)."""
    total = 0
    for dirpath, _, names in os.walk(pool):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def test_cap_holds_for_models_loaded_concurrently(daemon_factory: Any, tmp_path: Path) -> None:
    models = [make_random_model(tmp_path / f"m{i}", 24, seed=i) for i in range(3)]
    d = daemon_factory(roots=[tmp_path], max_memory="56MiB")
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_pool_bytes(d.pool_dir))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    load_in_parallel([(d.socket, m) for m in models])
    stop.set()
    sampler.join()
    cap = 56 * 2**20
    assert samples and max(samples) <= cap
    st = d.status()
    assert st["used_bytes"] <= cap
    assert st["evictions"] >= 1


def test_model_bigger_than_cap_is_a_capacity_error(daemon_factory: Any, tmp_path: Path) -> None:
    m = make_random_model(tmp_path / "big", 24)
    d = daemon_factory(roots=[tmp_path], max_memory="16MiB")
    with pytest.raises(CapacityError, match="needs"):
        mows.open_model(m, socket=d.socket)
    assert d.status()["used_bytes"] == 0


def test_pinned_model_is_not_evicted(daemon_factory: Any, tmp_path: Path) -> None:
    a = make_random_model(tmp_path / "a", 24, seed=1)
    b = make_random_model(tmp_path / "b", 24, seed=2)
    d = daemon_factory(roots=[tmp_path], max_memory="40MiB")
    held = mows.load_state_dict(a, socket=d.socket)
    with pytest.raises(CapacityError, match="pinned"):
        mows.open_model(b, socket=d.socket)
    assert_same_as_files(held, a)
    del held
    gc.collect()
    _wait(lambda: d.status()["pinned_bytes"] == 0)
    assert_same_as_files(mows.load_state_dict(b, socket=d.socket), b)


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_sigkilled_client_releases_its_pins(daemon_factory: Any, tiny_qwen2: Path) -> None:
    d = daemon_factory(roots=[tiny_qwen2])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, mows\n"
            "sd = mows.load_state_dict(sys.argv[2], socket=sys.argv[1])\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n",
            d.socket,
            str(tiny_qwen2),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert d.status()["models"][0]["pins"] == 1
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    _wait(lambda: d.status()["models"][0]["pins"] == 0)
    assert d.status()["pinned_bytes"] == 0


def test_flipped_source_byte_fails_the_load_and_nothing_is_served(
    daemon_factory: Any, model_copy: Path
) -> None:
    generate_crc32(model_copy)
    shard = sorted(model_copy.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x40
    shard.write_bytes(bytes(data))
    d = daemon_factory(roots=[model_copy])
    with pytest.raises(IntegrityError) as e:
        mows.open_model(model_copy, socket=d.socket)
    assert shard.name in str(e.value) and shard.name in e.value.path
    assert e.value.expected != e.value.actual
    # Not in the pool, not partially: no client can map it.
    assert not any(p.name.startswith(shard.name) for p in d.pool_dir.rglob("*"))
    st = d.status()
    assert st["integrity_failures"] == 1
    (m,) = st["models"]
    assert not next(f for f in m["files"] if f["path"] == shard.name)["cached"]
    r = client("mows.load_state_dict(sys.argv[2], socket=sock)", d.socket, str(model_copy))
    assert r.returncode != 0 and "IntegrityError" in r.stderr


def test_paths_outside_the_roots_are_refused(daemon_factory: Any, tiny_qwen2: Path) -> None:
    d = daemon_factory(roots=[tiny_qwen2])
    for path in ("/etc", f"{tiny_qwen2}/../..", "/"):
        with pytest.raises(AccessDeniedError, match="not under"):
            mows.open_model(path, socket=d.socket)


def test_garbage_on_the_socket_closes_only_that_connection(
    daemon_factory: Any, tiny_qwen2: Path
) -> None:
    d = daemon_factory(roots=[tiny_qwen2])
    good = mows.open_model(tiny_qwen2, socket=d.socket)
    payloads = [
        b"\x00\x00\x00\x05hello",  # not msgpack of a message
        struct.pack(">I", 2**31) + b"x" * 16,  # a frame too large
        b"GET / HTTP/1.1\r\n\r\n",
        os.urandom(4096),
    ]
    for junk in payloads:
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.socket)
        s.sendall(junk)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass  # the daemon answers with an error, then closes
        except (ConnectionResetError, TimeoutError):
            pass
        s.close()
    # The earlier client and a new one still work; the daemon is alive.
    assert d.proc.poll() is None
    assert good.get_tensor(good.keys()[0]).numel() > 0
    assert_same_as_files(mows.load_state_dict(tiny_qwen2, socket=d.socket), tiny_qwen2)


def test_concurrent_opens_share_one_fetch(daemon_factory: Any, tmp_path: Path) -> None:
    m = make_random_model(tmp_path / "m", 32)
    d = daemon_factory(roots=[tmp_path])
    load_in_parallel([(d.socket, m)] * 3)
    st = d.status()
    assert st["bytes_from_origin"] == st["models"][0]["bytes"]


def test_restart_adopts_verified_files_and_drops_corrupt_ones(
    daemon_factory: Any, tmp_path: Path
) -> None:
    m = make_random_model(tmp_path / "m", 8, files=2)
    d = daemon_factory(roots=[tmp_path])
    mows.open_model(m, socket=d.socket).close()
    pool = d.pool_dir
    d.stop(clean=False)
    shards = sorted(pool.rglob("*.safetensors"))
    assert len(shards) == 2
    with open(shards[0], "r+b") as f:  # corrupt one pool file while the daemon is down
        f.seek(1000)
        f.write(b"\xff")
    d2 = daemon_factory(roots=[tmp_path], pool_dir=pool)
    st = d2.status()
    (model,) = st["models"]
    assert 0 < model["cached_fraction"] < 1
    with mows.open_model(m, socket=d2.socket) as h:
        assert h.stats["bytes_from_origin"] == (m / shards[0].name).stat().st_size
        assert h.stats["bytes_from_pool"] > 0
        assert_same_as_files(h.state_dict(), m)


def test_source_change_is_refetched(daemon_factory: Any, tmp_path: Path) -> None:
    m = make_random_model(tmp_path / "m", 4, files=1)
    d = daemon_factory(roots=[tmp_path])
    mows.open_model(m, socket=d.socket).close()
    make_random_model(m, 4, files=1, seed=7)  # same names, new bytes
    sd = mows.load_state_dict(m, socket=d.socket)
    assert_same_as_files(sd, m)


def test_fallback_without_a_daemon(tiny_qwen2: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "nobody.sock")
    with pytest.warns(mows.DaemonFallbackWarning, match="no mows daemon"):
        sd = mows.load_state_dict(tiny_qwen2, socket=missing)
    assert_same_as_files(sd, tiny_qwen2)
    with pytest.raises(DaemonUnavailableError):
        mows.load_state_dict(tiny_qwen2, socket=missing, fallback=False)


def test_daemon_stops_cleanly_on_sigterm(daemon_factory: Any, tiny_qwen2: Path) -> None:
    d = daemon_factory(roots=[tiny_qwen2])
    mows.open_model(tiny_qwen2, socket=d.socket).close()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert not os.path.exists(d.socket)
    assert "stopped" in d.log()


def test_first_open_after_a_daemon_restart_succeeds(daemon_factory: Any, tmp_path: Path) -> None:
    """Regression (bench/chaos.py): a process kept its connection to a daemon that was
    killed and restarted, and its next open failed with 'Broken pipe' (a stream's, twice:
    one per connection) although the daemon was back."""
    model = make_random_model(tmp_path / "m", 8, files=2)
    d = daemon_factory(roots=[tmp_path])
    assert_same_as_files(mows.load_state_dict(model, socket=d.socket, fallback=False), model)
    assert sum(1 for _ in mows.iter_weights(model, socket=d.socket, fallback=False)) > 0
    d.stop(clean=False, sig=signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d.socket)
    d.start()
    assert_same_as_files(mows.load_state_dict(model, socket=d.socket, fallback=False), model)
    streamed = {name: t.clone() for name, t in mows.iter_weights(model, socket=d.socket)}
    assert_same_as_files(streamed, model)


def test_a_connection_lost_to_a_restart_is_closed_when_replaced(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Regression (CI, an unraisable ResourceWarning): a request that failed on a killed
    daemon marked its session closed without closing its socket, and the next call made a
    new session and left the old socket to the garbage collector."""
    from mows.client._session import get_session

    model = make_random_model(tmp_path / "m", 4, files=1)
    d = daemon_factory(roots=[tmp_path])
    old = get_session(d.socket)
    old.open(str(model), pin=False)
    d.stop(clean=False, sig=signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d.socket)
    with pytest.raises(mows.DaemonUnavailableError):
        for _ in range(3):  # the first send may still fit in the socket's buffer
            old.open(str(model), pin=False)
    assert old.closed
    d.start()
    new = get_session(d.socket)
    assert new is not old
    assert old._sock.fileno() == -1  # closed, not left to the GC
    new.open(str(model), pin=False)


def test_a_failed_stream_releases_its_pins_at_once(daemon_factory: Any, tmp_path: Path) -> None:
    """Regression (bench/chaos.py): a stream that failed kept the pins of the file it was
    reading until Python's cyclic GC ran (its exception's traceback held the generator
    frame, which held the future, which held the exception), so the next load waited for
    pool space its full load timeout. With the GC off, the pins must go with the error
    (here a CapacityError: 8 MiB files, two held by the stream and a third asked for under a
    24 MiB cap; or the IntegrityError of the file corrupted at the origin)."""
    model = make_random_model(tmp_path / "m", 32, files=4)
    d = daemon_factory(roots=[tmp_path], max_memory="24MiB")
    files = sorted(p for p in model.iterdir() if p.suffix == ".safetensors")
    failed = False
    gc.disable()
    try:
        try:  # not pytest.raises: its ExceptionInfo would keep the traceback (and pins)
            for i, (_, t) in enumerate(mows.iter_weights(model, socket=d.socket)):
                if i == 0:  # the origin's bytes go bad under crc32.txt: that file fails
                    data = bytearray(files[-1].read_bytes())
                    data[-1] ^= 0xFF
                    files[-1].write_bytes(bytes(data))
                del t
        except mows.MowsError:
            failed = True
        assert failed
        _wait(lambda: d.status()["pinned_bytes"] == 0, timeout=5)
        # The witness: the space is there for another model, which evicts what the stream
        # left (with the pins still held, a CapacityError at once).
        other = make_random_model(tmp_path / "other", 16, files=2, seed=9)
        started = time.monotonic()
        with mows.open_model(other, socket=d.socket, fallback=False) as h:
            assert_same_as_files(h.state_dict(), other)
        assert time.monotonic() - started < 10
    finally:
        gc.enable()


def test_pins_outlive_a_clients_exit_while_it_maps(daemon_factory: Any, tmp_path: Path) -> None:
    """Regression (bench/soak.py): a client closed its daemon connections at exit while
    tensors it still held mapped pool files, so the daemon dropped the pins and could evict
    (unlink) files the process still mapped: the pool filesystem went over the cap. The
    pins must last until the kernel has unmapped the process's memory."""
    model = make_random_model(tmp_path / "m", 8, files=1)
    d = daemon_factory(roots=[tmp_path])
    script = textwrap.dedent(
        f"""
        import atexit, json, sys

        def report():  # registered first: runs after mows's own exit handler
            from mows.client._session import get_session
            print(json.dumps(get_session({d.socket!r}, lane="probe").status()))

        atexit.register(report)
        import mows
        KEPT = dict(mows.load_state_dict({str(model)!r}, socket={d.socket!r}, fallback=False))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    status = json.loads(r.stdout.strip().splitlines()[-1])
    assert status["pinned_bytes"] >= 8 << 20, status  # still pinned while KEPT maps it
    _wait(lambda: d.status()["pinned_bytes"] == 0, timeout=10)  # and released after


def test_a_file_mapped_across_a_daemon_restart_is_not_evicted(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Regression (bench/chaos.py): a client still mapping a pool file when its daemon was
    SIGKILLed kept reading it, but the new daemon, which never saw that client's pins,
    adopted the file and evicted it for the next load: its pages stayed mapped, uncounted,
    and the pool's filesystem went over the cap. Clients hold a shared flock on every file
    they map; the daemon does not evict a file so locked."""
    first = make_random_model(tmp_path / "first", 16, files=1, seed=1)
    second = make_random_model(tmp_path / "second", 16, files=1, seed=2)
    d = daemon_factory(roots=[tmp_path], max_memory="24MiB", extra=["--load-timeout", "2"])
    handle = mows.open_model(first, socket=d.socket, fallback=False)
    kept = dict(handle.state_dict())
    pool_file = next(p for p in Path(handle.files[next(iter(handle.files))]).parent.iterdir())
    d.stop(clean=False, sig=signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d.socket)
    d.start()  # adopts the first model's file: nobody pins it here
    with pytest.raises(CapacityError):  # the second fits only if the first goes
        mows.open_model(second, socket=d.socket, fallback=False)
    assert pool_file.exists(), "a file a live client maps was evicted"
    assert_same_as_files(kept, first)
    del kept
    handle.close()
    del handle
    gc.collect()  # the last tensor goes: the mapping, and its lock, with it
    with mows.open_model(second, socket=d.socket, fallback=False) as h:
        assert_same_as_files(h.state_dict(), second)
    assert not pool_file.exists()  # evicted once let go


STREAM_AND_COMPARE = """
import json, sys, time
from pathlib import Path

import mows, torch
from safetensors.torch import load_file

sock, model = sys.argv[1], Path(sys.argv[2])
ref = {}
for f in sorted(model.glob("*.safetensors")):
    ref.update(load_file(f))
started = time.monotonic()
seen = 0
try:
    # A plain loop: the consumer still holds each tensor while it asks for the next one.
    for name, t in mows.iter_weights(model, socket=sock, fallback=False, stream=True):
        assert torch.equal(t.view(torch.uint8), ref.pop(name).view(torch.uint8)), name
        seen += 1
        time.sleep(0.02)  # reading the file a while: the other stream loads meanwhile
    error = None
except mows.MowsError as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"seen": seen, "left": sorted(ref), "error": error,
                  "seconds": time.monotonic() - started}))
"""


def test_two_streams_under_a_tight_cap_both_finish(
    dedicated_tmpfs: Path, daemon_factory: Any, tmp_path: Path
) -> None:
    """Regression (bench/chaos.py, issue 16): two processes streamed a model each through a
    pool that holds two of their files (8 MiB each: a third does not fit 24 MiB). Each held
    its current file (a transient pin: its consumer still had that file's last tensor) and
    waited in the daemon's line for space for its next, which only the other's release
    could free: both failed with a CapacityError after --load-timeout. A stream's fetch-ahead
    now never waits for space; without room, the file's last tensor is a copy and the next
    file is waited for once the stream's pin is gone. The cap is measured on the pool's own
    tmpfs (unlinked but mapped pages count), not taken from the daemon."""
    models = [make_random_model(tmp_path / f"m{i}", 32, files=4, seed=i) for i in (1, 2)]
    cap = 24 << 20
    d = daemon_factory(
        roots=[tmp_path],
        max_memory="24MiB",
        extra=["--load-timeout", "15"],
        pool_dir=dedicated_tmpfs / "pool",
    )
    used: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            used.append(fs_used(dedicated_tmpfs))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", STREAM_AND_COMPARE, d.socket, str(m)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for m in models
        ]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        stop.set()
        sampler.join()
    for r in results:
        assert r["error"] is None, r["error"]
        assert r["seen"] == 16 and r["left"] == [], r  # every tensor, bitwise the source's
        assert r["seconds"] < 10, r  # not a wait for --load-timeout (15 s)
    assert len(used) > 100 and max(used) <= cap + POOL_METADATA, max(used)
    assert d.status()["pinned_bytes"] == 0


def test_a_stream_whose_consumer_keeps_every_tensor_fails_naming_what_it_holds(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A consumer that keeps the tensors of the files it moved past is not streaming: when
    the pool cannot hold them all, the stream fails with a CapacityError that says so (the
    cap, and the files the consumer still holds), not a bare wait for space."""
    model = make_random_model(tmp_path / "m", 32, files=4)
    d = daemon_factory(roots=[tmp_path], max_memory="24MiB", extra=["--load-timeout", "2"])
    kept: list[torch.Tensor] = []
    with pytest.raises(CapacityError) as info:
        for _, t in mows.iter_weights(model, socket=d.socket, fallback=False, stream=True):
            kept.append(t)
    message = str(info.value)
    assert "keeps tensors of model-00000-of-00004.safetensors" in message, message
    assert "model-00001-of-00004.safetensors" in message and "capacity is" in message, message
    assert len(kept) == 8  # two files' tensors: all the pool can hold
