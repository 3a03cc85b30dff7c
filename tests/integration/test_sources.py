"""Sources against real storage: a directory, and a real nginx on loopback."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mows import ConfigError, Crc32FileError, SourceError, SourceNotFoundError
from mows.manifest import build_manifest
from mows.sources import Source, open_source


@pytest.fixture
def served_model(
    nginx_root: tuple[str, Path], tiny_qwen2: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    url, root = nginx_root
    name = f"m-{request.node.name}".replace("[", "_").replace("]", "_")
    shutil.copytree(tiny_qwen2, root / name)
    yield f"{url}/{name}"
    shutil.rmtree(root / name)


def _check_contract(source: Source, model: Path) -> None:
    """The behaviour every Source implementation must share."""
    files = {f.path: f for f in source.list_files()}
    expected = {str(p.relative_to(model)) for p in model.rglob("*") if p.is_file()}
    assert set(files) == expected
    for rel, stat in files.items():
        data = (model / rel).read_bytes()
        assert stat.size == len(data)
        buf = bytearray(min(100, len(data)))
        source.read_into(rel, len(data) - len(buf), memoryview(buf))
        assert bytes(buf) == data[-len(buf) :]
    some = next(iter(files))
    size = files[some].size
    with pytest.raises(SourceError, match="short read"):
        source.read_into(some, size - 4, memoryview(bytearray(8)))
    with pytest.raises(SourceNotFoundError) as e:
        source.read_range("nope.bin", 0, 4)
    assert "nope.bin" in str(e.value)


def test_local_source_contract(tiny_qwen2: Path) -> None:
    _check_contract(open_source(tiny_qwen2), tiny_qwen2)


def test_http_source_contract(served_model: str, tiny_qwen2: Path) -> None:
    with open_source(served_model) as source:
        _check_contract(source, tiny_qwen2)
        m = build_manifest(source)
    local = build_manifest(open_source(tiny_qwen2))
    assert [f.safetensors for f in m.files] == [f.safetensors for f in local.files]


def test_http_lists_from_crc32_file(served_model: str, nginx_root: tuple[str, Path]) -> None:
    _url, root = nginx_root
    model = root / served_model.rsplit("/", 1)[1]
    (model / "crc32.txt").write_text("00000000 config.json\n")
    with open_source(served_model) as source:
        assert sorted(f.path for f in source.list_files()) == ["config.json", "crc32.txt"]


def test_local_source_refuses_escapes(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (tmp_path / "secret").write_text("x")
    (model / "link").symlink_to(tmp_path / "secret")
    (model / "ok.bin").write_bytes(b"abc")
    source = open_source(model)
    assert [f.path for f in source.list_files()] == ["ok.bin"]
    with pytest.raises(SourceError, match="outside"):
        source.read_range("link", 0, 1)
    with pytest.raises(Crc32FileError, match=r"'\.\.'"):
        source.read_range("../secret", 0, 1)
    (model / "crc32.txt").write_text("00000000 link\n")
    with pytest.raises(Crc32FileError, match="do not exist"):
        build_manifest(source)


def test_unknown_scheme() -> None:
    with pytest.raises(ConfigError, match="unknown source scheme 'gopher'"):
        open_source("gopher://x/y")


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Fails every other request with 503, to prove retries with backoff."""

    calls = 0
    data = os.urandom(300_000)

    def do_GET(self) -> None:
        type(self).calls += 1
        if type(self).calls % 2 == 1:
            self.send_error(503)
            return
        start, end = self.headers["Range"].removeprefix("bytes=").split("-")
        body = self.data[int(start) : int(end) + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.data)}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_http_retries_transient_errors() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m"
        with open_source(url, backoff=0.01) as source:
            assert source.read_range("f.bin", 1000, 5000) == _Flaky.data[1000:6000]
            assert _Flaky.calls >= 2
        with (
            open_source(url, backoff=0.001, retries=0) as source,
            pytest.raises(SourceError, match="HTTP 503") as e,
        ):
            _Flaky.calls = 0
            source.read_range("f.bin", 0, 10)
        assert "f.bin" in str(e.value) and url in str(e.value)
    finally:
        server.shutdown()
        server.server_close()
