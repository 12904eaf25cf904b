"""What a user whose GPU server was reclaimed reads on the hub's own pages.

JupyterHub shows ``announcement`` (and ``announcement_home``, ``_spawn``, ...)
at the top of its pages; ``configure(c)`` sets them to a
:class:`ReclaimAnnouncement`, which JupyterHub calls with the user on every
render. It reads only what the user's spawners hold in memory (the notice the
service gave the spawner when it stopped the server, kept in the spawner's
state), never the network or the database, and keeps any announcement the
admin had configured after ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from html import escape
from typing import Any

# the template variables JupyterHub reads announcements from: one for every page,
# and the page-specific ones, which win over it where an admin set them
ANNOUNCEMENTS = ("announcement", "announcement_home", "announcement_spawn")


def _minutes(seconds: float) -> str:
    minutes = max(round(seconds / 60), 1)
    if minutes < 120:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{minutes / 60:.1f} hours"


def _ago(seconds: float) -> str:
    return "just now" if seconds < 60 else f"{_minutes(seconds)} ago"


def notice_text(notice: dict, server: str, now: float, starting: bool = False) -> str:
    """One reclaimed server, in words for its user."""
    at = float(notice.get("at") or now)
    idle = float(notice.get("idle_seconds") or 0)
    waiting = int(notice.get("waiting") or 0)
    people = "1 person" if waiting == 1 else f"{waiting} people"
    which = f"Your server {server!r}" if server else "Your server"
    clock = time.strftime("%H:%M UTC", time.gmtime(at))
    if notice.get("reason") == "max-hold":
        held = float(notice.get("held_seconds") or 0)
        why = f"it had held its GPU slice for {_minutes(held)} while {people} waited for one"
    else:
        why = f"it had been idle for {_minutes(idle)} while {people} waited for a GPU slice"
    after = (
        "Your files were kept; it is starting again now."
        if starting
        else "Your files are kept; start it again whenever you need it."
    )
    stopped = f"{which} was stopped {_ago(now - at)} (at {clock}) to free its GPU slice"
    return f"{stopped}: {why}. {after}"


def notices_html(user: Any, now: float | None = None) -> str:
    """The notices of every reclaimed server of ``user`` (a JupyterHub User), as HTML."""
    if user is None:
        return ""
    now = time.time() if now is None else now
    spawners = getattr(user, "spawners", None) or {}
    parts = []
    for name, spawner in sorted(spawners.items()):
        notice = getattr(spawner, "reclaim_notice", None)
        if isinstance(notice, dict) and not getattr(spawner, "ready", False):
            # shown until the server runs again: also while it starts (a hub
            # without profiles starts the server right after login)
            text = notice_text(notice, name, now, starting=bool(getattr(spawner, "active", False)))
            parts.append(
                f'<span class="gpushare-reclaimed" data-server="{escape(name)}">'
                f"{escape(text)}</span>"
            )
    return "<br>".join(parts)


class ReclaimAnnouncement:
    """A template variable that shows reclaim notices before an admin's announcement."""

    def __init__(self, before: str | Callable[[Any], str] | None = None) -> None:
        self.before = before

    def __call__(self, user: Any) -> str:
        theirs = self.before(user) if callable(self.before) else self.before
        ours = notices_html(user)
        return "<br>".join(part for part in (ours, theirs) if part)


def add_announcements(template_vars: dict) -> dict:
    """``template_vars`` with our notices in every announcement JupyterHub shows."""
    result = dict(template_vars)
    for key in ANNOUNCEMENTS:
        current = result.get(key)
        if isinstance(current, ReclaimAnnouncement):
            continue
        if key == "announcement" or current is not None:
            result[key] = ReclaimAnnouncement(current)
    return result
