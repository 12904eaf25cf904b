"""One call that sets up gpushare in a hub's configuration::

    import jupyterhub_gpushare
    jupyterhub_gpushare.configure(c)

It adds the managed service, its role, the user scope it needs and the
spawner's queue settings, on JupyterHub 5.x and 6.x. Call it last (z2jh: in
``hub.extraConfig``, which runs after every other setting): it reads what is
already configured.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from traitlets.config import Config

from .notices import add_announcements
from .objects import GPUShareConfigError

SERVICE_SCOPES = ["list:users", "read:users:activity", "read:servers"]
# What the service's admin views show is what these scopes read: tokens the
# service's pages get through OAuth carry them (filtered to the user's own
# servers for anyone who is not an admin).
OAUTH_SCOPES = ["list:users", "read:servers", "read:users:activity"]
# A managed service inherits only a few variables from the hub; the in-cluster
# Kubernetes client needs these.
FORWARDED_ENV = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG")


def _jupyterhub_major() -> int:
    from jupyterhub import version_info

    return int(version_info[0])


def configure(
    c: Config,
    *,
    url: str | None = None,
    port: int = 10101,
    name: str = "gpushare",
    environment: dict[str, str] | None = None,
) -> None:
    """Add the gpushare service and its permissions to the hub config ``c``.

    ``url`` is where the proxy reaches the service (z2jh: ``"http://hub:10101"``);
    by default ``http://127.0.0.1:<port>``. The hub's own spawners always talk
    to it on loopback, since the service runs beside the hub.
    """
    url = (url or f"http://127.0.0.1:{port}").rstrip("/")
    secret = os.environ.get("GPUSHARE_HUB_SECRET") or secrets.token_hex(32)
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    env["GPUSHARE_HUB_SECRET"] = secret
    env.update(environment or {})

    _read_culler(c)
    service_config = _service_config(c)
    if service_config:
        env["GPUSHARE_SERVICE_CONFIG"] = service_config

    service = {
        "name": name,
        "url": url,
        "command": [sys.executable, "-m", "jupyterhub_gpushare.service"],
        "environment": env,
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": OAUTH_SCOPES,
        "display": True,
        "info": {"description": "GPU slices: what is free, and your place in line"},
    }
    services = list(c.JupyterHub.services) if "services" in c.JupyterHub else []
    c.JupyterHub.services = [s for s in services if s.get("name") != name] + [service]

    roles = list(c.JupyterHub.load_roles) if "load_roles" in c.JupyterHub else []
    roles = [r for r in roles if r.get("name") != f"{name}-service"]
    roles.append({"name": f"{name}-service", "scopes": service_scopes(c), "services": [name]})
    access = f"access:services!service={name}"
    user_role = next((r for r in roles if r.get("name") == "user"), None)
    if user_role is not None:
        user_role["scopes"] = sorted({*user_role.get("scopes", ["self"]), access})
    elif _jupyterhub_major() >= 6:
        extra = (
            set(c.JupyterHub.extra_user_scopes) if "extra_user_scopes" in c.JupyterHub else set()
        )
        c.JupyterHub.extra_user_scopes = extra | {access}
    else:
        # JupyterHub 5: redefine the default user role with the extra scope
        roles.append({"name": "user", "scopes": ["self", access]})
    c.JupyterHub.load_roles = roles

    # the admin page with the GPU panel beside JupyterHub's own React app
    templates = str(Path(__file__).parent / "templates")
    paths = list(c.JupyterHub.template_paths) if "template_paths" in c.JupyterHub else []
    c.JupyterHub.template_paths = [templates, *[p for p in paths if p != templates]]
    template_vars = dict(c.JupyterHub.template_vars) if "template_vars" in c.JupyterHub else {}
    # users whose GPU server was reclaimed read why on the hub's pages
    c.JupyterHub.template_vars = add_announcements({**template_vars, "gpushare_service": name})

    if "spawner_class" not in c.JupyterHub:
        c.JupyterHub.spawner_class = "gpushare.GPUShareSpawner"
    _move_spawn_limit(c)
    local_port = int(url.rsplit(":", 1)[1].split("/")[0]) if url.count(":") == 2 else port
    c.GPUShareSpawner.queue_url = f"http://127.0.0.1:{local_port}"
    c.GPUShareSpawner.queue_service_name = name
    c.GPUShareSpawner.queue_secret = secret


def service_scopes(c: Config) -> list[str]:
    """What the service may do at the hub: read who runs what, and, only with
    reclaim on (not a dry run), stop servers. ``delete:servers`` is the
    narrowest scope that stops a server on JupyterHub 5 and 6 alike (6 splits
    ``servers`` into ``start:servers`` and ``delete:servers``; 5 has
    ``delete:servers`` under ``servers``)."""
    scopes = list(SERVICE_SCOPES)
    reclaim = c.Reclaimer if "Reclaimer" in c else {}
    if reclaim.get("enabled") and not reclaim.get("dry_run"):
        scopes.append("delete:servers")
    if reclaim.get("enabled") and reclaim.get("exempt_groups"):
        scopes.append("read:users:groups")  # the groups in each user's model
    return scopes


CULLER_MODULES = ("jupyterhub_idle_culler", "jupyterhub-idle-culler")
# the culler's command-line options that bear on when a slice frees up
CULLER_OPTIONS = {
    "--timeout": "culler_timeout_seconds",
    "--cull-every": "culler_every_seconds",
    "--max-age": "culler_max_age_seconds",
}


def _read_culler(c: Config) -> None:
    """Tell the service what jupyterhub-idle-culler does (z2jh's ``cull.*``), from
    the culler service's command line, unless the admin set it on ``c.Reclaimer``.

    The service uses it for the wait estimate (the culler's timeout) and the
    bound (its maximum age), and says in the docs how the two settings relate.
    """
    services = list(c.JupyterHub.services) if "services" in c.JupyterHub else []
    for service in services:
        command = [str(part) for part in service.get("command") or []]
        if not any(m in part for part in command for m in CULLER_MODULES):
            continue
        found: dict[str, float | bool] = {"culler_timeout_seconds": 600.0}
        every_given = False
        spares = False
        for part in command:
            option, _, value = part.partition("=")
            if option in CULLER_OPTIONS and value:
                try:
                    found[CULLER_OPTIONS[option]] = float(value)
                except ValueError:
                    continue
                every_given = every_given or option == "--cull-every"
            elif option in ("--cull-default-servers", "--cull-named-servers"):
                spares = spares or value.lower() in ("false", "0", "no")
        if not every_given or not found.get("culler_every_seconds"):
            # the culler's own default: half its timeout
            found["culler_every_seconds"] = found["culler_timeout_seconds"] // 2
        found["culler_culls_every_server"] = not spares
        for trait, value in found.items():
            if trait not in c.Reclaimer:
                c.Reclaimer[trait] = value
        return


def _move_spawn_limit(c: Config) -> None:
    """Users waiting for a slice are pending spawns to JupyterHub, and its
    ``concurrent_spawn_limit`` counts them: with z2jh's 64 in line, nobody could
    start any server. The spawner enforces the same limit on servers past the
    GPU line instead (``concurrent_start_limit``), and the hub's is switched off."""
    from jupyterhub.app import JupyterHub

    if "concurrent_start_limit" not in c.GPUShareSpawner:
        if "concurrent_spawn_limit" in c.JupyterHub:
            limit = c.JupyterHub.concurrent_spawn_limit
        else:
            limit = JupyterHub.class_traits()["concurrent_spawn_limit"].default_value
        c.GPUShareSpawner.concurrent_start_limit = limit
    c.JupyterHub.concurrent_spawn_limit = 0


def _service_config(c: Config) -> str | None:
    """The settings of the service's classes found in the hub's config, as JSON
    for the service process (``c.Dispatcher.hold_seconds = 600`` in the hub
    config reaches the service)."""
    from .service.app import GPUShareService

    names = [cls.__name__ for cls in (GPUShareService, *GPUShareService.classes)]
    found = {name: dict(c[name]) for name in names if c.get(name)}
    if not found:
        return None
    try:
        return json.dumps(found, default=_sets_as_lists)
    except TypeError as e:
        raise GPUShareConfigError(
            f"the gpushare service settings {sorted(found)} must be plain values "
            f"(numbers, strings, lists, dicts) to reach the service: {e}"
        ) from None


def _sets_as_lists(value: object) -> list:
    # c.Reclaimer.exempt_users = {"ann"}: a set in the config, a list in JSON
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
