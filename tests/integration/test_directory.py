"""The cluster directory at scale, with a real etcd and real daemons: an idle cluster writes
nothing to etcd, and an etcd outage degrades to the last view instead of sending every load to
the origin."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

import mows
from tests.daemons import (
    DaemonProcess,
    TcpProxy,
    etcd_metric,
    load_in_parallel,
    make_random_model,
)
from tests.integration.test_cluster import FAST, start_nodes
from tests.integration.test_daemon import _wait, assert_same_as_files

PUTS = "etcd_mvcc_put_total"


def _puts_over(etcd: Any, seconds: float) -> int:
    before = etcd_metric(etcd, PUTS)
    time.sleep(seconds)
    return int(etcd_metric(etcd, PUTS) - before)


def _sees_settled(observer: DaemonProcess, holder: DaemonProcess, nbytes: int) -> None:
    """Wait until ``observer`` has ``holder``'s final NodeInfo: it is written after the
    holding (counters settle last), so the holding is known too."""

    def seen() -> bool:
        nodes = observer.status()["cluster"]["nodes"]
        me = holder.status()["cluster"]["node_id"]
        return any(n["id"] == me and n["bytes_from_origin"] == nbytes for n in nodes)

    _wait(seen, timeout=15)


def _reconnected(*nodes: DaemonProcess) -> None:
    def connected() -> bool:
        clusters = [d.status()["cluster"] for d in nodes]
        return all(c["healthy"] and len(c["nodes"]) == len(nodes) for c in clusters)

    _wait(connected, timeout=30)


def test_idle_cluster_writes_nothing(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 16, files=2)
    a, b = start_nodes(daemon_factory, etcd, tmp_path, 2)
    time.sleep(2)  # both registered: let the start settle
    idle = _puts_over(etcd, 10)
    assert idle == 0, f"{idle} puts in 10 s from an idle cluster"
    before = etcd_metric(etcd, PUTS)
    load_in_parallel([(a.socket, model)])
    load_in_parallel([(b.socket, model)])  # from A
    time.sleep(3)  # holdings flush at once, node counters once they settle
    during = int(etcd_metric(etcd, PUTS) - before)
    assert during > 0
    after = _puts_over(etcd, 10)
    assert after == 0, f"{after} puts in the 10 s after the loads ({during} for them)"
    print(f"puts: idle {idle}/10s, loads {during}, after {after}/10s")


def test_etcd_outage_keeps_the_view(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 16, files=2)
    a, b = start_nodes(daemon_factory, etcd, tmp_path, 2)
    load_in_parallel([(a.socket, model)])
    size = a.status()["models"][0]["bytes"]
    _sees_settled(b, a, size)
    etcd.stop()
    _wait(lambda: b.status()["cluster"]["degraded"], timeout=15)
    # B never loaded this model: it knows A's holding from the watch, and gets it all from A.
    with mows.open_model(model, socket=b.socket, fallback=False) as h:
        assert h.stats["bytes_from_origin"] == 0
        assert h.stats["bytes_from_peers"] == h.stats["bytes"] == size
        assert_same_as_files(h.state_dict(), model)
    cl = b.status()["cluster"]
    assert cl["degraded"] and not cl["healthy"] and cl["degraded_seconds"] > 0
    assert len(cl["nodes"]) == 2  # the last view, kept
    # Past the grace (15 s here) the view is dropped: loads use the origin, as without a view.
    _wait(lambda: not b.status()["cluster"]["degraded"], timeout=30)
    cl = b.status()["cluster"]
    assert not cl["healthy"] and [n["id"] for n in cl["nodes"]] == [cl["node_id"]]
    etcd.start()
    _reconnected(a, b)
    assert not b.status()["cluster"]["degraded"]


def test_etcd_hiccup_during_a_load(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    """etcd freezes (SIGSTOP) for 3 s as B's load begins: B cannot read the directory (it
    knows A's holding from the watch) nor publish, and still gets everything from A."""
    model = make_random_model(tmp_path / "m", 96, files=2)
    a, b = start_nodes(daemon_factory, etcd, tmp_path, 2)
    load_in_parallel([(a.socket, model)])
    _sees_settled(b, a, a.status()["models"][0]["bytes"])
    assert etcd.proc is not None
    etcd.proc.send_signal(signal.SIGSTOP)
    thaw = threading.Timer(3, etcd.proc.send_signal, (signal.SIGCONT,))
    thaw.start()
    try:
        with mows.open_model(model, socket=b.socket, fallback=False) as h:
            assert h.stats["bytes_from_origin"] == 0
            assert h.stats["bytes_from_peers"] == h.stats["bytes"]
    finally:
        thaw.join()
    _reconnected(a, b)
    assert b.status()["bytes_from_origin"] == 0
    assert_same_as_files(mows.load_state_dict(model, socket=b.socket, fallback=False), model)


def test_peers_expired_in_an_outage_are_still_tried(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    """etcd freezes past the lease TTL: every lease expires. B reconnects first (A's network
    to etcd stays cut), so A is missing from B's new view; until A re-registers B still tries
    it as a holder of what it held, instead of reading the origin."""
    model = make_random_model(tmp_path / "m", 16, files=2)
    proxy = TcpProxy(etcd.client_port)
    try:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        a = daemon_factory(roots=[tmp_path], extra=["--etcd", endpoint, "--cluster", "t", *FAST])
        b = start_nodes(daemon_factory, etcd, tmp_path, 1)[0]
        _wait(lambda: len(b.status()["cluster"]["nodes"]) == 2, timeout=15)
        load_in_parallel([(a.socket, model)])
        _sees_settled(b, a, a.status()["models"][0]["bytes"])
        assert etcd.proc is not None
        etcd.proc.send_signal(signal.SIGSTOP)
        proxy.cut()
        time.sleep(3)  # past the 2 s TTL
        etcd.proc.send_signal(signal.SIGCONT)
        _wait(lambda: b.status()["cluster"]["healthy"], timeout=30)
        _wait(lambda: len(b.status()["cluster"]["nodes"]) == 1, timeout=15)  # A expired
        with mows.open_model(model, socket=b.socket, fallback=False) as h:
            assert h.stats["bytes_from_origin"] == 0
            assert h.stats["bytes_from_peers"] == h.stats["bytes"]
        proxy.restore()
        _reconnected(a, b)
    finally:
        proxy.close()


def test_holdings_seen_before_a_join_are_known_at_once() -> None:
    """Holdings of a model not joined are kept raw as the watch brings them: a later join
    (with etcd out, say) knows the holders without asking etcd; deleted ones are forgotten."""
    from mows.cluster import Cluster, Holding, NodeInfo
    from mows.cluster._bitmap import encode_bitmap
    from mows.cluster._directory import _enc
    from tests.daemons import make_manifest

    c = Cluster(["http://127.0.0.1:1"], "t", lambda: NodeInfo("me", "127.0.0.1:1", 100))
    c.healthy = True

    def put(key: str, value: bytes, deleted: bool = False) -> None:
        c._apply(c.prefix + key.encode(), value, 1, deleted=deleted)

    for node in ("peer", "gone"):
        put(f"nodes/{node}", _enc.encode(NodeInfo(node, "127.0.0.1:2", 100)))
        rec = Holding(
            node, 4, encode_bitmap({1, 2}, 4), encode_bitmap({3}, 4), encode_bitmap({0}, 4)
        )
        put(f"holdings/fp/{node}", _enc.encode(rec))
    put("holdings/fp/gone", b"", deleted=True)
    c.join("fp", make_manifest(4))
    assert c.holders("fp", 1) == ["peer"] and c.holders("fp", 0) == []
    assert c.partial_holders("fp", 3) == ["peer"] and c.state("fp", "peer", 0).loading
    assert c.interested("fp") == {"me", "peer"}
    c.healthy, c.degraded = False, True  # etcd lost: the view is kept
    assert c.view_usable and c.holders("fp", 2) == ["peer"]


def test_a_version_joined_late_is_read_before_it_is_filled(etcd: Any) -> None:
    """B joins a version A published before B connected: its fill waits for those records
    (``records_read``), or it would take itself for the version's only member: the first
    file of every peer load waited 0.6 s as on a cold cluster (bench/peer.py)."""
    import asyncio

    from mows.cluster import Cluster, NodeInfo
    from tests.daemons import make_manifest

    async def run() -> None:
        manifest = make_manifest(4)
        a = Cluster([etcd.endpoint], "late", lambda: NodeInfo("a", "127.0.0.1:2", 100))
        b = Cluster([etcd.endpoint], "late", lambda: NodeInfo("b", "127.0.0.1:3", 100))
        try:
            a.start()
            assert await a.wait_healthy(10)
            a.join("fp", manifest)
            for f in range(4):
                a.file_complete("fp", f)
            deadline = time.monotonic() + 10
            while a._written.get("fp") is None:  # A's holding is in etcd
                assert time.monotonic() < deadline, "A never published its holding"
                await asyncio.sleep(0.05)
            b.start()
            assert await b.wait_healthy(10)
            b.join("fp", manifest)  # known to B only once read from etcd
            await b.records_read("fp", 10)
            assert b.anyone_holds("fp")
            assert b.holders("fp", 3) == ["a"]
        finally:
            await b.close()
            await a.close()

    asyncio.run(run())


def _table_cluster(etcd: Any, cluster: str, name: str, port: int, **kw: Any) -> Any:
    """A real ``Cluster`` on ``etcd`` publishing fast, for the owner-table tests."""
    from mows.cluster import Cluster, NodeInfo

    return Cluster(
        [etcd.endpoint],
        cluster,
        lambda: NodeInfo(name, f"127.0.0.1:{port}", 100),
        publish_interval=0.05,
        **kw,
    )


async def _members_seen(cl: Any, want: set[str]) -> None:
    """Until ``cl`` sees exactly ``want`` as the members of version "fp", and a little more
    (its own record back from the watch too)."""
    import asyncio

    deadline = time.monotonic() + 15
    while cl.interested("fp") != want:
        assert time.monotonic() < deadline, (cl.node_id, cl.interested("fp"), want)
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)


def _owners(cl: Any) -> list[str]:
    return [cl.chunk_owner("fp", i) for i in range(300)]


def test_owner_tables_shrink_alike_when_members_leave(etcd: Any) -> None:
    """Four real Clusters on one etcd load a version; one's fills end and another's lease
    is revoked. Every node that stays computes the same table, shrunk from the first: a
    chunk of a member that stays stays with it. One looking up owners only at the end gets
    the same table as one that looked at every step, or one that read the view again; a
    member coming computes it whole."""
    import asyncio

    from mows.cluster._placement import owner_table, shrunk_table
    from tests.daemons import make_manifest

    manifest = make_manifest(6, chunks=50, chunk_size=64)
    names = ["a", "b", "c", "d"]

    def new(name: str, port: int) -> Any:
        return _table_cluster(etcd, "shrink", name, port)

    members_seen, table = _members_seen, _owners

    async def run() -> None:
        nodes = {n: new(n, 2 + i) for i, n in enumerate(names)}
        try:
            for cl in nodes.values():
                cl.start()
                assert await cl.wait_healthy(10)
                cl.join("fp", manifest)
                cl.begin_loading("fp", list(range(6)))
            for cl in nodes.values():
                await members_seen(cl, set(names))
            everyone = [(n, 100.0) for n in names]
            base = owner_table("fp", 300, everyone)
            assert table(nodes["a"]) == table(nodes["b"]) == base
            nodes["d"].end_loading("fp", list(range(6)))  # its fills end: not a member
            for n in "ab":
                await members_seen(nodes[n], {"a", "b", "c"})
            assert table(nodes["a"]) == shrunk_table("fp", base, everyone[:3])
            await nodes.pop("c").close()  # its lease revoked: its records go
            for n in "ab":
                await members_seen(nodes[n], {"a", "b"})
            want = shrunk_table("fp", base, everyone[:2])
            assert table(nodes["a"]) == want  # a looked at every step, b only now
            assert table(nodes["b"]) == want
            assert all(o == w for o, w in zip(base, want, strict=True) if o in "ab")
            await nodes["b"]._load_snapshot()  # a reconnect reads the whole view again
            assert table(nodes["b"]) == want  # none came meanwhile: still the same base
            nodes["e"] = e = new("e", 9)
            e.start()
            assert await e.wait_healthy(10)
            e.join("fp", manifest)
            e.begin_loading("fp", [0])
            for n in "abe":
                await members_seen(nodes[n], {"a", "b", "e"})
            whole = owner_table("fp", 300, [("a", 100.0), ("b", 100.0), ("e", 100.0)])
            assert table(nodes["a"]) == table(nodes["b"]) == table(e) == whole
        finally:
            for cl in nodes.values():
                await cl.close()

    asyncio.run(run())


def test_a_node_back_under_its_old_id_is_a_member_coming_for_all(etcd: Any) -> None:
    """A node killed and started again within its lease's TTL writes over its old records:
    the others would see no member come while it has no view of when one last came. Its
    first write makes it come for all (its old record deleted first): every node computes
    the table whole. The same when a node leaves a version and comes back within a publish
    tick (nothing was written in between)."""
    import asyncio

    from mows.cluster._placement import owner_table
    from tests.daemons import make_manifest

    manifest = make_manifest(6, chunks=50, chunk_size=64)

    def new(name: str, port: int) -> Any:
        return _table_cluster(etcd, "back", name, port, ttl=60)

    members_seen, table = _members_seen, _owners

    async def load(cl: Any) -> None:
        cl.start()
        assert await cl.wait_healthy(10)
        cl.join("fp", manifest)
        cl.begin_loading("fp", list(range(6)))

    async def run() -> None:
        nodes = {n: new(n, 2 + i) for i, n in enumerate("abcd")}
        try:
            for cl in nodes.values():
                await load(cl)
            for cl in nodes.values():
                await members_seen(cl, set("abcd"))
                table(cl)
            nodes["d"].end_loading("fp", list(range(6)))  # a member leaves: tables shrink
            for n in "abc":
                await members_seen(nodes[n], set("abc"))
                table(nodes[n])
            old = nodes.pop("c")  # killed: its lease (60 s) and records outlive it
            assert old._task is not None
            old._task.cancel()
            with contextlib.suppress(BaseException):
                await old._task
            await old._drop_client()
            await load(c := nodes.setdefault("c", new("c", 4)))  # back, same id
            await asyncio.sleep(1.0)
            for n in "abc":
                await members_seen(nodes[n], set("abc"))
            whole = owner_table("fp", 300, [(n, 100.0) for n in "abc"])
            assert table(nodes["a"]) == table(nodes["b"]) == table(c) == whole
            nodes["b"].end_loading("fp", list(range(6)))  # another leaves: they shrink
            for n in "ac":
                await members_seen(nodes[n], set("ac"))
            assert table(nodes["a"]) == table(c)
            a = nodes["a"]
            a.end_loading("fp", list(range(6)))
            a.leave("fp")  # and back within a publish tick
            a.join("fp", manifest)
            a.begin_loading("fp", list(range(6)))
            await asyncio.sleep(1.0)
            for n in "ac":
                await members_seen(nodes[n], set("ac"))
            pair = owner_table("fp", 300, [(n, 100.0) for n in "ac"])
            assert table(a) == table(c) == pair
        finally:
            for cl in nodes.values():
                await cl.close()

    asyncio.run(run())
