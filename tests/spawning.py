"""Helpers for tests that spawn servers through a real hub."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from kubernetes_asyncio import client

from jupyterhub_gpushare.testing.cluster import LocalCluster
from jupyterhub_gpushare.testing.hub import LocalHub
from jupyterhub_gpushare.testing.waiting import wait_for


async def ensure_user(hub: LocalHub, name: str) -> None:
    async with hub.api_client() as api:
        response = await api.get(f"/users/{name}")
        if response.status_code == 404:
            (await api.post(f"/users/{name}")).raise_for_status()


async def request_server(hub: LocalHub, name: str, options: dict | None = None) -> int:
    await ensure_user(hub, name)
    async with hub.api_client() as api:
        response = await api.post(f"/users/{name}/server", json=options or {})
    return response.status_code


async def wait_ready(hub: LocalHub, name: str, timeout: float = 120, server: str = "") -> dict:
    async def ready():
        async with hub.api_client() as api:
            user = (await api.get(f"/users/{name}")).json()
        found = user["servers"].get(server)
        return found if found and found["ready"] else None

    return await wait_for(ready, timeout, f"{name}'s server {server!r} to be ready", interval=0.3)


async def progress_events(hub: LocalHub, name: str, timeout: float = 60) -> list[dict]:
    """Every event of the user's progress stream, until it says ready or failed."""
    events = []
    async with hub.api_client() as api:
        async with api.stream("GET", f"/users/{name}/server/progress", timeout=timeout) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    events.append(event)
                    if event.get("ready") or event.get("failed"):
                        break
    return events


async def stop_server(hub: LocalHub, core: client.CoreV1Api, namespace: str, name: str) -> None:
    async with hub.api_client() as api:
        await api.delete(f"/users/{name}/server")

    async def gone():
        pods = await core.list_namespaced_pod(
            namespace, label_selector=f"hub.jupyter.org/username={name}"
        )
        return not pods.items

    await wait_for(gone, 60, f"{name}'s pod to be deleted")


async def user_pod(core: client.CoreV1Api, namespace: str, name: str):
    pods = await core.list_namespaced_pod(
        namespace, label_selector=f"hub.jupyter.org/username={name}"
    )
    assert len(pods.items) == 1, [p.metadata.name for p in pods.items]
    return pods.items[0]


def process_environment(cluster: LocalCluster, pod) -> dict[str, str]:
    """The environment of the pod's running process, read from the kernel."""
    pid = (cluster.run_dir / "pods" / pod.metadata.uid / "container.pid").read_text()
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


async def wait_event(
    hub: LocalHub, name: str, predicate, timeout: float = 60, server: str = ""
) -> dict:
    """The first progress event of ``name``'s spawn for which ``predicate`` holds.

    Opens the real progress stream (as the spawn page does); each new stream
    starts with the current state, so this also reads "where am I now".
    ``predicate`` may match the final event (failed or ready) too.
    """
    import asyncio

    path = (
        f"/users/{name}/servers/{server}/progress" if server else f"/users/{name}/server/progress"
    )

    async def read() -> dict:
        async with hub.api_client() as api:
            async with api.stream("GET", path, timeout=timeout) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if predicate(event):
                            return event
                        if event.get("ready") or event.get("failed"):
                            raise AssertionError(f"{name}'s spawn ended first: {event}")
        raise AssertionError(f"{name}'s progress stream ended")

    return await asyncio.wait_for(read(), timeout)


def position_is(position: int, waiting: int | None = None):
    text = f"you are number {position} of "
    return lambda e: (
        text in e.get("message", "")
        and (waiting is None or f"{text}{waiting} in line" in e["message"])
    )


async def server_state(hub: LocalHub, name: str) -> dict | None:
    async with hub.api_client() as api:
        user = (await api.get(f"/users/{name}")).json()
    return user["servers"].get("")


async def stop_all(hub: LocalHub, core, namespace: str, names) -> None:
    import asyncio

    async with hub.api_client() as api:
        await asyncio.gather(*(api.delete(f"/users/{n}/server") for n in names))

    async def gone():
        pods = await core.list_namespaced_pod(
            namespace, label_selector="component=singleuser-server"
        )
        return not [
            p for p in pods.items if p.metadata.annotations.get("hub.jupyter.org/username") in names
        ]

    await wait_for(gone, 90, "the servers to stop")

    async def no_pending():
        states = [await server_state(hub, n) for n in names]
        return all(s is None for s in states)

    await wait_for(no_pending, 60, "no server left pending")


async def user_token(hub: LocalHub, name: str) -> str:
    """An API token of ``name`` with all of that user's own permissions."""
    await ensure_user(hub, name)
    async with hub.api_client() as api:
        response = await api.post(f"/users/{name}/tokens", json={"note": "test"})
    response.raise_for_status()
    return response.json()["token"]


async def service_get(hub: LocalHub, path: str, token: str) -> dict:
    """GET a page or API path of the gpushare service with a hub token; API answers
    as JSON, pages as ``{"text": ...}``."""
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(
            f"{hub.url}/services/gpushare/{path}", headers={"Authorization": f"token {token}"}
        )
    response.raise_for_status()
    return response.json() if path.startswith("api/") else {"text": response.text}
