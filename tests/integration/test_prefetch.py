"""Idle prefetch: models named by --model-path fill the pool (or the cluster) with no client."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mows
from tests.daemons import make_random_model
from tests.integration.test_cluster import FAST
from tests.integration.test_daemon import _wait, assert_same_as_files


def prefetch_state(d: Any, model: Path) -> dict[str, Any]:
    for m in d.status()["prefetch"]["models"]:
        if m["path"] == str(model):
            return dict(m)
    return {}


def test_single_node_prefetches_the_whole_model(daemon_factory: Any, tmp_path: Path) -> None:
    from tests.conftest import free_port
    from tests.integration.test_operations import scrape

    model = make_random_model(tmp_path / "m", 16, files=2)
    port = free_port()
    d = daemon_factory(
        roots=[],
        extra=[
            "--model-path",
            str(model),
            "--prefetch-delay",
            "0",
            "--metrics-listen",
            f"127.0.0.1:{port}",
        ],
    )
    _wait(lambda: prefetch_state(d, model).get("state") == "done", timeout=30)
    metrics = scrape(port)
    size = sum(f.stat().st_size for f in model.iterdir())
    assert metrics[f'mows_prefetch_bytes{{kind="held",model="{model}"}}'] == size
    st = d.status()
    assert st["models"][0]["cached_fraction"] == 1.0
    assert st["bytes_from_origin"] == st["models"][0]["bytes"]
    with mows.open_model(model, socket=d.socket) as h:  # no client fetched it: a pure hit
        assert h.stats["bytes_from_origin"] == 0
        assert_same_as_files(h.state_dict(), model)


def test_cluster_prefetch_holds_the_model_once_in_even_shares(
    daemon_factory: Any, etcd: Any, tmp_path: Path
) -> None:
    model = make_random_model(tmp_path / "m", 48, files=3)
    extra = [
        "--etcd",
        etcd.endpoint,
        "--cluster",
        "pf",
        *FAST,
        "--model-path",
        str(model),
        "--prefetch-delay",
        "3",
        # 128 KiB chunks: ~390 of them, so rendezvous placement is even to a few percent.
        "--chunk-size",
        "128KiB",
    ]
    nodes = [daemon_factory(roots=[], extra=extra) for _ in range(3)]
    _wait(lambda: all(prefetch_state(d, model).get("state") == "done" for d in nodes), timeout=60)
    shares = [prefetch_state(d, model)["held_bytes"] for d in nodes]
    total = sum(shares)
    size = sum(f.stat().st_size for f in model.iterdir())
    assert total == size, shares  # every byte once across the cluster
    for share in shares:  # equal capacities: a third each, within +-25%
        assert abs(share - size / 3) <= 0.25 * size / 3, shares
    origin = sum(d.status()["bytes_from_origin"] for d in nodes)
    assert origin == size
    # Shares are partial files (but for files of one chunk): not whole copies in the
    # directory, which records files.
    assert min(nodes[0].status()["cluster"]["models"][0]["copies"]) == 0
    # A client then loads it from its own share and the peers' (asked for their Have, or as
    # the chunks' owners): nothing from origin.
    with mows.open_model(model, socket=nodes[0].socket) as h:
        assert h.stats["bytes_from_origin"] == 0
        assert h.stats["bytes_from_pool"] > 0
        assert_same_as_files(h.state_dict(), model)


def test_a_client_load_preempts_prefetch(daemon_factory: Any, tmp_path: Path) -> None:
    big = make_random_model(tmp_path / "big", 32, files=2, seed=1)
    small = make_random_model(tmp_path / "small", 16, files=2, seed=2)
    d = daemon_factory(
        roots=[small],
        extra=["--model-path", str(big), "--prefetch-delay", "0", "--prefetch-rate", "8MiB"],
    )
    _wait(lambda: prefetch_state(d, big).get("held_bytes", 0) > 0, timeout=30)
    start = time.perf_counter()
    with mows.open_model(small, socket=d.socket) as h:
        seconds = time.perf_counter() - start
        assert_same_as_files(h.state_dict(), small)
    # 16 MiB at the prefetch's 8 MiB/s would take 2 s: the client load is not throttled.
    assert seconds < 1.5, seconds
    during = prefetch_state(d, big)["held_bytes"]
    assert during < prefetch_state(d, big)["target_bytes"]
    _wait(lambda: prefetch_state(d, big).get("state") == "done", timeout=30)
