"""``mows serve``, ``mows config show`` and ``mows doctor``: the daemon's settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

# (flag, help) for every daemon setting; TOML keys and MOWS_* names follow the flag names.
_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    (
        "--model-path",
        {"multiple": True, "help": "A model this node serves (path or URL); repeatable."},
    ),
    ("--max-memory", {"help": "Hard cap of the pool: GB (GiB) or a size like 512MiB. Required."}),
    ("--crc32-file", {"help": "crc32 file relative to each model path [crc32.txt]."}),
    (
        "--sha256-file",
        {"help": "SHA-256 digests (sha256sum format) checked when present [sha256sums.txt]."},
    ),
    ("--nic", {"type": click.Choice(["tcp", "ucx"]), "help": "Peer transport [tcp]."}),
    ("--socket", {"help": "Local API socket [MOWS_SOCKET or /run/mows/mows.sock]."}),
    ("--pool-dir", {"help": "Shared-memory pool directory [/dev/shm/mows]."}),
    ("--allow-root", {"multiple": True, "help": "Another directory clients may load from."}),
    (
        "--chunk-size",
        {
            "help": "Chunk size: 'auto' (per model: ~1/256 of it, a power of two in "
            "1-64 MiB), MiB, or a size like 16MiB [auto]."
        },
    ),
    ("--workers", {"help": "Parallel chunk readers from the origin [4]."}),
    ("--etcd", {"help": "etcd endpoints URL[,URL..]: turns on cluster mode."}),
    ("--cluster", {"help": "Cluster name: nodes share chunks within it [default]."}),
    ("--listen", {"help": "Peer server HOST:PORT [0.0.0.0:7470]."}),
    ("--advertise", {"help": "HOST:PORT peers use to reach this node."}),
    ("--node-id", {"help": "This node's id [the advertised address]."}),
    ("--cluster-secret-file", {"help": "Shared secret peers must prove."}),
    (
        "--peer-encryption",
        {"is_flag": True, "help": "Encrypt chunk bytes between peers (AES-256-CTR) [off]."},
    ),
    ("--etcd-ca-file", {"help": "PEM CA bundle for https:// etcd [system roots]."}),
    ("--etcd-cert-file", {"help": "Client certificate (PEM) for etcd; needs --etcd-key-file."}),
    ("--etcd-key-file", {"help": "Private key (PEM) of --etcd-cert-file."}),
    ("--etcd-user", {"help": "etcd user; needs --etcd-password-file."}),
    ("--etcd-password-file", {"help": "File holding the etcd user's password."}),
    ("--lease-ttl", {"help": "Seconds before a dead node leaves [5]."}),
    ("--peer-timeout", {"help": "Seconds a stalled peer may cost [30]."}),
    ("--metrics-listen", {"help": "HOST:PORT for Prometheus metrics [off]."}),
    ("--drain-timeout", {"help": "Seconds SIGTERM waits for loads in progress [10]."}),
    (
        "--load-timeout",
        {"help": "Seconds a load may wait in line for pool space before a CapacityError [60]."},
    ),
    (
        "--prefetch",
        {
            "type": click.Choice(["share", "full", "off"]),
            "help": "Idle prefetch of --model-path models: this node's cluster share, "
            "a full local copy, or off [share].",
        },
    ),
    ("--prefetch-rate", {"help": "Bandwidth cap of prefetch per second, e.g. 100MiB [none]."}),
    ("--prefetch-delay", {"help": "Seconds after start before prefetching [3]."}),
    (
        "--scrub-interval",
        {
            "help": "Seconds per background pass re-checking pool files against their chunk "
            "CRCs; 0: only on `mows scrub` [86400]."
        },
    ),
    ("--scrub-rate", {"help": "Bandwidth cap of the background scrub per second [64MiB]."}),
]


def daemon_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every daemon setting as a flag, plus ``--config FILE.toml``."""
    fn = click.option(
        "--config", "config_file", default=None, help="TOML file with the same settings."
    )(fn)
    for flag, kwargs in reversed(_OPTIONS):
        name = flag[2:].replace("-", "_")
        fn = click.option(flag, name, default=None, **kwargs)(fn)
    return fn


@click.command()
@daemon_options
def serve(config_file: str | None, **flags: object) -> None:
    """Run the node daemon: one per machine, serving every local process."""
    from .._config import load_daemon_config
    from ..daemon import run_daemon

    def reload() -> Any:  # SIGHUP and `mows reload` read the settings again
        return load_daemon_config(flags, config_file=config_file)

    run_daemon(reload(), reload)


@click.group()
def config() -> None:
    """Inspect the daemon's configuration."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@daemon_options
def show(config_file: str | None, as_json: bool, **flags: object) -> None:
    """Print the effective configuration and where each value came from."""
    import dataclasses

    from .._config import explain_daemon_config

    cfg, origins = explain_daemon_config(flags, config_file=config_file)
    values = dataclasses.asdict(cfg)
    if as_json:
        click.echo(
            json.dumps({k: {"value": v, "from": origins[k]} for k, v in values.items()}, indent=2)
        )
        return
    width = max(map(len, values))
    for key, value in values.items():
        shown = oct(value) if key == "socket_mode" else value
        if key == "chunk_size" and value == 0:
            shown = "auto"
        click.echo(f"{key:<{width}}  {shown!s:<40}  ({origins[key]})")


@click.command()
@daemon_options
def doctor(config_file: str | None, **flags: object) -> None:
    """Check what breaks deployments; exit 1 naming each problem."""
    import sys

    from ._doctor import run_checks

    ok = run_checks(flags, config_file)
    sys.exit(0 if ok else 1)
