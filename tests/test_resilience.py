"""Resilience: a storm of spawns, a killed service, a restarted API server, a
restarting device plugin and a slow API server. Fixed counts, bounded time.

Servers here are the light stand-in (jupyterhub_gpushare.testing.standin_server), so a
hundred users fit on a two-core machine; the hub, proxy, service, scheduler and
API server are all real.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sys

import httpx
import pytest

from jupyterhub_gpushare.testing.hub import LocalHub
from jupyterhub_gpushare.testing.kubelet import FAIL_ADMISSION_ANNOTATION
from jupyterhub_gpushare.testing.slowproxy import SlowProxy, kubeconfig_via
from jupyterhub_gpushare.testing.waiting import wait_for
from tests.conftest import unique
from tests.spawning import (
    position_is,
    request_server,
    server_state,
    stop_all,
    user_token,
    wait_event,
    wait_ready,
)
from tests.test_queue import service_pid

pytestmark = [pytest.mark.cluster, pytest.mark.hub]

SLICES = 8
# a class: more users press Start at once than z2jh's concurrent_spawn_limit (64)
CLASS_USERS = 150
STORM_USERS = 100  # the variants with failures, on fewer users to bound their time
CANCELLED = 30

HUB_CONFIG = f"""
c.GPUShareSpawner.memory_guard = False
c.KubeSpawner.profile_list = [
    {{"display_name": "One GPU slice", "slug": "gpu", "default": True}},
    {{"display_name": "CPU only", "slug": "cpu", "kubespawner_override": {{"gpu_slices": 0}}}},
]
c.KubeSpawner.cmd = [{sys.executable!r}, "-m", "jupyterhub_gpushare.testing.standin_server"]
c.KubeSpawner.args = []
c.KubeSpawner.environment = {{"PYTHONPATH": {str(os.getcwd())!r}}}
c.JupyterHub.log_level = "INFO"
"""


class Storm:
    """Many users on 8 slices, and the checks every variant must pass."""

    def __init__(self, hub: LocalHub, core, namespace: str, node: str, users: int = STORM_USERS):
        self.hub, self.core, self.namespace, self.node = hub, core, namespace, node
        self.users = [f"s{i:03d}-{unique('x')[-6:]}" for i in range(users)]
        self.statuses: list[int] = []
        self.served: list[str] = []
        self.extra_users: list[str] = []

    async def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        async with self.hub.api_client() as api:
            response = await api.request(method, path, **kwargs)
        self.statuses.append(response.status_code)
        return response

    async def service_queue(self) -> list[dict]:
        """The service's own view of the line (admin API): who waits."""
        return [e for e in await self.service_queue_all() if e["state"] == "waiting"]

    async def service_queue_all(self) -> list[dict]:
        """Every entry of the service's queue, whatever its state."""
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.get(
                f"{self.hub.url}/services/gpushare/api/queue",
                headers={"Authorization": f"token {self.admin_token}"},
            )
        self.statuses.append(response.status_code)
        response.raise_for_status()
        return response.json()["entries"]

    async def ready_users(self) -> set[str]:
        response = await self.api("GET", "/users", params={"state": "ready", "limit": 500})
        return {u["name"] for u in response.json()}

    async def start(self) -> None:
        response = await self.api("POST", "/users", json={"usernames": self.users})
        assert response.status_code in (201, 409)
        # "admin" is in the hub's admin_users
        self.admin_token = await user_token(self.hub, "admin")
        # everybody presses Start at once
        results = await asyncio.gather(
            *(self.api("POST", f"/users/{u}/server") for u in self.users)
        )
        assert all(r.status_code == 202 for r in results), {r.status_code for r in results}

        seen = {}

        async def settled():
            ready = await self.ready_users()
            waiting = await self.service_queue()
            seen.update(ready=len(ready), waiting=len(waiting))
            return (
                (ready, waiting)
                if len(ready) == SLICES and len(waiting) == len(self.users) - SLICES
                else None
            )

        try:
            ready, waiting = await wait_for(
                settled, 180, f"8 running, {len(self.users) - SLICES} in line", interval=1
            )
        except AssertionError as e:
            raise AssertionError(f"{e}; last seen {seen}; {await self.unaccounted()}") from None
        self.served.extend(sorted(ready))
        positions = [e["position"] for e in waiting]
        # unique places 1..N: nobody was turned away (no 429), nobody counted twice
        assert sorted(positions) == list(range(1, len(self.users) - SLICES + 1))
        in_line = sorted(waiting, key=lambda e: e["position"])
        assert [e["requested_at"] for e in in_line] == sorted(e["requested_at"] for e in in_line)

    async def unaccounted(self) -> str:
        """What the users who are neither running nor in line are doing."""
        ready = await self.ready_users()
        entries = {e["user"]: e["state"] for e in (await self.service_queue_all())}
        lost = [u for u in self.users if u not in ready and entries.get(u) != "waiting"]
        pods = await self.core.list_namespaced_pod(
            self.namespace, label_selector="component=singleuser-server"
        )
        phases = {
            p.metadata.annotations.get("hub.jupyter.org/username"): p.status.phase
            for p in pods.items
        }
        states = [
            f"{u}: hub {await server_state(self.hub, u)}, queue {entries.get(u)}, "
            f"pod {phases.get(u)}"
            for u in lost[:5]
        ]
        return f"not running and not in line: {len(lost)} ({'; '.join(states)})"

    async def cpu_user_starts_meanwhile(self) -> None:
        """With everyone in line, a CPU-only server still starts at once."""
        name = unique("cpu")
        await self.api("POST", "/users", json={"usernames": [name]})
        response = await self.api("POST", f"/users/{name}/server", json={"profile": "cpu"})
        assert response.status_code in (201, 202), response.text
        await wait_ready(self.hub, name)
        self.extra_users.append(name)

    async def cancel_some(self) -> None:
        waiting = await self.service_queue()
        victims = random.Random(8).sample([e["user"] for e in waiting], CANCELLED)
        await asyncio.gather(*(self.api("DELETE", f"/users/{u}/server") for u in victims))

        async def moved_up():
            line = await self.service_queue()
            return line if len(line) == len(waiting) - CANCELLED else None

        line = await wait_for(moved_up, 60, "the line to close up", interval=0.5)
        assert sorted(e["position"] for e in line) == list(range(1, len(line) + 1))
        assert not {e["user"] for e in line} & set(victims)
        self.cancelled = set(victims)

    async def check_slices_booked_once(self) -> None:
        pods = await self.core.list_namespaced_pod(
            self.namespace, field_selector=f"spec.nodeName={self.node}"
        )
        holding = [
            p
            for p in pods.items
            if p.status.phase not in ("Succeeded", "Failed")
            and "nvidia.com/gpu" in (p.spec.containers[0].resources.limits or {})
        ]
        assert len(holding) <= SLICES, [p.metadata.name for p in holding]

    async def drain(self, disrupt=None) -> None:
        """Stop holders one by one; each freed slice must go to the head of the line."""
        rounds = 0
        while True:
            line = sorted(await self.service_queue(), key=lambda e: e["position"])
            if not line:
                break
            head = line[0]["user"]
            if disrupt is not None:
                await disrupt(rounds)
            rounds += 1
            ready = await self.ready_users() & set(self.users)
            leaving = sorted(ready)[0]
            await self.api("DELETE", f"/users/{leaving}/server")

            async def head_served(before=ready):
                now = await self.ready_users() & set(self.users)
                new = now - before
                return new if new else None

            new = await wait_for(head_served, 180, f"{head} to get the freed slice", interval=0.5)
            assert new == {head}, (new, head)
            self.served.append(head)
            await self.check_slices_booked_once()

    def check_outcome(self) -> None:
        expected = set(self.users) - self.cancelled
        assert sorted(self.served) == sorted(expected)  # everyone, exactly once
        assert len(self.served) == len(set(self.served))
        assert all(status < 500 for status in self.statuses), sorted(set(self.statuses))
        assert 429 not in self.statuses
        log = self.hub.component.log_path.read_text(errors="replace")
        assert not re.search(r"\] 5\d\d (GET|POST|PATCH|DELETE) ", log)
        assert self.hub.component.running  # the hub never restarted

    async def stop(self) -> None:
        await stop_all(self.hub, self.core, self.namespace, self.users + self.extra_users)


@pytest.fixture
async def storm(hub_factory, core, namespace, gpu_nodes):
    node = await gpu_nodes(gpus=1, replicas=SLICES)
    hub = hub_factory(HUB_CONFIG)
    storm = Storm(hub, core, namespace, node)
    yield storm
    await storm.stop()
    hub.stop()


async def test_a_class_of_150_on_8_slices_at_z2jhs_spawn_limit(
    hub_factory, core, namespace, gpu_nodes
):
    # JupyterHub's concurrent_spawn_limit is z2jh's 64 here (the test hub's
    # default): 150 users press Start at once, and every one gets a place
    node = await gpu_nodes(gpus=1, replicas=SLICES)
    hub = hub_factory(HUB_CONFIG)
    storm = Storm(hub, core, namespace, node, users=CLASS_USERS)
    try:
        await storm.start()
        await storm.cpu_user_starts_meanwhile()
        await storm.cancel_some()
        await storm.drain()
        storm.check_outcome()
    finally:
        await storm.stop()


async def test_storm_with_service_killed_three_times(storm):
    await storm.start()
    await storm.cancel_some()
    kills = {2: None, 10: None, 20: None}

    async def kill_service(round_no: int) -> None:
        if round_no not in kills:
            return
        old = service_pid(storm.hub)
        os.kill(old, signal.SIGKILL)

        async def back():
            pid = service_pid(storm.hub)
            return pid if pid not in (None, old) else None

        await wait_for(back, 90, "the hub to restart the service", interval=0.5)

    await storm.drain(kill_service)
    storm.check_outcome()


async def test_storm_with_api_server_restart(storm, cluster):
    await storm.start()
    await storm.cancel_some()

    async def restart(round_no: int) -> None:
        if round_no == 5:
            await asyncio.get_running_loop().run_in_executor(None, cluster.restart_apiserver)

    await storm.drain(restart)
    storm.check_outcome()


async def test_device_plugin_restart_recreates_rejected_pods(
    hub_factory, core, namespace, gpu_nodes
):
    node = await gpu_nodes(gpus=1, replicas=4)
    hub = hub_factory(HUB_CONFIG)
    holders = [unique("hold") for _ in range(4)]
    waiting = [unique("wait") for _ in range(4)]
    try:
        for user in holders:
            await request_server(hub, user)
        for user in holders:
            await wait_ready(hub, user)
        for i, user in enumerate(waiting):
            await request_server(hub, user)
            await wait_event(hub, user, position_is(i + 1))
        # the device plugin restarts: everything admitted now is rejected
        await core.patch_node(
            node,
            {"metadata": {"annotations": {FAIL_ADMISSION_ANNOTATION: "UnexpectedAdmissionError"}}},
        )
        await stop_all(hub, core, namespace, holders)

        async def rejected():
            pods = await core.list_namespaced_pod(namespace, field_selector=f"spec.nodeName={node}")
            return {
                p.metadata.annotations.get("hub.jupyter.org/username")
                for p in pods.items
                if p.status.reason == "UnexpectedAdmissionError"
            } >= set(waiting) or None

        await wait_for(rejected, 90, "all four admitted pods to be rejected")
        await core.patch_node(
            node, {"metadata": {"annotations": {FAIL_ADMISSION_ANNOTATION: None}}}
        )
        for user in waiting:  # nobody pressed anything
            await wait_ready(hub, user, timeout=120)
    finally:
        await stop_all(hub, core, namespace, holders + waiting)


async def test_slow_api_server(hub_factory, cluster, core, namespace, gpu_nodes, tmp_path):
    proxy = SlowProxy(cluster.apiserver_port, delay=0.15)
    port = await proxy.start()
    slow = kubeconfig_via(cluster.kubeconfig, port, tmp_path / "slow.kubeconfig")
    node = await gpu_nodes(gpus=1, replicas=1)
    hub = hub_factory(HUB_CONFIG, kubeconfig=slow)
    users = [unique("slow") for _ in range(3)]
    try:
        await request_server(hub, users[0])
        await wait_ready(hub, users[0], timeout=120)
        for i, user in enumerate(users[1:]):
            await request_server(hub, user)
            await wait_event(hub, user, position_is(i + 1), timeout=90)
        await stop_all(hub, core, namespace, users[:1])
        await wait_ready(hub, users[1], timeout=120)
        await wait_event(hub, users[2], position_is(1, 1), timeout=90)
        assert node
    finally:
        await stop_all(hub, core, namespace, users)
        await proxy.stop()
