"""A real daemon's chunk size: by default 64 MiB alone and per model in a cluster,
``--chunk-size`` as given."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mows
from tests.daemons import DaemonProcess, generate_crc32, make_random_model

MiB = 2**20


def default_daemon(
    base: Path, roots: list[Path], pool_dir: Path | None = None, etcd: Any = None
) -> DaemonProcess:
    """A daemon with no --chunk-size at all (the test helper passes 1MiB otherwise); in a
    cluster on ``etcd`` if given."""
    base.mkdir(exist_ok=True)
    extra = ["--etcd", etcd.endpoint, "--listen", "127.0.0.1:0"] if etcd is not None else []
    d = DaemonProcess(base, roots=list(roots), pool_dir=pool_dir, extra=extra)
    i = d.args.index("--chunk-size")
    del d.args[i : i + 2]
    assert "--chunk-size" not in d.args
    return d


def test_single_node_default_is_64mib(tmp_path: Path) -> None:
    """Alone, a node gains nothing from small chunks and pays an origin request for each."""
    model = make_random_model(tmp_path / "m", 8, files=2)
    generate_crc32(model)
    d = default_daemon(tmp_path / "d", [tmp_path]).start()
    try:
        with mows.open_model(model, socket=d.socket, fallback=False) as h:
            assert h.manifest.chunk_size == 64 * MiB
    finally:
        d.stop()


def test_small_model_gets_small_chunks_in_a_cluster(tmp_path: Path, etcd: Any) -> None:
    model = make_random_model(tmp_path / "m", 8, files=2)
    generate_crc32(model)
    d = default_daemon(tmp_path / "d", [tmp_path], etcd=etcd).start()
    try:
        with mows.open_model(model, socket=d.socket, fallback=False) as h:
            assert h.manifest.chunk_size == 1 * MiB  # the old default was 64 MiB: one chunk
            shard = next(f for f in h.manifest.files if f.path.endswith(".safetensors"))
            assert len(h.manifest.chunks(shard.path)) == -(-shard.size // MiB) >= 4
            assert h.stats["bytes_from_origin"] == h.manifest.total_bytes
    finally:
        d.stop()


def test_explicit_chunk_size_is_used(daemon_factory: Any, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 8, files=2)
    generate_crc32(model)
    two = daemon_factory(roots=[tmp_path], extra=["--chunk-size", "2"])
    auto = daemon_factory(roots=[tmp_path], extra=["--chunk-size", "auto"])
    with mows.open_model(model, socket=two.socket, fallback=False) as h:
        assert h.manifest.chunk_size == 2 * MiB
        v2 = h.version
    with mows.open_model(model, socket=auto.socket, fallback=False) as h:
        assert h.manifest.chunk_size == 64 * MiB  # auto, alone
        assert h.version != v2  # the chunk plan is part of the version id


def test_pool_made_at_64mib_is_planned_again(tmp_path: Path, etcd: Any) -> None:
    """A pool a 64 MiB daemon filled, adopted by a cluster daemon at the auto default: the
    unchanged model is opened as a new version with small chunks (fetched once more), as
    every node of the cluster computes it."""
    model = make_random_model(tmp_path / "m", 8, files=2)
    generate_crc32(model)
    old = DaemonProcess(tmp_path, roots=[tmp_path], extra=["--chunk-size", "64"]).start()
    try:
        with mows.open_model(model, socket=old.socket, fallback=False) as h:
            assert h.manifest.chunk_size == 64 * MiB
            v_old = h.version
    finally:
        old.stop(clean=False)
    d = default_daemon(tmp_path / "new", [tmp_path], pool_dir=old.pool_dir, etcd=etcd).start()
    try:
        with mows.open_model(model, socket=d.socket, fallback=False) as h:
            assert h.manifest.chunk_size == 1 * MiB and h.version != v_old
            assert h.stats["bytes_from_origin"] == h.manifest.total_bytes
        with mows.open_model(model, socket=d.socket, fallback=False) as h:  # warm now
            assert h.stats["bytes_from_origin"] == 0
    finally:
        d.stop()
        shutil.rmtree(old.pool_dir, ignore_errors=True)
