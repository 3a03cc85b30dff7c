"""Engine integrations on CPU: models built from pool tensors generate what the files do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integration.test_daemon import mapping_of


def greedy(model: Any, model_dir: Path, n: int = 12) -> list[int]:
    from transformers import AutoTokenizer

    if (model_dir / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    else:  # the random tiny model has no tokenizer
        ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return [int(x) for x in out[0][ids.shape[1] :]]


def reference(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("which", ["tiny_qwen2", "smollm2"])
def test_transformers_from_pool_generates_the_same(
    which: str, request: pytest.FixtureRequest, daemon_factory: Any
) -> None:
    from mows.integrations.transformers import from_pretrained

    model_dir: Path = request.getfixturevalue(which)
    d = daemon_factory(roots=[model_dir])
    model = from_pretrained(model_dir, socket=d.socket, fallback=False)
    params = list(model.named_parameters())
    assert params
    for name, p in params:
        assert mapping_of(p.data_ptr()).startswith(str(d.pool_dir)), name
    assert greedy(model, model_dir) == greedy(reference(model_dir), model_dir)
    assert d.status()["models"][0]["pins"] == 1  # held while the model lives


def test_transformers_dtype_conversion_copies(daemon_factory: Any, tiny_qwen2: Path) -> None:
    from mows.integrations.transformers import from_pretrained

    d = daemon_factory(roots=[tiny_qwen2])
    model = from_pretrained(tiny_qwen2, socket=d.socket, dtype=torch.float32)
    for _, p in model.named_parameters():
        assert p.dtype == torch.float32
        assert not mapping_of(p.data_ptr()).startswith(str(d.pool_dir))


def test_sglang_loader_class() -> None:
    pytest.importorskip(
        "sglang", reason="SGLang has no CPU build on PyPI (its kernels package is CUDA-only)"
    )
    from mows.integrations.sglang import loader_class

    assert loader_class().__name__ == "MowsLoader"


def test_vllm_entry_point_is_declared() -> None:
    # vLLM itself (the CPU build) runs in its own venv: tests/integration/test_vllm.py.
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "mows"]
    assert eps and eps[0].value == "mows.integrations.vllm:register"
