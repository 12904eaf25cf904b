"""A stand-in for the GPU operator's device plugin DaemonSet, for ``gpushare`` tests.

Two halves:

- ``python -m jupyterhub_gpushare.testing.deviceplugin`` is what each stand-in pod runs (our
  simulated kubelet starts it as a local process). Like the real plugin with the
  operator's config-manager, it picks its node's config (node label
  ``nvidia.com/device-plugin.config``, else the ClusterPolicy's default, else
  none), parses it *non-strictly* as the plugin does (unknown keys ignored,
  replicas < 2 rejected), then advertises ``gpu.count x replicas`` in the node's
  capacity and allocatable and sets the GFD labels. It then listens on its pod
  IP, which makes the pod Ready, and stays until it is deleted. A config it
  cannot use makes it exit 1, like the plugin's crash loop.
- :class:`StandInDaemonSet` runs in the test process and does the DaemonSet
  controller's job (there is no controller manager): one pod per node labelled
  ``nvidia.com/gpu.deploy.device-plugin=true``, recreated when deleted.

It reads the ClusterPolicy and ConfigMap on its own, independently of
:mod:`jupyterhub_gpushare.timeslicing`, so the tests check our CLI against an
independent reading of the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

APP_LABEL = "nvidia-device-plugin-daemonset"
DEPLOY_LABEL = "nvidia.com/gpu.deploy.device-plugin"
CONFIG_LABEL = "nvidia.com/device-plugin.config"
KUBECONFIG_ENV = "GPUSHARE_STANDIN_KUBECONFIG"
PORT = 8640

log = logging.getLogger("deviceplugin-standin")


class PluginConfigError(Exception):
    """What makes the real plugin (or its config-manager) exit."""


# -- the plugin's reading of its config: lenient like sigs.k8s.io/yaml into Go structs ---
def _replicated(section: object, where: str) -> tuple[bool, dict[str, int]]:
    if not isinstance(section, dict):
        section = {}
    rename = section.get("renameByDefault", False)
    if not isinstance(rename, bool):
        raise PluginConfigError(f"{where}.renameByDefault: cannot unmarshal into bool")
    resources = section.get("resources")
    if not resources:
        raise PluginConfigError("no resources specified")
    replicas: dict[str, int] = {}
    for item in resources:
        if not isinstance(item, dict) or "name" not in item:
            raise PluginConfigError("no resource name specified")
        if "replicas" not in item:
            raise PluginConfigError("no replicas specified")
        count = item["replicas"]
        if not isinstance(count, int) or isinstance(count, bool):
            raise PluginConfigError(f"{where}: replicas: cannot unmarshal into int")
        if count < 2:
            raise PluginConfigError("number of replicas must be >= 2")
        name = str(item["name"])
        replicas[name if "/" in name else f"nvidia.com/{name}"] = count
    return rename, replicas


def plugin_sharing(text: str) -> tuple[str, int, bool]:
    """(strategy, replicas of nvidia.com/gpu, renamed) as the plugin and GFD see a config."""
    config = yaml.safe_load(text) or {}
    if not isinstance(config, dict):
        raise PluginConfigError("unmarshal error: not a mapping")
    version = config.get("version") or "v1"
    if version != "v1":
        raise PluginConfigError(f"unknown version: {version}")
    sharing = config.get("sharing") or {}
    if not isinstance(sharing, dict):
        sharing = {}
    parsed = {}
    for key in ("timeSlicing", "mps"):
        if key in sharing:
            parsed[key] = _replicated(sharing[key], f"sharing.{key}")
    # ReplicatedResources(): MPS when its section exists, else time-slicing
    active = "mps" if "mps" in parsed else "timeSlicing"
    rename, replicas = parsed.get(active, (False, {}))
    count = replicas.get("nvidia.com/gpu", 1)
    if count <= 1:
        return "none", 1, False
    return ("mps" if active == "mps" else "time-slicing"), count, rename


async def apply_to_node(api: client.ApiClient, node_name: str, namespace: str) -> str:
    """Read policy, ConfigMap and node; advertise and label what the config gives."""
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    try:
        policy = await custom.get_cluster_custom_object(
            "nvidia.com", "v1", "clusterpolicies", "cluster-policy"
        )
    except ApiException as e:
        if e.status != 404:
            raise
        policy = {}
    config = ((policy.get("spec") or {}).get("devicePlugin") or {}).get("config") or {}
    node = await core.read_node(node_name)
    labels = dict(node.metadata.labels or {})
    strategy, replicas, renamed = "none", 1, False
    if config.get("name"):
        try:
            cm = await core.read_namespaced_config_map(config["name"], namespace)
        except ApiException as e:
            if e.status == 404:
                raise PluginConfigError(f"ConfigMap {config['name']} not found") from None
            raise
        data = cm.data or {}
        key = labels.get(CONFIG_LABEL) or config.get("default") or ""
        if key:  # the operator's fallback strategy is "empty": no key, no config
            if key not in data:
                raise PluginConfigError(f"specified config {key} does not exist")
            strategy, replicas, renamed = plugin_sharing(data[key])
    gpus = int(labels.get("nvidia.com/gpu.count", "0"))
    slices = str(gpus * replicas)
    if renamed:
        resources = {"nvidia.com/gpu.shared": slices, "nvidia.com/gpu": "0"}
    else:
        resources = {"nvidia.com/gpu": slices, "nvidia.com/gpu.shared": None}
    # the plugin registers with the kubelet first ...
    await core.patch_node_status(
        node_name, {"status": {"capacity": resources, "allocatable": resources}}
    )
    # ... and GFD relabels a little later
    product = labels.get("nvidia.com/gpu.product", "").removesuffix("-SHARED")
    if product and replicas > 1 and not renamed:
        product += "-SHARED"
    new_labels = {
        "nvidia.com/gpu.replicas": str(replicas),
        "nvidia.com/gpu.sharing-strategy": strategy,
    }
    if product:
        new_labels["nvidia.com/gpu.product"] = product
    await core.patch_node(node_name, {"metadata": {"labels": new_labels}})
    return f"{strategy} x{replicas}{' renamed' if renamed else ''}: {slices} slices"


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
def standin_pod(node: str, kubeconfig: str) -> dict:
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
                self.namespace, standin_pod(node, self.kubeconfig)
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
