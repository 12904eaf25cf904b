"""HTTP handlers of the service. Every one checks who is asking.

- users (through the hub's OAuth or a token with ``access:services``) see
  aggregate capacity and their own place in line, never other users' names;
- admins see everything;
- only the hub, with the shared secret its spawners hold, may add spawns to
  the line, take them out, or follow them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import time
from http import HTTPStatus

from jupyterhub.services.auth import HubOAuthenticated, UserNotAllowed
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web
from tornado.iostream import StreamClosedError

from ..capacity import PoolSpec
from ..fairqueue import Ticket

HUB_SECRET_HEADER = "X-Gpushare-Hub-Secret"
TICKET_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_SLICES = 1024
MAX_NAME = 255


class APIError(web.HTTPError):
    pass


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    @property
    def dispatcher(self):
        return self.settings["dispatcher"]

    async def prepare(self) -> None:
        # Resolve the caller without blocking the event loop (HubAuth's sync
        # mode would run a request to the hub in a thread).
        if self.request.headers.get(HUB_SECRET_HEADER):
            return
        self._hub_auth_user_cache = None
        model = await self.hub_auth.get_user(self, sync=False)
        if model:
            try:
                self._hub_auth_user_cache = self.check_hub_user(model)
            except UserNotAllowed:
                self._hub_auth_user_cache = None

    def get_current_user(self):
        return getattr(self, "_hub_auth_user_cache", None)

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        message = getattr(exc, "log_message", None) or HTTPStatus(status_code).phrase
        if status_code >= 500:
            message = "internal error; see the service's log"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message}))

    def write_json(self, data) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data))

    # -- who is asking ----------------------------------------------------------
    def is_hub(self) -> bool:
        given = self.request.headers.get(HUB_SECRET_HEADER, "")
        secret = self.settings["hub_secret"]
        return bool(secret) and hmac.compare_digest(given.encode(), secret.encode())

    def require_user(self) -> dict:
        user = self.current_user
        if not user:
            raise APIError(403, "log in to JupyterHub (or send a token) to use this service")
        return user

    def require_admin(self) -> dict:
        user = self.require_user()
        if not user.get("admin"):
            raise APIError(403, "only JupyterHub admins may see this")
        return user

    def require_hub(self) -> None:
        if not self.is_hub():
            raise APIError(403, "only the hub may change the queue")

    def parse_json(self) -> dict:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body


class CapacityHandler(BaseHandler):
    """Free and total slices per pool: aggregate numbers any user may see."""

    def get(self) -> None:
        if not self.is_hub():
            self.require_user()
        d = self.dispatcher
        self.write_json(
            {
                "ready": d.ready,
                "problem": None if d.ready else (d.problem or "reading the cluster"),
                "pools": [d.pool_status(spec) for spec in d.pools()],
            }
        )


def public_ticket(status: dict) -> dict:
    """A ticket's status without anything that names other users."""
    return {
        k: status[k]
        for k in ("ticket", "state", "position", "waiting", "pool", "eta_seconds")
        if k in status
    }


class QueueHandler(BaseHandler):
    """The caller's own queue entries; admins get the whole queue with names."""

    def get(self) -> None:
        user = self.require_user()
        d = self.dispatcher
        entries = []
        for ticket in sorted(d.queue.tickets.values(), key=lambda t: t.order):
            if user.get("admin"):
                entry = d.ticket_status(ticket.id)
                entry.update(user=ticket.user, server=ticket.server, slices=ticket.slices)
                entries.append(entry)
            elif ticket.user == user["name"]:
                entry = public_ticket(d.ticket_status(ticket.id))
                entry.update(server=ticket.server, slices=ticket.slices)
                entries.append(entry)
        self.write_json({"entries": entries})


class NodesHandler(BaseHandler):
    """Per-node capacity with who holds the slices: admins only."""

    def get(self) -> None:
        self.require_admin()
        nodes = []
        for resource, caps in self.dispatcher.capacities.items():
            for node in sorted(caps.values(), key=lambda n: n.name):
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
                        "slices_free": node.free,
                        "holders": [
                            {
                                "user": h.user,
                                "server": h.server,
                                "namespace": h.namespace,
                                "pod": h.pod,
                                "slices": h.slices,
                                "since": h.since,
                            }
                            for h in node.holders
                        ],
                    }
                )
        self.write_json({"ready": self.dispatcher.ready, "nodes": nodes})


def parse_ticket(body: dict, resources: list[str]) -> tuple[Ticket, bool]:
    """Validate a spawn's request to join the line; every problem is a 400."""

    def field(name: str, kind: type | tuple, required: bool = True):
        if name not in body:
            if required:
                raise APIError(400, f"missing field {name!r}")
            return None
        value = body[name]
        if isinstance(value, bool) and kind is not bool:
            raise APIError(400, f"field {name!r} has the wrong type")
        if not isinstance(value, kind):
            raise APIError(400, f"field {name!r} has the wrong type")
        return value

    ticket_id = field("id", str)
    if not TICKET_ID.match(ticket_id):
        raise APIError(400, "field 'id' must be 1-128 letters, digits, '.', '_' or '-'")
    user = field("user", str)
    server = field("server", str, required=False) or ""
    if not user or len(user) > MAX_NAME or len(server) > MAX_NAME:
        raise APIError(400, f"fields 'user' and 'server' must be 1-{MAX_NAME} characters")
    slices = field("slices", int)
    if not 1 <= slices <= MAX_SLICES:
        raise APIError(400, f"field 'slices' must be between 1 and {MAX_SLICES}")
    requested_at = field("requested_at", (int, float))
    if not math.isfinite(requested_at) or requested_at > time.time() + 300 or requested_at < 0:
        raise APIError(400, "field 'requested_at' must be a Unix time, not in the future")
    pool = field("pool", dict)
    resource = pool.get("resource")
    if resource not in resources:
        raise APIError(400, f"unknown pool: resource {resource!r} is not one of {resources}")
    selector = pool.get("selector") or {}
    if (
        not isinstance(selector, dict)
        or len(selector) > 32
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items())
        or any(len(k) > 317 or len(v) > 63 for k, v in selector.items())
    ):
        raise APIError(400, "field 'pool.selector' must map label names to label values")
    admitted = field("admitted", bool, required=False) or False
    ticket = Ticket(
        id=ticket_id,
        user=user,
        server=server,
        slices=slices,
        pool=PoolSpec.from_selector(resource, selector),
        requested_at=float(requested_at),
    )
    return ticket, admitted


class TicketsHandler(BaseHandler):
    """POST: a spawn joins (or re-joins) the line. Hub only."""

    def check_xsrf_cookie(self) -> None:
        # the hub authenticates with a header, not a cookie
        pass

    def post(self) -> None:
        self.require_hub()
        ticket, admitted = parse_ticket(self.parse_json(), self.dispatcher.resources)
        self.set_status(201)
        self.write_json(self.dispatcher.join(ticket, admitted=admitted))


class TicketHandler(BaseHandler):
    """GET a spawn's status, DELETE it from the line. Hub only."""

    def check_xsrf_cookie(self) -> None:
        pass

    def get(self, ticket_id: str) -> None:
        self.require_hub()
        status = self.dispatcher.ticket_status(ticket_id)
        if status["state"] == "gone":
            raise APIError(404, "no such spawn in the line")
        self.write_json(status)

    def delete(self, ticket_id: str) -> None:
        self.require_hub()
        reason = self.get_argument("reason", "cancelled")
        if reason not in ("cancelled", "timeout", "admitted"):
            raise APIError(400, "reason must be 'cancelled', 'timeout' or 'admitted'")
        result = self.dispatcher.leave(ticket_id, reason)
        if result is None:
            raise APIError(404, "no such spawn in the line")
        self.write_json(result)


class TicketEventsHandler(BaseHandler):
    """Server-sent events with a spawn's status on every change. Hub only."""

    keepalive_seconds = 10

    async def get(self, ticket_id: str) -> None:
        self.require_hub()
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-store")
        follower = self.dispatcher.follow(ticket_id)
        try:
            while True:
                try:
                    status = await _wait(follower, self.keepalive_seconds)
                except TimeoutError:
                    # also how a closed connection is noticed, at the write
                    self.write(":keepalive\n\n")
                    await self.flush()
                    continue
                self.write(f"data: {json.dumps(status)}\n\n")
                await self.flush()
                if status.get("state") == "gone":
                    break
        except StreamClosedError:
            pass
        finally:
            self.dispatcher.unfollow(ticket_id, follower)


async def _wait(follower: asyncio.Queue, timeout: float) -> dict:
    try:
        return await asyncio.wait_for(follower.get(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError from None


class MetricsHandler(BaseHandler):
    """Prometheus metrics: admins, tokens with read:metrics, or the hub."""

    def get(self) -> None:
        if self.settings["authenticate_prometheus"] and not self.is_hub():
            user = self.require_user()
            if not (user.get("admin") or "read:metrics" in user.get("scopes", [])):
                raise APIError(403, "metrics need an admin or a token with read:metrics")
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest())


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise APIError(404, "no such endpoint")


class ActivityHandler(BaseHandler):
    """When the hub last saw each active user and server: admins only.

    The admin panel shows it beside who holds which slice. The hub is asked at
    most once per ``cache_seconds`` however many panels poll, and by at most
    ``max_concurrent`` requests at a time.
    """

    cache_seconds = 10.0
    max_concurrent = 4
    page_limit = 200
    _cache: tuple[float, dict] | None = None
    _inflight = None  # the running fetch, which every panel that asks meanwhile awaits
    _semaphore = None

    async def get(self) -> None:
        self.require_admin()
        activity = await self.activity()
        self.write_json({"now": time.time(), **activity})

    async def activity(self) -> dict:
        import asyncio

        cls = type(self)
        if cls._cache is not None and time.monotonic() - cls._cache[0] < cls.cache_seconds:
            return cls._cache[1]
        if cls._inflight is None or cls._inflight.done():
            cls._inflight = asyncio.ensure_future(self._fetch())
        result = await asyncio.shield(cls._inflight)
        cls._cache = (time.monotonic(), result)
        return result

    async def _fetch(self) -> dict:
        from tornado.log import app_log

        try:
            users = await self.fetch_active_users(self.hub_auth.api_url, self.hub_auth.api_token)
        except Exception as e:  # the panel still shows everything else
            app_log.warning("Could not read users' activity from the hub: %s", e)
            return {"available": False, "problem": "the hub did not answer", "users": {}}
        return {"available": True, "fetched_at": time.time(), "users": users}

    @classmethod
    async def fetch_active_users(cls, api_url: str, token: str) -> dict[str, dict]:
        """``{name: {"last_activity", "servers": {server: last_activity}}}`` of
        every user with a running or pending server, page by page."""
        import asyncio

        from tornado.httpclient import AsyncHTTPClient
        from tornado.httputil import url_concat

        if cls._semaphore is None:
            cls._semaphore = asyncio.Semaphore(cls.max_concurrent)
        users: dict[str, dict] = {}
        offset = 0
        while True:
            url = url_concat(
                api_url.rstrip("/") + "/users",
                {"state": "active", "offset": offset, "limit": cls.page_limit},
            )
            async with cls._semaphore:
                response = await AsyncHTTPClient().fetch(
                    url,
                    headers={
                        "Authorization": f"token {token}",
                        # pages that say whether more follow, instead of a bare list
                        "Accept": "application/jupyterhub-pagination+json",
                    },
                    request_timeout=10,
                )
            body = json.loads(response.body)
            paginated = isinstance(body, dict)
            items = body.get("items", []) if paginated else body
            for user in items:
                users[user["name"]] = {
                    "last_activity": user.get("last_activity"),
                    "servers": {
                        name: server.get("last_activity")
                        for name, server in (user.get("servers") or {}).items()
                    },
                }
            following = (body.get("_pagination") or {}).get("next") if paginated else None
            if not following or not items:
                return users
            offset = int(following.get("offset", offset + len(items)))
