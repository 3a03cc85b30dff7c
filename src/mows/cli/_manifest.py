"""``mows manifest``: describe a model (files, chunks, tensors) as the daemon sees it."""

from __future__ import annotations

import click


@click.command()
@click.argument("location")
@click.option("--crc32-file", default="crc32.txt", show_default=True)
@click.option(
    "--chunk-size", default=0, show_default=True, help="Chunk size in MiB; 0: auto, as the daemon."
)
@click.option("--json", "as_json", is_flag=True, help="Print the full manifest as JSON.")
def manifest(location: str, crc32_file: str, chunk_size: int, as_json: bool) -> None:
    """Describe the model at LOCATION (a path or URL); bad headers are one-line errors."""
    import msgspec

    from ..manifest import build_manifest
    from ..sources import open_source

    with open_source(location) as source:
        m = build_manifest(source, chunk_size=chunk_size * 2**20, crc32_file=crc32_file)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(m)).decode())
        return
    click.echo(f"{m.source}: {len(m.files)} files, {m.total_bytes / 2**20:.1f} MiB")
    for f in m.files:
        crc = f"{f.crc32:08x}" if f.crc32 is not None else "--------"
        tensors = f"  {len(f.safetensors.tensors)} tensors" if f.safetensors else ""
        chunks = len(m.chunks(f.path))
        click.echo(f"  {crc}  {f.size:>14,}  {chunks:>5} chunks  {f.path}{tensors}")
    if m.unlisted:
        click.echo(f"not in {m.crc32_file}: {', '.join(m.unlisted)}")
