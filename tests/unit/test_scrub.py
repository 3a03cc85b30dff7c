"""The scrub's pacing (pure functions) and one pass over a real pool directory (pure asyncio,
no daemon): what it reads, how fast, what it drops and what it keeps."""

from __future__ import annotations

import asyncio
import os
import zlib
from pathlib import Path
from typing import Any

import pytest

from mows import ConfigError
from mows._config import DaemonConfig, load_daemon_config
from mows.daemon._scrub import Scrubber, _Pass, chunk_crc, pace, scrub_rate
from mows.pool import FileState, Pool
from tests.daemons import make_manifest

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
DAY = 86400.0


def test_the_rate_spreads_a_pass_over_the_interval_under_the_ceiling() -> None:
    assert scrub_rate(TiB, DAY, 0) == pytest.approx(TiB / DAY)  # ~12.7 MB/s: a pass a day
    assert scrub_rate(TiB, DAY, 64 * MiB) == pytest.approx(TiB / DAY)  # under the ceiling
    assert scrub_rate(100 * TiB, DAY, 64 * MiB) == 64 * MiB  # capped: passes take longer
    assert scrub_rate(10 * GiB, DAY, 64 * MiB) < 200 * KiB  # a small pool: a trickle
    assert scrub_rate(TiB, 0, 64 * MiB) == 0.0  # off
    assert scrub_rate(0, DAY, 64 * MiB) == 0.0  # nothing to check


def test_pace_spaces_reads_and_gives_no_credit_for_idle_time() -> None:
    rate = 10 * MiB
    wait, slot = pace(100.0, 0.0, MiB, rate)
    assert wait == 0.0 and slot == pytest.approx(100.1)  # the first read goes at once
    wait, slot = pace(100.0, slot, MiB, rate)
    assert wait == pytest.approx(0.1) and slot == pytest.approx(100.2)
    # Paused an hour (loads ran): the next read goes now, and the one after is spaced again.
    wait, slot = pace(3700.0, slot, MiB, rate)
    assert wait == 0.0 and slot == pytest.approx(3700.1)
    wait, _ = pace(3700.0, slot, 4 * MiB, rate)
    assert wait == pytest.approx(0.1)
    assert pace(5.0, 9.0, MiB, 0.0) == (0.0, 5.0)  # no rate: no pacing


def test_a_paced_pass_takes_bytes_over_rate() -> None:
    """Simulated clock: the reads of a pass, each waiting what ``pace`` says, end when the
    bytes at the rate say (the first read is free)."""
    now, slot, rate = 0.0, 0.0, 5 * MiB
    for _ in range(50):
        wait, slot = pace(now, slot, 2 * MiB, rate)
        now += wait
    assert now == pytest.approx(49 * 2 * MiB / rate)


def test_chunk_crc_reads_a_range_in_blocks(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 12345)
    p = tmp_path / "f"
    p.write_bytes(data)
    assert chunk_crc(str(p), 0, len(data)) == zlib.crc32(data)
    assert chunk_crc(str(p), MiB + 7, 2 * MiB) == zlib.crc32(data[MiB + 7 : 3 * MiB + 7])
    assert chunk_crc(str(p), 0, 0) == 0
    short = chunk_crc(str(p), 3 * MiB, MiB)
    assert isinstance(short, str) and "ends at byte" in short
    assert isinstance(chunk_crc(str(tmp_path / "gone"), 0, 1), str)


def test_the_scrub_settings() -> None:
    cfg = load_daemon_config({"max_memory": "1GiB"}, env={})
    assert cfg.scrub_interval == DAY and cfg.scrub_rate == 64 * MiB
    cfg = load_daemon_config(
        {"max_memory": "1GiB", "scrub_interval": "0", "scrub_rate": "8MiB"}, env={}
    )
    assert cfg.scrub_interval == 0 and cfg.scrub_rate == 8 * MiB
    env = {"MOWS_SCRUB_RATE": "0", "MOWS_SCRUB_INTERVAL": "3600"}
    cfg = load_daemon_config({"max_memory": "1GiB"}, env=env)
    assert cfg.scrub_rate == 0 and cfg.scrub_interval == 3600
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="scrub_interval"):
            DaemonConfig(max_memory=GiB, scrub_interval=bad)


class _Loads:
    def __init__(self) -> None:
        self.idle = asyncio.Event()
        self.idle.set()


def _filled_pool(root: Path, files: int) -> tuple[Pool, Any]:
    """A pool holding a READY version of ``make_manifest(files, 2)`` (file i: bytes i)."""
    manifest = make_manifest(files, 2, chunk_size=MiB)
    pool = Pool(str(root), 64 * MiB)
    v = pool.version(manifest)
    rels = [e.path for e in manifest.files]
    admitted = pool.admit(v, rels, transient=True)
    assert admitted is not None
    for i, f in enumerate(admitted):
        fd = pool.open_partial(f)
        try:
            os.pwrite(fd, bytes([i]) * f.size, 0)
        finally:
            os.close(fd)
        crcs = {c.index: zlib.crc32(bytes([i]) * c.length) for c in f.chunks()}
        pool.commit(f, crcs, f.entry.crc32)
    pool.unpin(admitted, transient=True)
    return pool, v


def test_a_pass_drops_the_rotten_file_and_keeps_the_others(tmp_path: Path) -> None:
    pool, v = _filled_pool(tmp_path / "pool", 3)
    bad = v.files["f1"]
    fd = os.open(bad.path, os.O_RDWR)
    os.pwrite(fd, b"\xff", MiB + 5)  # chunk 1 of f1
    os.close(fd)
    removed: list[str] = []
    pool.on_remove = lambda f: removed.append(f.rel)
    cfg = DaemonConfig(max_memory=GiB)

    async def run() -> tuple[bool, _Pass]:
        s = Scrubber(cfg, pool, _Loads())  # type: ignore[arg-type]
        try:
            p = _Pass(paced=False, started=0.0, total_bytes=0)
            return await s._pass(p), p
        finally:
            await s.close()

    done, p = asyncio.run(run())
    assert done and p.files == 3 and p.chunks == 2 + 2 + 2
    assert p.mismatches is not None
    (m,) = p.mismatches
    assert (m["file"], m["chunk"], m["offset"], m["length"]) == ("f1", 1, MiB, MiB)
    assert removed == ["f1"] and sorted(v.files) == ["f0", "f2"]
    assert not os.path.exists(bad.path)
    assert pool.used_bytes == 2 * 2 * MiB


def test_a_held_rotten_file_leaves_service_but_stays_counted(tmp_path: Path) -> None:
    pool, v = _filled_pool(tmp_path / "pool", 2)
    f = v.files["f0"]
    pool.pin([f], transient=False)  # a client maps it
    pool.retire(f)
    assert "f0" not in v.files and not os.path.exists(f.path)
    assert pool.used_bytes == 2 * 2 * MiB and pool.pinned_bytes == 2 * MiB
    again = pool.admit(v, ["f0"], transient=True)  # the next open: a new file, filled again
    assert again is not None and again[0] is not f and again[0].state is FileState.FILLING
    assert pool.used_bytes == 3 * 2 * MiB
    pool.discard(again[0])
    pool.unpin([f], transient=False)  # the client let go: its pages are free
    assert pool.used_bytes == 2 * MiB and not pool.retired and pool.pinned_bytes == 0


def test_a_paused_scrub_waits_for_loads(tmp_path: Path) -> None:
    pool, _ = _filled_pool(tmp_path / "pool", 1)
    cfg = DaemonConfig(max_memory=GiB)

    async def run() -> list[str]:
        loads = _Loads()
        loads.idle.clear()  # a load is running
        s = Scrubber(cfg, pool, loads)  # type: ignore[arg-type]
        try:
            task = asyncio.ensure_future(s._pass(_Pass(paced=False, started=0.0, total_bytes=0)))
            await asyncio.sleep(0.05)
            states = [s.state, str(s.chunks_checked)]
            loads.idle.set()
            assert await task
            return [*states, str(s.chunks_checked)]
        finally:
            await s.close()

    assert asyncio.run(run()) == ["paused", "0", "2"]
