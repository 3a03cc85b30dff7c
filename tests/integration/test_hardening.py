"""Inputs an attacker controls: URLs with encoded traversal, a pool directory planted or
opened up by someone else."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import mows


def test_encoded_traversal_in_a_url_is_refused(
    daemon_factory: Any, nginx_root: tuple[str, Path]
) -> None:
    """``%2e%2e/`` is ``../`` to the origin: refused before any prefix check."""
    url, _ = nginx_root
    d = daemon_factory(roots=[f"{url}/models"])
    for path in (
        f"{url}/models/%2e%2e/secret",
        f"{url}/models/a/%2E%2E/%2e%2e/etc",
        f"{url}/models/./x",
    ):
        with pytest.raises(mows.AccessDeniedError):
            mows.open_model(path, socket=d.socket, fallback=False)


def serve_refused(pool: Path, tmp_path: Path) -> str:
    """Start a daemon on ``pool``; it must refuse at once. Returns its stderr."""
    r = subprocess.run(
        [
            *(sys.executable, "-m", "mows", "serve", "--max-memory", "64MiB"),
            *("--socket", str(tmp_path / "s.sock"), "--pool-dir", str(pool)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0, r.stdout
    assert not (tmp_path / "s.sock").exists()
    return r.stderr


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_pool_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    """A pool root writable by group or others could hold planted files: the daemon refuses
    to start, naming the directory and its mode."""
    pool = Path("/dev/shm") / f"mows-test-planted-{uuid.uuid4().hex[:8]}"
    pool.mkdir()
    try:
        os.chmod(pool, mode)
        err = serve_refused(pool, tmp_path)
        assert str(pool) in err and f"{mode:o}" in err, err
    finally:
        os.rmdir(pool)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_pool_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    pool = Path("/dev/shm") / f"mows-test-planted-{uuid.uuid4().hex[:8]}"
    pool.mkdir(mode=0o755)
    try:
        os.chown(pool, 65534, 65534)
        err = serve_refused(pool, tmp_path)
        assert "owned by uid 65534" in err, err
    finally:
        os.rmdir(pool)


def test_the_local_api_bounds_a_request_and_names_its_client(
    daemon_factory: Any, tiny_qwen2: Path
) -> None:
    """A request frame over 1 MiB closes that connection with a ProtocolError (the daemon and
    other clients carry on); each open is logged with the client's uid and pid."""
    import socket as sk
    import struct

    from mows import _protocol as p

    d = daemon_factory(roots=[tiny_qwen2])
    s = sk.socket(sk.AF_UNIX)
    s.connect(d.socket)
    s.settimeout(10)
    s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid())))
    assert isinstance(p.decode_response(p.recv_frame(s)), p.Welcome)
    s.sendall(struct.pack(">I", 2 << 20) + b"\0" * 64)  # announces a 2 MiB request
    reply = p.decode_response(p.recv_frame(s))
    assert isinstance(reply, p.Error) and "exceeds" in reply.message, reply
    s.close()
    with mows.open_model(tiny_qwen2, socket=d.socket, fallback=False) as h:
        assert h.keys()
    assert f"uid {os.getuid()} pid {os.getpid()}" in d.log()
