"""Operations: metrics, configuration, lifecycle (SIGTERM, SIGHUP), doctor."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import mows
from mows import AccessDeniedError
from mows.client import Session
from tests.conftest import free_port
from tests.daemons import generate_crc32, make_random_model
from tests.integration.test_daemon import _wait, assert_same_as_files

MOWS = [sys.executable, "-m", "mows"]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_show_the_bytes_moved(daemon_factory: Any, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 64, files=4)
    port = free_port()
    d = daemon_factory(roots=[tmp_path], extra=["--metrics-listen", f"127.0.0.1:{port}"])
    before = scrape(port)
    assert before['mows_bytes_total{source="origin"}'] == 0
    scrapes: list[dict[str, float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            scrapes.append(scrape(port))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with mows.open_model(model, socket=d.socket) as h:
            size = h.stats["bytes"]
    finally:
        done.set()
        poller.join()
    after = scrape(port)
    assert len(scrapes) >= 2  # it answered while the load ran
    assert after['mows_bytes_total{source="origin"}'] == size
    chunks = sum(-(-f.stat().st_size // 2**20) for f in model.iterdir())  # 1 MiB chunks
    assert after['mows_chunk_fetch_seconds_count{source="origin"}'] == chunks
    assert after["mows_pool_used_bytes"] >= size
    assert after["mows_pool_capacity_bytes"] == 2**30
    assert after['mows_integrity_failures_total{source="origin"}'] == 0
    assert after["mows_misses_total"] == 1


def test_sigterm_mid_load_leaves_nothing_half_written(daemon_factory: Any, tmp_path: Path) -> None:
    model = make_random_model(tmp_path / "m", 384, files=2)
    d = daemon_factory(roots=[tmp_path], extra=["--drain-timeout", "0"])
    session = Session(d.socket)
    stopped = threading.Event()

    def progress(done: int, total: int) -> None:
        if 0 < done < total and not stopped.is_set():
            stopped.set()
            assert d.proc is not None
            d.proc.send_signal(signal.SIGTERM)

    with pytest.raises(mows.MowsError):
        session.open(str(model), progress=progress, pin=False)
    session.close()
    assert stopped.is_set()
    assert d.proc is not None and d.proc.wait(20) == 0
    pool = d.pool_dir
    d2 = daemon_factory(roots=[tmp_path], pool_dir=pool)
    assert not list(pool.rglob("*.partial"))
    (m,) = d2.status()["models"] or [{"cached_fraction": 0.0}]
    assert m["cached_fraction"] < 1.0
    with mows.open_model(model, socket=d2.socket) as h:
        assert h.stats["bytes_from_origin"] > 0
        assert_same_as_files(h.state_dict(), model)


def test_sighup_and_reload_reread_the_model_list(daemon_factory: Any, tmp_path: Path) -> None:
    a = make_random_model(tmp_path / "a", 2, files=1)
    b = make_random_model(tmp_path / "b", 2, files=1, seed=3)
    conf = tmp_path / "mows.toml"
    conf.write_text(f'model_path = ["{a}"]\n')
    d = daemon_factory(roots=[], extra=["--config", str(conf)])
    with pytest.raises(AccessDeniedError):
        mows.open_model(b, socket=d.socket)
    conf.write_text(f'model_path = ["{a}", "{b}"]\n')
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    _wait(lambda: "reloaded" in d.log())
    mows.open_model(b, socket=d.socket).close()
    conf.write_text(f'model_path = ["{a}"]\n')
    r = subprocess.run([*MOWS, "reload", "--socket", d.socket], capture_output=True, text=True)
    assert r.returncode == 0 and str(b) not in r.stdout
    with pytest.raises(AccessDeniedError):
        mows.open_model(b, socket=d.socket)


def test_doctor_names_a_broken_socket_and_a_missing_crc32_file(
    daemon_factory: Any, tmp_path: Path
) -> None:
    model = make_random_model(tmp_path / "m", 2, files=1)
    args = ["--max-memory", "64MiB", "--model-path", str(model), "--pool-dir", str(tmp_path / "p")]
    broken = str(tmp_path / "nowhere" / "mows.sock")
    r = subprocess.run([*MOWS, "doctor", *args, "--socket", broken], capture_output=True, text=True)
    assert r.returncode == 1
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert any(broken in line for line in fails), r.stdout
    assert any("crc32.txt" in line and str(model) in line for line in fails), r.stdout
    generate_crc32(model)
    d = daemon_factory(roots=[model])
    r = subprocess.run(
        [*MOWS, "doctor", *args, "--socket", d.socket], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout
    assert "FAIL" not in r.stdout


def test_doctor_checks_etcd_and_peers(daemon_factory: Any, etcd: Any, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a long enough shared secret")
    extra = [
        "--etcd",
        etcd.endpoint,
        "--cluster",
        "doc",
        "--listen",
        "127.0.0.1:0",
        "--cluster-secret-file",
        str(secret),
    ]
    d = daemon_factory(roots=[tmp_path], extra=extra)
    _wait(lambda: len(d.status()["cluster"]["nodes"]) == 1)
    args = [
        "--max-memory",
        "64MiB",
        "--socket",
        d.socket,
        "--pool-dir",
        str(tmp_path / "p"),
        "--etcd",
        etcd.endpoint,
        "--cluster",
        "doc",
        "--node-id",
        "doctor",
    ]
    r = subprocess.run(
        [*MOWS, "doctor", *args, "--cluster-secret-file", str(secret)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout
    assert "secret accepted" in r.stdout
    wrong = tmp_path / "wrong"
    wrong.write_text("not the shared secret at all")
    r = subprocess.run(
        [*MOWS, "doctor", *args, "--cluster-secret-file", str(wrong)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "FAIL  peer" in r.stdout


def test_config_show_names_the_source_of_each_value(tmp_path: Path) -> None:
    conf = tmp_path / "mows.toml"
    conf.write_text('max_memory = "3GiB"\nworkers = 2\n')
    r = subprocess.run(
        [*MOWS, "config", "show", "--json", "--config", str(conf), "--workers", "6"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MOWS_CLUSTER": "blue"},
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["max_memory"] == {"value": 3 * 2**30, "from": str(conf)}
    assert doc["workers"] == {"value": 6, "from": "--workers"}
    assert doc["cluster"] == {"value": "blue", "from": "MOWS_CLUSTER"}
    assert doc["chunk_size"]["from"] == "default"
    conf.write_text('max_memory = "3GiB"\nwrokers = 2\n')
    r = subprocess.run(
        [*MOWS, "config", "show", "--config", str(conf)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "wrokers" in r.stderr
