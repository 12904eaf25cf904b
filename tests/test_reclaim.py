"""Reclaim decisions and wait bounds, without a cluster (jupyterhub_gpushare.reclaim)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyterhub_gpushare import messages
from jupyterhub_gpushare.clusterview import ClusterView
from jupyterhub_gpushare.fairqueue import FairQueue, Ticket
from jupyterhub_gpushare.reclaim import (
    IDLE,
    MAX_HOLD,
    CullerSettings,
    Policy,
    ServerActivity,
    Supply,
    activity_of,
    holdings,
    outlook,
    parse_time,
    plan,
)
from jupyterhub_gpushare.tickets import WAITING, TicketStatus
from tests.test_fairqueue import ANY_GPU, GPU, H200, RTX, node, pod, request

MINUTE = 60.0
ON = Policy(
    enabled=True, idle_seconds=20 * MINUTE, check_seconds=10, stop_seconds=20, step_seconds=2
)


def world(*nodes) -> FairQueue:
    view = ClusterView([GPU])
    for n in nodes:
        view.apply_node(n["metadata"]["name"], n)
    return FairQueue(view)


def hold(q: FairQueue, user: str, node_name: str, slices: int = 1, server: str = "") -> str:
    key = f"ns/jupyter-{user}"
    q.view.apply_pod(key, pod(f"jupyter-{user}", node_name, slices, user=user, server=server))
    return key


def seen(user, last, started=0.0, server="", pending=None, ready=True, groups=()):
    return ServerActivity(user, server, last, started, pending, ready, frozenset(groups))


def activity(*servers: ServerActivity) -> dict:
    return {(s.user, s.server): s for s in servers}


def users_of(needs) -> list[str]:
    return [n.holding.user for n in needs]


NOW = 10_000.0


def four_holders_two_idle() -> tuple[FairQueue, dict]:
    q = world(node("a", 4))
    for user in ("busy1", "idle30", "busy2", "idle25"):
        hold(q, user, "a")
    act = activity(
        seen("busy1", NOW - 60),
        seen("idle30", NOW - 30 * MINUTE),
        seen("busy2", NOW - 5),
        seen("idle25", NOW - 25 * MINUTE),
    )
    return q, act


def test_the_line_gets_the_longest_idle_servers_and_no_more():
    q, act = four_holders_two_idle()
    q.join(request(1), now=NOW)
    found = holdings(q.view, act, ON)
    assert users_of(plan(found, q.view, q.waiting(), NOW)) == ["idle30"]
    q.join(request(2), now=NOW)
    assert users_of(plan(found, q.view, q.waiting(), NOW)) == ["idle30", "idle25"]
    # a third waiting user: the active servers are never reclaimed for them
    q.join(request(3), now=NOW)
    assert users_of(plan(found, q.view, q.waiting(), NOW)) == ["idle30", "idle25"]
    needs = plan(found, q.view, q.waiting(), NOW)
    assert [n.ticket.id for n in needs] == ["t1", "t2"]
    assert all(n.holding.reason(NOW) == IDLE for n in needs)


@pytest.mark.parametrize("idle_minutes", [21, 600, 10**6])
def test_nobody_is_reclaimed_while_nobody_waits(idle_minutes):
    q, _ = four_holders_two_idle()
    act = activity(*(seen(u, NOW - idle_minutes * MINUTE) for u in ("busy1", "idle30")))
    found = holdings(q.view, act, ON)
    assert plan(found, q.view, q.waiting(), NOW) == []
    # held places and tickets read back after a restart (not confirmed) are not waiting
    q.restore([Ticket("t9", "ghost", "", 1, ANY_GPU, 1.0)], now=NOW, confirm_seconds=15)
    q.join(request(8), now=NOW)
    q.hold("t8", now=NOW)
    assert plan(found, q.view, q.waiting(), NOW) == []


def test_exempt_users_and_groups_and_active_users_are_never_reclaimed():
    q = world(node("a", 3))
    for user in ("teacher", "ta", "worker"):
        hold(q, user, "a")
    act = activity(
        seen("teacher", NOW - 10 * 3600),
        seen("ta", NOW - 10 * 3600, groups=["staff"]),
        seen("worker", NOW - 60),
    )
    policy = Policy(
        enabled=True,
        idle_seconds=20 * MINUTE,
        exempt_users=frozenset({"teacher"}),
        exempt_groups=frozenset({"staff"}),
    )
    q.join(request(1), now=NOW)
    found = {h.user: h for h in holdings(q.view, act, policy)}
    assert found["teacher"].exempt == "exempt user"
    assert found["ta"].exempt == "in exempt group staff"
    assert found["teacher"].reclaim_at is None and found["ta"].reclaim_at is None
    assert found["worker"].reclaim_at == NOW - 60 + 20 * MINUTE
    assert plan(list(found.values()), q.view, q.waiting(), NOW) == []


def test_only_holders_whose_slices_the_waiting_could_use():
    q = world(node("rtx", 1, product="RTX"), node("h200", 1, product="H200"))
    hold(q, "on-rtx", "rtx")
    hold(q, "on-h200", "h200")
    act = activity(seen("on-rtx", NOW - 3600), seen("on-h200", NOW - 1800))
    q.join(request(1, pool=RTX), now=NOW)
    found = holdings(q.view, act, ON)
    assert users_of(plan(found, q.view, q.waiting(), NOW)) == ["on-rtx"]
    q.join(request(2, pool=H200), now=NOW)
    assert users_of(plan(found, q.view, q.waiting(), NOW)) == ["on-rtx", "on-h200"]


def test_slices_being_freed_count_before_anyone_is_reclaimed():
    q, act = four_holders_two_idle()
    act[("busy1", "")] = seen("busy1", NOW - 60, pending="stop")  # its user pressed Stop
    q.join(request(1), now=NOW)
    found = holdings(q.view, act, ON)
    assert plan(found, q.view, q.waiting(), NOW) == []
    q.join(request(2), now=NOW)
    assert users_of(plan(found, q.view, q.waiting(), NOW)) == ["idle30"]
    # a server the service already stopped counts too, until its pod is gone
    found = holdings(q.view, act, ON, stopping_since={"ns/jupyter-idle30": NOW - 1})
    assert users_of(plan(found, q.view, q.waiting(), NOW)) == []


def test_a_spawn_nothing_can_make_room_for_blocks_reclaims_behind_it():
    q = world(node("a", 2), node("b", 2))
    for user, where in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")):
        hold(q, user, where)
    # only one server per node is idle: nobody can free two slices on one node
    act = activity(
        seen("a1", NOW - 3600), seen("a2", NOW - 5), seen("b1", NOW - 3000), seen("b2", NOW - 5)
    )
    q.join(request(1, slices=2), now=NOW)
    q.join(request(2), now=NOW)
    found = holdings(q.view, act, ON)
    # the 1-slice spawn waits behind the 2-slice one (admission keeps freed slices
    # for the head), so stopping a server for it would free a slice nobody takes
    assert plan(found, q.view, q.waiting(), NOW) == []


def test_max_hold_time_reclaims_active_servers_after_the_idle_ones():
    q = world(node("a", 2))
    hold(q, "marathon", "a")
    hold(q, "napper", "a")
    act = activity(seen("marathon", NOW - 5, started=0.0), seen("napper", NOW - 1500, started=NOW))
    policy = Policy(enabled=True, idle_seconds=20 * MINUTE, max_hold_seconds=3600)
    q.join(request(1), now=NOW)
    q.join(request(2), now=NOW)
    needs = plan(holdings(q.view, act, policy), q.view, q.waiting(), NOW)
    assert users_of(needs) == ["napper", "marathon"]
    assert [n.holding.reason(NOW) for n in needs] == [IDLE, MAX_HOLD]


def test_dry_run_knows_the_deadlines_but_promises_nothing():
    q, act = four_holders_two_idle()
    q.join(request(1), now=NOW)
    dry = Policy(enabled=True, dry_run=True, idle_seconds=20 * MINUTE, max_hold_seconds=7200)
    found = holdings(q.view, act, dry)
    assert users_of(plan(found, q.view, q.waiting(), NOW)) == ["idle30"]
    assert all(h.hard_deadline is None for h in found)
    assert all(h.expected_free is None for h in found)


def test_the_hubs_user_models_are_read_as_they_come():
    users = [
        {
            "name": "ann",
            "groups": ["staff", 3],
            "servers": {
                "": {
                    "last_activity": "2026-01-02T03:04:05.678901Z",
                    "started": "2026-01-02T01:00:00Z",
                    "pending": None,
                    "ready": True,
                },
                "named": "nonsense",
            },
        },
        {"name": "ben", "servers": {"x": {"last_activity": "yesterday", "pending": "stop"}}},
    ]
    found = activity_of(users)
    assert set(found) == {("ann", ""), ("ben", "x")}
    ann = found[("ann", "")]
    assert ann.last_activity == pytest.approx(parse_time("2026-01-02T03:04:05.678901+00:00"))
    assert ann.groups == frozenset({"staff"})
    ben = found[("ben", "x")]
    assert ben.last_activity is None and ben.pending == "stop" and not ben.ready


# -- the estimate and the bound ------------------------------------------------------------


def supply_for(q: FairQueue, found) -> Supply:
    return Supply.of(ANY_GPU.key, GPU, q.view, found)


def test_no_bound_without_a_deadline_that_cannot_move():
    q, act = four_holders_two_idle()
    ticket = q.join(request(1), now=NOW)
    found = holdings(q.view, act, ON)
    result = outlook(ticket, q.places()[ticket.id], supply_for(q, found), ON, NOW)
    assert result.bound_at is None
    # the estimate: the longest idle server is past its idle deadline, so it is
    # reclaimed as soon as the spawn waits (half a stop's time, on average)
    assert result.eta_at == pytest.approx(NOW + 10)
    # with the two idle servers gone, the next one is expected at busy1's deadline
    second = q.join(request(2), now=NOW)
    second = q.join(request(3), now=NOW)
    result = outlook(second, q.places()[second.id], supply_for(q, found), ON, NOW)
    assert result.eta_at == pytest.approx(NOW - 60 + 20 * MINUTE + 5 + 10)


def test_maximum_hold_time_bounds_the_wait():
    q = world(node("a", 2))
    hold(q, "x", "a")
    hold(q, "y", "a")
    act = activity(seen("x", NOW, started=NOW - 3000), seen("y", NOW, started=NOW - 1000))
    policy = Policy(
        enabled=True,
        idle_seconds=1200,
        max_hold_seconds=3600,
        check_seconds=10,
        stop_seconds=20,
        step_seconds=2,
    )
    first = q.join(request(1, at=NOW), now=NOW)
    second = q.join(request(2, at=NOW + 1), now=NOW + 1)
    found = holdings(q.view, act, policy)
    supply = supply_for(q, found)
    one = outlook(first, q.places()[first.id], supply, policy, NOW)
    two = outlook(second, q.places()[second.id], supply, policy, NOW)
    # x's deadline: started + max hold, the service's reaction time, one stop
    assert one.bound_at == NOW - 3000 + 3600 + 10 + (20 + 2)
    # y's is later, and two stops come before the second spawn's slice
    assert two.bound_at == NOW - 1000 + 3600 + 10 + 2 * (20 + 2)
    assert one.eta_at <= one.bound_at and two.eta_at <= two.bound_at
    # a stop already in flight for this line goes first
    busy = outlook(first, q.places()[first.id], supply, policy, NOW, stop_in_flight=True)
    assert busy.bound_at == one.bound_at + 22


def test_the_cullers_maximum_age_bounds_the_wait_without_reclaim():
    q = world(node("a", 1))
    hold(q, "x", "a")
    act = activity(seen("x", NOW, started=NOW - 100))
    policy = Policy(culler=CullerSettings(timeout=3600, every=600, max_age=8 * 3600))
    ticket = q.join(request(1, at=NOW), now=NOW)
    supply = supply_for(q, holdings(q.view, act, policy))
    result = outlook(ticket, q.places()[ticket.id], supply, policy, NOW)
    culled_by = NOW - 100 + 8 * 3600 + 600 + policy.stop_seconds
    assert result.bound_at == culled_by + policy.check_seconds + (
        policy.stop_seconds + policy.step_seconds
    )
    # a culler that spares some servers bounds nothing
    spares = Policy(culler=CullerSettings(max_age=8 * 3600, culls_every_server=False))
    found = holdings(q.view, act, spares)
    assert (
        outlook(ticket, q.places()[ticket.id], supply_for(q, found), spares, NOW).bound_at is None
    )


def test_several_slices_on_one_node_are_bounded_only_at_the_head():
    q = world(node("a", 2), node("b", 2))
    for user, where in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        hold(q, user, where)
    act = activity(
        seen("a1", NOW, started=NOW - 3000 + 0),
        seen("a2", NOW, started=NOW - 3000 + 500),
        seen("b1", NOW, started=NOW - 3000 + 100),
    )
    policy = Policy(
        enabled=True, max_hold_seconds=3600, check_seconds=10, stop_seconds=20, step_seconds=2
    )
    found = holdings(q.view, act, policy)
    head = q.join(request(1, slices=2, at=NOW), now=NOW)
    # node b has a free slice and b1's deadline; node a needs both a1 and a2
    result = outlook(head, q.places()[head.id], supply_for(q, found), policy, NOW)
    assert result.bound_at == NOW - 3000 + 100 + 3600 + 10 + 22
    behind = q.join(request(2, at=NOW + 1), now=NOW + 1)
    place = q.places()[behind.id]
    assert place.multi_slice_ahead
    assert outlook(behind, place, supply_for(q, found), policy, NOW).bound_at is None


def test_a_deadline_long_past_is_acted_on_once_someone_waits():
    q = world(node("a", 1))
    hold(q, "x", "a")
    act = activity(seen("x", NOW, started=NOW - 10 * 3600))
    policy = Policy(
        enabled=True, max_hold_seconds=3600, check_seconds=10, stop_seconds=20, step_seconds=2
    )
    ticket = q.join(request(1, at=NOW), now=NOW)
    supply = supply_for(q, holdings(q.view, act, policy))
    assert outlook(ticket, q.places()[ticket.id], supply, policy, NOW + 5).bound_at == (
        NOW + 5 + 10 + 22
    )


# -- the bound holds: a simulated hour of a busy pool --------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    slices=st.integers(1, 5),
    arrivals=st.integers(1, 8),
    max_hold=st.sampled_from([300.0, 900.0]),
)
def test_every_bound_shown_holds(seed, slices, arrivals, max_hold):
    """Users come and go, work or idle, at random; reclaim runs every check_seconds,
    one stop per line at a time, each taking up to stop_seconds; no spawn is
    admitted later than any bound it was shown."""
    rng = random.Random(seed)
    check, stop = 5.0, 15.0
    # decisions every `check` seconds: that is also the step between two stops
    policy = Policy(
        enabled=True,
        idle_seconds=600,
        max_hold_seconds=max_hold,
        check_seconds=check,
        stop_seconds=stop,
        step_seconds=check,
    )
    q = world(node("a", slices))
    active_until: dict[str, float] = {}
    started: dict[str, float] = {}
    for i in range(slices):
        user = f"h{i}"
        hold(q, user, "a")
        started[user] = -rng.uniform(0, 2 * max_hold)
        active_until[user] = rng.choice([math.inf, rng.uniform(-900, 900)])
    joins = sorted(rng.uniform(0, 600) for _ in range(arrivals))
    promised: dict[str, float] = {}  # ticket -> the earliest bound it was shown
    admitted: dict[str, float] = {}
    deleting: dict[str, float] = {}  # pod -> when its deletion completes
    stopping_since: dict[str, float] = {}
    slot: dict[str, str] = {}  # one stop at a time per line
    t = 0.0
    end = arrivals * (max_hold + 100) + 2000  # enough for every spawn to get a slice
    while t < end and len(admitted) < arrivals:
        for i, at in enumerate(joins):
            if at <= t and f"t{i}" not in q.tickets and f"t{i}" not in admitted:
                q.join(request(i, at=at, user=f"w{i}"), now=t)
        for key in [k for k, done in deleting.items() if done <= t]:
            q.view.apply_pod(key, None)
            del deleting[key], stopping_since[key]
            slot = {p: k for p, k in slot.items() if k != key}
        for ticket in q.admit(now=t):
            admitted[ticket.id] = t
            user = ticket.user
            hold(q, user, ticket.node)
            started[user] = t
            active_until[user] = t + rng.uniform(0, 900)
            q.settle({ticket.id}, now=t)
        act = activity(
            *(
                seen(u, min(t, active_until[u]) if active_until[u] > started[u] else None, s)
                for u, s in started.items()
                if f"ns/jupyter-{u}" in q.view.pods
            )
        )
        found = holdings(q.view, act, policy, stopping_since)
        supply = supply_for(q, found)
        for ticket in q.waiting():
            busy = ticket.pool.key in slot
            place = q.places()[ticket.id]
            bound = outlook(ticket, place, supply, policy, t, stop_in_flight=busy).bound_at
            if bound is not None:
                promised[ticket.id] = min(promised.get(ticket.id, math.inf), bound)
        if t % check == 0:
            for need in plan(found, q.view, q.waiting(), t):
                pool, key = need.ticket.pool.key, need.holding.pod
                if pool in slot or key in stopping_since:
                    continue
                slot[pool] = key
                stopping_since[key] = t
                deleting[key] = t + rng.uniform(1, stop)
        t += 1.0
    for ticket_id, bound in promised.items():
        assert admitted.get(ticket_id, t) <= bound, (ticket_id, admitted.get(ticket_id), bound)


def test_waiting_tickets_know_what_competes_ahead_of_them():
    q = world(node("rtx", 1, product="RTX"))
    q.join(request(1, pool=RTX, slices=2), now=0)
    q.join(request(2, pool=ANY_GPU), now=0)
    q.restore([Ticket("t0", "back", "", 1, ANY_GPU, 0.5)], now=0, confirm_seconds=15)
    places = q.places()
    assert places["t2"].rival_slices_ahead == 3
    assert places["t2"].multi_slice_ahead and places["t2"].unconfirmed_ahead
    assert q.tickets["t2"].state == WAITING


# -- what waiting users read -----------------------------------------------------------


@pytest.mark.parametrize(
    "eta,bound,text",
    [
        (None, None, "unknown"),
        (240, None, "about 4 minutes"),
        (240, 1190, "about 4 minutes, at most 20"),
        (30, 45, "about a minute, at most 1 minute"),
        (None, 301, "at most 6 minutes"),  # a bound is rounded up, never down
        (5000, 9000, "about 1.4 hours, at most 2.5 hours"),
    ],
)
def test_the_wait_in_words(eta, bound, text):
    assert messages.format_wait(eta, bound) == text


def test_the_spawn_page_counts_the_bound_down():
    status = TicketStatus(
        ticket="t", state="waiting", position=1, waiting=2, eta_at=1240.0, eta_bound_at=2200.0
    )
    assert (
        "Estimated wait: about 4 minutes, at most 20."
        in (messages.queue_message(status, now=1000.0)["message"])
    )
    later = messages.queue_message(status, now=1700.0)
    assert "Estimated wait: about a minute, at most 9 minutes." in later["message"]
    assert "at most 9 minutes" in later["html_message"]
