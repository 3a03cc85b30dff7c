"""Real ``mows serve`` processes for tests, stopped and cleaned up by PID."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file


class DaemonProcess:
    def __init__(
        self,
        base: Path,
        *,
        roots: list[Path | str],
        max_memory: str = "1GiB",
        extra: list[str] | None = None,
        pool_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.base = base
        self.env = env or {}  # added to (and overriding) os.environ at start
        self.socket = str(base / "mows.sock")
        # A unique pool under /dev/shm: real shared memory, removed by stop().
        self.pool_dir = pool_dir or Path("/dev/shm") / f"mows-test-{uuid.uuid4().hex[:10]}"
        self.args = [
            sys.executable,
            "-m",
            "mows",
            "-v",
            "serve",
            "--max-memory",
            max_memory,
            "--socket",
            self.socket,
            "--pool-dir",
            str(self.pool_dir),
            "--chunk-size",
            "1MiB",
            *[a for r in roots for a in ("--allow-root", str(r))],
            *(extra or []),
        ]
        self.log_path = base / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k != "MOWS_SOCKET"} | self.env
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(clean=False)
                raise RuntimeError(f"daemon did not start:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "mows", "status", "--json", "--socket", self.socket],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return dict(json.loads(out.stdout))

    def stop(self, *, clean: bool = True, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        if clean:
            shutil.rmtree(self.pool_dir, ignore_errors=True)


def make_random_model(path: Path, mib: int, *, files: int = 2, seed: int = 0) -> Path:
    """A model of real safetensors files holding random float32 tensors, ``mib`` MiB in all."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    per_file = mib * 2**20 // files
    for i in range(files):
        n = per_file // 4 // 4
        tensors = {f"layer{i}.w{j}": rng.standard_normal(n, dtype=np.float32) for j in range(4)}
        save_file(tensors, str(path / f"model-{i:05d}-of-{files:05d}.safetensors"))
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    return path


def generate_crc32(model: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mows", "crc32", "generate", str(model)],
        check=True,
        capture_output=True,
    )


class EtcdProcess:
    """A real single-member etcd on loopback, in its own data directory.

    ``tls``: (certificate, key) PEM files: clients connect over https. ``client_ca``: also
    require client certificates signed by that CA (``--client-cert-auth``).
    """

    def __init__(
        self, base: Path, *, tls: tuple[Path, Path] | None = None, client_ca: Path | None = None
    ) -> None:
        from tests.conftest import free_port, require_tool

        self.binary = require_tool("etcd")
        self.base = base
        self.client_port = free_port()
        self.peer_port = free_port()
        scheme = "https" if tls else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.client_port}"
        self.security: list[str] = []
        if tls:
            self.security += ["--cert-file", str(tls[0]), "--key-file", str(tls[1])]
        if client_ca:
            self.security += ["--trusted-ca-file", str(client_ca), "--client-cert-auth"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> EtcdProcess:
        import socket

        self._log = open(self.base / "etcd.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--name",
                "mows-test",
                "--data-dir",
                str(self.base / "etcd-data"),
                "--listen-client-urls",
                self.endpoint,
                "--advertise-client-urls",
                self.endpoint,
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster",
                f"mows-test=http://127.0.0.1:{self.peer_port}",
                *self.security,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("etcd did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        stop_server(self.proc, getattr(self, "_log", None))


def etcd_metric(etcd: EtcdProcess, name: str) -> float:
    """One unlabelled metric from etcd's own /metrics (served on its client URL)."""
    import urllib.request

    with urllib.request.urlopen(f"{etcd.endpoint}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"etcd serves no metric {name}")


class TcpProxy:
    """A loopback TCP relay to ``port`` that a test can cut (every connection closed, new ones
    closed at once) and restore: one client's network to a server, and nobody else's."""

    def __init__(self, port: int) -> None:
        import socket

        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.cut_off = False
        self._open: set[Any] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.cut_off:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._open.update((conn, upstream))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()
                with self._lock:
                    self._open.discard(s)

    def cut(self) -> None:
        self.cut_off = True
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(2)  # SHUT_RDWR
            self._open.clear()

    def restore(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


class MotoServer:
    """moto's standalone S3 server on loopback: real HTTP, SigV4-signed requests.

    ``env`` is what a process needs to reach it through the standard AWS chain.
    """

    def __init__(self, base: Path, server_env: dict[str, str] | None = None) -> None:
        from tests.conftest import free_port

        self.server_env = server_env or {}  # e.g. INITIAL_NO_AUTH_ACTION_COUNT: SigV4 checked
        self.binary = str(Path(sys.executable).parent / "moto_server")
        if not os.path.exists(self.binary):
            import pytest

            pytest.skip("moto_server is not installed (pip install 'moto[server]')")
        self.base = base
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "mows-test-key",
            "AWS_SECRET_ACCESS_KEY": "mows-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            # nothing from this machine's own AWS setup, and no wait on instance metadata
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        import socket

        self._log = open(self.base / "moto.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [self.binary, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=os.environ | self.server_env,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)

    def client(self, endpoint: str | None = None) -> Any:
        """A boto3 S3 client for setting up buckets (tests only)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=self.env["AWS_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def upload(self, bucket: str, prefix: str, model: Path) -> str:
        """Every file under ``model`` to ``s3://bucket/prefix/``; returns that URL."""
        s3 = self.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
        for f in sorted(model.rglob("*")):
            if f.is_file():
                s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(model).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        stop_server(self.proc, getattr(self, "_log", None))


def stop_server(proc: subprocess.Popen[bytes] | None, log: Any) -> None:
    """SIGTERM a helper server (etcd, moto), SIGKILL it after 10 s; close its log."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None:
        log.close()


LOAD = [sys.executable, "-m", "mows", "load", "--json", "--no-progress"]


def load_in_parallel(
    jobs: list[tuple[str, Path | str]], timeout: float = 300
) -> list[dict[str, Any]]:
    """Run ``mows load --json`` for each (socket, model) at once; return each summary."""
    procs = [
        subprocess.Popen(
            [*LOAD, "--socket", sock, str(model)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for sock, model in jobs
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"mows load failed: {stderr}")
        out.append(dict(json.loads(stdout)))
    return out


def mows_load(sock: str, model: Path) -> dict[str, Any]:
    return load_in_parallel([(sock, model)])[0]


def make_manifest(files: int, chunks: int = 1, chunk_size: int = 1 << 20) -> Any:
    """A manifest of ``files`` files of ``chunks`` full chunks each, for directory unit
    tests: file i's bytes are all i (so its CRC-32 is known without a file)."""
    import zlib

    from mows.manifest import FileEntry, Manifest

    size = chunks * chunk_size
    entries = tuple(
        FileEntry(f"f{i}", size, 0, crc32=zlib.crc32(bytes([i % 256]) * size)) for i in range(files)
    )
    return Manifest("test://m", chunk_size, entries)


# Room for the pool's small metadata files (json) on top of the cap, measured on a tmpfs.
POOL_METADATA = 64 * 1024


def fs_used(mnt: Path) -> int:
    """Bytes in use on the filesystem at ``mnt``: unlinked but still mapped pages included."""
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextlib.contextmanager
def http_site(
    files: dict[str, bytes], redirects: dict[str, str], rate: float | None = None
) -> Iterator[tuple[str, list[str], dict[str, int]]]:
    """A real HTTP server on loopback: ``files`` by path (ranges honoured), ``redirects``
    answered 302 with that Location; each body sent at ``rate`` bytes/s if given (an origin
    slow enough to act on a load half done). Yields (base URL, paths requested, body bytes sent
    by path: what left the origin, counted by the origin)."""
    import http.server

    hits: list[str] = []
    sent: dict[str, int] = {}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.serve(body=False)

        def do_GET(self) -> None:
            self.serve(body=True)

        def serve(self, body: bool) -> None:
            hits.append(self.path)
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            status, rng = 200, self.headers.get("Range")
            if rng:
                start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
                data, status = data[start : end + 1], 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                with lock:
                    sent[self.path] = sent.get(self.path, 0) + len(data)
            if body and rate is None:
                self.wfile.write(data)
            elif body:
                for off in range(0, len(data), 64 << 10):
                    self.wfile.write(data[off : off + (64 << 10)])
                    time.sleep((64 << 10) / rate)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits, sent
    finally:
        server.shutdown()
        server.server_close()
