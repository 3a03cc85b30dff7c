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
