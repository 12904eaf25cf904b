"""Reclaim: stop GPU servers that sit idle while others wait for their slices.

The decisions are :mod:`jupyterhub_gpushare.reclaim`'s (pure); this class gives
them what the hub knows and carries them out:

- it reads the hub's ``last_activity`` of every server (``GET /users``, page by
  page, through :class:`~.hubapi.HubAPI`) while someone waits, at most every
  ``activity_refresh_seconds``;
- on each turn of the dispatcher's housekeeping it asks :func:`~..reclaim.plan`
  which servers the line needs stopped, and stops them one at a time per pool:
  it looks at that one server again first (its user may have come back, or
  the idle culler may be stopping it), records the reclaim (so the hub's
  spawner can tell the user why) and asks the hub to stop it
  (``DELETE /users/:name/server``);
- it keeps the recent reclaims for the admins' API and the users' notices, and
  counts them, and the slice-seconds held idle while someone waited, in the
  service's metrics.

Nobody is reclaimed while nobody waits, whatever the settings.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from traitlets import All, Bool, Float, Integer, Set, Unicode, observe
from traitlets.config import LoggingConfigurable

from ..clusterview import ClusterView
from ..fairqueue import FairQueue, Ticket
from ..reclaim import (
    IDLE,
    CullerSettings,
    Holding,
    Need,
    Outlook,
    Policy,
    ServerActivity,
    Supply,
    activity_of,
    holdings,
    outlook,
    parse_time,
    plan,
    waiting_by_pool,
    waiting_for,
)
from . import metrics
from .hubapi import HubAPI, HubAPIError

# a reclaimed user who starts again within this time counts as a return
RETURN_SECONDS = 300


@dataclass
class ReclaimRecord:
    """One reclaim (or, in a dry run, one that would have been)."""

    user: str
    server: str
    at: float  # Unix time of the decision
    idle_seconds: float  # how long the server had been idle then
    held_seconds: float | None  # how long it had been running
    waiting: int  # spawns waiting that its slices could serve
    slices: int
    node: str
    reason: str  # idle or max-hold
    outcome: str  # stopped, stopping, dry-run, skipped, failed
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def public(self) -> dict:
        """What its own user may read: no node names."""
        data = self.to_json()
        data.pop("node", None)
        return data


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{minutes} min" if minutes < 120 else f"{minutes / 60:.1f} h"


class Reclaimer(LoggingConfigurable):
    enabled = Bool(
        False,
        config=True,
        help="""
        Stop GPU servers that have been idle for ``idle_seconds`` while someone
        waits for their slices, so that the line moves. Only ever as many as
        the waiting users need, the longest idle first, one at a time; never
        while nobody waits. The user's files are kept (the server is stopped as
        by the Stop button, through the hub's REST API). ``configure(c)`` grants
        the service the ``delete:servers`` scope only when this is on::

            c.Reclaimer.enabled = True
        """,
    )
    dry_run = Bool(
        False,
        config=True,
        help="""
        Only report who would be reclaimed (in the log, the admins' panel and
        ``api/reclaims``), stop nobody. A safe way to see what ``enabled``
        would do with your users::

            c.Reclaimer.dry_run = True
        """,
    )
    idle_seconds = Float(
        1200,
        config=True,
        help="""
        How long a GPU server must have been idle (the hub's ``last_activity``,
        which counts kernel and terminal activity and the user's requests)
        before it may be reclaimed for someone waiting. The hub learns of
        activity every ``JUPYTERHUB_ACTIVITY_INTERVAL`` (300 s by default), so
        keep this well above that::

            c.Reclaimer.idle_seconds = 20 * 60
        """,
    )
    max_hold_seconds = Float(
        0,
        config=True,
        help="""
        Longest a GPU server may keep its slices while others wait for them,
        active or not, counted from its start (0: no limit). Gives waiting
        users an upper bound on their wait::

            c.Reclaimer.max_hold_seconds = 4 * 3600
        """,
    )
    exempt_users = Set(
        Unicode(),
        config=True,
        help="""
        Users whose servers are never reclaimed::

            c.Reclaimer.exempt_users = {"instructor", "ta-ana"}
        """,
    )
    exempt_groups = Set(
        Unicode(),
        config=True,
        help="""
        JupyterHub groups whose members' servers are never reclaimed
        (``configure(c)`` then grants the service ``read:users:groups``)::

            c.Reclaimer.exempt_groups = {"staff"}
        """,
    )
    activity_refresh_seconds = Float(
        30,
        config=True,
        help="""
        How often the hub is asked for every server's last activity while
        someone waits (one paginated ``GET /users``). The hub itself learns of
        activity only every few minutes, so asking more often gains little::

            c.Reclaimer.activity_refresh_seconds = 30
        """,
    )
    stop_seconds = Float(
        30,
        config=True,
        help="""
        Time one reclaim may take, from the decision until its slices are free
        (a fresh look at the server, the hub stopping it, the pod's deletion).
        Used for the upper bound on waits, and as the timeout of the request
        that stops the server::

            c.Reclaimer.stop_seconds = 30
        """,
    )
    history_size = Integer(
        200,
        config=True,
        help="""
        How many recent reclaims ``api/reclaims`` keeps (in memory)::

            c.Reclaimer.history_size = 200
        """,
    )
    notice_seconds = Float(
        600,
        config=True,
        help="""
        A reclaim this recent is told to the user when the hub stops their
        server (it is then shown on their home and spawn pages)::

            c.Reclaimer.notice_seconds = 600
        """,
    )

    culler_timeout_seconds = Float(
        0,
        config=True,
        help="""
        The idle culler's ``--timeout`` (z2jh ``cull.timeout``), for the wait
        estimate. Filled in by ``configure(c)`` from the culler service's
        command line; 0 when there is no culler::

            c.Reclaimer.culler_timeout_seconds = 3600
        """,
    )
    culler_every_seconds = Float(
        600,
        config=True,
        help="""
        The idle culler's ``--cull-every`` (z2jh ``cull.every``). Filled in by
        ``configure(c)``::

            c.Reclaimer.culler_every_seconds = 600
        """,
    )
    culler_max_age_seconds = Float(
        0,
        config=True,
        help="""
        The idle culler's ``--max-age`` (z2jh ``cull.maxAge``): servers older
        than this are stopped active or not, which bounds waits. Filled in by
        ``configure(c)``; 0 for none::

            c.Reclaimer.culler_max_age_seconds = 8 * 3600
        """,
    )
    culler_culls_every_server = Bool(
        True,
        config=True,
        help="""
        Whether the idle culler may stop every server (False when it spares
        admins' or named servers); its maximum age bounds waits only then.
        Filled in by ``configure(c)``::

            c.Reclaimer.culler_culls_every_server = True
        """,
    )

    def __init__(
        self,
        view: ClusterView,
        queue: FairQueue,
        hub_api: HubAPI | None,
        loop_seconds: float = 2.0,
        on_change: Callable[[], None] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.view = view
        self.queue = queue
        self.hub_api = hub_api
        self.loop_seconds = loop_seconds  # how often tick() runs
        self.on_change = on_change  # told when what waiting users are told may change
        self.activity: dict[tuple[str, str], ServerActivity] = {}
        self.user_activity: dict[str, float | None] = {}  # user -> last activity
        self.activity_at: float | None = None  # when it was read (Unix time)
        self.activity_problem: str | None = None
        self.history: deque[ReclaimRecord] = deque(maxlen=self.history_size)
        self.would_reclaim: dict[str, Need] = {}  # pod -> what the line needs of it
        self._refresh: asyncio.Task | None = None
        self._stops: dict[str, str] = {}  # pool key -> the pod whose stop is in flight
        self._stopping_since: dict[str, float] = {}  # pods we stopped, since when
        self._reported: dict[str, float | None] = {}  # dry run: pod -> its server's start
        self._last_tick: float | None = None
        self._holdings: list[Holding] | None = None
        self._supply: dict[str, Supply] = {}
        self._line_seen = 0
        self._looked_at = 0.0  # when a page last asked for activity

    # -- settings --------------------------------------------------------------------------
    @observe(All)
    def _settings_changed(self, change) -> None:
        self._policy = None

    @property
    def policy(self) -> Policy:
        """The settings as one value (read for every status: built once)."""
        if getattr(self, "_policy", None) is None:
            self._policy = self._make_policy()
        return self._policy

    def _make_policy(self) -> Policy:
        culler = None
        if self.culler_timeout_seconds or self.culler_max_age_seconds:
            culler = CullerSettings(
                timeout=self.culler_timeout_seconds,
                every=self.culler_every_seconds,
                max_age=self.culler_max_age_seconds,
                culls_every_server=self.culler_culls_every_server,
            )
        return Policy(
            enabled=self.enabled,
            dry_run=self.dry_run,
            idle_seconds=self.idle_seconds,
            max_hold_seconds=self.max_hold_seconds,
            exempt_users=frozenset(self.exempt_users),
            exempt_groups=frozenset(self.exempt_groups),
            check_seconds=self.activity_refresh_seconds + 2 * self.loop_seconds,
            stop_seconds=self.stop_seconds,
            step_seconds=self.loop_seconds,
            culler=culler,
        )

    def settings_json(self) -> dict:
        """The settings, for the pages and the API."""
        return {
            "enabled": self.enabled,
            "dry_run": self.dry_run,
            "idle_seconds": self.idle_seconds,
            "max_hold_seconds": self.max_hold_seconds or None,
            "description": self.describe(),
        }

    def holding_json(
        self, holding: Holding, now: float, waiting: Counter[tuple[str, str]] | None = None
    ) -> dict:
        """What reclaim makes of one holding (no names: the caller adds those it may
        see). ``waiting``: :func:`waiting_by_pool` of the line, if already counted."""
        idle = holding.idle_seconds(now)
        if waiting is None:
            waiting = waiting_by_pool(self.queue.waiting())
        return {
            "idle_seconds": round(idle, 1) if idle is not None else None,
            "reclaim_at": holding.reclaim_at,
            "exempt": holding.exempt,
            "stopping": holding.stopping,
            "reclaim_now": holding.pod in self.would_reclaim,
            "waiting": waiting_for(holding, self.view, waiting),
        }

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        words = f"after {_duration(self.idle_seconds)} idle while someone waits"
        if self.max_hold_seconds:
            words += f", or held {_duration(self.max_hold_seconds)}"
        return ("dry run: " if self.dry_run else "") + words

    # -- what is known ---------------------------------------------------------------------
    def changed(self) -> None:
        """Holders changed: holdings and deadlines are worked out again."""
        self._holdings = None
        self._supply = {}

    def pools_changed(self, keys: set[str]) -> None:
        """Capacity changed in these pools (not who holds what): their supply is new."""
        for key in keys:
            self._supply.pop(key, None)

    def holdings(self) -> list[Holding]:
        if self._holdings is None:
            self._holdings = holdings(self.view, self.activity, self.policy, self._stopping_since)
            self._supply = {}
        return self._holdings

    def outlook(self, ticket: Ticket, reconnect_seconds: float, now: float) -> Outlook:
        """Estimate and bound of a waiting spawn."""
        place = self.queue.places().get(ticket.id)
        if place is None:
            return Outlook()
        supply = self._supply.get(ticket.pool.key)
        if supply is None:
            supply = Supply.of(ticket.pool.key, ticket.pool.resource, self.view, self.holdings())
            self._supply[ticket.pool.key] = supply
        held_ahead = sum(
            t.slices
            for t in self.queue.held()
            if t.order < ticket.order and self.view.overlaps(t.pool, ticket.pool)
        )
        return outlook(
            ticket,
            place,
            supply,
            self.policy,
            now,
            clock=self.queue.releases.get(ticket.pool.key),
            reconnect_seconds=reconnect_seconds,
            held_ahead=held_ahead,
            stop_in_flight=ticket.pool.key in self._stops,
        )

    # -- activity --------------------------------------------------------------------------
    def looked_at(self) -> None:
        """A page wants idle times: keep them fresh for a while even if nobody waits."""
        self._looked_at = time.monotonic()

    async def fresh_activity(self, max_age: float) -> None:
        """Activity no older than ``max_age`` seconds (one fetch for every caller)."""
        if self.hub_api is None or (
            self.activity_at is not None and time.time() - self.activity_at < max_age
        ):
            return
        self._start_refresh()
        await asyncio.shield(self._refresh)

    def _start_refresh(self) -> None:
        if self.hub_api is None or (self._refresh is not None and not self._refresh.done()):
            return
        self._refresh = asyncio.ensure_future(self._read_activity())

    async def _read_activity(self) -> None:
        try:
            users = [u async for u in self.hub_api.users(state="active")]
        except HubAPIError as e:
            if self.activity_problem is None:
                self.log.warning("Cannot read the servers' activity from the hub: %s", e)
            self.activity_problem = str(e)
            return
        if self.activity_problem is not None:
            self.log.info("Reading the servers' activity from the hub works again")
        self.activity_problem = None
        self.activity = activity_of(users)
        self.user_activity = {
            u["name"]: parse_time(u.get("last_activity")) for u in users if "name" in u
        }
        self.activity_at = time.time()
        self.changed()
        if self.on_change is not None:
            self.on_change()

    # -- each turn of the housekeeping -----------------------------------------------------
    def tick(self, now: float) -> None:
        line = [t for t in self.queue.waiting() if t.confirmed]
        self._count_idle_held(line, now)
        stale = self.activity_at is None or now - self.activity_at >= self.activity_refresh_seconds
        grew = len(line) > self._line_seen and (
            self.activity_at is None or now - self.activity_at >= 2
        )
        self._line_seen = len(line)
        looked = time.monotonic() - self._looked_at < 60
        if (line or looked) and (stale or grew):
            self._start_refresh()
        self._forget_stopped()
        if not self.enabled or not line or self.activity_at is None:
            self.would_reclaim = {}
            return
        needs = plan(self.holdings(), self.view, line, now)
        self.would_reclaim = {n.holding.pod: n for n in needs}
        counts = waiting_by_pool(line)
        for need in needs:
            if self.dry_run:
                self._report(need, counts, now)
                continue
            pool, pod = need.ticket.pool.key, need.holding.pod
            # one stop at a time per line, and never two of the same server
            if pool in self._stops or pod in self._stops.values() or pod in self._stopping_since:
                continue
            self._stops[pool] = pod
            waiting = waiting_for(need.holding, self.view, counts)
            task = asyncio.ensure_future(self._reclaim(need, waiting))
            task.add_done_callback(lambda task, pool=pool: self._stop_done(pool, task))

    def _stop_done(self, pool: str, task: asyncio.Task) -> None:
        self._stops.pop(pool, None)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("Reclaim failed unexpectedly: %r", task.exception())

    def _count_idle_held(self, line: list[Ticket], now: float) -> None:
        last, self._last_tick = self._last_tick, now
        if last is None or not line or self.activity_at is None:
            return
        elapsed = min(now - last, 10 * self.loop_seconds)
        wanted = {(t.pool.resource, t.pool.key) for t in line}
        slices = 0
        for holding in self.holdings():
            idle = holding.idle_seconds(now)
            if idle is None or idle < self.idle_seconds or holding.stopping:
                continue
            pools = self.view.pools_of(holding.node)
            if any(r == holding.resource and k in pools for r, k in wanted):
                slices += holding.slices
        if slices:
            metrics.IDLE_SLICES_HELD.inc(slices * elapsed)

    def _forget_stopped(self) -> None:
        """Pods we stopped leave our books once they are gone from the cluster."""
        for pod in [p for p in self._stopping_since if p not in self.view.pods]:
            del self._stopping_since[pod]
            self.changed()
        for pod in [p for p in self._reported if p not in self.view.pods]:
            del self._reported[pod]

    # -- carrying it out -------------------------------------------------------------------
    def _record(self, need: Need, waiting: int, now: float, outcome: str) -> ReclaimRecord:
        holding = need.holding
        record = ReclaimRecord(
            user=holding.user,
            server=holding.server,
            at=now,
            idle_seconds=round(holding.idle_seconds(now) or 0.0, 1),
            held_seconds=round(now - holding.started, 1) if holding.started else None,
            waiting=waiting,
            slices=holding.slices,
            node=holding.node,
            reason=holding.reason(now),
            outcome=outcome,
        )
        self.history.append(record)
        return record

    def _report(self, need: Need, counts: Counter[tuple[str, str]], now: float) -> None:
        """Dry run: say once per server start who would be reclaimed."""
        holding = need.holding
        if holding.pod in self._reported and self._reported[holding.pod] == holding.started:
            return
        self._reported[holding.pod] = holding.started
        waiting = waiting_for(holding, self.view, counts)
        record = self._record(need, waiting, now, "dry-run")
        metrics.SERVERS_RECLAIMED.labels(
            reason=record.reason.replace("-", "_"), outcome="dry_run"
        ).inc()
        self.log.info(
            "Dry run: would reclaim %s's %s (%d slices on %s): %s while %d waited",
            holding.user,
            _server_words(holding.server),
            holding.slices,
            holding.node,
            _why(record),
            waiting,
        )

    async def _reclaim(self, need: Need, waiting: int) -> None:
        holding = need.holding
        name = f"{holding.user}'s {_server_words(holding.server)}"
        # a fresh look at this one server: the user may be back, or it may be stopping
        try:
            model = await self.hub_api.user(holding.user)
        except HubAPIError as e:
            self.log.warning("Not reclaiming %s: cannot ask the hub about it (%s)", name, e)
            return
        server = (model or {}).get("servers", {}).get(holding.server)
        now = time.time()
        skip = None
        if server is None:
            skip = "it has already stopped"
        elif server.get("pending"):
            skip = f"it is already {server['pending'].replace('stop', 'stopping')}"
        else:
            seen = ServerActivity.from_hub(model, holding.server, server)
            self.activity[(holding.user, holding.server)] = seen
            self.changed()
            fresh = next((h for h in self.holdings() if h.pod == holding.pod), None)
            if fresh is None or not fresh.eligible(now):
                idle = fresh.idle_seconds(now) if fresh is not None else None
                skip = "it is in use" + (f" (active {idle:.0f}s ago)" if idle is not None else "")
            else:
                holding = fresh
        if skip is not None:
            self.log.info("Not reclaiming %s: %s", name, skip)
            metrics.SERVERS_RECLAIMED.labels(
                reason=holding.reason(now).replace("-", "_"), outcome="skipped"
            ).inc()
            self.changed()
            return
        need = Need(holding, need.ticket)
        # recorded before the stop, so the hub's spawner finds it as it stops
        record = self._record(need, waiting, now, "stopping")
        self._stopping_since[holding.pod] = now
        self.changed()
        self.log.info(
            "Reclaiming %s (%d slices on %s): %s while %d waited",
            name,
            holding.slices,
            holding.node,
            _why(record),
            waiting,
        )
        reason = record.reason.replace("-", "_")
        try:
            status = await self.hub_api.stop_server(
                holding.user, holding.server, timeout=self.stop_seconds
            )
        except HubAPIError as e:
            record.outcome, record.detail = "failed", str(e)
            self._stopping_since.pop(holding.pod, None)
            self.changed()
            metrics.SERVERS_RECLAIMED.labels(reason=reason, outcome="failed").inc()
            self.log.error("Reclaiming %s failed: %s", name, e)
            return
        if status == 404:
            record.outcome, record.detail = "skipped", "it was gone"
            metrics.SERVERS_RECLAIMED.labels(reason=reason, outcome="skipped").inc()
            self.log.info("%s was gone before the hub could stop it", name)
            return
        record.outcome = "stopped" if status == 204 else "stopping"
        metrics.SERVERS_RECLAIMED.labels(reason=reason, outcome="stopped").inc()
        self.log.info(
            "Reclaimed %s: %s", name, "stopped" if status == 204 else "the hub is stopping it"
        )

    # -- the hub and the users -------------------------------------------------------------
    def notice_for(
        self, user: str, server: str, now: float, since: float = 0
    ) -> ReclaimRecord | None:
        """The reclaim that is stopping this server, if any (for its user): decided
        after ``since`` (the server's start) and at most ``notice_seconds`` ago, so
        that a server stopped later by someone else is never put down to it."""
        for record in reversed(self.history):
            if now - record.at > self.notice_seconds or record.at < since:
                return None
            if (
                record.user == user
                and record.server == server
                and record.outcome in ("stopping", "stopped")
            ):
                return record
        return None

    def joined(self, ticket: Ticket, now: float) -> None:
        """A spawn joined the line: was it a reclaimed user coming back at once?"""
        for record in reversed(self.history):
            if now - record.at > RETURN_SECONDS:
                return
            if (
                record.user == ticket.user
                and record.server == ticket.server
                and record.outcome in ("stopping", "stopped")
                and not record.detail
            ):
                record.detail = f"started again after {now - record.at:.0f}s"
                metrics.RECLAIMED_USERS_RETURNED.inc()
                self.log.info(
                    "%s came back %.0fs after being reclaimed", ticket.user, now - record.at
                )
                return


def _server_words(server: str) -> str:
    return f"server {server!r}" if server else "default server"


def _why(record: ReclaimRecord) -> str:
    if record.reason == IDLE:
        return f"idle for {_duration(record.idle_seconds)}"
    return f"held for {_duration(record.held_seconds or 0)} (idle {_duration(record.idle_seconds)})"
