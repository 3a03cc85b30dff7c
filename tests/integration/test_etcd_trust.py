"""etcd as an untrusted input: forged directory records, placement capture, TLS and auth."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest

import mows
from mows._config import load_daemon_config
from mows._errors import ConfigError
from mows.cluster import ChunkCrcs, Cluster, Holding, NodeInfo
from mows.cluster._bitmap import encode_bitmap, encode_crcs
from mows.cluster._directory import _Held, _Model, placement_weight
from mows.cluster._etcd import EtcdSecurity, open_client
from tests.conftest import free_port
from tests.daemons import DaemonProcess, EtcdProcess, make_manifest, make_random_model
from tests.integration.test_cluster import FAST, load_all, start_nodes, wait_published
from tests.integration.test_daemon import _wait, assert_same_as_files

_enc = msgspec.msgpack.Encoder()


def etcd_put(endpoint: str, items: dict[str, bytes], security: EtcdSecurity | None = None) -> None:
    """Write raw values under ``/mows/t/``, as anyone with write access to etcd could."""

    async def put() -> None:
        client = open_client(endpoint, security or EtcdSecurity())
        try:
            for key, value in items.items():
                await client.put(f"/mows/t/{key}".encode(), value)
        finally:
            await client.close()

    asyncio.run(put())


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name + " ")))


# -- forged records -------------------------------------------------------------------------


def test_forged_records_are_ignored_and_counted(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    model = make_random_model(tmp_path / "m", 16, files=2)
    port = free_port()
    a = start_nodes(daemon_factory, etcd, tmp_path, 1)[0]
    b = start_nodes(daemon_factory, etcd, tmp_path, 1, "--metrics-listen", f"127.0.0.1:{port}")[0]
    _wait(lambda: len(b.status()["cluster"]["nodes"]) == 2)
    etcd_put(
        etcd.endpoint,
        {
            "nodes/evil": _enc.encode(NodeInfo("evil", "no such/address", capacity=2**62)),
            "nodes/liar": _enc.encode(NodeInfo("someone-else", "127.0.0.1:9", 1 << 30)),
            "nodes/junk": b"\xc1 not msgpack",
            "nodes/fat": _enc.encode(NodeInfo("fat", "127.0.0.1:9", 1, used=0)) + b"\0" * 5000,
            "nodes/negative": _enc.encode(NodeInfo("negative", "127.0.0.1:9", -1)),
        },
    )
    load_all([a], model)  # A holds the model; B has not joined it yet
    fp = a.status()["cluster"]["models"][0]["fingerprint"]
    files = a.status()["cluster"]["models"][0]["files"]
    bomb = zlib.compress(b"\xff" * (60 << 10), 9)  # 60 KiB of "held" in ~100 bytes
    none = encode_bitmap([], files)
    etcd_put(
        etcd.endpoint,
        {
            f"holdings/{fp}/huge": _enc.encode(Holding("huge", 1 << 30, bomb, bomb, bomb)),
            f"holdings/{fp}/off": _enc.encode(
                Holding("off", files + 1, encode_bitmap([0], files + 1), none, none)
            ),
            f"holdings/{fp}/bomb": _enc.encode(Holding("bomb", files, bomb, bomb, bomb)),
            f"holdings/{fp}/junk": b"\xc1\xc1\xc1",
            f"holdings/{fp}/mallory": _enc.encode(
                Holding("alice", files, encode_bitmap([0], files), none, none)
            ),
            # CRCs of another file's chunks: they do not combine to file 0's CRC-32
            f"manifests/{fp}/0/0": _enc.encode(ChunkCrcs(0, 0, 1, encode_crcs({0: 1}, 1))),
            # a model nobody joined: never decoded, so not even counted
            "holdings/not-a-model/x": b"\xc1",
        },
    )
    _wait(lambda: a.status()["cluster"]["directory_rejected"] >= 10)
    # B joins now: it must read the holdings published before (A's real one, and the forged).
    with mows.open_model(model, socket=b.socket, fallback=False) as h:
        assert h.stats["bytes_from_peers"] == h.stats["bytes"]
        assert_same_as_files(h.state_dict(), model)
    for d in (a, b):
        assert d.proc is not None and d.proc.poll() is None
        cl = d.status()["cluster"]
        assert cl["healthy"] and sorted(n["id"] for n in cl["nodes"]) == sorted(
            [a.status()["cluster"]["node_id"], b.status()["cluster"]["node_id"]]
        )
    assert b.status()["cluster"]["directory_rejected"] >= 10
    assert metric(port, "mows_directory_rejected_total") >= 10
    assert "ignoring directory record" in b.log()


def _cluster(capacity: int = 100) -> Cluster:
    c = Cluster(["http://127.0.0.1:1"], "t", lambda: NodeInfo("me", "127.0.0.1:1", capacity))
    c.healthy = True
    return c


def test_a_forged_capacity_cannot_capture_placement() -> None:
    assert placement_weight(10**18, 100) == 400
    assert placement_weight(-5, 100) == 0
    assert placement_weight(250, 100) == 250  # a bigger peer keeps its real weight
    c = _cluster()
    c.models["m"] = m = _Model(make_manifest(1))
    for node, cap in (("peer", 100), ("hog", 2**62)):
        c.nodes[node] = NodeInfo(node, "127.0.0.1:2", cap)
        m.others[node] = _Held(frozenset(), frozenset(), frozenset({0}))
    owners = [c.owner("m", f"m/{i}") for i in range(3000)]
    share = owners.count("hog") / len(owners)
    assert 0.55 < share < 0.8, share  # 4 / (1 + 1 + 4) at most, not ~1
    assert owners.count("me") > 300 and owners.count("peer") > 300


def test_records_are_checked_against_key_and_manifest() -> None:
    c = _cluster()
    p = c.prefix.decode()

    def apply(key: str, value: bytes, rev: int = 1, deleted: bool = False) -> int:
        before = c.rejected_records
        c._apply(f"{p}{key}".encode(), value, rev, deleted=deleted)
        return c.rejected_records - before

    good = NodeInfo("n1", "[::1]:7470", 100)
    assert apply("nodes/n1", _enc.encode(good)) == 0 and c.nodes["n1"] == good
    assert apply("nodes/n1", _enc.encode(NodeInfo("n1", "h:70000", 1))) == 1
    assert "n1" not in c.nodes  # a bad update withdraws the record it replaced
    assert apply("nodes/a/b", b"") == 1
    before = c.rejected_records
    c._apply(c.prefix + b"nodes/\xff", _enc.encode(NodeInfo("\ufffd", "h:1", 1)), 1, deleted=False)
    assert c.rejected_records == before + 1  # keys must be UTF-8: no lossy decoding
    assert apply("manifests/x", b"anything") == 0  # a version not joined: not decoded
    # holdings: decoded only for joined versions, against the joined file count
    rec = Holding("n1", 8, encode_bitmap([1, 2], 8), encode_bitmap([5], 8), encode_bitmap([], 8))
    assert apply("holdings/fp/n1", _enc.encode(rec)) == 0 and "fp" not in c.models
    manifest = make_manifest(8, chunks=2, chunk_size=64)
    c.join("fp", manifest)
    assert apply("holdings/fp/n1", _enc.encode(rec), rev=5) == 0
    held = c.models["fp"].others["n1"]
    assert held.complete == {1, 2} and held.partial == {5}
    assert apply("holdings/fp/n1", b"\xc1", rev=3) == 0  # older than what we hold: skipped
    apply("holdings/fp/n1", b"", rev=6, deleted=True)
    assert apply("holdings/fp/n1", _enc.encode(rec), rev=5) == 0  # a re-read racing the watch
    assert "n1" not in c.models["fp"].others
    assert apply("holdings/fp/n2", _enc.encode(rec), rev=7) == 1  # node mismatch
    assert apply("holdings/fp/n1", b"\0" * (65 << 10), rev=8) == 1  # oversized
    assert apply("holdings/fp/n1", _enc.encode(Holding("n1", 9, b"", b"", b"")), rev=9) == 1
    # chunk CRC pages: taken only when they combine to the file's CRC-32 from crc32.txt
    chunk = zlib.crc32(bytes([3]) * 64)  # file 3: two chunks of 64 bytes of 3
    good = _enc.encode(ChunkCrcs(3, 0, 2, encode_crcs({0: chunk, 1: chunk}, 2)))
    forged = _enc.encode(ChunkCrcs(3, 0, 2, encode_crcs({0: chunk, 1: chunk ^ 1}, 2)))
    assert apply("manifests/fp/3/0", forged) == 1 and c.chunk_crc("fp", 3, 0) is None
    assert apply("manifests/fp/3/1", good) == 1  # under another page's key
    assert apply("manifests/fp/3/0", _enc.encode(ChunkCrcs(3, 0, 3, b""))) == 1  # 3 chunks?
    assert apply("manifests/fp/3/0", b"\0" * (65 << 10)) == 1
    assert apply("manifests/fp/3/0", good) == 0 and c.chunk_crc("fp", 3, 1) == chunk


def test_etcd_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="etcd_cert_file and etcd_key_file"):
        load_daemon_config({"max_memory": "1GiB", "etcd_cert_file": "c.pem"}, env={})
    with pytest.raises(ConfigError, match="etcd_user and etcd_password_file"):
        load_daemon_config({"max_memory": "1GiB", "etcd_user": "u"}, env={})
    with pytest.raises(ConfigError, match=r"etcd_ca_file: /nonexistent/ca\.pem"):
        EtcdSecurity.load(ca_file="/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match="plaintext"):
        Cluster(
            ["http://127.0.0.1:1"],
            "t",
            lambda: NodeInfo("me", "h:1", 1),
            security=EtcdSecurity.load(ca_file=__file__),
        )


# -- TLS and authentication -----------------------------------------------------------------


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    out: dict[str, Path] = {}

    def issue(name: str, issuer: Any, key: Any, ca_key: Any, ca: bool, ext: list[Any]) -> Any:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for e in ext:
            builder = builder.add_extension(e, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        out[name], out[f"{name}-key"] = d / f"{name}.pem", d / f"{name}.key"
        return cert

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("ca", None, ca_key, ca_key, True, [])
    eku = ExtendedKeyUsageOID
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    server_ext = [san, x509.ExtendedKeyUsage([eku.SERVER_AUTH, eku.CLIENT_AUTH])]
    key = ec.generate_private_key(ec.SECP256R1())
    issue("server", ca.subject, key, ca_key, False, server_ext)
    key = ec.generate_private_key(ec.SECP256R1())
    issue("client", ca.subject, key, ca_key, False, [x509.ExtendedKeyUsage([eku.CLIENT_AUTH])])
    return out


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "pki"
    d.mkdir()
    return make_pki(d)


def cluster_node(factory: Any, root: Path, endpoint: str, *extra: str) -> DaemonProcess:
    node: DaemonProcess = factory(
        roots=[root], extra=["--etcd", endpoint, "--cluster", "t", *FAST, *extra]
    )
    return node


def assert_kept_out(d: DaemonProcess, why: str) -> None:
    """The daemon runs alone (serving locally) and says why etcd refused it."""
    _wait(lambda: why in d.status()["cluster"]["etcd_last_error"].lower(), timeout=15)
    cl = d.status()["cluster"]
    assert not cl["healthy"] and len(cl["nodes"]) == 1
    assert why in d.log().lower()


def test_tls_with_client_certificates(daemon_factory: Any, tmp_path: Path, pki: Any) -> None:
    etcd = EtcdProcess(tmp_path, tls=(pki["server"], pki["server-key"]), client_ca=pki["ca"])
    etcd.start()
    try:
        certs = ["--etcd-ca-file", str(pki["ca"])]
        certs += ["--etcd-cert-file", str(pki["client"]), "--etcd-key-file", str(pki["client-key"])]
        a = cluster_node(daemon_factory, tmp_path, etcd.endpoint, *certs)
        b = cluster_node(daemon_factory, tmp_path, etcd.endpoint, *certs)
        _wait(lambda: all(len(d.status()["cluster"]["nodes"]) == 2 for d in (a, b)), timeout=15)
        assert all(d.status()["cluster"]["healthy"] for d in (a, b))
        model = make_random_model(tmp_path / "m", 8, files=1)
        load_all([a], model)
        wait_published(a, b, 8 << 20)
        with mows.open_model(model, socket=b.socket, fallback=False) as h:
            assert h.stats["bytes_from_peers"] == h.stats["bytes"]
        # Without a client certificate, etcd refuses the TLS handshake.
        c = cluster_node(daemon_factory, tmp_path, etcd.endpoint, "--etcd-ca-file", str(pki["ca"]))
        assert_kept_out(c, "connectionfailederror")
        # Without our CA, the daemon does not trust etcd's certificate (system roots).
        d = cluster_node(daemon_factory, tmp_path, etcd.endpoint, *certs[2:])
        assert_kept_out(d, "certificate_verify_failed")
        assert len(a.status()["cluster"]["nodes"]) == 2
    finally:
        etcd.stop()


async def _enable_auth(endpoint: str, security: EtcdSecurity, password: str) -> None:
    """root (needed to turn auth on) and a ``mows`` user that may read and write /mows/."""
    from aetcd import rpc

    client = open_client(endpoint, security)
    try:
        await client.connect()
        auth = rpc.AuthStub(client.channel)
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="root-pw"))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="mows"))
        perm = rpc.Permission(permType=rpc.Permission.READWRITE, key=b"/mows/", range_end=b"/mows0")
        await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="mows", perm=perm))
        await auth.UserAdd(rpc.AuthUserAddRequest(name="mows", password=password))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="mows", role="mows"))
        await auth.AuthEnable(rpc.AuthEnableRequest())
    finally:
        await client.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_user_password_auth(daemon_factory: Any, tmp_path: Path, pki: Any, tls: bool) -> None:
    server = (pki["server"], pki["server-key"]) if tls else None
    etcd = EtcdProcess(tmp_path, tls=server)
    etcd.start()
    try:
        ca = ["--etcd-ca-file", str(pki["ca"])] if tls else []
        asyncio.run(
            _enable_auth(
                etcd.endpoint, EtcdSecurity(ca=pki["ca"].read_bytes() if tls else None), "s3cret"
            )
        )
        good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
        good.write_text("s3cret\n")
        bad.write_text("guess\n")
        user = ["--etcd-user", "mows", *ca]
        a = cluster_node(
            daemon_factory, tmp_path, etcd.endpoint, *user, "--etcd-password-file", str(good)
        )
        b = cluster_node(
            daemon_factory, tmp_path, etcd.endpoint, *user, "--etcd-password-file", str(good)
        )
        _wait(lambda: all(len(d.status()["cluster"]["nodes"]) == 2 for d in (a, b)), timeout=15)
        c = cluster_node(
            daemon_factory, tmp_path, etcd.endpoint, *user, "--etcd-password-file", str(bad)
        )
        assert_kept_out(c, "authentication failed")
        d = cluster_node(daemon_factory, tmp_path, etcd.endpoint, *ca)  # no credentials at all
        _wait(lambda: d.status()["cluster"]["etcd_last_error"] != "", timeout=15)
        assert not d.status()["cluster"]["healthy"]
        assert len(a.status()["cluster"]["nodes"]) == 2
    finally:
        etcd.stop()
