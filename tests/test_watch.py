"""The watchers against the real API server: pages, field selectors, transitions."""

from __future__ import annotations

import sys

import pytest

from jupyterhub_gpushare.clusterview import ClusterView
from jupyterhub_gpushare.testing.waiting import wait_for
from jupyterhub_gpushare.watch import node_watcher, pod_watcher
from tests.conftest import unique

pytestmark = pytest.mark.cluster

GPU = "nvidia.com/gpu"


class Recorder:
    """A consumer that keeps what the watcher hands over, as the view does."""

    def __init__(self) -> None:
        self.lists: list[dict[str, dict]] = []
        self.events: list[tuple[str, dict | None]] = []
        self.objects: dict[str, dict] = {}

    def replace(self, kind: str, objects: dict[str, dict]) -> None:
        self.lists.append(dict(objects))
        self.objects = dict(objects)

    def apply(self, kind: str, key: str, obj: dict | None) -> None:
        self.events.append((key, obj))
        if obj is None:
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj

    def stale(self, kind: str, problem: str) -> None:
        pass


def gpu_pod(name: str, node: str | None, command: list[str] | None = None, gpu: bool = True):
    container = {
        "name": "job",
        "image": "training-job",
        "ports": [{"containerPort": 8080}],
        "resources": {"limits": {GPU: "1"}} if gpu else {},
    }
    if command:
        container["command"] = command
    spec = {"containers": [container], "restartPolicy": "Never"}
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"metadata": {"name": name}, "spec": spec}


async def test_pods_arrive_in_pages_and_only_those_that_hold_slices(core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=8)
    holding = [unique("hold") for _ in range(5)]
    finishing = unique("done")
    unbound = unique("pending")
    cpu = unique("cpu")
    calls = []

    class Counting:
        """The real API, with its list calls counted."""

        def __getattr__(self, name):
            method = getattr(core, name)

            def call(*args, **kwargs):
                calls.append(kwargs)
                return method(*args, **kwargs)

            return call

    created = [*holding, finishing, unbound, cpu]
    try:
        for name in holding:
            await core.create_namespaced_pod(namespace, gpu_pod(name, node))
        await core.create_namespaced_pod(
            namespace, gpu_pod(finishing, node, [sys.executable, "-c", "pass"])
        )
        await core.create_namespaced_pod(namespace, gpu_pod(unbound, "no-such-node"))
        await core.create_namespaced_pod(namespace, gpu_pod(cpu, node, gpu=False))

        async def finished():
            pod = await core.read_namespaced_pod(finishing, namespace)
            return pod.status.phase == "Succeeded"

        await wait_for(finished, 60, "the short pod to finish")

        seen = Recorder()
        watcher = pod_watcher(Counting(), (GPU,), seen, page_size=2)
        watcher.start()
        try:
            await wait_for(lambda: seen.lists, 30, "the first list")
            mine = {k for k in seen.lists[0] if k.startswith(f"{namespace}/")}
            # bound and unfinished GPU pods only; the others never reach us
            assert mine == {f"{namespace}/{n}" for n in holding}
            lists = [c for c in calls if c.get("limit") == 2 and "watch" not in c]
            assert len(lists) >= 3 and any(c.get("_continue") for c in lists)
            assert all(c.get("field_selector") for c in calls)

            # a pod that finishes while watched leaves the view
            short = unique("short")
            created.append(short)
            await core.create_namespaced_pod(
                namespace,
                gpu_pod(short, node, [sys.executable, "-c", "import time; time.sleep(2)"]),
            )
            key = f"{namespace}/{short}"
            await wait_for(lambda: key in seen.objects, 30, "the short pod to be seen")
            await wait_for(lambda: key not in seen.objects, 60, "the finished pod to leave")
            await core.delete_namespaced_pod(holding[0], namespace, grace_period_seconds=0)
            gone = f"{namespace}/{holding[0]}"
            await wait_for(lambda: gone not in seen.objects, 30, "the deleted pod to leave")
        finally:
            await watcher.stop()
    finally:
        for name in created:
            try:
                await core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
            except Exception:
                pass


async def test_nodes_feed_the_view(core, gpu_nodes):
    view = ClusterView([GPU])

    class View:
        def replace(self, kind, objects):
            view.replace_nodes(objects)

        def apply(self, kind, key, obj):
            view.apply_node(key, obj)

        def stale(self, kind, problem):
            pass

    watcher = node_watcher(core, View(), page_size=1)
    watcher.start()
    try:
        node = await gpu_nodes(replicas=4)
        await wait_for(lambda: node in view.nodes, 30, "the new node in the view")
        assert view.capacities(GPU)[node].total == 4
        await core.patch_node(node, {"spec": {"unschedulable": True}})
        await wait_for(lambda: view.free((GPU, node)) == 0, 30, "the cordon to show")
    finally:
        await watcher.stop()
