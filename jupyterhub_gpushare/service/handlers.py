"""HTTP handlers of the service. Every one checks who is asking, first.

- users (through the hub's OAuth or a token with ``access:services``) see
  aggregate capacity and their own place in line, never other users' names;
- admin views (every user's place, who holds which slice, activity) need a
  token whose scopes let it read every user's servers (``list:users`` and
  ``read:servers``): what those views show;
- only the hub, with the secret its spawners hold, may add spawns to the line,
  take them out, or follow them.

Who is asking is settled before a single byte of a request body is read, and
bodies are small: a request that is not allowed, or too large, costs nothing.
Every refusal is a 4xx with a JSON body.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
from http import HTTPStatus

from jupyterhub.services.auth import HubOAuthenticated, UserNotAllowed
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web
from tornado.iostream import StreamClosedError

from ..fairqueue import LimitReached
from ..reclaim import waiting_by_pool
from ..tickets import GONE, HUB_SECRET_HEADER, TicketError, TicketRequest
from .dispatcher import NOT_READY

# The largest request body the service reads: a ticket is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024

HUB, USER, ADMIN, ANYONE = "hub", "user", "admin", "anyone"
# What an admin view shows (every user's name and servers) is what these scopes read.
ADMIN_SCOPES = frozenset({"list:users", "read:servers"})


class APIError(web.HTTPError):
    """A refusal with a message for whoever sent the request."""


@web.stream_request_body
class BaseHandler(HubOAuthenticated, web.RequestHandler):
    # who may call each method: HUB (the shared secret), USER (anyone logged in,
    # admins included), ADMIN, or ANYONE
    access: dict[str, frozenset[str]] = {}

    def initialize(self) -> None:
        self._body = bytearray()
        self.caller_kinds: frozenset[str] = frozenset()

    @property
    def dispatcher(self):
        return self.settings["dispatcher"]

    def allowed(self) -> frozenset[str]:
        return self.access.get(self.request.method, frozenset())

    async def prepare(self) -> None:
        self.caller_kinds = await self._identify() | {ANYONE}
        allowed = self.allowed()
        if not allowed & self.caller_kinds:
            if self.caller_kinds == {ANYONE}:
                raise APIError(403, "log in to JupyterHub (or send a token) to use this service")
            if allowed == {HUB}:
                raise APIError(403, "only the hub may change the queue")
            raise APIError(403, "only JupyterHub admins may see this")
        length = self.request.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise APIError(413, f"request bodies are at most {MAX_BODY_BYTES} bytes")

    async def _identify(self) -> frozenset[str]:
        """HUB for the shared secret; USER (and ADMIN) for a user's token or cookie.

        Resolved without blocking the event loop (HubAuth's sync mode would ask
        the hub from a thread).
        """
        self._hub_auth_user_cache = None
        given = self.request.headers.get(HUB_SECRET_HEADER)
        if given is not None:
            secret = self.settings["hub_secret"]
            if secret and hmac.compare_digest(given.encode(), secret.encode()):
                return frozenset({HUB})
            return frozenset()
        model = await self.hub_auth.get_user(self, sync=False)
        if not model:
            return frozenset()
        try:
            self._hub_auth_user_cache = self.check_hub_user(model)
        except UserNotAllowed:
            return frozenset()
        scopes = self.hub_auth.check_scopes(ADMIN_SCOPES, model)
        return frozenset({USER, ADMIN}) if scopes == ADMIN_SCOPES else frozenset({USER})

    def get_current_user(self):
        return getattr(self, "_hub_auth_user_cache", None)

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.caller_kinds

    @property
    def is_hub(self) -> bool:
        return HUB in self.caller_kinds

    def data_received(self, chunk: bytes) -> None:
        # Content-Length was checked in prepare(); Tornado's max_body_size
        # (set to MAX_BODY_BYTES on the server) cuts off chunked bodies.
        if len(self._body) + len(chunk) <= MAX_BODY_BYTES:
            self._body += chunk

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        message = getattr(exc, "log_message", None) or HTTPStatus(status_code).phrase
        if status_code >= 500:
            message = "internal error; see the service's log"
        self.set_header("Content-Type", "application/json")
        body = {"status": status_code, "message": message}
        body.update(getattr(exc, "extra", None) or {})
        self.finish(json.dumps(body))

    def write_json(self, data) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data))

    def parse_json(self) -> object:
        try:
            return json.loads(bytes(self._body) or b"null")
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None

    def problem(self) -> str | None:
        """Why the cluster view is not ready: in detail for admins and the hub."""
        d = self.dispatcher
        if d.ready:
            return None
        return (d.problem or NOT_READY) if (self.is_admin or self.is_hub) else NOT_READY


class CapacityHandler(BaseHandler):
    """Free and total slices per pool: aggregate numbers any user may see."""

    access = {"GET": frozenset({HUB, USER})}

    def get(self) -> None:
        d = self.dispatcher
        self.write_json(
            {
                "ready": d.ready,
                "problem": self.problem(),
                "pools": [d.pool_status(spec) for spec in d.pools()],
            }
        )


class QueueHandler(BaseHandler):
    """The caller's own queue entries, GPU servers and recent reclaims; admins get
    the whole queue with names (their ``holding`` and ``reclaims`` stay their own)."""

    access = {"GET": frozenset({USER})}

    async def get(self) -> None:
        d = self.dispatcher
        name = self.current_user["name"]
        reclaimer = d.reclaimer
        if reclaimer.enabled and any(h.user == name for h in reclaimer.holdings()):
            # the page shows how long the caller's server has been idle: a minute
            # old is fine, none at all is not
            reclaimer.looked_at()
            await reclaimer.fresh_activity(max_age=60)
        now = time.time()
        holding = [
            {"server": h.server, "slices": h.slices, **reclaimer.holding_json(h, now)}
            for h in reclaimer.holdings()
            if h.user == name
        ]
        entries = []
        for ticket in sorted(d.queue.tickets.values(), key=lambda t: t.order):
            if not (self.is_admin or ticket.user == name):
                continue
            status = d.ticket_status(ticket.id)
            entry = status.to_json() if self.is_admin else status.public()
            if not self.is_admin:
                entry.pop("problem", None)
            entry.update(server=ticket.server, slices=ticket.slices)
            if self.is_admin:
                entry["user"] = ticket.user
            entries.append(entry)
        reclaims = [r.public() for r in reclaimer.history if r.user == name]
        self.write_json(
            {
                "now": now,
                "entries": entries,
                "holding": holding,
                "reclaims": reclaims[-5:],
                "reclaim": reclaimer.settings_json(),
            }
        )


class NodesHandler(BaseHandler):
    """Per-node capacity with who holds the slices: admins only."""

    access = {"GET": frozenset({ADMIN})}

    async def get(self) -> None:
        d = self.dispatcher
        # idle times and reclaim deadlines beside each holder: as fresh as reclaim's
        d.reclaimer.looked_at()
        await d.reclaimer.fresh_activity(max_age=d.reclaimer.activity_refresh_seconds)
        now = time.time()
        judged = {(h.pod, h.resource): h for h in d.reclaimer.holdings()}
        waiting = waiting_by_pool(d.queue.waiting())
        nodes = []
        for resource in d.resources:
            for node in sorted(d.view.capacities(resource).values(), key=lambda n: n.name):
                nodes.append(
                    {
                        "name": node.name,
                        "resource": resource,
                        "product": node.product,
                        "gpus": node.gpus,
                        "replicas": node.replicas,
                        "memory_mib": node.memory_mib,
                        "strategy": node.strategy,
                        "schedulable": node.schedulable,
                        "slices_total": node.total,
                        "slices_used": node.used,
                        "slices_booked": min(node.booked, node.free),
                        "slices_free": node.available,
                        "holders": [
                            {
                                "user": h.user,
                                "server": h.server,
                                "namespace": h.namespace,
                                "pod": h.pod,
                                "slices": h.slices,
                                "since": h.since,
                                **self._reclaim(
                                    judged.get((f"{h.namespace}/{h.pod}", resource)), waiting
                                ),
                            }
                            for h in node.holders
                        ],
                    }
                )
        self.write_json(
            {
                "now": now,
                "ready": d.ready,
                "problem": self.problem(),
                "reclaim": d.reclaimer.settings_json(),
                "nodes": nodes,
            }
        )

    def _reclaim(self, holding, waiting) -> dict:
        if holding is None:  # not a hub user's server: reclaim never touches it
            return {}
        return self.dispatcher.reclaimer.holding_json(holding, time.time(), waiting)


class TicketsHandler(BaseHandler):
    """POST: a spawn joins (or joins again) the line. Hub only."""

    access = {"POST": frozenset({HUB})}

    def post(self) -> None:
        try:
            request = TicketRequest.from_json(self.parse_json(), self.dispatcher.resources)
        except TicketError as e:
            raise APIError(400, str(e)) from None
        try:
            status = self.dispatcher.join(request)
        except LimitReached as e:
            error = APIError(409, str(e))
            error.extra = {"reason": "user_limit"}
            raise error from None
        self.set_status(201)
        self.write_json(status.to_json())


class TicketHandler(BaseHandler):
    """GET a spawn's status, DELETE it from the line. Hub only."""

    access = {"GET": frozenset({HUB}), "DELETE": frozenset({HUB})}
    reasons = ("cancelled", "timeout", "admitted", "started")

    def get(self, ticket_id: str) -> None:
        status = self.dispatcher.ticket_status(ticket_id)
        if status.state == GONE:
            raise APIError(404, "no such spawn in the line")
        self.write_json(status.to_json())

    def delete(self, ticket_id: str) -> None:
        reason = self.get_argument("reason", "cancelled")
        if reason not in self.reasons:
            raise APIError(400, f"reason must be one of {', '.join(self.reasons)}")
        result = self.dispatcher.leave(ticket_id, reason)
        if result is None:
            raise APIError(404, "no such spawn in the line")
        self.write_json(result.to_json())


class TicketEventsHandler(BaseHandler):
    """Server-sent events with a spawn's status on every change. Hub only.

    The hub keeps this stream open for as long as the spawn lasts: that is how
    the service knows the spawn is still there.
    """

    access = {"GET": frozenset({HUB})}
    keepalive_seconds = 10

    async def get(self, ticket_id: str) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-store")
        statuses = self.dispatcher.statuses(ticket_id, self.keepalive_seconds)
        try:
            async with contextlib.aclosing(statuses):
                async for status in statuses:
                    # a keepalive is also how a closed connection is noticed, at the write
                    self.write(
                        ":keepalive\n\n" if status is None else f"data: {json.dumps(status)}\n\n"
                    )
                    await self.flush()
        except StreamClosedError:
            pass


class MetricsHandler(BaseHandler):
    """Prometheus metrics: admins, tokens with read:metrics, or the hub."""

    access = {"GET": frozenset({HUB, USER})}

    def allowed(self) -> frozenset[str]:
        if not self.settings["authenticate_prometheus"]:
            return frozenset({ANYONE})
        return super().allowed()

    def get(self) -> None:
        if self.settings["authenticate_prometheus"] and not (self.is_hub or self.is_admin):
            if not self.hub_auth.check_scopes({"read:metrics"}, self.current_user):
                raise APIError(403, "metrics need an admin or a token with read:metrics")
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest())


class NotFoundHandler(BaseHandler):
    async def prepare(self) -> None:
        raise APIError(404, "no such endpoint")


class ActivityHandler(BaseHandler):
    """When the hub last saw each active user and server: admins only.

    The admin panel shows it beside who holds which slice. It is the reclaimer's
    copy of the hub's activity: the hub is asked at most once per
    ``cache_seconds`` however many panels poll, and not twice for reclaim.
    """

    access = {"GET": frozenset({ADMIN})}
    cache_seconds = 10.0

    async def get(self) -> None:
        reclaimer = self.dispatcher.reclaimer
        reclaimer.looked_at()
        await reclaimer.fresh_activity(self.cache_seconds)
        if reclaimer.activity_problem is not None and reclaimer.activity_at is None:
            self.write_json(
                {
                    "now": time.time(),
                    "available": False,
                    "problem": "the hub did not answer",
                    "users": {},
                }
            )
            return
        users: dict[str, dict] = {
            name: {"last_activity": seen, "servers": {}}
            for name, seen in reclaimer.user_activity.items()
        }
        for (user, server), seen in reclaimer.activity.items():
            users.setdefault(user, {"last_activity": None, "servers": {}})
            users[user]["servers"][server] = seen.last_activity
        self.write_json(
            {
                "now": time.time(),
                "available": True,
                "fetched_at": reclaimer.activity_at,
                "users": users,
            }
        )


class ReclaimsHandler(BaseHandler):
    """Recent reclaims: who, when, idle for how long, how many waited.

    Admins see every one, users their own (without node names); the hub's
    spawners ask, with ``?user=&server=``, why a server is being stopped.
    """

    access = {"GET": frozenset({HUB, USER})}

    def get(self) -> None:
        reclaimer = self.dispatcher.reclaimer
        user = self.get_argument("user", None)
        server = self.get_argument("server", None)
        if self.is_hub and user is not None:
            try:
                since = float(self.get_argument("since", "0"))
            except ValueError:
                raise APIError(400, "since must be a Unix time") from None
            record = reclaimer.notice_for(user, server or "", time.time(), since)
            self.write_json({"reclaims": [record.to_json()] if record else []})
            return
        if self.is_hub or self.is_admin:
            records = [
                r.to_json()
                for r in reclaimer.history
                if (user is None or r.user == user) and (server is None or r.server == server)
            ]
        else:
            name = self.current_user["name"]
            records = [r.public() for r in reclaimer.history if r.user == name]
        self.write_json({"reclaim": reclaimer.settings_json(), "reclaims": list(reversed(records))})
