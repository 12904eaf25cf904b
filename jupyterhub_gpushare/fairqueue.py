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
        # sorted lines per pool, rebuilt after any change (positions are read
        # far more often than the queue changes)
        self._lines: dict[str, list[Ticket]] | None = None
        self._places: dict[str, int] = {}

    def _invalidate(self) -> None:
        self._lines = None

    def _build_lines(self) -> dict[str, list[Ticket]]:
        if self._lines is None:
            lines: dict[str, list[Ticket]] = {}
            for ticket in sorted(self.tickets.values(), key=lambda t: t.order):
                if ticket.state == WAITING:
                    lines.setdefault(ticket.pool.key, []).append(ticket)
            self._lines = lines
            self._places = {t.id: i for line in lines.values() for i, t in enumerate(line)}
        return self._lines

    # -- membership ---------------------------------------------------------
    def join(self, ticket: Ticket) -> Ticket:
        """Add a spawn, or take back one that re-joins (after a restart of the
        service or a lost connection) without losing its place."""
        self._invalidate()
        current = self.tickets.get(ticket.id)
        if current is not None:
            current.requested_at = min(current.requested_at, ticket.requested_at)
            return current
        self.tickets[ticket.id] = ticket
        return ticket

    def leave(self, ticket_id: str) -> Ticket | None:
        self._invalidate()
        return self.tickets.pop(ticket_id, None)

    def waiting(self, pool_key: str | None = None) -> list[Ticket]:
        lines = self._build_lines()
        if pool_key is not None:
            return list(lines.get(pool_key, ()))
        return sorted((t for line in lines.values() for t in line), key=lambda t: t.order)

    def admitted(self) -> list[Ticket]:
        return [t for t in self.tickets.values() if t.state == ADMITTED]

    def position(self, ticket_id: str) -> tuple[int, int]:
        """1-based place in its pool's line and how many wait there (0, n if admitted)."""
        ticket = self.tickets[ticket_id]
        line = self._build_lines().get(ticket.pool.key, ())
        if ticket.state != WAITING:
            return 0, len(line)
        return self._places[ticket_id] + 1, len(line)

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
        if done:
            self._invalidate()
        return done

    def reserved(self) -> dict[tuple[str, str], int]:
        """Slices booked by admitted spawns, per (resource, node)."""
        reserved: dict[tuple[str, str], int] = {}
        for ticket in self.admitted():
            if ticket.node:
                key = (ticket.pool.resource, ticket.node)
                reserved[key] = reserved.get(key, 0) + ticket.slices
        return reserved

    def admit(
        self, capacities: Mapping[str, Mapping[str, NodeCapacity]], now: float
    ) -> list[Ticket]:
        """Admit the heads of the lines for which a node has room, in order.

        ``capacities`` maps each GPU resource name to its nodes' capacity.
        """
        free = {
            (resource, name): node.free
            for resource, nodes in capacities.items()
            for name, node in nodes.items()
        }
        for key, slices in self.reserved().items():
            if key in free:
                free[key] -= slices
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
                    break  # strict order: nobody behind may overtake the head
                # best fit packs slices onto busy GPUs and keeps whole ones free
                node = min(candidates, key=lambda n: (free[(resource, n)], n))
                free[(resource, node)] -= ticket.slices
                ticket.state, ticket.admitted_at, ticket.node = ADMITTED, now, node
                admitted.append(ticket)
        if admitted:
            self._invalidate()
        return admitted

    def restore_admission(
        self, ticket_id: str, capacities: Mapping[str, Mapping[str, NodeCapacity]], now: float
    ) -> None:
        """Book slices again for a spawn that was admitted before a restart."""
        ticket = self.tickets[ticket_id]
        if ticket.state == ADMITTED:
            return
        nodes = capacities.get(ticket.pool.resource, {})
        matching = [n for n in nodes.values() if ticket.pool.matches(n.labels)]
        ticket.node = max(matching, key=lambda n: n.free).name if matching else None
        ticket.state, ticket.admitted_at = ADMITTED, now
        self._invalidate()

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
        line = self._build_lines().get(ticket.pool.key, [])
        ahead = sum(t.slices for t in line[: position - 1])
        return rate * (ahead + ticket.slices)

    # -- persistence ----------------------------------------------------------
    def to_state(self) -> list[dict]:
        return [t.to_dict() for t in sorted(self.tickets.values(), key=lambda t: t.order)]

    def load_state(self, state: Iterable[Mapping]) -> None:
        for item in state:
            ticket = Ticket.from_dict(item)
            self.tickets[ticket.id] = ticket
        self._invalidate()
