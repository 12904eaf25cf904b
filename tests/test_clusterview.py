"""The incremental cluster view equals a full recompute, after every event."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jupyterhub_gpushare.capacity import PoolSpec, node_capacities, pool_totals
from jupyterhub_gpushare.clusterview import ClusterView

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
RESOURCES = (GPU, SHARED)
PRODUCT = "nvidia.com/gpu.product"


def node(name, slices, product="RTX", ready=True, cordoned=False, resource=GPU, zone="a"):
    return {
        "metadata": {"name": name, "labels": {PRODUCT: product, "zone": zone}},
        "spec": {"unschedulable": cordoned},
        "status": {
            "allocatable": {resource: str(slices)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(name, node_name, slices=1, phase="Running", user=None, resource=GPU, ticket=None):
    annotations = {}
    if user:
        annotations["hub.jupyter.org/username"] = user
    if ticket:
        annotations["gpushare.jupyter.org/ticket"] = ticket
    return {
        "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"limits": {resource: str(slices)}}}],
        },
        "status": {"phase": phase},
    }


POOLS = [
    PoolSpec(GPU),
    PoolSpec(SHARED),
    PoolSpec.from_selector(GPU, {PRODUCT: "RTX"}),
    PoolSpec.from_selector(GPU, {PRODUCT: "H200"}),
    PoolSpec.from_selector(GPU, {"zone": "b"}),
    PoolSpec.from_selector(GPU, {PRODUCT: "H200", "zone": "b"}),
]
# pools the view learns of while nodes and pods already exist (a new profile's first spawn)
LATE_POOLS = [
    PoolSpec.from_selector(GPU, {"zone": "a"}),
    PoolSpec.from_selector(SHARED, {PRODUCT: "RTX"}),
    PoolSpec.from_selector(GPU, {PRODUCT: "RTX", "zone": "b"}),
]


def assert_same_as_full_recompute(view: ClusterView, nodes: dict, pods: dict) -> None:
    for resource in RESOURCES:
        expected = node_capacities(nodes.values(), pods.values(), resource)
        for name, cap in expected.items():
            cap.booked = view.booked[(resource, name)]
        got = view.capacities(resource)
        assert set(got) == set(expected)
        for name, want in expected.items():
            have = got[name]
            assert (have.total, have.used, have.free, have.available, have.schedulable) == (
                want.total,
                want.used,
                want.free,
                want.available,
                want.schedulable,
            ), name
            assert sorted(h.pod for h in have.holders) == sorted(h.pod for h in want.holders)
        assert view.nodes_with_room(resource) == {n for n, c in expected.items() if c.available > 0}
        for spec in [*POOLS, *LATE_POOLS]:
            if spec.resource == resource and spec.key in view.pools:
                assert view.pool_summary(spec, 0) == pool_totals(spec, expected), spec.key


event = st.one_of(
    st.tuples(
        st.just("node"),
        st.integers(0, 5),
        st.integers(0, 8),
        st.sampled_from(["RTX", "H200"]),
        st.booleans(),
        st.booleans(),
        st.sampled_from(RESOURCES),
        st.sampled_from(["a", "b"]),
    ),
    st.tuples(st.just("delete-node"), st.integers(0, 5)),
    st.tuples(
        st.just("pod"),
        st.integers(0, 20),
        st.integers(0, 6),
        st.integers(0, 3),
        st.sampled_from(["Pending", "Running", "Succeeded", "Failed"]),
        st.sampled_from([None, "alice", "bob"]),
        st.sampled_from(RESOURCES),
    ),
    st.tuples(st.just("delete-pod"), st.integers(0, 20)),
    st.tuples(st.just("book"), st.integers(0, 5), st.integers(1, 3), st.sampled_from(RESOURCES)),
    st.tuples(st.just("unbook"), st.integers(0, 5), st.sampled_from(RESOURCES)),
    st.tuples(st.just("pool"), st.sampled_from(LATE_POOLS)),
)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(event, min_size=20, max_size=150))
def test_incremental_view_equals_full_recompute(events):
    view = ClusterView(RESOURCES)
    for spec in POOLS:
        view.add_pool(spec)
    nodes: dict[str, dict] = {}
    pods: dict[str, dict] = {}
    for ev in events:
        kind = ev[0]
        if kind == "node":
            _, i, slices, product, ready, cordoned, resource, zone = ev
            name = f"n{i}"
            nodes[name] = node(name, slices, product, ready, cordoned, resource, zone)
            view.apply_node(name, nodes[name])
        elif kind == "delete-node":
            name = f"n{ev[1]}"
            nodes.pop(name, None)
            view.apply_node(name, None)
        elif kind == "pod":
            _, i, n, slices, phase, user, resource = ev
            key = f"ns/p{i}"
            bound = None if n == 6 else f"n{n}"  # 6: not bound yet
            pods[key] = pod(f"p{i}", bound, slices, phase, user, resource)
            view.apply_pod(key, pods[key])
        elif kind == "delete-pod":
            key = f"ns/p{ev[1]}"
            pods.pop(key, None)
            view.apply_pod(key, None)
        elif kind == "book":
            view.book((ev[3], f"n{ev[1]}"), ev[2])
        elif kind == "pool":
            view.add_pool(ev[1])
        elif kind == "unbook":
            key = (ev[2], f"n{ev[1]}")
            if view.booked[key]:
                view.unbook(key, view.booked[key])
        assert_same_as_full_recompute(view, nodes, pods)


def test_a_replaced_list_is_the_same_as_events():
    nodes = {f"n{i}": node(f"n{i}", 4, "H200" if i % 2 else "RTX") for i in range(6)}
    pods = {f"ns/p{i}": pod(f"p{i}", f"n{i % 6}", 1 + i % 2) for i in range(12)}
    view = ClusterView(RESOURCES)
    view.apply_node("gone", node("gone", 8))
    view.apply_pod("ns/old", pod("old", "n1", 3))
    view.replace_nodes(nodes)
    view.replace_pods(pods)
    assert "gone" not in view.nodes
    assert_same_as_full_recompute(view, nodes, pods)


def test_changes_say_where_room_appeared_and_which_tickets_are_bound():
    view = ClusterView(RESOURCES)
    view.apply_node("a", node("a", 2))
    view.take_changes()
    view.apply_pod("ns/p", pod("p", "a", 2, ticket="t1"))
    changes = view.take_changes()
    assert changes.bound_tickets == {"t1"}
    assert changes.freed == set()
    view.apply_pod("ns/p", None)
    changes = view.take_changes()
    assert changes.freed == {(GPU, "a")}
    assert changes.released == [((GPU, "a"), 2)]
    # a heartbeat-like update that changes nothing we keep costs nothing
    view.apply_node("a", node("a", 2))
    assert view.take_changes().pools == set()


def test_user_servers_count_hub_pods_by_server():
    view = ClusterView(RESOURCES)
    view.apply_node("a", node("a", 8))
    alice = pod("jupyter-alice", "a", 2, user="alice")
    alice["metadata"]["labels"] = {"hub.jupyter.org/servername": ""}
    named = pod("jupyter-alice-big", "a", 1, user="alice")
    named["metadata"]["labels"] = {"hub.jupyter.org/servername": "big"}
    view.apply_pod("ns/a1", alice)
    view.apply_pod("ns/a2", named)
    view.apply_pod("ns/job", pod("job", "a", 3))
    assert view.user_servers("alice") == {"": 2, "big": 1}
    view.apply_pod("ns/a2", None)
    assert view.user_servers("alice") == {"": 2}
    assert view.user_servers("bob") == {}


def test_pools_compete_when_a_node_serves_both():
    view = ClusterView(RESOURCES)
    view.apply_node("rtx", node("rtx", 4, "RTX"))
    any_gpu, rtx, h200 = PoolSpec(GPU), POOLS[2], POOLS[3]
    assert view.overlaps(any_gpu, rtx)
    assert not view.overlaps(rtx, h200)
    assert not view.overlaps(PoolSpec(SHARED), any_gpu)
