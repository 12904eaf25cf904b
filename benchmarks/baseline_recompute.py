"""The service core as it was before the incremental cluster view, kept only as
the churn benchmark's baseline.

Every change (one watch event, or a burst of them in one loop turn) recomputed
all capacity from every node and pod, once per GPU resource; settled and
admitted the heads of the lines pool by pool, in pool-name order; and rebuilt
every followed spawn's status, each with a scan of all nodes for its pool's
numbers. This is that algorithm (from the service of 2026-11-29), with the
same inputs and outputs as :class:`~jupyterhub_gpushare.service.dispatcher.Dispatcher`
as the benchmark drives it; nothing here is used by the product.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from jupyterhub_gpushare.capacity import (
    TICKET_ANNOTATION,
    NodeCapacity,
    PoolSpec,
    node_capacities,
    pool_totals,
)
from jupyterhub_gpushare.fairqueue import ReleaseClock, Ticket
from jupyterhub_gpushare.tickets import ADMITTED, GONE, WAITING, TicketRequest


class LinesPerPool:
    """One strict first-come-first-served line per pool; admission walks the
    lines in sorted pool-key order, the head of each only."""

    def __init__(self, reservation_seconds: float = 120) -> None:
        self.tickets: dict[str, Ticket] = {}
        self.reservation_seconds = reservation_seconds
        self.releases: dict[str, ReleaseClock] = {}
        self._lines: dict[str, list[Ticket]] | None = None
        self._places: dict[str, int] = {}

    def _lines_now(self) -> dict[str, list[Ticket]]:
        if self._lines is None:
            lines: dict[str, list[Ticket]] = {}
            for ticket in sorted(self.tickets.values(), key=lambda t: t.order):
                if ticket.state == WAITING:
                    lines.setdefault(ticket.pool.key, []).append(ticket)
            self._lines = lines
            self._places = {t.id: i for line in lines.values() for i, t in enumerate(line)}
        return self._lines

    def join(self, ticket: Ticket) -> None:
        self._lines = None
        self.tickets.setdefault(ticket.id, ticket)

    def leave(self, ticket_id: str) -> Ticket | None:
        self._lines = None
        return self.tickets.pop(ticket_id, None)

    def waiting(self, pool_key: str | None = None) -> list[Ticket]:
        lines = self._lines_now()
        if pool_key is not None:
            return list(lines.get(pool_key, ()))
        return sorted((t for line in lines.values() for t in line), key=lambda t: t.order)

    def position(self, ticket_id: str) -> tuple[int, int]:
        ticket = self.tickets[ticket_id]
        line = self._lines_now().get(ticket.pool.key, ())
        if ticket.state != WAITING:
            return 0, len(line)
        return self._places[ticket_id] + 1, len(line)

    def settle(self, bound: Iterable[str], now: float) -> list[Ticket]:
        bound = set(bound)
        done = [
            t
            for t in self.tickets.values()
            if t.state == ADMITTED
            and (t.id in bound or now - (t.admitted_at or now) > self.reservation_seconds)
        ]
        for ticket in done:
            del self.tickets[ticket.id]
        if done:
            self._lines = None
        return done

    def admit(self, capacities: Mapping[str, Mapping[str, NodeCapacity]], now: float) -> list:
        free = {
            (resource, name): node.free
            for resource, nodes in capacities.items()
            for name, node in nodes.items()
        }
        for ticket in self.tickets.values():
            if ticket.state == ADMITTED and ticket.node:
                key = (ticket.pool.resource, ticket.node)
                if key in free:
                    free[key] -= ticket.slices
        admitted = []
        for pool_key in sorted({t.pool.key for t in self.waiting()}):
            for ticket in self.waiting(pool_key):
                resource = ticket.pool.resource
                candidates = [
                    name
                    for name, node in capacities.get(resource, {}).items()
                    if ticket.pool.matches(node.labels)
                    and free.get((resource, name), 0) >= ticket.slices
                ]
                if not candidates:
                    break
                node = min(candidates, key=lambda n: (free[(resource, n)], n))
                free[(resource, node)] -= ticket.slices
                ticket.state, ticket.admitted_at, ticket.node = ADMITTED, now, node
                admitted.append(ticket)
        if admitted:
            self._lines = None
        return admitted

    def estimated_wait(self, ticket_id: str) -> float | None:
        ticket = self.tickets[ticket_id]
        position, _ = self.position(ticket_id)
        clock = self.releases.get(ticket.pool.key)
        rate = clock.seconds_per_slice() if clock else None
        if not position or rate is None:
            return None
        ahead = sum(t.slices for t in self._lines_now()[ticket.pool.key][: position - 1])
        return rate * (ahead + ticket.slices)


class FullRecompute:
    """The old core: fed the same watch objects and requests as the new one."""

    def __init__(self, resources: tuple[str, ...], state_file: str) -> None:
        self.resources = resources
        self.state_file = Path(state_file)
        self.queue = LinesPerPool()
        self.nodes: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.capacities: dict[str, dict[str, NodeCapacity]] = {}
        self.followers: dict[str, set[asyncio.Queue]] = {}
        self.statuses: dict[str, dict] = {}
        self._holders: dict[str, tuple[str, str, int]] = {}
        self._pending = False
        self.cycles = 0

    # what the old watchers did: keep the objects, skip identical updates
    def replace(self, kind: str, objects: dict[str, dict]) -> None:
        (self.nodes if kind == "nodes" else self.pods).clear()
        (self.nodes if kind == "nodes" else self.pods).update(objects)
        self._changed()

    def apply(self, kind: str, key: str, obj: dict | None) -> None:
        store = self.nodes if kind == "nodes" else self.pods
        if obj is None:
            if store.pop(key, None) is None:
                return
        elif store.get(key) == obj:
            return
        else:
            store[key] = obj
        self._changed()

    def _changed(self) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self.cycle)

    def cycle(self) -> None:
        self._pending = False
        self.cycles += 1
        now = time.time()
        nodes = list(self.nodes.values())
        pods = list(self.pods.values())
        self.capacities = {r: node_capacities(nodes, pods, r) for r in self.resources}
        self._record_releases(now)
        bound = {
            p["metadata"]["annotations"].get(TICKET_ANNOTATION)
            for p in pods
            if p["spec"].get("nodeName")
        }
        changed = bool(self.queue.settle(bound - {None}, now))
        changed = bool(self.queue.admit(self.capacities, now)) or changed
        if changed:
            self._save_state()
        self._publish()

    def _save_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tickets": [t.to_state() for t in self.queue.tickets.values()]}))
        tmp.replace(self.state_file)

    def _record_releases(self, now: float) -> None:
        holders = {
            f"{h.namespace}/{h.pod}": (resource, node.name, h.slices)
            for resource, caps in self.capacities.items()
            for node in caps.values()
            for h in node.holders
        }
        pools = {t.pool.key: t.pool for t in self.queue.tickets.values()}
        for key, (resource, node_name, slices) in self._holders.items():
            if key in holders:
                continue
            node = self.capacities.get(resource, {}).get(node_name)
            if node is None:
                continue
            for pool in pools.values():
                if pool.resource == resource and pool.matches(node.labels):
                    self.queue.releases.setdefault(pool.key, ReleaseClock()).record(now, slices)
        self._holders = holders

    def pool_status(self, spec: PoolSpec) -> dict:
        caps = self.capacities.get(spec.resource, {})
        return pool_totals(spec, caps, len(self.queue.waiting(spec.key)))

    def ticket_status(self, ticket_id: str) -> dict:
        ticket = self.queue.tickets.get(ticket_id)
        if ticket is None:
            return {"ticket": ticket_id, "state": GONE}
        position, waiting = self.queue.position(ticket_id)
        status = {
            "ticket": ticket_id,
            "state": ticket.state,
            "ready": True,
            "position": position,
            "waiting": waiting,
            "pool": self.pool_status(ticket.pool),
            "eta_seconds": self.queue.estimated_wait(ticket_id),
            "requested_at": ticket.requested_at,
        }
        if ticket.state == ADMITTED:
            status["node"] = ticket.node
        return status

    def _publish(self) -> None:
        for ticket_id in set(self.followers) | set(self.statuses):
            status = self.ticket_status(ticket_id)
            if self.statuses.get(ticket_id) == status:
                continue
            if status["state"] == GONE:
                self.statuses.pop(ticket_id, None)
            else:
                self.statuses[ticket_id] = status
            for follower in self.followers.get(ticket_id, ()):
                follower.put_nowait(status)
        for ticket_id in self.queue.tickets:
            self.statuses.setdefault(ticket_id, self.ticket_status(ticket_id))

    def join(self, request: TicketRequest) -> dict:
        self.queue.join(Ticket.from_request(request))
        self._save_state()
        self.cycle()
        return self.ticket_status(request.id)

    def follow(self, ticket_id: str) -> asyncio.Queue:
        follower: asyncio.Queue = asyncio.Queue()
        self.followers.setdefault(ticket_id, set()).add(follower)
        follower.put_nowait(self.ticket_status(ticket_id))
        return follower

    def unfollow(self, ticket_id: str, follower: asyncio.Queue) -> None:
        followers = self.followers.get(ticket_id, set())
        followers.discard(follower)
        if not followers:
            self.followers.pop(ticket_id, None)
