"""The gpushare service as a traitlets Application, run by the hub as a managed service.

    python -m jupyterhub_gpushare.service [--port=10101] [--generate-config]

Defaults come from the ``JUPYTERHUB_*`` variables the hub sets for managed
services, and from ``GPUSHARE_HUB_SECRET`` (shared with the hub's spawners by
``jupyterhub_gpushare.configure``). Settings of the service's classes that an
admin writes into the hub's configuration (``c.Dispatcher.hold_seconds = 600``)
reach it through ``GPUSHARE_SERVICE_CONFIG``, which ``configure`` fills in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from jupyterhub.utils import url_path_join
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.log import LogFormatter
from traitlets import Bool, Integer, Unicode, default
from traitlets.config import Application, Config

from .. import clients
from .._version import __version__
from ..watch import ResourceWatcher
from . import handlers, metrics, pages
from .dispatcher import Dispatcher
from .hubapi import HubAPI
from .queuestore import QueueStore
from .reclaimer import Reclaimer

# where configure(c) puts the service's settings from the hub's configuration
CONFIG_ENV = "GPUSHARE_SERVICE_CONFIG"


class GPUShareService(Application):
    name = "jupyterhub-gpushare"
    version = __version__
    description = __doc__.split("\n\n")[0]

    aliases = {
        "ip": "GPUShareService.ip",
        "port": "GPUShareService.port",
        "kubeconfig": "GPUShareService.kubeconfig",
        "state-file": "QueueStore.state_file",
        "config": "GPUShareService.config_file",
        "log-level": "Application.log_level",
    }
    flags = {
        "generate-config": (
            {"GPUShareService": {"generate_config": True}},
            "Write a default configuration file and exit.",
        ),
    }
    classes = [Dispatcher, Reclaimer, QueueStore, HubAPI, ResourceWatcher]
    # the hub's own log formatter family: it supplies %(color)s and %(end_color)s
    _log_formatter_cls = LogFormatter

    @default("log_level")
    def _log_level_default(self):
        return logging.INFO

    @default("log_format")
    def _log_format_default(self):
        # the hub's own format, so the two logs read alike side by side
        return (
            "%(color)s[%(levelname)1.1s %(asctime)s.%(msecs).03d %(name)s "
            "%(module)s:%(lineno)d]%(end_color)s %(message)s"
        )

    @default("log_datefmt")
    def _log_datefmt_default(self):
        return "%Y-%m-%d %H:%M:%S"

    config_file = Unicode("gpushare_service_config.py", config=True, help="Config file to load.")
    generate_config = Bool(False, config=True, help="Write the default config file and exit.")

    service_url = Unicode(
        config=True,
        help="""
        Where the service listens; the hub sets ``JUPYTERHUB_SERVICE_URL`` from
        the service's ``url``::

            c.GPUShareService.service_url = "http://127.0.0.1:10101"
        """,
    )

    @default("service_url")
    def _service_url_default(self):
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101")

    ip = Unicode(
        config=True,
        help="""
        Address to bind. By default the host of ``service_url`` when that is an
        address of this machine, else all interfaces (z2jh uses ``http://hub:PORT``
        so the proxy pod can reach the service)::

            c.GPUShareService.ip = "0.0.0.0"
        """,
    )

    @default("ip")
    def _ip_default(self):
        host = urlparse(self.service_url).hostname or ""
        if host in ("localhost", "") or host.replace(".", "").isdigit():
            return host or "127.0.0.1"
        return "0.0.0.0"

    port = Integer(config=True, help="Port to bind; by default the port of ``service_url``.")

    @default("port")
    def _port_default(self):
        return urlparse(self.service_url).port or 10101

    service_prefix = Unicode(
        config=True, help="URL prefix of the service, from ``JUPYTERHUB_SERVICE_PREFIX``."
    )

    @default("service_prefix")
    def _prefix_default(self):
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/gpushare/")

    hub_secret = Unicode(
        config=True,
        help="""
        Secret the hub's spawners send to join and leave the queue. Set for you
        by ``jupyterhub_gpushare.configure`` through ``GPUSHARE_HUB_SECRET``.
        """,
    )

    @default("hub_secret")
    def _hub_secret_default(self):
        return os.environ.get("GPUSHARE_HUB_SECRET", "")

    kubeconfig = Unicode(
        None,
        allow_none=True,
        config=True,
        help="Kubeconfig to use outside a cluster (default: in-cluster, then $KUBECONFIG).",
    )

    authenticate_prometheus = Bool(
        True,
        config=True,
        help="""
        Require an admin or a token with ``read:metrics`` for ``/metrics``::

            c.GPUShareService.authenticate_prometheus = False
        """,
    )

    trust_xheaders = Bool(
        False,
        config=True,
        help="""
        Take the client's address and scheme from ``X-Forwarded-*`` headers.
        Only for a service reachable by nothing but a trusted proxy: any pod
        that can reach the port could otherwise claim any address::

            c.GPUShareService.trust_xheaders = True
        """,
    )

    def make_app(self, dispatcher: Dispatcher, hub_api: HubAPI) -> web.Application:
        prefix = self.service_prefix
        api = url_path_join(prefix, "api")
        routes = [
            (url_path_join(api, "capacity"), handlers.CapacityHandler),
            (url_path_join(api, "queue"), handlers.QueueHandler),
            (url_path_join(api, "nodes"), handlers.NodesHandler),
            (url_path_join(api, "activity"), handlers.ActivityHandler),
            (url_path_join(api, "reclaims"), handlers.ReclaimsHandler),
            (url_path_join(api, "tickets"), handlers.TicketsHandler),
            (url_path_join(api, r"tickets/([^/]+)"), handlers.TicketHandler),
            (url_path_join(api, r"tickets/([^/]+)/events"), handlers.TicketEventsHandler),
            (url_path_join(prefix, "metrics"), handlers.MetricsHandler),
            (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
            (prefix, pages.ServicePageHandler),
            (url_path_join(prefix, "panel"), pages.PanelPageHandler),
            (url_path_join(prefix, "static/(.*)"), web.StaticFileHandler, {"path": pages.STATIC}),
            (r".*", handlers.NotFoundHandler),
        ]
        return web.Application(
            routes,
            dispatcher=dispatcher,
            hub_api=hub_api,
            hub_auth=HubOAuth(api_token=os.environ.get("JUPYTERHUB_API_TOKEN", "")),
            hub_secret=self.hub_secret,
            service_prefix=prefix,
            authenticate_prometheus=self.authenticate_prometheus,
            cookie_secret=os.urandom(32),
            xsrf_cookies=False,
            template_path=pages.TEMPLATES,
            default_handler_class=handlers.NotFoundHandler,
        )

    def initialize(self, argv=None) -> None:
        super().initialize(argv)
        if self.generate_config:
            print(self.generate_config_file())
            self.exit(0)
        if os.path.exists(self.config_file):
            self.load_config_file(self.config_file)
        forwarded = os.environ.get(CONFIG_ENV)
        if forwarded:
            try:
                self.update_config(Config(json.loads(forwarded)))
            except (ValueError, TypeError) as e:
                self.log.error("Ignoring %s, which is not a JSON config: %s", CONFIG_ENV, e)
        if not self.hub_secret:
            self.log.warning(
                "No GPUSHARE_HUB_SECRET: spawners cannot join the queue "
                "(use jupyterhub_gpushare.configure(c) in the hub config)"
            )

    async def run(self) -> None:
        api = await clients.core_v1(self.kubeconfig)
        hub_api = HubAPI(parent=self)
        dispatcher = Dispatcher(api, hub_api=hub_api, parent=self)
        dispatcher.start()
        metrics.register(dispatcher.snapshot)
        app = self.make_app(dispatcher, hub_api)
        server = HTTPServer(
            app,
            xheaders=self.trust_xheaders,
            # bodies are tiny JSON; anything bigger is refused before it is read
            max_body_size=handlers.MAX_BODY_BYTES,
            # clients that send nothing (or headers byte by byte) are let go ...
            idle_connection_timeout=30,
            body_timeout=10,
            # ... and no connection is kept open between requests: the proxy
            # would otherwise reuse one that this timeout has just closed, and
            # answer that request with a 503
            no_keep_alive=True,
        )
        server.listen(self.port, self.ip)
        self.log.info(
            "gpushare service %s listening on %s:%d%s",
            __version__,
            self.ip,
            self.port,
            self.service_prefix,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        self.log.info("Stopping")
        server.stop()
        await dispatcher.stop()
        await clients.close_clients()

    def start(self) -> None:
        asyncio.run(self.run())


main = GPUShareService.launch_instance
