"""Models bigger than the pool: iter_weights streams them under the cap."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mows
from mows import CapacityError
from mows.client import Session
from tests.daemons import make_random_model


def test_model_twice_the_cap_streams_bitwise_under_the_cap(
    daemon_factory: Any, tmp_path: Path
) -> None:
    model = make_random_model(tmp_path / "big", 48, files=8)  # 8 files of ~6 MiB
    cap = 24 * 2**20
    d = daemon_factory(roots=[tmp_path], max_memory="24MiB")
    ref: dict[str, torch.Tensor] = {}
    for f in sorted(model.glob("*.safetensors")):
        ref.update(load_file(f))
    assert sum(t.nbytes for t in ref.values()) >= 2 * cap  # twice the cap

    used: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        s = Session(d.socket)
        try:
            while not stop.is_set():
                used.append(int(s.status()["used_bytes"]))  # type: ignore[call-overload]
                time.sleep(0.002)
        finally:
            s.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    seen = 0
    try:
        for name, tensor in mows.iter_weights(model, socket=d.socket, fallback=False):
            assert torch.equal(tensor, ref[name]), name
            seen += 1
            del tensor  # as an engine does once the weight is on the GPU
    finally:
        stop.set()
        sampler.join()
    assert seen == len(ref)
    assert used and max(used) <= cap
    st = d.status()
    assert st["evictions"] >= 2
    assert st["used_bytes"] <= cap
    # Asked whole, the same model is a clear capacity error.
    with pytest.raises(CapacityError):
        mows.open_model(model, socket=d.socket)
    with pytest.raises(CapacityError):
        list(mows.iter_weights(model, socket=d.socket, stream=False))


def test_consumed_files_are_evicted_before_older_ones(daemon_factory: Any, tmp_path: Path) -> None:
    old = make_random_model(tmp_path / "old", 8, files=1, seed=5)
    big = make_random_model(tmp_path / "big", 24, files=3)
    d = daemon_factory(roots=[tmp_path], max_memory="26MiB")
    mows.open_model(old, socket=d.socket).close()  # least recently used, but not consumed
    for _ in mows.iter_weights(big, socket=d.socket, stream=True):
        pass
    st = d.status()
    (m_old,) = [m for m in st["models"] if m["path"] == str(old)]
    assert m_old["cached_fraction"] == 1.0  # streamed files went first, the old model stayed
