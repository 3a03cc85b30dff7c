"""Whole-model CRC-32 checks: several blocks in flight, each byte read once.

Blocks are read (``preadv`` locally, ranged GETs from object stores) into a few reusable
buffers small enough to stay in cache, CRC'd there (isal releases the GIL, so threads
overlap), and combined into file CRCs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import msgspec

from ._crc import combine_chunks, crc32
from .manifest import FileStat, build_manifest
from .sources import Source, open_source

__all__ = ["FileResult", "VerifyReport", "crc32_of_files", "verify_model"]

BLOCK = 4 * 1024 * 1024


class FileResult(msgspec.Struct, frozen=True):
    path: str
    expected: int | None
    actual: int | None  # None when the file could not be read
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.actual is not None and self.actual == self.expected


class VerifyReport(msgspec.Struct, frozen=True):
    crc32_file: str
    results: tuple[FileResult, ...]
    unlisted: tuple[str, ...]
    bytes_checked: int

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def bad(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]


def crc32_of_files(
    source: Source,
    files: Iterable[FileStat],
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int | Exception]:
    """CRC-32 of each file, computed block-parallel; an unreadable file maps to its error."""
    files = list(files)
    workers = workers or min(4, (os.cpu_count() or 2) + 1)
    local = threading.local()

    def block_crc(path: str, offset: int, length: int) -> tuple[int, int]:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(BLOCK))
        view = buf[:length]
        source.read_into(path, offset, view)
        if progress is not None:
            progress(length)
        return crc32(view), length

    out: dict[str, int | Exception] = {}
    with ThreadPoolExecutor(workers, thread_name_prefix="mows-crc") as pool:
        futures = {
            f.path: [
                pool.submit(block_crc, f.path, off, min(BLOCK, f.size - off))
                for off in range(0, f.size, BLOCK)
            ]
            for f in files
        }
        for path, parts in futures.items():
            try:
                out[path] = combine_chunks(p.result() for p in parts)
            except Exception as e:
                out[path] = e
                for p in parts:
                    p.cancel()
    return out


def verify_model(
    model_dir: str | os.PathLike[str],
    crc32_file: str = "crc32.txt",
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every file the crc32 file lists; raises ``Crc32FileError`` for a bad crc32 file."""
    with open_source(model_dir) as source:
        manifest = build_manifest(
            source, crc32_file=crc32_file, require_crc32_file=True, index_tensors=False
        )
        listed = [f for f in manifest.files if f.crc32 is not None]
        stats = [FileStat(f.path, f.size, f.mtime_ns) for f in listed]
        crcs = crc32_of_files(source, stats, workers=workers, progress=progress)
    results = []
    for f in listed:
        got = crcs[f.path]
        if isinstance(got, Exception):
            results.append(FileResult(f.path, f.crc32, None, str(got)))
        else:
            results.append(FileResult(f.path, f.crc32, got))
    return VerifyReport(
        manifest.crc32_file or crc32_file,
        tuple(results),
        manifest.unlisted,
        sum(f.size for f in listed),
    )
