"""Paths an attacker shapes: symlinks out of a model directory, swapped in between a check
and a read, a Hugging Face cache snapshot's legitimate links, and HTTP redirects."""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mows
from mows import SourceError, SourceNotFoundError
from mows.client import Session
from mows.sources import _openat, open_source
from mows.sources._local import LocalSource
from tests.daemons import generate_crc32, make_random_model
from tests.daemons import http_site as site

SECRET = os.urandom(64 << 10)  # what lies outside every model: must never be read


@pytest.fixture(params=["openat2", "walk"])
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of opening beneath the model directory: the kernel's openat2, and the
    component walker used where openat2 is missing (forced here; the files stay real)."""
    if request.param == "walk":
        monkeypatch.setattr(_openat, "_have", False)
    elif not _openat.have_openat2():
        pytest.skip("openat2 is not available on this kernel")
    return str(request.param)


def secret_file(tmp_path: Path, name: str = "secret.bin") -> Path:
    out = tmp_path / "outside"
    out.mkdir(exist_ok=True)
    (out / name).write_bytes(SECRET)
    return out / name


def assert_secret_not_in_pool(pool: Path, secret: bytes = SECRET) -> None:
    probe = secret[20000:24096]
    for f in pool.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert probe not in f.read_bytes(), f"outside bytes in the pool: {f}"


def assert_same_tensors(sd: dict[str, torch.Tensor], files: list[Path]) -> None:
    ref: dict[str, torch.Tensor] = {}
    for f in files:
        ref.update(load_file(f))
    assert sorted(sd) == sorted(ref)
    for name, t in ref.items():
        assert torch.equal(sd[name].view(torch.uint8), t.view(torch.uint8)), name


def swap_in_symlink(path: Path, target: Path) -> None:
    """Atomically replace ``path`` by a symlink to ``target`` (rename over it)."""
    tmp = path.with_name(path.name + ".swap")
    tmp.symlink_to(target)
    os.replace(tmp, path)


# -- (a) a symlink out of the model ---------------------------------------------------------


def test_symlink_out_of_the_model_is_skipped_and_refused(tmp_path: Path, method: str) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "ok.bin").write_bytes(b"abc")
    (model / "sub").mkdir()
    (model / "sub" / "inner.bin").write_bytes(b"xyz")
    (model / "alias.bin").symlink_to("sub/inner.bin")  # relative, stays inside: followed
    (model / "leak.bin").symlink_to(secret_file(tmp_path))
    (model / "up.bin").symlink_to("../outside/secret.bin")
    (model / "subdir-link").symlink_to(tmp_path / "outside")
    with open_source(model) as source:
        assert [f.path for f in source.list_files()] == ["alias.bin", "ok.bin", "sub/inner.bin"]
        assert source.read_range("alias.bin", 0, 3) == b"xyz"
        for rel in ("leak.bin", "up.bin", "subdir-link/secret.bin"):
            buf = bytearray(16)
            with pytest.raises(SourceError, match="resolves outside the model directory") as e:
                source.read_into(rel, 0, memoryview(buf))
            assert rel in str(e.value) and str(model) in str(e.value)
            assert bytes(buf) == bytes(16)
            with pytest.raises(SourceError, match="outside"):
                source.stat(rel)
        with pytest.raises(SourceNotFoundError, match=r"nope\.bin"):
            source.stat("nope.bin")


def test_daemon_never_pools_a_file_linked_from_outside(daemon_factory: Any, tmp_path: Path) -> None:
    """A link to outside bytes, even listed in crc32.txt with their true CRC: the open names
    the file, and no pool file holds those bytes."""
    model = make_random_model(tmp_path / "models" / "m", 2, files=2)
    generate_crc32(model)
    secret = secret_file(tmp_path)
    (model / "extra.bin").symlink_to(secret)
    with open(model / "crc32.txt", "a") as fh:
        fh.write(f"{zlib.crc32(SECRET):08x} extra.bin\n")
    d = daemon_factory(roots=[tmp_path / "models"])
    with pytest.raises(mows.MowsError, match=r"extra\.bin"):
        mows.open_model(model, socket=d.socket, fallback=False)
    assert_secret_not_in_pool(d.pool_dir)
    # Without the crc32 line, the link is skipped with a warning naming it.
    generate_crc32(model)
    assert "extra.bin" not in (model / "crc32.txt").read_text()
    sd = mows.load_state_dict(model, socket=d.socket, fallback=False)
    assert_same_tensors(sd, sorted(model.glob("*.safetensors")))
    assert "extra.bin" in d.log() and "outside the model directory" in d.log()
    assert_secret_not_in_pool(d.pool_dir)


# -- (b) a symlink swapped in between the check and the read --------------------------------


@pytest.mark.timeout(60)  # a blocking open of the FIFO below would hang here
def test_swap_after_stat_never_reads_outside(tmp_path: Path, method: str) -> None:
    """Listed and stat'd, then swapped: the read refuses what the file became."""
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "f.bin").write_bytes(b"\x01" * len(SECRET))
    (model / "sub" / "g.bin").write_bytes(b"\x02" * len(SECRET))
    secret = secret_file(tmp_path)
    secret_file(tmp_path, "g.bin")
    with open_source(model) as source:
        assert source.stat("f.bin").size == len(SECRET)  # the daemon's check...
        swap_in_symlink(model / "f.bin", secret)  # ...the swap...
        buf = bytearray(len(SECRET))
        with pytest.raises(SourceError, match="outside the model directory"):
            source.read_into("f.bin", 0, memoryview(buf))  # ...and the read refuses it
        assert SECRET[:4096] not in buf
        # An intermediate directory swapped for a link out: refused too.
        assert source.stat("sub/g.bin").size == len(SECRET)
        os.rename(model / "sub", tmp_path / "old-sub")
        (model / "sub").symlink_to(tmp_path / "outside")
        with pytest.raises(SourceError, match="outside the model directory"):
            source.read_into("sub/g.bin", 0, memoryview(buf))
        assert SECRET[:4096] not in buf
        # A FIFO swapped in does not hang the reader.
        os.unlink(model / "f.bin")
        os.mkfifo(model / "f.bin")
        with pytest.raises(SourceError, match="not a regular file"):
            source.read_into("f.bin", 0, memoryview(buf))


def test_racing_swaps_never_return_outside_bytes(tmp_path: Path, method: str) -> None:
    """A thread flips the model's ``sub`` between its real directory and a link to an
    outside one holding a file of the same name, while reads of ``sub/g.bin`` run: each
    returns the inside bytes or refuses, never the outside ones. (Checking the path with
    realpath and then opening it by name, as mows did, returned outside bytes for about
    one read in ten here.)"""
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    inside = b"\x05" * 4096
    (model / "sub" / "g.bin").write_bytes(inside)
    secret_file(tmp_path, "g.bin")
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            os.rename(model / "sub", model / "sub.real")
            (model / "sub").symlink_to(tmp_path / "outside")
            os.unlink(model / "sub")
            os.rename(model / "sub.real", model / "sub")

    flipper = threading.Thread(target=flip)
    flipper.start()
    ok = refused = 0
    try:
        with open_source(model) as source:
            buf = bytearray(4096)
            for _ in range(20000):
                try:
                    source.read_into("sub/g.bin", 0, memoryview(buf))
                except SourceError as e:
                    # Which one depends on the moment; the walker may also see a link
                    # turn into a directory and back mid-lookup.
                    assert e.reason in (
                        "resolves outside the model directory",
                        "no such file",
                        "Not a directory",
                    )
                    refused += 1
                    continue
                assert bytes(buf) == inside, "read bytes from outside the model"
                ok += 1
    finally:
        stop.set()
        flipper.join()
    assert ok and refused  # both sides of the race were seen


def test_model_directory_replaced_at_its_path(tmp_path: Path, method: str) -> None:
    """The directory is held open, and opened again when its path names another one: a
    new copy put in its place is read (no stale copy renamed away), a symlink put in its
    place is refused, and a model gone is not found."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "secret.bin").write_bytes(b"\x03" * 100)
    secret_file(tmp_path)
    fds = len(os.listdir("/proc/self/fd"))
    with open_source(model) as source:
        assert source.read_range("secret.bin", 0, 100) == b"\x03" * 100
        os.rename(model, tmp_path / "old")
        model.mkdir()
        (model / "secret.bin").write_bytes(b"\x04" * 100)
        assert source.read_range("secret.bin", 0, 100) == b"\x04" * 100
        os.rename(model, tmp_path / "older")
        model.symlink_to(tmp_path / "outside")
        with pytest.raises(SourceError, match="holds a symbolic link now"):
            source.read_range("secret.bin", 0, 100)
        os.unlink(model)
        with pytest.raises(SourceNotFoundError, match="model directory does not exist"):
            source.list_files()
    assert len(os.listdir("/proc/self/fd")) == fds  # the replaced anchor was closed too


def test_swap_between_opens_through_a_real_daemon(daemon_factory: Any, tmp_path: Path) -> None:
    """The daemon lists and checks a model, serves one file; a file not fetched yet is then
    swapped for a link to outside bytes of the same size (the crc32 file unchanged, so the
    warm open trusts its listing): fetching it fails, names it, and the outside bytes reach
    no pool file."""
    model = make_random_model(tmp_path / "models" / "m", 2, files=2)
    generate_crc32(model)
    first, second = sorted(p.name for p in model.glob("*.safetensors"))
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = (model / second).read_bytes()[::-1]  # same size, other bytes
    (outside / second).write_bytes(secret)
    d = daemon_factory(roots=[tmp_path / "models"])
    s = Session(d.socket)
    try:
        s.open(str(model), pin=False, files=[first])
        swap_in_symlink(model / second, outside / second)
        with pytest.raises(SourceError, match="outside the model directory") as e:
            s.open(str(model), pin=False, files=[second])
        assert second in str(e.value)
    finally:
        s.close()
    assert_secret_not_in_pool(d.pool_dir, secret)


# -- (c, d) Hugging Face cache snapshots ----------------------------------------------------


def hf_snapshot(tmp_path: Path) -> tuple[Path, Path]:
    """``models--org--tiny/{blobs/<sha256>, snapshots/<rev>/<name> -> ../../blobs/<sha256>}``
    as huggingface_hub lays it out; returns (snapshot, repo)."""
    plain = make_random_model(tmp_path / "plain", 2, files=2)
    repo = tmp_path / "hub" / "models--org--tiny"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    (snap / "sub").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in sorted(plain.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(f"../../blobs/{blob}")
    (snap / "sub" / "extra.json").symlink_to("../../../blobs/" + blob)  # deeper, still beneath
    return snap, repo


def test_hf_snapshot_source(tmp_path: Path, method: str) -> None:
    snap, repo = hf_snapshot(tmp_path)
    secret = secret_file(tmp_path)
    (snap / "abs.bin").symlink_to(secret)  # (d) absolute, outside: refused
    (snap / "escape.bin").symlink_to("../../../../outside/secret.bin")  # climbs out: refused
    (snap / "abs-inside.bin").symlink_to(next((repo / "blobs").iterdir()))  # absolute: refused
    with open_source(snap) as source:
        assert source.url == str(snap)
        listed = {f.path: f.size for f in source.list_files()}
        expected = {
            str(p.relative_to(snap)): p.stat().st_size
            for p in snap.rglob("*")
            if p.is_file() and p.suffix != ".bin"
        }
        assert listed == expected
        for rel, size in listed.items():
            assert source.read_range(rel, 0, size) == (snap / rel).read_bytes()
        for rel in ("abs.bin", "escape.bin", "abs-inside.bin"):
            buf = bytearray(16)
            with pytest.raises(SourceError, match="outside the model directory"):
                source.read_into(rel, 0, memoryview(buf))
            assert bytes(buf) == bytes(16)


def test_hf_snapshot_loads_bitwise_through_a_daemon(daemon_factory: Any, tmp_path: Path) -> None:
    snap, _repo = hf_snapshot(tmp_path)
    (snap / "abs.safetensors").symlink_to(secret_file(tmp_path))
    generate_crc32(snap)  # the CLI lists and reads through the same source
    names = (snap / "crc32.txt").read_text()
    assert "model-00000-of-00002.safetensors" in names and "abs.safetensors" not in names
    d = daemon_factory(roots=[snap])
    sd = mows.load_state_dict(snap, socket=d.socket, fallback=False)
    assert_same_tensors(sd, sorted(p for p in snap.glob("model-*.safetensors")))
    assert "abs.safetensors" in d.log()
    assert_secret_not_in_pool(d.pool_dir)


def test_a_directory_named_snapshots_without_blobs_is_a_plain_model(tmp_path: Path) -> None:
    """Only a cache layout (a ``blobs`` sibling) widens the anchor; elsewhere a link up
    through ``..`` still leaves the model."""
    snap = tmp_path / "snapshots" / "v1"
    snap.mkdir(parents=True)
    (tmp_path / "x.bin").write_bytes(b"x")
    (snap / "x.bin").symlink_to("../../x.bin")
    with open_source(snap) as source, pytest.raises(SourceError, match="outside"):
        source.stat("x.bin")


def test_closed_source_refuses_and_releases_its_descriptor(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.bin").write_bytes(b"a")
    before = len(os.listdir("/proc/self/fd"))
    source = open_source(tmp_path / "m")
    assert isinstance(source, LocalSource)
    source.close()
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(SourceError, match="closed"):
        source.stat("a.bin")


# -- (e) HTTP redirects ---------------------------------------------------------------------


def test_http_redirects_stay_on_the_origin_and_under_the_model(tmp_path: Path) -> None:
    data = os.urandom(5000)
    with site({"/x/secret.bin": SECRET}, {}) as (other, other_hits, _):
        redirects = {
            "/m/moved.bin": "/m/sub/real.bin",
            "/m/rel.bin": "sub/real.bin",  # relative Location, resolved against the request
            "/m/away.bin": f"{other}/x/secret.bin",
            "/m/up.bin": "/x/secret.bin",
            "/m/sibling.bin": "/m2/real.bin",
            "/m/encoded.bin": "/m/%2e%2e/x/secret.bin",
            "/m/loop.bin": "/m/loop.bin",
            # urllib sees host 127.0.0.1 here, urllib3 (which connects) the other server:
            "/m/backslash.bin": f"{other}\\@127.0.0.1:1/m/sub/real.bin",
            "/m/userinfo.bin": "http://user@127.0.0.1:1/m/sub/real.bin",
        }
        with (
            site({"/m/sub/real.bin": data, "/x/secret.bin": SECRET}, redirects) as (url, _, _),
            open_source(f"{url}/m", retries=0) as source,
        ):
            for rel in ("moved.bin", "rel.bin"):
                assert source.stat(rel).size == len(data)
                assert source.read_range(rel, 100, 200) == data[100:300]
            with pytest.raises(SourceError, match="another origin") as e:
                source.read_range("away.bin", 0, 10)
            assert other.removeprefix("http://") in str(e.value) and "away.bin" in str(e.value)
            with pytest.raises(SourceError, match="another origin"):
                source.stat("away.bin")
            for rel in ("up.bin", "sibling.bin", "encoded.bin"):
                with pytest.raises(SourceError, match="outside the model's URL prefix"):
                    source.read_range(rel, 0, 10)
            with pytest.raises(SourceError, match="more than 5 redirects"):
                source.stat("loop.bin")
            for rel in ("backslash.bin", "userinfo.bin"):
                with pytest.raises(SourceError, match="ambiguous URL"):
                    source.read_range(rel, 0, 10)
    assert other_hits == []


def test_daemon_refuses_a_cross_origin_redirect(daemon_factory: Any) -> None:
    with site({"/secret.bin": SECRET}, {}) as (other, other_hits, _):
        crc = f"{zlib.crc32(SECRET):08x} w.safetensors\n".encode()
        redirects = {"/m/w.safetensors": f"{other}/secret.bin"}
        with site({"/m/crc32.txt": crc}, redirects) as (url, _, _):
            d = daemon_factory(roots=[f"{url}/m"])
            with pytest.raises(SourceError, match="another origin") as e:
                mows.open_model(f"{url}/m", socket=d.socket, fallback=False)
            assert other.removeprefix("http://") in str(e.value)
        assert other_hits == []
        assert_secret_not_in_pool(d.pool_dir)


def test_a_directory_swapped_for_a_symlink_after_authorization_is_refused(
    tmp_path: Path,
) -> None:
    """The daemon authorizes a location by its real path and builds its source later (a
    prefetch entry: minutes later). If the directory became a symlink in between, the source
    would be anchored outside the allowed roots: the daemon refuses it (the real method, on a
    minimal daemon; real files)."""
    import shutil
    from types import SimpleNamespace

    from mows import AccessDeniedError
    from mows.daemon._daemon import Daemon

    allowed = tmp_path / "models" / "evil"
    allowed.mkdir(parents=True)
    (allowed / "a.bin").write_bytes(b"x" * 10)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "a.bin").write_bytes(SECRET)
    location = os.path.realpath(allowed)  # what authorize returned
    shutil.rmtree(allowed)
    os.symlink(outside, allowed)
    daemon: Any = SimpleNamespace(_sources={}, config=SimpleNamespace(sources={}))
    with pytest.raises(AccessDeniedError, match="changed while being opened"):
        Daemon.source(daemon, location)
    assert daemon._sources == {}
    os.unlink(allowed)  # restored as a real directory: served again
    allowed.mkdir()
    (allowed / "a.bin").write_bytes(b"y" * 10)
    assert Daemon.source(daemon, location).read_range("a.bin", 0, 10) == b"y" * 10
