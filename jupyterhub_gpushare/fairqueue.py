"""First come, first served for GPU slices, across every pool.

Pure logic, driven by the service: spawns ``join`` and ``leave``; ``admit``
runs whenever capacity or the line changes. There is one order, by request
time, over all pools: a spawn is admitted before any later spawn that could use
the same slices, whatever profile either chose. A spawn at the head that cannot
be placed blocks only the spawns that compete for its nodes; a spawn for other
GPUs goes ahead. An admitted spawn holds a booking on one node until its pod is
bound there, so a free slice is never promised twice.

A spawn whose hub went away (a restart drops pending spawns) does not hold a
slice: its place is *held* for a while, and the same user's server that starts
again in that time takes the place back. Tickets read back from the state file
are unconfirmed until their spawn shows up again: they keep others behind them
waiting for a few seconds, but are never admitted.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .capacity import PoolSpec
from .clusterview import ClusterView
from .tickets import ADMITTED, HELD, WAITING, TicketRequest


class LimitReached(Exception):
    """A user asked for more than the per-user limits allow; the message is for them."""


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
    node: str | None = None  # where the booking is
    booked: bool = False
    # read back from the state file and not seen since: may not be admitted
    confirmed: bool = True
    confirm_by: float | None = None
    held_until: float | None = None
    kept_place: bool = False  # took over the place of a spawn the hub dropped
    joined_at: float | None = None  # when the service first had it in line
    bound_at: float | None = None  # the earliest upper bound on its wait it was shown

    @property
    def order(self) -> tuple[float, str]:
        return (self.requested_at, self.id)

    @classmethod
    def from_request(cls, request: TicketRequest) -> Ticket:
        return cls(
            id=request.id,
            user=request.user,
            server=request.server,
            slices=request.slices,
            pool=request.pool,
            requested_at=request.requested_at,
        )

    def to_state(self) -> dict:
        return {
            "id": self.id,
            "user": self.user,
            "server": self.server,
            "slices": self.slices,
            "pool": {"resource": self.pool.resource, "selector": dict(self.pool.selector)},
            "requested_at": self.requested_at,
            "state": self.state,
            "node": self.node,
            "held_until": self.held_until,
            "joined_at": self.joined_at,
            "bound_at": self.bound_at,
        }

    @classmethod
    def from_state(cls, data: Mapping) -> Ticket:
        """A ticket from the state file; raises KeyError/TypeError/ValueError if malformed."""
        pool = data["pool"]
        selector = pool.get("selector") or {}
        if not isinstance(selector, dict):
            raise TypeError("pool.selector is not an object")
        state = data.get("state", WAITING)
        if state not in (WAITING, ADMITTED, HELD):
            raise ValueError(f"unknown state {state!r}")
        return cls(
            id=str(data["id"]),
            user=str(data["user"]),
            server=str(data.get("server") or ""),
            slices=int(data["slices"]),
            pool=PoolSpec.from_selector(str(pool["resource"]), selector),
            requested_at=float(data["requested_at"]),
            state=state,
            node=data.get("node"),
            held_until=float(data["held_until"]) if data.get("held_until") else None,
            joined_at=_time_or_none(data.get("joined_at")),
            bound_at=_time_or_none(data.get("bound_at")),
        )


def _time_or_none(value: object) -> float | None:
    return None if value is None else float(value)


@dataclass
class Place:
    """Where a waiting ticket stands: computed for all of them in one pass."""

    position: int
    waiting: int
    reason: str | None = None
    slices_ahead: int = 0  # asked for by those ahead in the same pool
    # asked for by those ahead in every pool that competes for the same nodes
    rival_slices_ahead: int = 0
    # someone ahead among those asks for more than one slice at once
    multi_slice_ahead: bool = False
    # someone ahead is a ticket read back after a restart, not confirmed yet
    unconfirmed_ahead: bool = False


@dataclass
class ReleaseClock:
    """Recent times at which slices were freed, for a rough wait estimate."""

    times: deque = field(default_factory=lambda: deque(maxlen=20))
    _rate: float | None = None
    _known: bool = False

    def record(self, when: float, slices: int = 1) -> None:
        for _ in range(max(slices, 1)):
            self.times.append(when)
        self._known = False

    def seconds_per_slice(self) -> float | None:
        if not self._known:
            gaps = [b - a for a, b in itertools.pairwise(self.times)]
            self._rate = statistics.fmean(gaps) if len(self.times) >= 3 else None
            self._known = True
        return self._rate


@dataclass
class UserLimits:
    """What one user's servers may have, running or in line, at once (0: no limit)."""

    gpu_servers: int = 1
    slices: int = 0


# Why a spawn with room for it still waits (shown on the spawn page).
OTHER_LINE_FIRST = "a slice is free, but an earlier request that can use the same GPUs goes first"
BIGGER_FIRST = (
    "a slice is free, but it is kept for an earlier request that needs more slices at once"
)
RECONNECTING = (
    "a slice is free, but an earlier request is reconnecting after a restart of the GPU "
    "service and goes first if it comes back within seconds"
)


def server_label(server: str) -> str:
    return f"server {server!r}" if server else "your default server"


class FairQueue:
    def __init__(
        self,
        view: ClusterView,
        reservation_seconds: float = 120,
        hold_seconds: float = 300,
        limits: UserLimits | None = None,
    ) -> None:
        self.view = view
        self.tickets: dict[str, Ticket] = {}
        self.reservation_seconds = reservation_seconds
        self.hold_seconds = hold_seconds
        self.limits = limits or UserLimits()
        self.releases: dict[str, ReleaseClock] = {}
        self._line: list[Ticket] | None = None
        self._held: list[Ticket] | None = None
        self._places: dict[str, Place] | None = None
        self._places_version = -1
        self._overlap: dict[tuple[str, str], bool] = {}
        self._overlap_version = -1
        self._reasons: dict[str, str] = {}
        self.needs_admission = True  # the line changed since the last admission pass

    def _changed(self) -> None:
        self._line = None
        self._held = None
        self._places = None
        self.needs_admission = True

    # -- membership ------------------------------------------------------------------
    def join(self, request: TicketRequest, now: float) -> Ticket:
        """Add a spawn, or take back one that joins again (after a restart of the
        service or a lost connection) without losing its place.

        Raises :class:`LimitReached` when the user may not have another GPU server.
        """
        self._changed()
        current = self.tickets.get(request.id)
        if current is not None:
            current.requested_at = min(current.requested_at, request.requested_at)
            self.confirm(request.id)
            if request.admitted and current.state == WAITING:
                self._rebook(current, now)
            return current
        self._check_limits(request)
        ticket = Ticket.from_request(request)
        ticket.joined_at = now
        held = self._held_place(request)
        if held is not None:
            # the hub dropped this server's earlier spawn: it keeps that place
            del self.tickets[held.id]
            ticket.requested_at = min(ticket.requested_at, held.requested_at)
            ticket.kept_place = True
        self.view.add_pool(ticket.pool)
        self.tickets[ticket.id] = ticket
        if request.admitted:
            self._rebook(ticket, now)
        return ticket

    def _held_place(self, request: TicketRequest) -> Ticket | None:
        return next(
            (
                t
                for t in self.tickets.values()
                if t.state == HELD and t.user == request.user and t.server == request.server
            ),
            None,
        )

    def _check_limits(self, request: TicketRequest) -> None:
        limits = self.limits
        if not (limits.gpu_servers or limits.slices):
            return
        servers = {
            name: slices
            for name, slices in self.view.user_servers(request.user).items()
            if name != request.server
        }
        for ticket in self.tickets.values():
            if ticket.user == request.user and ticket.server != request.server:
                if ticket.state in (WAITING, ADMITTED):
                    servers.setdefault(ticket.server, ticket.slices)
        if limits.gpu_servers and len(servers) >= limits.gpu_servers:
            names = ", ".join(server_label(s) for s in sorted(servers))
            allowed = (
                "one GPU server" if limits.gpu_servers == 1 else f"{limits.gpu_servers} GPU servers"
            )
            raise LimitReached(
                f"Each user may have {allowed} at a time, running or waiting, and "
                f"you have: {names}. Stop it to start this one with a GPU, or choose "
                "a profile without a GPU."
            )
        total = sum(servers.values()) + request.slices
        if limits.slices and total > limits.slices:
            raise LimitReached(
                f"Each user may hold {limits.slices} GPU slices at a time; with this server "
                f"yours would hold {total}. Stop another GPU server first, or choose a "
                "profile with fewer slices."
            )

    def confirm(self, ticket_id: str) -> bool:
        """Its spawn showed up (it joins or follows the ticket again): it is alive.

        A held ticket waits again at its old place: its spawn was only slow to
        follow it (a hub busy with a class pressing Start at once), or lost the
        connection for a while. True when the ticket was held.
        """
        ticket = self.tickets.get(ticket_id)
        if ticket is None:
            return False
        was_held = ticket.state == HELD
        if was_held:
            ticket.state, ticket.held_until = WAITING, None
        if was_held or not ticket.confirmed:
            ticket.confirmed, ticket.confirm_by = True, None
            self._changed()
        return was_held

    def leave(self, ticket_id: str) -> Ticket | None:
        ticket = self.tickets.pop(ticket_id, None)
        if ticket is not None:
            self._unbook(ticket)
            self._held = None
            if ticket.state == WAITING:
                self._changed()
            else:  # nobody's place changes; a released booking may let someone in
                self.needs_admission = True
        return ticket

    def hold(self, ticket_id: str, now: float) -> Ticket | None:
        """The spawn went away: release its booking, keep its place for a while."""
        ticket = self.tickets.get(ticket_id)
        if ticket is None or ticket.state == HELD:
            return None
        self._unbook(ticket)
        ticket.state, ticket.node, ticket.admitted_at = HELD, None, None
        ticket.held_until = now + self.hold_seconds
        ticket.bound_at = None  # a promise to a spawn that went away ends with it
        ticket.confirmed, ticket.confirm_by = True, None
        self._changed()
        return ticket

    def waiting(self) -> list[Ticket]:
        """Waiting tickets in the one order of the line."""
        if self._line is None:
            self._line = sorted(
                (t for t in self.tickets.values() if t.state == WAITING), key=_order
            )
        return self._line

    def admitted(self) -> list[Ticket]:
        return [t for t in self.tickets.values() if t.state == ADMITTED]

    def held(self) -> list[Ticket]:
        if self._held is None:
            self._held = [t for t in self.tickets.values() if t.state == HELD]
        return self._held

    # -- bookings ----------------------------------------------------------------------
    def _book(self, ticket: Ticket, node: str, now: float) -> None:
        ticket.state, ticket.node, ticket.admitted_at = ADMITTED, node, now
        ticket.booked = True
        self.view.book((ticket.pool.resource, node), ticket.slices)

    def _unbook(self, ticket: Ticket) -> None:
        if ticket.booked and ticket.node:
            self.view.unbook((ticket.pool.resource, ticket.node), ticket.slices)
        ticket.booked = False

    def _rebook(self, ticket: Ticket, now: float) -> None:
        """Book again for a spawn that already had slices (its pod was rejected by
        the node, or the service restarted): on a node with room, else it waits at
        its old place, which is usually the head of the line."""
        if ticket.state == ADMITTED and ticket.booked:
            return
        node = self._best_node(ticket, blocked=set())
        if node is not None:
            self._book(ticket, node, now)
        else:
            ticket.state, ticket.node, ticket.admitted_at = WAITING, None, None
        self._changed()

    # -- admission -------------------------------------------------------------------
    def settle(self, bound: Iterable[str], now: float) -> list[Ticket]:
        """Forget spawns whose pod is now bound (the pod holds the slices from now
        on, whatever the ticket's state: one held while its spawn was slow to
        follow it may have been admitted before) and admitted spawns that did not
        use their booking in time."""
        done = [t for t in (self.tickets.get(i) for i in bound) if t is not None]
        done += [
            t
            for t in self.admitted()
            if t not in done
            and t.admitted_at is not None
            and now - t.admitted_at > self.reservation_seconds
        ]
        for ticket in done:
            self.leave(ticket.id)
        return done

    def _best_node(self, ticket: Ticket, blocked: set[str]) -> str | None:
        """The fullest node of the ticket's pool with room for it (best fit keeps
        whole GPUs free for bigger requests), avoiding nodes of blocked pools."""
        resource, view = ticket.pool.resource, self.view
        best = None
        for name in view.nodes_with_room(resource):
            pools = view.pools_of(name)
            if ticket.pool.key not in pools or (blocked and not blocked.isdisjoint(pools)):
                continue
            room = view.available((resource, name))
            if room >= ticket.slices and (best is None or (room, name) < best):
                best = (room, name)
        return best[1] if best else None

    def admit(self, now: float) -> list[Ticket]:
        """Admit, in request order, every waiting spawn that a node has room for
        and that no earlier spawn is waiting for the same slices before."""
        for ticket in self.admitted():
            if not ticket.booked:  # read back from the state file
                self._rebook(ticket, now)
        admitted: list[Ticket] = []
        # pools whose nodes an earlier spawn waits for, and why that one waits
        blocked: dict[str, str | None] = {}
        reasons: dict[str, str] = {}
        room: dict[tuple[str, int], bool] = {}  # (pool, slices): a node has room, blocks aside

        def has_room(ticket: Ticket) -> bool:
            key = (ticket.pool.key, ticket.slices)
            if key not in room:
                room[key] = self._best_node(ticket, set()) is not None
            return room[key]

        for ticket in self.waiting():
            key = ticket.pool.key
            if key in blocked or not ticket.confirmed:
                if key not in blocked:
                    blocked[key] = RECONNECTING
                elif has_room(ticket):
                    # there is room for this one, but an earlier spawn comes first
                    reasons[ticket.id] = blocked[key] or OTHER_LINE_FIRST
                continue
            node = self._best_node(ticket, set(blocked))
            if node is not None:
                self._book(ticket, node, now)
                admitted.append(ticket)
                continue
            reason = self._why_waiting(ticket)
            if reason is not None:
                reasons[ticket.id] = reason
                blocked[key] = OTHER_LINE_FIRST if reason == OTHER_LINE_FIRST else BIGGER_FIRST
            else:
                blocked[key] = None
        if admitted or reasons != self._reasons:
            self._reasons = reasons
            self._changed()
        self.needs_admission = False
        return admitted

    def _why_waiting(self, ticket: Ticket) -> str | None:
        """Why a spawn that nobody in its own pool is ahead of still waits, when it
        is not simply that every slice it could use is taken."""
        view, resource = self.view, ticket.pool.resource
        rooms = [
            view.available((resource, name))
            for name in view.nodes_with_room(resource)
            if ticket.pool.key in view.pools_of(name)
        ]
        if not rooms:
            return None
        if max(rooms) >= ticket.slices:
            return OTHER_LINE_FIRST
        free = sum(rooms)
        return (
            f"{free} slice{'s are' if free != 1 else ' is'} free, but this server needs "
            f"{ticket.slices} on one GPU node and no node has more than {max(rooms)} free: "
            "it starts as soon as one has"
        )

    # -- where everyone stands -----------------------------------------------------------
    def places(self) -> dict[str, Place]:
        """Position and line length of every waiting ticket, counting only the
        tickets that compete for the same nodes."""
        if self._places is not None and self._places_version == self.view.membership_version:
            return self._places
        line = self.waiting()
        keys = sorted({t.pool.key for t in line})
        specs = {t.pool.key: t.pool for t in line}
        rivals = {k: [q for q in keys if self._overlaps(specs[k], specs[q])] for k in keys}
        totals = dict.fromkeys(keys, 0)
        for ticket in line:
            totals[ticket.pool.key] += 1
        line_length = {k: sum(totals[q] for q in rivals[k]) for k in keys}
        seen = dict.fromkeys(keys, 0)
        slices_seen = dict.fromkeys(keys, 0)
        multi_seen = dict.fromkeys(keys, False)
        unconfirmed_seen = dict.fromkeys(keys, False)
        places = {}
        reasons = self._reasons
        for ticket in line:
            key = ticket.pool.key
            others = rivals[key]
            if len(others) == 1:  # usually a pool competes with itself only
                ahead, rival_slices = seen[key], slices_seen[key]
                multi, unconfirmed = multi_seen[key], unconfirmed_seen[key]
            else:
                ahead = sum(seen[q] for q in others)
                rival_slices = sum(slices_seen[q] for q in others)
                multi = any(multi_seen[q] for q in others)
                unconfirmed = any(unconfirmed_seen[q] for q in others)
            places[ticket.id] = Place(
                position=ahead + 1,
                waiting=line_length[key],
                reason=reasons.get(ticket.id),
                slices_ahead=slices_seen[key],
                rival_slices_ahead=rival_slices,
                multi_slice_ahead=multi,
                unconfirmed_ahead=unconfirmed,
            )
            seen[key] += 1
            slices_seen[key] += ticket.slices
            multi_seen[key] = multi_seen[key] or ticket.slices > 1
            unconfirmed_seen[key] = unconfirmed_seen[key] or not ticket.confirmed
        self._places, self._places_version = places, self.view.membership_version
        return places

    def _overlaps(self, a: PoolSpec, b: PoolSpec) -> bool:
        if a.key == b.key:
            return True
        if self._overlap_version != self.view.membership_version:
            self._overlap, self._overlap_version = {}, self.view.membership_version
        pair = (a.key, b.key) if a.key < b.key else (b.key, a.key)
        if pair not in self._overlap:
            self._overlap[pair] = self.view.overlaps(a, b)
        return self._overlap[pair]

    # -- expiry ---------------------------------------------------------------------------
    def expire(self, now: float) -> tuple[list[Ticket], list[Ticket]]:
        """Held places whose time ran out leave; unconfirmed tickets whose spawn did
        not come back in time are held. Returns (left, held)."""
        left = [t for t in self.held() if t.held_until is not None and now >= t.held_until]
        for ticket in left:
            self.leave(ticket.id)
        held = [
            t
            for t in list(self.tickets.values())
            if not t.confirmed and t.confirm_by is not None and now >= t.confirm_by
        ]
        for ticket in held:
            self.hold(ticket.id, now)
        return left, held

    # -- estimates --------------------------------------------------------------------------
    def record_release(self, pool_keys: Iterable[str], when: float, slices: int) -> None:
        for key in pool_keys:
            self.releases.setdefault(key, ReleaseClock()).record(when, slices)

    def estimated_wait(self, ticket_id: str, place: Place | None = None) -> float | None:
        ticket = self.tickets[ticket_id]
        place = place or self.places().get(ticket_id)
        clock = self.releases.get(ticket.pool.key)
        rate = clock.seconds_per_slice() if clock else None
        if place is None or rate is None:
            return None
        return rate * (place.slices_ahead + ticket.slices)

    # -- persistence ---------------------------------------------------------------------------
    def to_state(self) -> list[dict]:
        return [t.to_state() for t in sorted(self.tickets.values(), key=_order)]

    def restore(self, tickets: Iterable[Ticket], now: float, confirm_seconds: float) -> None:
        """Take back tickets from the state file: unconfirmed until their spawn shows up."""
        for ticket in tickets:
            if ticket.state != HELD:
                ticket.confirmed, ticket.confirm_by = False, now + confirm_seconds
            self.view.add_pool(ticket.pool)
            self.tickets[ticket.id] = ticket
        self._changed()


def _order(ticket: Ticket) -> tuple[float, str]:
    return ticket.order
