"""Reclaim in the browser (Debian's Chromium): what admins and holders read before it.

A dry run on a real hub: one idle server, one busy, one user waiting. The
admins' panel names the idle server as the one that would be reclaimed now,
and lists it under the recent reclaims; its user's own page says how long it
has been idle and what happens to it, with no other user's name.
"""

from __future__ import annotations

import pytest

from tests.conftest import unique
from tests.spawning import position_is, request_server, user_token, wait_event, wait_ready
from tests.test_pages import UI_TIMEOUT_MS, browser, log_in, save_screenshot, stop_users
from tests.test_reclaim_hub import STANDIN, holders, keep_active

pytestmark = [pytest.mark.cluster, pytest.mark.hub]

__all__ = ["browser"]  # the fixture, shared with test_pages

# the setting under test: a dry run; and the idle time, 20 minutes shipped, 30 s here
DRY_RUN = "c.Reclaimer.dry_run = True\nc.Reclaimer.idle_seconds = 30\n"


async def test_the_panel_and_the_holders_page_say_who_would_be_reclaimed(
    hub_factory, core, namespace, gpu_nodes, browser
):
    from playwright.async_api import expect

    hub = hub_factory("", before_configure=STANDIN + DRY_RUN)
    node = await gpu_nodes(replicas=2)
    idler, worker, waiter = unique("idler"), unique("worker"), unique("waiter")
    admin = await user_token(hub, "admin")
    try:
        for user in (idler, worker):
            await request_server(hub, user)
            await wait_ready(hub, user)
        async with keep_active(hub, [worker]):
            await request_server(hub, waiter)
            await wait_event(hub, waiter, position_is(1, 1))

            async def named():
                seen = await holders(hub, admin)
                return seen.get(idler, {}).get("reclaim_now")

            from jupyterhub_gpushare.testing.waiting import wait_for

            await wait_for(named, 180, "the dry run to name the idle server")

            session, page = await log_in(browser, hub, "admin", "/services/gpushare/")
            try:
                root = page.locator("#gpushare")
                await expect(root).to_have_attribute("data-loaded", "true", timeout=UI_TIMEOUT_MS)
                card = root.locator(f'[data-node="{node}"]')
                idle_row = card.locator(f'tr[data-holder="{idler}"] [data-gs="reclaim"]')
                await expect(idle_row).to_contain_text("would be reclaimed now (dry run)")
                await expect(idle_row).to_contain_text("idle ")
                busy_row = card.locator(f'tr[data-holder="{worker}"] [data-gs="reclaim"]')
                await expect(busy_row).to_contain_text("would be reclaimed in")
                await expect(busy_row).to_contain_text("if someone still waits")
                recent = root.locator(f'.gs-reclaims tr[data-reclaim="{idler}"]')
                await expect(recent).to_have_attribute("data-outcome", "dry-run")
                await expect(root.locator(".gs-updated")).to_contain_text(
                    "reclaim of idle GPU servers: dry run: after 30s idle while someone waits"
                )
                await save_screenshot(
                    page,
                    "service-page-reclaim-dry-run",
                    "The admins' panel with reclaim in a dry run: each holder's idle time and "
                    "when it would be reclaimed, and the recent (dry-run) reclaims.",
                    full_page=True,
                )
                assert session.dialogs == []
            finally:
                await session.close()

            session, page = await log_in(browser, hub, idler, "/services/gpushare/")
            try:
                root = page.locator("#gpushare")
                await expect(root).to_have_attribute("data-loaded", "true", timeout=UI_TIMEOUT_MS)
                mine = root.locator('[data-gs="my-server"]')
                await expect(mine).to_contain_text("Server: default · 1 slice · idle ")
                await expect(mine).to_contain_text("would be reclaimed now (dry run)")
                text = await root.inner_text()
                for other in (worker, waiter, "admin"):
                    assert other not in text
                assert session.dialogs == []
            finally:
                await session.close()
    finally:
        await stop_users(hub, core, namespace, [idler, worker, waiter])
