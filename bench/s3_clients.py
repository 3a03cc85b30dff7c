"""Which S3 client library reads ranges into the pool fastest and cheapest.

    python bench/s3_clients.py [--size-mib 256] [--range-mib 16] [--threads 4] [--repeat 3]
                               [--quick]

One object in moto's standalone S3 server on loopback (real HTTP, SigV4), read in ranged GETs
by a thread pool into a preallocated shared mapping (as the daemon fills pool files). Per
client: wall time and this process's CPU seconds (every thread, the clients' own included),
medians. moto itself is slow Python in another process: compare the clients relatively.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import median, table, write_json  # noqa: E402

from tests.daemons import MotoServer  # noqa: E402

BUCKET, KEY = "bench", "blob.bin"
Reader = Callable[[int, memoryview], None]


def boto3_reader(moto: MotoServer, threads: int, raw: bool) -> Reader:
    import boto3
    import botocore.config

    s3 = boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        region_name="us-east-1",
        aws_access_key_id=moto.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=moto.env["AWS_SECRET_ACCESS_KEY"],
        config=botocore.config.Config(max_pool_connections=threads),
    )

    def read(offset: int, view: memoryview) -> None:
        end = offset + len(view) - 1
        body = s3.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={offset}-{end}")["Body"]
        # raw: http.client's readinto (recv_into the buffer); else urllib3's (read, then copy)
        stream: Any = body._raw_stream._fp if raw else body
        done = 0
        while done < len(view):
            n = stream.readinto(view[done:])
            if not n:
                raise RuntimeError("short read")
            done += n
        body.close()

    return read


def obstore_reader(moto: MotoServer, threads: int) -> Reader:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        BUCKET,
        endpoint=moto.endpoint,
        region="us-east-1",
        access_key_id=moto.env["AWS_ACCESS_KEY_ID"],
        secret_access_key=moto.env["AWS_SECRET_ACCESS_KEY"],
        client_options={"allow_http": True},
    )

    def read(offset: int, view: memoryview) -> None:
        data = obstore.get_range(store, KEY, start=offset, length=len(view))
        view[:] = memoryview(data)  # Bytes exposes its buffer: one copy, as urllib3's

    return read


def run(read: Reader, size: int, rng: int, threads: int) -> tuple[float, float]:
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        view = memoryview(mm)
        c0, t0 = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda off: read(off, view[off : off + rng]), range(0, size, rng)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        view.release()
        mm.close()
        return wall, cpu
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--range-mib", type=int, default=16)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.repeat = 64, 1
    size, rng = args.size_mib * 2**20, args.range_mib * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        moto = MotoServer(Path(tmp)).start()
        try:
            s3 = moto.client()
            s3.create_bucket(Bucket=BUCKET)
            s3.put_object(Bucket=BUCKET, Key=KEY, Body=os.urandom(size))
            readers: dict[str, Reader] = {
                "boto3 (StreamingBody.readinto)": boto3_reader(moto, args.threads, raw=False),
                "boto3 (http.client readinto)": boto3_reader(moto, args.threads, raw=True),
                "obstore (get_range + copy)": obstore_reader(moto, args.threads),
            }
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in readers}
            for _ in range(args.repeat):  # interleaved, so drift hits every client alike
                for name, read in readers.items():
                    samples[name].append(run(read, size, rng, args.threads))
        finally:
            moto.stop()
    gib = size / 2**30
    rows, results = [], {}
    for name, s in samples.items():
        mibs = median([size / 2**20 / w for w, _ in s])
        cpu = median([c / gib for _, c in s])
        rows.append([name, mibs, cpu])
        results[name] = {"mib_per_s": mibs, "cpu_s_per_gib": cpu, "samples": s}
    print(table(["client", "MiB/s", "CPU s/GiB"], rows))
    name = "s3_clients-quick" if args.quick else "s3_clients"
    path = write_json(name, {"args": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
