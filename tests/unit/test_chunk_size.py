"""The chunk size: chosen per model from its size unless ``--chunk-size`` says otherwise."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import pytest

from mows import ConfigError
from mows._config import DaemonConfig, load_daemon_config
from mows.daemon._loads import check_origin
from mows.manifest import FileStat, build_manifest, format_crc32, version_id
from mows.manifest._model import (
    AUTO_CHUNK_MAX,
    AUTO_CHUNK_MIN,
    AUTO_CHUNK_SIZE,
    AUTO_CHUNK_TARGET,
    DEFAULT_CHUNK_SIZE,
    choose_chunk_size,
)
from mows.sources import open_source

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
# 1 KiB .. 1 TiB in steps of a quarter power of two, and the bytes either side of each power
SIZES = sorted(
    {int(2 ** (e / 4)) for e in range(40, 161)}
    | {2**e + d for e in range(10, 41) for d in (-1, 0, 1)}
)


def test_default_is_auto() -> None:
    assert DEFAULT_CHUNK_SIZE == AUTO_CHUNK_SIZE == 0
    assert DaemonConfig(max_memory=GiB).chunk_size == AUTO_CHUNK_SIZE


@pytest.mark.parametrize(
    ("total", "chunk"),
    [
        (0, 1 * MiB),
        (1 * KiB, 1 * MiB),
        (64 * MiB, 1 * MiB),
        (256 * MiB, 1 * MiB),  # the cluster bench's model: 256 chunks
        (512 * MiB - 1, 1 * MiB),
        (512 * MiB, 2 * MiB),
        (1 * GiB, 4 * MiB),
        (15 * GiB, 32 * MiB),  # a 7-8B model in bf16
        (16 * GiB, 64 * MiB),
        (140 * GiB, 64 * MiB),  # 70B
        (1 * TiB, 64 * MiB),
    ],
)
def test_known_sizes(total: int, chunk: int) -> None:
    assert choose_chunk_size(total) == chunk


def test_rule_over_1kib_to_1tib() -> None:
    prev = 0
    for total in SIZES:
        c = choose_chunk_size(total)
        assert c & (c - 1) == 0, total  # a power of two
        assert AUTO_CHUNK_MIN <= c <= AUTO_CHUNK_MAX, total
        assert c >= prev, total  # monotone: a bigger model never gets smaller chunks
        prev = c
        chunks = -(-total // c)
        if total >= AUTO_CHUNK_MIN * AUTO_CHUNK_TARGET and c < AUTO_CHUNK_MAX:
            # between the bounds: the target number of chunks, within a factor of two
            assert AUTO_CHUNK_TARGET <= chunks <= 2 * AUTO_CHUNK_TARGET, total
        if c == AUTO_CHUNK_MIN:  # only models too small for the target at the minimum
            assert total < 2 * AUTO_CHUNK_MIN * AUTO_CHUNK_TARGET, total
        if c == AUTO_CHUNK_MAX:
            assert chunks >= AUTO_CHUNK_TARGET, total
    assert choose_chunk_size(SIZES[-1]) == AUTO_CHUNK_MAX
    assert choose_chunk_size(SIZES[0]) == AUTO_CHUNK_MIN


@pytest.mark.parametrize("explicit", [4 * KiB, 2 * MiB, 64 * MiB, 3 * MiB, 256 * MiB])
def test_explicit_size_is_used_as_given(explicit: int) -> None:
    for total in (0, 1 * KiB, 256 * MiB, 16 * GiB, 1 * TiB):
        assert choose_chunk_size(total, explicit) == explicit


def test_negative_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        choose_chunk_size(GiB, -1)


class FakeSource:
    """Files of the given sizes, zero bytes each."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    @property
    def url(self) -> str:
        return "fake://model"

    def list_files(self) -> list[FileStat]:
        return [FileStat(p, s, 0) for p, s in self.sizes.items()]

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        return bytes(min(length, self.sizes[path] - offset))


def test_build_manifest_chooses_per_model() -> None:
    # Two 384 MiB files: 768 MiB in all gives 2 MiB chunks (each file alone would get 1 MiB).
    src = FakeSource({"a.bin": 384 * MiB, "b.bin": 384 * MiB})
    auto = build_manifest(src, crc32_file=None, index_tensors=False)
    assert auto.chunk_size == 2 * MiB
    assert len(auto.chunks("a.bin")) == 192
    assert build_manifest(src, chunk_size=0, crc32_file=None).chunk_size == 2 * MiB
    explicit = build_manifest(src, chunk_size=64 * MiB, crc32_file=None, index_tensors=False)
    assert explicit.chunk_size == 64 * MiB and len(explicit.chunks("a.bin")) == 6
    assert version_id(auto) != version_id(explicit)  # the chunk plan is part of the version
    same = build_manifest(src, chunk_size=2 * MiB, crc32_file=None, index_tensors=False)
    assert version_id(same) == version_id(auto)


def test_checksum_files_do_not_count(tmp_path: Path) -> None:
    """Only model files count (a crc32 file is not one): every node computes the same."""
    data = b"\0" * (512 * KiB)
    (tmp_path / "w.bin").write_bytes(data)
    (tmp_path / "crc32.txt").write_text(format_crc32({"w.bin": zlib.crc32(data)}))
    with open_source(tmp_path) as src:
        m = build_manifest(src)
    assert [f.path for f in m.files] == ["w.bin"] and m.chunk_size == AUTO_CHUNK_MIN


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("auto", 0),
        ("AUTO", 0),
        (" auto ", 0),
        ("0", 0),
        (0, 0),
        ("2", 2 * MiB),
        (2, 2 * MiB),
        ("512KiB", 512 * KiB),
        ("64MiB", 64 * MiB),
    ],
)
def test_config_values(value: object, size: int) -> None:
    c = load_daemon_config({"max_memory": "1GiB", "chunk_size": value}, env={})
    assert c.chunk_size == size


def test_config_default_env_and_file(tmp_path: Path) -> None:
    assert load_daemon_config({"max_memory": "1GiB"}, env={}).chunk_size == 0
    env = {"MOWS_CHUNK_SIZE": "auto"}
    assert load_daemon_config({"max_memory": "1GiB"}, env=env).chunk_size == 0
    conf = tmp_path / "mows.toml"
    conf.write_text('max_memory = "1GiB"\nchunk_size = "auto"\n')
    assert load_daemon_config({}, config_file=str(conf), env={}).chunk_size == 0
    conf.write_text('max_memory = "1GiB"\nchunk_size = 8\n')
    assert load_daemon_config({}, config_file=str(conf), env={}).chunk_size == 8 * MiB


@pytest.mark.parametrize("bad", ["-1", "automatic", "", True, "1000b", [4]])
def test_config_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="chunk_size"):
        load_daemon_config({"max_memory": "1GiB", "chunk_size": bad}, env={})


def _model(path: Path, size: int) -> Path:
    path.mkdir()
    data = hashlib.sha256(b"x").digest() * (size // 32)
    (path / "w.bin").write_bytes(data)
    (path / "crc32.txt").write_text(format_crc32({"w.bin": zlib.crc32(data)}))
    return path


def test_a_version_of_another_chunk_size_is_planned_again(tmp_path: Path) -> None:
    """An unchanged model whose cached version was planned at another chunk size (the old
    64 MiB default) gets a new manifest, so that nodes agree on its version id."""
    model = _model(tmp_path / "m", 64 * KiB)
    old = load_daemon_config({"max_memory": "1GiB", "chunk_size": "64"}, env={})
    auto = load_daemon_config(  # a cluster node: auto plans by model size
        {"max_memory": "1GiB", "etcd": "http://127.0.0.1:2379"}, env={}
    )
    with open_source(model) as src:
        known, digest = check_origin(src, None, "", old)
        assert known is not None and known.chunk_size == 64 * MiB
        assert check_origin(src, known, digest, old) == (None, digest)  # unchanged
        again, digest2 = check_origin(src, known, digest, auto)
        assert again is not None and again.chunk_size == AUTO_CHUNK_MIN
        assert version_id(again) != version_id(known)
        assert check_origin(src, again, digest2, auto) == (None, digest2)
