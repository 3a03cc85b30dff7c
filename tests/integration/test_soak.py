"""The single-node soak (``bench/soak.py --quick``, 2 minutes) runs clean: every read bitwise
right, the pool under its cap, no unexpected error or hang, and nothing in the daemon growing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_quick() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--seed", "16"],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    data = json.loads((ROOT / "bench" / "results" / "soak-quick.json").read_text())
    assert data["verdict"] == "ok" and data["failure"] is None, data["failure"]
    # Without a tmpfs of its own (not root, or mounting refused) the script says so and runs
    # on a plain directory; the checks below hold either way. CI runs as root: a tmpfs.
    assert data["pool_fs"] == "tmpfs" or "WARNING" in r.stdout
    assert data["pool_fs"] == "tmpfs" or os.geteuid() != 0 or "mount failed" in r.stdout
    assert data["mismatches"] == 0 and data["cap_violations"] == 0
    assert 0 < data["max_pool_used_bytes"] <= data["cap_bytes"] + data["slack_bytes"]
    ops = data["ops"]
    assert data["completed_ops"] >= 300, ops  # ~2,500 on a busy 2-core VM
    assert ops.get("open", 0) >= 50 and ops.get("read", 0) >= 100 and ops.get("stream", 0) >= 5
    assert data["bytes_checked"] >= 256 * 2**20
    # Everything an operator does happened, and the cap made the pool evict.
    assert all(data["operator"].get(k, 0) >= 1 for k in ("update", "reload", "prefetch", "kill"))
    assert data["daemon"]["evictions"] > 0
    expected = {"CapacityError", "IntegrityError", "SourceError", "SourceNotFoundError"}
    assert set(data["errors"]) <= expected | {"ManifestError", "DaemonError"}, data["errors"]
    growth = data["memory"]["growth"]
    assert growth and all(g["ok"] for g in growth.values() if "ok" in g), growth
    assert len(data["memory"]["samples"]) >= 30
