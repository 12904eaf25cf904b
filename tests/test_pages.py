"""The pages, in a real browser (Debian's Chromium, driven by Playwright).

One real hub with two GPU nodes, six users holding every slice and three in
line. An admin sees JupyterHub's user table and the GPU panel beside it, with
the numbers the JSON API gives; stopping a server changes the panel and a
queued user's spawn page without a reload; a non-admin never gets the panel's
data; a user called ``<img src=x onerror=alert(1)>`` is shown as text and no
script runs. A second hub checks the same under a base_url.

Screenshots go to ``$GPUSHARE_SCREENSHOTS`` (``docs/_static/screenshots`` to
refresh the documentation's), else to a temporary folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from jupyterhub_gpushare import messages
from jupyterhub_gpushare.testing.hub import TEST_PASSWORD, LocalHub
from jupyterhub_gpushare.testing.nodes import create_gpu_node, delete_node
from jupyterhub_gpushare.tickets import TicketStatus
from tests.spawning import position_is, request_server, stop_all, user_token, wait_event, wait_ready

REPO = Path(__file__).resolve().parents[1]
EVIL = "<img src=x onerror=alert(1)>"
CHROMIUM = os.environ.get("GPUSHARE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
UI_TIMEOUT_MS = 30_000

HUB_CONFIG = f"""
import sys
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
c.GPUShareSpawner.memory_guard = False
# light stand-in servers: the hub still waits for them to answer
c.KubeSpawner.cmd = [sys.executable, "-m", "jupyterhub_gpushare.testing.standin_server"]
c.KubeSpawner.args = []
c.KubeSpawner.environment = {{"PYTHONPATH": {str(REPO)!r}}}
c.KubeSpawner.profile_list = [
    {{"display_name": "RTX", "slug": "rtx", "default": True,
     "kubespawner_override": {{"node_selector": {{"gpushare.dev/pool": "rtx"}}}}}},
    {{"display_name": "H200", "slug": "h200",
     "kubespawner_override": {{"node_selector": {{"gpushare.dev/pool": "h200"}}}}}},
]
# may open the admin page (JupyterHub's admin-ui) and see user names, not servers
c.JupyterHub.load_roles = list(c.JupyterHub.load_roles) + [
    {{"name": "admin-page-viewer", "users": ["viewer"],
     "scopes": ["admin-ui", "list:users", "read:users:name"]}},
    # no admin, but may read every user's servers: what the panel shows
    {{"name": "server-auditor", "users": ["auditor"],
     "scopes": ["admin-ui", "list:users", "read:users", "read:servers"]}},
]
"""

# who holds the slices, and who waits, in each pool
RTX_HOLDERS = ["ada", "grace", EVIL, "linus"]
H200_HOLDERS = ["ken", "barbara"]
RTX_WAITING = ["margaret", "dennis"]
H200_WAITING = ["frances"]


# -- the browser --------------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator:
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        pytest.fail("Playwright is missing: pip install -e '.[test]' (it is in the test extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: apt-get install chromium "
            "(or set GPUSHARE_CHROMIUM); the tests never download a browser"
        )
    # a loaded two-core machine: every check waits for its condition, up to this long
    expect.set_options(timeout=UI_TIMEOUT_MS)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            # root on CI has no user namespaces for Chromium's sandbox
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        yield chromium
        await chromium.close()


class Session:
    """A browser context logged in to the hub as one user, recording every
    JavaScript dialog (an ``alert()`` would mean injected script ran)."""

    def __init__(self, context, hub: LocalHub, username: str):
        self.context, self.hub, self.username = context, hub, username
        self.dialogs: list[str] = []
        self._dismissals: set[asyncio.Task] = set()
        context.on("page", self._watch)

    def _watch(self, page) -> None:
        page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        task = asyncio.ensure_future(dialog.dismiss())
        self._dismissals.add(task)
        task.add_done_callback(self._dismissals.discard)

    async def open(self, path: str):
        page = await self.context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        await page.goto(self.hub.url + path)
        return page

    async def close(self) -> None:
        await self.context.close()


async def log_in(browser, hub: LocalHub, username: str, next_path: str):
    """Log in through the hub's real login form; return the session and the page."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    session = Session(context, hub, username)
    page = await session.open(f"/hub/login?next={quote(hub_path(hub, next_path), safe='')}")
    await page.fill("#username_input", username)
    await page.fill("#password_input", TEST_PASSWORD)
    await page.press("#password_input", "Enter")
    await page.wait_for_url(lambda url: "/hub/login" not in url)
    return session, page


def hub_path(hub: LocalHub, path: str) -> str:
    """``path`` under the hub's base_url, for ``next`` links."""
    prefix = hub.url.split(f":{hub.port}", 1)[1]
    return prefix + path


def screenshot_dir() -> Path:
    folder = os.environ.get("GPUSHARE_SCREENSHOTS")
    path = Path(folder) if folder else Path(tempfile.gettempdir()) / "gpushare-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def save_screenshot(target, name: str, caption: str, **kwargs) -> Path:
    """A PNG for the documentation, with its caption beside it."""
    path = screenshot_dir() / f"{name}.png"
    await target.screenshot(path=str(path), **kwargs)
    path.with_suffix(".txt").write_text(caption + "\n")
    return path


async def panel_frame(page):
    """The GPU panel's iframe on the admin page, once it shows its data."""
    from playwright.async_api import expect

    await expect(page.locator("#gpushare-admin-panel")).to_have_attribute(
        "data-state", "shown", timeout=UI_TIMEOUT_MS
    )
    frame = page.frame_locator("#gpushare-admin-frame")
    await expect(frame.locator("#gpushare")).to_have_attribute(
        "data-loaded", "true", timeout=UI_TIMEOUT_MS
    )
    return frame


async def api_json(hub: LocalHub, token: str, path: str) -> dict:
    async with httpx.AsyncClient(timeout=20) as http:
        response = await http.get(
            f"{hub.url}/services/gpushare/api/{path}", headers={"Authorization": f"token {token}"}
        )
    response.raise_for_status()
    return response.json()


# -- the scene: 2 GPU nodes, 6 users holding every slice, 3 in line -----------------------


@pytest.fixture(scope="module")
def hub(hub_factory) -> LocalHub:
    return hub_factory(HUB_CONFIG)


@pytest.fixture(scope="module")
async def scene(hub, core, namespace) -> AsyncIterator[dict]:
    suffix = uuid.uuid4().hex[:4]
    nodes = {"rtx": f"rtx5090-{suffix}", "h200": f"h200-{suffix}"}
    everyone = RTX_HOLDERS + H200_HOLDERS + RTX_WAITING + H200_WAITING
    try:
        await create_gpu_node(
            core, nodes["rtx"], gpus=2, replicas=2, labels={"gpushare.dev/pool": "rtx"}
        )
        await create_gpu_node(
            core,
            nodes["h200"],
            gpus=1,
            replicas=2,
            product="NVIDIA-H200",
            memory_mib=143771,
            labels={"gpushare.dev/pool": "h200"},
        )
        holders = [(u, "rtx") for u in RTX_HOLDERS] + [(u, "h200") for u in H200_HOLDERS]
        for user, profile in holders:
            assert await request_server(hub, user, {"profile": profile}) == 202
        for user, _ in holders:
            await wait_ready(hub, user)
        for line, profile in ((RTX_WAITING, "rtx"), (H200_WAITING, "h200")):
            for i, user in enumerate(line):
                await request_server(hub, user, {"profile": profile})
                await wait_event(hub, user, position_is(i + 1, i + 1))
        yield {"nodes": nodes, "admin_token": await user_token(hub, "admin")}
    finally:
        await stop_users(hub, core, namespace, everyone)
        for node in nodes.values():
            with contextlib.suppress(Exception):
                await delete_node(core, node)


async def stop_users(hub: LocalHub, core, namespace: str, names: list[str]) -> None:
    """Stop the servers of those of ``names`` the hub knows (a failed set-up may
    not have created them all)."""
    async with hub.api_client() as api:
        known = [
            name
            for name in names
            if (await api.get(f"/users/{quote(name, safe='')}")).status_code == 200
        ]
    await stop_all(hub, core, namespace, known)


# -- tests ----------------------------------------------------------------------------


async def fetch_from_page(page, path: str) -> tuple[int, str]:
    """GET a service URL the way the page's own script does (cookie + XSRF token)."""
    return await page.evaluate(
        """async (path) => {
            const root = document.getElementById("gpushare");
            const response = await fetch(root.dataset.prefix + path, {
                headers: {"X-XSRFToken": root.dataset.xsrf}, cache: "no-store"});
            return [response.status, await response.text()];
        }""",
        path,
    )


@pytest.mark.cluster
@pytest.mark.hub
async def test_admin_page_has_user_table_and_gpu_panel(hub, scene, browser):
    from playwright.async_api import expect

    session, page = await log_in(browser, hub, "admin", "/hub/admin")
    try:
        # JupyterHub's own React user table is still there ...
        table = page.locator("#react-admin-hook")
        for user in ("ada", "margaret", "frances"):
            await expect(table.get_by_text(user, exact=True).first).to_be_visible()
        # ... and the panel beside it, with the numbers of the JSON API
        frame = await panel_frame(page)
        nodes = (await api_json(hub, scene["admin_token"], "nodes"))["nodes"]
        assert {scene["nodes"]["rtx"], scene["nodes"]["h200"]} <= {n["name"] for n in nodes}
        for key, total in (
            ("nodes", len(nodes)),
            ("gpus", sum(n["gpus"] for n in nodes)),
            ("slices", sum(n["slices_total"] for n in nodes)),
            ("used", sum(n["slices_used"] for n in nodes)),
            ("free", sum(n["slices_free"] for n in nodes)),
            ("waiting", 3),
        ):
            await expect(frame.locator(f'[data-gs="{key}"] .gs-metric-value')).to_have_text(
                str(total)
            )

        rtx = frame.locator(f'[data-node="{scene["nodes"]["rtx"]}"]')
        await expect(rtx.locator(".gs-node-facts")).to_contain_text(
            "NVIDIA GeForce RTX 5090 · 2 GPUs \u00d7 2 replicas = 4 slices"
        )
        await expect(rtx.locator('[data-gs="node-usage"]')).to_have_text("4 of 4 in use · 0 free")
        # time-sliced: what holds users to their memory share is the frameworks
        await expect(rtx.locator('[data-gs="cap"]')).to_have_text("cooperative cap")
        await expect(rtx.locator(".gs-bar .gs-used")).to_have_count(4)
        await expect(rtx.locator(".gs-holders tbody tr")).to_have_count(4)
        assert sorted(await rtx.locator(".gs-holders td.gs-user").all_inner_texts()) == sorted(
            RTX_HOLDERS
        )
        h200 = frame.locator(f'[data-node="{scene["nodes"]["h200"]}"]')
        await expect(h200.locator(".gs-node-facts")).to_contain_text(
            "NVIDIA H200 · 1 GPU \u00d7 2 replicas = 2 slices"
        )
        await expect(h200.locator('[data-gs="node-usage"]')).to_have_text("2 of 2 in use · 0 free")
        assert sorted(await h200.locator(".gs-holders td.gs-user").all_inner_texts()) == sorted(
            H200_HOLDERS
        )
        # since when, and the hub's last activity of each holder's server
        activity = await api_json(hub, scene["admin_token"], "activity")
        assert activity["available"] is True
        for user in RTX_HOLDERS + H200_HOLDERS:
            assert activity["users"][user]["servers"][""], user
            row = frame.locator(f'tr[data-holder="{css_string(user)}"]')
            await expect(row.locator("td").nth(3).locator("time")).to_have_count(1)
            await expect(row.locator("td").nth(4).locator("time")).to_have_count(1)

        # the line of each pool, in order
        rtx_line = frame.locator(".gs-queue", has_text="gpushare.dev/pool=rtx")
        await expect(rtx_line.locator("tbody tr td.gs-pos")).to_have_text(["1", "2"])
        await expect(rtx_line.locator("tbody tr td.gs-user")).to_have_text(RTX_WAITING)
        h200_line = frame.locator(".gs-queue", has_text="gpushare.dev/pool=h200")
        await expect(h200_line.locator("tbody tr td.gs-user")).to_have_text(H200_WAITING)
        await expect(rtx_line.locator(".gs-queue-summary")).to_contain_text(
            "2 waiting · 0 of 4 slices free"
        )
        await save_screenshot(
            page,
            "admin-page",
            "The admin page: the GPU panel (totals, each node's slices and holders, "
            "the line of each pool) above JupyterHub's own user table.",
            full_page=True,
        )
        # the panel follows the hub's light/dark switch
        await page.click("#dark-theme-toggle")
        theme = await page.evaluate("document.documentElement.getAttribute('data-bs-theme')")
        assert theme in ("dark", "light")
        await expect(frame.locator("html")).to_have_attribute("data-theme", theme)
        assert session.dialogs == []
    finally:
        await session.close()


def css_string(value: str) -> str:
    """``value`` inside a double-quoted CSS attribute selector."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


@pytest.mark.cluster
@pytest.mark.hub
async def test_queued_user_sees_place_on_spawn_page(hub, scene, browser):
    from playwright.async_api import expect

    session, page = await log_in(browser, hub, "dennis", "/hub/spawn-pending/dennis")
    try:
        message = page.locator("#progress-message")
        await expect(message.locator(".gpushare-position")).to_have_text("2")
        await expect(message.locator(".gpushare-free")).to_have_text("0 of 4 slices free")
        await expect(message).to_contain_text("of 2 in line for a GPU slice")
        await expect(message).to_contain_text("Estimated wait:")
        await save_screenshot(
            page,
            "spawn-page-queued",
            "A user's spawn page while the spawn waits in line: the place in line, "
            "the pool's slices in use and the estimated wait.",
        )
        assert session.dialogs == []
    finally:
        await session.close()


@pytest.mark.cluster
@pytest.mark.hub
async def test_service_page_for_users_and_admins(hub, scene, browser):
    from playwright.async_api import expect

    session, page = await log_in(browser, hub, "dennis", "/hub/home")
    try:
        # listed in the hub's Services menu
        link = page.locator("a.dropdown-item", has_text="gpushare")
        assert (await link.get_attribute("href")).endswith("/services/gpushare/")
        await page.goto(hub.url + "/services/gpushare/")
        root = page.locator("#gpushare")
        await expect(root).to_have_attribute("data-loaded", "true", timeout=UI_TIMEOUT_MS)
        place = root.locator('[data-gs="my-place"]')
        await expect(place.locator(".gs-place-number")).to_have_text("2")
        await expect(place).to_contain_text("of 2 in line for")
        rtx_pool = root.locator('tr[data-pool="nvidia.com/gpu|gpushare.dev/pool=rtx"]')
        await expect(rtx_pool.locator('[data-gs="pool-free"]')).to_have_text("0 of 4 free")
        await expect(rtx_pool.locator('[data-gs="cap"]')).to_have_text("cooperative cap")
        await expect(rtx_pool.locator('[data-gs="pool-waiting"]')).to_have_text("2 waiting")
        # a user sees no node, no holder, no other user's name
        assert await root.locator(".gs-node").count() == 0
        for other in ("margaret", "ada", "frances"):
            assert other not in await root.inner_text()
        await save_screenshot(
            page,
            "service-page-user",
            "The service's page for a user: their place in line and the free slices of each pool.",
            full_page=True,
        )
    finally:
        await session.close()

    session, page = await log_in(browser, hub, "admin", "/services/gpushare/")
    try:
        root = page.locator("#gpushare")
        await expect(root).to_have_attribute("data-loaded", "true", timeout=UI_TIMEOUT_MS)
        await expect(root.locator(f'[data-node="{scene["nodes"]["rtx"]}"]')).to_be_visible()
        await expect(root.locator('[data-gs="waiting"] .gs-metric-value')).to_have_text("3")
        await save_screenshot(
            page,
            "service-page-admin",
            "The service's page for an admin: the same GPU panel as on the admin page.",
            full_page=True,
        )
        assert session.dialogs == []
    finally:
        await session.close()


@pytest.mark.cluster
@pytest.mark.hub
async def test_non_admins_never_get_the_panel(hub, scene, browser):
    from playwright.async_api import expect

    # "viewer" may open JupyterHub's admin page (admin-ui) and list names, but
    # may not read other users' servers: the panel, which shows them, stays closed
    session = None
    context = await browser.new_context()
    try:
        session = Session(context, hub, "viewer")
        page = await session.open("/hub/login?next=" + quote("/hub/home", safe=""))
        await page.fill("#username_input", "viewer")
        await page.fill("#password_input", TEST_PASSWORD)
        async with page.expect_response(
            lambda r: r.url.endswith("/services/gpushare/panel") and r.status == 403,
            timeout=UI_TIMEOUT_MS,
        ) as refused:
            await page.press("#password_input", "Enter")
            await page.wait_for_url(lambda url: "/hub/login" not in url)
            await page.goto(hub.url + "/hub/admin")
        assert (await (await refused.value).json())["status"] == 403
        await expect(
            page.locator("#react-admin-hook").get_by_text("ada", exact=True).first
        ).to_be_visible()
        await expect(page.locator("#gpushare-admin-panel")).to_have_attribute(
            "data-state", "refused"
        )
        assert not await page.locator("#gpushare-admin-panel").is_visible()
        assert "margaret" not in await page.locator("#gpushare-admin-panel").inner_text()

        # the service's page shows viewer the user's view, and the data stays closed
        await page.goto(hub.url + "/services/gpushare/")
        await expect(page.locator("#gpushare")).to_have_attribute("data-loaded", "true")
        assert await page.locator(".gs-node").count() == 0
        for path in ("api/nodes", "api/activity"):
            status, body = await fetch_from_page(page, path)
            assert status == 403, (path, body)
            assert "margaret" not in body
        # the panel is a page: refused with 403, or (when the hub is slow to vouch
        # for the cookie) sent to log in again; never the panel itself
        status, body = await fetch_from_page(page, "panel")
        assert status == 403 or 'id="gpushare"' not in body, body
        assert 'data-mode="embedded"' not in body and "margaret" not in body
        status, body = await fetch_from_page(page, "api/queue")
        assert status == 200 and "margaret" not in body and '"user"' not in body
        assert session.dialogs == []
    finally:
        await context.close()


@pytest.mark.cluster
@pytest.mark.hub
async def test_the_panel_follows_the_tokens_scopes_not_the_admin_flag(hub, scene, browser):
    from playwright.async_api import expect

    # "auditor" is no admin, but may read every user's servers: the panel is theirs
    session, page = await log_in(browser, hub, "auditor", "/hub/admin")
    try:
        frame = await panel_frame(page)
        await expect(frame.locator('[data-gs="waiting"] .gs-metric-value')).to_have_text("3")
        await page.goto(hub.url + "/services/gpushare/")
        await expect(page.locator("#gpushare")).to_have_attribute("data-loaded", "true")
        status, body = await fetch_from_page(page, "api/queue")
        assert status == 200 and "margaret" in body
        assert session.dialogs == []
    finally:
        await session.close()


@pytest.mark.cluster
@pytest.mark.hub
async def test_activity_and_panel_are_for_admins_only(hub, scene):
    user = await user_token(hub, "dennis")
    callers = {
        "anonymous": {},
        "user": {"Authorization": f"token {user}"},
        "hub": {"X-Gpushare-Hub-Secret": hub.queue_secret},
    }
    base = f"{hub.url}/services/gpushare/"
    async with httpx.AsyncClient(timeout=20) as http:
        for who, headers in callers.items():
            response = await http.get(base + "api/activity", headers=headers)
            assert response.status_code == 403, (who, response.text)
            assert response.json()["status"] == 403
        response = await http.get(base + "panel", headers=callers["user"])
        assert response.status_code == 403 and response.json()["status"] == 403
        # a browser without a login is sent to the hub's OAuth first
        response = await http.get(base + "panel")
        assert response.status_code == 302
        assert "/hub/api/oauth2/authorize" in response.headers["location"]

        admin = {"Authorization": f"token {scene['admin_token']}"}
        activity = (await http.get(base + "api/activity", headers=admin)).json()
        assert activity["available"] is True and activity["now"] > 0
        assert set(RTX_HOLDERS + H200_HOLDERS) <= set(activity["users"])
        panel = await http.get(base + "panel", headers=admin)
        assert panel.status_code == 200
        assert panel.headers["content-security-policy"] == "frame-ancestors 'self'"
        # the page is an empty frame for the script: no data of its own
        assert "margaret" not in panel.text and "ada" not in panel.text


@pytest.mark.cluster
@pytest.mark.hub
async def test_html_user_name_is_only_text(hub, scene, browser):
    from playwright.async_api import expect

    session, page = await log_in(browser, hub, "admin", "/hub/admin")
    try:
        frame = await panel_frame(page)
        cell = frame.locator(f'tr[data-holder="{css_string(EVIL)}"] td.gs-user')
        await expect(cell).to_have_text(EVIL)
        await expect(page.locator("#react-admin-hook").get_by_text(EVIL).first).to_be_visible()
        assert await frame.locator("img").count() == 0
        assert await page.locator("img[src=x]").count() == 0
    finally:
        await session.close()
    # the user themselves: their name on the hub's pages and on the service's page
    session, page = await log_in(browser, hub, EVIL, "/services/gpushare/")
    try:
        await expect(page.locator(".gs-whoami")).to_have_text(EVIL)
        await expect(page.locator("#gpushare")).to_have_attribute("data-loaded", "true")
        assert await page.locator("img").count() == 0
    finally:
        await session.close()
    assert session.dialogs == []


@pytest.mark.cluster
@pytest.mark.hub
async def test_stopping_a_server_updates_panel_and_line_live(hub, scene, browser):
    """Runs last of the scene's tests: it changes who holds what."""
    from playwright.async_api import expect

    admin, admin_page = await log_in(browser, hub, "admin", "/hub/admin")
    dennis, spawn_page = await log_in(browser, hub, "dennis", "/hub/spawn-pending/dennis")
    try:
        frame = await panel_frame(admin_page)
        rtx_line = frame.locator(".gs-queue", has_text="gpushare.dev/pool=rtx")
        await expect(rtx_line.locator("tbody tr td.gs-user")).to_have_text(RTX_WAITING)
        position = spawn_page.locator("#progress-message .gpushare-position")
        await expect(position).to_have_text("2")
        # a reload would lose these
        await admin_page.evaluate("window.gpushareMarker = 1")
        await (
            admin_page.frame_locator("#gpushare-admin-frame")
            .locator("body")
            .evaluate("() => { window.gpushareMarker = 1; }")
        )
        await spawn_page.evaluate("window.gpushareMarker = 1")

        async with hub.api_client() as api:
            assert (await api.delete("/users/ada/server")).status_code in (202, 204)

        # margaret, first in line, gets ada's slice; dennis moves up
        rtx = frame.locator(f'[data-node="{scene["nodes"]["rtx"]}"]')
        await expect(rtx.locator('tr[data-holder="margaret"]')).to_have_count(1, timeout=90_000)
        await expect(rtx.locator('tr[data-holder="ada"]')).to_have_count(0)
        await expect(rtx_line.locator("tbody tr td.gs-user")).to_have_text(["dennis"])
        await expect(rtx_line.locator("tbody tr td.gs-pos")).to_have_text(["1"])
        await expect(frame.locator('[data-gs="waiting"] .gs-metric-value')).to_have_text("2")
        await expect(position).to_have_text("1", timeout=60_000)

        # React re-renders the user table (here: a search); the panel beside it stays
        table = admin_page.locator("#react-admin-hook")
        await admin_page.get_by_placeholder(re.compile("search users", re.I)).fill("dennis")
        await expect(table.get_by_text("grace", exact=True)).to_have_count(0)
        await expect(table.get_by_text("dennis", exact=True).first).to_be_visible()
        await expect(rtx_line.locator("tbody tr td.gs-user")).to_have_text(["dennis"])

        assert await admin_page.evaluate("window.gpushareMarker") == 1
        inner = admin_page.frame_locator("#gpushare-admin-frame").locator("body")
        assert await inner.evaluate("() => window.gpushareMarker") == 1
        assert await spawn_page.evaluate("window.gpushareMarker") == 1
        assert admin.dialogs == [] and dennis.dialogs == []
    finally:
        await admin.close()
        await dennis.close()


# -- under a base_url ---------------------------------------------------------------------


# its own pool, so that the other hub's line does not take its slices
BASE_URL_CONFIG = """
c.JupyterHub.base_url = "/jh/"
c.KubeSpawner.profile_list = [
    {"display_name": "Base", "slug": "base", "default": True,
     "kubespawner_override": {"node_selector": {"gpushare.dev/pool": "base-url"}}},
]
"""


class BaseURLHub(LocalHub):
    """The same hub with ``c.JupyterHub.base_url = "/jh/"``."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jh"


@pytest.fixture
def base_url_hub(cluster, namespace):
    run_dir = Path(tempfile.mkdtemp(prefix="gpushare-hub-"))
    hub = BaseURLHub(
        run_dir,
        cluster.kubeconfig,
        namespace,
        HUB_CONFIG + BASE_URL_CONFIG,
    )
    try:
        hub.start()
        yield hub
    finally:
        hub.stop()
        if not os.environ.get("GPUSHARE_KEEP_CLUSTER_LOGS"):
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.cluster
@pytest.mark.hub
async def test_panel_and_service_page_under_a_base_url(
    base_url_hub, gpu_nodes, browser, core, namespace
):
    from playwright.async_api import expect

    hub = base_url_hub
    node = await gpu_nodes(replicas=2, labels={"gpushare.dev/pool": "base-url"})
    user = f"base-{uuid.uuid4().hex[:4]}"
    try:
        assert await request_server(hub, user) == 202
        await wait_ready(hub, user)
        session, page = await log_in(browser, hub, "admin", "/hub/admin")
        try:
            frame = await panel_frame(page)
            row = frame.locator(f'[data-node="{node}"]')
            await expect(row.locator('[data-gs="node-usage"]')).to_have_text(
                "1 of 2 in use · 1 free"
            )
            await expect(row.locator(f'tr[data-holder="{user}"]')).to_have_count(1)
            src = await page.locator("#gpushare-admin-frame").get_attribute("src")
            assert src == "/jh/services/gpushare/panel"
            await page.goto(hub.url + "/services/gpushare/")
            await expect(page.locator(f'#gpushare [data-node="{node}"]')).to_be_visible(
                timeout=UI_TIMEOUT_MS
            )
            assert session.dialogs == []
        finally:
            await session.close()
    finally:
        await stop_users(hub, core, namespace, [user])


# -- the spawn page's message, without a cluster ---------------------------------------------


def test_queue_message_escapes_everything():
    status = TicketStatus(
        ticket="t",
        state="waiting",
        position=2,
        waiting=3,
        eta_at=1000.0 + 240,
        pool={"slices_free": 1, "slices_total": 4, "products": ["<script>x</script>-SHARED"]},
    )
    event = messages.queue_message(status, now=1000.0)
    assert event["message"] == (
        "Waiting for a GPU slice: you are number 2 of 3 in line. 1 of 4 slices free on "
        "<script>x</script>. Estimated wait: about 4 minutes."
    )
    html = event["html_message"]
    assert "<script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert '<span class="gpushare-position"' in html and ">2</span>" in html
    assert '<span class="gpushare-free">1 of 4 slices free</span>' in html
    assert "width:75%" in html  # 3 of 4 slices in use
    assert "Estimated wait: about 4 minutes" in html


def test_queue_message_numbers_are_numbers():
    # whatever the JSON holds, only whole numbers reach the HTML
    status = TicketStatus.from_json(
        {
            "ticket": "t",
            "state": "waiting",
            "position": "<b>1</b>",
            "waiting": None,
            "eta_at": "soon",
            "eta_bound_at": float("nan"),
            "pool": {"slices_free": "<i>", "slices_total": 2.9},
            "reason": "<script>alert(1)</script>",
        }
    )
    html = messages.queue_message(status)["html_message"]
    assert "<b>" not in html and "<i>" not in html and "<script>" not in html
    assert '<span class="gpushare-free">0 of 2 slices free</span>' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Estimated wait: unknown" in html


async def test_activity_reads_every_page_of_active_users(monkeypatch):
    from tornado import web
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    from jupyterhub_gpushare.service.hubapi import HubAPI

    users = [
        {
            "name": f"u{i}",
            "last_activity": f"2026-01-0{i + 1}T00:00:00Z",
            "servers": {"": {"last_activity": f"2026-01-0{i + 1}T12:00:00Z"}},
        }
        for i in range(5)
    ]
    requests = []

    class Users(web.RequestHandler):
        def get(self) -> None:
            requests.append(
                (
                    self.get_argument("state"),
                    self.request.headers.get("Accept"),
                    self.request.headers.get("Authorization"),
                )
            )
            offset, limit = int(self.get_argument("offset")), int(self.get_argument("limit"))
            more = offset + limit < len(users)
            self.write(
                {
                    "items": users[offset : offset + limit],
                    "_pagination": {
                        "offset": offset,
                        "limit": limit,
                        "total": len(users),
                        "next": {"offset": offset + limit, "limit": limit} if more else None,
                    },
                }
            )

    sock, port = bind_unused_port()
    server = HTTPServer(web.Application([("/hub/api/users", Users)]))
    server.add_sockets([sock])
    hub = HubAPI(api_url=f"http://127.0.0.1:{port}/hub/api", api_token="service-token", page_size=2)
    try:
        found = {u["name"]: u async for u in hub.users(state="active")}
    finally:
        server.stop()
    assert sorted(found) == [u["name"] for u in users]
    assert found["u3"] == users[3]
    assert (
        requests
        == [("active", "application/jupyterhub-pagination+json", "token service-token")] * 3
    )
