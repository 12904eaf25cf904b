"""The service's core: watch events in, admissions and status updates out.

The watchers feed the :class:`~..clusterview.ClusterView` one event at a time,
and each event is dealt with at once: a cycle settles bookings whose pods are
now bound, admits whoever a node has room for, marks the line to be saved, and
wakes the followers whose status may have changed (each works out its own
afterwards). Nothing in a cycle scans the whole cluster. A re-list, which
swaps in a whole new list, makes one cycle.

A spawn is known to be alive while the hub follows its ticket. One that nobody
follows for ``reconnect_seconds`` (the hub restarted and dropped it, or its
spawner is gone) never holds a slice: its place is held for ``hold_seconds``
in case the same server is started again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable

from kubernetes_asyncio import client
from traitlets import Float, Integer, List, Unicode
from traitlets.config import LoggingConfigurable

from ..capacity import PoolSpec
from ..clusterview import ClusterView
from ..fairqueue import FairQueue, LimitReached, Ticket, UserLimits
from ..objects import PRODUCT_LABEL
from ..tickets import ADMITTED, GONE, HELD, WAITING, TicketRequest, TicketStatus
from ..watch import node_watcher, pod_watcher
from . import metrics
from .hubapi import HubAPI
from .notifier import Follower, Notifier
from .queuestore import QueueStore
from .reclaimer import Reclaimer

# what users are told while the service cannot see the cluster (admins see why)
NOT_READY = "the GPU service is reading the cluster's GPU nodes"
# what a ticket's status says of its pool: what the spawn page shows
TICKET_POOL_KEYS = (
    "key",
    "resource",
    "selector",
    "products",
    "sharing",
    "slices_total",
    "slices_free",
)


class Dispatcher(LoggingConfigurable):
    resources = List(
        Unicode(),
        ["nvidia.com/gpu", "nvidia.com/gpu.shared"],
        config=True,
        help="""
        GPU resources whose slices the service counts and queues for::

            c.Dispatcher.resources = ["nvidia.com/gpu"]
        """,
    )
    reservation_seconds = Float(
        120,
        config=True,
        help="""
        How long an admitted spawn's slices stay booked while its pod is not
        bound to the node yet::

            c.Dispatcher.reservation_seconds = 120
        """,
    )
    reconnect_seconds = Float(
        15,
        config=True,
        help="""
        A spawn that the hub stops following for this long is taken to be gone
        (the hub restarted, or its spawner died): it no longer holds a slice
        and its place is held for ``hold_seconds``. The hub's spawners
        reconnect within a few seconds after a restart of the service::

            c.Dispatcher.reconnect_seconds = 15
        """,
    )
    hold_seconds = Float(
        300,
        config=True,
        help="""
        How long the place of a spawn that went away is kept. When the hub
        restarts (``helm upgrade``) it drops pending spawns; a user who starts
        the same server again within this time gets their old place back::

            c.Dispatcher.hold_seconds = 300
        """,
    )
    max_gpu_servers_per_user = Integer(
        1,
        config=True,
        help="""
        GPU servers one user may have at once, running or waiting (0: no
        limit). Matters with named servers (``c.JupyterHub.allow_named_servers``):
        ``named_server_limit_per_user`` caps all of a user's servers, this caps
        those with a GPU. CPU-only servers never count::

            c.Dispatcher.max_gpu_servers_per_user = 2
        """,
    )
    max_slices_per_user = Integer(
        0,
        config=True,
        help="""
        GPU slices one user's servers may hold and wait for together (0: no
        limit beyond ``max_gpu_servers_per_user``)::

            c.Dispatcher.max_slices_per_user = 2
        """,
    )

    def __init__(self, api: client.CoreV1Api, hub_api: HubAPI | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = ClusterView(self.resources)
        self.queue = FairQueue(
            self.view,
            reservation_seconds=self.reservation_seconds,
            hold_seconds=self.hold_seconds,
            limits=UserLimits(self.max_gpu_servers_per_user, self.max_slices_per_user),
        )
        self.store = QueueStore(parent=self)
        self.notifier = Notifier()
        self.nodes = node_watcher(api, self, parent=self)
        self.pods = pod_watcher(api, tuple(self.resources), self, parent=self)
        self._cycle_scheduled = False
        self._publish_all = True
        self._places_published: object = None
        self._summaries: dict[str, dict] = {}  # what waiting users see of each pool
        self._save_handle: asyncio.TimerHandle | None = None
        self._housekeeping: asyncio.Task | None = None
        self.housekeeping_seconds = max(min(self.reconnect_seconds / 5, 2.0), 0.2)
        self.reclaimer = Reclaimer(
            self.view,
            self.queue,
            hub_api,
            loop_seconds=self.housekeeping_seconds,
            on_change=self._outlooks_changed,
            parent=self,
        )

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        now = time.time()
        self.queue.restore(self.store.load(), now, self.reconnect_seconds)
        self.nodes.start()
        self.pods.start()
        self._housekeeping = asyncio.ensure_future(self._housekeeping_loop())
        self.log.info("Reclaim of idle GPU servers: %s", self.reclaimer.describe())

    async def stop(self) -> None:
        if self._housekeeping:
            self._housekeeping.cancel()
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_now()
        await self.nodes.stop()
        await self.pods.stop()

    @property
    def ready(self) -> bool:
        return self.nodes.synced.is_set() and self.pods.synced.is_set()

    @property
    def problem(self) -> str | None:
        """Why the view is not ready, in detail: for admins and the log only."""
        return self.nodes.last_error or self.pods.last_error

    # -- watch events (WatchConsumer) ---------------------------------------------------
    def replace(self, kind: str, objects: dict[str, dict]) -> None:
        if kind == "nodes":
            self.view.replace_nodes(objects)
        else:
            self.view.replace_pods(objects)
        self.reclaimer.changed()
        self._publish_all = True
        self._soon()

    def apply(self, kind: str, key: str, obj: dict | None) -> None:
        if kind == "nodes":
            self.view.apply_node(key, obj)
        else:
            self.view.apply_pod(key, obj)
        # dealt with at once: a cycle after one event touches one node's worth of
        # state, and the followers it wakes work out their statuses afterwards
        if not self._cycle_scheduled:
            self.cycle()

    def stale(self, kind: str, problem: str) -> None:
        self._publish_all = True
        self._soon()

    def _outlooks_changed(self) -> None:
        # new activity or deadlines: every waiting spawn's estimate may differ
        self._publish_all = True
        self._soon()

    def _soon(self) -> None:
        # a burst of events (a re-list, many pods at once) makes one cycle
        if not self._cycle_scheduled:
            self._cycle_scheduled = True
            asyncio.get_running_loop().call_soon(self.cycle)

    # -- the cycle ------------------------------------------------------------------------
    def cycle(self) -> None:
        self._cycle_scheduled = False
        now = time.time()
        changes = self.view.take_changes()
        for key in changes.pools:
            self._summaries.pop(key, None)
        # what reclaim works out from the holders: again only when they changed
        if changes.hub_pods:
            self.reclaimer.changed()
        elif changes.pools:
            self.reclaimer.pools_changed(changes.pools)
        for (resource, node), slices in changes.released:
            pools = [k for k in self.view.pools_of(node) if self.view.pools[k].resource == resource]
            self.queue.record_release(pools, now, slices)
        changed = False
        if self.ready:
            for ticket in self.queue.settle(changes.bound_tickets, now):
                changed = True
                self._gone(ticket, "started" if ticket.id in changes.bound_tickets else "expired")
            # only a change of capacity or of the line can let anyone in
            if changes.freed or changes.pools or self.queue.needs_admission:
                admitted = self.queue.admit(now)
            else:
                admitted = []
            for ticket in admitted:
                changed = True
                metrics.QUEUE_EXITS.labels(reason="admitted").inc()
                metrics.QUEUE_WAIT.observe(max(now - ticket.requested_at, 0))
                self.log.info(
                    "Admitted %s (%s, %d slices) onto %s after %.1fs",
                    ticket.id,
                    ticket.server or "default server",
                    ticket.slices,
                    ticket.node,
                    now - ticket.requested_at,
                )
        if changed:
            self._save_soon()
        self._publish(changes.pools)

    def _publish(self, changed_pools: set[str]) -> None:
        """Wake every follower whose status may have changed; each works out its
        own (see :meth:`statuses`)."""
        # a new order or new places concern everyone; capacity only its pools
        places = self.queue.places()
        everyone = self._publish_all or places is not self._places_published
        self._publish_all, self._places_published = False, places
        if everyone:
            self.notifier.touch()
        elif changed_pools:
            tickets = self.queue.tickets
            self.notifier.touch(
                t
                for t in list(self.notifier.followed())
                if t in tickets and tickets[t].pool.key in changed_pools
            )

    def _save_soon(self) -> None:
        """Write the line within a second. Spawners re-join with their request
        time, so a restart loses nobody's place even if the last second's
        changes were not written; writing at most once a second keeps a busy
        line from writing the whole file on every event."""
        if self._save_handle is None:
            self._save_handle = asyncio.get_running_loop().call_later(1.0, self._save_now)

    def _save_now(self) -> None:
        self._save_handle = None
        self.store.save(self.queue)

    def _gone(self, ticket: Ticket, reason: str) -> None:
        self.notifier.gone(ticket.id, TicketStatus.gone(ticket.id, reason).to_json())

    async def statuses(self, ticket_id: str, keepalive: float) -> AsyncIterator[dict | None]:
        """A ticket's status now and whenever it changes; None after ``keepalive``
        seconds without a change. Ends once the ticket has left the line.

        Following a ticket is how the hub shows that its spawn is alive.
        """
        follower = self.follow(ticket_id)
        loop = asyncio.get_running_loop()
        written = loop.time()
        try:
            while True:
                # a timer, not wait_for: no task per wake-up, and it also wakes us
                # for the keepalive
                timer = loop.call_later(keepalive, follower.changed.set)
                await follower.changed.wait()
                timer.cancel()
                follower.changed.clear()
                status = follower.final or self.ticket_status(ticket_id).to_json()
                if status != follower.last:
                    follower.last, written = status, loop.time()
                    yield status
                elif loop.time() - written >= keepalive:
                    written = loop.time()
                    yield None
                if status["state"] == GONE:
                    return
        finally:
            self.unfollow(ticket_id, follower)

    # -- statuses ------------------------------------------------------------------------
    def pool_status(self, spec: PoolSpec) -> dict:
        waiting = sum(1 for t in self.queue.waiting() if t.pool.key == spec.key)
        return self.view.pool_summary(spec, waiting)

    def _ticket_pool(self, spec: PoolSpec) -> dict:
        """What a waiting user is shown of their pool; kept until the pool's
        totals change (every cycle drops the changed ones)."""
        summary = self._summaries.get(spec.key)
        if summary is None:
            full = self.view.pool_summary(spec, 0)
            summary = self._summaries[spec.key] = {k: full[k] for k in TICKET_POOL_KEYS}
        return summary

    def ticket_status(
        self, ticket_id: str, places: dict | None = None, ready: bool | None = None
    ) -> TicketStatus:
        """Where a spawn stands. ``places`` and ``ready``, when given, are what
        the caller already has for this turn (statuses are built by the hundred)."""
        ticket = self.queue.tickets.get(ticket_id)
        if ticket is None:
            return TicketStatus.gone(ticket_id)
        ready = self.ready if ready is None else ready
        status = TicketStatus(
            ticket=ticket_id,
            state=ticket.state,
            ready=ready,
            pool=self._ticket_pool(ticket.pool),
            requested_at=ticket.requested_at,
            kept_place=ticket.kept_place,
        )
        if ticket.state == WAITING:
            place = (places or self.queue.places())[ticket_id]
            status.position, status.waiting, status.reason = (
                place.position,
                place.waiting,
                place.reason,
            )
            outlook = self.reclaimer.outlook(ticket, self.reconnect_seconds, time.time())
            if outlook.bound_at is not None:
                # every bound shown is a promise: a later, looser one never replaces it
                ticket.bound_at = min(ticket.bound_at or outlook.bound_at, outlook.bound_at)
            status.eta_bound_at = ticket.bound_at
            status.eta_at = outlook.eta_at
            if status.eta_at is not None and ticket.bound_at is not None:
                status.eta_at = min(status.eta_at, ticket.bound_at)
        elif ticket.state == ADMITTED:
            status.node = ticket.node
        elif ticket.state == HELD:
            status.held_until = ticket.held_until
        if not ready:
            status.problem = self.problem or NOT_READY
        return status

    # -- requests from the hub ---------------------------------------------------------------
    def join(self, request: TicketRequest) -> TicketStatus:
        """Raises LimitReached when the user may not have another GPU server."""
        now = time.time()
        known = request.id in self.queue.tickets
        try:
            ticket = self.queue.join(request, now)
        except LimitReached:
            metrics.QUEUE_REFUSALS.labels(reason="user_limit").inc()
            self.log.info(
                "%s refused: per-user limit (%s)", request.id, request.server or "default"
            )
            raise
        self.notifier.watch(ticket.id, now)
        if not known:
            self.reclaimer.joined(ticket, now)
            self.log.info(
                "%s joined the %s line: %s, %d slices%s",
                ticket.id,
                ticket.pool.key,
                ticket.server or "default server",
                ticket.slices,
                " (kept the place of a spawn the hub dropped)" if ticket.kept_place else "",
            )
        self._save_soon()
        self.cycle()
        return self.ticket_status(ticket.id)

    def leave(self, ticket_id: str, reason: str) -> TicketStatus | None:
        ticket = self.queue.leave(ticket_id)
        if ticket is None:
            return None
        if ticket.state in (WAITING, HELD) and reason in metrics.EXIT_REASONS:
            metrics.QUEUE_EXITS.labels(reason=reason).inc()
        self.log.info("%s left the line (%s)", ticket_id, reason)
        self._gone(ticket, reason)
        self._save_soon()
        self.cycle()
        return TicketStatus.gone(ticket_id, reason)

    def follow(self, ticket_id: str) -> Follower:
        # a spawn that follows its ticket is alive: after a restart, that confirms
        # it, and a place held for it is its own again
        if self.queue.confirm(ticket_id):
            self.log.info("%s: its spawn is back; it waits at its place again", ticket_id)
            self._save_soon()
        follower = self.notifier.follow(ticket_id)
        self._soon()
        return follower

    def unfollow(self, ticket_id: str, follower: Follower) -> None:
        self.notifier.unfollow(ticket_id, follower)

    # -- housekeeping ----------------------------------------------------------------------
    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.housekeeping_seconds)
            try:
                self.housekeeping(time.time())
            except Exception:  # never let one bad turn end the loop for good
                self.log.exception("Queue housekeeping failed; trying again")

    def housekeeping(self, now: float) -> None:
        """Spawns that went away lose their bookings; held places run out; unused
        bookings expire; idle servers are reclaimed for those who wait."""
        changed = False
        for ticket_id in self.notifier.alone(self.reconnect_seconds, now):
            ticket = self.queue.tickets.get(ticket_id)
            if ticket is not None and ticket.confirmed and ticket.state in (WAITING, ADMITTED):
                self.queue.hold(ticket_id, now)
                changed = True
                self.log.info(
                    "%s: its spawn went away (nobody followed it for %.0fs); "
                    "its place is held for %.0fs",
                    ticket_id,
                    self.reconnect_seconds,
                    self.hold_seconds,
                )
        left, held = self.queue.expire(now)
        for ticket in held:
            changed = True
            self.log.info("%s did not come back after the restart; its place is held", ticket.id)
        for ticket in left:
            changed = True
            metrics.QUEUE_EXITS.labels(reason="abandoned").inc()
            self.log.info("%s: nobody came back for its held place; it left the line", ticket.id)
            self._gone(ticket, "abandoned")
        self.notifier.prune(set(self.queue.tickets))
        if changed:
            self._save_soon()
        self.cycle()
        self.reclaimer.tick(now)

    # -- reading -------------------------------------------------------------------------------
    def pools(self) -> Iterable[PoolSpec]:
        """Every pool worth showing: each resource, each product, each queued pool."""
        seen: dict[str, PoolSpec] = {}
        for resource in self.resources:
            totals = self.view.totals[resource]
            if totals.nodes <= 0:
                continue
            seen[resource] = PoolSpec(resource)
            for product, count in totals.products.items():
                if count > 0:
                    spec = PoolSpec.from_selector(resource, {PRODUCT_LABEL: product})
                    seen.setdefault(spec.key, spec)
        for ticket in self.queue.tickets.values():
            seen.setdefault(ticket.pool.key, ticket.pool)
        return sorted(seen.values(), key=lambda p: p.key)

    def snapshot(self) -> metrics.Snapshot:
        nodes = [
            metrics.NodeSlices(name, product, resource, total, used, booked, free)
            for resource in self.resources
            for name, product, total, used, booked, free in self.view.slices(resource)
        ]
        waiting: dict[str, int] = {t.pool.key: 0 for t in self.queue.tickets.values()}
        for ticket in self.queue.waiting():
            waiting[ticket.pool.key] += 1
        return metrics.Snapshot(
            ready=self.ready, nodes=nodes, waiting=waiting, held=len(self.queue.held())
        )


__all__ = ["GONE", "Dispatcher"]
