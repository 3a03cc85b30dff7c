"""The scrub: READY pool files re-read against their chunk CRCs; a byte flipped in node memory
after its check takes the file out of service, and the next open fetches it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import mows
from tests.daemons import DaemonProcess, generate_crc32, make_random_model, mows_load
from tests.integration.test_daemon import _wait, assert_same_as_files

MiB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def scrub(d: DaemonProcess) -> tuple[int, dict[str, Any]]:
    """``mows scrub --json``: (exit code, the pass's summary)."""
    out = subprocess.run(
        [sys.executable, "-m", "mows", "scrub", "--json", "--socket", d.socket],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout, out.stderr
    return out.returncode, dict(json.loads(out.stdout))


def pool_file(d: DaemonProcess, model: Path, rel: str) -> Path:
    (m,) = [m for m in d.status()["models"] if m["path"] == str(model)]
    return d.pool_dir / m["id"] / rel


def flip(path: Path, offset: int) -> None:
    """One byte of the pool's copy changed behind the daemon's back (a page gone bad)."""
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0x5A]), offset)
    finally:
        os.close(fd)


def cached(d: DaemonProcess, model: Path) -> float:
    (m,) = [m for m in d.status()["models"] if m["path"] == str(model)]
    return float(m["cached_fraction"])


def test_scrub_drops_a_rotten_file_and_the_next_open_refetches_it(
    daemon_factory: Any, tmp_path: Path
) -> None:
    bad_model = make_random_model(tmp_path / "a", 4, files=2, seed=1)
    good_model = make_random_model(tmp_path / "b", 4, files=2, seed=2)
    for m in (bad_model, good_model):
        generate_crc32(m)
    d = daemon_factory(roots=[tmp_path])
    for m in (bad_model, good_model):
        mows_load(d.socket, m)
    rc, clean = scrub(d)
    assert rc == 0 and clean["mismatches"] == [] and clean["files"] >= 6
    assert clean["bytes"] >= 8 * MiB

    rel = "model-00001-of-00002.safetensors"
    flip(pool_file(d, bad_model, rel), MiB + 4321)  # in chunk 1 (1 MiB chunks)
    rc, found = scrub(d)
    assert rc == 1
    (bad,) = found["mismatches"]
    assert bad["model"] == str(bad_model) and bad["file"] == rel
    assert bad["chunk"] == 1 and bad["offset"] == MiB and bad["length"] == MiB
    st = d.status()
    assert st["scrub"]["mismatched_chunks"] == 1 and st["scrub"]["files_dropped"] == 1
    assert st["scrub"]["passes"] == 2 and st["scrub"]["last_mismatch"]["file"] == rel
    assert cached(d, bad_model) < 1.0 and cached(d, good_model) == 1.0  # untouched: kept
    assert not pool_file(d, bad_model, rel).exists()
    log = d.log()
    assert f"file {rel} chunk 1, bytes {MiB}-{2 * MiB}" in log and str(bad_model) in log

    with mows.open_model(bad_model, socket=d.socket, fallback=False) as h:
        size = (bad_model / rel).stat().st_size
        assert h.stats["bytes_from_origin"] == size  # exactly the dropped file, again
        assert_same_as_files(h.state_dict(), bad_model)
    with mows.open_model(good_model, socket=d.socket, fallback=False) as h:
        assert h.stats["bytes_from_origin"] == 0
        assert_same_as_files(h.state_dict(), good_model)
    rc, again = scrub(d)
    assert rc == 0 and again["mismatches"] == [] and again["files"] == clean["files"]


def test_scrub_of_a_file_clients_hold(daemon_factory: Any, tmp_path: Path) -> None:
    """A client mapping the file keeps its mapping (zero-copy: nothing can take it back), its
    pages counted until it lets go; new opens get a fresh, good copy. The background scrub is
    off (--scrub-interval 0): an on-demand pass still runs."""
    model = make_random_model(tmp_path / "m", 2, files=1, seed=3)
    generate_crc32(model)
    d = daemon_factory(roots=[tmp_path], extra=["--scrub-interval", "0"])
    assert d.status()["scrub"]["state"] == "off"
    rel = "model-00000-of-00001.safetensors"
    with mows.open_model(model, socket=d.socket, fallback=False) as held:
        old = held.state_dict()  # views of the pool pages
        used = d.status()["used_bytes"]
        flip(pool_file(d, model, rel), 100_000)
        rc, found = scrub(d)
        assert rc == 1 and found["mismatches"][0]["chunk"] == 0
        size = (model / rel).stat().st_size
        with mows.open_model(model, socket=d.socket, fallback=False) as fresh:
            assert fresh.stats["bytes_from_origin"] == size
            assert_same_as_files(fresh.state_dict(), model)
            # The old copy is still mapped: still counted, beside the new one.
            assert d.status()["used_bytes"] == used + -(-size // PAGE) * PAGE
        # The old mapping is still readable, the bad byte and all: what zero-copy cannot undo.
        ref = load_file(model / rel)
        assert any(
            not torch.equal(old[k].view(torch.uint8), t.view(torch.uint8)) for k, t in ref.items()
        )
        del old
    _wait(lambda: d.status()["used_bytes"] == used)  # released: the old pages are free
    assert d.status()["pinned_bytes"] == 0
    assert cached(d, model) == 1.0


def test_the_background_scrub_finds_a_flipped_byte_by_itself(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Paced passes a couple of seconds long (--scrub-interval 2): no request needed."""
    model = make_random_model(tmp_path / "m", 4, files=2, seed=4)
    generate_crc32(model)
    d = daemon_factory(roots=[tmp_path], extra=["--scrub-interval", "2"])
    mows_load(d.socket, model)
    _wait(lambda: d.status()["scrub"]["passes"] >= 1, timeout=30)
    assert d.status()["scrub"]["mismatched_chunks"] == 0
    rel = "model-00000-of-00002.safetensors"
    flip(pool_file(d, model, rel), 3 * MiB // 2)
    _wait(lambda: d.status()["scrub"]["mismatched_chunks"] == 1, timeout=30)
    st = d.status()["scrub"]
    assert st["last_mismatch"]["file"] == rel and st["last_mismatch"]["chunk"] == 1
    assert st["rate_bytes_per_s"] and st["rate_bytes_per_s"] <= 4 * MiB  # spread over 2 s
    assert cached(d, model) < 1.0
    with mows.open_model(model, socket=d.socket, fallback=False) as h:
        assert_same_as_files(h.state_dict(), model)
