"""This node's part in the cluster: the peer server and client, and what it tells the
directory about the versions it holds. Absent (None) on a single node."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from .._config import DaemonConfig
from .._errors import ConfigError
from ..cluster import Cluster, NodeInfo
from ..cluster._etcd import EtcdSecurity
from ..manifest import Chunk
from ..pool import FileState, PoolFile, Version
from ..transport import PeerClient, PeerServer, TcpPeerClient, TcpPeerServer
from ._chunks import ChunkTable

__all__ = ["Peering"]

log = logging.getLogger("mows.daemon")


class Peering:
    """Serves this node's chunks to peers and keeps the cluster directory told of them."""

    def __init__(
        self, config: DaemonConfig, chunks: ChunkTable, node_info: Callable[[str, str], NodeInfo]
    ) -> None:
        secret = config.cluster_secret()
        server_cls, client_cls = _transport(config.nic)
        # The node id is the advertised address unless set, and the address is known only
        # once the server listens: name the server after the fact.
        encrypt = config.peer_encryption
        if encrypt:
            _need_cryptography()
        self.server: PeerServer = server_cls(
            config.listen, chunks, node=config.node_id or "?", secret=secret, encrypt=encrypt
        )
        host, _, port = self.server.address.rpartition(":")
        self.advertise = config.advertise or (
            f"{socket.gethostname()}:{port}" if host in ("0.0.0.0", "::") else self.server.address
        )
        self.node_id = config.node_id or self.advertise
        self.server.node = self.node_id
        self.client: PeerClient = client_cls(
            node=self.node_id,
            secret=secret,
            connections=config.peer_connections,
            timeout=config.peer_timeout,
            encrypt=encrypt,
        )
        self.chunks = chunks
        self.cluster = Cluster(
            list(config.etcd),
            config.cluster,
            lambda: node_info(self.node_id, self.advertise),
            ttl=config.lease_ttl,
            security=EtcdSecurity.from_config(config),  # files read now: a bad one stops start
        )

    async def start(self, endpoints: str) -> None:
        self.cluster.start()
        if not await self.cluster.wait_healthy(5.0):
            log.warning("etcd %s not reachable yet: running alone until it is", endpoints)
        log.info(
            "node %s in cluster %s, peers connect to %s",
            self.node_id,
            self.cluster.name,
            self.advertise,
        )

    async def close(self) -> None:
        await self.cluster.close()  # deregister first: peers stop asking us
        self.server.close()
        self.client.close()

    # -- what the directory is told ------------------------------------------------------------
    def join(self, version: Version) -> None:
        """Take part in ``version`` and serve every complete file of it we hold."""
        self._join(version)
        for f in list(version.files.values()):
            if f.state is FileState.READY and not self.chunks.has_file(version.id, f.rel):
                fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self.serve_file(f, fd)
                finally:
                    os.close(fd)
                self.file_ready(f)

    def _join(self, version: Version) -> None:
        if version.id not in self.cluster.models:  # e.g. opened stale: never revalidated
            self.cluster.join(version.id, version.manifest)

    @contextlib.contextmanager
    def loading(self, version: Version, rels: list[str]) -> Iterator[None]:
        """A load or prefetch fills these files of ``version``: peers may wait on us for
        the chunks of them we own (the directory says so) until it ends."""
        self._join(version)
        files = [version.file_index(rel) for rel in rels]
        self.cluster.begin_loading(version.id, files)
        try:
            yield
        finally:
            self.cluster.end_loading(version.id, files)
            held = any(f.state is FileState.READY or f.chunk_crcs for f in version.files.values())
            if not held and not self.cluster.is_loading(version.id):
                self.cluster.leave(version.id)  # it failed with nothing held: not a member

    def serve_file(self, f: PoolFile, fd: int) -> None:
        """Serve ``f``'s checked chunks (those it holds now and those to come) from ``fd``."""
        v = f.version
        self._join(v)
        if not self.chunks.has_file(v.id, f.rel):
            self.chunks.add_file(v.id, f.rel, fd)
            for c in f.chunks():
                if c.index in f.chunk_crcs:
                    self.held(v, c, f.chunk_crcs[c.index])

    def held(
        self,
        version: Version,
        chunk: Chunk,
        crc: int,
        digest: bytes | None = None,
        *,
        first_copy: bool = False,
    ) -> None:
        """A chunk arrived and passed its checks: peers may fetch it now (pipelining; peers
        watching us are told of it if it is a ``first_copy``, read from the origin here).
        ``digest``: its BLAKE3 when a peer's transfer proved it (else computed on demand)."""
        self._join(version)
        self.chunks.add_chunk(
            version.id,
            chunk.path,
            chunk.index,
            chunk.offset,
            chunk.length,
            crc,
            digest,
            first_copy=first_copy,
        )
        self.cluster.chunk_held(version.id, version.file_index(chunk.path))

    def file_ready(self, f: PoolFile) -> None:
        """``f`` is whole and verified: served by file, its chunk CRCs shared."""
        v = f.version
        self._join(v)
        crcs = [f.chunk_crcs[c.index] for c in f.chunks()]
        self.cluster.file_complete(v.id, v.file_index(f.rel), crcs)

    def file_removed(self, f: PoolFile) -> None:
        v = f.version
        self.chunks.remove_file(v.id, f.rel)
        self.cluster.file_dropped(v.id, v.file_index(f.rel))
        if all(g is f for g in v.files.values()) and not self.cluster.is_loading(v.id):
            # Nothing of it left here (a load would have reserved its files first; one that
            # starts later joins again): not an owner or holder for anyone to wait on.
            self.cluster.leave(v.id)

    def sending(self, f: PoolFile) -> bool:
        """Is a peer being sent a chunk of ``f`` now (see ``Pool.sending``)?"""
        return self.chunks.sending(f.version.id, f.rel)

    def drain(self, f: PoolFile) -> None:
        """``f`` is to be evicted but is being sent: no new send of it starts."""
        self.chunks.drain(f.version.id, f.rel)

    def stop_serving(self, f: PoolFile) -> bool:
        """``f`` is to be evicted: stop serving it unless a send from it is in flight (then
        False: it stays, served). No send starts after a True."""
        return self.chunks.withdraw(f.version.id, f.rel)

    def owners_changed(self, version: Version, table: list[str]) -> None:
        """The version's owner table changed: the chunks we hold and now own (a dead owner's,
        got from a peer before it died) are announced to our watchers like first copies;
        else peers would wait on us for them until we held their whole file."""
        me = self.node_id
        mine = [
            (path, i)
            for path, i in self.chunks.held_chunks(version.id)
            if table[version.chunk_range(path)[i]] == me
        ]
        if mine:
            self.chunks.announce(version.id, mine)

    def is_last_copy(self, f: PoolFile) -> bool:
        """Would evicting ``f`` drop the cluster's last whole copy of it?"""
        if not self.cluster.healthy:
            return True
        v = f.version
        return self.cluster.file_copies(v.id, v.file_index(f.rel)) <= 1


def _need_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError(
            "peer_encryption needs cryptography: pip install 'mows[crypto]'"
        ) from None


def _transport(nic: str) -> tuple[Any, Any]:
    """The (server, client) classes for ``--nic``; UCX is imported only when chosen."""
    if nic == "ucx":
        from ..transport._ucx import UcxPeerClient, UcxPeerServer

        return UcxPeerServer, UcxPeerClient
    return TcpPeerServer, TcpPeerClient
