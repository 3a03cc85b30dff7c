"""Eviction and the peer server's sends: a pool file a peer is being sent from is not
unlinked (the send's descriptor would keep its pages past the cap)."""

from __future__ import annotations

import os
from pathlib import Path

from mows.pool import FileState, Pool, PoolFile, Version
from tests.daemons import make_manifest

MIB = 1 << 20


def _ready(pool: Pool, v: Version, rel: str) -> PoolFile:
    files = pool.admit(v, [rel], transient=True)
    assert files is not None
    (f,) = files
    os.close(pool.open_partial(f))
    crc = f.entry.crc32
    assert crc is not None
    pool.commit(f, {0: crc}, crc)
    pool.unpin([f], transient=True)
    return f


def test_a_file_being_sent_is_not_evicted(tmp_path: Path) -> None:
    pool = Pool(str(tmp_path / "pool"), 2 * MIB)
    v = pool.version(make_manifest(3))
    f0, f1 = _ready(pool, v, "f0"), _ready(pool, v, "f1")  # f0: the least recently used
    sending = {f0}
    stopped: list[PoolFile] = []

    def stop_serving(f: PoolFile) -> bool:
        if f in sending:
            return False
        stopped.append(f)
        return True

    pool.sending = lambda f: f in sending
    pool.stop_serving = stop_serving
    got = pool.admit(v, ["f2"], transient=True)
    assert got is not None  # another victim instead
    assert v.files.get("f0") is f0 and os.path.exists(f0.path)
    assert "f1" not in v.files and not os.path.exists(f1.path) and stopped == [f1]
    assert pool.used_bytes <= pool.capacity


def test_a_send_that_began_after_the_choice_keeps_its_file(tmp_path: Path) -> None:
    """The victims are chosen, then a send of one begins before it is evicted: the
    eviction's own step (``stop_serving``) refuses, nothing is unlinked, the admission
    waits (None) and takes the room once the send ended."""
    pool = Pool(str(tmp_path / "pool"), 2 * MIB)
    v = pool.version(make_manifest(3))
    f0, f1 = _ready(pool, v, "f0"), _ready(pool, v, "f1")
    sends = {f0: 1}
    pool.sending = lambda f: False  # as seen when the victims were chosen
    pool.stop_serving = lambda f: not sends.get(f)
    assert pool.admit(v, ["f2"], transient=True) is None
    assert v.files.get("f0") is f0 and os.path.exists(f0.path)
    assert "f2" not in v.files and pool.used_bytes <= pool.capacity
    sends[f0] = 0  # the send ended
    got = pool.admit(v, ["f2"], transient=True)
    assert got is not None and got[0].state is FileState.FILLING
    assert "f0" not in v.files and not os.path.exists(f0.path)
    assert v.files.get("f1") is f1 and pool.used_bytes <= pool.capacity


def test_a_file_peers_keep_reading_is_drained_then_evicted(tmp_path: Path) -> None:
    """The only victim is being sent at every look: it is drained (no new send of it
    starts), so once the sends in flight end it goes, and the load gets its room."""
    pool = Pool(str(tmp_path / "pool"), 2 * MIB)
    v = pool.version(make_manifest(3))
    f0, f1 = _ready(pool, v, "f0"), _ready(pool, v, "f1")
    pool.pin([f1], transient=False)  # held by a client: f0 is the only candidate
    in_flight = {f0: 1}
    drained: set[PoolFile] = set()

    def sending(f: PoolFile) -> bool:
        if f not in drained:
            in_flight[f] = in_flight.get(f, 0) + 1  # peers keep asking: always one more
        return in_flight.get(f, 0) > 0

    pool.sending = sending
    pool.drain = drained.add
    pool.stop_serving = lambda f: not in_flight.get(f)
    assert pool.admit(v, ["f2"], transient=True) is None  # being sent: not now ...
    assert drained == {f0} and os.path.exists(f0.path)
    in_flight[f0] = 0  # ... the sends in flight end, and no new one began
    got = pool.admit(v, ["f2"], transient=True)
    assert got is not None and not os.path.exists(f0.path)
    assert pool.used_bytes <= pool.capacity


def test_a_drained_file_is_not_served() -> None:
    from mows.daemon._chunks import ChunkTable

    table = ChunkTable()
    with open(os.devnull, "rb") as fh:
        table.add_file("m", "f", fh.fileno())
    table.add_chunk("m", "f", 0, 0, 0, 0, b"d" * 32)
    chunk = table.open_chunk("m", "f", 0)
    assert chunk is not None and table.sending("m", "f")
    table.drain("m", "f")
    assert table.open_chunk("m", "f", 0) is None  # no new send
    assert not table.withdraw("m", "f")  # the one in flight keeps it
    chunk.close()
    chunk.close()  # once: the count does not go below zero
    assert not table.sending("m", "f") and table.withdraw("m", "f")
    table.close()
