"""`mows crc32 verify` throughput against `cat FILES > /dev/null`, page cache warm.

    python bench/crc.py [--size-mib 1536] [--files 4] [--repeat 7] [--dir DIR]

Both read every byte of the same files; the ratio of throughputs (verify / cat) is the figure.
"Verify (in-process)" times `mows._verify.verify_model`; "verify CLI" times the whole command,
Python start-up included.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, table, timed, write_json

from mows._verify import verify_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1536)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument(
        "--dir", default=None, help="Where to write the test files (default: a temp dir)."
    )
    ap.add_argument("--quick", action="store_true", help="Small sizes, for a smoke run.")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.repeat = 128, 3

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        model = Path(tmp)
        per_file = args.size_mib * 2**20 // args.files
        block = os.urandom(2**20)
        for i in range(args.files):
            with open(model / f"model-{i:05d}.safetensors", "wb") as f:
                for _ in range(per_file // 2**20):
                    f.write(block)
        mows = [sys.executable, "-m", "mows"]
        subprocess.run([*mows, "crc32", "generate", str(model)], check=True, capture_output=True)
        files = sorted(str(p) for p in model.glob("*.safetensors"))
        total = per_file * args.files

        def cat() -> None:
            subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)

        def verify() -> None:
            assert verify_model(model).ok

        def cli() -> None:
            subprocess.run([*mows, "crc32", "verify", "-q", str(model)], check=True)

        cat()  # warm the page cache
        t_cat, t_verify, t_cli = [], [], []
        for _ in range(args.repeat):  # interleaved, so noise hits both sides alike
            t_cat += timed(cat, 1)
            t_verify += timed(verify, 1)
            t_cli += timed(cli, 1)

    gib = total / 2**30
    rows = []
    results = {}
    for name, ts in (
        ("cat > /dev/null", t_cat),
        ("verify (in-process)", t_verify),
        ("verify CLI", t_cli),
    ):
        rate = gib / median(ts)
        results[name] = {"median_s": median(ts), "gib_per_s": rate, "runs": ts}
        rows.append([name, median(ts), rate, rate / (gib / median(t_cat))])
    print(f"{total / 2**20:.0f} MiB in {args.files} files, median of {args.repeat}")
    print(table(["what", "median s", "GiB/s", "vs cat"], rows))
    ratio = results["verify (in-process)"]["gib_per_s"] / results["cat > /dev/null"]["gib_per_s"]
    out = write_json("crc", {"bytes": total, "results": results, "ratio_verify_vs_cat": ratio})
    print(f"ratio verify/cat = {ratio:.2f} (target >= 0.8); wrote {out}")


if __name__ == "__main__":
    main()
