"""Who follows which spawn, and telling them when (and only when) it changes.

The hub's spawners follow their ticket over an event stream. A status is sent
to a follower when it differs from the last one sent for that ticket; a ticket
that leaves the line is told so once and then forgotten, so nothing here grows
with the number of spawns ever made. How long a ticket has had no follower is
how the service learns that a spawn went away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping


class Notifier:
    def __init__(self) -> None:
        self.followers: dict[str, set[asyncio.Queue]] = {}
        self._sent: dict[str, dict] = {}  # last status sent, for followed tickets
        self._alone_since: dict[str, float] = {}  # tickets nobody follows, since when

    def follow(self, ticket_id: str, status: dict) -> asyncio.Queue:
        follower: asyncio.Queue = asyncio.Queue()
        self.followers.setdefault(ticket_id, set()).add(follower)
        self._alone_since.pop(ticket_id, None)
        follower.put_nowait(status)
        self._sent[ticket_id] = status
        return follower

    def unfollow(self, ticket_id: str, follower: asyncio.Queue) -> None:
        followers = self.followers.get(ticket_id)
        if followers is None:
            return
        followers.discard(follower)
        if not followers:
            del self.followers[ticket_id]
            self._sent.pop(ticket_id, None)
            self._alone_since[ticket_id] = time.time()

    def watch(self, ticket_id: str, now: float) -> None:
        """Start counting how long a new ticket goes without a follower."""
        if ticket_id not in self.followers:
            self._alone_since.setdefault(ticket_id, now)

    def alone(self, longer_than: float, now: float) -> list[str]:
        """Tickets nobody has followed for longer than ``longer_than`` seconds."""
        return [t for t, since in self._alone_since.items() if now - since > longer_than]

    def publish(self, statuses: Mapping[str, dict]) -> int:
        """Send each followed ticket's status if it changed; returns how many were sent."""
        sent = 0
        for ticket_id, status in statuses.items():
            followers = self.followers.get(ticket_id)
            if not followers or self._sent.get(ticket_id) == status:
                continue
            self._sent[ticket_id] = status
            for follower in followers:
                follower.put_nowait(status)
            sent += len(followers)
        return sent

    def followed(self) -> Iterable[str]:
        return self.followers.keys()

    def prune(self, known: set[str]) -> None:
        """Forget the unfollowed tickets that are no longer in the line."""
        for ticket_id in [t for t in self._alone_since if t not in known]:
            del self._alone_since[ticket_id]

    def gone(self, ticket_id: str, status: dict) -> None:
        """The ticket left the line: tell its followers, then forget it."""
        for follower in self.followers.get(ticket_id, ()):
            follower.put_nowait(status)
        self._sent.pop(ticket_id, None)
        self._alone_since.pop(ticket_id, None)
