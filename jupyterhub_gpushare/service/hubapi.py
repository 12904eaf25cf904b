"""Every call the service makes to the hub's REST API goes through here.

One gateway, as in JupyterHub's own ``HubAuth._api_request``: the service's
token, a cap on requests in flight (a busy hub is not asked twenty things at
once), clear errors, and pages read one at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httputil import url_concat
from traitlets import Integer, Unicode, default
from traitlets.config import LoggingConfigurable


class HubAPIError(Exception):
    """The hub did not answer (``status`` None), or answered with an error status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class HubAPI(LoggingConfigurable):
    api_url = Unicode(config=True, help="The hub's API URL (``JUPYTERHUB_API_URL``).")
    api_token = Unicode(config=True, help="The service's token (``JUPYTERHUB_API_TOKEN``).")
    concurrency = Integer(
        4,
        config=True,
        help="""
        Most requests to the hub in flight at once::

            c.HubAPI.concurrency = 4
        """,
    )
    page_size = Integer(200, config=True, help="Users per page when listing.")

    @default("api_url")
    def _api_url_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")

    @default("api_token")
    def _api_token_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._semaphore = asyncio.Semaphore(self.concurrency)

    async def request(
        self, method: str, path: str, params: dict | None = None, timeout: float = 10
    ) -> Any:
        """One request; the decoded JSON body, or None for an empty one."""
        _, body = await self._fetch(method, path, params, timeout)
        return json.loads(body) if body else None

    async def _fetch(
        self, method: str, path: str, params: dict | None, timeout: float
    ) -> tuple[int, bytes]:
        url = url_concat(self.api_url.rstrip("/") + "/" + path.lstrip("/"), params or {})
        request = HTTPRequest(
            url,
            method=method,
            headers={
                "Authorization": f"token {self.api_token}",
                # pages that say whether more follow, instead of a bare list
                "Accept": "application/jupyterhub-pagination+json",
            },
            body=b"" if method in ("POST", "PUT", "PATCH") else None,
            allow_nonstandard_methods=True,
            request_timeout=timeout,
        )
        async with self._semaphore:
            try:
                response = await AsyncHTTPClient().fetch(request)
            except HTTPClientError as e:
                raise HubAPIError(f"{method} {path}: {e.code} {e.message}", e.code) from None
            except OSError as e:
                raise HubAPIError(f"{method} {path}: the hub did not answer ({e})") from None
        return response.code, response.body

    async def users(self, state: str = "active") -> AsyncIterator[dict]:
        """Every user with servers in ``state`` ('active', 'ready', 'inactive'), page by page."""
        offset = 0
        while True:
            body = await self.request(
                "GET", "users", {"state": state, "offset": offset, "limit": self.page_size}
            )
            paginated = isinstance(body, dict)
            items = body.get("items", []) if paginated else body
            for user in items:
                yield user
            following = (body.get("_pagination") or {}).get("next") if paginated else None
            if not following or not items:
                return
            offset = int(following.get("offset", offset + len(items)))

    async def user(self, name: str) -> dict | None:
        """One user's model with their servers; None if there is no such user."""
        try:
            return await self.request("GET", f"users/{quote(name, safe='')}")
        except HubAPIError as e:
            if e.status == 404:
                return None
            raise

    async def stop_server(self, user: str, server: str = "", timeout: float = 30) -> int:
        """Ask the hub to stop a server, as ``DELETE /users/:name/server`` does.

        Returns the hub's answer: 204 stopped, 202 stopping (slow to stop, or
        already being stopped by someone else, such as the idle culler), 404 no
        such user or server. Needs the ``delete:servers`` scope.
        """
        path = f"users/{quote(user, safe='')}/" + (
            f"servers/{quote(server, safe='')}" if server else "server"
        )
        try:
            code, _ = await self._fetch("DELETE", path, None, timeout)
        except HubAPIError as e:
            if e.status == 404:
                return 404
            raise
        return code
