"""Cluster mode with a real etcd and several real daemons on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

import mows
from mows.client import Session
from mows.transport._wire import ChunkHeader, ChunkRequest, client_handshake, recv_peer, send_peer
from tests.daemons import (
    DaemonProcess,
    generate_crc32,
    http_site,
    load_in_parallel,
    make_random_model,
    mows_load,
)
from tests.integration.test_daemon import _pool_bytes, _wait, assert_same_as_files, client

FAST = ["--lease-ttl", "2", "--peer-timeout", "5", "--listen", "127.0.0.1:0"]


def start_nodes(
    factory: Any, etcd: Any, root: Path | str, n: int, *extra: str
) -> list[DaemonProcess]:
    nodes = [
        factory(roots=[root], extra=["--etcd", etcd.endpoint, "--cluster", "t", *FAST, *extra])
        for _ in range(n)
    ]
    _wait(lambda: all(len(d.status()["cluster"]["nodes"]) >= n for d in nodes), timeout=15)
    return nodes


def stored_crc_pages(endpoint: str, cluster: str, fp: str) -> dict[int, list[int]]:
    """The chunk CRC pages the cluster published in etcd, read back with a plain etcd
    client: file index -> its chunk CRC-32s."""
    import asyncio

    import aetcd
    import msgspec

    from mows.cluster import ChunkCrcs
    from mows.cluster._bitmap import decode_crcs

    async def get() -> list[bytes]:
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        client = aetcd.Client(host=host, port=int(port))
        try:
            got = await client.get_prefix(f"/mows/{cluster}/manifests/{fp}/".encode())
            return [bytes(kv.value) for kv in got]
        finally:
            await client.close()

    pages: dict[int, list[int]] = {}
    for value in asyncio.run(get()):
        assert len(value) <= 64 << 10
        rec = msgspec.msgpack.decode(value, type=ChunkCrcs)
        assert rec.page == 0  # small files: one page each
        pages[rec.file] = decode_crcs(rec.crcs, rec.chunks)
    return pages


def load_all(nodes: list[DaemonProcess], model: Path) -> None:
    load_in_parallel([(d.socket, model) for d in nodes])


def test_cold_simultaneous_load_reads_origin_once(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    model = make_random_model(tmp_path / "m", 48, files=3)
    generate_crc32(model)
    nodes = start_nodes(daemon_factory, etcd, tmp_path, 3)
    load_all(nodes, model)
    statuses = [d.status() for d in nodes]
    size = statuses[0]["models"][0]["bytes"]
    origin = sum(s["bytes_from_origin"] for s in statuses)
    assert origin <= 1.05 * size, [s["bytes_from_origin"] for s in statuses]
    served = [s["bytes_served_to_peers"] for s in statuses]
    assert sum(served) >= (len(nodes) - 1) * size * 0.95
    assert max(served) <= 1.5 * (sum(served) / len(served)), served
    for d in nodes:
        r = client(
            """
            sd = mows.load_state_dict(sys.argv[2], socket=sock, fallback=False)
            print(len(sd))
            """,
            d.socket,
            str(model),
        )
        assert r.returncode == 0, r.stderr
    # bitwise, on every node, in this process
    for d in nodes:
        assert_same_as_files(mows.load_state_dict(model, socket=d.socket, fallback=False), model)
    cl = statuses[0]["cluster"]
    assert cl["healthy"] and len(cl["nodes"]) == 3
    # Each file's chunk CRCs, published once for the cluster, combine to the file's CRC-32.
    pages = stored_crc_pages(etcd.endpoint, "t", cl["models"][0]["fingerprint"])
    files = sorted(p for p in model.iterdir() if p.name != "crc32.txt")
    assert sorted(pages) == list(range(len(files)))
    chunk = cl["models"][0]["chunk_size"]
    for i, path in enumerate(files):
        data = path.read_bytes()
        parts = [data[o : o + chunk] for o in range(0, len(data), chunk)]
        assert pages[i] == [zlib.crc32(p) for p in parts], path
    assert all(n["alive"] for n in cl["nodes"])
    assert cl["models"][0]["min_copies"] >= 1


def test_warm_scale_out_reads_no_origin(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 32, files=2)
    nodes = start_nodes(daemon_factory, etcd, tmp_path, 2)
    load_all(nodes, model)
    new = start_nodes(daemon_factory, etcd, tmp_path, 1)[0]
    _wait(lambda: len(new.status()["cluster"]["nodes"]) == 3)
    with mows.open_model(model, socket=new.socket, fallback=False) as h:
        assert h.stats["bytes_from_origin"] == 0
        assert h.stats["bytes_from_peers"] == h.stats["bytes"]
        assert_same_as_files(h.state_dict(), model)


def test_peer_killed_mid_transfer(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 192, files=2)
    a, b = start_nodes(daemon_factory, etcd, tmp_path, 2)
    load_all([a], model)
    session = Session(b.socket)
    killed = threading.Event()

    def progress(done: int, total: int) -> None:
        if done > 0 and not killed.is_set():
            killed.set()
            assert a.proc is not None
            a.proc.send_signal(signal.SIGKILL)

    ready = session.open(str(model), progress=progress, pin=False)
    session.close()
    assert killed.is_set()
    assert ready.bytes_from_peers + ready.bytes_from_origin == ready.manifest.total_bytes
    assert ready.bytes_from_origin > 0  # the rest came from origin after the peer died
    assert_same_as_files(mows.load_state_dict(model, socket=b.socket, fallback=False), model)
    _wait(lambda: len(b.status()["cluster"]["nodes"]) == 1, timeout=15)


def _rot_one_byte(node: DaemonProcess) -> None:
    shard = next(node.pool_dir.rglob("*.safetensors"))
    with open(shard, "r+b") as f:  # rot one byte of the pool copy behind the daemon's back
        f.seek(3 * 2**20 + 17)
        byte = f.read(1)
        f.seek(3 * 2**20 + 17)
        f.write(bytes([byte[0] ^ 0xFF]))


def wait_published(holder: Any, viewer: Any, nbytes: int) -> None:
    """The holder's records have reached the viewer: its NodeInfo, written a second or so
    after its counters settle, after its holdings (200 ms after a load). Before that, a
    viewer would be a co-owner of the files the holder's last record said it filled."""
    hid = holder.status()["cluster"]["node_id"]

    def seen() -> bool:
        nodes = viewer.status()["cluster"]["nodes"]
        return any(n["id"] == hid and n["used_bytes"] >= nbytes for n in nodes)

    _wait(seen, timeout=15)


def test_corrupt_peer_bytes_are_refetched(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    """A's pool copy rots after A vouched for it (digest computed at fill): B catches the
    chunk by its digest, counts it, and gets exactly that chunk from the origin."""
    model = make_random_model(tmp_path / "m", 16, files=1)
    a, b = start_nodes(daemon_factory, etcd, tmp_path, 2)
    load_all([a], model)
    wait_published(a, b, 16 << 20)
    _rot_one_byte(a)
    with mows.open_model(model, socket=b.socket, fallback=False) as h:
        assert h.stats["bytes_from_origin"] == 2**20  # exactly the bad chunk, again
        assert_same_as_files(h.state_dict(), model)
    st = b.status()
    assert st["corrupt_chunks_from_peers"] == 1
    assert st["peer_failures"] >= 1


def test_rotten_pool_bytes_are_withheld_after_a_restart(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    """After a restart A adopts its pool and computes digests when peers first ask, checking
    each chunk's CRC in the same pass: a chunk that rotted since is withheld and counted,
    nothing bad crosses the wire, and A drops the file (nobody holds it) so its own next open
    fetches it again."""
    model = make_random_model(tmp_path / "m", 16, files=1)
    a, b = start_nodes(daemon_factory, etcd, tmp_path, 2)
    load_all([a], model)
    a.stop(clean=False)
    a.start()
    _wait(lambda: len(b.status()["cluster"]["nodes"]) == 2, timeout=15)
    _wait(lambda: bool(a.status()["cluster"]["models"]), timeout=15)
    _rot_one_byte(a)
    with mows.open_model(model, socket=b.socket, fallback=False) as h:
        assert h.stats["bytes_from_origin"] >= 2**20  # the bad chunk, maybe its whole file
        assert_same_as_files(h.state_dict(), model)
    st = a.status()
    assert st["rotten_chunks_withheld"] == 1 and st["integrity_failures"] == 1
    assert b.status()["corrupt_chunks_from_peers"] == 0
    with mows.open_model(model, socket=a.socket, fallback=False) as h:
        assert h.stats["bytes_from_origin"] + h.stats["bytes_from_peers"] > 0  # dropped
        assert_same_as_files(h.state_dict(), model)


def test_etcd_outage_and_recovery(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    first = make_random_model(tmp_path / "first", 8, files=1, seed=1)
    second = make_random_model(tmp_path / "second", 8, files=1, seed=2)
    a, b = start_nodes(daemon_factory, etcd, tmp_path, 2)
    load_all([a, b], first)
    etcd.stop()
    _wait(lambda: not b.status()["cluster"]["healthy"], timeout=15)
    # Local clients are still served; new loads fall back to origin.
    assert_same_as_files(mows.load_state_dict(first, socket=a.socket, fallback=False), first)
    with mows.open_model(second, socket=b.socket, fallback=False) as h:
        assert h.stats["bytes_from_origin"] == h.stats["bytes"]
        assert_same_as_files(h.state_dict(), second)
    etcd.start()
    _wait(lambda: all(d.status()["cluster"]["healthy"] for d in (a, b)), timeout=30)
    _wait(lambda: len(a.status()["cluster"]["nodes"]) == 2, timeout=15)
    # After recovery, A gets the second model from B, not from origin.
    with mows.open_model(second, socket=a.socket, fallback=False) as h:
        assert h.stats["bytes_from_origin"] == 0


def test_wrong_secret_is_refused(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    good = tmp_path / "good.secret"
    good.write_text("correct horse battery staple")
    bad = tmp_path / "bad.secret"
    bad.write_text("incorrect horse battery staple")
    model = make_random_model(tmp_path / "m", 8, files=1)
    a = start_nodes(daemon_factory, etcd, tmp_path, 1, "--cluster-secret-file", str(good))[0]
    load_all([a], model)
    b = start_nodes(daemon_factory, etcd, tmp_path, 1, "--cluster-secret-file", str(bad))[0]
    _wait(lambda: len(b.status()["cluster"]["nodes"]) == 2)
    with mows.open_model(model, socket=b.socket, fallback=False) as h:
        assert h.stats["bytes_from_peers"] == 0
        assert h.stats["bytes_from_origin"] == h.stats["bytes"]
    assert b.status()["peer_failures"] >= 1
    assert a.status()["bytes_served_to_peers"] == 0


@pytest.mark.parametrize("n", [4])
def test_four_nodes_balance(daemon_factory: Any, etcd: Any, tmp_path: Path, n: int) -> None:
    model = make_random_model(tmp_path / "m", 64, files=4)
    nodes = start_nodes(daemon_factory, etcd, tmp_path, n)
    load_all(nodes, model)
    statuses = [d.status() for d in nodes]
    size = statuses[0]["models"][0]["bytes"]
    assert sum(s["bytes_from_origin"] for s in statuses) <= 1.05 * size
    served = [s["bytes_served_to_peers"] for s in statuses]
    assert max(served) <= 1.5 * sum(served) / n, served
    # Holdings are published in batches: the directory converges to n copies of every chunk.
    _wait(lambda: min(nodes[0].status()["cluster"]["models"][0]["copies"]) == n, timeout=10)


def test_ucx_transport_in_the_daemon(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    pytest.importorskip("ucxx", reason="--nic ucx needs the mows[ucx] extra")
    secret = tmp_path / "secret"
    secret.write_text("a shared secret of some length")
    model = make_random_model(tmp_path / "m", 16, files=2)
    nodes = start_nodes(
        daemon_factory, etcd, tmp_path, 2, "--nic", "ucx", "--cluster-secret-file", str(secret)
    )
    load_all(nodes[:1], model)
    wait_published(nodes[0], nodes[1], 16 << 20)  # else B co-owns, and reads, half of it
    with mows.open_model(model, socket=nodes[1].socket, fallback=False) as h:
        assert h.stats["bytes_from_peers"] == h.stats["bytes"]
        assert_same_as_files(h.state_dict(), model)


def test_eviction_keeps_the_clusters_last_copies(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    x = make_random_model(tmp_path / "x", 8, files=1, seed=1)
    y = make_random_model(tmp_path / "y", 8, files=1, seed=2)
    z = make_random_model(tmp_path / "z", 8, files=1, seed=3)
    a = start_nodes(daemon_factory, etcd, tmp_path, 1, "--max-memory", "18MiB")[0]
    b = start_nodes(daemon_factory, etcd, tmp_path, 1)[0]
    _wait(lambda: len(a.status()["cluster"]["nodes"]) == 2)
    load_all([b], x)
    load_all([a], y)  # y: only A has it, and it is the least recently used
    load_all([a], x)  # x: B holds it too
    _wait(lambda: min(m["min_copies"] for m in a.status()["cluster"]["models"]) >= 1)
    _wait(lambda: any(m["min_copies"] == 2 for m in a.status()["cluster"]["models"]))
    load_all([a], z)  # needs room: LRU would drop y, the cluster's only copy
    st = a.status()
    cached = {m["path"]: m["cached_fraction"] for m in st["models"]}
    assert cached[str(y)] == 1.0 and cached[str(z)] == 1.0
    assert cached[str(x)] < 1.0
    x_bytes = sum(f.stat().st_size for f in x.iterdir())
    assert st["evictions"] >= 1 and 0 < st["evicted_bytes"] <= x_bytes
    assert st["evicted_last_copy_bytes"] == 0


def test_cold_load_origin_reads_follow_the_bounded_owner_table(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    """Each chunk is read from the origin by its owner in the bounded-load table: no node
    reads much more than its share (plain rendezvous: up to ~1.4x on so few chunks)."""
    model = make_random_model(tmp_path / "m", 64, files=4)
    nodes = start_nodes(daemon_factory, etcd, tmp_path, 4)
    load_all(nodes, model)
    statuses = [d.status() for d in nodes]
    size = statuses[0]["models"][0]["bytes"]
    origin = [s["bytes_from_origin"] for s in statuses]
    assert sum(origin) <= 1.05 * size, origin
    assert max(origin) <= 1.2 * size / 4 + (1 << 20), origin  # + one 1 MiB chunk


def test_a_node_that_evicted_a_model_is_not_waited_on(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    """A loads M1, then M2 evicts it: A deletes its holding of M1 (read back from etcd), so
    B's cold load of M1 owns every chunk itself instead of waiting peer_timeout for A."""
    import asyncio
    import time

    import aetcd

    m1 = make_random_model(tmp_path / "m1", 16, files=1, seed=1)
    m2 = make_random_model(tmp_path / "m2", 16, files=1, seed=2)
    common = ["--etcd", etcd.endpoint, "--cluster", "t", *FAST]
    a = daemon_factory(roots=[tmp_path], max_memory="24MiB", extra=common)
    b = daemon_factory(roots=[tmp_path], extra=common)
    _wait(lambda: all(len(d.status()["cluster"]["nodes"]) == 2 for d in (a, b)), timeout=15)
    with mows.open_model(m1, socket=a.socket, fallback=False) as h:
        v1 = h.version
    with mows.open_model(m2, socket=a.socket, fallback=False) as h:
        assert h.stats["bytes"] > 0
    a_id = a.status()["cluster"]["node_id"]

    async def holders_of_m1() -> list[bytes]:
        host, _, port = etcd.endpoint.removeprefix("http://").rpartition(":")
        client = aetcd.Client(host=host, port=int(port))
        try:
            got = await client.get_prefix(f"/mows/t/holdings/{v1}/".encode())
            return [bytes(kv.key) for kv in got]
        finally:
            await client.close()

    _wait(lambda: not any(k.endswith(a_id.encode()) for k in asyncio.run(holders_of_m1())))
    start = time.monotonic()
    with mows.open_model(m1, socket=b.socket, fallback=False) as h:
        assert h.version == v1
        assert h.stats["bytes_from_origin"] == h.stats["bytes"]
        assert_same_as_files(h.state_dict(), m1)
    assert time.monotonic() - start < 4  # FAST's peer_timeout is 5 s


def _deleted_pool_fds(pid: int, pool: Path) -> dict[str, int]:
    """The pool files ``pid`` holds a descriptor on after they were unlinked: path -> the
    bytes of shared memory each still occupies (outside the pool's directory, not outside
    its filesystem)."""
    held: dict[str, int] = {}
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(fd)
            if target.startswith(str(pool)) and target.endswith(" (deleted)"):
                held[target] = os.stat(fd).st_blocks * 512
    return held


def test_an_evicted_file_leaves_no_descriptor_in_the_daemon(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    """A peer is sent a chunk of M1 (and stops reading mid-chunk) when a load needs room
    and M1 is the least recently used: the daemon evicts another file instead of unlinking
    one it is sending from (whose pages its descriptor would keep past the cap); the
    transfer then completes, whole."""
    models = [make_random_model(tmp_path / f"m{i}", 24, files=1, seed=i) for i in range(3)]
    cap = 56 * 2**20
    (a,) = start_nodes(
        daemon_factory, etcd, tmp_path, 1, "--max-memory", "56MiB", "--chunk-size", "16MiB"
    )
    assert a.proc is not None
    mows_load(a.socket, models[0])
    mows_load(a.socket, models[1])  # M1 is now the least recently used
    st = a.status()
    fp = next(m["fingerprint"] for m in st["cluster"]["models"] if m["path"] == str(models[0]))
    address = st["cluster"]["nodes"][0]["address"]
    host, _, port = address.rpartition(":")
    shard = "model-00000-of-00001.safetensors"

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # a slow reader's window
    sock.settimeout(30)
    sock.connect((host, int(port)))
    try:
        _, channel = client_handshake(sock, "slow-reader", None, address)
        send_peer(sock, ChunkRequest(fp, shard, 0), channel)
        header = recv_peer(sock, channel)
        assert isinstance(header, ChunkHeader) and header.length == 16 << 20
        got = bytearray()
        while len(got) < 1 << 20:  # a MiB, then the reader stalls mid-chunk
            got += sock.recv((1 << 20) - len(got))
        time.sleep(0.5)  # the server's sendfile blocks on the full window

        mows_load(a.socket, models[2])  # needs room: evicts one of M1, M2
        st = a.status()
        assert st["evictions"] >= 1 and st["used_bytes"] <= cap
        leaked = _deleted_pool_fds(a.proc.pid, a.pool_dir)
        assert not leaked, f"descriptors on evicted pool files: {leaked}"
        assert _pool_bytes(a.pool_dir) + sum(leaked.values()) <= cap
        assert (a.pool_dir / fp / shard).exists()  # the file being sent stayed
        cached = {m["path"]: m["cached_fraction"] for m in st["models"]}
        assert cached[str(models[1])] < 0.5 and cached[str(models[2])] == 1.0

        while len(got) < header.length:  # the reader resumes: the chunk arrives whole
            part = sock.recv(min(1 << 20, header.length - len(got)))
            assert part, f"connection closed after {len(got)} bytes"
            got += part
        assert zlib.crc32(got) == header.crc
    finally:
        sock.close()
    # The send ended: M1's file is evictable again (the least recently used), and goes
    # without a trace.
    mows_load(a.socket, models[1])
    assert not (a.pool_dir / fp / shard).exists()
    assert not _deleted_pool_fds(a.proc.pid, a.pool_dir)
    assert _pool_bytes(a.pool_dir) <= cap


def test_a_chunk_that_changed_owner_is_asked_of_its_previous_owner(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    """A loads alone, so it owns every chunk; B joins half way and comes to own half of
    them, among them chunks A read already. B asks the previous owner for those, instead
    of reading them from the origin a second time."""
    model = make_random_model(tmp_path / "m", 32, files=2)
    generate_crc32(model)
    size = sum(p.stat().st_size for p in model.iterdir() if p.name != "crc32.txt")
    files = {f"/m/{p.name}": p.read_bytes() for p in model.iterdir()}
    # Before: every moved chunk A had read, or had queued for the origin, left it again
    # (1.19x-1.44x here); now only those in flight at A when the owners changed (at most its
    # 4 streams' chunks, 4 MiB). Where A's reads are when B comes is timing: in about one run
    # in 20 (more on a loaded VM) the bound is missed by a few MiB, so the scenario runs
    # again, on new daemons, once; the old behaviour misses it every time.
    runs = []
    for _ in range(2):
        runs.append(_b_joins_half_way(daemon_factory, etcd, model, files, size))
        origin, witness, from_peers = runs[-1]
        if origin <= size + (5 << 20) and size <= witness <= size + (5 << 20):
            break
    assert origin <= size + (5 << 20), (runs, size)
    assert size <= witness <= size + (5 << 20), (runs, size)
    assert from_peers >= size * 0.5


def _b_joins_half_way(
    daemon_factory: Any, etcd: Any, model: Path, files: dict[str, bytes], size: int
) -> tuple[int, int, int]:
    """A loads from a throttled origin; B loads once A has half. The origin bytes by the
    daemons' counters and by the origin's own count, and B's bytes from peers; the
    daemons are stopped after."""
    with http_site(files, {}, rate=4 << 20) as (base, _, sent):  # ~16 MiB/s over 4 streams
        url = f"{base}/m"
        a, b = start_nodes(daemon_factory, etcd, base, 2, "--chunk-size", "1")
        done: list[dict[str, Any]] = []
        errors: list[BaseException] = []

        def load_a() -> None:
            try:
                done.extend(load_in_parallel([(a.socket, url)]))
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=load_a)
        t.start()
        try:
            _wait(lambda: a.status()["bytes_from_origin"] >= size * 0.5, timeout=30)
            got = load_in_parallel([(b.socket, url)])[0]
        finally:
            t.join(60)
        assert not errors, errors
        assert done and got["bytes"] == size
        assert_same_as_files(mows.load_state_dict(url, socket=b.socket, fallback=False), model)
        # The origin's own count of the model's bytes it sent (crc32.txt aside: each open
        # reads it).
        witness = sum(n for path, n in sent.items() if not path.endswith("/crc32.txt"))
    origin = a.status()["bytes_from_origin"] + b.status()["bytes_from_origin"]
    for d in (a, b):
        d.stop()
    return origin, witness, got["bytes_from_peers"]
