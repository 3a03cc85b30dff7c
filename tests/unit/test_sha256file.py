"""The sha256 file parser (untrusted input), HF blob digests and digests in version ids."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mows import Crc32FileError, MowsError
from mows.manifest import (
    MAX_SHA256_FILE_BYTES,
    FileEntry,
    FileStat,
    Manifest,
    build_manifest,
    format_sha256,
    hf_blob_digest,
    parse_sha256,
    version_id,
)

A = "a" * 64
B = "0123456789abcdef" * 4


def test_sha256sum_forms() -> None:
    text = (
        f"# made by sha256sum\n\n{A}  model.safetensors\n"
        f"{B.upper()} *sub/bin file.bin\n"  # binary marker, upper-case hex, a space in the name
        f"{A} one-space.json\n"
        f"SHA256 (tagged.txt) = {B}\n"
        f"{A}  ./dotted.txt\n"
    )
    assert parse_sha256(text) == {
        "model.safetensors": A,
        "sub/bin file.bin": B,  # kept lower case
        "one-space.json": A,
        "tagged.txt": B,
        "dotted.txt": A,
    }
    assert parse_sha256(text.replace("\n", "\r\n").encode()) == parse_sha256(text)


def test_escaped_names_round_trip() -> None:
    values = {"new\nline": B, "plain": A}
    text = format_sha256(values)
    assert text.splitlines()[0] == f"\\{B}  new\\nline"
    assert parse_sha256(text) == values
    # A backslash is escaped as GNU does; like crc32.txt, mows reads it as a path separator.
    assert format_sha256({"a\\b": A}) == f"\\{A}  a\\\\b\n"
    assert parse_sha256(format_sha256({"a\\b": A})) == {"a/b": A}


def test_agrees_with_sha256sum(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(os.urandom(1000))
    (tmp_path / "y z.txt").write_text("hello")
    out = subprocess.run(
        ["sha256sum", "x.bin", "y z.txt"], cwd=tmp_path, capture_output=True, check=True
    ).stdout
    parsed = parse_sha256(out)
    assert parsed == {
        p: hashlib.sha256((tmp_path / p).read_bytes()).hexdigest() for p in ("x.bin", "y z.txt")
    }
    assert format_sha256(parsed).encode() == out


@pytest.mark.parametrize(
    ("text", "needle", "line"),
    [
        (f"{A[:-1]}  short.bin\n", "64 hex", 1),
        (f"{A}0  long.bin\n", "64 hex", 1),
        (f"{'g' * 64}  nothex.bin\n", "64 hex", 1),
        (f"{A}\n", "64 hex", 1),
        ("just some words\n", "64 hex", 1),
        (f"\n{A}  ../x\n", "'..'", 2),
        (f"{A}  /etc/passwd\n", "absolute", 1),
        (f"{A}  a//b\n", "not normalised", 1),
        (f"{A}  a.bin\n{B}  a.bin\n", "listed twice", 2),
        (f"{A}  a.bin\n{A} *a.bin\n", "listed twice", 2),  # even with the same digest
        (f"\\{A}  bad\\escape\n", "unknown escape", 1),
    ],
)
def test_malformed_lines_name_file_and_line(text: str, needle: str, line: int) -> None:
    with pytest.raises(Crc32FileError, match=needle) as e:
        parse_sha256(text.encode(), "m/sha256sums.txt")
    assert e.value.line == line
    assert str(e.value).startswith(f"m/sha256sums.txt:{line}:")


def test_oversized_and_binary_files_are_refused() -> None:
    with pytest.raises(Crc32FileError, match="larger than"):
        parse_sha256(b"#" * (MAX_SHA256_FILE_BYTES + 1))
    with pytest.raises(Crc32FileError, match="not UTF-8"):
        parse_sha256(b"\xff\xfe" + A.encode())


@given(st.binary(max_size=400))
def test_fuzz_never_raises_anything_but_mows_errors(data: bytes) -> None:
    with contextlib.suppress(MowsError):
        for rel, digest in parse_sha256(data).items():
            assert len(digest) == 64 and digest == digest.lower() and rel


# -- Hugging Face cache snapshots ----------------------------------------------------------------


def hf_snapshot(base: Path, files: dict[str, bytes], *, lie: bool = False) -> Path:
    """``models--x/snapshots/rev/<name>`` -> ``../../blobs/<sha256>`` (``lie``: a wrong one)."""
    blobs = base / "models--x" / "blobs"
    snap = base / "models--x" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name, data in files.items():
        digest = hashlib.sha256(data + (b"!" if lie else b"")).hexdigest()
        (blobs / digest).write_bytes(data)
        (snap / name).symlink_to(f"../../blobs/{digest}")
    return snap


def test_hf_blob_digest(tmp_path: Path) -> None:
    snap = hf_snapshot(tmp_path, {"model.safetensors": b"weights"})
    assert hf_blob_digest(str(snap), "model.safetensors") == hashlib.sha256(b"weights").hexdigest()
    # Not a link, a git SHA-1 blob name (small files), upper case, or a parent not named blobs.
    (snap / "plain.json").write_text("{}")
    sha1 = tmp_path / "models--x" / "blobs" / ("b" * 40)
    sha1.write_text("{}")
    (snap / "config.json").symlink_to(f"../../blobs/{'b' * 40}")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / A.upper()).write_text("x")
    (other / A).write_text("x")
    (snap / "upper.bin").symlink_to(other / A.upper())
    (snap / "notblobs.bin").symlink_to(other / A)
    for rel in ("plain.json", "config.json", "upper.bin", "notblobs.bin", "missing"):
        assert hf_blob_digest(str(snap), rel) is None, rel


# -- manifests and version ids -------------------------------------------------------------------


class DirSource:
    """A bare directory as a ManifestSource, following every link (what an HF layout needs)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def list_files(self) -> list[FileStat]:
        return [
            FileStat(p.relative_to(self.root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(self.root.rglob("*"))
            if p.is_file()
        ]

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        with open(self.root / path, "rb") as fh:
            fh.seek(offset)
            return fh.read(length)


def test_build_manifest_takes_digests_from_the_file_and_hf_links(tmp_path: Path) -> None:
    snap = hf_snapshot(tmp_path, {"a.bin": b"aaa", "b.bin": b"bbb"})
    (snap / "c.bin").write_bytes(b"ccc")
    listed = hashlib.sha256(b"listed").hexdigest()
    (snap / "sha256sums.txt").write_text(
        f"{listed}  b.bin\n{A}  sha256sums.txt\n{B}  crc32.txt\n"  # checksum files: ignored
    )
    (snap / "crc32.txt").write_text("")
    src = DirSource(snap)
    m = build_manifest(src, sha256_file="sha256sums.txt", index_tensors=False, local_root=str(snap))
    digests = {f.path: f.sha256 for f in m.files}
    assert digests == {
        "a.bin": hashlib.sha256(b"aaa").hexdigest(),  # from the blob's name
        "b.bin": listed,  # the sha256 file wins over the link
        "c.bin": None,
    }
    assert m.sha256_file == "sha256sums.txt" and m.crc32_file == "crc32.txt"
    # Not a local source: no link digests. No sha256 file: nothing from it.
    assert build_manifest(src, index_tensors=False).file("a.bin").sha256 is None
    (snap / "sha256sums.txt").write_text(f"{A}  nothere.bin\n")
    with pytest.raises(Crc32FileError, match=r"do not exist.*nothere\.bin"):
        build_manifest(src, sha256_file="sha256sums.txt", index_tensors=False)


def test_version_ids_without_digests_are_unchanged() -> None:
    files = (
        FileEntry("a.safetensors", 10, 5, 0x1234ABCD),
        FileEntry("b.json", 3, 7, None, etag="e1"),
        FileEntry("c", 0, 9),
    )
    m = Manifest("/m", 1 << 20, files)
    # The id this manifest had before digests existed: pools written then stay valid.
    assert version_id(m) == "173d3ef4a9a8ddb9c35fd8ec"
    with_digest = msgspec.structs.replace(
        m, files=(msgspec.structs.replace(files[0], sha256=A), *files[1:])
    )
    other_digest = msgspec.structs.replace(
        m, files=(msgspec.structs.replace(files[0], sha256=B), *files[1:])
    )
    assert len({version_id(m), version_id(with_digest), version_id(other_digest)}) == 3
    # A manifest stored before the field existed decodes with no digest.
    old = (
        msgspec.json.encode(m).replace(b',"sha256":null', b"").replace(b',"sha256_file":null', b"")
    )
    assert b"sha256" not in old
    assert version_id(msgspec.json.decode(old, type=Manifest)) == version_id(m)


# -- the fill's digest follower -------------------------------------------------------------------


def test_follower_hashes_in_file_order_whatever_order_chunks_land(tmp_path: Path) -> None:
    import asyncio
    import random
    from concurrent.futures import ThreadPoolExecutor

    from mows.daemon._fill import DigestFollower, FileFill
    from mows.manifest import chunk_plan

    size, chunk = 10 * 4096 + 123, 4096
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(bytes(size))
    chunks = chunk_plan(FileStat("f", size, 0), chunk)
    order = list(range(2, len(chunks)))
    random.Random(7).shuffle(order)

    async def fill() -> str:
        ff = FileFill(os.open(path, os.O_RDWR), size)
        running: set[Any] = set()
        with ThreadPoolExecutor(2) as ex:
            try:
                ff.view[: 2 * chunk] = data[: 2 * chunk]  # prefetched before the fill
                follower = DigestFollower(ff, chunks, [0, 1], ex, running)
                for i in order:
                    c = chunks[i]
                    ff.view[c.offset : c.offset + c.length] = data[c.offset : c.offset + c.length]
                    follower.landed(i)
                    await asyncio.sleep(0)
                digest = await follower.digest()
            finally:
                ff.close()
        assert not running
        return digest

    assert asyncio.run(fill()) == hashlib.sha256(data).hexdigest()
