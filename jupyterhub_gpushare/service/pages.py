"""The service's pages: what is free and your place in line, and the admins' GPU panel.

The pages carry no data of their own: the script in ``static/gpushare.js``
reads the JSON API (``api/capacity``, ``api/queue``, ``api/nodes``,
``api/activity``) with the page's XSRF token and renders it as text. So
everything a page shows, a program can read from the API too.

``panel`` is the admins' panel alone, made to sit in an iframe on JupyterHub's
admin page (``jupyterhub_gpushare/templates/admin.html``): the iframe's
navigation logs in through the hub's OAuth like any visit to the service, and
JupyterHub's React admin app cannot re-render it away.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from jupyterhub.utils import url_path_join
from tornado import web

from .handlers import ANYONE, APIError, BaseHandler

HERE = Path(__file__).parent
TEMPLATES = str(HERE / "templates")
STATIC = str(HERE / "static")


def _static_version() -> str:
    # A new release must not be served the previous script from a browser cache.
    digest = hashlib.sha256()
    for path in sorted(Path(STATIC).iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


STATIC_VERSION = _static_version()


class PageHandler(BaseHandler):
    """A page of the service: logged in through the hub, framed only by the same origin."""

    # anyone may ask: @web.authenticated sends visitors to the hub's login
    access = {"GET": frozenset({ANYONE})}

    def set_default_headers(self) -> None:
        # Only pages of this origin (the hub's admin page) may frame ours.
        self.set_header("Content-Security-Policy", "frame-ancestors 'self'")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("Cache-Control", "no-store")

    def render_page(self, mode: str) -> None:
        user = self.current_user
        token = self.xsrf_token
        prefix = self.settings.get("service_prefix", "/services/gpushare/")
        self.render(
            "page.html",
            mode=mode,
            prefix=prefix,
            hub_home=url_path_join(self.hub_auth.hub_prefix, "home"),
            user_name=user["name"],
            is_admin=self.is_admin,
            # sent back by the script as X-XSRFToken: the hub's OAuth cookie is
            # only accepted on fetch() requests that carry it
            xsrf=token.decode("ascii") if isinstance(token, bytes) else token,
            static_version=STATIC_VERSION,
        )


class ServicePageHandler(PageHandler):
    """``/services/gpushare/``: users see free slices and their place in line;
    admins see the whole GPU panel."""

    @web.authenticated
    def get(self) -> None:
        self.render_page("admin" if self.is_admin else "user")


class PanelPageHandler(PageHandler):
    """``/services/gpushare/panel``: the admins' panel alone, for the admin page's iframe."""

    @web.authenticated
    def get(self) -> None:
        if not self.is_admin:
            raise APIError(403, "only JupyterHub admins may see this")
        self.render_page("embedded")
