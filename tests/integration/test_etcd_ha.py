"""etcd high availability with real etcd members on loopback and real daemons: the leader
dies in the middle of a cold cluster load, and a directory larger than gRPC's default 4 MiB
reply is read on connect and again on a reconnect."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mows
from mows.client import Session
from tests.daemons import LOAD, DaemonProcess, generate_crc32, make_random_model
from tests.etcd_cluster import EtcdCluster
from tests.integration.test_cluster import FAST
from tests.integration.test_daemon import _wait, assert_same_as_files

GRPC_LIMIT = 64 * 2**20  # for this test's own etcd client: replies past gRPC's 4 MiB default


# Tests take etcd before daemon_factory: fixtures are torn down in reverse, so the daemons
# stop (revoking their leases) while etcd still answers.
@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three real etcd members on loopback, stopped at teardown."""
    base = tmp_path / "etcd"
    base.mkdir()
    cluster = EtcdCluster(base, 3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _status(d: DaemonProcess) -> dict[str, Any]:
    """The daemon's status over its socket, in this process (cheaper than ``mows status``)."""
    s = Session(d.socket)
    try:
        return s.status()
    finally:
        s.close()


def _etcd_prefix(endpoint: str, prefix: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) under ``prefix``, read with a plain etcd client."""
    import aetcd

    async def get() -> list[tuple[bytes, bytes]]:
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        client = aetcd.Client(
            host=host,
            port=int(port),
            timeout=10,
            options={"grpc.max_receive_message_length": GRPC_LIMIT},
        )
        try:
            return [
                (bytes(kv.key), bytes(kv.value)) for kv in await client.get_prefix(prefix.encode())
            ]
        finally:
            await client.close()

    return asyncio.run(get())


def _logs(nodes: list[DaemonProcess], tail: int = 4000) -> str:
    return "\n".join(f"--- {d.log_path.name}\n{d.log()[-tail:]}" for d in nodes)


def test_leader_killed_during_cold_load(
    etcd_cluster: EtcdCluster, daemon_factory: Any, tmp_path: Path
) -> None:
    """Four daemons, each connected first to the etcd leader, load one model cold at once;
    the leader is SIGKILLed once bytes flow. Every load completes with the right bytes, the
    origin is still read about once in all, and every daemon fails over to a survivor."""
    model = make_random_model(tmp_path / "m", 96, files=3)
    generate_crc32(model)
    lead = etcd_cluster.leader()
    endpoints = etcd_cluster.endpoints
    ordered = [endpoints[lead], *(e for i, e in enumerate(endpoints) if i != lead)]
    extra = ["--etcd", ",".join(ordered), "--cluster", "ha", *FAST]
    nodes = [daemon_factory(roots=[tmp_path], extra=extra) for _ in range(4)]
    _wait(lambda: all(len(_status(d)["cluster"]["nodes"]) == 4 for d in nodes), timeout=20)
    errors_before = [_status(d)["cluster"]["etcd_errors"] for d in nodes]

    started = time.monotonic()
    loads = [
        subprocess.Popen(
            [*LOAD, "--socket", d.socket, str(model)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in nodes
    ]
    try:
        sessions = [Session(d.socket) for d in nodes]
        try:

            def bytes_flowing() -> bool:
                for s in sessions:
                    st = s.status()
                    if st["bytes_from_origin"] or st["bytes_from_peers"]:
                        return True
                return False

            _wait(bytes_flowing, timeout=30)
        finally:
            for s in sessions:
                s.close()
        etcd_cluster.kill(lead)
        killed_at = time.monotonic() - started
        running = sum(p.poll() is None for p in loads)
        outputs = [p.communicate(timeout=45) for p in loads]
    finally:
        for p in loads:
            if p.poll() is None:
                p.kill()
                p.wait()
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()
    elapsed = time.monotonic() - started
    failed = [
        f"{nodes[i].log_path.name}: rc {p.returncode}: {err[-2000:]}"
        for i, (p, (_, err)) in enumerate(zip(loads, outputs, strict=True))
        if p.returncode != 0
    ]
    assert not failed, "\n".join(failed) + "\n" + _logs(nodes)
    assert running > 0, f"every load ended before the leader died ({killed_at:.2f}s in)"
    summaries = [json.loads(out) for out, _ in outputs]
    print(f"leader killed {killed_at:.2f}s in, {running}/4 loads running; done {elapsed:.2f}s")
    print("summaries:", summaries)

    statuses = [_status(d) for d in nodes]
    size = statuses[0]["models"][0]["bytes"]
    assert size == sum(f.stat().st_size for f in model.iterdir() if f.name != "crc32.txt")
    for st in statuses:
        (m,) = st["models"]
        assert m["bytes"] == size and m["cached_bytes"] == size, m
    # bitwise, on every node
    for d in nodes:
        assert_same_as_files(mows.load_state_dict(model, socket=d.socket, fallback=False), model)

    # Every daemon started on the leader: it failed over, and is healthy on a survivor.
    def recovered() -> bool:
        clusters = [_status(d)["cluster"] for d in nodes]
        return all(c["healthy"] and len(c["nodes"]) == 4 for c in clusters)

    try:
        _wait(recovered, timeout=30)
    except AssertionError:
        clusters = [_status(d)["cluster"] for d in nodes]
        raise AssertionError(
            f"not healthy again: {[(c['healthy'], len(c['nodes'])) for c in clusters]}\n"
            + _logs(nodes)
        ) from None
    print(f"all healthy again {time.monotonic() - started - killed_at:.2f}s after the kill")
    assert not etcd_cluster.alive(lead)
    for d, before in zip(nodes, errors_before, strict=True):
        cl = _status(d)["cluster"]
        assert cl["etcd_errors"] > before, (cl["etcd_errors"], before)
        assert cl["etcd_last_error"] == ""
    survivor = next(e for i, e in enumerate(endpoints) if i != lead)
    registered = _etcd_prefix(survivor, "/mows/ha/nodes/")
    ids = sorted(_status(d)["cluster"]["node_id"] for d in nodes)
    assert sorted(k.decode().rpartition("/")[2] for k, _ in registered) == ids
    # Last, the cost: the origin was still read about once in all, failover or not.
    origin = [st["bytes_from_origin"] for st in statuses]
    peers = [st["bytes_from_peers"] for st in statuses]
    print(f"origin {sum(origin) / size:.2f}x the model: from origin {origin}, peers {peers}")
    assert sum(origin) <= 1.2 * size, (
        f"origin read {sum(origin) / size:.2f}x the model ({size} bytes): from origin {origin},"
        f" from peers {peers}; leader killed {killed_at:.2f}s in, loads done {elapsed:.2f}s\n"
        + _logs(nodes)
    )


FAKE_NODES = 1600
ID_BYTES = 2900  # ~3 KB NodeInfo records: 1600 of them, ~4.6 MiB


def _write_fake_nodes(endpoint: str, cluster: str) -> None:
    """FAKE_NODES valid NodeInfo records of ~3 KB under ``/mows/<cluster>/nodes/``: long
    ids, addresses on the discard port of loopback (nothing listens; nothing is sent)."""
    import aetcd
    import msgspec

    from mows.cluster import NodeInfo

    enc = msgspec.msgpack.Encoder()

    async def put_all() -> None:
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        client = aetcd.Client(host=host, port=int(port), timeout=30)
        gate = asyncio.Semaphore(64)

        async def put(n: int) -> None:
            node = f"fake-{n:05d}-" + "x" * ID_BYTES
            info = NodeInfo(node, "127.0.0.1:9", 2**30, used=n)
            async with gate:
                await client.put(f"/mows/{cluster}/nodes/{node}".encode(), enc.encode(info))

        try:
            await asyncio.gather(*(put(n) for n in range(FAKE_NODES)))
        finally:
            await client.close()

    asyncio.run(put_all())


def test_directory_over_4_mib_reconnects(etcd: Any, daemon_factory: Any, tmp_path: Path) -> None:
    """The node records a daemon reads on connect weigh more than gRPC's default 4 MiB
    reply limit: the daemon becomes healthy, reads them all, and again after etcd restarts."""
    _write_fake_nodes(etcd.endpoint, "big")
    records = _etcd_prefix(etcd.endpoint, "/mows/big/nodes/")
    assert len(records) == FAKE_NODES
    value_bytes = sum(len(v) for _, v in records)
    assert value_bytes > 4 * 2**20, value_bytes
    print(f"{len(records)} node records, {value_bytes / 2**20:.2f} MiB of values")

    started = time.monotonic()
    d = daemon_factory(roots=[tmp_path], extra=["--etcd", etcd.endpoint, "--cluster", "big", *FAST])

    def healthy() -> bool:
        cl = _status(d)["cluster"]
        return bool(cl["healthy"])

    def read_all(cl: dict[str, Any]) -> bool:
        # every fake record was read: taken as a node, or rejected as a bad record
        return bool(len(cl["nodes"]) - 1 + cl["directory_rejected"] >= FAKE_NODES)

    try:
        _wait(healthy, timeout=20)
    except AssertionError:
        raise AssertionError(f"never healthy: {_status(d)['cluster']}\n{d.log()[-4000:]}") from None
    print(f"healthy {time.monotonic() - started:.2f}s after start")
    cl = _status(d)["cluster"]
    assert read_all(cl), (len(cl["nodes"]), cl["directory_rejected"])
    errors = cl["etcd_errors"]
    rejected = cl["directory_rejected"]

    etcd.stop()
    _wait(lambda: not _status(d)["cluster"]["healthy"], timeout=15)
    etcd.start()
    restarted = time.monotonic()
    try:
        _wait(healthy, timeout=20)
    except AssertionError:
        raise AssertionError(
            f"not healthy after etcd restarted: {_status(d)['cluster']}\n{d.log()[-4000:]}"
        ) from None
    print(f"healthy again {time.monotonic() - restarted:.2f}s after etcd restarted")
    cl = _status(d)["cluster"]
    assert cl["etcd_errors"] > errors
    assert read_all(cl) and cl["directory_rejected"] >= rejected
    # the daemon re-registered next to the fake records
    assert any(
        k.endswith(cl["node_id"].encode())
        for k, _ in _etcd_prefix(etcd.endpoint, "/mows/big/nodes/")
    )
