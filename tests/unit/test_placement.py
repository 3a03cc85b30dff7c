from __future__ import annotations

import collections
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mows import ProtocolError
from mows.cluster import owner
from mows.cluster._bitmap import decode_bitmap, decode_crcs, encode_bitmap, encode_crcs

KEYS = [f"model/{i}" for i in range(6000)]


def test_equal_weights_balance() -> None:
    nodes = [(f"n{i}", 1.0) for i in range(8)]
    counts = collections.Counter(owner(k, nodes) for k in KEYS)
    mean = len(KEYS) / len(nodes)
    assert max(counts.values()) <= 1.15 * mean
    assert min(counts.values()) >= 0.85 * mean


def test_capacity_weights() -> None:
    nodes = [("big", 3.0), ("small", 1.0)]
    counts = collections.Counter(owner(k, nodes) for k in KEYS)
    assert 0.70 <= counts["big"] / len(KEYS) <= 0.80


def test_join_and_leave_move_only_their_share() -> None:
    before = [(f"n{i}", 1.0) for i in range(4)]
    after = [*before, ("n4", 1.0)]
    moved = [k for k in KEYS if owner(k, before) != owner(k, after)]
    assert all(owner(k, after) == "n4" for k in moved)  # only the newcomer gains
    assert 0.15 <= len(moved) / len(KEYS) <= 0.25  # about 1/5
    survivors = before[1:]
    moved = [k for k in KEYS if owner(k, before) != owner(k, survivors)]
    assert all(owner(k, before) == "n0" for k in moved)  # only the leaver's chunks move


def test_no_nodes() -> None:
    assert owner("k", []) is None


@given(st.sets(st.integers(0, 999)), st.integers(1000, 1100))
def test_bitmap_round_trip(held: set[int], n: int) -> None:
    assert decode_bitmap(encode_bitmap(held, n), n) == held


@given(st.dictionaries(st.integers(0, 99), st.integers(0, 2**32 - 1)))
def test_crcs_round_trip(crcs: dict[int, int]) -> None:
    out = decode_crcs(encode_crcs(crcs, 100), 100)
    assert all(out[i] == crcs.get(i, 0) for i in range(100))


@given(st.binary(max_size=200), st.integers(-5, 5000))
def test_fuzz_directory_records(data: bytes, n: int) -> None:
    for fn in (decode_bitmap, decode_crcs):
        with contextlib.suppress(ProtocolError):
            fn(data, n)


def test_bomb_is_refused() -> None:
    import zlib

    bomb = zlib.compress(b"\0" * 10_000_000)
    with pytest.raises(ProtocolError):
        decode_bitmap(bomb, 8)


def test_min_copies_counts_only_the_range() -> None:
    from mows.cluster import Cluster, NodeInfo

    cl = Cluster(["http://127.0.0.1:1"], "t", lambda: NodeInfo("me", "127.0.0.1:1", 1))
    cl.join("fp", 6)
    for i in (0, 1, 2):
        cl.mark_held("fp", i, 0)
    cl.nodes["peer"] = NodeInfo("peer", "127.0.0.1:2", 1)
    cl.models["fp"].others["peer"] = ({1, 2, 3}, [0] * 6)
    assert cl.copies("fp") == [1, 2, 2, 1, 0, 0]
    assert cl.min_copies("fp", 1, 3) == 2
    assert cl.min_copies("fp", 0, 3) == 1
    assert cl.min_copies("fp", 3, 6) == 0
    del cl.nodes["peer"]  # a dead node's chunks do not count
    assert cl.min_copies("fp", 1, 3) == 1
