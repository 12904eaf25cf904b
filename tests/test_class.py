"""The queue for a real class, on z2jh's and JupyterHub's shipped defaults.

Real hub, proxy, service, scheduler and API server; the hub runs with the
settings the zero-to-jupyterhub chart gives it (concurrent_spawn_limit 64,
servers that survive a hub restart, ...). Servers are the light stand-in.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from jupyterhub_gpushare.fairqueue import BIGGER_FIRST
from jupyterhub_gpushare.testing.waiting import wait_for
from tests.conftest import unique
from tests.spawning import (
    position_is,
    request_server,
    server_state,
    service_get,
    stop_all,
    stop_server,
    user_pod,
    user_token,
    wait_event,
    wait_ready,
)
from tests.test_queue import blocker_pod, service_pid

pytestmark = [pytest.mark.cluster, pytest.mark.hub]

RTX = "NVIDIA-GeForce-RTX-5090-SHARED"
HUB_CONFIG = f"""
import sys
c.GPUShareSpawner.memory_guard = False
c.JupyterHub.allow_named_servers = True
c.KubeSpawner.cmd = [sys.executable, "-m", "jupyterhub_gpushare.testing.standin_server"]
c.KubeSpawner.args = []
c.KubeSpawner.profile_list = [
    {{"display_name": "CPU only", "slug": "cpu", "kubespawner_override": {{"gpu_slices": 0}}}},
    {{"display_name": "Any GPU", "slug": "any", "default": True}},
    {{"display_name": "RTX 5090", "slug": "rtx",
     "kubespawner_override": {{"node_selector": {{"nvidia.com/gpu.product": "{RTX}"}}}}}},
    {{"display_name": "Two slices", "slug": "two", "kubespawner_override": {{"gpu_slices": 2}}}},
]
"""


@pytest.fixture(scope="module")
def hub(hub_factory):
    return hub_factory(HUB_CONFIG)


async def queue_states(hub, admin_token: str) -> dict[str, str]:
    entries = (await service_get(hub, "api/queue", admin_token))["entries"]
    return {e["user"]: e["state"] for e in entries}


async def test_hub_restart_drops_no_slice_and_keeps_places(hub_factory, core, namespace, gpu_nodes):
    hub = hub_factory(HUB_CONFIG)
    await gpu_nodes(replicas=4)
    running = [unique("run") for _ in range(4)]
    dropped = [unique("drop") for _ in range(2)]
    newcomer = unique("new")
    admin = await user_token(hub, "admin")
    try:
        for user in running:
            assert await request_server(hub, user) == 202
        for user in running:
            await wait_ready(hub, user)
        pods = {u: (await user_pod(core, namespace, u)).metadata.uid for u in running}
        for i, user in enumerate(dropped):
            await request_server(hub, user)
            await wait_event(hub, user, position_is(i + 1, i + 1))

        # helm upgrade: the hub gets SIGTERM and starts again on the same database
        await asyncio.to_thread(hub.restart)
        admin = await user_token(hub, "admin")

        # the running servers were not touched
        for user in running:
            assert (await server_state(hub, user))["ready"]
            assert (await user_pod(core, namespace, user)).metadata.uid == pods[user]
        # the hub dropped the two pending spawns; the service holds their places
        # and books nothing for them
        await wait_for(
            lambda: _states_are(hub, admin, dict.fromkeys(dropped, "held")),
            60,
            "the dropped spawns' places to be held",
        )
        capacity = await service_get(hub, "api/capacity", admin)
        assert capacity["pools"][0]["slices_booked"] == 0

        await request_server(hub, newcomer)
        await wait_event(hub, newcomer, position_is(1, 1))
        # a dropped user starts again within the grace period: the old place,
        # ahead of the newcomer, and the page says so
        await request_server(hub, dropped[0])
        event = await wait_event(hub, dropped[0], position_is(1, 2))
        assert "You kept your place in line from before the hub restarted" in event["message"]
        await wait_event(hub, newcomer, position_is(2, 2))

        # freed slices go to them in that order; the other held place blocks nobody
        await stop_server(hub, core, namespace, running[0])
        await wait_ready(hub, dropped[0])
        await stop_server(hub, core, namespace, running[1])
        # well within one reservation period (120 s): nothing held a slice for a ghost
        await wait_ready(hub, newcomer, timeout=60)
    finally:
        await stop_all(hub, core, namespace, [*running, *dropped, newcomer])


async def _states_are(hub, admin: str, wanted: dict[str, str]) -> bool:
    states = await queue_states(hub, admin)
    return all(states.get(user) == state for user, state in wanted.items())


async def test_an_early_product_request_goes_before_a_later_generic_one(
    hub, core, namespace, gpu_nodes
):
    node = await gpu_nodes(replicas=2)  # a shared RTX 5090, usable by both profiles
    blockers = [unique("blocker"), unique("blocker")]
    for blocker in blockers:
        await core.create_namespaced_pod(namespace, blocker_pod(blocker, node))
    early, late = unique("rtx"), unique("any")
    try:
        await request_server(hub, early, {"profile": "rtx"})
        await wait_event(hub, early, position_is(1, 1))
        await request_server(hub, late, {"profile": "any"})
        # one line for both: the generic request is behind the earlier RTX one
        await wait_event(hub, late, position_is(2, 2))
        # one slice frees: it goes to the earlier request
        await core.delete_namespaced_pod(blockers[0], namespace, grace_period_seconds=0)
        await wait_ready(hub, early)
        await wait_event(hub, late, position_is(1, 1))
    finally:
        await core.delete_namespaced_pod(blockers[1], namespace, grace_period_seconds=0)
        await stop_all(hub, core, namespace, [early, late])


async def test_one_gpu_server_per_user_with_named_servers(hub, core, namespace, gpu_nodes):
    await gpu_nodes(replicas=4)
    alice, bob = unique("alice"), unique("bob")
    try:
        await request_server(hub, alice)
        await wait_ready(hub, alice)
        async with hub.api_client() as api:
            response = await api.post(f"/users/{alice}/servers/second", json={"profile": "any"})
        assert response.status_code == 202
        event = await wait_event(hub, alice, lambda e: e.get("failed"), server="second")
        assert "Each user may have one GPU server at a time" in event["message"]
        assert "your default server" in event["message"]
        assert "Traceback" not in event["message"]
        # a CPU-only server does not count, and other users still get slices
        async with hub.api_client() as api:
            response = await api.post(f"/users/{alice}/servers/notes", json={"profile": "cpu"})
        assert response.status_code in (201, 202)
        await wait_ready(hub, alice, server="notes")
        await request_server(hub, bob)
        await wait_ready(hub, bob)
    finally:
        async with hub.api_client() as api:
            for server in ("second", "notes"):
                await api.request(
                    "DELETE", f"/users/{alice}/servers/{server}", json={"remove": True}
                )
        await stop_all(hub, core, namespace, [alice, bob])


async def test_a_head_that_needs_two_slices_is_told_why(hub, core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=4)
    blocker = unique("blocker")
    await core.create_namespaced_pod(namespace, blocker_pod(blocker, node, slices=3))
    two, one = unique("two"), unique("one")
    reader = await user_token(hub, unique("reader"))
    try:
        await request_server(hub, two, {"profile": "two"})
        event = await wait_event(hub, two, position_is(1, 1))
        assert "1 slice is free, but this server needs 2 on one GPU node" in event["message"]
        await request_server(hub, one, {"profile": "any"})
        event = await wait_event(hub, one, position_is(2, 2))
        assert BIGGER_FIRST in event["message"]

        # a booking (an admitted spawn whose pod is not bound yet) is not free
        # for anyone: not on the spawn page, not in the API, not in the metrics
        booked = {
            "id": unique("booked"),
            "user": unique("someone"),
            "slices": 1,
            "pool": {"resource": "nvidia.com/gpu", "selector": {}},
            "requested_at": time.time() - 3600,  # first in line
        }
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(
                f"{hub.url}/services/gpushare/api/tickets",
                json=booked,
                headers={"X-Gpushare-Hub-Secret": hub.queue_secret},
            )
            assert response.json()["state"] == "admitted"
            try:
                event = await wait_event(hub, one, lambda e: "0 of 4 slices free" in e["message"])
                pool = (await service_get(hub, "api/capacity", reader))["pools"][0]
                assert (pool["slices_free"], pool["slices_booked"]) == (0, 1)
                admin = await user_token(hub, "admin")
                nodes = (await service_get(hub, "api/nodes", admin))["nodes"]
                mine = next(n for n in nodes if n["name"] == node)
                assert (mine["slices_free"], mine["slices_booked"]) == (0, 1)
                metrics = (
                    await http.get(
                        f"{hub.url}/services/gpushare/metrics",
                        headers={"Authorization": f"token {admin}"},
                    )
                ).text
                assert (
                    f'node="{node}",product="{RTX}",resource="nvidia.com/gpu",state="free"}} 0.0'
                    in metrics
                )
                assert (
                    f'node="{node}",product="{RTX}",resource="nvidia.com/gpu",state="booked"}} 1.0'
                    in metrics
                )
            finally:
                await http.delete(
                    f"{hub.url}/services/gpushare/api/tickets/{booked['id']}",
                    headers={"X-Gpushare-Hub-Secret": hub.queue_secret},
                )
    finally:
        await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
        await stop_all(hub, core, namespace, [two, one])


STATE_FILE_PROBLEMS = {
    # a path nobody can write, root included (a read-only or missing volume)
    "read-only": (
        'c.QueueStore.state_file = "/proc/gpushare/gpushare-queue.json"\n',
        "Cannot write the queue state",
    ),
    # every write fails with ENOSPC, as on a full disk (the file the service
    # writes first is /dev/full)
    "full": (
        "c.QueueStore.state_file = {path!r}\n",
        "Cannot write the queue state",
    ),
    "wrong shape": (
        "c.QueueStore.state_file = {path!r}\n",
        "holds no list of tickets",
    ),
}


@pytest.mark.parametrize("problem", list(STATE_FILE_PROBLEMS))
async def test_the_queue_works_whatever_its_state_file(
    problem, hub_factory, core, namespace, gpu_nodes, tmp_path
):
    before, logged = STATE_FILE_PROBLEMS[problem]
    path = tmp_path / "gpushare-queue.json"
    if problem == "wrong shape":
        path.write_text(json.dumps({"tickets": {"not": "a list"}}))
    if problem == "full":
        (tmp_path / "gpushare-queue.json.tmp").symlink_to("/dev/full")
    hub = hub_factory(HUB_CONFIG, before_configure=before.format(path=str(path)))
    await gpu_nodes(replicas=1)
    first, second = unique("first"), unique("second")
    try:
        await request_server(hub, first)
        await wait_ready(hub, first)
        await request_server(hub, second)
        await wait_event(hub, second, position_is(1, 1))
        await stop_server(hub, core, namespace, first)
        await wait_ready(hub, second)
        log = hub.component.log_path.read_text(errors="replace")
        assert log.count(logged) == 1, log[-4000:]
        assert service_pid(hub) is not None
        assert "Traceback" not in log.split("gpushare service", 1)[1]
    finally:
        await stop_all(hub, core, namespace, [first, second])
