"""Slice capacity of the whole cluster, kept current one watch event at a time.

A pod event touches one node: its used slices and holders change, and the
totals of the pools that node belongs to change by the difference. Nothing
is recomputed over the cluster, so an event costs the same on a thousand nodes
as on one. :func:`.capacity.node_capacities` computes the same numbers from
scratch; a property test keeps the two equal.

Bookings (slices promised to admitted spawns whose pods are not bound yet) are
part of the view: free slices a user is shown exclude them. Pure, no I/O: the
watchers feed it objects, the queue books and releases slices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .capacity import (
    HUB_SERVER_LABEL,
    HUB_USER_ANNOTATION,
    TICKET_ANNOTATION,
    NodeCapacity,
    PoolSpec,
    holder_of,
    holds_slices,
    node_schedulable,
    pod_slices,
    quantity,
)
from .objects import PRODUCT_LABEL, STRATEGY_LABEL

NodeKey = tuple[str, str]  # (resource, node name)


@dataclass
class _Node:
    name: str
    labels: Mapping[str, str]
    totals: dict[str, int]  # allocatable slices per resource
    schedulable: bool


@dataclass
class _Pod:
    node: str
    slices: dict[str, int]  # per resource
    user: str | None
    server: str | None
    ticket: str | None
    deleting: bool = False  # being deleted: its slices free within seconds


@dataclass
class PoolTotals:
    """Running sums over a pool's nodes."""

    total: int = 0
    used: int = 0
    free: int = 0  # not used, on schedulable nodes (bookings not subtracted)
    booked: int = 0  # of those free slices, promised to admitted spawns
    nodes: int = 0
    products: Counter = field(default_factory=Counter)
    sharing: Counter = field(default_factory=Counter)  # nodes per sharing strategy

    @property
    def available(self) -> int:
        """Free slices nobody has been promised: what a user is shown as free."""
        return max(self.free - self.booked, 0)

    def public(self, spec: PoolSpec, waiting: int) -> dict:
        """The pool as users see it: aggregate numbers only, no names."""
        return {
            "key": spec.key,
            "resource": spec.resource,
            "selector": dict(spec.selector),
            "products": sorted(p for p, n in self.products.items() if n > 0),
            "sharing": sorted(s for s, n in self.sharing.items() if n > 0),
            "nodes": self.nodes,
            "slices_total": self.total,
            "slices_used": self.used,
            "slices_booked": self.booked,
            "slices_free": self.available,
            "waiting": waiting,
        }


class ClusterView:
    """Nodes, the GPU pods bound to them and the slices booked on them."""

    def __init__(self, resources: Iterable[str]) -> None:
        self.resources = tuple(resources)
        self.nodes: dict[str, _Node] = {}
        self.pods: dict[str, _Pod] = {}
        self.used: Counter[NodeKey] = Counter()
        self.booked: Counter[NodeKey] = Counter()
        self.holders: dict[NodeKey, dict[str, Mapping]] = {}  # pod key -> the pod
        self.pools: dict[str, PoolSpec] = {}
        self.totals: dict[str, PoolTotals] = {}
        self._members: dict[str, set[str]] = {}  # node -> keys of the pools it is in
        # what each node adds to its pools' totals: (total, used, free, booked)
        self._contribution: dict[NodeKey, tuple[int, int, int, int]] = {}
        self._with_room: dict[str, set[str]] = {r: set() for r in self.resources}
        self._by_user: dict[str, dict[str, _Pod]] = {}
        # bumped whenever which nodes belong to which pools may have changed
        self.membership_version = 0
        # what changed since the dispatcher last looked (take_changes)
        self.freed: set[NodeKey] = set()
        self.changed_pools: set[str] = set()
        self.bound_tickets: set[str] = set()
        self.released: list[tuple[NodeKey, int]] = []
        self.hub_pods_changed = False
        for resource in self.resources:
            self.add_pool(PoolSpec(resource))

    # -- pools --------------------------------------------------------------------
    def add_pool(self, spec: PoolSpec) -> None:
        """Start keeping totals for ``spec``: the one scan over all nodes it costs."""
        if spec.key in self.pools:
            return
        self.pools[spec.key] = spec
        self.totals[spec.key] = PoolTotals()
        self.membership_version += 1
        for name, node in self.nodes.items():
            if self._belongs(spec, node):
                self._members.setdefault(name, set()).add(spec.key)
                self._count(spec.key, name, +1)

    def _belongs(self, spec: PoolSpec, node: _Node) -> bool:
        return node.totals.get(spec.resource, 0) > 0 and spec.matches(node.labels)

    def _count(self, pool_key: str, name: str, sign: int) -> None:
        """Count a node, with what it contributes now, into (+1) or out of (-1) a pool."""
        spec, totals = self.pools[pool_key], self.totals[pool_key]
        total, used, free, booked = self._contribution.get((spec.resource, name), (0, 0, 0, 0))
        totals.total += sign * total
        totals.used += sign * used
        totals.free += sign * free
        totals.booked += sign * booked
        totals.nodes += sign
        labels = self.nodes[name].labels
        totals.products[labels.get(PRODUCT_LABEL, "unknown GPU")] += sign
        totals.sharing[labels.get(STRATEGY_LABEL, "none")] += sign
        self.changed_pools.add(pool_key)

    def pools_of(self, node: str) -> set[str]:
        return self._members.get(node, set())

    # -- per-node numbers -----------------------------------------------------------
    def total(self, key: NodeKey) -> int:
        node = self.nodes.get(key[1])
        return node.totals.get(key[0], 0) if node else 0

    def free(self, key: NodeKey) -> int:
        """Slices no pod holds, on a node that takes pods (bookings not subtracted)."""
        node = self.nodes.get(key[1])
        if node is None or not node.schedulable:
            return 0
        return max(node.totals.get(key[0], 0) - self.used[key], 0)

    def available(self, key: NodeKey) -> int:
        """Free slices nobody was promised."""
        return max(self.free(key) - self.booked[key], 0)

    def nodes_with_room(self, resource: str) -> set[str]:
        """Names of the nodes where ``available`` is above zero (usually few)."""
        return self._with_room.get(resource, set())

    def labels(self, node: str) -> Mapping[str, str]:
        return self.nodes[node].labels

    def _refresh(self, key: NodeKey) -> None:
        """Bring the pools' totals in line with one node's numbers, by the difference."""
        resource, name = key
        total = self.total(key)
        if total > 0:
            free = self.free(key)
            new = (total, min(self.used[key], total), free, min(self.booked[key], free))
        else:
            new = (0, 0, 0, 0)
        old = self._contribution.get(key, (0, 0, 0, 0))
        if new == old:
            return
        if total > 0:
            self._contribution[key] = new
        else:
            self._contribution.pop(key, None)
        for pool_key in self._members.get(name, ()):
            if self.pools[pool_key].resource == resource:
                totals = self.totals[pool_key]
                totals.total += new[0] - old[0]
                totals.used += new[1] - old[1]
                totals.free += new[2] - old[2]
                totals.booked += new[3] - old[3]
                self.changed_pools.add(pool_key)
        room = new[2] - new[3]
        if room > old[2] - old[3]:
            self.freed.add(key)
        if room > 0:
            self._with_room[resource].add(name)
        else:
            self._with_room[resource].discard(name)

    # -- nodes --------------------------------------------------------------------------
    def apply_node(self, name: str, node: Mapping | None) -> None:
        """A node was added, changed (labels, allocatable, readiness) or deleted."""
        new = self._node_state(name, node)
        old = self.nodes.get(name)
        if new == old:
            return  # nothing that matters here changed (a heartbeat, an annotation)
        self.membership_version += 1
        if old is not None:
            for pool_key in self._members.pop(name, set()):
                self._count(pool_key, name, -1)
            for resource in old.totals:
                self._contribution.pop((resource, name), None)
                self._with_room[resource].discard(name)
            del self.nodes[name]
        if new is None:
            return
        self.nodes[name] = new
        members = {key for key, spec in self.pools.items() if self._belongs(spec, new)}
        self._members[name] = members
        for pool_key in members:
            self._count(pool_key, name, +1)
        for resource in new.totals:
            self._refresh((resource, name))

    def _node_state(self, name: str, node: Mapping | None) -> _Node | None:
        if node is None:
            return None
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        totals = {r: n for r in self.resources if (n := quantity(allocatable.get(r, 0))) > 0}
        if not totals:
            return None  # no GPU of ours on this node
        return _Node(
            name=name,
            labels=dict((node.get("metadata") or {}).get("labels") or {}),
            totals=totals,
            schedulable=node_schedulable(node),
        )

    # -- pods -----------------------------------------------------------------------------
    def apply_pod(self, key: str, pod: Mapping | None) -> None:
        """A GPU pod was added, changed or deleted (``pod`` None: it is gone)."""
        new = self._pod_state(pod) if pod is not None and holds_slices(pod) else None
        if new is not None and not new.slices:
            new = None
        if new is not None and new.ticket:
            self.bound_tickets.add(new.ticket)
        old = self.pods.get(key)
        if old is not None and new == old:
            # most pod updates change nothing that counts here (status details)
            for resource in new.slices:
                self.holders[(resource, new.node)][key] = pod
            return
        if (old is not None and old.user is not None) or (new is not None and new.user):
            self.hub_pods_changed = True
        if old is not None:
            del self.pods[key]
            self._unhold(key, old)
            for resource, count in old.slices.items():
                kept = new.slices.get(resource, 0) if new and new.node == old.node else 0
                if count > kept:
                    self.released.append(((resource, old.node), count - kept))
        if new is None:
            return
        self.pods[key] = new
        if new.user is not None:
            self._by_user.setdefault(new.user, {})[key] = new
        for resource, count in new.slices.items():
            node_key = (resource, new.node)
            self.used[node_key] += count
            self.holders.setdefault(node_key, {})[key] = pod
            self._refresh(node_key)

    def _pod_state(self, pod: Mapping) -> _Pod:
        meta = pod.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        user = annotations.get(HUB_USER_ANNOTATION)
        return _Pod(
            node=pod["spec"]["nodeName"],
            slices={r: n for r in self.resources if (n := pod_slices(pod, r)) > 0},
            user=user,
            server=(meta.get("labels") or {}).get(HUB_SERVER_LABEL, "") if user else None,
            ticket=annotations.get(TICKET_ANNOTATION),
            deleting=bool(meta.get("deletionTimestamp")),
        )

    def _unhold(self, key: str, old: _Pod) -> None:
        if old.user is not None:
            mine = self._by_user.get(old.user, {})
            mine.pop(key, None)
            if not mine:
                self._by_user.pop(old.user, None)
        for resource, slices in old.slices.items():
            node_key = (resource, old.node)
            self.used[node_key] -= slices
            if self.used[node_key] <= 0:
                del self.used[node_key]
            holders = self.holders.get(node_key, {})
            holders.pop(key, None)
            if not holders:
                self.holders.pop(node_key, None)
            self._refresh(node_key)

    def replace_nodes(self, nodes: Mapping[str, Mapping]) -> None:
        """Swap in a fresh list of nodes (after a re-list). Synchronous, so no
        reader ever sees half of the old list and half of the new."""
        for name in [n for n in self.nodes if n not in nodes]:
            self.apply_node(name, None)
        for name, node in nodes.items():
            self.apply_node(name, node)

    def replace_pods(self, pods: Mapping[str, Mapping]) -> None:
        """Swap in a fresh list of pods, like :meth:`replace_nodes`."""
        for key in [k for k in self.pods if k not in pods]:
            self.apply_pod(key, None)
        for key, pod in pods.items():
            self.apply_pod(key, pod)

    # -- bookings ---------------------------------------------------------------------------
    def book(self, key: NodeKey, slices: int) -> None:
        self.booked[key] += slices
        self._refresh(key)

    def unbook(self, key: NodeKey, slices: int) -> None:
        self.booked[key] -= slices
        if self.booked[key] <= 0:
            del self.booked[key]
        self._refresh(key)

    # -- reading ------------------------------------------------------------------------------
    def pool_summary(self, spec: PoolSpec, waiting: int) -> dict:
        self.add_pool(spec)
        return self.totals[spec.key].public(spec, waiting)

    def overlaps(self, a: PoolSpec, b: PoolSpec) -> bool:
        """Whether some node could serve both pools: they compete for its slices."""
        if a.key == b.key:
            return True
        if a.resource != b.resource:
            return False
        self.add_pool(a)
        self.add_pool(b)
        return any(a.key in m and b.key in m for m in self._members.values())

    def capacities(self, resource: str) -> dict[str, NodeCapacity]:
        """Every node of one resource with its holders: the admins' view."""
        result = {}
        for name, node in self.nodes.items():
            total = node.totals.get(resource, 0)
            if total <= 0:
                continue
            key = (resource, name)
            result[name] = NodeCapacity(
                name=name,
                labels=node.labels,
                total=total,
                used=self.used[key],
                schedulable=node.schedulable,
                holders=[
                    holder_of(pod, pod_slices(pod, resource))
                    for pod in self.holders.get(key, {}).values()
                ],
                booked=self.booked[key],
            )
        return result

    def slices(self, resource: str) -> Iterable[tuple[str, str, int, int, int, int]]:
        """``(node, product, total, used, booked, available)`` of every node, cheaply."""
        for name, node in self.nodes.items():
            total = node.totals.get(resource, 0)
            if total > 0:
                key = (resource, name)
                free = self.free(key)
                booked = min(self.booked[key], free)
                product = node.labels.get(PRODUCT_LABEL, "unknown GPU")
                yield name, product, total, self.used[key], booked, free - booked

    def user_servers(self, user: str) -> dict[str, int]:
        """Slices each server of ``user`` holds, by server name."""
        servers: Counter[str] = Counter()
        for pod in self._by_user.get(user, {}).values():
            servers[pod.server or ""] += sum(pod.slices.values())
        return dict(servers)

    def take_changes(self) -> Changes:
        """What changed since the last call, for the dispatcher to act on."""
        changes = Changes(
            self.freed, self.changed_pools, self.bound_tickets, self.released, self.hub_pods_changed
        )
        self.freed, self.changed_pools, self.bound_tickets, self.released = set(), set(), set(), []
        self.hub_pods_changed = False
        return changes


@dataclass
class Changes:
    freed: set[NodeKey]  # nodes with more room than before
    pools: set[str]  # pools whose totals changed
    bound_tickets: set[str]  # admitted spawns whose pods are now bound
    released: list[tuple[NodeKey, int]]  # slices pods gave back
    hub_pods: bool = False  # a pod of a hub user came, went or changed
