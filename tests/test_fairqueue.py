"""Capacity arithmetic and the fair line, without a cluster."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jupyterhub_gpushare.capacity import PoolSpec, node_capacities, pool_capacity
from jupyterhub_gpushare.fairqueue import ADMITTED, FairQueue, Ticket

GPU = "nvidia.com/gpu"
ANY_GPU = PoolSpec(GPU)


def node(name, slices, product="RTX", ready=True, cordoned=False, replicas=4):
    return {
        "metadata": {
            "name": name,
            "labels": {"nvidia.com/gpu.product": product, "nvidia.com/gpu.replicas": str(replicas)},
        },
        "spec": {"unschedulable": cordoned},
        "status": {
            "allocatable": {GPU: str(slices)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(name, node_name, slices=1, phase="Running", user=None, namespace="ns"):
    annotations = {"hub.jupyter.org/username": user} if user else {}
    return {
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"limits": {GPU: str(slices)}}}],
        },
        "status": {"phase": phase, "startTime": "2026-11-29T06:00:00Z"},
    }


def test_capacity_counts_bound_live_pods_of_any_owner():
    caps = node_capacities(
        [node("a", 4), node("cpu", 0)],
        [
            pod("p1", "a", user="alice"),
            pod("p2", "a", 2),  # not a hub pod: still holds slices
            pod("done", "a", phase="Succeeded"),
            pod("pending", None),
        ],
        GPU,
    )
    assert list(caps) == ["a"]
    assert (caps["a"].total, caps["a"].used, caps["a"].free) == (4, 3, 1)
    assert [(h.pod, h.user) for h in caps["a"].holders] == [("p1", "alice"), ("p2", None)]


def test_cordoned_and_not_ready_nodes_offer_nothing():
    caps = node_capacities([node("c", 4, cordoned=True), node("n", 4, ready=False)], [], GPU)
    assert caps["c"].free == caps["n"].free == 0
    assert caps["c"].total == 4


def test_pools_select_by_labels():
    caps = node_capacities([node("a", 4, "RTX"), node("b", 8, "H200")], [], GPU)
    h200 = PoolSpec.from_selector(GPU, {"nvidia.com/gpu.product": "H200"})
    assert pool_capacity(h200, caps).total == 8
    assert pool_capacity(PoolSpec(GPU), caps).total == 12


def ticket(i, slices=1, pool=ANY_GPU, at=None):
    return Ticket(f"t{i}", f"user{i}", "", slices, pool, at if at is not None else float(i))


def test_strict_order_and_reservations():
    caps = node_capacities([node("a", 2)], [], GPU)
    q = FairQueue()
    for i, slices in enumerate([1, 2, 1]):
        q.join(ticket(i, slices))
    admitted = q.admit({GPU: caps}, now=10)
    # t0 fits; t1 needs 2 with 1 left, and t2 may not overtake it
    assert [t.id for t in admitted] == ["t0"]
    assert q.position("t1") == (1, 2) and q.position("t2") == (2, 2)
    # nothing changed: the reservation keeps the slice booked
    assert q.admit({GPU: caps}, now=11) == []


def test_reservation_ends_when_the_pod_is_bound():
    q = FairQueue()
    q.join(ticket(0))
    caps = node_capacities([node("a", 1)], [], GPU)
    assert [t.id for t in q.admit({GPU: caps}, now=1)] == ["t0"]
    q.join(ticket(1))
    # the pod appears bound: it counts as used, the reservation goes
    bound = pod("jupyter-user0", "a")
    bound["metadata"]["annotations"]["gpushare.jupyter.org/ticket"] = "t0"
    caps = node_capacities([node("a", 1)], [bound], GPU)
    assert [t.id for t in q.settle(["t0"], now=2)] == ["t0"]
    assert q.admit({GPU: caps}, now=2) == []
    assert q.position("t1") == (1, 1)


def test_rejoin_keeps_the_original_place():
    q = FairQueue()
    q.join(ticket(0, at=5.0))
    q.join(ticket(1, at=6.0))
    q.leave("t0")
    q.join(ticket(0, at=5.0))
    assert q.position("t0") == (1, 2)


def test_state_round_trip_keeps_order_and_reservations():
    q = FairQueue()
    pool = PoolSpec.from_selector(GPU, {"x": "y"})
    q.join(ticket(0, pool=pool))
    q.join(ticket(1))
    q.tickets["t0"].state, q.tickets["t0"].node = ADMITTED, "a"
    copy = FairQueue()
    copy.load_state(q.to_state())
    assert copy.to_state() == q.to_state()
    assert copy.reserved() == {(GPU, "a"): 1}


def test_wait_estimate_from_observed_releases():
    q = FairQueue()
    q.join(ticket(0))
    q.join(ticket(1))
    assert q.estimated_wait("t1") is None  # nothing observed yet
    q.record_release([GPU], 100.0, 1)
    q.record_release([GPU], 110.0, 1)
    q.record_release([GPU], 120.0, 1)
    assert q.estimated_wait("t0") == 10.0
    assert q.estimated_wait("t1") == 20.0


@settings(max_examples=200, deadline=None)
@given(
    node_slices=st.lists(st.integers(0, 8), min_size=1, max_size=4),
    requests=st.lists(st.integers(1, 3), min_size=1, max_size=30),
    holders=st.lists(st.integers(0, 3), max_size=6),
)
def test_never_overbooks_and_admits_in_order(node_slices, requests, holders):
    nodes = [node(f"n{i}", s) for i, s in enumerate(node_slices)]
    pods = [pod(f"h{i}", f"n{i % len(nodes)}", 1) for i, _ in enumerate(holders)]
    caps = node_capacities(nodes, pods, GPU)
    q = FairQueue()
    for i, slices in enumerate(requests):
        q.join(ticket(i, slices))
    admitted = q.admit({GPU: caps}, now=0)
    # admitted ones are exactly a prefix of the line
    assert [t.id for t in admitted] == [f"t{i}" for i in range(len(admitted))]
    for name, cap in caps.items():
        booked = sum(t.slices for t in admitted if t.node == name)
        assert booked <= cap.free
    # a second round with unchanged capacity admits nobody more
    assert q.admit({GPU: caps}, now=1) == []
