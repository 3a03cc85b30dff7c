"""``mows serve``: run the node daemon."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--model-path",
    "model_path",
    multiple=True,
    help="A model this node serves (path or URL); repeatable.",
)
@click.option(
    "--max-memory",
    default=None,
    help="Hard cap of the pool: GB (GiB) or a size like 512MiB. Required.",
)
@click.option(
    "--crc32-file", default=None, help="crc32 file relative to each model path [crc32.txt]."
)
@click.option(
    "--nic", type=click.Choice(["tcp", "ucx"]), default=None, help="Peer transport [tcp]."
)
@click.option(
    "--socket", default=None, help="Local API socket [MOWS_SOCKET or /run/mows/mows.sock]."
)
@click.option("--pool-dir", default=None, help="Shared-memory pool directory [/dev/shm/mows].")
@click.option(
    "--allow-root", "allow_root", multiple=True, help="Another directory clients may load from."
)
@click.option("--chunk-size", default=None, help="Chunk size (MiB, or a size like 16MiB) [64].")
@click.option("--workers", type=int, default=None, help="Parallel chunk readers [4].")
@click.option("--etcd", default=None, help="etcd endpoints URL[,URL..]: turns on cluster mode.")
@click.option(
    "--cluster", default=None, help="Cluster name: nodes share chunks within it [default]."
)
@click.option("--listen", default=None, help="Peer server HOST:PORT [0.0.0.0:7470].")
@click.option("--advertise", default=None, help="HOST:PORT peers use to reach this node.")
@click.option("--node-id", default=None, help="This node's id [the advertised address].")
@click.option("--cluster-secret-file", default=None, help="Shared secret peers must prove.")
@click.option("--lease-ttl", default=None, help="Seconds before a dead node leaves [5].")
@click.option("--peer-timeout", default=None, help="Seconds a stalled peer may cost [30].")
@click.option("--config", "config_file", default=None, help="TOML file with the same settings.")
def serve(config_file: str | None, **flags: object) -> None:
    """Run the node daemon: one per machine, serving every local process."""
    from .._config import load_daemon_config
    from ..daemon import run_daemon

    config = load_daemon_config(flags, config_file=config_file)
    run_daemon(config)
