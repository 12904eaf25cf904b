"""The start gate that replaces JupyterHub's concurrent_spawn_limit, without a hub."""

from __future__ import annotations

import asyncio

import pytest

from jupyterhub_gpushare.queueplace import StartGate


async def test_the_gate_lets_in_up_to_its_limit_first_come_first_served():
    gate = StartGate()
    await gate.enter(1, limit=2)
    await gate.enter(2, limit=2)
    order = []

    async def wait(key):
        await gate.enter(key, limit=2)
        order.append(key)

    third, fourth = asyncio.ensure_future(wait(3)), asyncio.ensure_future(wait(4))
    await asyncio.sleep(0)
    assert order == [] and gate.waiting() == 2
    gate.leave(1, limit=2)
    await third
    assert order == [3] and not fourth.done()
    gate.leave(2, limit=2)
    await fourth
    assert order == [3, 4] and gate.active == {3, 4}


async def test_a_waiter_that_gives_up_leaves_no_trace():
    gate = StartGate()
    await gate.enter(1, limit=1)
    waiter = asyncio.ensure_future(gate.enter(2, limit=1))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting() == 0
    gate.leave(1, limit=1)
    assert gate.active == set()


async def test_no_limit_never_waits_and_leaving_twice_is_harmless():
    gate = StartGate()
    for key in range(200):
        await gate.enter(key, limit=0)
    gate.leave(0, limit=0)
    gate.leave(0, limit=0)
    assert len(gate.active) == 199
