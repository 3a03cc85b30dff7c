"""A `share` prefetch paused by a local load is not an owner its peers wait on.

Regression for a cluster-wide stall: a paused prefetch stayed a member of its version (its
record said it was loading every file), so a peer loading that model waited for its share of
the chunks, with no deadline, for as long as the pause lasted.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import mows
from tests.daemons import LOAD, make_random_model
from tests.integration.test_cluster import FAST
from tests.integration.test_daemon import _wait, assert_same_as_files
from tests.integration.test_prefetch import prefetch_state

BOUND = 15.0  # seconds: B's 16 MiB cold load takes ~1-3 s; a stall lasts as long as A's pause


def holders(endpoint: str, cluster: str, vid: str) -> set[str]:
    """The node ids with a holdings record for version ``vid``, read with a plain etcd client."""
    import aetcd

    async def get() -> list[bytes]:
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        client = aetcd.Client(host=host, port=int(port))
        try:
            prefix = f"/mows/{cluster}/holdings/{vid}/".encode()
            return [bytes(kv.key)[len(prefix) :] for kv in await client.get_prefix(prefix)]
        finally:
            await client.close()

    return {key.decode() for key in asyncio.run(get())}


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_a_paused_share_prefetch_is_not_waited_on(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    target = make_random_model(tmp_path / "target", 16, files=2, seed=3)
    held = make_random_model(tmp_path / "held", 32, files=1, seed=4)
    waiting = make_random_model(tmp_path / "waiting", 24, files=2, seed=5)
    cluster = ["--etcd", etcd.endpoint, "--cluster", "pause", *FAST]
    # A prefetches `target` (its share) once idle, in a pool with room for one of the other
    # models at a time.
    a = daemon_factory(
        roots=[tmp_path],
        max_memory="40MiB",
        extra=[
            *cluster,
            "--model-path",
            str(target),
            "--prefetch",
            "share",
            "--prefetch-delay",
            "12",  # the busy load and node B are set up first (~1-3 s; slow machines more)
            "--load-timeout",
            "300",
        ],
    )
    with contextlib.ExitStack() as cleanup:
        # A local load that does not end: a stream holds `held`'s one file (a pin that will
        # be released, so the load of `waiting` waits in line for its room, up to
        # --load-timeout, instead of failing), and A's prefetch stays paused, before its
        # first chunk, until the stream moves on.
        stream = mows.iter_weights(held, socket=a.socket, stream=True)
        cleanup.callback(stream.close)
        next(stream)
        busy = subprocess.Popen(
            [*LOAD, "--socket", a.socket, str(waiting)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        cleanup.callback(stop, busy)
        b = daemon_factory(roots=[tmp_path], extra=[*cluster, "--prefetch", "off"])
        _wait(lambda: all(len(d.status()["cluster"]["nodes"]) == 2 for d in (a, b)), timeout=15)
        _wait(lambda: prefetch_state(a, target).get("state") == "paused", timeout=30)
        paused = prefetch_state(a, target)
        assert paused["policy"] == "share" and paused["held_bytes"] == 0, paused
        assert busy.poll() is None  # A's load of `waiting` is still in line

        # B, a cold node, opens `target` while A's prefetch is paused.
        opened = threading.Event()
        got: dict[str, Any] = {}

        def load_on_b() -> None:
            start = time.perf_counter()
            try:
                with mows.open_model(target, socket=b.socket, fallback=False) as h:
                    got["seconds"] = time.perf_counter() - start
                    opened.set()
                    got["stats"] = dict(h.stats)
                    assert_same_as_files(h.state_dict(), target)
                    got["same"] = True
            except BaseException as e:
                got["error"] = e
            finally:
                got.setdefault("seconds", time.perf_counter() - start)
                opened.set()

        loader = threading.Thread(target=load_on_b, daemon=True)
        loader.start()
        in_time = opened.wait(BOUND)
        during = prefetch_state(a, target)  # still paused while B loaded
        vid = str(paused["version"])
        a_id, b_id = (d.status()["cluster"]["node_id"] for d in (a, b))
        listed = holders(etcd.endpoint, "pause", vid)  # the directory, A still paused
        # End A's local load either way: on the old behaviour this is what let B finish.
        stream.close()
        loader.join(90)
        assert not loader.is_alive(), "B's open of the target never ended"
        busy_out = busy.communicate(timeout=60)

    assert "error" not in got, got.get("error")
    assert in_time, f"B's open waited on A's paused prefetch: {got['seconds']:.1f} s"
    assert got["seconds"] < BOUND, got["seconds"]
    assert got.get("same"), got
    stats = got["stats"]
    assert stats["bytes_from_origin"] == stats["bytes"], stats  # nothing waited for from A
    assert during["state"] == "paused" and during["held_bytes"] == 0, during
    # The witness: A, paused, was not a member of the version in the directory; B, which
    # loaded it, is (so the read saw the records).
    assert a_id not in listed and b_id in listed, (a_id, b_id, listed)
    assert busy.returncode == 0, busy_out  # A's own load ended well once given room
