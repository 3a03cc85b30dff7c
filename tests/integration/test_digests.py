"""SHA-256 digests where the origin offers them, with real daemons, files and shared memory.

CRC-32 is linear: anyone can change a file's bytes and keep its CRC (``tests.crc_forge``). A
model that ships ``sha256sums.txt`` (or a Hugging Face snapshot, whose blobs are named by their
SHA-256) is checked against its digests on every fill and on adoption after a restart; a file
that fails is never served, and a model without digests behaves as before.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

import mows
from mows import IntegrityError
from tests.crc_forge import crc_preserving_delta, xor_at
from tests.daemons import make_random_model
from tests.integration.test_daemon import _wait, assert_same_as_files

CHECKSUMS = ("crc32.txt", "sha256sums.txt")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def generate_both(model: Path) -> None:
    """crc32.txt and sha256sums.txt, as an operator writes them."""
    subprocess.run(
        [sys.executable, "-m", "mows", "crc32", "generate", "--sha256", str(model)],
        check=True,
        capture_output=True,
    )


def forge(path: Path, offset: int, span: tuple[int, int] | None = None) -> tuple[bytes, bytes]:
    """XOR a CRC-preserving 5-byte delta into ``path`` at ``offset``, keeping the CRC-32 of the
    byte range ``span`` (default: the whole file) and so of the whole file. Returns the bytes
    before and after, having checked that the attack is real: other bytes, the same CRC."""
    data = path.read_bytes()
    lo, hi = span or (0, len(data))
    forged = xor_at(data, offset, crc_preserving_delta(hi - lo, offset - lo))
    assert forged != data
    assert zlib.crc32(forged[lo:hi]) == zlib.crc32(data[lo:hi])
    assert zlib.crc32(forged) == zlib.crc32(data)
    path.write_bytes(forged)
    return data, forged


def file_entry(st: dict[str, Any], name: str) -> dict[str, Any]:
    (m,) = st["models"]
    return dict(next(f for f in m["files"] if f["path"] == name))


def test_digests_are_part_of_the_version(daemon_factory: Any, tmp_path: Path) -> None:
    m = make_random_model(tmp_path / "m", 8, files=2)
    generate_both(m)
    # The generator writes what sha256sum itself checks.
    check = subprocess.run(["sha256sum", "-c", "--quiet", "sha256sums.txt"], cwd=m)
    assert check.returncode == 0
    files = sorted(p.name for p in m.iterdir() if p.name not in CHECKSUMS)
    d = daemon_factory(roots=[tmp_path])
    with mows.open_model(m, socket=d.socket, fallback=False) as h:
        assert h.manifest.sha256_file == "sha256sums.txt"
        assert {f.path: f.sha256 for f in h.manifest.files} == {
            p: sha256((m / p).read_bytes()) for p in files
        }
        assert_same_as_files(h.state_dict(), m)
        v1 = h.version
    with mows.open_model(m, socket=d.socket, fallback=False) as h:  # warm: nothing changed
        assert h.version == v1 and h.stats["bytes_from_origin"] == 0

    # crc32.txt unchanged: a warm open asks for nothing else (one request), so the version
    # holds even with the sha256 file gone: its weights were verified already.
    (m / "sha256sums.txt").rename(tmp_path / "aside")
    with mows.open_model(m, socket=d.socket, fallback=False) as h:
        assert h.version == v1 and h.stats["bytes_from_origin"] == 0
    # crc32.txt rewritten (same values, other bytes): the origin is listed again, and without
    # the digests it is another version (the digests were part of it).
    crc_lines = (m / "crc32.txt").read_text().splitlines()
    (m / "crc32.txt").write_text("\n".join(reversed(crc_lines)) + "\n")
    with mows.open_model(m, socket=d.socket, fallback=False) as h:
        assert h.version != v1
        assert all(f.sha256 is None for f in h.manifest.files)
        assert h.manifest.sha256_file is None
    # Back again: the same content and digests are the same version, still in the pool.
    (tmp_path / "aside").rename(m / "sha256sums.txt")
    (m / "crc32.txt").write_text("\n".join(crc_lines) + "\n")
    with mows.open_model(m, socket=d.socket, fallback=False) as h:
        assert h.version == v1 and h.stats["bytes_from_origin"] == 0

    # A changed digest is a new version, whose file then fails its check and is not served.
    lines = (m / "sha256sums.txt").read_text().splitlines()
    lines = [("0" * 64 + "  config.json") if ln.endswith("config.json") else ln for ln in lines]
    (m / "sha256sums.txt").write_text("\n".join(lines) + "\n")
    (m / "crc32.txt").write_text("\n".join(reversed(crc_lines)) + "\n")
    with pytest.raises(IntegrityError, match=r"config\.json: SHA-256 mismatch") as e:
        mows.open_model(m, socket=d.socket, fallback=False)
    assert e.value.expected == "0" * 64
    assert e.value.actual == sha256((m / "config.json").read_bytes())
    assert not file_entry(d.status(), "config.json")["cached"]


def test_crc_preserving_forgery_at_the_origin_is_caught(
    daemon_factory: Any, tmp_path: Path
) -> None:
    m = make_random_model(tmp_path / "m", 8, files=2)
    generate_both(m)
    shard = sorted(m.glob("*.safetensors"))[1]
    size = shard.stat().st_size
    # Keep crc32.txt and sha256sums.txt as they were: only the weights change.
    original, forged = forge(shard, size - 1000)
    d = daemon_factory(roots=[tmp_path])
    with pytest.raises(IntegrityError) as e:
        mows.open_model(m, socket=d.socket, fallback=False)
    assert shard.name in e.value.path and "SHA-256 mismatch" in str(e.value)
    assert (e.value.expected, e.value.actual) == (sha256(original), sha256(forged))
    assert e.value.source == "origin"
    # Nothing of the file is in the pool, not even partially: no client can map it.
    assert not any(p.name.startswith(shard.name) for p in d.pool_dir.rglob("*"))
    st = d.status()
    assert st["integrity_failures"] == 1
    assert not file_entry(st, shard.name)["cached"]

    # The same forgery with CRC-32 alone: it loads, and serves the forged bytes. This is the
    # gap the digest closes.
    (m / "sha256sums.txt").unlink()
    with mows.open_model(m, socket=d.socket, fallback=False) as h:
        assert h.manifest.file(shard.name).crc32 == zlib.crc32(original)
        assert Path(h.file_path(shard.name)).read_bytes() == forged


def test_peer_fills_are_checked_against_the_digests(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    from tests.integration.test_cluster import start_nodes, wait_published

    m = make_random_model(tmp_path / "m", 16, files=2)
    generate_both(m)
    a, b = start_nodes(daemon_factory, etcd, tmp_path, 2)
    mows.open_model(m, socket=a.socket, fallback=False).close()
    wait_published(a, b, 16 << 20)
    with mows.open_model(m, socket=b.socket, fallback=False) as h:  # every byte from a
        assert h.stats["bytes_from_peers"] == h.stats["bytes"]
        assert all(f.sha256 is not None for f in h.manifest.files)
        assert_same_as_files(h.state_dict(), m)
    assert b.status()["integrity_failures"] == 0


def test_prefetch_never_commits_a_forged_file(daemon_factory: Any, tmp_path: Path) -> None:
    m = make_random_model(tmp_path / "m", 4, files=2)
    generate_both(m)
    shard = sorted(m.glob("*.safetensors"))[0]
    forge(shard, 4096)
    d = daemon_factory(
        roots=[], extra=["--model-path", str(m), "--prefetch", "full", "--prefetch-delay", "0"]
    )
    _wait(lambda: d.status()["integrity_failures"] >= 1, timeout=30)
    _wait(lambda: file_entry(d.status(), "config.json")["cached"], timeout=30)
    assert not file_entry(d.status(), shard.name)["cached"]
    assert "SHA-256 mismatch" in d.log()
    # Never published: at most a partial file (prefetch tries again), never the file itself.
    assert not [p for p in d.pool_dir.rglob(shard.name)]


def test_forged_pool_file_is_not_adopted_after_a_restart(
    daemon_factory: Any, tmp_path: Path
) -> None:
    m = make_random_model(tmp_path / "m", 8, files=2)
    generate_both(m)
    d = daemon_factory(roots=[tmp_path])
    mows.open_model(m, socket=d.socket, fallback=False).close()
    pool = d.pool_dir
    d.stop(clean=False)
    victim = sorted(pool.rglob("*.safetensors"))[0]
    # Inside chunk 1 (1 MiB chunks), keeping that chunk's CRC as the pool metadata records it,
    # so every CRC check of adoption passes; the metadata is left as it is.
    chunk = 2**20
    span = (chunk, min(2 * chunk, victim.stat().st_size))
    original, _ = forge(victim, chunk + 5000, span)
    d2 = daemon_factory(roots=[tmp_path], pool_dir=pool)
    assert f"pool file {victim} failed re-verification" in d2.log()
    (model,) = d2.status()["models"]
    assert 0 < model["cached_fraction"] < 1
    with mows.open_model(m, socket=d2.socket, fallback=False) as h:
        assert h.stats["bytes_from_origin"] == (m / victim.name).stat().st_size
        assert Path(h.file_path(victim.name)).read_bytes() == original
        assert_same_as_files(h.state_dict(), m)


def hf_snapshot(hub: Path, files: dict[str, bytes], lie: str = "") -> Path:
    """A Hugging Face cache entry: ``snapshots/rev/<name>`` -> ``../../blobs/<sha256>``;
    the blob of ``lie`` is named by another digest than its content's."""
    repo = hub / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    for name, data in files.items():
        digest = sha256(data + b"!" if name == lie else data)
        (repo / "blobs" / digest).write_bytes(data)
        (snap / name).symlink_to(f"../../blobs/{digest}")
    return snap


def test_hf_snapshot_blob_names_are_checked(daemon_factory: Any, tmp_path: Path) -> None:
    from mows.sources import open_source

    src = make_random_model(tmp_path / "src", 4, files=2)
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    shard = sorted(n for n in files if n.endswith(".safetensors"))[0]
    good = hf_snapshot(tmp_path / "hub", files)
    bad = hf_snapshot(tmp_path / "hub2", files, lie=shard)
    with open_source(str(good)) as source:
        if {f.path for f in source.list_files()} != set(files):
            pytest.skip("the local source does not follow snapshot links into ../../blobs")
    d = daemon_factory(roots=[tmp_path])
    with mows.open_model(good, socket=d.socket, fallback=False) as h:
        assert h.manifest.file(shard).sha256 == sha256(files[shard])
        assert_same_as_files(h.state_dict(), src)
    with pytest.raises(IntegrityError, match=re.escape(f"{shard}: SHA-256 mismatch")):
        mows.open_model(bad, socket=d.socket, fallback=False)


def test_blob_links_inside_the_model_directory(daemon_factory: Any, tmp_path: Path) -> None:
    """The same rule where the blobs lie inside the model directory, so that every source
    follows the links: a file linked to ``../../blobs/<sha256>`` must have that digest."""
    root = tmp_path / "m"
    blobs, snap = root / "blobs", root / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    good, bad = os.urandom(300_000), os.urandom(200_000)
    (blobs / sha256(good)).write_bytes(good)
    (blobs / sha256(b"not " + bad)).write_bytes(bad)  # a name its content does not match
    (snap / "good.bin").symlink_to(f"../../blobs/{sha256(good)}")
    d = daemon_factory(roots=[tmp_path])
    with mows.open_model(root, socket=d.socket, fallback=False) as h:
        assert h.manifest.file("snapshots/rev/good.bin").sha256 == sha256(good)
        assert h.manifest.file(f"blobs/{sha256(good)}").sha256 is None  # not a link
        assert Path(h.file_path("snapshots/rev/good.bin")).read_bytes() == good
    (snap / "bad.bin").symlink_to(f"../../blobs/{sha256(b'not ' + bad)}")
    with pytest.raises(IntegrityError, match=r"bad\.bin: SHA-256 mismatch") as e:
        mows.open_model(root, socket=d.socket, fallback=False)
    assert (e.value.expected, e.value.actual) == (sha256(b"not " + bad), sha256(bad))
