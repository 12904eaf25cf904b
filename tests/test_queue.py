"""The fair queue, end to end: real hub, real service, real cluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import httpx
import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from jupyterhub_gpushare.testing.waiting import wait_for
from tests.conftest import unique
from tests.spawning import (
    position_is,
    request_server,
    server_state,
    stop_all,
    stop_server,
    user_token,
    wait_event,
    wait_ready,
)

pytestmark = [pytest.mark.cluster, pytest.mark.hub]

HUB_CONFIG = """
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
c.GPUShareSpawner.memory_guard = False
c.KubeSpawner.profile_list = [
    {"display_name": "Any GPU", "slug": "any", "default": True},
    {"display_name": "RTX", "slug": "rtx",
     "kubespawner_override": {"node_selector": {"gpushare.dev/pool": "rtx"}}},
    {"display_name": "H200", "slug": "h200",
     "kubespawner_override": {"node_selector": {"gpushare.dev/pool": "h200"}}},
]
"""


@pytest.fixture(scope="module")
def hub(hub_factory):
    return hub_factory(HUB_CONFIG)


def blocker_pod(name: str, node: str, slices: int = 1) -> dict:
    """A GPU pod that is not the hub's: a light stand-in server (no command)."""
    return {
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [
                {
                    "name": "job",
                    "image": "training-job",
                    "ports": [{"containerPort": 8080}],
                    "resources": {"limits": {"nvidia.com/gpu": str(slices)}},
                }
            ],
        },
    }


async def capacity(hub) -> dict:
    token = await user_token(hub, "capacity-reader")
    async with httpx.AsyncClient(headers={"Authorization": f"token {token}"}) as http:
        response = await http.get(f"{hub.url}/services/gpushare/api/capacity")
    response.raise_for_status()
    return response.json()


async def test_six_users_four_slices(hub, core, namespace, gpu_nodes):
    await gpu_nodes(replicas=4)
    users = [unique("u") for _ in range(6)]
    try:
        for user in users[:4]:
            assert await request_server(hub, user) == 202
        for user in users[:4]:
            await wait_ready(hub, user)
        await request_server(hub, users[4])
        await wait_event(hub, users[4], position_is(1, 1))
        await request_server(hub, users[5])
        event = await wait_event(hub, users[5], position_is(2, 2))
        assert "0 of 4 slices free" in event["message"]
        assert '<span class="gpushare-position"' in event["html_message"]
        event = await wait_event(hub, users[4], position_is(1, 2))
        assert "0 of 4 slices free" in event["message"]

        await stop_server(hub, core, namespace, users[0])
        await wait_ready(hub, users[4])
        await wait_event(hub, users[5], position_is(1, 1))
        assert (await server_state(hub, users[5]))["ready"] is False
    finally:
        await stop_all(hub, core, namespace, users)


async def test_stop_while_waiting_moves_everyone_up(hub, core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=1)
    blocker = unique("blocker")
    await core.create_namespaced_pod(namespace, blocker_pod(blocker, node))
    users = [unique("w") for _ in range(3)]
    try:
        for i, user in enumerate(users):
            await request_server(hub, user)
            await wait_event(hub, user, position_is(i + 1))
        # Stop Server on the pending page is a DELETE of the server
        async with hub.api_client() as api:
            response = await api.delete(f"/users/{users[0]}/server")
        assert response.status_code in (202, 204)
        await wait_event(hub, users[1], position_is(1, 2))
        await wait_event(hub, users[2], position_is(2, 2))
        await wait_for(lambda: _not_pending(hub, users[0]), 30, "the stopped spawn to end")
    finally:
        await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
        await stop_all(hub, core, namespace, users)


async def _not_pending(hub, user) -> bool:
    return await server_state(hub, user) is None


async def test_two_pools_have_independent_lines(hub, core, namespace, gpu_nodes):
    rtx = await gpu_nodes(replicas=1, labels={"gpushare.dev/pool": "rtx"})
    await gpu_nodes(replicas=2, product="NVIDIA-H200", labels={"gpushare.dev/pool": "h200"})
    blocker = unique("blocker")
    await core.create_namespaced_pod(namespace, blocker_pod(blocker, rtx))
    rtx_users = [unique("r") for _ in range(2)]
    h200_user = unique("h")
    try:
        for i, user in enumerate(rtx_users):
            await request_server(hub, user, {"profile": "rtx"})
            await wait_event(hub, user, position_is(i + 1))
        # the H200 line is empty: this spawn goes straight through
        await request_server(hub, h200_user, {"profile": "h200"})
        await wait_ready(hub, h200_user)
        event = await wait_event(hub, rtx_users[1], position_is(2, 2))
        assert "0 of 1 slices free on NVIDIA GeForce RTX 5090" in event["message"]
    finally:
        await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
        await stop_all(hub, core, namespace, [*rtx_users, h200_user])


async def test_slices_of_other_workloads_count(hub, core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=4)
    blocker = unique("training")
    await core.create_namespaced_pod(namespace, blocker_pod(blocker, node, slices=3))
    try:

        async def free_is_one():
            pools = (await capacity(hub))["pools"]
            pool = next(p for p in pools if p["key"] == "nvidia.com/gpu")
            return pool if pool["slices_free"] == 1 else None

        pool = await wait_for(free_is_one, 30, "capacity to show 1 free slice")
        assert pool["slices_total"] == 4 and pool["slices_used"] == 3
    finally:
        await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)


def service_pid(hub) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"jupyterhub_gpushare.service" in cmdline and cwd == str(hub.run_dir):
            return int(entry.name)
    return None


async def test_service_killed_while_ten_wait(hub, core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=1)
    blocker = unique("blocker")
    await core.create_namespaced_pod(namespace, blocker_pod(blocker, node))
    users = [unique("k") for _ in range(10)]
    try:
        for i, user in enumerate(users):
            await request_server(hub, user)
            await wait_event(hub, user, position_is(i + 1, i + 1))
        old = service_pid(hub)
        assert old is not None
        os.kill(old, signal.SIGKILL)

        async def restarted():
            pid = service_pid(hub)
            return pid if pid not in (None, old) else None

        await wait_for(restarted, 90, "the hub to restart the service")
        # same order after the restart
        for i, user in enumerate(users):
            await wait_event(hub, user, position_is(i + 1, 10), timeout=60)
        # free the slice: only the first in line may get it
        await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
        await wait_ready(hub, users[0])
        await wait_event(hub, users[1], position_is(1, 9))
        pods = await core.list_namespaced_pod(
            namespace, label_selector="component=singleuser-server"
        )
        holders = [p for p in pods.items if p.spec.node_name == node and p.status.phase != "Failed"]
        assert len(holders) == 1  # the one slice is booked once
        await stop_server(hub, core, namespace, users[0])
        await wait_ready(hub, users[1])
    finally:
        with contextlib.suppress(ApiException):
            await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
        await stop_all(hub, core, namespace, users)


async def test_queue_recovers_after_api_server_restart(hub, cluster, core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=1)
    blocker = unique("blocker")
    await core.create_namespaced_pod(namespace, blocker_pod(blocker, node))
    users = [unique("a") for _ in range(2)]
    try:
        for i, user in enumerate(users):
            await request_server(hub, user)
            await wait_event(hub, user, position_is(i + 1))
        await asyncio.get_running_loop().run_in_executor(None, cluster.restart_apiserver)
        await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
        await wait_ready(hub, users[0], timeout=120)
        await wait_event(hub, users[1], position_is(1, 1), timeout=60)
    finally:
        with contextlib.suppress(ApiException):
            await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
        await stop_all(hub, core, namespace, users)
