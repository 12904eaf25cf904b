"""The service's core: the watch caches, the fair queue and who is told what.

Every change (a watch event, a spawn joining or leaving) triggers one
recomputation: reservations are settled against bound pods, the heads of the
lines are admitted, and each waiting spawn's status is pushed to whoever
follows it. The queue is written to a state file on every change, so a
restarted service knows the order at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from kubernetes_asyncio import client
from traitlets import Float, List, Unicode, default
from traitlets.config import LoggingConfigurable

from ..capacity import NodeCapacity, PoolSpec, node_capacities, pool_capacity
from ..fairqueue import ADMITTED, WAITING, FairQueue, Ticket
from ..watch import ResourceWatcher, node_watcher, pod_watcher
from . import metrics

GONE = "gone"


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
    state_file = Unicode(
        config=True,
        help="""
        Where the queue is kept between restarts of the service::

            c.Dispatcher.state_file = "/srv/jupyterhub/gpushare-queue.json"
        """,
    )
    reservation_seconds = Float(
        120,
        config=True,
        help="How long an admitted spawn's slices stay booked while its pod is not bound yet.",
    )
    abandon_seconds = Float(
        30,
        config=True,
        help="""
        A waiting spawn that nobody follows for this long (its hub went away)
        leaves the line::

            c.Dispatcher.abandon_seconds = 30
        """,
    )

    @default("state_file")
    def _state_file_default(self):
        # beside the hub's database: the hub's working directory
        return os.path.abspath("gpushare-queue.json")

    def __init__(self, api: client.CoreV1Api, **kwargs):
        super().__init__(**kwargs)
        self.queue = FairQueue(self.reservation_seconds)
        self.nodes: ResourceWatcher = node_watcher(api, self._changed, parent=self)
        self.pods: ResourceWatcher = pod_watcher(
            api, tuple(self.resources), self._changed, parent=self
        )
        self.followers: dict[str, set[asyncio.Queue]] = {}
        self.statuses: dict[str, dict] = {}
        self.last_followed: dict[str, float] = {}
        self.capacities: dict[str, dict[str, NodeCapacity]] = {}
        self._holders: dict[str, tuple[str, str, int]] = {}
        self._pending = False
        self._housekeeping: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self._load_state()
        self.nodes.start()
        self.pods.start()
        self._housekeeping = asyncio.ensure_future(self._expire_loop())

    async def stop(self) -> None:
        if self._housekeeping:
            self._housekeeping.cancel()
        await self.nodes.stop()
        await self.pods.stop()

    @property
    def ready(self) -> bool:
        return self.nodes.synced.is_set() and self.pods.synced.is_set()

    @property
    def problem(self) -> str | None:
        return self.nodes.last_error or self.pods.last_error

    def _load_state(self) -> None:
        try:
            state = json.loads(Path(self.state_file).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            self.log.warning("Ignoring unreadable queue state %s: %s", self.state_file, e)
            return
        self.queue.load_state(state.get("tickets", []))
        now = time.time()
        for ticket_id in self.queue.tickets:
            # their spawners get abandon_seconds to reconnect
            self.last_followed[ticket_id] = now
        self.log.info("Restored %d queued spawns from %s", len(self.queue.tickets), self.state_file)

    def _save_state(self) -> None:
        path = Path(self.state_file)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tickets": self.queue.to_state()}))
        tmp.replace(path)

    # -- changes --------------------------------------------------------------
    def _changed(self, _kind: str | None = None) -> None:
        # Coalesce bursts of watch events into one recomputation per loop turn.
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self.recompute)

    def recompute(self) -> None:
        self._pending = False
        now = time.time()
        nodes = list(self.nodes.objects.values())
        pods = list(self.pods.objects.values())
        self.capacities = {r: node_capacities(nodes, pods, r) for r in self.resources}
        if self.ready:
            self._record_releases(now)
            bound = {
                p["metadata"]["annotations"].get("gpushare.jupyter.org/ticket")
                for p in pods
                if p["spec"].get("nodeName")
            }
            queue_changed = bool(self.queue.settle(bound - {None}, now))
            for ticket in self.queue.admit(self.capacities, now):
                queue_changed = True
                metrics.QUEUE_EXITS.labels(reason="admitted").inc()
                metrics.QUEUE_WAIT.observe(max(now - ticket.requested_at, 0))
                self.log.info(
                    "Admitted %s (server %r, %d slices) onto %s after %.1fs",
                    ticket.id,
                    ticket.server,
                    ticket.slices,
                    ticket.node,
                    now - ticket.requested_at,
                )
            if queue_changed:
                self._save_state()
        self._publish()

    def _record_releases(self, now: float) -> None:
        holders = {
            f"{h.namespace}/{h.pod}": (resource, node.name, h.slices)
            for resource, caps in self.capacities.items()
            for node in caps.values()
            for h in node.holders
        }
        for key, (resource, node_name, slices) in self._holders.items():
            if key in holders:
                continue
            node = self.capacities.get(resource, {}).get(node_name)
            if node is None:
                continue
            pools = [
                p.key
                for p in self.queue.pools().values()
                if p.resource == resource and p.matches(node.labels)
            ]
            self.queue.record_release(pools, now, slices)
        self._holders = holders

    # -- statuses -------------------------------------------------------------
    def pool_status(self, spec: PoolSpec) -> dict:
        pool = pool_capacity(spec, self.capacities.get(spec.resource, {}))
        return pool.summary(waiting=len(self.queue.waiting(spec.key)))

    def ticket_status(self, ticket_id: str) -> dict:
        ticket = self.queue.tickets.get(ticket_id)
        if ticket is None:
            return {"ticket": ticket_id, "state": GONE}
        position, waiting = self.queue.position(ticket_id)
        status = {
            "ticket": ticket_id,
            "state": ticket.state,
            "ready": self.ready,
            "position": position,
            "waiting": waiting,
            "pool": self.pool_status(ticket.pool),
            "eta_seconds": self.queue.estimated_wait(ticket_id),
            "requested_at": ticket.requested_at,
        }
        if ticket.state == ADMITTED:
            status["node"] = ticket.node
        if not self.ready:
            status["problem"] = self.problem or "reading the cluster's GPU nodes"
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
        metrics.update_queue_lengths(self)

    # -- requests from the hub --------------------------------------------------
    def join(self, ticket: Ticket, admitted: bool = False) -> dict:
        existing = ticket.id in self.queue.tickets
        self.queue.join(ticket)
        if admitted:
            # re-joining after our restart with slices it was already given
            self.queue.restore_admission(ticket.id, self.capacities, time.time())
        self.last_followed[ticket.id] = time.time()
        if not existing:
            self.log.info(
                "%s joined the %s line: %s, %d slices",
                ticket.id,
                ticket.pool.key,
                ticket.server or "default server",
                ticket.slices,
            )
        self._save_state()
        self.recompute()
        return self.ticket_status(ticket.id)

    def leave(self, ticket_id: str, reason: str) -> dict | None:
        ticket = self.queue.leave(ticket_id)
        if ticket is None:
            return None
        if ticket.state == WAITING and reason in metrics.EXIT_REASONS:
            metrics.QUEUE_EXITS.labels(reason=reason).inc()
        self.log.info("%s left the line (%s)", ticket_id, reason)
        self.last_followed.pop(ticket_id, None)
        self._save_state()
        self.recompute()
        return {"ticket": ticket_id, "state": GONE, "reason": reason}

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
        self.last_followed[ticket_id] = time.time()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.abandon_seconds / 3, 5))
            self.expire(time.time())

    def expire(self, now: float) -> list[str]:
        """Drop waiting spawns nobody has followed for abandon_seconds."""
        gone = [
            t.id
            for t in self.queue.waiting()
            if t.id not in self.followers
            and now - self.last_followed.get(t.id, now) > self.abandon_seconds
        ]
        for ticket_id in gone:
            self.leave(ticket_id, "abandoned")
        if self.queue.settle((), now):
            self._save_state()
            self.recompute()
        return gone

    def pools(self) -> Iterable[PoolSpec]:
        """Every pool worth showing: each resource overall, each product, each queued pool."""
        seen: dict[str, PoolSpec] = {}
        for resource, caps in self.capacities.items():
            if not caps:
                continue
            seen.setdefault(resource, PoolSpec(resource))
            for node in caps.values():
                spec = PoolSpec.from_selector(resource, {"nvidia.com/gpu.product": node.product})
                seen.setdefault(spec.key, spec)
        seen.update(self.queue.pools())
        return sorted(seen.values(), key=lambda p: p.key)
