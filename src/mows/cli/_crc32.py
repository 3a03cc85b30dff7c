"""``mows crc32 generate|verify``."""

from __future__ import annotations

import os
import sys
import time

import click

from .._errors import MowsError


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
def generate(model_dir: str, output: str | None, workers: int | None) -> None:
    """Write '<crc32> <path>' for every file of MODEL_DIR (a directory or a URL such as
    s3://bucket/prefix), sorted by path. Nothing is written to a remote store: upload the
    output yourself."""
    from .._verify import crc32_of_files
    from ..manifest import format_crc32
    from ..sources import open_source
    from ..sources._local import LocalSource

    with open_source(model_dir) as source:
        if isinstance(source, LocalSource):
            target = output or os.path.join(source.root, "crc32.txt")
            skip = os.path.realpath(target) if target != "-" else None
            files = [f for f in source.list_files() if os.path.join(source.root, f.path) != skip]
        else:  # every object (not just an old crc32.txt's names), less that crc32.txt
            target = output or "-"
            listing = getattr(source, "list_objects", source.list_files)()
            files = [f for f in listing if f.path != "crc32.txt"]
        crcs = crc32_of_files(source, files, workers=workers)
    errors = {p: v for p, v in crcs.items() if isinstance(v, Exception)}
    if errors:
        for path, err in errors.items():
            click.echo(f"{path}: {err}", err=True)
        raise MowsError(f"could not read {len(errors)} file(s)")
    text = format_crc32({p: v for p, v in crcs.items() if isinstance(v, int)})
    if target == "-":
        sys.stdout.write(text)
        return
    tmp = f"{target}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, target)  # never leave a half-written crc32.txt
    click.echo(f"wrote {len(files)} entries to {target}", err=True)


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
