"""Host-to-device copy speed from the pool's pages vs pageable and pinned host buffers.

    python gpu/h2d.py MODEL_DIR SOCKET [--repeat 5]

Loads the model through the daemon (tensors are views of the pool's shared pages), then times
copying every tensor to the GPU from (a) the pool pages, (b) the same bytes in ordinary
(pageable) process memory, (c) pinned (page-locked) host memory. Prints medians in GiB/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mows


def timed_copy(tensors: list[torch.Tensor], non_blocking: bool) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = [x.to("cuda", non_blocking=non_blocking) for x in tensors]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    del out
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("socket")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to measure")
    sd = mows.load_state_dict(args.model, socket=args.socket, fallback=False)
    pool = [t for t in sd.values() if t.numel()]
    size = sum(t.numel() * t.element_size() for t in pool)
    pageable = [t.clone() for t in pool]
    pinned = [t.pin_memory() for t in pool]
    for t in pool:  # fault the pool pages in once, as an engine's first pass would
        t.view(-1)[::4096].sum()
    cases = {"pool pages": (pool, False), "pageable": (pageable, False), "pinned": (pinned, True)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeat):
        for name, (ts, nb) in cases.items():
            times[name].append(timed_copy(ts, nb))
    gib = size / 2**30
    result = {
        k: {"median_s": statistics.median(v), "gib_s": gib / statistics.median(v)}
        for k, v in times.items()
    }
    for k, v in result.items():
        print(f"{k:<12} {v['median_s']:.4f} s  {v['gib_s']:.2f} GiB/s")
    print(json.dumps({"bytes": size, "results": result}))


if __name__ == "__main__":
    main()
