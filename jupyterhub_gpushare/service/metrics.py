"""Prometheus metrics of the service, named in JupyterHub's style.

Counters and histograms are updated as things happen; slice gauges are read
from the current watch caches at scrape time, so deleted nodes leave no stale
series behind.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

PREFIX = os.environ.get("JUPYTERHUB_METRICS_PREFIX", "jupyterhub")

EXIT_REASONS = ("admitted", "cancelled", "timeout", "abandoned")

QUEUE_EXITS = Counter(
    "gpushare_queue_exits",
    "Spawns that left the GPU queue, by why they left",
    ["reason"],
    namespace=PREFIX,
)
for _reason in EXIT_REASONS:
    QUEUE_EXITS.labels(reason=_reason)

QUEUE_WAIT = Histogram(
    "gpushare_queue_wait_duration_seconds",
    "Time spawns waited in the GPU queue before they were admitted",
    namespace=PREFIX,
    buckets=(0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600, float("inf")),
)

QUEUE_LENGTH = Gauge(
    "gpushare_queue_length",
    "Spawns waiting for GPU slices, per pool",
    ["pool"],
    namespace=PREFIX,
)


def update_queue_lengths(dispatcher: Dispatcher) -> None:
    lengths = {key: 0 for key in dispatcher.queue.pools()}
    for ticket in dispatcher.queue.waiting():
        lengths[ticket.pool.key] += 1
    for key, value in lengths.items():
        QUEUE_LENGTH.labels(pool=key).set(value)
    for labels in list(QUEUE_LENGTH._metrics):
        if labels[0] not in lengths:
            QUEUE_LENGTH.labels(pool=labels[0]).set(0)


class SliceCollector(Collector):
    """Slices per node and product, read from the watch caches at scrape time."""

    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher

    def collect(self):
        slices = GaugeMetricFamily(
            f"{PREFIX}_gpushare_node_slices",
            "GPU slices per node, by state (total, used, free)",
            labels=["node", "product", "resource", "state"],
        )
        ready = GaugeMetricFamily(
            f"{PREFIX}_gpushare_cluster_view_ready",
            "1 when the service has a consistent view of the cluster's GPU nodes",
        )
        ready.add_metric([], 1 if self.dispatcher.ready else 0)
        for resource, caps in self.dispatcher.capacities.items():
            for node in caps.values():
                for state, value in (
                    ("total", node.total),
                    ("used", node.used),
                    ("free", node.free),
                ):
                    slices.add_metric([node.name, node.product, resource, state], value)
        yield slices
        yield ready


def register(dispatcher: Dispatcher) -> SliceCollector:
    collector = SliceCollector(dispatcher)
    REGISTRY.register(collector)
    return collector
