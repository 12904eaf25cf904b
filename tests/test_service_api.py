"""Who may use which endpoint of the gpushare service, and bad requests.

Every endpoint is tried as anonymous, a user, another user, an admin and the
hub; every refusal is a 4xx with a JSON body, never a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

from jupyterhub_gpushare.testing.cluster import free_port
from jupyterhub_gpushare.testing.hub import wait_for_hub_log
from jupyterhub_gpushare.testing.slowproxy import kubeconfig_via
from jupyterhub_gpushare.testing.waiting import wait_for
from tests.spawning import user_token
from tests.test_queue import service_pid

pytestmark = [pytest.mark.cluster, pytest.mark.hub]

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def hub(hub_factory):
    return hub_factory("c.GPUShareSpawner.memory_guard = False\n")


@pytest.fixture(scope="module")
async def callers(hub):
    alice = await user_token(hub, "alice")
    bob = await user_token(hub, "bob")
    admin = await user_token(hub, "admin")
    return {
        "anonymous": {},
        "user": {"Authorization": f"token {alice}"},
        "other-user": {"Authorization": f"token {bob}"},
        "admin": {"Authorization": f"token {admin}"},
        "hub": {"X-Gpushare-Hub-Secret": hub.queue_secret},
    }


def ticket(ticket_id: str, user: str = "alice", **changes) -> dict:
    body = {
        "id": ticket_id,
        "user": user,
        "server": "",
        "slices": 1,
        "pool": {"resource": "nvidia.com/gpu", "selector": {"gpushare.dev/pool": "none"}},
        "requested_at": time.time(),
    }
    body.update(changes)
    return body


async def call(hub, headers, method, path, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"{hub.url}/services/gpushare/", timeout=20) as http:
        return await http.request(method, path, headers=headers, **kwargs)


# (method, path, body, who gets which status)
MATRIX = [
    (
        "GET",
        "api/capacity",
        None,
        {"anonymous": 403, "user": 200, "other-user": 200, "admin": 200, "hub": 200},
    ),
    (
        "GET",
        "api/queue",
        None,
        {"anonymous": 403, "user": 200, "other-user": 200, "admin": 200, "hub": 403},
    ),
    (
        "GET",
        "api/nodes",
        None,
        {"anonymous": 403, "user": 403, "other-user": 403, "admin": 200, "hub": 403},
    ),
    (
        "GET",
        "api/reclaims",
        None,
        {"anonymous": 403, "user": 200, "other-user": 200, "admin": 200, "hub": 200},
    ),
    (
        "GET",
        "api/reclaims?user=alice&since=not-a-time",
        None,
        {"anonymous": 403, "user": 200, "other-user": 200, "admin": 200, "hub": 400},
    ),
    (
        "POST",
        "api/tickets",
        "new",
        {"anonymous": 403, "user": 403, "other-user": 403, "admin": 403, "hub": 201},
    ),
    (
        "GET",
        "api/tickets/matrix-held",
        None,
        {"anonymous": 403, "user": 403, "other-user": 403, "admin": 403, "hub": 200},
    ),
    (
        "GET",
        "metrics",
        None,
        {"anonymous": 403, "user": 403, "other-user": 403, "admin": 200, "hub": 200},
    ),
    (
        "DELETE",
        "api/tickets/matrix-held",
        None,
        {"anonymous": 403, "user": 403, "other-user": 403, "admin": 403, "hub": 200},
    ),
]


@pytest.mark.parametrize(
    "method,path,body,expected", MATRIX, ids=[f"{m} {p}" for m, p, _, _ in MATRIX]
)
async def test_authorization_matrix(hub, callers, method, path, body, expected):
    held = await call(hub, callers["hub"], "POST", "api/tickets", json=ticket("matrix-held"))
    assert held.status_code == 201
    try:
        for who, status in expected.items():
            kwargs = {}
            if body == "new":
                kwargs["json"] = ticket(f"matrix-{who}")
            response = await call(hub, callers[who], method, path, **kwargs)
            assert response.status_code == status, (who, response.text)
            if status >= 400:
                assert response.json()["status"] == status
            if method == "DELETE" and status == 200:
                break  # it is gone now
    finally:
        for who in expected:
            await call(hub, callers["hub"], "DELETE", f"api/tickets/matrix-{who}")
        await call(hub, callers["hub"], "DELETE", "api/tickets/matrix-held")


async def test_events_stream_is_for_the_hub_only(hub, callers):
    for who in ("anonymous", "user", "admin"):
        response = await call(hub, callers[who], "GET", "api/tickets/x/events")
        assert response.status_code == 403
    await call(hub, callers["hub"], "POST", "api/tickets", json=ticket("streamed"))
    try:
        assert (await first_status(hub, "streamed", callers["hub"]))["state"] == "waiting"
    finally:
        await call(hub, callers["hub"], "DELETE", "api/tickets/streamed")


async def first_status(hub, ticket_id: str, headers: dict) -> dict:
    """The first status on a ticket's event stream, as the hub's spawner reads it."""
    async with httpx.AsyncClient(timeout=20) as http:
        async with http.stream(
            "GET", f"{hub.url}/services/gpushare/api/tickets/{ticket_id}/events", headers=headers
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    return json.loads(line[5:])
    raise AssertionError(f"the event stream of {ticket_id} ended without a status")


async def test_a_spawn_slow_to_follow_its_ticket_gets_its_place_back(hub, callers):
    # A hub busy with a class pressing Start at once may follow a ticket later
    # than the service's reconnect time: the place is held, then taken back.
    await call(hub, callers["hub"], "POST", "api/tickets", json=ticket("slow-first"))
    await call(hub, callers["hub"], "POST", "api/tickets", json=ticket("prompt", "bob"))

    async def states():
        entries = (await call(hub, callers["admin"], "GET", "api/queue")).json()["entries"]
        return {e["user"]: (e["state"], e.get("position")) for e in entries}

    async def alice_held():
        now = await states()
        return now if now["alice"][0] == "held" else None

    try:
        async with httpx.AsyncClient(timeout=20) as http:
            # bob's spawn follows its ticket at once, alice's does not yet
            async with http.stream(
                "GET",
                f"{hub.url}/services/gpushare/api/tickets/prompt/events",
                headers=callers["hub"],
            ):
                held = await wait_for(alice_held, 60, "the unfollowed ticket to be held")
                assert held["bob"] == ("waiting", 1)
                first = await first_status(hub, "slow-first", callers["hub"])
                assert (first["state"], first["position"]) == ("waiting", 1)
                now = await states()
                assert (now["alice"], now["bob"]) == (("waiting", 1), ("waiting", 2))
        wait_for_hub_log(hub, r"slow-first: its spawn is back; it waits at its place again")
    finally:
        for ticket_id in ("slow-first", "prompt"):
            await call(hub, callers["hub"], "DELETE", f"api/tickets/{ticket_id}")


async def test_users_never_see_other_users(hub, callers):
    await call(hub, callers["hub"], "POST", "api/tickets", json=ticket("bobs", user="bob"))
    await call(hub, callers["hub"], "POST", "api/tickets", json=ticket("evil", user=EVIL))
    try:
        mine = (await call(hub, callers["user"], "GET", "api/queue")).json()
        assert mine["entries"] == [] and mine["holding"] == [] and mine["reclaims"] == []
        bobs = (await call(hub, callers["other-user"], "GET", "api/queue")).json()
        assert [e["ticket"] for e in bobs["entries"]] == ["bobs"]
        assert "user" not in bobs["entries"][0]
        everyone = (await call(hub, callers["admin"], "GET", "api/queue")).json()
        assert {e["user"] for e in everyone["entries"]} >= {"bob", EVIL}
        capacity = await call(hub, callers["user"], "GET", "api/capacity")
        assert "bob" not in capacity.text and "onerror" not in capacity.text
        # JSON, not HTML: nothing here is ever rendered without escaping
        assert everyone_response_is_json(await call(hub, callers["admin"], "GET", "api/queue"))
    finally:
        await call(hub, callers["hub"], "DELETE", "api/tickets/bobs")
        await call(hub, callers["hub"], "DELETE", "api/tickets/evil")


def everyone_response_is_json(response: httpx.Response) -> bool:
    return response.headers["content-type"].startswith("application/json")


BAD_TICKETS = {
    "missing id": {"id": None},
    "missing user": {"user": None},
    "missing slices": {"slices": None},
    "missing pool": {"pool": None},
    "slices as text": {"slices": "1"},
    "slices as bool": {"slices": True},
    "zero slices": {"slices": 0},
    "huge slices": {"slices": 10**9},
    "huge user": {"user": "x" * 10_000},
    "id with slash": {"id": "a/b"},
    "unknown pool": {"pool": {"resource": "amd.com/gpu", "selector": {}}},
    "selector not a map": {"pool": {"resource": "nvidia.com/gpu", "selector": ["a"]}},
    "time in the future": {"requested_at": time.time() + 10**6},
    "time as text": {"requested_at": "now"},
    "time not finite": {"requested_at": float("inf")},
}


@pytest.mark.parametrize("case", list(BAD_TICKETS))
async def test_bad_ticket_shapes(hub, callers, case):
    body = ticket(f"bad-{len(case)}")
    for key, value in BAD_TICKETS[case].items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    content = (
        httpx.Request("POST", "http://x", json=body).content
        if case != "time not finite"
        else (
            b'{"id": "bad", "user": "a", "slices": 1, "pool": {"resource": "nvidia.com/gpu"}, '
            b'"requested_at": 1e999}'
        )
    )
    headers = {**callers["hub"], "Content-Type": "application/json"}
    response = await call(hub, headers, "POST", "api/tickets", content=content)
    assert response.status_code == 400, response.text
    assert response.json()["status"] == 400
    assert response.json()["message"]


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"'])
async def test_bodies_that_are_not_objects(hub, callers, raw):
    response = await call(hub, callers["hub"], "POST", "api/tickets", content=raw)
    assert response.status_code == 400
    assert "JSON" in response.json()["message"]


async def test_unknown_paths_and_reasons(hub, callers):
    response = await call(hub, callers["user"], "GET", "api/nope")
    assert response.status_code == 404
    assert response.json()["status"] == 404
    response = await call(hub, callers["hub"], "DELETE", "api/tickets/nobody")
    assert response.status_code == 404
    response = await call(hub, callers["hub"], "DELETE", "api/tickets/x?reason=<b>")
    assert response.status_code == 400


async def test_html_username_is_accepted_as_data(hub, callers):
    response = await call(
        hub, callers["hub"], "POST", "api/tickets", json=ticket("html", user=EVIL)
    )
    assert response.status_code == 201
    await call(hub, callers["hub"], "DELETE", "api/tickets/html")


async def test_metrics_in_jupyterhub_style(hub, callers, gpu_nodes):
    node = await gpu_nodes(replicas=4)

    async def scraped():
        text = (await call(hub, callers["admin"], "GET", "metrics")).text
        wanted = f'jupyterhub_gpushare_node_slices{{node="{node}",'
        return text if wanted in text else None

    text = await wait_for(scraped, 30, "the new node in the metrics")
    line = next(
        line
        for line in text.splitlines()
        if line.startswith(f'jupyterhub_gpushare_node_slices{{node="{node}"')
        and 'state="free"' in line
    )
    assert line.endswith(" 4.0")
    # label values exist before the first event, as in JupyterHub's own metrics
    for reason in ("admitted", "cancelled", "timeout", "abandoned"):
        assert f'jupyterhub_gpushare_queue_exits_total{{reason="{reason}"}}' in text
    assert "jupyterhub_gpushare_queue_wait_duration_seconds_bucket" in text
    assert "jupyterhub_gpushare_cluster_view_ready 1.0" in text


async def test_names_that_jupyterhub_accepts_are_accepted(hub, callers):
    # JupyterHub puts no length limit on user or server names
    long = "u" * 260
    response = await call(
        hub, callers["hub"], "POST", "api/tickets", json=ticket("long", user=long, server="s" * 300)
    )
    assert response.status_code == 201, response.text
    await call(hub, callers["hub"], "DELETE", "api/tickets/long")


def test_the_service_log_reads_like_the_hubs(hub):
    log = hub.component.log_path.read_text(errors="replace")
    # a line the quick start tells admins to look for, in the hub's own format
    listening = re.search(
        r"^\[I \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} GPUShareService app:\d+\] "
        r"gpushare service \S+ listening on 127\.0\.0\.1:(\d+)/services/gpushare/$",
        log,
        re.MULTILINE,
    )
    assert listening, log[-3000:]
    assert int(listening.group(1)) == hub.service_port
    assert re.search(r"^\[I .* GPUShareService \w+:\d+\] nodes: listed \d+$", log, re.M)
    assert "Logging error" not in log and "KeyError: 'color'" not in log


def _service_rss(hub) -> int:
    pid = service_pid(hub)
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024


def _raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 20) -> bytes:
    """Send a request by hand and read what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and data.rstrip().endswith(b"}"):
                    break
    return data


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])


async def test_oversized_bodies_are_refused_unread_with_memory_flat(hub, callers):
    before = _service_rss(hub)
    claimed = 95 * 2**20
    for headers in (callers["hub"], {}):  # the hub, and someone anonymous
        for _ in range(3):
            head = (
                "POST /services/gpushare/api/tickets HTTP/1.1\r\nHost: localhost\r\n"
                "Content-Type: application/json\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + f"Content-Length: {claimed}\r\n\r\n"
            ).encode()
            raw = await asyncio.to_thread(_raw_request, hub.service_port, head, b"x" * 65536)
            status, body = _status_and_json(raw)
            assert status == (413 if headers else 403), raw[:300]
            assert body["status"] == status and body["message"]
    # nothing was read into memory (a 95 MB body would show)
    assert _service_rss(hub) - before < 16 * 2**20


async def test_a_client_that_never_finishes_its_request_is_let_go(hub):
    def linger() -> bytes:
        with socket.create_connection(("127.0.0.1", hub.service_port), timeout=60) as sock:
            sock.sendall(b"POST /services/gpushare/api/tickets HTTP/1.1\r\nHost: x\r\n")
            return sock.recv(1024)  # b"" once the service closes the connection

    assert await asyncio.to_thread(linger) == b""


@pytest.mark.parametrize(
    "cluster_problem,admins_read",
    [
        ("unreachable", "cannot reach the Kubernetes API server"),
        ("no RBAC", "forbidden: the service may not list/watch nodes"),
    ],
)
async def test_users_see_no_cluster_internals(
    cluster_problem, admins_read, hub_factory, cluster, tmp_path
):
    if cluster_problem == "unreachable":  # nothing listens there
        kubeconfig = kubeconfig_via(cluster.kubeconfig, free_port(), tmp_path / "kubeconfig")
    else:  # an identity no role is bound to
        kubeconfig = cluster.kubeconfig_for("no-rbac-hub")
    hub = hub_factory("c.GPUShareSpawner.memory_guard = False\n", kubeconfig=kubeconfig)
    user = {"Authorization": f"token {await user_token(hub, 'alice')}"}
    admin = {"Authorization": f"token {await user_token(hub, 'admin')}"}

    async def not_ready(headers):
        body = (await call(hub, headers, "GET", "api/capacity")).json()
        return body if body["problem"] and not body["ready"] else None

    seen_by_admin = await wait_for(lambda: not_ready(admin), 60, "the service to give up")
    assert admins_read in seen_by_admin["problem"]
    seen_by_user = await not_ready(user)
    assert seen_by_user["problem"] == "the GPU service is reading the cluster's GPU nodes"
    assert "127.0.0.1" not in json.dumps(seen_by_user) and "rbac" not in json.dumps(seen_by_user)
