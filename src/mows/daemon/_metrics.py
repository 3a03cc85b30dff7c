"""Prometheus metrics of the daemon (``--metrics-listen``), read at scrape from a status
snapshot the event loop builds (never from live state on the HTTP thread).

Names follow Prometheus conventions: base units (bytes, seconds), ``_total`` for counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["Metrics"]

# Chunk fetch latency: from a few ms (a 4 MiB chunk over a fast link) to minutes.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.fetch_seconds = Histogram(
            "mows_chunk_fetch_seconds",
            "Time to fetch and check one chunk, by source.",
            ["source"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatusCollector(status))
        self._server: Any = None

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self._server = start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            thread.join(5)


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        by_source = CounterMetricFamily(
            "mows_bytes",
            "Model bytes delivered to this node's clients, by source.",
            labels=["source"],
        )
        for source, key in (
            ("origin", "bytes_from_origin"),
            ("peers", "bytes_from_peers"),
            ("pool", "bytes_from_pool"),
        ):
            by_source.add_metric([source], st[key])
        yield by_source
        yield CounterMetricFamily(
            "mows_served_to_peers_bytes",
            "Bytes this node sent to peers.",
            value=st["bytes_served_to_peers"],
        )
        for name, key, doc in (
            ("mows_pool_capacity_bytes", "capacity_bytes", "The pool's hard cap."),
            ("mows_pool_used_bytes", "used_bytes", "Bytes in the pool, partial files included."),
            ("mows_pool_pinned_bytes", "pinned_bytes", "Bytes pinned by clients or loads."),
            ("mows_clients", "clients", "Connected local clients."),
        ):
            yield GaugeMetricFamily(name, doc, value=st[key])
        for name, key, doc in (
            ("mows_hits", "hits", "Opens served entirely from the pool."),
            ("mows_misses", "misses", "Opens that had to fetch."),
            ("mows_evictions", "evictions", "Files evicted from the pool."),
            ("mows_evicted_bytes", "evicted_bytes", "Bytes evicted from the pool."),
            (
                "mows_evicted_last_copy_bytes",
                "evicted_last_copy_bytes",
                "Evicted bytes no other live node held.",
            ),
            ("mows_peer_failures", "peer_failures", "Peer transfers that failed or stalled."),
            (
                "mows_origin_reads_redecided",
                "origin_reads_redecided",
                "Origin reads that went back to wait for the chunk's new owner.",
            ),
            ("mows_loads_failed", "loads_failed", "Loads that ended in an error."),
            (
                "mows_stale_opens",
                "stale_opens",
                "Warm opens served from the cached version: the origin could not be reached.",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=st[key])
        integrity = CounterMetricFamily(
            "mows_integrity_failures",
            "Data that failed its checks, by source (pool: held bytes that rotted in memory, "
            "caught before a peer got them; scrub: caught by the background scrub).",
            labels=["source"],
        )
        integrity.add_metric(["origin"], st["integrity_failures"])
        integrity.add_metric(["peers"], st["corrupt_chunks_from_peers"])
        integrity.add_metric(["pool"], st["rotten_chunks_withheld"])
        integrity.add_metric(["scrub"], st["scrub"]["mismatched_chunks"])
        yield integrity
        yield CounterMetricFamily(
            "mows_scrub_checked_bytes",
            "Pool bytes the scrub re-read and checked against their chunk CRCs.",
            value=st["scrub"]["bytes_checked"],
        )
        yield CounterMetricFamily(
            "mows_scrub_passes",
            "Full scrub passes over the pool completed.",
            value=st["scrub"]["passes"],
        )
        cluster = st.get("cluster") or {}
        yield GaugeMetricFamily(
            "mows_live_peers",
            "Other live nodes in the cluster.",
            value=max(0, len(cluster.get("nodes", [])) - 1) if cluster.get("healthy") else 0,
        )
        yield GaugeMetricFamily(
            "mows_etcd_healthy",
            "1 while the cluster directory (etcd) is reachable.",
            value=1 if cluster.get("healthy") else 0,
        )
        yield GaugeMetricFamily(
            "mows_etcd_degraded",
            "1 while etcd is unreachable and peers are tried from the last directory view.",
            value=1 if cluster.get("degraded") else 0,
        )
        yield CounterMetricFamily(
            "mows_etcd_errors",
            "etcd failures (each starts a reconnect).",
            value=cluster.get("etcd_errors", 0),
        )
        yield CounterMetricFamily(
            "mows_directory_rejected",
            "Malformed or forged cluster directory records ignored.",
            value=cluster.get("directory_rejected", 0),
        )
        loading = GaugeMetricFamily(
            "mows_load_progress_bytes",
            "Bytes fetched and to fetch of loads in progress.",
            labels=["model", "kind"],
        )
        for m in st["models"]:
            if m["progress"]:
                loading.add_metric([m["path"], "done"], m["progress"]["done"])
                loading.add_metric([m["path"], "total"], m["progress"]["total"])
        yield loading
        prefetch = GaugeMetricFamily(
            "mows_prefetch_bytes",
            "Idle prefetch: bytes held and targeted, per model.",
            labels=["model", "kind"],
        )
        for m in st.get("prefetch", {}).get("models", []):
            prefetch.add_metric([m["path"], "held"], m.get("held_bytes", 0))
            prefetch.add_metric([m["path"], "target"], m.get("target_bytes", 0))
        yield prefetch
        yield GaugeMetricFamily(
            "mows_origin_unreachable",
            "Model paths whose origin did not answer the last revalidation.",
            value=sum(m.get("origin") == "unreachable" for m in st["models"]),
        )
        yield GaugeMetricFamily(
            "mows_versions_superseded_bytes",
            "Pool bytes held by versions their origin has replaced (evicted first once free).",
            value=sum(v["reserved_bytes"] for v in st.get("versions", []) if v["superseded"]),
        )
