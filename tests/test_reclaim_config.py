"""configure(c) and reclaim: the service's scopes, the culler's settings, the notices.

Runs on JupyterHub 6 and (``make test-jh5``) on 5.5, what z2jh ships: the scope
the service gets must exist in the JupyterHub that runs.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from traitlets.config import Config

from jupyterhub_gpushare import config as gpushare_config
from jupyterhub_gpushare.notices import ReclaimAnnouncement, notices_html

CULLER = {
    "name": "jupyterhub-idle-culler",
    # what z2jh's jupyterhub_config.py builds from its cull.* defaults
    "command": [
        "python3",
        "-m",
        "jupyterhub_idle_culler",
        "--url=http://localhost:8081/hub/api",
        "--timeout=3600",
        "--cull-every=600",
        "--concurrency=10",
    ],
}


def service_role(c: Config) -> list[str]:
    return next(r for r in c.JupyterHub.load_roles if r["name"] == "gpushare-service")["scopes"]


def forwarded(c: Config) -> dict:
    service = next(s for s in c.JupyterHub.services if s["name"] == "gpushare")
    return json.loads(service["environment"].get("GPUSHARE_SERVICE_CONFIG", "{}"))


def test_the_service_may_stop_servers_only_with_reclaim_on():
    from jupyterhub.scopes import scope_definitions

    c = Config()
    gpushare_config.configure(c)
    assert not {"delete:servers", "servers", "admin:servers"} & set(service_role(c))
    c = Config()
    c.Reclaimer.enabled = True
    c.Reclaimer.dry_run = True  # reports only: no need to stop anything
    gpushare_config.configure(c)
    assert "delete:servers" not in service_role(c)
    c = Config()
    c.Reclaimer.enabled = True
    gpushare_config.configure(c)
    scopes = service_role(c)
    assert "delete:servers" in scopes
    # the narrowest scope that stops a server, in the JupyterHub that runs this
    assert "delete:servers" in scope_definitions
    assert not {"servers", "admin:servers", "admin:users"} & set(scopes)
    assert "read:users:groups" not in scopes
    c = Config()
    c.Reclaimer.enabled = True
    c.Reclaimer.exempt_groups = {"staff", "admins"}
    gpushare_config.configure(c)
    assert "read:users:groups" in service_role(c)
    assert forwarded(c)["Reclaimer"]["exempt_groups"] == ["admins", "staff"]
    assert "read:users:groups" in scope_definitions


def test_the_cullers_settings_reach_the_service():
    c = Config()
    c.JupyterHub.services = [dict(CULLER)]
    gpushare_config.configure(c)
    assert forwarded(c)["Reclaimer"] == {
        "culler_timeout_seconds": 3600.0,
        "culler_every_seconds": 600.0,
        "culler_culls_every_server": True,
    }
    # cull.maxAge, and the culler's own default interval (half its timeout)
    c = Config()
    c.JupyterHub.services = [
        {**CULLER, "command": ["python3", "-m", "jupyterhub_idle_culler", "--max-age=28800"]}
    ]
    gpushare_config.configure(c)
    assert forwarded(c)["Reclaimer"] == {
        "culler_timeout_seconds": 600.0,
        "culler_every_seconds": 300.0,
        "culler_max_age_seconds": 28800.0,
        "culler_culls_every_server": True,
    }
    # a culler that spares named servers bounds nobody's wait; an admin's own value wins
    c = Config()
    c.JupyterHub.services = [
        {**CULLER, "command": [*CULLER["command"], "--cull-named-servers=False"]}
    ]
    c.Reclaimer.culler_timeout_seconds = 1800
    gpushare_config.configure(c)
    settings = forwarded(c)["Reclaimer"]
    assert settings["culler_culls_every_server"] is False
    assert settings["culler_timeout_seconds"] == 1800


def test_without_a_culler_nothing_is_assumed():
    c = Config()
    gpushare_config.configure(c)
    assert "Reclaimer" not in forwarded(c)


def test_announcements_carry_the_notices_and_keep_the_admins():
    c = Config()
    c.JupyterHub.template_vars = {"announcement_home": "<b>Exam on Friday</b>", "x": 1}
    gpushare_config.configure(c)
    template_vars = c.JupyterHub.template_vars
    assert template_vars["x"] == 1 and template_vars["gpushare_service"] == "gpushare"
    assert isinstance(template_vars["announcement"], ReclaimAnnouncement)
    assert isinstance(template_vars["announcement_home"], ReclaimAnnouncement)
    assert "announcement_spawn" not in template_vars  # the generic one shows there
    # nothing of ours for a user without a reclaimed server, or before login
    idle = SimpleNamespace(reclaim_notice=None, active=False, ready=False)
    user = SimpleNamespace(spawners={"": idle})
    assert template_vars["announcement_home"](user) == "<b>Exam on Friday</b>"
    assert template_vars["announcement"](None) == ""
    # configure(c) twice does not wrap twice
    gpushare_config.configure(c)
    assert template_vars["announcement_home"].before == "<b>Exam on Friday</b>"


def test_a_reclaim_notice_is_text_escaped_and_gone_once_the_server_runs():
    now = 1_800_000_000.0
    notice = {
        "at": now - 600,
        "idle_seconds": 1290,
        "waiting": 3,
        "reason": "idle",
        "user": "<img src=x onerror=alert(1)>",
    }
    stopped = SimpleNamespace(reclaim_notice=notice, active=False, ready=False)
    user = SimpleNamespace(spawners={"<b>gpu</b>": stopped})
    html = notices_html(user, now=now)
    assert "Your server &#x27;&lt;b&gt;gpu&lt;/b&gt;&#x27; was stopped 10 minutes ago" in html
    assert time.strftime("(at %H:%M UTC)", time.gmtime(now - 600)) in html
    assert "it had been idle for 22 minutes while 3 people waited for a GPU slice" in html
    assert "Your files are kept" in html and "<b>" not in html and "<img" not in html
    held = {**notice, "reason": "max-hold", "held_seconds": 4 * 3600, "waiting": 1}
    user = SimpleNamespace(
        spawners={"": SimpleNamespace(reclaim_notice=held, active=False, ready=False)}
    )
    assert "it had held its GPU slice for 4.0 hours while 1 person waited" in notices_html(
        user, now=now
    )
    # while it starts again (a hub without profiles starts it at login), and no longer
    starting = SimpleNamespace(reclaim_notice=notice, active=True, ready=False)
    text = notices_html(SimpleNamespace(spawners={"": starting}), now=now)
    assert "Your files were kept; it is starting again now." in text
    running = SimpleNamespace(reclaim_notice=notice, active=True, ready=True)
    assert notices_html(SimpleNamespace(spawners={"": running}), now=now) == ""


@pytest.mark.parametrize("value", [None, "", "text"])
def test_announcement_values_of_every_kind(value):
    announcement = ReclaimAnnouncement(value)
    assert announcement(None) == (value or "")
    assert ReclaimAnnouncement(lambda user: "from a callable")(None) == "from a callable"
