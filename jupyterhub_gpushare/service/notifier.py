"""Who follows which spawn, and waking them when their status may have changed.

The hub's spawners follow their ticket over an event stream. A change of the
line or of a pool's capacity only *marks* the followers it may concern; each
follower's stream then works out its own status when it next runs, and sends
it only if it differs from the last one it sent. So the cycle that handles a
watch event does a little work per follower, not a status each, and a
follower that falls behind computes once for several changes.

A ticket that leaves the line is told so once and then forgotten, so nothing
here grows with the number of spawns ever made. How long a ticket has had no
follower is how the service learns that a spawn went away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable


class Follower:
    """One open event stream of a ticket."""

    __slots__ = ("changed", "final", "last")

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.changed.set()  # the stream starts with the current status
        self.last: dict | None = None  # what it sent last
        self.final: dict | None = None  # the ticket left the line: this is the last word


class Notifier:
    def __init__(self) -> None:
        self.followers: dict[str, set[Follower]] = {}
        self._alone_since: dict[str, float] = {}  # tickets nobody follows, since when

    def follow(self, ticket_id: str) -> Follower:
        follower = Follower()
        self.followers.setdefault(ticket_id, set()).add(follower)
        self._alone_since.pop(ticket_id, None)
        return follower

    def unfollow(self, ticket_id: str, follower: Follower) -> None:
        followers = self.followers.get(ticket_id)
        if followers is None:
            return
        followers.discard(follower)
        if not followers:
            del self.followers[ticket_id]
            self._alone_since[ticket_id] = time.time()

    def touch(self, ticket_ids: Iterable[str] | None = None) -> None:
        """Wake the followers of these tickets (None: of every ticket)."""
        if ticket_ids is None:
            groups = self.followers.values()
        else:
            groups = (self.followers[t] for t in ticket_ids if t in self.followers)
        for group in groups:
            for follower in group:
                follower.changed.set()

    def gone(self, ticket_id: str, status: dict) -> None:
        """The ticket left the line: its followers get ``status`` and stop."""
        for follower in self.followers.get(ticket_id, ()):
            follower.final = status
            follower.changed.set()
        self._alone_since.pop(ticket_id, None)

    def watch(self, ticket_id: str, now: float) -> None:
        """Start counting how long a new ticket goes without a follower."""
        if ticket_id not in self.followers:
            self._alone_since.setdefault(ticket_id, now)

    def alone(self, longer_than: float, now: float) -> list[str]:
        """Tickets nobody has followed for longer than ``longer_than`` seconds."""
        return [t for t, since in self._alone_since.items() if now - since > longer_than]

    def followed(self) -> Iterable[str]:
        return self.followers.keys()

    def prune(self, known: set[str]) -> None:
        """Forget the unfollowed tickets that are no longer in the line."""
        for ticket_id in [t for t in self._alone_since if t not in known]:
            del self._alone_since[ticket_id]
