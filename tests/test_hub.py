"""A user logs in to a real JupyterHub, GPUShareSpawner spawns into the local
cluster, and the user's server answers through configurable-http-proxy."""

from __future__ import annotations

import pytest

from jupyterhub_gpushare.testing.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.hub]


async def test_login_spawn_and_reach_server(hub_factory, gpu_nodes, core, namespace):
    await gpu_nodes(replicas=4)
    hub = hub_factory()
    browser = await hub.login("alice")
    try:
        response = await browser.get("/hub/spawn/alice")
        assert response.status_code == 200

        async def server_ready():
            async with hub.api_client() as api:
                user = (await api.get("/users/alice")).json()
            server = user["servers"].get("")
            return server if server and server["ready"] else None

        server = await wait_for(server_ready, 120, "alice's server to be ready", interval=0.5)
        pods = await core.list_namespaced_pod(
            namespace, label_selector="hub.jupyter.org/username=alice"
        )
        assert len(pods.items) == 1
        pod = pods.items[0]
        assert pod.status.pod_ip.startswith("127.")
        assert server["url"] == "/user/alice/"

        # a page (not an API call) is what sends a browser through the OAuth hand-shake
        response = await browser.get("/user/alice/")
        assert response.status_code == 200
        assert str(response.url).endswith("/user/alice/lab")
        # API calls carry the XSRF token from the cookie, as JupyterLab sends it
        xsrf = {"X-XSRFToken": browser.cookies.get("_xsrf", path="/user/alice/")}
        response = await browser.get("/user/alice/api/status", headers=xsrf)
        assert response.status_code == 200
        assert "started" in response.json()
    finally:
        async with hub.api_client() as api:
            await api.delete("/users/alice/server")
        await browser.aclose()

    async def pod_gone():
        pods = await core.list_namespaced_pod(
            namespace, label_selector="hub.jupyter.org/username=alice"
        )
        return not pods.items

    await wait_for(pod_gone, 60, "alice's pod to be deleted")
