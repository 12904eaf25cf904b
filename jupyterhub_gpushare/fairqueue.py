"""A first-come, first-served line for GPU slices, one line per pool.

Pure logic, driven by the service: ``join``/``leave`` as spawns come and go, and
``admit`` whenever capacity changes. Admission is strictly in request order
within a pool (no overtaking, even by a smaller request), and an admitted spawn
holds a reservation on a node until its pod is bound there, so two spawns can
never be admitted into one free slice.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from .capacity import NodeCapacity, PoolSpec

WAITING = "waiting"
ADMITTED = "admitted"


@dataclass
class Ticket:
    id: str
    user: str
    server: str
    slices: int
    pool: PoolSpec
    requested_at: float
    state: str = WAITING
    admitted_at: float | None = None
    node: str | None = None  # where the reservation is held

    @property
    def order(self) -> tuple[float, str]:
        return (self.requested_at, self.id)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["pool"] = {"resource": self.pool.resource, "selector": dict(self.pool.selector)}
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> Ticket:
        pool = data.get("pool") or {}
        return cls(
            id=data["id"],
            user=data["user"],
            server=data.get("server", ""),
            slices=int(data["slices"]),
            pool=PoolSpec.from_selector(
                pool.get("resource", "nvidia.com/gpu"), pool.get("selector")
            ),
            requested_at=float(data["requested_at"]),
            state=data.get("state", WAITING),
            admitted_at=data.get("admitted_at"),
            node=data.get("node"),
        )


@dataclass
class ReleaseClock:
    """Recent times at which slices were freed, for a rough wait estimate."""

    times: deque = field(default_factory=lambda: deque(maxlen=20))

    def record(self, when: float, slices: int = 1) -> None:
        for _ in range(max(slices, 1)):
            self.times.append(when)

    def seconds_per_slice(self) -> float | None:
        if len(self.times) < 3:
            return None
        gaps = [b - a for a, b in itertools.pairwise(self.times)]
        return statistics.fmean(gaps) if gaps else None


class FairQueue:
    def __init__(self, reservation_seconds: float = 120) -> None:
        self.tickets: dict[str, Ticket] = {}
        self.reservation_seconds = reservation_seconds
        self.releases: dict[str, ReleaseClock] = {}

    # -- membership ---------------------------------------------------------
    def join(self, ticket: Ticket) -> Ticket:
        """Add a spawn, or take back one that re-joins (after a restart of the
        service or a lost connection) without losing its place."""
        current = self.tickets.get(ticket.id)
        if current is not None:
            current.requested_at = min(current.requested_at, ticket.requested_at)
            return current
        self.tickets[ticket.id] = ticket
        return ticket

    def leave(self, ticket_id: str) -> Ticket | None:
        return self.tickets.pop(ticket_id, None)

    def waiting(self, pool_key: str | None = None) -> list[Ticket]:
        return sorted(
            (
                t
                for t in self.tickets.values()
                if t.state == WAITING and (pool_key is None or t.pool.key == pool_key)
            ),
            key=lambda t: t.order,
        )

    def admitted(self) -> list[Ticket]:
        return [t for t in self.tickets.values() if t.state == ADMITTED]

    def position(self, ticket_id: str) -> tuple[int, int]:
        """1-based place in its pool's line and how many wait there (0, n if admitted)."""
        ticket = self.tickets[ticket_id]
        line = self.waiting(ticket.pool.key)
        if ticket.state != WAITING:
            return 0, len(line)
        return line.index(ticket) + 1, len(line)

    def pools(self) -> dict[str, PoolSpec]:
        return {t.pool.key: t.pool for t in self.tickets.values()}

    # -- admission ------------------------------------------------------------
    def settle(self, bound_tickets: Iterable[str], now: float) -> list[Ticket]:
        """Drop reservations whose pod is now bound (it counts as used from now
        on) or that were never used in time. Returns the tickets dropped."""
        bound = set(bound_tickets)
        done = [
            t
            for t in self.admitted()
            if t.id in bound or (now - (t.admitted_at or now)) > self.reservation_seconds
        ]
        for ticket in done:
            del self.tickets[ticket.id]
        return done

    def reserved(self) -> dict[str, int]:
        reserved: dict[str, int] = {}
        for ticket in self.admitted():
            if ticket.node:
                reserved[ticket.node] = reserved.get(ticket.node, 0) + ticket.slices
        return reserved

    def admit(self, capacities: Mapping[str, NodeCapacity], now: float) -> list[Ticket]:
        """Admit the heads of the lines for which a node has room, in order."""
        free = {name: node.free for name, node in capacities.items()}
        for name, slices in self.reserved().items():
            if name in free:
                free[name] -= slices
        admitted = []
        for key in sorted({t.pool.key for t in self.waiting()}):
            for ticket in self.waiting(key):
                candidates = [
                    name
                    for name, node in capacities.items()
                    if ticket.pool.matches(node.labels) and free.get(name, 0) >= ticket.slices
                ]
                if not candidates:
                    break  # strict order: nobody behind may overtake the head
                # best fit packs slices onto busy GPUs and keeps whole ones free
                node = min(candidates, key=lambda n: (free[n], n))
                free[node] -= ticket.slices
                ticket.state, ticket.admitted_at, ticket.node = ADMITTED, now, node
                admitted.append(ticket)
        return admitted

    # -- estimates ------------------------------------------------------------
    def record_release(self, pool_keys: Iterable[str], when: float, slices: int) -> None:
        for key in pool_keys:
            self.releases.setdefault(key, ReleaseClock()).record(when, slices)

    def estimated_wait(self, ticket_id: str) -> float | None:
        ticket = self.tickets[ticket_id]
        position, _ = self.position(ticket_id)
        clock = self.releases.get(ticket.pool.key)
        rate = clock.seconds_per_slice() if clock else None
        if not position or rate is None:
            return None
        ahead = sum(t.slices for t in self.waiting(ticket.pool.key)[: position - 1])
        return rate * (ahead + ticket.slices)

    # -- persistence ----------------------------------------------------------
    def to_state(self) -> list[dict]:
        return [t.to_dict() for t in sorted(self.tickets.values(), key=lambda t: t.order)]

    def load_state(self, state: Iterable[Mapping]) -> None:
        for item in state:
            ticket = Ticket.from_dict(item)
            self.tickets[ticket.id] = ticket
