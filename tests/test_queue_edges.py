"""The queue's edges: running out of queue time, a device plugin that rejects
pods while it restarts, and a service that cannot be reached."""

from __future__ import annotations

import socket

import pytest

from jupyterhub_gpushare.testing.kubelet import FAIL_ADMISSION_ANNOTATION
from jupyterhub_gpushare.testing.waiting import wait_for
from tests.conftest import unique
from tests.spawning import (
    progress_events,
    request_server,
    stop_all,
    user_pod,
    wait_event,
    wait_ready,
)
from tests.test_queue import blocker_pod

pytestmark = [pytest.mark.cluster, pytest.mark.hub]


@pytest.fixture(scope="module")
def hub(hub_factory):
    return hub_factory(
        """
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
c.GPUShareSpawner.memory_guard = False
c.GPUShareSpawner.queue_timeout = 4
# a hub that exits after two failed spawns in a row (z2jh uses 5)
c.Spawner.consecutive_failure_limit = 2
"""
    )


async def test_queue_timeout_is_clear_and_never_restarts_the_hub(hub, core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=1)
    blocker = unique("blocker")
    await core.create_namespaced_pod(namespace, blocker_pod(blocker, node))
    users = [unique("t") for _ in range(3)]
    try:
        for user in users:  # three timeouts in a row, limit is two
            assert await request_server(hub, user) == 202
            events = await progress_events(hub, user, timeout=60)
            assert events[-1]["failed"] is True
            assert "No GPU slice became free within" in events[-1]["message"]
        async with hub.api_client() as api:
            assert (await api.get("/")).status_code == 200
        assert hub.component.running
        pods = await core.list_namespaced_pod(
            namespace, label_selector="component=singleuser-server"
        )
        assert pods.items == []  # nothing was left behind
    finally:
        await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)


async def test_rejected_pod_is_created_again(hub, core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=4)
    await core.patch_node(
        node, {"metadata": {"annotations": {FAIL_ADMISSION_ANNOTATION: "UnexpectedAdmissionError"}}}
    )
    user = unique("r")
    try:
        await request_server(hub, user)

        async def rejected():
            pods = await core.list_namespaced_pod(
                namespace, label_selector=f"hub.jupyter.org/username={user}"
            )
            return [p for p in pods.items if p.status.reason == "UnexpectedAdmissionError"]

        first = (await wait_for(rejected, 60, "the pod to be rejected"))[0]
        # the device plugin is back
        await core.patch_node(
            node, {"metadata": {"annotations": {FAIL_ADMISSION_ANNOTATION: None}}}
        )
        await wait_ready(hub, user)
        pod = await user_pod(core, namespace, user)
        assert pod.metadata.uid != first.metadata.uid
        assert pod.status.phase == "Running"
    finally:
        await stop_all(hub, core, namespace, [user])


async def test_unreachable_service_falls_back_to_kubespawner(
    hub_factory, core, namespace, gpu_nodes
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    hub = hub_factory(
        f"""
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
c.GPUShareSpawner.memory_guard = False
c.GPUShareSpawner.queue_url = "http://127.0.0.1:{closed}"
c.GPUShareSpawner.queue_unreachable_timeout = 2
"""
    )
    await gpu_nodes(replicas=2)
    user = unique("f")
    try:
        await request_server(hub, user)
        await wait_event(hub, user, lambda e: "cannot be reached" in e.get("message", ""))
        await wait_ready(hub, user)
    finally:
        await stop_all(hub, core, namespace, [user])
