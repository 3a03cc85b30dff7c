"""``mows crc32 generate|verify``."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import click

from .._errors import MowsError

if TYPE_CHECKING:
    from ..manifest import FileStat
    from ..sources import Source


@click.group()
def crc32() -> None:
    """Generate or verify a model's crc32.txt (standard CRC-32, as the crc32 tool prints)."""


def _model_arg(value: str) -> str:
    """A local directory (checked here, as click would) or a URL, left to its source."""
    if "://" not in value and not os.path.isdir(value):
        raise click.BadParameter(f"directory {value!r} does not exist", param_hint="MODEL_DIR")
    return value


@crc32.command()
@click.argument("model_dir", callback=lambda _c, _p, v: _model_arg(v))
@click.option(
    "-o",
    "--output",
    default=None,
    help="Where to write (default MODEL_DIR/crc32.txt, stdout for a URL; - = stdout).",
)
@click.option("--workers", type=int, default=None, help="Blocks in flight.")
@click.option(
    "--sha256",
    is_flag=True,
    help="Also write SHA-256 digests (sha256sum format) to sha256sums.txt beside the output; "
    "the daemon checks them too (CRC-32 alone does not stop a deliberate change).",
)
def generate(model_dir: str, output: str | None, workers: int | None, sha256: bool) -> None:
    """Write '<crc32> <path>' for every file of MODEL_DIR (a directory or a URL such as
    s3://bucket/prefix), sorted by path. Nothing is written to a remote store: upload the
    output yourself."""
    from .._verify import crc32_of_files
    from ..manifest import format_crc32, format_sha256
    from ..sources import open_source
    from ..sources._local import LocalSource

    with open_source(model_dir) as source:
        if isinstance(source, LocalSource):
            target = output or os.path.join(source.root, "crc32.txt")
        else:
            target = output or "-"
        if sha256 and target == "-":
            raise click.UsageError("--sha256 writes beside the crc32 file: give -o FILE")
        sha_target = os.path.join(os.path.dirname(target), SHA256_FILE) if sha256 else None
        if isinstance(source, LocalSource):
            skip = {os.path.realpath(t) for t in (target, sha_target) if t and t != "-"}
            files = [
                f
                for f in source.list_files()
                if os.path.realpath(os.path.join(source.root, f.path)) not in skip
            ]
        else:  # every object (not just an old crc32.txt's names), less the checksum files
            listing = getattr(source, "list_objects", source.list_files)()
            skip = {"crc32.txt", SHA256_FILE} if sha256 else {"crc32.txt"}
            files = [f for f in listing if f.path not in skip]
        if sha256:
            crcs, digests = _crc32_and_sha256(source, files, workers)
        else:
            crcs, digests = crc32_of_files(source, files, workers=workers), {}
    errors = {p: v for p, v in (crcs | digests).items() if isinstance(v, Exception)}
    if errors:
        for path, err in errors.items():
            click.echo(f"{path}: {err}", err=True)
        raise MowsError(f"could not read {len(errors)} file(s)")
    text = format_crc32({p: v for p, v in crcs.items() if isinstance(v, int)})
    if target == "-":
        sys.stdout.write(text)
        return
    if sha_target is not None:
        _write(sha_target, format_sha256({p: v for p, v in digests.items() if isinstance(v, str)}))
        click.echo(f"wrote {len(files)} entries to {sha_target}", err=True)
    _write(target, text)
    click.echo(f"wrote {len(files)} entries to {target}", err=True)


SHA256_FILE = "sha256sums.txt"  # the daemon's default sha256_file


def _write(target: str, text: str) -> None:
    tmp = f"{target}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, target)  # never leave a half-written checksum file


def _crc32_and_sha256(
    source: Source, files: list[FileStat], workers: int | None
) -> tuple[dict[str, int | Exception], dict[str, str | Exception]]:
    """CRC-32 and SHA-256 of each file in one read: SHA-256 is sequential within a file, so
    files, not blocks, are spread over the workers."""
    from .._crc import crc32
    from .._verify import BLOCK

    def both(f: FileStat) -> tuple[int, str]:
        buf = memoryview(bytearray(BLOCK))
        crc, digest = 0, hashlib.sha256()
        for off in range(0, f.size, BLOCK):
            view = buf[: min(BLOCK, f.size - off)]
            source.read_into(f.path, off, view)
            crc = crc32(view, crc)
            digest.update(view)
        return crc, digest.hexdigest()

    crcs: dict[str, int | Exception] = {}
    digests: dict[str, str | Exception] = {}
    with ThreadPoolExecutor(workers or min(4, (os.cpu_count() or 2) + 1)) as pool:
        for f, fut in [(f, pool.submit(both, f)) for f in files]:
            try:
                crcs[f.path], digests[f.path] = fut.result()
            except Exception as e:
                crcs[f.path] = digests[f.path] = e
    return crcs, digests


@crc32.command()
@click.argument("model_dir", callback=lambda _c, _p, v: _model_arg(v))
@click.option("--crc32-file", default="crc32.txt", show_default=True, help="Relative to MODEL_DIR.")
@click.option("--workers", type=int, default=None, help="Blocks in flight.")
@click.option("-q", "--quiet", is_flag=True, help="Print only failures.")
def verify(model_dir: str, crc32_file: str, workers: int | None, quiet: bool) -> None:
    """Check every file the crc32 file lists; exit 1 naming each bad or unreadable file."""
    from .._verify import verify_model

    start = time.perf_counter()
    report = verify_model(model_dir, crc32_file, workers=workers)
    seconds = time.perf_counter() - start
    for r in report.bad:
        if r.actual is None:
            click.echo(f"UNREADABLE {r.path}: {r.error}", err=True)
        else:
            click.echo(
                f"MISMATCH {r.path}: expected {r.expected:08x}, got {r.actual:08x}", err=True
            )
    if not quiet:
        for path in report.unlisted:
            click.echo(f"unlisted (not checked) {path}", err=True)
        rate = report.bytes_checked / seconds / 2**30 if seconds > 0 else 0.0
        click.echo(
            f"{len(report.results) - len(report.bad)}/{len(report.results)} files OK, "
            f"{report.bytes_checked / 2**20:.1f} MiB in {seconds:.2f}s ({rate:.2f} GiB/s)",
            err=True,
        )
    if not report.ok:
        sys.exit(1)
