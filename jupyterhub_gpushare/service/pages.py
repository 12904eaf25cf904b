"""The service's own page: free slices per pool, the user's place in line."""

from __future__ import annotations

from pathlib import Path

from tornado import web

from .handlers import BaseHandler

HERE = Path(__file__).parent
TEMPLATES = str(HERE / "templates")
STATIC = str(HERE / "static")


class ServicePageHandler(BaseHandler):
    @web.authenticated
    def get(self) -> None:
        user = self.current_user
        self.render(
            "page.html",
            prefix=self.settings.get("service_prefix", self.request.path),
            is_admin=bool(user.get("admin")),
            user_name=user["name"],
        )
