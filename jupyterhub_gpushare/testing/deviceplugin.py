"""A stand-in for the GPU operator's device plugin DaemonSet, for ``gpushare`` tests.

Two halves:

- ``python -m jupyterhub_gpushare.testing.deviceplugin`` is what each stand-in pod runs (our
  simulated kubelet starts it as a local process). Like the operator's
  config-manager, it finds the ClusterPolicy the operator acts on (the oldest,
  whatever its name) and picks its node's config: the node label
  ``nvidia.com/device-plugin.config``, else the policy's default, else none. It
  parses that config with the device plugin's own Go code
  (:mod:`jupyterhub_gpushare.testing.pluginparser`), then advertises what the plugin
  would: ``gpu.count x`` devices per GPU in the node's capacity and allocatable,
  and GFD's labels (replicas from the first entry, strategy, ``-SHARED``). It then
  listens on its pod IP, which makes the pod Ready, and stays until it is deleted.
  A config the plugin refuses, a key the ConfigMap lacks or a missing ConfigMap
  make it log the reason and exit 1, like the plugin's crash loop.
- :class:`StandInDaemonSet` runs in the test process and does the DaemonSet
  controller's job (there is no controller manager): one pod per node labelled
  ``nvidia.com/gpu.deploy.device-plugin=true``, recreated when deleted.

It reads the ClusterPolicy and ConfigMap on its own, independently of
:mod:`jupyterhub_gpushare.sharing`, so the tests check our CLI against an
independent reading of the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import pluginparser

APP_LABEL = "nvidia-device-plugin-daemonset"
DEPLOY_LABEL = "nvidia.com/gpu.deploy.device-plugin"
CONFIG_LABEL = "nvidia.com/device-plugin.config"
KUBECONFIG_ENV = "GPUSHARE_STANDIN_KUBECONFIG"
PORT = 8640

log = logging.getLogger("deviceplugin-standin")


class PluginConfigError(Exception):
    """What makes the real plugin (or its config-manager) exit."""


def operators_policy(policies: list[dict]) -> dict:
    """The ClusterPolicy the GPU operator acts on: the oldest, then the first by name."""
    if not policies:
        return {}
    return min(
        policies,
        key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]),
    )


async def apply_to_node(api: client.ApiClient, node_name: str, namespace: str) -> str:
    """Read policy, ConfigMap and node; advertise and label what the config gives."""
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    try:
        listing = await custom.list_cluster_custom_object("nvidia.com", "v1", "clusterpolicies")
        policy = operators_policy(listing.get("items") or [])
    except ApiException as e:
        if e.status != 404:
            raise
        policy = {}
    config = ((policy.get("spec") or {}).get("devicePlugin") or {}).get("config") or {}
    node = await core.read_node(node_name)
    labels = dict(node.metadata.labels or {})
    devices_per_gpu, label_replicas, strategy = 1, 1, "none"
    resource, renamed = "nvidia.com/gpu", False
    if config.get("name"):
        try:
            cm = await core.read_namespaced_config_map(config["name"], namespace)
        except ApiException as e:
            if e.status == 404:
                raise PluginConfigError(
                    f'configmap "{config["name"]}" not found: the config volume cannot mount'
                ) from None
            raise
        data = cm.data or {}
        if not data:
            raise PluginConfigError("no configuration files available")
        key = labels.get(CONFIG_LABEL) or config.get("default") or ""
        if key:  # the operator's fallback strategy is "empty": no key, no config
            if key not in data:
                raise PluginConfigError(f"specified config {key} does not exist")
            answer = await asyncio.to_thread(pluginparser.read, data[key])
            if not answer.ok:
                raise PluginConfigError(f"unable to load config: {answer.error}")
            for warning in answer.warnings:
                log.warning("%s", warning)
            gpu = answer.gpu
            devices_per_gpu, label_replicas, strategy = (
                gpu.devices_per_gpu,
                gpu.label_replicas,
                gpu.strategy,
            )
            resource, renamed = gpu.resource, gpu.renamed
    gpus = int(labels.get("nvidia.com/gpu.count", "0"))
    slices = str(gpus * devices_per_gpu)
    if resource == "nvidia.com/gpu":
        resources = {"nvidia.com/gpu": slices, "nvidia.com/gpu.shared": None}
    else:
        resources = {resource: slices, "nvidia.com/gpu": "0"}
    # the plugin registers with the kubelet first ...
    await core.patch_node_status(
        node_name, {"status": {"capacity": resources, "allocatable": resources}}
    )
    # ... and GFD relabels a little later
    product = labels.get("nvidia.com/gpu.product", "").removesuffix("-SHARED")
    if product and label_replicas > 1 and not renamed:
        product += "-SHARED"
    new_labels = {
        "nvidia.com/gpu.replicas": str(label_replicas),
        "nvidia.com/gpu.sharing-strategy": strategy,
    }
    if product:
        new_labels["nvidia.com/gpu.product"] = product
    await core.patch_node(node_name, {"metadata": {"labels": new_labels}})
    return (
        f"{strategy} x{label_replicas}{' renamed' if renamed else ''}: {slices} slices "
        f"of {resource}"
    )


async def serve() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from jupyterhub_gpushare import clients

    node_name = os.environ["NODE_NAME"]
    namespace = os.environ.get("POD_NAMESPACE", "gpu-operator")
    api = await clients.api_client(os.environ[KUBECONFIG_ENV])
    try:
        result = await apply_to_node(api, node_name, namespace)
    except PluginConfigError as e:
        log.error("cannot start: %s", e)
        return 1
    finally:
        await clients.close_clients()
    log.info("node %s: %s", node_name, result)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # listening makes the simulated kubelet mark the pod Ready: config applied
    server = await asyncio.start_server(
        lambda r, w: w.close(), os.environ.get("POD_IP", "127.0.0.1"), PORT
    )
    async with server:
        await stop.wait()
    return 0


# -- the DaemonSet controller, in the test process ------------------------------------
def standin_pod(node: str, kubeconfig: str, parser: str) -> dict:
    return {
        "metadata": {
            "generateName": f"{APP_LABEL}-",
            "labels": {"app": APP_LABEL},
        },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 5,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "nvidia-device-plugin",
                    "image": "nvcr.io/nvidia/k8s-device-plugin:stand-in",
                    "command": [sys.executable, "-m", "jupyterhub_gpushare.testing.deviceplugin"],
                    "ports": [{"containerPort": PORT}],
                    "env": [
                        {"name": KUBECONFIG_ENV, "value": kubeconfig},
                        {"name": pluginparser.BINARY_ENV, "value": parser},
                        {"name": "PYTHONUNBUFFERED", "value": "1"},
                        {
                            "name": "NODE_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                        },
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {
                            "name": "POD_IP",
                            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                        },
                    ],
                }
            ],
        },
    }


class StandInDaemonSet:
    """Keeps one stand-in pod on every node labelled for the device plugin."""

    def __init__(self, core: client.CoreV1Api, namespace: str, kubeconfig: str):
        self.core = core
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        # built (or found in the cache) here, so that the pods need no Go toolchain
        self.parser = str(pluginparser.binary())
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for pod in await self._pods():
            with contextlib.suppress(ApiException):
                await self.core.delete_namespaced_pod(
                    pod.metadata.name, self.namespace, grace_period_seconds=0
                )

    async def _pods(self) -> list:
        pods = await self.core.list_namespaced_pod(
            self.namespace, label_selector=f"app={APP_LABEL}"
        )
        return pods.items

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except ApiException as e:
                log.warning("stand-in DaemonSet: %s", e.reason)
            # a controller's resync period, not a test synchronisation
            await asyncio.sleep(0.3)

    async def reconcile(self) -> None:
        nodes = await self.core.list_node(label_selector=f"{DEPLOY_LABEL}=true")
        wanted = {n.metadata.name for n in nodes.items}
        pods = await self._pods()
        # like the DaemonSet controller: a failed (crash-looping) pod still counts,
        # and a node whose pod is terminating waits until it is gone
        present = {p.spec.node_name for p in pods}
        for node in sorted(wanted - present):
            await self.core.create_namespaced_pod(
                self.namespace, standin_pod(node, self.kubeconfig, self.parser)
            )
        for pod in pods:
            if pod.spec.node_name not in wanted and not pod.metadata.deletion_timestamp:
                with contextlib.suppress(ApiException):
                    await self.core.delete_namespaced_pod(
                        pod.metadata.name, self.namespace, grace_period_seconds=0
                    )

    async def pod_on(self, node: str):
        """The node's stand-in pod if it is Ready (its config applied), else None."""
        for pod in await self._pods():
            if pod.spec.node_name != node or pod.metadata.deletion_timestamp:
                continue
            conditions = pod.status.conditions or []
            if any(c.type == "Ready" and c.status == "True" for c in conditions):
                return pod
        return None


if __name__ == "__main__":
    sys.exit(asyncio.run(serve()))
