"""The hub's side of the service's ticket API: join, follow over SSE, leave."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp

from .tickets import HUB_SECRET_HEADER, TicketRequest, TicketStatus


class QueueUnavailable(Exception):
    """The service cannot be reached (or answers with a server error)."""


class QueueRejected(Exception):
    """The service refused the request (4xx): a bug or a configuration error."""


class QueueRefused(QueueRejected):
    """The service refused a place in line for a reason the user should read."""


class QueueClient:
    def __init__(self, url: str, secret: str, timeout: float = 10):
        self.base = url.rstrip("/") + "/api/"
        self.headers = {HUB_SECRET_HEADER: secret}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _request(self, method: str, path: str, **kwargs) -> dict:
        try:
            async with aiohttp.ClientSession(headers=self.headers, timeout=self.timeout) as s:
                async with s.request(method, self.base + path, **kwargs) as response:
                    body = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise QueueUnavailable(f"{e.__class__.__name__}: {e}") from e
        if not isinstance(body, dict):
            raise QueueUnavailable(f"{response.status}: not a JSON object")
        if response.status >= 500:
            raise QueueUnavailable(f"{response.status}: {body.get('message')}")
        if response.status >= 400:
            if body.get("reason") == "user_limit":
                raise QueueRefused(str(body.get("message")))
            raise QueueRejected(f"{response.status}: {body.get('message')}")
        return body

    async def join(self, request: TicketRequest) -> TicketStatus:
        return TicketStatus.from_json(
            await self._request("POST", "tickets", json=request.to_json())
        )

    async def leave(self, ticket_id: str, reason: str) -> None:
        try:
            await self._request("DELETE", f"tickets/{ticket_id}", params={"reason": reason})
        except QueueRejected:
            pass  # already gone

    async def capacity(self) -> dict:
        return await self._request("GET", "capacity")

    async def follow(self, ticket_id: str) -> AsyncIterator[TicketStatus]:
        """Statuses of a ticket as they change (the first one at once)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_read=60, sock_connect=10)
        try:
            async with aiohttp.ClientSession(headers=self.headers, timeout=timeout) as s:
                async with s.get(self.base + f"tickets/{ticket_id}/events") as response:
                    if response.status >= 400:
                        raise QueueUnavailable(f"events: {response.status}")
                    async for raw in response.content:
                        line = raw.decode().strip()
                        if line.startswith("data:"):
                            yield TicketStatus.from_json(json.loads(line[5:]))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise QueueUnavailable(f"{e.__class__.__name__}: {e}") from e
        raise QueueUnavailable("the service closed the event stream")

    async def reclaim_notice(
        self, user: str, server: str, since: float | None = None
    ) -> dict | None:
        """Why the service is stopping this server, if it is reclaiming it just now
        (a reclaim decided after ``since``, when the server started)."""
        params = {"user": user, "server": server}
        if since is not None:
            params["since"] = str(since)
        body = await self._request("GET", "reclaims", params=params)
        reclaims = body.get("reclaims")
        return reclaims[0] if isinstance(reclaims, list) and reclaims else None
