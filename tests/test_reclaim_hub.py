"""Reclaim, end to end: real hub, proxy, service, scheduler, API server, and the real
jupyterhub-idle-culler from PyPI where it is named.

Every hub here runs z2jh's settings (LocalHub) and the shipped defaults of
reclaim, except the one setting each test is about, made short so that a test
takes a minute rather than an afternoon: the idle time (20 minutes shipped),
the maximum hold time, the culler's timeout. Each such line says so.

Users' activity reaches the hub as it does from jupyterhub-singleuser: a POST
to ``/hub/api/users/:name/activity`` (for the light stand-in servers), or from
a real jupyterhub-singleuser whose kernel is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from datetime import datetime, timezone

import httpx
import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from jupyterhub_gpushare.reclaim import parse_time
from jupyterhub_gpushare.testing.hub import LocalHub
from jupyterhub_gpushare.testing.waiting import wait_for
from tests.conftest import unique
from tests.spawning import (
    position_is,
    request_server,
    server_state,
    service_get,
    stop_all,
    user_token,
    wait_event,
    wait_ready,
)

pytestmark = [pytest.mark.cluster, pytest.mark.hub]

# light stand-in servers; reclaim on, with its shipped defaults but for `extra`
STANDIN = """
import sys
c.GPUShareSpawner.memory_guard = False
c.KubeSpawner.cmd = [sys.executable, "-m", "jupyterhub_gpushare.testing.standin_server"]
c.KubeSpawner.args = []
# what a class offers: so logging in shows the choice, not a spawn
c.KubeSpawner.profile_list = [
    {"display_name": "GPU", "slug": "gpu", "default": True},
    {"display_name": "CPU only", "slug": "cpu", "kubespawner_override": {"gpu_slices": 0}},
]
c.Reclaimer.enabled = True
"""
# the setting these tests are about: 20 minutes shipped, 30 s here
SHORT_IDLE = "c.Reclaimer.idle_seconds = 30\n"


def hub_with(hub_factory, extra: str = "") -> LocalHub:
    # Reclaimer settings come before configure(c), which forwards them to the
    # service and grants its scopes (z2jh: hub.config, or an earlier extraConfig)
    return hub_factory("", before_configure=STANDIN + extra)


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).isoformat().replace("+00:00", "Z")


async def report_activity(hub: LocalHub, user: str, server: str = "") -> None:
    """What jupyterhub-singleuser sends the hub every JUPYTERHUB_ACTIVITY_INTERVAL."""
    now = iso(time.time())
    async with hub.api_client() as api:
        response = await api.post(
            f"/users/{user}/activity",
            json={"last_activity": now, "servers": {server: {"last_activity": now}}},
        )
    response.raise_for_status()


@contextlib.asynccontextmanager
async def keep_active(hub: LocalHub, users: list[str], every: float = 3.0):
    """Users at work: their servers report activity every few seconds."""

    async def pump() -> None:
        while True:
            for user in users:
                await report_activity(hub, user)
            await asyncio.sleep(every)

    task = asyncio.ensure_future(pump())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def holders(hub: LocalHub, admin: str) -> dict[str, dict]:
    """Every hub user's GPU server as the admins' nodes API shows it, by user."""
    nodes = (await service_get(hub, "api/nodes", admin))["nodes"]
    return {h["user"]: h for n in nodes for h in n["holders"] if h.get("user")}


def log_of(hub: LocalHub) -> str:
    return hub.component.log_path.read_text(errors="replace")


def errors_in(log: str) -> list[str]:
    """Error lines and tracebacks (the hub's log holds the service's and the culler's)."""
    return [
        line
        for line in log.splitlines()
        if line.startswith("[E ") or "Traceback" in line or " ERROR " in line
    ]


async def next_visit(hub: LocalHub, user: str) -> tuple[str, str]:
    """What a user without a server sees logging in (the spawn page, with its
    profiles), and the hub's home page."""
    browser = await hub.login(user)
    try:
        landing = await browser.get("/hub/")
        assert "/hub/spawn" in str(landing.url), landing.url  # a choice, not a spawn
        return landing.text, (await browser.get("/hub/home")).text
    finally:
        await browser.aclose()


async def home_of(hub: LocalHub, user: str) -> str:
    browser = await hub.login(user)
    try:
        return (await browser.get("/hub/home")).text
    finally:
        await browser.aclose()


async def test_idle_holders_are_reclaimed_for_waiting_users_and_only_then(
    hub_factory, core, namespace, gpu_nodes
):
    hub = hub_with(hub_factory, SHORT_IDLE)
    await gpu_nodes(replicas=4)
    idle_long, idle_less = unique("idle-long"), unique("idle-less")
    busy = [unique("busy"), unique("busy")]
    waiting = [unique("wait"), unique("wait")]
    admin = await user_token(hub, "admin")
    everyone = [idle_long, idle_less, *busy, *waiting]
    started_at = time.time()
    try:
        for user in (idle_long, idle_less, *busy):
            assert await request_server(hub, user) == 202
            await wait_ready(hub, user)
        async with keep_active(hub, busy):
            # nobody waits: nothing is reclaimed, however long the idle time
            async def idle_twice_over():
                seen = await holders(hub, admin)
                idle = [seen.get(u, {}).get("idle_seconds") or 0 for u in (idle_long, idle_less)]
                return min(idle) > 2 * 30 and seen

            seen = await wait_for(idle_twice_over, 180, "two servers idle twice the idle time")
            assert not seen[idle_long]["reclaim_now"] and seen[idle_long]["waiting"] == 0
            assert seen[idle_long]["reclaim_at"] < time.time()  # it would be, if anyone waited
            assert all(seen[u]["idle_seconds"] < 30 for u in busy)
            for user in (idle_long, idle_less, *busy):
                assert (await server_state(hub, user))["ready"]
            assert "Reclaiming" not in log_of(hub)

            # two users wait: the two idle servers go, the longest idle first
            for i, user in enumerate(waiting):
                await request_server(hub, user)
                # in line, or already served: the reclaim may be quicker than our look
                in_line = position_is(i + 1)
                await wait_event(hub, user, lambda e, f=in_line: f(e) or e.get("ready"))
            for user in waiting:
                await wait_ready(hub, user, timeout=180)
            for user in (idle_long, idle_less):
                await wait_for(lambda u=user: stopped(hub, u), 60, f"{user}'s server to stop")
            for user in busy:
                assert (await server_state(hub, user))["ready"]

        log = log_of(hub)
        reclaims = re.findall(r"Reclaiming (\S+)'s default server \(1 slices on \S+\): idle", log)
        assert reclaims == [idle_long, idle_less], log[-4000:]
        assert errors_in(log.split("gpushare service", 1)[1]) == []

        # the admins' API: who, when, idle for how long, how many waited
        records = (await service_get(hub, "api/reclaims", admin))["reclaims"]
        ours = {r["user"]: r for r in records if r["user"] in everyone}
        assert set(ours) == {idle_long, idle_less}
        for record in ours.values():
            assert record["outcome"] == "stopped" and record["reason"] == "idle"
            assert record["idle_seconds"] >= 30 and started_at <= record["at"] <= time.time()
            assert record["waiting"] >= 1
        assert ours[idle_long]["waiting"] == 2

        # a user reads only their own, with no node names
        mine = await service_get(hub, "api/reclaims", await user_token(hub, idle_less))
        assert [r["user"] for r in mine["reclaims"]] == [idle_less]
        assert "node" not in mine["reclaims"][0]

        # the reclaimed users see why on their next visit to the hub
        for page in await next_visit(hub, idle_long):
            assert "was stopped" in page and "to free its GPU slice" in page
            assert "it had been idle for 1 minute while 2 people waited" in page
            assert "Your files are kept" in page
        assert "gpushare-reclaimed" not in await home_of(hub, busy[0])

        # and the metrics count them
        metrics = (await service_get(hub, "metrics", admin))["text"]
        assert (
            'jupyterhub_gpushare_servers_reclaimed_total{outcome="stopped",reason="idle"} 2.0'
            in metrics
        )
        assert await idle_slice_seconds(hub, admin) > 0

        # the notice is kept in the spawner's state: a restart of the hub keeps it
        await asyncio.to_thread(hub.restart)
        _, home = await next_visit(hub, idle_less)
        assert "while 1 person waited" in home or "while 2 people waited" in home
    finally:
        await stop_all(hub, core, namespace, everyone)


async def test_dry_run_names_who_would_go_and_stops_nobody(hub_factory, core, namespace, gpu_nodes):
    hub = hub_with(hub_factory, SHORT_IDLE + "c.Reclaimer.dry_run = True\n")
    await gpu_nodes(replicas=2)
    idle = [unique("idle"), unique("idle")]
    waiter = unique("wait")
    admin = await user_token(hub, "admin")
    try:
        for user in idle:
            await request_server(hub, user)
            await wait_ready(hub, user)
        await request_server(hub, waiter)
        await wait_event(hub, waiter, position_is(1, 1))

        async def reported():
            return re.search(r"Dry run: would reclaim (\S+)'s default server", log_of(hub))

        found = await wait_for(reported, 180, "the dry run to name a server")
        assert found.group(1) == idle[0]  # the longest idle
        seen = await holders(hub, admin)
        assert seen[idle[0]]["reclaim_now"] and not seen[idle[1]]["reclaim_now"]
        records = (await service_get(hub, "api/reclaims", admin))["reclaims"]
        assert [(r["user"], r["outcome"]) for r in records] == [(idle[0], "dry-run")]
        # the service goes on deciding, with the idle slices and the waiting user, for
        # as long again as a real reclaim takes at most: still nobody is stopped
        before = await idle_slice_seconds(hub, admin)
        policy_check_and_stop = 30 + 2 * 2 + 30  # activity refresh, two turns, one stop

        async def decided_on():
            return await idle_slice_seconds(hub, admin) - before >= 2 * policy_check_and_stop

        await wait_for(decided_on, 240, "the service to go on with the idle servers")
        for user in idle:
            assert (await server_state(hub, user))["ready"]
        assert (await server_state(hub, waiter))["pending"] == "spawn"
        assert log_of(hub).count("Dry run: would reclaim") == 1
        assert "Reclaiming" not in log_of(hub)
    finally:
        await stop_all(hub, core, namespace, [*idle, waiter])


async def stopped(hub: LocalHub, user: str) -> bool:
    return await server_state(hub, user) is None


async def idle_slice_seconds(hub: LocalHub, admin: str) -> float:
    """The service's count of slice-seconds held idle while someone waited."""
    metrics = (await service_get(hub, "metrics", admin))["text"]
    found = re.search(r"^jupyterhub_gpushare_idle_slices_held_seconds_total (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


# -- exempt and busy users ------------------------------------------------------------------

# a real JupyterLab server whose kernel works; it tells the hub of its activity
# every JUPYTERHUB_ACTIVITY_INTERVAL, 300 s shipped: scaled down with the idle time
LAB_PROFILES = """
import os
c.KubeSpawner.profile_list = [
    {"display_name": "GPU", "slug": "gpu", "default": True},
    {"display_name": "GPU with JupyterLab", "slug": "lab", "kubespawner_override": {
        "cmd": ["jupyterhub-singleuser"],
        "args": ["--allow-root"] if os.geteuid() == 0 else [],
        "environment": {"JUPYTERHUB_ACTIVITY_INTERVAL": "5"},
    }},
]
"""
# a training loop that reports progress, as most do
TRAINING = (
    "import time\nfor step in range(10**6):\n    print('step', step, flush=True)\n    time.sleep(2)"
)


def kernel_message(msg_type: str, content: dict) -> str:
    import uuid

    return json.dumps(
        {
            "header": {
                "msg_id": uuid.uuid4().hex,
                "username": "test",
                "session": uuid.uuid4().hex,
                "msg_type": msg_type,
                "version": "5.3",
                "date": iso(time.time()),
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": "shell",
            "buffers": [],
        }
    )


async def busy_kernel(hub: LocalHub, user: str) -> str:
    """Start a kernel on the user's JupyterLab server and set it working; its id."""
    headers = {"Authorization": f"token {hub.api_token}"}
    async with httpx.AsyncClient(timeout=60, headers=headers) as http:
        response = await http.post(f"{hub.url}/user/{user}/api/kernels", json={})
        response.raise_for_status()
        kernel = response.json()["id"]
    url = f"ws://127.0.0.1:{hub.port}/user/{user}/api/kernels/{kernel}/channels"
    socket = await websocket_connect(HTTPRequest(url, headers=headers))
    try:
        await socket.write_message(
            kernel_message(
                "execute_request",
                {
                    "code": TRAINING,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
            )
        )

        async def first_output() -> None:
            while True:
                message = json.loads(await socket.read_message())
                if message["msg_type"] == "stream" and "step" in message["content"]["text"]:
                    return

        await asyncio.wait_for(first_output(), 120)
    finally:
        socket.close()  # the kernel keeps working with nobody watching
    return kernel


async def test_exempt_and_busy_users_are_never_reclaimed(hub_factory, core, namespace, gpu_nodes):
    hub = hub_with(hub_factory, SHORT_IDLE + 'c.Reclaimer.exempt_users = {"prof"}\n' + LAB_PROFILES)
    await gpu_nodes(replicas=2)
    worker, waiter = unique("worker"), unique("wait")
    admin = await user_token(hub, "admin")
    try:
        await request_server(hub, "prof")
        await wait_ready(hub, "prof")
        await request_server(hub, worker, {"profile": "lab"})
        await wait_ready(hub, worker, timeout=180)
        kernel = await busy_kernel(hub, worker)
        await request_server(hub, waiter)
        await wait_event(hub, waiter, position_is(1, 1))

        # the exempt server idles on, the busy kernel works, and the line waits
        async def both_judged():
            seen = await holders(hub, admin)
            return (seen.get("prof", {}).get("idle_seconds") or 0) > 3 * 30 and seen

        seen = await wait_for(both_judged, 240, "the exempt server idle three times over")
        assert seen["prof"]["exempt"] == "exempt user" and seen["prof"]["reclaim_at"] is None
        assert seen[worker]["waiting"] == 1
        # the hub sees the working kernel's server active (it reports every 5 s)
        last = (await server_state(hub, worker))["last_activity"]
        assert time.time() - parse_time(last) < 30
        assert (await server_state(hub, waiter))["pending"] == "spawn"
        for user in ("prof", worker):
            assert (await server_state(hub, user))["ready"]
        assert "Reclaiming" not in log_of(hub)

        # the kernel stops working: now its server goes idle and is reclaimed for
        # the waiting user (so the line above could have moved, had anyone been idle)
        headers = {"Authorization": f"token {hub.api_token}"}
        async with httpx.AsyncClient(timeout=60, headers=headers) as http:
            response = await http.post(f"{hub.url}/user/{worker}/api/kernels/{kernel}/interrupt")
            assert response.status_code == 204
        await wait_ready(hub, waiter, timeout=240)
        await wait_for(lambda: stopped(hub, worker), 60, f"{worker}'s server to stop")
        assert (await server_state(hub, "prof"))["ready"]
        reclaimed = re.findall(r"Reclaiming (\S+)'s default server", log_of(hub))
        assert reclaimed == [worker]
    finally:
        await stop_all(hub, core, namespace, ["prof", worker, waiter])


# -- the bound on the wait -----------------------------------------------------------------


async def test_the_upper_bound_shown_to_a_waiting_user_holds(
    hub_factory, core, namespace, gpu_nodes
):
    # the setting under test: a maximum hold time (off when shipped), short
    hub = hub_with(hub_factory, "c.Reclaimer.max_hold_seconds = 60\n")
    await gpu_nodes(replicas=1)
    holder, waiter = unique("marathon"), unique("wait")
    admin = await user_token(hub, "admin")
    try:
        await request_server(hub, holder)
        await wait_ready(hub, holder)
        async with keep_active(hub, [holder]):  # at work the whole time: never idle
            await request_server(hub, waiter)
            event = await wait_event(hub, waiter, lambda e: "at most" in e.get("message", ""))
            shown = re.search(
                r"Estimated wait: (about [^,]+, )?at most (\d+) minutes?", event["message"]
            )
            assert shown, event["message"]

            async def entry():
                entries = (await service_get(hub, "api/queue", admin))["entries"]
                return next((e for e in entries if e["user"] == waiter), None)

            bound_at = (await entry())["eta_bound_at"]
            # what the page said, rounded up to whole minutes, is no earlier
            assert time.time() + int(shown.group(2)) * 60 >= bound_at - 1

            async def admitted():
                found = await entry()
                return found is None or found["state"] != "waiting"

            await wait_for(admitted, 300, "the waiting user to be admitted", interval=0.2)
            assert time.time() <= bound_at, (time.time(), bound_at)
        await wait_ready(hub, waiter, timeout=120)
        record = next(
            r
            for r in (await service_get(hub, "api/reclaims", admin))["reclaims"]
            if r["user"] == holder
        )
        assert record["reason"] == "max-hold" and record["idle_seconds"] < 30
        assert "it had held its GPU slice for 1 minute" in (await next_visit(hub, holder))[1]
    finally:
        await stop_all(hub, core, namespace, [holder, waiter])


# -- beside the real idle culler ---------------------------------------------------------------

# z2jh's culler service and role (its jupyterhub_config.py), with the culler's
# timeout as short as the reclaim idle time: the two race for the same servers
CULLER = """
import sys
c.JupyterHub.services.append({
    "name": "jupyterhub-idle-culler",
    "command": [sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=30", "--cull-every=5"],
})
c.JupyterHub.load_roles.append({
    "name": "jupyterhub-idle-culler",
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    "services": ["jupyterhub-idle-culler"],
})
"""


async def test_beside_the_idle_culler_no_server_is_stopped_twice(
    hub_factory, core, namespace, gpu_nodes
):
    hub = hub_with(hub_factory, SHORT_IDLE + CULLER)
    await gpu_nodes(replicas=3)
    idle = [unique("idle") for _ in range(3)]
    waiting = [unique("wait") for _ in range(3)]
    try:
        for user in idle:
            await request_server(hub, user)
            await wait_ready(hub, user)
        for user in waiting:
            await request_server(hub, user)
        for user in waiting:
            await wait_ready(hub, user, timeout=240)
        for user in idle:
            await wait_for(lambda u=user: stopped(hub, u), 60, f"{user}'s server to stop")

        log = log_of(hub)
        for user in idle:
            # the hub's own line for every stop of a spawner: once per server
            assert len(re.findall(rf"Stopping {re.escape(user)}$", log, re.M)) == 1, user
        by_us = set(re.findall(r"Reclaimed (\S+)'s default server", log))
        by_culler = set(re.findall(r"Culling server (\S+) \(inactive", log))
        assert by_us | by_culler >= set(idle)
        assert "jupyterhub_idle_culler" in log  # the culler ran, and logged
        assert errors_in(log.split("gpushare service", 1)[1]) == []
    finally:
        await stop_all(hub, core, namespace, [*idle, *waiting])
