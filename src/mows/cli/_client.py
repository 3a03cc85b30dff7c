"""Client commands: ``mows load`` and ``mows status``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

socket_option = click.option(
    "--socket", default=None, help="The daemon's socket [MOWS_SOCKET or /run/mows/mows.sock]."
)


@click.command()
@click.argument("path")
@socket_option
@click.option("--crc32-file", default=None, help="crc32 file relative to PATH [daemon's default].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def load(
    path: str, socket: str | None, crc32_file: str | None, as_json: bool, no_progress: bool
) -> None:
    """Load the model at PATH into the node pool through the daemon."""
    import os

    from tqdm import tqdm

    from ..client import get_session

    location = path if "://" in path else os.path.abspath(path)
    session = get_session(socket)
    bar: tqdm[Any] | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if no_progress or not total:
            return
        if bar is None:
            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="loading",
                file=sys.stderr,
            )
        bar.update(done - bar.n)

    start = time.perf_counter()
    try:
        ready = session.open(location, crc32_file, progress, pin=False)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    summary = {
        "seconds": round(seconds, 4),
        "bytes": ready.manifest.total_bytes,
        "bytes_from_origin": ready.bytes_from_origin,
        "bytes_from_peers": ready.bytes_from_peers,
        "bytes_from_pool": ready.bytes_from_pool,
    }
    if as_json:
        click.echo(json.dumps(summary))
        return
    rate = summary["bytes"] / seconds / 2**30 if seconds > 0 else 0.0
    mib = 2**20
    click.echo(
        f"loaded {location}: {len(ready.manifest.files)} files, "
        f"{summary['bytes'] / mib:.1f} MiB in {seconds:.2f}s ({rate:.2f} GiB/s); "
        f"from origin {ready.bytes_from_origin / mib:.1f} MiB, "
        f"from peers {ready.bytes_from_peers / mib:.1f} MiB, "
        f"from pool {ready.bytes_from_pool / mib:.1f} MiB"
    )


@click.command()
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
def status(socket: str | None, as_json: bool) -> None:
    """Show capacity, use, models and counters of the node daemon."""
    from ..client import get_session

    st = get_session(socket).status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    gib = 2**30
    used, cap = _n(st["used_bytes"]) / gib, _n(st["capacity_bytes"]) / gib
    click.echo(
        f"pool {st['pool_dir']}: {used:.2f} / {cap:.2f} GiB used, "
        f"{_n(st['pinned_bytes']) / gib:.2f} GiB pinned, {st['clients']} clients"
    )
    click.echo(
        f"hits {st['hits']}  misses {st['misses']}  evictions {st['evictions']}  "
        f"from origin {_n(st['bytes_from_origin']) / gib:.2f} GiB  "
        f"integrity failures {st['integrity_failures']}"
    )
    sc = st.get("scrub")
    if isinstance(sc, dict):
        click.echo(
            f"scrub {sc['state']}: {sc['passes']} passes, "
            f"{_n(sc['bytes_checked']) / gib:.2f} GiB checked, "
            f"{sc['mismatched_chunks']} bad chunks ({sc['files_dropped']} files dropped)"
        )
    models = st["models"]
    assert isinstance(models, list)
    if models:
        click.echo(
            f"{'cached':>7}  {'size':>10}  {'pins':>4}  {'state':<8}  {'version':<12}  model"
        )
        for m in models:
            origin = (
                "  (origin unreachable: cached version)" if m["origin"] == "unreachable" else ""
            )
            click.echo(
                f"{100 * m['cached_fraction']:6.1f}%  {m['bytes'] / 2**20:8.1f}Mi  {m['pins']:>4}  "
                f"{m['state']:<8}  {(m['version'] or '-')[:12]:<12}  {m['path']}{origin}"
            )
    versions = st.get("versions") or []
    assert isinstance(versions, list)
    old = [v for v in versions if v["superseded"] and v["reserved_bytes"]]
    for v in old:
        click.echo(
            f"superseded version {v['id'][:12]}: {v['reserved_bytes'] / 2**20:.1f} MiB, "
            f"{v['pins']} pins, {v['users']} readers (evicted first once released)"
        )

    cluster = st.get("cluster")
    if isinstance(cluster, dict):
        if cluster["healthy"]:
            health = "connected"
        elif cluster.get("degraded"):
            health = f"DEGRADED for {cluster.get('degraded_seconds', 0):.0f}s (last view kept)"
        else:
            health = "DISCONNECTED (loads use origin)"
        click.echo(f"cluster {cluster['name']} as {cluster['node_id']}: etcd {health}")
        click.echo(
            f"{'node':<24} {'address':<22} {'used/cap GiB':>13} {'origin GiB':>10} "
            f"{'peers GiB':>9} {'served GiB':>10}"
        )
        for n in cluster["nodes"]:
            click.echo(
                f"{n['id']:<24} {n['address']:<22} "
                f"{n['used_bytes'] / gib:>6.2f}/{n['capacity_bytes'] / gib:<6.2f} "
                f"{n['bytes_from_origin'] / gib:>10.2f} {n['bytes_from_peers'] / gib:>9.2f} "
                f"{n['bytes_served_to_peers'] / gib:>10.2f}"
            )
        for m in cluster["models"]:
            click.echo(
                f"whole copies per file of {m['path'] or m['fingerprint']}: "
                f"min {m['min_copies']}, max {m['max_copies']} over {m['files']} files"
            )


def _n(v: object) -> int:
    assert isinstance(v, int)
    return v


@click.command()
@socket_option
def reload(socket: str | None) -> None:
    """Make the daemon re-read its model list and allowed roots (as SIGHUP does)."""
    from ..client import get_session

    result = get_session(socket).reload()
    click.echo(f"reloaded; roots: {', '.join(map(str, result['roots']))}")  # type: ignore[call-overload]
    if result.get("restart_needed_for"):
        click.echo(f"needs a restart to change: {result['restart_needed_for']}")


@click.command()
@click.argument("path")
@socket_option
def prefetch(path: str, socket: str | None) -> None:
    """Have the daemon fetch PATH in idle time (its cluster share, or all of it)."""
    import os

    from ..client import get_session

    result = get_session(socket).prefetch(path if "://" in path else os.path.abspath(path))
    click.echo(f"queued {result['queued']} for idle prefetch ({result['policy']})")


@click.command()
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the pass's summary as JSON.")
def scrub(socket: str | None, as_json: bool) -> None:
    """Re-check every file in the daemon's pool against its chunk CRCs now; exit 1 if any
    chunk no longer matches (its file is dropped: the next open fetches it again)."""
    from ..client import get_session

    result = get_session(socket).scrub()
    bad = result["mismatches"]
    assert isinstance(bad, list)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(
            f"scrubbed {result['files']} pool files, {_n(result['bytes']) / 2**20:.1f} MiB in "
            f"{result['seconds']}s: {len(bad) or 'no'} bad chunks"
        )
        for m in bad:
            click.echo(
                f"  {m['model']} {m['file']} chunk {m['chunk']} (bytes {m['offset']}-"
                f"{m['offset'] + m['length']}): {m['error']}: dropped"
            )
    if bad:
        sys.exit(1)
