"""``mows crc32`` and ``mows manifest`` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

MOWS = [sys.executable, "-m", "mows"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MOWS, *args], capture_output=True, text=True, timeout=120)


def test_generate_agrees_with_crc32_tool(model_copy: Path) -> None:
    tool = require_tool("crc32")
    (model_copy / "sub").mkdir()
    (model_copy / "sub" / "extra.bin").write_bytes(os.urandom(12345))
    r = run("crc32", "generate", str(model_copy))
    assert r.returncode == 0, r.stderr
    ours = dict(
        reversed(line.split(" ", 1)) for line in (model_copy / "crc32.txt").read_text().splitlines()
    )
    files = sorted(ours)
    assert "sub/extra.bin" in files and "crc32.txt" not in files
    out = subprocess.run([tool, *files], cwd=model_copy, capture_output=True, text=True, check=True)
    theirs = dict(reversed(line.split("\t", 1)) for line in out.stdout.splitlines())
    assert ours == theirs
    assert run("crc32", "verify", str(model_copy)).returncode == 0


def test_verify_finds_one_flipped_byte_in_100mb(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    big = model / "big.bin"
    big.write_bytes(os.urandom(100 * 10**6))
    (model / "small.bin").write_bytes(b"hello")
    assert run("crc32", "generate", str(model)).returncode == 0
    with open(big, "r+b") as f:
        f.seek(77_777_777)
        b = f.read(1)
        f.seek(77_777_777)
        f.write(bytes([b[0] ^ 0x01]))
    r = run("crc32", "verify", str(model))
    assert r.returncode == 1
    assert "MISMATCH big.bin" in r.stderr
    assert "small.bin" not in r.stderr.split("files OK")[0].replace("1/2", "")


def test_verify_names_missing_and_escaping_entries(model_copy: Path) -> None:
    (model_copy / "crc32.txt").write_text("0000abcd ../x\n")
    r = run("crc32", "verify", str(model_copy))
    assert r.returncode == 2
    assert "'..'" in r.stderr and "Traceback" not in r.stderr
    (model_copy / "crc32.txt").write_text("0000abcd gone.safetensors\n")
    r = run("crc32", "verify", str(model_copy))
    assert r.returncode == 2 and "gone.safetensors" in r.stderr


def test_verify_reports_unlisted(model_copy: Path) -> None:
    assert run("crc32", "generate", str(model_copy)).returncode == 0
    (model_copy / "new.bin").write_bytes(b"x")
    r = run("crc32", "verify", str(model_copy))
    assert r.returncode == 0
    assert "unlisted (not checked) new.bin" in r.stderr


def test_corrupt_header_is_one_line_error(model_copy: Path) -> None:
    shard = sorted(model_copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[10:14] = b"\xff\xff\xff\xff"
    shard.write_bytes(bytes(data))
    r = run("manifest", str(model_copy))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert shard.name in lines[0] and "JSON" in lines[0]


@pytest.mark.parametrize("args", [["--help"], ["crc32", "--help"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    code = "import sys; from mows.cli import cli; " + (
        f"sys.argv=['mows', *{args!r}]\n"
        "try:\n    cli.main(standalone_mode=False)\nexcept SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
