"""Waiting for a condition, with a timeout and a message that says what was awaited.

Tests and benchmarks never sleep to synchronise: they wait for what they need.
:func:`wait_for` is the one helper for code on an event loop (its predicate may
be a plain or an async function); :func:`wait_until` is the same loop for the
few places that start processes before any event loop runs.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


class TimedOut(AssertionError):
    """A condition did not hold in time; in a test, that is a failed assertion."""


def _timed_out(timeout: float, what: str, last: object) -> TimedOut:
    return TimedOut(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


async def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Call ``predicate`` until it returns something truthy, and return that.

    ``predicate`` may return an awaitable. Raises :class:`TimedOut` naming
    ``what`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, last)
        await asyncio.sleep(interval)


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """:func:`wait_for` for code that runs before any event loop (process start-up)."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, last)
        time.sleep(interval)
