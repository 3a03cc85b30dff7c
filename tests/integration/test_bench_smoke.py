"""Smoke runs of the benchmarks (``--quick``): they run end to end and report sane figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout: float = 600) -> str:
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_cluster_bench_quick() -> None:
    if os.geteuid() != 0:
        pytest.skip("bench/cluster.py needs root for network namespaces")
    out = run_bench("cluster.py", "--quick")
    if "skipped" in out:
        pytest.skip(out.strip())
    data = json.loads((ROOT / "bench" / "results" / "cluster-quick.json").read_text())
    (run,) = data["runs"]
    assert run["cold_origin_bytes"] <= 1.05 * data["bytes"]
    assert run["scale_origin_bytes"] == 0
    assert run["pull_links"]["origin"]["tx"] >= 2 * data["bytes"]  # both pulled it all
    assert (ROOT / "bench" / "results" / "cluster-quick.png").stat().st_size > 0
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == ""


@pytest.mark.slow
def test_crc_bench_quick() -> None:
    out = run_bench("crc.py", "--quick")
    assert "ratio verify/cat" in out


@pytest.mark.slow
def test_scale_bench_quick() -> None:
    import shutil

    if shutil.which("etcd") is None and not os.path.exists("/usr/sbin/etcd"):
        pytest.skip("bench/scale.py replays against a real etcd: etcd is not installed")
    run_bench("scale.py", "--quick", timeout=300)
    data = json.loads((ROOT / "bench" / "results" / "scale-quick.json").read_text())
    runs = {r["scenario"]: r for r in data["runs"]}
    assert set(runs) == {"cold", "scale-out"}
    files = data["model"]["files"]
    for r in runs.values():
        assert r["nodes"] == 10 and r["killed"] >= 1
        assert r["completed_loads"] == r["surviving_loads"] > 0  # despite the kills
        assert r["ownership_s"] <= 1.0
        e = r["etcd"]
        assert 0 < e["largest_value_written"] <= 64 << 10
        assert 0 < e["largest_value_read_back"] <= 64 << 10 and e["keys_read_back"] > 0
        assert 0 < e["writes_per_load"] <= 4 * files  # O(files), not O(chunks)
        assert e["etcd"]["etcd_mvcc_put_total"] > 0
        assert e["agents"] >= 5 and e["agents_caught_up"] and e["rejected_records"] == 0
        assert e["owner_tables_match_simulation"] is True  # real Clusters agree with the sim
        assert e["apply_us_per_event"] > 0 and e["state_bytes_max"] > 0
    cold, out = runs["cold"], runs["scale-out"]
    assert cold["origin_total_over_model"] >= 1.0  # every chunk left the origin once at least
    assert out["origin_total_over_model"] == 0  # a warm cluster reads nothing from the origin
    assert out["ratio"] <= 1.2
