"""One spawn's way through the GPU line, as the hub's spawner lives it.

:class:`QueuePlace` is everything a spawn does with the queue service: join,
follow its ticket, reconnect when the service restarts, go ahead without it
when it stays away, give up at the queue timeout, keep following once admitted
(so the service knows the spawn is alive until its pod holds the slices),
book slices again for a pod the node rejected, and leave. Its background work
runs as supervised tasks whose failures are logged and kept. The spawner's
``progress()`` reads what it shows; ``stop()`` makes it leave.

:class:`StartGate` limits how many servers of one hub start at once, *after*
the line: waiting for a GPU slice does not hold one of these places, and a
CPU-only server never waits behind the GPU line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from . import messages
from .queueclient import QueueClient, QueueRefused, QueueRejected, QueueUnavailable
from .tickets import ADMITTED, GONE, TicketRequest, TicketStatus

RECONNECT_SECONDS = 2.0


class QueueTimeout(Exception):
    """No slice became free within the queue timeout."""


class QueuePlace:
    """``client`` None: no queue to join, only what the progress page shows."""

    def __init__(self, client: QueueClient | None, log: logging.Logger, name: str) -> None:
        self.client = client
        self.log = log
        self.name = name  # the server, for log lines
        self.request: TicketRequest | None = None
        self.status: TicketStatus | None = None
        self.note: str | None = None
        self.in_line = True  # until the server may start (admitted, or no queue)
        self.failure: BaseException | None = None
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._left = False

    @property
    def ticket(self) -> str | None:
        return self.request.id if self.request else None

    # -- what progress() shows -------------------------------------------------------
    def update(self, status: TicketStatus | None = None, note: str | None = None) -> None:
        if status is not None:
            self.status = status
        if note is not None:
            self.note = note
        # wake every progress() reader (one per open tab)
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_for_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def view(self) -> tuple:
        """What the page shows now; progress() yields when this changes."""
        return (self.status, self.note)

    def progress_event(self) -> dict | None:
        status = self.status
        waiting = status is not None and status.state == "waiting"
        if self.note and not waiting:
            return {"progress": 5, "message": self.note}
        if waiting:
            return {"progress": 2, **messages.queue_message(status)}
        return None

    # -- the line ------------------------------------------------------------------
    async def join(
        self, request: TicketRequest, queue_timeout: float, unreachable_timeout: float
    ) -> TicketStatus | None:
        """Wait in line until admitted; the admitting status, or None to go ahead
        without the queue (the service stayed unreachable).

        Raises :class:`QueueTimeout`, :class:`QueueRefused` (a per-user limit,
        with a message for the user) or :class:`QueueRejected` (a bug or a
        misconfiguration). Cancelled or failed, the spawn leaves the line.
        """
        self.request = request
        deadline = request.requested_at + queue_timeout
        unreachable_since = None
        try:
            while True:
                try:
                    status = await self.client.join(request)
                    self.update(status)
                    if status.state != ADMITTED:
                        status = await asyncio.wait_for(self._follow(), deadline - time.time())
                    if status.state == ADMITTED:
                        self.update(note="A GPU slice is free: starting your server")
                        self.background(self._keep_following(), "follow the admitted ticket")
                        return status
                    unreachable_since = None  # gone: join again, keeping our place
                except QueueUnavailable as e:
                    now = time.time()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > unreachable_timeout:
                        self.log.warning(
                            "GPU queue service unreachable for %.0fs (%s); starting %s without it",
                            now - unreachable_since,
                            e,
                            self.name,
                        )
                        self.update(
                            note="The GPU queue service cannot be reached: starting without "
                            "it, Kubernetes will place your server when a slice is free"
                        )
                        return None
                    self.update(note="Reconnecting to the GPU queue service")
                    await asyncio.sleep(min(RECONNECT_SECONDS, max(deadline - time.time(), 0)))
                if time.time() >= deadline:
                    raise asyncio.TimeoutError
        except asyncio.TimeoutError:
            await self.leave("timeout")
            raise QueueTimeout from None
        except (QueueRefused, QueueRejected):
            raise
        except BaseException:
            # cancelled (Stop Server, the REST API, the hub going away) or failed
            await asyncio.shield(self.leave("cancelled"))
            raise

    async def _follow(self) -> TicketStatus:
        async for status in self.client.follow(self.ticket):
            self.update(status)
            if status.state in (ADMITTED, GONE):
                return status
        raise QueueUnavailable("event stream ended")

    async def _keep_following(self) -> None:
        """Stay on the ticket's stream until the pod holds the slices (the service
        then says the ticket is gone), so the service knows this spawn is alive."""
        while not self._left:
            try:
                async for status in self.client.follow(self.ticket):
                    if status.state == GONE:
                        return
            except QueueUnavailable:
                pass
            await asyncio.sleep(RECONNECT_SECONDS)

    async def rebook(self) -> None:
        """The node rejected our pod, which gave its slices back: book them again
        (the service puts us first in line if someone took them meanwhile)."""
        if self.request is None:
            return
        request = dataclasses.replace(self.request, admitted=True)
        while True:
            try:
                status = await self.client.join(request)
                if status.state != ADMITTED:
                    status = await self._follow()
                if status.state == ADMITTED:
                    return
            except QueueUnavailable as e:
                self.log.warning("Could not book slices again for %s: %s", self.name, e)
            await asyncio.sleep(RECONNECT_SECONDS)

    async def leave(self, reason: str) -> None:
        """Leave the line (once); never raises."""
        if self._left or self.ticket is None:
            return
        self._left = True
        try:
            await self.client.leave(self.ticket, reason)
        except QueueUnavailable as e:
            self.log.info("Could not tell the GPU queue that %s left (%s)", self.name, e)

    # -- background work ------------------------------------------------------------
    def background(self, work: Coroutine[Any, Any, Any], what: str) -> asyncio.Task:
        """Run ``work`` beside the spawn; a failure is logged and kept in ``failure``."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                self.failure = task.exception()
                self.log.error(
                    "Background work for %s failed (%s): %s", self.name, what, self.failure
                )

        task.add_done_callback(done)
        return task

    async def close(self, reason: str) -> None:
        """The spawn is over: leave the line and stop the background work."""
        await self.leave(reason)
        for task in list(self._tasks):
            task.cancel()


class StartGate:
    """At most ``limit`` servers of this hub in their start-up at once, first come
    first served. Entering returns at once while there is room."""

    def __init__(self) -> None:
        self.active: set[int] = set()
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self, key: int, limit: int) -> None:
        if key in self.active:
            return
        if not limit or (len(self.active) < limit and not self._waiting):
            self.active.add(key)
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((key, future))
        try:
            await future
        except BaseException:
            self._waiting = deque(w for w in self._waiting if w[0] != key)
            if future.done() and not future.cancelled():
                self.leave(key, limit)  # it was let in just as it gave up
            raise

    def leave(self, key: int, limit: int) -> None:
        self.active.discard(key)
        while self._waiting and (not limit or len(self.active) < limit):
            waiting_key, future = self._waiting.popleft()
            if not future.done():
                self.active.add(waiting_key)
                future.set_result(None)
