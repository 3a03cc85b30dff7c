"""The daemon's status document (``mows status --json``, the metrics), built on the event loop.

Everything here reads live state, so it runs on the loop only; the metrics thread asks the
loop for a snapshot (``Daemon.snapshot``) instead of reading state another thread mutates.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..pool import FileState, Version

if TYPE_CHECKING:
    from ._daemon import Daemon

__all__ = ["build_status"]


def build_status(d: Daemon) -> dict[str, object]:
    pool, c = d.pool, d.counters
    return {
        "version": 2,
        "pid": os.getpid(),
        "socket": d.config.socket,
        "pool_dir": pool.root,
        "capacity_bytes": pool.capacity,
        "used_bytes": pool.used_bytes,
        "pinned_bytes": pool.pinned_bytes,
        "bytes_from_origin": c.bytes_from_origin,
        "bytes_from_peers": c.bytes_from_peers,
        "bytes_from_pool": c.bytes_from_pool,
        "hits": c.hits,
        "misses": c.misses,
        "hit_rate": c.hits / (c.hits + c.misses) if c.hits + c.misses else None,
        "evictions": pool.evictions,
        "evicted_bytes": pool.evicted_bytes,
        "evicted_last_copy_bytes": pool.evicted_last_copy_bytes,
        "integrity_failures": c.integrity_failures,
        "loads_failed": c.loads_failed,
        "stale_opens": c.stale_opens,
        "clients": d.api.clients,
        "bytes_served_to_peers": d.chunks.bytes_served,
        "peer_failures": c.peer_failures,
        "corrupt_chunks_from_peers": c.corrupt_from_peers,
        "origin_reads_redecided": c.origin_reads_redecided,
        "rotten_chunks_withheld": d.chunks.rotten,
        "scrub": d.scrubber.status(),
        "models": [_location(d, loc) for loc in d.known_locations()],
        "versions": [_version(d, v) for v in sorted(pool.versions.values(), key=lambda v: v.id)],
        "cluster": _cluster(d),
        "prefetch": {
            "policy": d.config.prefetch,
            "rate_bytes_per_s": d.config.prefetch_rate or None,
            "models": [
                {"path": loc, **st}
                for loc, st in (d.prefetcher.state.items() if d.prefetcher else ())
            ],
        },
    }


def _location(d: Daemon, location: str) -> dict[str, object]:
    v = d.loads.version_of(location)
    info = d.loads.location_info(location)
    files = []
    total = cached = 0
    if v is not None:
        for entry in v.manifest.files:
            ok = v.ready(entry.path) is not None
            total += entry.size
            cached += entry.size if ok else 0
            files.append({"path": entry.path, "size": entry.size, "cached": ok})
    loading = d.loads.loading(v) if v is not None else None
    if loading is not None:
        state = "loading"
    elif v is None:
        state = "absent"
    else:
        state = "cached" if cached == total else "partial" if cached else "absent"
    pins = max((f.pins for f in v.files.values()), default=0) if v is not None else 0
    return {
        "path": location,
        "id": v.id if v is not None else None,
        "version": info["version"],
        "origin": info["origin"],
        "origin_error": info["origin_error"],
        "state": state,
        "bytes": total,
        "cached_bytes": cached,
        "cached_fraction": (cached / total) if total else (1.0 if v is not None else 0.0),
        "pins": pins,
        "progress": {"done": loading[0], "total": loading[1]} if loading else None,
        "files": files,
    }


def _version(d: Daemon, v: Version) -> dict[str, object]:
    return {
        "id": v.id,
        "locations": sorted(v.locations),
        "superseded": v.superseded,
        "bytes": v.total_bytes,
        "cached_bytes": v.cached_bytes(),
        "reserved_bytes": v.reserved_bytes(),
        "partial_files": sum(f.state is FileState.PARTIAL for f in v.files.values()),
        "pins": max((f.pins for f in v.files.values()), default=0),
        "users": v.users,
    }


def _cluster(d: Daemon) -> dict[str, object] | None:
    if d.peering is None:
        return None
    cl = d.peering.cluster
    me = d.node_info(d.peering.node_id, d.peering.advertise)
    nodes = [me, *cl.live_peers()]
    models = []
    for v in sorted(d.pool.versions.values(), key=lambda v: v.id):
        copies = cl.copies(v.id)
        models.append(
            {
                "path": v.manifest.source,
                "fingerprint": v.id,
                "files": len(copies),
                "chunk_size": v.manifest.chunk_size,
                "min_copies": min(copies, default=0),
                "max_copies": max(copies, default=0),
                "copies": copies,
            }
        )
    return {
        "name": cl.name,
        "node_id": cl.node_id,
        "healthy": cl.healthy,
        "degraded": cl.degraded,
        "degraded_seconds": round(cl.degraded_seconds, 1),
        "etcd": list(cl.endpoints),
        "etcd_errors": cl.etcd_errors,
        "etcd_last_error": cl.last_error,
        "directory_rejected": cl.rejected_records,
        "nodes": [
            {
                "id": n.id,
                "address": n.address,
                "capacity_bytes": n.capacity,
                "used_bytes": n.used,
                "alive": True,
                "bytes_from_origin": n.bytes_from_origin,
                "bytes_from_peers": n.bytes_from_peers,
                "bytes_served_to_peers": n.bytes_served,
            }
            for n in sorted(nodes, key=lambda n: n.id)
        ],
        "models": [*models],
        "breakers": d.fetcher.breakers(),
    }
