"""Origin reads paced by the cluster's size: the per-node limit, and the gate that keeps it
while the limit moves (pure asyncio, no daemon)."""

from __future__ import annotations

import asyncio

import pytest

from mows.daemon._fetcher import CLUSTER_ORIGIN_STREAMS, _Gate, origin_streams


def test_origin_streams_spread_the_cluster_budget_over_members() -> None:
    assert origin_streams(4, 1) == 4  # a lone node: its workers
    assert origin_streams(4, 8) == 4  # 64 / 8 = 8, at most the workers
    assert origin_streams(4, 32) == 2
    assert origin_streams(4, 100) == 1
    assert origin_streams(4, 1000) == 1  # never below one
    assert origin_streams(16, 8) == 8
    assert origin_streams(4, 0) == 4  # no members known yet: as alone
    for members in range(1, 200):
        assert origin_streams(64, members) * members < CLUSTER_ORIGIN_STREAMS + members


async def _peak(gate: _Gate, tasks: int) -> int:
    peak = inside = 0

    async def one() -> None:
        nonlocal peak, inside
        await gate.enter()
        try:
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.001)
        finally:
            inside -= 1
            gate.leave()

    await asyncio.gather(*(one() for _ in range(tasks)))
    return peak


def test_the_gate_holds_its_limit_and_lets_everyone_through() -> None:
    gate = _Gate(lambda: 3)
    assert asyncio.run(_peak(gate, 50)) == 3
    assert gate.idle


def test_a_rising_limit_admits_waiters_at_the_next_release() -> None:
    async def run() -> int:
        limit = [1]
        gate = _Gate(lambda: limit[0])
        await gate.enter()  # held: the others wait
        entered: list[int] = []

        async def waiter(k: int) -> None:
            await gate.enter()
            entered.append(k)

        tasks = [asyncio.ensure_future(waiter(k)) for k in range(3)]
        await asyncio.sleep(0.01)
        assert entered == []
        limit[0] = 4
        gate.leave()  # one release: all three fit under the new limit
        await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
        assert entered == [0, 1, 2]  # in the order they came
        return gate.busy

    assert asyncio.run(run()) == 3


def test_a_newcomer_does_not_overtake_a_waiter() -> None:
    """A slot that frees goes to the longest waiter, not to whoever asks next."""

    async def run() -> list[str]:
        gate = _Gate(lambda: 1)
        order: list[str] = []
        await gate.enter()

        async def take(name: str) -> None:
            await gate.enter()
            order.append(name)
            gate.leave()

        waiting = asyncio.ensure_future(take("waiter"))
        await asyncio.sleep(0.01)
        gate.leave()  # handed to the waiter ...
        newcomer = asyncio.ensure_future(take("newcomer"))  # ... before this one asks
        await asyncio.wait_for(asyncio.gather(waiting, newcomer), 1.0)
        return order

    assert asyncio.run(run()) == ["waiter", "newcomer"]


def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    async def run() -> None:
        gate = _Gate(lambda: 1)
        await gate.enter()
        first = asyncio.ensure_future(gate.enter())
        second = asyncio.ensure_future(gate.enter())
        await asyncio.sleep(0.01)
        gate.leave()  # hands the slot to the first ...
        first.cancel()  # ... cancelled before it ran: the second must get it
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1.0)
        assert gate.busy == 1

    asyncio.run(run())
