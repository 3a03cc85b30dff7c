"""s3:// models against a real S3-compatible server (moto's, real HTTP and SigV4) on loopback."""

from __future__ import annotations

import http.client
import http.server
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mows
from mows import SourceError, SourceNotFoundError
from mows.manifest import build_manifest
from mows.sources import open_source
from tests.daemons import (
    DaemonProcess,
    MotoServer,
    generate_crc32,
    load_in_parallel,
    make_random_model,
)
from tests.integration.test_daemon import assert_same_as_files
from tests.integration.test_sources import _check_contract

pytest.importorskip("botocore")

BUCKET = "mows-test"


@pytest.fixture
def s3_env(moto_s3: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """This process reaches moto through the standard AWS chain (environment variables)."""
    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    return moto_s3


def upload(moto: MotoServer, model: Path) -> str:
    return moto.upload(BUCKET, f"models/{uuid.uuid4().hex[:8]}/{model.name}", model)


class S3Proxy(http.server.ThreadingHTTPServer):
    """A pass-through in front of moto that counts GET body bytes and can throttle: the
    first ``throttle`` requests get HTTP 503 with S3's ``SlowDown`` error body."""

    daemon_threads = True

    def __init__(self, upstream: str, throttle: int = 0) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.throttle = throttle
        self.throttled = 0
        self.get_bytes = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: S3Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        with self.server.lock:
            slow = self.server.throttled < self.server.throttle
            self.server.throttled += slow
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if slow:
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(_SLOWDOWN)
            return
        conn = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            if self.command == "GET":
                with self.server.lock:
                    self.server.get_bytes += len(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@pytest.fixture
def proxy(moto_s3: MotoServer) -> Iterator[S3Proxy]:
    p = S3Proxy(moto_s3.endpoint)
    yield p
    p.close()


def test_s3_source_contract(s3_env: MotoServer, tiny_qwen2: Path) -> None:
    url = upload(s3_env, tiny_qwen2)
    with open_source(url + "/") as source:  # no crc32.txt: the bucket listing
        assert source.url == url
        _check_contract(source, tiny_qwen2)
        m = build_manifest(source)
        assert all(f.etag for f in m.files)
    local = build_manifest(open_source(tiny_qwen2))
    assert [f.safetensors for f in m.files] == [f.safetensors for f in local.files]
    assert [(f.path, f.size) for f in m.files] == [(f.path, f.size) for f in local.files]


def test_lists_from_crc32_file_else_the_bucket(s3_env: MotoServer, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 2)
    generate_crc32(model)
    (model / "extra.bin").write_bytes(b"not listed")
    url = upload(s3_env, model)
    with open_source(url) as source:
        listed = sorted(f.path for f in source.list_files())
        assert "extra.bin" not in listed and "crc32.txt" in listed
        assert "extra.bin" in {f.path for f in source.list_objects()}  # type: ignore[attr-defined]


def test_daemon_loads_s3_model_bitwise(
    s3_env: MotoServer, daemon_factory: Any, tmp_path: Path
) -> None:
    model = make_random_model(tmp_path / "m", 24, files=3)
    generate_crc32(model)
    url = upload(s3_env, model)
    d = daemon_factory(roots=[], env=s3_env.env, extra=["--model-path", url + "/"])
    sd = mows.load_state_dict(url, socket=d.socket, fallback=False)
    assert_same_as_files(sd, model)
    st = d.status()
    (m,) = st["models"]
    assert m["path"] == url and m["cached_fraction"] == 1.0
    assert st["bytes_from_origin"] == m["bytes"]


def test_cli_crc32_and_manifest_on_s3(s3_env: MotoServer, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 4)
    generate_crc32(model)
    url = upload(s3_env, model)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mows", *args], capture_output=True, text=True, timeout=120
        )

    r = run("crc32", "verify", url)
    assert r.returncode == 0, r.stderr
    assert "3/3 files OK" in r.stderr
    r = run("crc32", "generate", url, "-o", str(tmp_path / "out.txt"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.txt").read_text() == (model / "crc32.txt").read_text()
    r = run("manifest", url)
    assert r.returncode == 0, r.stderr
    assert "model-00000-of-00002.safetensors" in r.stdout and "4 tensors" in r.stdout


def test_missing_objects_name_model_and_object(s3_env: MotoServer, tmp_path: Path) -> None:
    url = upload(s3_env, make_random_model(tmp_path / "m", 1, files=1))
    key = url.removeprefix(f"s3://{BUCKET}/")
    with open_source(url) as source:
        with pytest.raises(SourceNotFoundError) as e:
            source.read_range("nope.bin", 0, 4)
        assert str(e.value).count("\n") == 0
        assert f"no such object s3://{BUCKET}/{key}/nope.bin" in str(e.value)
        with pytest.raises(SourceNotFoundError, match=r"nope\.bin"):
            source.stat("nope.bin")
    with (
        open_source(f"s3://{BUCKET}/no/such/model") as source,
        pytest.raises(SourceNotFoundError, match=f"no objects under s3://{BUCKET}/no/such/model/"),
    ):
        source.list_files()
    with (
        open_source("s3://mows-no-such-bucket/m") as source,
        pytest.raises(SourceNotFoundError, match="no such bucket 'mows-no-such-bucket'"),
    ):
        source.list_files()


def test_missing_credentials_and_unreachable_endpoint(
    s3_env: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with open_source(f"s3://{BUCKET}/m") as source, pytest.raises(SourceError) as e:
        source.stat("config.json")
    assert str(e.value).startswith(f"s3://{BUCKET}/m: config.json: no AWS credentials found")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with open_source(f"s3://{BUCKET}/m", s3_endpoint_url=dead, retries=1, backoff=0.01) as src:
        with pytest.raises(SourceError, match="Could not connect to the endpoint URL") as e:
            src.stat("config.json")
        assert "config.json" in str(e.value) and str(e.value).count("\n") == 0


def test_wrong_credentials_are_access_denied(tmp_path: Path) -> None:
    """moto checks SigV4 signatures against its IAM once its first N requests are spent."""
    moto = MotoServer(tmp_path, server_env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}).start()
    try:
        iam = _iam(moto)
        iam.create_user(UserName="reader")  # 1
        iam.put_user_policy(  # 2
            UserName="reader",
            PolicyName="s3",
            PolicyDocument='{"Version": "2012-10-17", "Statement": '
            '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}',
        )
        key = iam.create_access_key(UserName="reader")["AccessKey"]  # 3
        moto.client().create_bucket(Bucket=BUCKET)  # 4: from here on, signatures count
        good = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }
        with pytest.MonkeyPatch.context() as mp:
            for k, v in (moto.env | good).items():
                mp.setenv(k, v)
            import boto3

            boto3.client("s3").put_object(Bucket=BUCKET, Key="m/config.json", Body=b"{}")
            with open_source(f"s3://{BUCKET}/m") as source:
                assert source.read_range("config.json", 0, 2) == b"{}"
            mp.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
            with open_source(f"s3://{BUCKET}/m") as source, pytest.raises(SourceError) as e:
                source.read_range("config.json", 0, 2)
            assert "access denied" in str(e.value) and "SignatureDoesNotMatch" in str(e.value)
            mp.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
            with open_source(f"s3://{BUCKET}/m") as source:
                with pytest.raises(SourceError) as e:
                    source.read_range("config.json", 0, 2)
                assert "access denied" in str(e.value) and "InvalidAccessKeyId" in str(e.value)
                with pytest.raises(SourceError, match=r"access denied .*HTTP 403"):
                    source.list_files()  # a HEAD first: an error without a body
    finally:
        moto.stop()


def _iam(moto: MotoServer) -> Any:
    import boto3

    return boto3.client(
        "iam",
        endpoint_url=moto.endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )


def test_slowdown_is_retried(s3_env: MotoServer, proxy: S3Proxy, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 2, files=1)
    url = upload(s3_env, model)
    data = (model / "config.json").read_bytes()
    proxy.throttle = 3
    with open_source(url, s3_endpoint_url=proxy.url, backoff=0.01) as source:
        assert source.read_range("config.json", 1, len(data) - 1) == data[1:]
    assert proxy.throttled == 3
    proxy.throttled, proxy.throttle = 0, 10
    with (
        open_source(url, s3_endpoint_url=proxy.url, backoff=0.001, retries=1) as source,
        pytest.raises(SourceError, match=r"SlowDown \(HTTP 503\).* after 2 attempts") as e,
    ):
        source.read_range("config.json", 0, 4)
    assert str(e.value).startswith(f"{url}: config.json: ")


def test_daemon_rides_out_throttling(
    s3_env: MotoServer, proxy: S3Proxy, daemon_factory: Any, tmp_path: Path
) -> None:
    model = make_random_model(tmp_path / "m", 8, files=2)
    generate_crc32(model)
    url = upload(s3_env, model)
    proxy.throttle = 4  # the first requests, one after the other: 4 retries of one
    d = daemon_factory(roots=[url], env=s3_env.env | {"AWS_ENDPOINT_URL": proxy.url})
    assert_same_as_files(mows.load_state_dict(url, socket=d.socket, fallback=False), model)
    assert proxy.throttled == 4


def test_rewritten_object_is_a_new_version(
    s3_env: MotoServer, daemon_factory: Any, tmp_path: Path
) -> None:
    """No crc32.txt: every file is known by its ETag, so a rewrite within the same second
    (same size, same Last-Modified second) is still a new version."""
    model = make_random_model(tmp_path / "m", 4, files=2)
    url = upload(s3_env, model)
    d = daemon_factory(roots=[f"s3://{BUCKET}"], env=s3_env.env)
    with mows.open_model(url, socket=d.socket, fallback=False) as h:
        v1 = h.version
        assert_same_as_files(h.state_dict(), model)
    with mows.open_model(url, socket=d.socket, fallback=False) as h:
        assert h.version == v1  # nothing changed: the same version
    make_random_model(model, 4, files=2, seed=7)  # same names and sizes, new bytes
    shard = "model-00001-of-00002.safetensors"
    s3_env.client().upload_file(str(model / shard), BUCKET, f"{url.split('/', 3)[3]}/{shard}")
    with mows.open_model(url, socket=d.socket, fallback=False) as h:
        assert h.version != v1
        sd = h.state_dict()
        assert_same_as_files(
            {k: v for k, v in sd.items() if k.startswith("layer1.")}, _only(model, shard, tmp_path)
        )


def _only(model: Path, name: str, tmp_path: Path) -> Path:
    out = tmp_path / "only"
    out.mkdir(exist_ok=True)
    (out / name).write_bytes((model / name).read_bytes())
    return out


def test_two_nodes_read_the_bucket_about_once(
    s3_env: MotoServer, proxy: S3Proxy, daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    from tests.integration.test_cluster import FAST

    model = make_random_model(tmp_path / "m", 32, files=2)
    generate_crc32(model)
    url = upload(s3_env, model)
    env = s3_env.env | {"AWS_ENDPOINT_URL": proxy.url}
    nodes: list[DaemonProcess] = [
        daemon_factory(
            roots=[url], env=env, extra=["--etcd", etcd.endpoint, "--cluster", "s3", *FAST]
        )
        for _ in range(2)
    ]
    from tests.integration.test_daemon import _wait

    _wait(lambda: all(len(n.status()["cluster"]["nodes"]) >= 2 for n in nodes), timeout=15)
    load_in_parallel([(n.socket, url) for n in nodes])  # type: ignore[misc]
    statuses = [n.status() for n in nodes]
    size = statuses[0]["models"][0]["bytes"]
    assert sum(s["bytes_from_origin"] for s in statuses) <= 1.1 * size
    assert proxy.get_bytes <= 1.1 * size, (proxy.get_bytes, size)
    for n in nodes:
        assert_same_as_files(mows.load_state_dict(url, socket=n.socket, fallback=False), model)


def test_daemon_error_names_model_and_object(s3_env: MotoServer, daemon_factory: Any) -> None:
    d = daemon_factory(roots=[f"s3://{BUCKET}"], env=s3_env.env)
    with pytest.raises(SourceNotFoundError) as e:  # the daemon's error, re-raised as is
        mows.open_model(f"s3://{BUCKET}/absent/model", socket=d.socket, fallback=False)
    assert f"s3://{BUCKET}/absent/model" in str(e.value)
    assert "no objects under" in str(e.value)


def test_one_sources_table_serves_every_scheme(
    s3_env: MotoServer, tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon passes its whole [sources] table to every source: each takes its keys."""
    from tests.conftest import free_port

    url = upload(s3_env, tiny_qwen2)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {
        "connections": 2,
        "retries": 0,
        "s3_endpoint_url": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "s3_endpoints": {url.rsplit("/", 1)[0]: s3_env.endpoint},  # this model path's store
        "s3_addressing_style": "path",
    }
    with open_source(url, **options) as source:
        assert {f.path for f in source.list_files()} >= {"config.json"}
    with open_source(tiny_qwen2, **options) as source:
        assert source.stat("config.json").size > 0
    with (
        open_source(f"s3://{BUCKET}/elsewhere", **options) as source,
        pytest.raises(SourceError, match="Could not connect"),
    ):
        source.stat("config.json")
