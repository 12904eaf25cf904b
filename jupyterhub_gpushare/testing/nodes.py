"""Simulated GPU nodes, labelled the way NVIDIA GPU Feature Discovery labels real ones."""

from __future__ import annotations

import contextlib

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

SIMULATED_LABEL = "gpushare.dev/simulated"


def gpu_node_manifest(
    name: str,
    gpus: int = 1,
    replicas: int = 4,
    product: str = "NVIDIA-GeForce-RTX-5090",
    memory_mib: int = 32607,
    strategy: str | None = None,
    resource_name: str = "nvidia.com/gpu",
    labels: dict[str, str] | None = None,
) -> dict:
    """A Node whose device plugin advertises ``gpus x replicas`` slices."""
    sharing = strategy or ("time-slicing" if replicas > 1 else "none")
    slices = str(gpus * replicas)
    resources = {"cpu": "32", "memory": "256Gi", "pods": "250", resource_name: slices}
    if resource_name != "nvidia.com/gpu":
        resources["nvidia.com/gpu"] = "0"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                SIMULATED_LABEL: "true",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": product + ("-SHARED" if replicas > 1 else ""),
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.replicas": str(replicas),
                "nvidia.com/gpu.memory": str(memory_mib),
                "nvidia.com/gpu.sharing-strategy": sharing,
                **(labels or {}),
            },
        },
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "simulated kubelet is posting ready status",
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
        },
    }


async def create_gpu_node(core: client.CoreV1Api, name: str, **kwargs) -> dict:
    manifest = gpu_node_manifest(name, **kwargs)
    await core.create_node(manifest)
    # status on create is kept today, but a status patch is the documented path
    await core.patch_node_status(name, {"status": manifest["status"]})
    # The API server taints new nodes not-ready; the node lifecycle controller of
    # a controller manager would lift it once Ready. We run none, so lift it here.
    await core.patch_node(name, {"spec": {"taints": None}})
    return manifest


async def delete_node(core: client.CoreV1Api, name: str) -> None:
    """Remove a node and force-remove whatever pods are still bound to it."""
    pods = await core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}")
    for pod in pods.items:
        with contextlib.suppress(ApiException):
            await core.delete_namespaced_pod(
                pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
            )
    with contextlib.suppress(ApiException):
        await core.delete_node(name)
