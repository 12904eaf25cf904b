"""The local cluster behaves like a real one: the scheduler places GPU slices,
pods are real processes on loopback IPs, and deletions free slices."""

from __future__ import annotations

import sys

import httpx
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from jupyterhub_gpushare.testing.kubelet import FAIL_ADMISSION_ANNOTATION
from jupyterhub_gpushare.testing.waiting import wait_for
from tests.conftest import unique

pytestmark = pytest.mark.cluster


def http_pod(name: str, node: str, slices: int = 1, annotations: dict | None = None) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {"app": "gpushare-test"},
            "annotations": annotations or {},
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "web",
                    "image": "python:3.12-slim",
                    "command": [sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "8080"],
                    "ports": [{"containerPort": 8080}],
                    "resources": {"limits": {"nvidia.com/gpu": str(slices)}},
                }
            ],
        },
    }


async def pod_status(core: client.CoreV1Api, namespace: str, name: str):
    try:
        return (await core.read_namespaced_pod(name, namespace)).status
    except ApiException as e:
        if e.status == 404:
            return None
        raise


async def ready_ip(core, namespace, name) -> str | None:
    status = await pod_status(core, namespace, name)
    if status is None or status.phase != "Running":
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    return status.pod_ip if ready else None


async def test_fifth_slice_waits_for_a_free_one(core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=4)
    names = [unique("slice") for _ in range(5)]
    for name in names[:4]:
        await core.create_namespaced_pod(namespace, http_pod(name, node))
    ips = []
    for name in names[:4]:
        ip = await wait_for(lambda n=name: ready_ip(core, namespace, n), 60, f"{name} ready")
        assert ip.startswith("127.")
        ips.append(ip)
    assert len(set(ips)) == 4
    async with httpx.AsyncClient(timeout=10) as http:
        for ip in ips:
            assert (await http.get(f"http://{ip}:8080/")).status_code == 200

    await core.create_namespaced_pod(namespace, http_pod(names[4], node))

    async def scheduling_failure():
        events = await core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={names[4]}"
        )
        return [e.message for e in events.items if e.reason == "FailedScheduling"]

    messages = await wait_for(scheduling_failure, 60, "a FailedScheduling event")
    assert "Insufficient nvidia.com/gpu" in messages[0]
    status = await pod_status(core, namespace, names[4])
    assert status.phase == "Pending"
    assert not (await core.read_namespaced_pod(names[4], namespace)).spec.node_name

    await core.delete_namespaced_pod(names[0], namespace)
    ip = await wait_for(lambda: ready_ip(core, namespace, names[4]), 90, "the fifth pod ready")
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"http://{ip}:8080/")).status_code == 200
    # the deleted pod is really gone, and its process with it
    await wait_for(lambda: _gone(core, namespace, names[0]), 30, "the deleted pod to disappear")
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=5) as http:
            await http.get(f"http://{ips[0]}:8080/")
    for name in names[1:]:
        await core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


async def _gone(core, namespace, name) -> bool:
    return await pod_status(core, namespace, name) is None


async def test_admission_failure_reason_is_reported(core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=2)
    await core.patch_node(
        node, {"metadata": {"annotations": {FAIL_ADMISSION_ANNOTATION: "UnexpectedAdmissionError"}}}
    )
    name = unique("rejected")
    await core.create_namespaced_pod(namespace, http_pod(name, node))

    async def failed():
        status = await pod_status(core, namespace, name)
        return status if status and status.phase == "Failed" else None

    status = await wait_for(failed, 60, "the pod to fail admission")
    assert status.reason == "UnexpectedAdmissionError"
    await core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


async def test_environment_reaches_the_process(core, namespace, gpu_nodes, tmp_path):
    """The container's env (plain values and fieldRefs) is what the process sees."""
    node = await gpu_nodes(replicas=2)
    name = unique("env")
    out = tmp_path / "env.txt"
    script = (
        "import os, pathlib; pathlib.Path(os.environ['OUT']).write_text("
        "os.environ['GREETING'] + ' ' + os.environ['MY_POD'] + ' ' + os.environ['MY_IP'])"
    )
    pod = http_pod(name, node)
    container = pod["spec"]["containers"][0]
    container.pop("ports")
    container["command"] = [sys.executable, "-c", script]
    container["env"] = [
        {"name": "OUT", "value": str(out)},
        {"name": "GREETING", "value": "hello"},
        {"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    await core.create_namespaced_pod(namespace, pod)

    async def succeeded():
        status = await pod_status(core, namespace, name)
        return status if status and status.phase == "Succeeded" else None

    status = await wait_for(succeeded, 60, "the pod to succeed")
    greeting, pod_name, ip = out.read_text().split()
    assert (greeting, pod_name, ip) == ("hello", name, status.pod_ip)
    await core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
