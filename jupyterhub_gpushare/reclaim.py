"""Which idle GPU servers to stop so that the line moves, and what the line may be promised.

Pure, no I/O: the service's :class:`~.service.reclaimer.Reclaimer` feeds it what
the hub says about each server (:class:`ServerActivity`), the cluster view and
the line, and acts on the answers:

- :func:`holdings`: every hub server that holds GPU slices, how long it has been
  idle, when it would be reclaimed if someone still waits then, and when its
  slices are free at the latest whatever its user does;
- :func:`plan`: which of them the line needs stopped now, longest idle first,
  only as many as the waiting spawns need, none while nobody waits;
- :class:`Supply` and :func:`outlook`: when a waiting spawn should get its slices
  (an estimate) and when it gets them at the latest (a bound), if anything
  bounds it.

A bound is a promise, so it is built only from deadlines that cannot move
later: the maximum hold time (``Reclaimer.max_hold_seconds``) and the idle
culler's maximum age (``--max-age``), both counted from when the server
started. An idle deadline is not one: the holder may come back a second before
it and keep the slice for hours. Idle deadlines feed the estimate instead.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .clusterview import ClusterView, NodeKey
from .fairqueue import Place, ReleaseClock, Ticket
from .tickets import WAITING

# why a server would be (or was) reclaimed
IDLE = "idle"
MAX_HOLD = "max-hold"


def parse_time(value: object) -> float | None:
    """Unix time of one of the hub's ISO 8601 timestamps; None for none or nonsense."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:  # the hub writes UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


@dataclass(frozen=True)
class ServerActivity:
    """One of a user's servers as the hub's REST API describes it."""

    user: str
    server: str
    last_activity: float | None
    started: float | None
    pending: str | None
    ready: bool
    groups: frozenset[str] = frozenset()

    @property
    def last_seen(self) -> float | None:
        """Last activity, or the start for a server that has reported none yet."""
        return self.last_activity if self.last_activity is not None else self.started

    @classmethod
    def from_hub(cls, user: Mapping, name: str, server: Mapping) -> ServerActivity:
        return cls(
            user=str(user.get("name", "")),
            server=name,
            last_activity=parse_time(server.get("last_activity")),
            started=parse_time(server.get("started")),
            pending=server.get("pending") or None,
            ready=bool(server.get("ready")),
            groups=frozenset(g for g in user.get("groups") or () if isinstance(g, str)),
        )


def activity_of(users: Iterable[Mapping]) -> dict[tuple[str, str], ServerActivity]:
    """Every server of the hub's user models (``GET /users``), keyed (user, server)."""
    found = {}
    for user in users:
        for name, server in (user.get("servers") or {}).items():
            if isinstance(server, Mapping):
                activity = ServerActivity.from_hub(user, name, server)
                found[(activity.user, name)] = activity
    return found


@dataclass(frozen=True)
class CullerSettings:
    """What jupyterhub-idle-culler does, as ``configure(c)`` read it from its command line."""

    timeout: float = 0  # idle time after which it stops a server (0: unknown or off)
    every: float = 600  # how often it looks
    max_age: float = 0  # age after which it stops a server, active or not (0: off)
    culls_every_server: bool = True  # False when it spares admins' or named servers


@dataclass(frozen=True)
class Policy:
    """The reclaim settings (``c.Reclaimer.*``), plus what the service knows of the culler."""

    enabled: bool = False
    dry_run: bool = False
    idle_seconds: float = 1200
    max_hold_seconds: float = 0  # 0: off
    exempt_users: frozenset[str] = frozenset()
    exempt_groups: frozenset[str] = frozenset()
    # at most this late the service acts on a deadline (its activity refresh and loop)
    check_seconds: float = 35
    # at most this long from the decision to stop a server until its slices are free
    stop_seconds: float = 30
    # how often the service decides (one stop ends, the next one starts this much later)
    step_seconds: float = 2
    culler: CullerSettings | None = None

    @property
    def stops_servers(self) -> bool:
        return self.enabled and not self.dry_run

    def exemption(self, user: str, groups: frozenset[str]) -> str | None:
        if user in self.exempt_users:
            return "exempt user"
        exempt = sorted(groups & self.exempt_groups)
        if exempt:
            return f"in exempt group {exempt[0]}"
        return None


@dataclass
class Holding:
    """A hub user's server that holds GPU slices, with what reclaim makes of it."""

    pod: str  # namespace/name
    node: str
    resource: str
    slices: int
    user: str
    server: str
    started: float | None = None
    last_seen: float | None = None  # None: the hub does not list this server
    # when it would be reclaimed if someone waits for its slices then: once idle
    # for the idle time, or once held for the maximum hold time
    idle_deadline: float | None = None
    hold_deadline: float | None = None
    # its slices are free by then at the latest, whatever its user does
    hard_deadline: float | None = None
    exempt: str | None = None
    stopping: bool = False  # the hub is stopping it, or its pod is being deleted
    # when its slices should be free, if its user does not come back (the estimate)
    expected_free: float | None = None

    @property
    def node_key(self) -> NodeKey:
        return (self.resource, self.node)

    def idle_seconds(self, now: float) -> float | None:
        return max(now - self.last_seen, 0.0) if self.last_seen is not None else None

    @property
    def reclaim_at(self) -> float | None:
        times = [t for t in (self.idle_deadline, self.hold_deadline) if t is not None]
        return min(times) if times else None

    def eligible(self, now: float) -> bool:
        """Whether it may be reclaimed now, if the line needs it."""
        reclaim_at = self.reclaim_at
        return (
            reclaim_at is not None
            and now >= reclaim_at
            and not self.stopping
            and self.exempt is None
        )

    def reason(self, now: float) -> str:
        """Why it is reclaimed now: idle where it is, else held too long."""
        if self.idle_deadline is not None and now >= self.idle_deadline:
            return IDLE
        return MAX_HOLD


def holdings(
    view: ClusterView,
    activity: Mapping[tuple[str, str], ServerActivity],
    policy: Policy,
    stopping_since: Mapping[str, float] | None = None,
) -> list[Holding]:
    """Every GPU pod of a hub user, with its deadlines.

    ``stopping_since`` maps the pods known to be stopping to when that was first
    seen: their slices count as free ``stop_seconds`` later.
    """
    stopping_since = stopping_since or {}
    culler = policy.culler
    found = []
    for key, pod in view.pods.items():
        if pod.user is None:
            continue  # not the hub's: never reclaimed, never a deadline
        seen = activity.get((pod.user, pod.server or ""))
        for resource, slices in pod.slices.items():
            holding = Holding(
                pod=key,
                node=pod.node,
                resource=resource,
                slices=slices,
                user=pod.user,
                server=pod.server or "",
            )
            if seen is not None:
                _judge(holding, seen, policy, culler)
            since = stopping_since.get(key)
            if since is not None or pod.deleting:
                holding.stopping = True
                if since is not None:
                    holding.hard_deadline = since + policy.stop_seconds
                    holding.expected_free = holding.hard_deadline
            found.append(holding)
    return found


def _judge(
    holding: Holding, seen: ServerActivity, policy: Policy, culler: CullerSettings | None
) -> None:
    holding.started = seen.started
    holding.last_seen = seen.last_seen
    holding.exempt = policy.exemption(seen.user, seen.groups)
    if seen.pending == "stop":
        holding.stopping = True
    deadlines: list[float] = []  # that cannot move later
    expected: list[float] = []  # that hold if the user stays away
    if policy.enabled and holding.exempt is None and seen.ready and not seen.pending:
        if holding.last_seen is not None:
            holding.idle_deadline = holding.last_seen + policy.idle_seconds
        if policy.max_hold_seconds and seen.started is not None:
            holding.hold_deadline = seen.started + policy.max_hold_seconds
            if policy.stops_servers:
                deadlines.append(holding.hold_deadline)
        if policy.stops_servers and holding.reclaim_at is not None:
            expected.append(holding.reclaim_at + policy.check_seconds / 2)
    if culler is not None and culler.culls_every_server:
        if culler.max_age and seen.started is not None:
            # it looks every `every` seconds, and stops servers on its own
            deadlines.append(seen.started + culler.max_age + culler.every + policy.stop_seconds)
        if culler.timeout and holding.last_seen is not None:
            expected.append(holding.last_seen + culler.timeout + culler.every / 2)
    holding.hard_deadline = min(deadlines) if deadlines else None
    expected += deadlines
    holding.expected_free = min(expected) if expected else None


# -- what the line needs -------------------------------------------------------------


@dataclass
class Need:
    """A server to stop, and the waiting spawn whose slices it frees."""

    holding: Holding
    ticket: Ticket


def plan(
    found: Sequence[Holding], view: ClusterView, line: Iterable[Ticket], now: float
) -> list[Need]:
    """The servers the line needs stopped now, longest idle first.

    Walks the line in its order, as admission does: a spawn takes slices that
    are free (or being freed) first; only when there are none in its pool does
    it need a server reclaimed, the longest idle one eligible on a node of its
    pool where that makes room for it. A spawn that nothing can make room for
    blocks the spawns behind it that compete for the same nodes, as it does in
    admission, so nothing is stopped for slices that would wait for it.
    """
    confirmed = [t for t in line if t.state == WAITING and t.confirmed]
    if not confirmed:
        return []
    freeing: Counter[NodeKey] = Counter()
    for holding in found:
        if holding.stopping:
            freeing[holding.node_key] += holding.slices
    candidates = sorted(
        (h for h in found if h.eligible(now)),
        key=lambda h: (-(h.idle_seconds(now) or 0.0), h.started or 0.0, h.pod),
    )
    taken: Counter[NodeKey] = Counter()  # room the walk has given out, per node

    def room(key: NodeKey) -> int:
        return view.available(key) + freeing[key] - taken[key]

    needs: list[Need] = []
    chosen: set[int] = set()
    blocked = []
    for ticket in confirmed:
        if any(view.overlaps(ticket.pool, other) for other in blocked):
            continue
        resource = ticket.pool.resource
        nodes = view.nodes_with_room(resource) | {n for (r, n) in freeing if r == resource}
        spot = next(
            (
                n
                for n in sorted(nodes)
                if ticket.pool.key in view.pools_of(n) and room((resource, n)) >= ticket.slices
            ),
            None,
        )
        if spot is not None:
            taken[(resource, spot)] += ticket.slices
            continue
        for index, holding in enumerate(candidates):
            if (
                index in chosen
                or holding.resource != resource
                or ticket.pool.key not in view.pools_of(holding.node)
                or room(holding.node_key) + holding.slices < ticket.slices
            ):
                continue
            chosen.add(index)
            taken[holding.node_key] += ticket.slices - holding.slices
            needs.append(Need(holding, ticket))
            break
        else:
            blocked.append(ticket.pool)
    needs.sort(key=lambda need: (-(need.holding.idle_seconds(now) or 0.0), need.holding.pod))
    return needs


def waiting_by_pool(line: Iterable[Ticket]) -> Counter[tuple[str, str]]:
    """Waiting spawns per (resource, pool key): counted once, read for every holding."""
    return Counter((t.pool.resource, t.pool.key) for t in line if t.state == WAITING)


def waiting_for(holding: Holding, view: ClusterView, waiting: Counter[tuple[str, str]]) -> int:
    """How many waiting spawns could use this holding's slices."""
    return sum(waiting[(holding.resource, key)] for key in view.pools_of(holding.node))


# -- what the line may be promised --------------------------------------------------------


@dataclass
class Supply:
    """When slices of one pool free up: at the latest (``hard``) and as expected.

    Each list holds (time, slices) sorted by time. Slices nobody holds or was
    promised count as free from the start (time -inf).
    """

    hard: list[tuple[float, int]] = field(default_factory=list)
    expected: list[tuple[float, int]] = field(default_factory=list)
    # the same per node, for spawns that need several slices on one node
    hard_by_node: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    expected_by_node: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    @classmethod
    def of(cls, pool_key: str, resource: str, view: ClusterView, found: Sequence[Holding]):
        supply = cls()
        for name in view.nodes_with_room(resource):
            if pool_key in view.pools_of(name):
                free = view.available((resource, name))
                for target in (supply.hard, supply.expected):
                    target.append((-math.inf, free))
                supply.hard_by_node.setdefault(name, []).append((-math.inf, free))
                supply.expected_by_node.setdefault(name, []).append((-math.inf, free))
        for holding in found:
            if holding.resource != resource or pool_key not in view.pools_of(holding.node):
                continue
            if holding.hard_deadline is not None:
                entry = (holding.hard_deadline, holding.slices)
                supply.hard.append(entry)
                supply.hard_by_node.setdefault(holding.node, []).append(entry)
            if holding.expected_free is not None:
                entry = (holding.expected_free, holding.slices)
                supply.expected.append(entry)
                supply.expected_by_node.setdefault(holding.node, []).append(entry)
        for entries in (supply.hard, supply.expected):
            entries.sort()
        for per_node in (supply.hard_by_node, supply.expected_by_node):
            for entries in per_node.values():
                entries.sort()
        return supply


def kth_slice(entries: Sequence[tuple[float, int]], k: int) -> tuple[float, int] | None:
    """When the k-th slice is free, and how many servers stop to free slices by then
    (slices free from the start need none)."""
    total = stops = 0
    for when, slices in entries:
        total += slices
        stops += when != -math.inf
        if total >= k:
            return when, stops
    return None


def _on_one_node(per_node: Mapping[str, Sequence[tuple[float, int]]], slices: int):
    best = None
    for entries in per_node.values():
        found = kth_slice(entries, slices)
        if found is not None and (best is None or found[0] < best[0]):
            best = found
    return best


@dataclass(frozen=True)
class Outlook:
    """When a waiting spawn should get its slices, and when at the latest (Unix times)."""

    eta_at: float | None = None
    bound_at: float | None = None


def outlook(
    ticket: Ticket,
    place: Place,
    supply: Supply,
    policy: Policy,
    now: float,
    clock: ReleaseClock | None = None,
    reconnect_seconds: float = 0,
    held_ahead: int = 0,
    stop_in_flight: bool = False,
) -> Outlook:
    """The estimate and the bound of one waiting spawn, as of ``now``.

    It is admitted once the slices asked for by everyone ahead of it who
    competes for the same nodes (``place.rival_slices_ahead``, plus places held
    for spawns that may come back, ``held_ahead``) and its own are free in its
    pool: the k-th slice. Let T be the k-th of the deadlines that cannot move
    (``supply.hard``) and s the number of servers stopped to reach it. Every
    one of those is eligible by T, and reclaim acts within ``check_seconds``,
    one stop at a time per line, each taking at most ``stop_seconds`` and the
    next starting at most ``step_seconds`` after the last (a stop already in
    flight for this line goes first). So the spawn is admitted by::

        max(T, now) + check + (s + in flight) * (stop + step)

    plus, with tickets ahead not yet back after a restart of the service, the
    time they are waited for. A spawn that needs several slices on one node
    gets a bound only when nobody is ahead of it, and nobody ahead may need
    several: elsewhere slices that free up on different nodes prove nothing.
    """
    k = place.rival_slices_ahead + held_ahead + ticket.slices
    if ticket.slices == 1 and not place.multi_slice_ahead:
        hard, expected = kth_slice(supply.hard, k), kth_slice(supply.expected, k)
    elif k == ticket.slices and not place.multi_slice_ahead:
        hard = _on_one_node(supply.hard_by_node, ticket.slices)
        expected = _on_one_node(supply.expected_by_node, ticket.slices)
    else:
        hard = expected = None
    bound = None
    if hard is not None:
        when, stops = hard
        per_stop = policy.stop_seconds + policy.step_seconds
        bound = max(when, now) + policy.check_seconds + (stops + stop_in_flight) * per_stop
        if place.unconfirmed_ahead:
            bound += reconnect_seconds
    estimates = []
    if expected is not None:
        when, _ = expected
        joined = ticket.joined_at if ticket.joined_at is not None else ticket.requested_at
        estimates.append(max(when, joined) + policy.stop_seconds / 2)
    if clock is not None and clock.times:
        per_slice = clock.seconds_per_slice()
        if per_slice is not None:
            estimates.append(clock.times[-1] + per_slice * k)
    eta = min(estimates) if estimates else None
    if bound is not None:
        eta = bound if eta is None else min(eta, bound)
    return Outlook(eta_at=eta, bound_at=bound)
