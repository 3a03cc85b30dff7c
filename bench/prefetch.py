"""A client load while idle prefetch runs vs the same load with no prefetch.

    python bench/prefetch.py [--size-mib 512] [--repeat 5] [--quick]

Each run starts a fresh daemon (fresh pool). "with prefetch": the daemon prefetches model P
(--model-path, no rate cap) and, once prefetch is under way, a client loads model F. "without":
the same daemon and load, --prefetch off. Target: with <= 1.10 x without (medians).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import median, table, write_json  # noqa: E402

from tests.daemons import DaemonProcess, make_random_model, mows_load  # noqa: E402


def one(base: Path, i: int, prefetched: Path, foreground: Path, prefetch: bool) -> float:
    work = base / f"run{i}-{int(prefetch)}"
    work.mkdir()
    extra = ["--chunk-size", "16MiB", "--prefetch-delay", "0"]
    extra += ["--model-path", str(prefetched)] if prefetch else ["--prefetch", "off"]
    d = DaemonProcess(work, roots=[base], max_memory="8GiB", extra=extra).start()
    try:
        if prefetch:  # wait until prefetch is moving bytes
            deadline = time.monotonic() + 30
            while True:
                models = d.status()["prefetch"]["models"]
                if models and models[0].get("held_bytes", 0) > 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("prefetch did not start")
                time.sleep(0.02)
        seconds = float(mows_load(d.socket, foreground)["seconds"])
        if prefetch:
            assert d.status()["prefetch"]["models"][0]["state"] != "done", "prefetch ended first"
        return seconds
    finally:
        d.stop()
        time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.repeat = 128, 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        prefetched = make_random_model(base / "prefetched", 4 * args.size_mib, files=8, seed=1)
        foreground = make_random_model(base / "foreground", args.size_mib, files=4, seed=2)
        with_p, without = [], []
        for i in range(args.repeat):
            without.append(one(base, i, prefetched, foreground, prefetch=False))
            with_p.append(one(base, i, prefetched, foreground, prefetch=True))
    ratio = median(with_p) / median(without)
    results = {"with_prefetch_s": with_p, "without_s": without, "ratio": ratio}
    print(f"client load of {args.size_mib} MiB, median of {args.repeat}")
    print(
        table(
            ["", "seconds"],
            [["without prefetch", median(without)], ["with prefetch running", median(with_p)]],
        )
    )
    print(f"with / without = {ratio:.2f} (target <= 1.10)")
    out = write_json("prefetch-quick" if args.quick else "prefetch", results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
