"""The one place that loads Kubernetes configuration and hands out API clients.

In a pod (the hub, its managed service) the in-cluster configuration is used;
elsewhere (the CLI, tests, a hub outside Kubernetes) ``$KUBECONFIG`` or
``~/.kube/config``. Clients are shared per event loop, as in kubespawner.
"""

from __future__ import annotations

import asyncio
import os

from kubernetes_asyncio import client, config
from kubernetes_asyncio.config import ConfigException

_configs: dict[str | None, client.Configuration] = {}
_clients: dict[tuple[int, str | None], client.ApiClient] = {}


async def load_configuration(kubeconfig: str | None = None) -> client.Configuration:
    """Kubernetes client configuration, loaded once per kubeconfig path."""
    if kubeconfig in _configs:
        return _configs[kubeconfig]
    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        try:
            await config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration
            )
        except (ConfigException, OSError) as e:
            raise ConfigException(
                f"no Kubernetes configuration found ({e}); set KUBECONFIG or run inside the cluster"
            ) from e
    _configs[kubeconfig] = configuration
    return configuration


async def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An ApiClient shared by everything that runs on the current event loop."""
    key = (id(asyncio.get_running_loop()), kubeconfig)
    if key not in _clients:
        _clients[key] = client.ApiClient(await load_configuration(kubeconfig))
    return _clients[key]


async def core_v1(kubeconfig: str | None = None) -> client.CoreV1Api:
    return client.CoreV1Api(await api_client(kubeconfig))


async def close_clients() -> None:
    """Close the clients of the current loop (for command-line tools and tests)."""
    loop_id = id(asyncio.get_running_loop())
    for key in [k for k in _clients if k[0] == loop_id]:
        await _clients.pop(key).close()
