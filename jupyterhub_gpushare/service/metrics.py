"""Prometheus metrics of the service, named in JupyterHub's style.

A leaf module: it imports nothing of the service. Counters and histograms are
updated as things happen, with every label value created up front; gauges of
the cluster and the line are read at scrape time from a :class:`Snapshot`
that the service hands over, so a deleted node or pool leaves no stale series.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

PREFIX = os.environ.get("JUPYTERHUB_METRICS_PREFIX", "jupyterhub")

# why a spawn left the line: admitted; cancelled (Stop, REST API, start failed);
# timeout (queue_timeout); abandoned (its place was held after its spawn went
# away, and nobody came back for it)
EXIT_REASONS = ("admitted", "cancelled", "timeout", "abandoned")
REFUSAL_REASONS = ("user_limit",)

QUEUE_EXITS = Counter(
    "gpushare_queue_exits",
    "Spawns that left the GPU queue, by why they left",
    ["reason"],
    namespace=PREFIX,
)
for _reason in EXIT_REASONS:
    QUEUE_EXITS.labels(reason=_reason)

QUEUE_REFUSALS = Counter(
    "gpushare_queue_refusals",
    "Spawns refused a place in the GPU queue, by why",
    ["reason"],
    namespace=PREFIX,
)
for _reason in REFUSAL_REASONS:
    QUEUE_REFUSALS.labels(reason=_reason)

QUEUE_WAIT = Histogram(
    "gpushare_queue_wait_duration_seconds",
    "Time spawns waited in the GPU queue before they were admitted",
    namespace=PREFIX,
    buckets=(0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600, float("inf")),
)

# why a server was reclaimed (idle for the idle time, or held past the maximum
# hold time while others waited), and what came of it: stopped; dry_run (only
# reported); skipped (its user came back, or it was already stopping or gone,
# when the service looked again just before stopping it); failed (the hub
# refused or did not answer)
RECLAIM_REASONS = ("idle", "max_hold")
RECLAIM_OUTCOMES = ("stopped", "dry_run", "skipped", "failed")

SERVERS_RECLAIMED = Counter(
    "gpushare_servers_reclaimed",
    "GPU servers stopped (or, in a dry run, found) to free slices for waiting users, "
    "by why and what came of it",
    ["reason", "outcome"],
    namespace=PREFIX,
)
for _reason in RECLAIM_REASONS:
    for _outcome in RECLAIM_OUTCOMES:
        SERVERS_RECLAIMED.labels(reason=_reason, outcome=_outcome)

IDLE_SLICES_HELD = Counter(
    "gpushare_idle_slices_held_seconds",
    "Slice-seconds held by servers idle for longer than the reclaim idle time while "
    "someone waited whom those slices could serve (counted whether reclaim is on or not)",
    namespace=PREFIX,
)

RECLAIMED_USERS_RETURNED = Counter(
    "gpushare_reclaimed_users_returned",
    "Reclaimed servers whose user started them again within 5 minutes (reclaims that "
    "were perhaps too eager)",
    namespace=PREFIX,
)


@dataclass
class NodeSlices:
    node: str
    product: str
    resource: str
    total: int
    used: int
    booked: int
    free: int  # neither used nor booked


@dataclass
class Snapshot:
    """What the gauges show, taken when Prometheus scrapes."""

    ready: bool
    nodes: list[NodeSlices] = field(default_factory=list)
    waiting: dict[str, int] = field(default_factory=dict)  # per pool key
    held: int = 0


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot()
        slices = GaugeMetricFamily(
            f"{PREFIX}_gpushare_node_slices",
            "GPU slices per node, by state (total; used by pods; booked for admitted "
            "spawns; free: neither)",
            labels=["node", "product", "resource", "state"],
        )
        for n in snap.nodes:
            for state, value in (
                ("total", n.total),
                ("used", n.used),
                ("booked", n.booked),
                ("free", n.free),
            ):
                slices.add_metric([n.node, n.product, n.resource, state], value)
        ready = GaugeMetricFamily(
            f"{PREFIX}_gpushare_cluster_view_ready",
            "1 when the service has a consistent view of the cluster's GPU nodes",
        )
        ready.add_metric([], 1 if snap.ready else 0)
        length = GaugeMetricFamily(
            f"{PREFIX}_gpushare_queue_length",
            "Spawns waiting for GPU slices, per pool",
            labels=["pool"],
        )
        for pool, count in sorted(snap.waiting.items()):
            length.add_metric([pool], count)
        held = GaugeMetricFamily(
            f"{PREFIX}_gpushare_queue_held_places",
            "Places in line kept for spawns that went away (a hub restart), for a while",
        )
        held.add_metric([], snap.held)
        yield from (slices, ready, length, held)


def register(snapshot: Callable[[], Snapshot]) -> SnapshotCollector:
    collector = SnapshotCollector(snapshot)
    REGISTRY.register(collector)
    return collector
