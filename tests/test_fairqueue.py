"""The fair line over the cluster view, without a cluster."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyterhub_gpushare.capacity import PoolSpec, node_capacities
from jupyterhub_gpushare.clusterview import ClusterView
from jupyterhub_gpushare.fairqueue import (
    BIGGER_FIRST,
    OTHER_LINE_FIRST,
    RECONNECTING,
    FairQueue,
    LimitReached,
    Ticket,
    UserLimits,
)
from jupyterhub_gpushare.tickets import ADMITTED, HELD, WAITING, TicketRequest

GPU = "nvidia.com/gpu"
PRODUCT = "nvidia.com/gpu.product"
ANY_GPU = PoolSpec(GPU)
RTX = PoolSpec.from_selector(GPU, {PRODUCT: "RTX"})
H200 = PoolSpec.from_selector(GPU, {PRODUCT: "H200"})


def node(name, slices, product="RTX", ready=True):
    return {
        "metadata": {"name": name, "labels": {PRODUCT: product}},
        "spec": {},
        "status": {
            "allocatable": {GPU: str(slices)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(name, node_name, slices=1, user=None, server="", ticket=None):
    annotations = {}
    if user:
        annotations["hub.jupyter.org/username"] = user
    if ticket:
        annotations["gpushare.jupyter.org/ticket"] = ticket
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "annotations": annotations,
            "labels": {"hub.jupyter.org/servername": server},
        },
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"limits": {GPU: str(slices)}}}],
        },
        "status": {"phase": "Running"},
    }


def request(i, slices=1, pool=ANY_GPU, at=None, user=None, server="", admitted=False):
    return TicketRequest(
        id=f"t{i}",
        user=user or f"user{i}",
        server=server,
        slices=slices,
        pool=pool,
        requested_at=float(i) if at is None else at,
        admitted=admitted,
    )


def cluster(*nodes, limits=None, **kwargs) -> FairQueue:
    view = ClusterView([GPU])
    for n in nodes:
        view.apply_node(n["metadata"]["name"], n)
    return FairQueue(view, limits=limits or UserLimits(gpu_servers=0), **kwargs)


def ids(tickets):
    return [t.id for t in tickets]


def test_strict_order_and_bookings():
    q = cluster(node("a", 2))
    for i, slices in enumerate([1, 2, 1]):
        q.join(request(i, slices), now=0)
    # t0 fits; t1 needs 2 with 1 left, and t2 may not overtake it
    assert ids(q.admit(now=10)) == ["t0"]
    places = q.places()
    assert (places["t1"].position, places["t1"].waiting) == (1, 2)
    assert (places["t2"].position, places["t2"].waiting) == (2, 2)
    assert "needs 2 on one GPU node" in places["t1"].reason
    assert places["t2"].reason == BIGGER_FIRST
    # the booking keeps t0's slice promised, and the free one is kept for t1
    assert q.admit(now=11) == []
    summary = q.view.pool_summary(ANY_GPU, 2)
    assert (summary["slices_free"], summary["slices_booked"]) == (1, 1)


def test_one_order_across_lines_that_share_nodes():
    # a node that the generic line and the RTX line both can use
    q = cluster(node("rtx", 1, "RTX"))
    q.view.apply_pod("ns/holder", pod("holder", "rtx"))
    q.join(request(0, pool=RTX), now=0)  # early, product-specific
    q.join(request(1, pool=ANY_GPU), now=0)  # later, generic
    assert q.admit(now=1) == []
    assert q.places()["t1"].position == 2  # the RTX request is ahead of it
    q.view.apply_pod("ns/holder", None)
    assert ids(q.admit(now=2)) == ["t0"]


def test_a_blocked_head_blocks_only_requests_for_the_same_gpus():
    q = cluster(node("rtx", 2, "RTX"), node("h200", 1, "H200"))
    q.view.apply_pod("ns/job", pod("job", "rtx"))
    q.join(request(0, slices=2, pool=RTX), now=0)  # needs 2, one is free
    q.join(request(1, pool=RTX), now=0)  # could fit, must wait behind t0
    q.join(request(2, pool=H200), now=0)  # other GPUs: goes ahead
    assert ids(q.admit(now=1)) == ["t2"]
    assert q.places()["t1"].reason == BIGGER_FIRST
    # a generic request may not take the RTX slice that t0 waits for
    q.join(request(3, pool=ANY_GPU), now=0)
    assert q.admit(now=2) == []
    assert q.places()["t3"].reason == OTHER_LINE_FIRST


def test_held_place_is_kept_for_the_same_server_and_then_lost():
    q = cluster(node("a", 1), hold_seconds=300)
    q.view.apply_pod("ns/holder", pod("holder", "a"))
    q.join(request(0, user="ann", at=100.0), now=100)
    q.join(request(1, user="ben", at=200.0), now=200)
    q.hold("t0", now=300)  # the hub restarted: ann's spawn is gone
    assert q.tickets["t0"].state == HELD
    assert q.places()["t1"].position == 1
    # ann starts again within the grace period: her old place, a new ticket
    again = q.join(request(7, user="ann", at=350.0), now=350)
    assert again.kept_place and again.requested_at == 100.0
    assert "t0" not in q.tickets
    assert q.places()["t7"].position == 1
    # ben's spawn goes away too; his place runs out
    q.hold("t1", now=400)
    left, _ = q.expire(now=699)
    assert left == []
    left, _ = q.expire(now=700)
    assert ids(left) == ["t1"]


def test_a_spawn_that_follows_again_takes_its_held_place_back():
    q = cluster(node("a", 1))
    q.view.apply_pod("ns/holder", pod("holder", "a"))
    q.join(request(0, user="ann"), now=0)
    q.join(request(1, user="ben"), now=1)
    # ann's spawn was slow to follow its ticket (a hub busy with a class)
    q.hold("t0", now=20)
    assert q.places()["t1"].position == 1
    assert q.confirm("t0") is True  # it follows now: it is alive
    assert q.tickets["t0"].state == WAITING
    assert [q.places()[t].position for t in ("t0", "t1")] == [1, 2]
    assert q.confirm("t0") is False  # nothing more to take back
    q.view.apply_pod("ns/holder", None)
    assert ids(q.admit(now=30)) == ["t0"]


def test_a_bound_pod_ends_its_ticket_whatever_its_state():
    q = cluster(node("a", 2))
    q.join(request(0), now=0)
    assert ids(q.admit(now=0)) == ["t0"]
    q.hold("t0", now=20)  # admitted, then slow to follow: its booking is gone
    q.confirm("t0")  # back, waiting again at its place
    q.view.apply_pod("ns/p0", pod("p0", "a", ticket="t0"))  # its pod was created anyway
    assert ids(q.settle(q.view.take_changes().bound_tickets, now=21)) == ["t0"]
    assert q.tickets == {} and q.view.booked[(GPU, "a")] == 0


def test_a_held_ticket_never_holds_a_slice():
    q = cluster(node("a", 1))
    q.join(request(0), now=0)
    assert ids(q.admit(now=1)) == ["t0"]
    q.hold("t0", now=2)
    assert q.view.available((GPU, "a")) == 1
    q.join(request(1), now=3)
    assert ids(q.admit(now=3)) == ["t1"]


def test_restored_tickets_wait_for_their_spawn_and_are_never_admitted():
    q = cluster(node("a", 1))
    restored = [Ticket("t0", "ann", "", 1, ANY_GPU, 1.0), Ticket("t1", "ben", "", 1, ANY_GPU, 2.0)]
    q.restore(restored, now=100, confirm_seconds=10)
    q.join(request(5, user="cat", at=150.0), now=101)
    assert q.admit(now=101) == []  # nobody overtakes a ticket that may come back
    assert q.places()["t5"].reason == RECONNECTING
    # ben's spawn comes back (the service restarted, the hub did not)
    q.join(request(1, user="ben", at=2.0), now=103)
    # ann's never does: held, and the next confirmed ticket is admitted
    _, held = q.expire(now=110)
    assert ids(held) == ["t0"]
    assert ids(q.admit(now=110)) == ["t1"]


def test_per_user_limits():
    q = cluster(node("a", 8), limits=UserLimits(gpu_servers=1))
    q.view.apply_pod("ns/a", pod("jupyter-ann", "a", user="ann", server=""))
    with pytest.raises(LimitReached, match="your default server"):
        q.join(request(0, user="ann", server="second"), now=0)
    # the same server starting again, and other users, are fine
    q.join(request(1, user="ann", server=""), now=0)
    q.join(request(2, user="ben", server="x"), now=0)
    with pytest.raises(LimitReached, match="server 'x'"):
        q.join(request(3, user="ben", server="y"), now=0)
    q = cluster(node("a", 8), limits=UserLimits(gpu_servers=0, slices=2))
    q.join(request(0, user="ann", server="a", slices=1), now=0)
    with pytest.raises(LimitReached, match="would hold 3"):
        q.join(request(1, user="ann", server="b", slices=2), now=0)


def test_rebooking_after_a_rejected_pod_never_overbooks():
    q = cluster(node("a", 1))
    q.join(request(0), now=0)
    assert ids(q.admit(now=0)) == ["t0"]
    # its pod was rejected; meanwhile a foreign pod took the slice
    q.view.apply_pod("ns/job", pod("job", "a"))
    q.join(request(0, admitted=True), now=1)
    assert q.view.booked[(GPU, "a")] == 1  # its own booking, not a second one
    q.leave("t0")
    q.join(request(0, admitted=True), now=2)
    assert q.tickets["t0"].state == WAITING  # no room: it waits at its old place
    assert q.view.booked[(GPU, "a")] == 0


def test_booking_ends_when_the_pod_is_bound_or_unused():
    q = cluster(node("a", 2), reservation_seconds=120)
    q.join(request(0), now=0)
    q.join(request(1), now=0)
    assert ids(q.admit(now=0)) == ["t0", "t1"]
    q.view.apply_pod("ns/p0", pod("p0", "a", ticket="t0"))
    assert ids(q.settle(q.view.take_changes().bound_tickets, now=1)) == ["t0"]
    assert q.view.booked[(GPU, "a")] == 1
    assert ids(q.settle((), now=121)) == ["t1"]
    assert q.view.booked[(GPU, "a")] == 0


def test_state_round_trip():
    q = cluster(node("a", 1))
    q.join(request(0, pool=RTX), now=0)
    q.join(request(1), now=0)
    q.hold("t1", now=5)
    state = q.to_state()
    copy = cluster(node("a", 1))
    copy.restore([Ticket.from_state(s) for s in state], now=10, confirm_seconds=10)
    assert copy.to_state() == state


@pytest.mark.parametrize(
    "bad",
    [{}, {"id": "x"}, {"id": "x", "user": "u", "slices": "two", "pool": {}, "requested_at": 1}],
)
def test_malformed_state_entries_are_refused(bad):
    with pytest.raises((KeyError, TypeError, ValueError)):
        Ticket.from_state(bad)


def test_wait_estimate_from_observed_releases():
    q = cluster(node("a", 0))
    q.join(request(0), now=0)
    q.join(request(1), now=0)
    assert q.estimated_wait("t1") is None  # nothing observed yet
    for when in (100.0, 110.0, 120.0):
        q.record_release([GPU], when, 1)
    assert q.estimated_wait("t0") == 10.0
    assert q.estimated_wait("t1") == 20.0


POOL_CHOICES = [ANY_GPU, RTX, H200]


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["RTX", "H200"])), max_size=5),
    holders=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 2)), max_size=8),
    requests=st.lists(
        st.tuples(st.integers(1, 3), st.sampled_from(POOL_CHOICES), st.booleans()),
        min_size=1,
        max_size=25,
    ),
)
def test_never_overbooks_and_never_skips_an_earlier_rival(nodes, holders, requests):
    q = cluster(*[node(f"n{i}", s, p) for i, (s, p) in enumerate(nodes)])
    for j, (i, slices) in enumerate(holders):
        if nodes:
            q.view.apply_pod(f"ns/h{j}", pod(f"h{j}", f"n{i % len(nodes)}", slices))
    restored = []
    for i, (slices, pool, confirmed) in enumerate(requests):
        if confirmed:
            q.join(request(i, slices, pool), now=0)
        else:
            restored.append(Ticket(f"t{i}", f"user{i}", "", slices, pool, float(i)))
    q.restore(restored, now=0, confirm_seconds=10)
    admitted = q.admit(now=0)
    # never more promised than free, on any node
    for name, cap in node_capacities(
        [node(f"n{i}", s, p) for i, (s, p) in enumerate(nodes)],
        [h for h in (q.view.holders.get((GPU, n), {}) for n in q.view.nodes) for h in h.values()],
        GPU,
    ).items():
        assert q.view.booked[(GPU, name)] <= cap.free
    # nobody unconfirmed is admitted; no earlier waiting rival could have used a later
    # admitted ticket's node
    assert all(t.confirmed for t in admitted)
    for late in admitted:
        for early in q.waiting():
            if early.order < late.order:
                assert early.pool.key not in q.view.pools_of(late.node)
    # with nothing changed, a second pass admits nobody
    assert q.admit(now=1) == []
    assert {t.state for t in admitted} <= {ADMITTED}
