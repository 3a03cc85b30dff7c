"""``mows doctor``: /dev/shm size, socket and pool permissions, etcd, peers, crc32 files."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from typing import Any

import click

from .._errors import MowsError


def run_checks(flags: dict[str, object], config_file: str | None) -> bool:
    from .._config import DaemonConfig, load_daemon_config

    results: list[bool] = []

    def check(name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
        except (MowsError, OSError) as e:
            click.echo(f"FAIL  {name}: {e}")
            results.append(False)
        else:
            click.echo(f"ok    {name}: {detail}")
            results.append(True)

    try:
        cfg: DaemonConfig = load_daemon_config(flags, config_file=config_file)
    except MowsError as e:
        click.echo(f"FAIL  configuration: {e}")
        return False
    click.echo("ok    configuration")
    check(f"pool memory ({cfg.pool_dir})", lambda: _shm(cfg))
    check(f"pool directory ({cfg.pool_dir})", lambda: _pool_dir(cfg))
    check(f"daemon socket ({cfg.socket})", lambda: _socket(cfg))
    for root in cfg.model_paths:
        check(f"crc32 file of {root}", functools.partial(_crc32, cfg, root))
    if cfg.etcd:
        peers: list[Any] = []
        check(f"etcd ({','.join(cfg.etcd)})", lambda: _etcd(cfg, peers))
        for node in peers:
            check(f"peer {node.id} ({node.address})", functools.partial(_peer, cfg, node))
    return all(results)


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _shm(cfg: Any) -> str:
    st = os.statvfs(_existing_parent(cfg.pool_dir))
    total = st.f_frsize * st.f_blocks
    if total < cfg.max_memory:
        raise MowsError(
            f"the filesystem holds {total / 2**30:.1f} GiB but --max-memory is "
            f"{cfg.max_memory / 2**30:.1f} GiB (enlarge /dev/shm, e.g. a memory-backed volume)"
        )
    return f"{total / 2**30:.1f} GiB for a {cfg.max_memory / 2**30:.1f} GiB cap"


def _pool_dir(cfg: Any) -> str:
    parent = _existing_parent(cfg.pool_dir)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MowsError(f"{parent} is not writable by uid {os.getuid()}")
    return f"writable ({parent})"


def _socket(cfg: Any) -> str:
    from ..client import Session

    if not os.path.exists(cfg.socket):
        raise MowsError(f"{cfg.socket} does not exist: is `mows serve` running with this --socket?")
    session = Session(cfg.socket, timeout=3)
    try:
        st = session.status()
    finally:
        session.close()
    mode = oct(os.stat(cfg.socket).st_mode & 0o777)
    return f"daemon pid {st['pid']} answers; socket mode {mode}"


def _crc32(cfg: Any, root: str) -> str:
    from ..manifest import build_manifest
    from ..sources import open_source

    with open_source(root, **cfg.sources) as source:
        m = build_manifest(
            source, crc32_file=cfg.crc32_file, require_crc32_file=True, index_tensors=False
        )
    note = f", {len(m.unlisted)} files not listed" if m.unlisted else ""
    return f"{m.crc32_file} lists {len(m.files) - len(m.unlisted)} files{note}"


def _etcd(cfg: Any, peers: list[Any]) -> str:
    import msgspec

    from ..cluster import NodeInfo
    from ..cluster._etcd import EtcdSecurity, open_client

    security = EtcdSecurity.from_config(cfg)

    async def probe() -> list[Any]:
        client = open_client(cfg.etcd[0], security)
        try:
            await asyncio.wait_for(client.connect(), 5)
            result = await asyncio.wait_for(
                client.get_prefix(f"/mows/{cfg.cluster}/nodes/".encode()), 5
            )
            nodes = []
            for kv in result:  # a malformed record is skipped, not a crash of the doctor
                try:
                    nodes.append(msgspec.msgpack.decode(kv.value, type=NodeInfo))
                except msgspec.DecodeError:
                    continue
            return nodes
        finally:
            await client.close()

    try:
        nodes = asyncio.run(probe())
    except Exception as e:
        raise MowsError(f"unreachable: {type(e).__name__}: {e}") from None
    peers.extend(n for n in nodes if n.id != cfg.node_id)
    return f"reachable, {len(nodes)} live nodes in cluster {cfg.cluster!r}"


def _peer(cfg: Any, node: Any) -> str:
    from .._errors import PeerError
    from ..transport import TcpPeerClient

    client = TcpPeerClient(
        node="mows-doctor", secret=cfg.cluster_secret(), timeout=5, encrypt=cfg.peer_encryption
    )
    try:
        client.fetch(node.address, "doctor", "probe", 0, memoryview(bytearray(1)), None, node.id)
    except PeerError as e:
        if "not held" in e.reason:  # authenticated and answering: that is all we asked
            return "reachable, secret accepted"
        raise
    finally:
        client.close()
    return "reachable"
