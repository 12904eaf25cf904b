"""Slice capacity of GPU nodes, from Node and Pod objects (plain dicts).

Pure arithmetic over what the watches hold; no I/O. A pool is the set of nodes
a spawn may land on: its GPU resource plus the node selector of its profile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from .objects import COUNT_LABEL, MEMORY_LABEL, PRODUCT_LABEL, REPLICAS_LABEL, STRATEGY_LABEL

HUB_USER_ANNOTATION = "hub.jupyter.org/username"
HUB_SERVER_LABEL = "hub.jupyter.org/servername"
TICKET_ANNOTATION = "gpushare.jupyter.org/ticket"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


def quantity(value: object) -> int:
    """A whole-number Kubernetes quantity (GPU counts), 0 when it is not one."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def pod_slices(pod: Mapping, resource: str) -> int:
    """Slices a pod asks for: the sum over its containers (limit, else request)."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        limits = resources.get("limits") or {}
        requests = resources.get("requests") or {}
        total += quantity(limits.get(resource, requests.get(resource, 0)))
    return total


def holds_slices(pod: Mapping) -> bool:
    """A bound pod holds its slices until it terminates or is gone."""
    return bool((pod.get("spec") or {}).get("nodeName")) and (
        (pod.get("status") or {}).get("phase") not in TERMINAL_PHASES
    )


@dataclass(frozen=True)
class PoolSpec:
    """Where a spawn may run: a GPU resource and the node labels its profile selects."""

    resource: str = "nvidia.com/gpu"
    selector: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_selector(cls, resource: str, selector: Mapping[str, str] | None) -> PoolSpec:
        return cls(resource, tuple(sorted((selector or {}).items())))

    @cached_property
    def key(self) -> str:
        """The pool's name: resource and selector as one string (read very often)."""
        labels = ",".join(f"{k}={v}" for k, v in self.selector)
        return f"{self.resource}|{labels}" if labels else self.resource

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector)


@dataclass
class Holder:
    namespace: str
    pod: str
    slices: int
    since: str | None
    user: str | None = None  # set for the hub's own user pods
    server: str | None = None
    ticket: str | None = None


@dataclass
class NodeCapacity:
    name: str
    labels: Mapping[str, str]
    total: int
    used: int
    schedulable: bool
    holders: list[Holder] = field(default_factory=list)
    booked: int = 0  # slices promised to admitted spawns whose pods are not bound yet

    @property
    def free(self) -> int:
        """Slices no pod holds, on a node that takes pods (bookings not subtracted)."""
        return max(self.total - self.used, 0) if self.schedulable else 0

    @property
    def available(self) -> int:
        """Free slices nobody was promised."""
        return max(self.free - self.booked, 0)

    @property
    def product(self) -> str:
        return self.labels.get(PRODUCT_LABEL, "unknown GPU")

    @property
    def gpus(self) -> int:
        return quantity(self.labels.get(COUNT_LABEL, 0))

    @property
    def replicas(self) -> int:
        return quantity(self.labels.get(REPLICAS_LABEL, 1)) or 1

    @property
    def memory_mib(self) -> int | None:
        return quantity(self.labels.get(MEMORY_LABEL, 0)) or None

    @property
    def strategy(self) -> str:
        return self.labels.get(STRATEGY_LABEL, "none")


def node_schedulable(node: Mapping) -> bool:
    """Cordoned and NotReady nodes offer no slices."""
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def holder_of(pod: Mapping, slices: int) -> Holder:
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    user = annotations.get(HUB_USER_ANNOTATION)
    return Holder(
        namespace=meta.get("namespace", ""),
        pod=meta.get("name", ""),
        slices=slices,
        since=(pod.get("status") or {}).get("startTime") or meta.get("creationTimestamp"),
        user=user,
        server=labels.get(HUB_SERVER_LABEL, "") if user is not None else None,
        ticket=annotations.get(TICKET_ANNOTATION),
    )


def node_capacities(
    nodes: Iterable[Mapping], pods: Iterable[Mapping], resource: str
) -> dict[str, NodeCapacity]:
    """Capacity of every node that advertises ``resource``, keyed by node name."""
    result: dict[str, NodeCapacity] = {}
    for node in nodes:
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        total = quantity(allocatable.get(resource, 0))
        if total <= 0:
            continue
        meta = node.get("metadata") or {}
        result[meta["name"]] = NodeCapacity(
            name=meta["name"],
            labels=meta.get("labels") or {},
            total=total,
            used=0,
            schedulable=node_schedulable(node),
        )
    for pod in pods:
        if not holds_slices(pod):
            continue
        node = result.get(pod["spec"]["nodeName"])
        slices = pod_slices(pod, resource)
        if node is None or slices <= 0:
            continue
        node.used += slices
        node.holders.append(holder_of(pod, slices))
    return result


def pool_totals(spec: PoolSpec, capacities: Mapping[str, NodeCapacity], waiting: int = 0) -> dict:
    """A pool's public summary computed from scratch over every node: what
    :class:`.clusterview.ClusterView` keeps current event by event."""
    nodes = [n for n in capacities.values() if spec.matches(n.labels)]
    free = sum(n.free for n in nodes)
    booked = sum(min(n.booked, n.free) for n in nodes)
    return {
        "key": spec.key,
        "resource": spec.resource,
        "selector": dict(spec.selector),
        "products": sorted({n.product for n in nodes}),
        "sharing": sorted({n.strategy for n in nodes}),
        "nodes": len(nodes),
        "slices_total": sum(n.total for n in nodes),
        "slices_used": sum(min(n.used, n.total) for n in nodes),
        "slices_booked": booked,
        "slices_free": max(free - booked, 0),
        "waiting": waiting,
    }
