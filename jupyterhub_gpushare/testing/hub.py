"""A real JupyterHub with configurable-http-proxy, spawning into the local cluster."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import httpx

from .cluster import ClusterError, Component, ensure_port_free, free_port, wait_until

CACHE_ROOT = Path(os.environ.get("GPUSHARE_CACHE", Path.home() / ".cache" / "jupyterhub-gpushare"))
TEST_PASSWORD = "gpushare"


def find_proxy() -> str:
    """configurable-http-proxy, as installed by ``make`` (npm) or found on PATH."""
    candidates = [
        os.environ.get("GPUSHARE_CHP", ""),
        str(CACHE_ROOT / "node" / "node_modules" / ".bin" / "configurable-http-proxy"),
        shutil.which("configurable-http-proxy") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ClusterError(
        "configurable-http-proxy is missing: run `make deps` (it installs it with npm) "
        "or set GPUSHARE_CHP to its path"
    )


class LocalHub:
    """JupyterHub + CHP on loopback, using the local cluster's kubeconfig."""

    def __init__(
        self,
        run_dir: Path,
        kubeconfig: Path,
        namespace: str,
        extra_config: str = "",
        port: int = 0,
        admin_users: tuple[str, ...] = ("admin",),
        before_configure: str = "",
    ):
        """``extra_config`` comes after ``configure(c)``; ``before_configure`` (one
        line of Python) before it, where z2jh's own settings are."""
        self.run_dir = run_dir
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.extra_config = extra_config
        self.port = port
        self.admin_users = admin_users
        self.before_configure = before_configure
        self.api_token = secrets.token_hex(16)
        # what the hub's spawners send to the gpushare service (configure(c) reads it)
        self.queue_secret = secrets.token_hex(16)
        self.component: Component | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/hub/api"

    def config_text(self) -> str:
        return (
            textwrap.dedent(
                f"""\
            c = get_config()  # noqa
            c.JupyterHub.ip = "127.0.0.1"
            c.JupyterHub.port = {self.port}
            c.JupyterHub.hub_ip = "127.0.0.1"
            c.JupyterHub.hub_port = {self.hub_port}
            c.JupyterHub.hub_connect_url = "http://127.0.0.1:{self.hub_port}"
            c.ConfigurableHTTPProxy.command = [{find_proxy()!r}]
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"
            c.ConfigurableHTTPProxy.should_start = True
            c.JupyterHub.db_url = "sqlite:///{self.run_dir}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{self.run_dir}/cookie_secret"
            c.JupyterHub.pid_file = "{self.run_dir}/jupyterhub.pid"
            c.JupyterHub.log_level = "DEBUG"

            c.JupyterHub.authenticator_class = "dummy"
            c.DummyAuthenticator.password = {TEST_PASSWORD!r}
            c.Authenticator.allow_all = True
            c.Authenticator.admin_users = set({list(self.admin_users)!r})

            c.JupyterHub.services = [{{"name": "test-client", "api_token": {self.api_token!r}}}]
            c.JupyterHub.load_roles = [
                {{"name": "test-client", "scopes": ["admin:users", "admin:servers",
                  "access:servers", "read:hub", "tokens"], "services": ["test-client"]}}
            ]

            # What the zero-to-jupyterhub chart sets, from its default values and
            # its jupyterhub_config.py: tests run on what deployments run.
            c.JupyterHub.concurrent_spawn_limit = 64
            c.Spawner.consecutive_failure_limit = 5
            c.KubeSpawner.start_timeout = 300
            c.JupyterHub.cleanup_servers = False
            c.JupyterHub.last_activity_interval = 60
            c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
            c.KubeSpawner.namespace = {self.namespace!r}
            c.KubeSpawner.image = "quay.io/jupyter/base-notebook:latest"
            c.KubeSpawner.cmd = ["jupyterhub-singleuser"]
            c.KubeSpawner.http_timeout = 60
            """
            )
            + textwrap.dedent(self.before_configure)
            + textwrap.dedent(
                f"""
            # the chart's hub.extraConfig, run last
            c.JupyterHub.spawner_class = "gpushare.GPUShareSpawner"
            import jupyterhub_gpushare
            jupyterhub_gpushare.configure(c, port={self.service_port})
            c.Spawner.default_url = "/lab"
            # Images run as an unprivileged user; our "containers" are processes of
            # whoever runs the tests, which on CI is root.
            if {os.geteuid() == 0!r}:
                c.Spawner.args = ["--allow-root"]
            """
            )
            + textwrap.dedent(self.extra_config)
        )

    def start(self, timeout: float = 120) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.port:
            ensure_port_free(self.port, "JupyterHub", "GPUSHARE_HUB_PORT")
        else:
            self.port = free_port()
        if self.component is None:  # a restart keeps its ports
            self.hub_port = free_port()
            self.proxy_api_port = free_port()
            self.service_port = free_port()
        config = self.run_dir / "jupyterhub_config.py"
        config.write_text(self.config_text())
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "GPUSHARE_HUB_SECRET": self.queue_secret,
            "PYTHONUNBUFFERED": "1",
        }
        self.component = Component(
            "jupyterhub",
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            self.run_dir / "jupyterhub.log",
            env=env,
            cwd=self.run_dir,
            death_signal=signal.SIGTERM,
        )
        self.component.start()

        def up() -> bool:
            if not self.component.running:
                raise ClusterError(
                    f"JupyterHub exited during start-up: {self.component.last_log_line()} "
                    f"(full log: {self.component.log_path})"
                )
            try:
                return httpx.get(f"{self.api_url}/", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, "JupyterHub to answer through the proxy", interval=0.5)

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop(timeout=30)

    def restart(self, timeout: float = 120) -> None:
        """Stop the hub as Kubernetes does (SIGTERM) and start it again on the same
        database and ports, as after ``helm upgrade``. Its log is kept: the new
        process appends to it."""
        self.stop()
        self.start(timeout)

    # -- clients ------------------------------------------------------------
    def api_client(self) -> httpx.AsyncClient:
        """A client holding the hub's admin-scoped test token."""
        return httpx.AsyncClient(
            base_url=self.api_url,
            headers={"Authorization": f"token {self.api_token}"},
            timeout=30,
        )

    async def login(self, username: str) -> httpx.AsyncClient:
        """A browser-like client, logged in through the real login form."""
        browser = httpx.AsyncClient(base_url=self.url, timeout=30, follow_redirects=True)
        page = await browser.get("/hub/login")
        match = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
        data = {"username": username, "password": TEST_PASSWORD}
        if match:
            data["_xsrf"] = match.group(1)
        response = await browser.post("/hub/login", data=data)
        if response.status_code != 200 or "/hub/login" in str(response.url):
            await browser.aclose()
            raise AssertionError(f"login as {username} failed: {response.status_code}")
        return browser


def wait_for_hub_log(hub: LocalHub, pattern: str, timeout: float = 30) -> None:
    regex = re.compile(pattern)
    wait_until(
        lambda: bool(regex.search(hub.component.log_path.read_text(errors="replace"))),
        timeout,
        f"hub log line matching {pattern!r}",
    )


__all__ = ["LocalHub", "find_proxy"]
