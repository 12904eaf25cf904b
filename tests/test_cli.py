"""``gpushare setup|status|disable`` against the real local API server.

A ClusterPolicy CRD of our own writing stands in for the GPU operator's, and
:mod:`jupyterhub_gpushare.testing.deviceplugin` for its device plugin DaemonSet: each stand-in
pod applies the config the ClusterPolicy selects to its node's capacity and GFD
labels when it starts, like the real plugin. The CLI runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from jupyterhub_gpushare import timeslicing as ts
from jupyterhub_gpushare.testing.deviceplugin import DEPLOY_LABEL, StandInDaemonSet
from jupyterhub_gpushare.testing.waiting import wait_for
from tests.conftest import unique

pytestmark = pytest.mark.cluster

NS = ts.OPERATOR_NAMESPACE
CRD_NAME = f"{ts.CLUSTER_POLICY_PLURAL}.{ts.CLUSTER_POLICY_GROUP}"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD_NAME},
    "spec": {
        "group": ts.CLUSTER_POLICY_GROUP,
        "scope": "Cluster",
        "names": {
            "plural": ts.CLUSTER_POLICY_PLURAL,
            "singular": "clusterpolicy",
            "kind": "ClusterPolicy",
            "listKind": "ClusterPolicyList",
        },
        "versions": [
            {
                "name": ts.CLUSTER_POLICY_VERSION,
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}
# what a fresh GPU operator install looks like: sharing is off
FRESH_SPEC = {
    "operator": {"defaultRuntime": "containerd"},
    "devicePlugin": {"enabled": True, "config": {"name": "", "default": ""}},
}
GPU_CONFIG_2 = (
    "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
    "    - name: nvidia.com/gpu\n      replicas: 2\n"
)
CLI_TIMEOUT = "90"  # seconds the CLI may wait for capacity on a loaded 2-core machine


# -- fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="module")
async def operator(cluster, kube, core):
    """The ClusterPolicy CRD and the stand-in device plugin DaemonSet."""
    extensions = client.ApiextensionsV1Api(kube)
    custom = client.CustomObjectsApi(kube)
    # without a controller manager a deleted namespace stays Terminating: keep it
    with contextlib.suppress(ApiException):
        await core.create_namespace({"metadata": {"name": NS}})
    await extensions.create_custom_resource_definition(CRD)

    async def served():
        try:
            await custom.list_cluster_custom_object(
                ts.CLUSTER_POLICY_GROUP, ts.CLUSTER_POLICY_VERSION, ts.CLUSTER_POLICY_PLURAL
            )
            return True
        except ApiException:
            return False

    await wait_for(served, 60, "the ClusterPolicy CRD to be served")
    daemonset = StandInDaemonSet(core, NS, str(cluster.kubeconfig))
    daemonset.start()
    yield daemonset
    await daemonset.stop()
    await extensions.delete_custom_resource_definition(CRD_NAME)


@pytest.fixture
def custom(kube) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


@pytest.fixture
async def policy(operator, custom, core):
    """Create the ``cluster-policy`` object; it and every ConfigMap in gpu-operator go after."""

    async def create(spec: dict | None = None) -> dict:
        body = {
            "apiVersion": f"{ts.CLUSTER_POLICY_GROUP}/{ts.CLUSTER_POLICY_VERSION}",
            "kind": "ClusterPolicy",
            "metadata": {"name": ts.CLUSTER_POLICY_NAME},
            "spec": json.loads(json.dumps(FRESH_SPEC if spec is None else spec)),
        }
        return await custom.create_cluster_custom_object(
            ts.CLUSTER_POLICY_GROUP, ts.CLUSTER_POLICY_VERSION, ts.CLUSTER_POLICY_PLURAL, body
        )

    yield create
    with contextlib.suppress(ApiException):
        await custom.delete_cluster_custom_object(
            ts.CLUSTER_POLICY_GROUP,
            ts.CLUSTER_POLICY_VERSION,
            ts.CLUSTER_POLICY_PLURAL,
            ts.CLUSTER_POLICY_NAME,
        )
    for cm in (await core.list_namespaced_config_map(NS)).items:
        with contextlib.suppress(ApiException):
            await core.delete_namespaced_config_map(cm.metadata.name, NS)


@pytest.fixture
async def gpu_node(gpu_nodes, operator):
    """A GPU node without sharing, whose stand-in device plugin has started."""

    async def make(gpus: int = 1, labels: dict | None = None, **kwargs) -> str:
        name = await gpu_nodes(
            gpus=gpus, replicas=1, labels={DEPLOY_LABEL: "true", **(labels or {})}, **kwargs
        )
        await wait_for(lambda: operator.pod_on(name), 60, f"the device plugin on {name}")
        return name

    return make


# -- helpers ------------------------------------------------------------------------
@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


async def start_gpushare(cluster, *args: str, kubeconfig=None) -> asyncio.subprocess.Process:
    """Start the CLI as a real subprocess; the loop stays free (the stand-in runs on it)."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig or cluster.kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jupyterhub_gpushare.cli",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )


async def gpushare(cluster, *args: str, kubeconfig=None, timeout: float = 180) -> Result:
    """Run the CLI to the end."""
    return await finish(await start_gpushare(cluster, *args, kubeconfig=kubeconfig), timeout)


async def finish(process: asyncio.subprocess.Process, timeout: float = 180) -> Result:
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    return Result(process.returncode, out.decode(), err.decode())


async def read_policy(custom) -> dict | None:
    try:
        return await custom.get_cluster_custom_object(
            ts.CLUSTER_POLICY_GROUP,
            ts.CLUSTER_POLICY_VERSION,
            ts.CLUSTER_POLICY_PLURAL,
            ts.CLUSTER_POLICY_NAME,
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise


async def node_state(core, name: str) -> dict:
    node = await core.read_node(name)
    labels = node.metadata.labels or {}
    return {
        "gpu": node.status.allocatable.get("nvidia.com/gpu"),
        "shared": node.status.allocatable.get("nvidia.com/gpu.shared"),
        "replicas": labels.get(ts.REPLICAS_LABEL),
        "strategy": labels.get(ts.STRATEGY_LABEL),
        "product": labels.get(ts.PRODUCT_LABEL),
        "config": labels.get(ts.NODE_CONFIG_LABEL),
    }


async def snapshot(core, custom, nodes: list[str]) -> dict:
    """Everything the CLI could change: compare before and after to prove it changed nothing."""
    policy = await read_policy(custom)
    config_maps = await core.list_namespaced_config_map(NS)
    plugin_pods = await core.list_namespaced_pod(NS, label_selector=ts.DEVICE_PLUGIN_SELECTOR)
    state = {
        "policy": policy and (policy["metadata"]["resourceVersion"], policy["spec"]),
        "config_maps": {
            cm.metadata.name: (cm.metadata.resource_version, cm.data) for cm in config_maps.items
        },
        "plugin_pods": sorted(p.metadata.uid for p in plugin_pods.items),
        "nodes": {},
    }
    for name in nodes:
        node = await core.read_node(name)
        state["nodes"][name] = (
            node.metadata.labels,
            node.metadata.annotations,
            node.status.allocatable,
        )
    return state


def waiting_pod(name: str, node: str, slices: int = 1) -> dict:
    return {
        "metadata": {"name": name, "labels": {"app": "gpushare-cli-test"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "notebook",
                    "image": "python:3.12-slim",
                    "command": [sys.executable, "-c", "import signal; signal.pause()"],
                    "resources": {"limits": {"nvidia.com/gpu": str(slices)}},
                }
            ],
        },
    }


async def pod_phase(core, namespace: str, name: str) -> str | None:
    try:
        return (await core.read_namespaced_pod(name, namespace)).status.phase
    except ApiException as e:
        if e.status == 404:
            return None
        raise


# -- the happy paths ----------------------------------------------------------------------
async def test_setup_four_on_one_gpu_then_again_changes_nothing(
    cluster, core, custom, policy, gpu_node
):
    await policy()
    node = await gpu_node(gpus=1)
    assert (await node_state(core, node))["gpu"] == "1"

    first = await gpushare(cluster, "setup", "--replicas", "4", "--yes", "--timeout", CLI_TIMEOUT)
    assert first.code == 0, first.text
    state = await node_state(core, node)
    assert state["gpu"] == "4"
    assert (state["replicas"], state["strategy"]) == ("4", "time-slicing")
    assert state["product"].endswith("-SHARED")
    assert re.search(r"Physical GPUs:\s+1\n", first.out)
    assert re.search(r"Virtual GPUs:\s+4\n", first.out)
    assert re.search(r"Max concurrent users:\s+4\n", first.out)
    assert "✓" in first.out and "verified" in first.out

    found = await read_policy(custom)
    assert found["spec"]["devicePlugin"]["config"] == {
        "name": ts.CONFIG_MAP_NAME,
        "default": "gpushare-time-slicing-4",
    }
    cm = await core.read_namespaced_config_map(ts.CONFIG_MAP_NAME, NS)
    assert yaml.safe_load(cm.data["gpushare-time-slicing-4"]) == {
        "version": "v1",
        "sharing": {"timeSlicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}},
    }

    before = await snapshot(core, custom, [node])
    second = await gpushare(cluster, "setup", "--replicas", "4", "--yes", "--timeout", CLI_TIMEOUT)
    assert second.code == 0, second.text
    assert "nothing to change" in second.out
    assert re.search(r"Max concurrent users:\s+4\n", second.out)
    assert await snapshot(core, custom, [node]) == before


async def test_setup_eight_then_disable_restores_everything(
    cluster, core, custom, policy, gpu_node
):
    original = await policy()
    node = await gpu_node(gpus=1)

    setup = await gpushare(cluster, "setup", "--replicas", "8", "--yes", "--timeout", CLI_TIMEOUT)
    assert setup.code == 0, setup.text
    assert (await node_state(core, node))["gpu"] == "8"
    assert re.search(r"Max concurrent users:\s+8\n", setup.out)

    disable = await gpushare(cluster, "disable", "--yes", "--timeout", CLI_TIMEOUT)
    assert disable.code == 0, disable.text
    state = await node_state(core, node)
    assert (state["gpu"], state["replicas"], state["strategy"]) == ("1", "1", "none")
    assert not state["product"].endswith("-SHARED")
    restored = await read_policy(custom)
    assert restored["spec"] == original["spec"]
    assert ts.POLICY_RECORD_ANNOTATION not in (restored["metadata"].get("annotations") or {})
    # the ConfigMap was ours alone: it is gone
    assert [cm.metadata.name for cm in (await core.list_namespaced_config_map(NS)).items] == []
    assert re.search(r"Max concurrent users:\s+1\n", disable.out)

    again = await gpushare(cluster, "disable", "--yes")
    assert again.code == 0, again.text
    assert "nothing to change" in again.out


async def test_pending_gpu_pods_block_the_restart_unless_waited_for_or_forced(
    cluster, core, custom, namespace, policy, gpu_node
):
    await policy()
    node = await gpu_node(gpus=1)
    first, second = unique("wants-two"), unique("wants-five")
    await core.create_namespaced_pod(namespace, waiting_pod(first, node, slices=2))
    try:
        before = await snapshot(core, custom, [node])
        refused = await gpushare(cluster, "setup", "--replicas", "4", "--yes")
        assert refused.code == 1, refused.text
        assert f"{namespace}/{first}" in refused.err
        assert "Pending" in refused.err and "--force" in refused.err
        assert len(refused.err.strip().splitlines()) == 1, refused.err
        dry = await gpushare(cluster, "setup", "--replicas", "4", "--dry-run")
        assert dry.code == 0 and f"{namespace}/{first}" in dry.err, dry.text
        assert await snapshot(core, custom, [node]) == before

        # --wait: the CLI waits, says for what, and goes ahead once the pod is gone
        waiting = await start_gpushare(
            cluster, "setup", "--replicas", "4", "--yes", "--wait", "--timeout", CLI_TIMEOUT
        )
        line = (await asyncio.wait_for(waiting.stderr.readline(), 60)).decode()
        assert "waiting for Pending GPU pods" in line and first in line, line
        assert await snapshot(core, custom, [node]) == before
        await core.delete_namespaced_pod(first, namespace, grace_period_seconds=0)
        result = await finish(waiting)
        assert result.code == 0, result.text
        assert (await node_state(core, node))["gpu"] == "4"

        # --force: goes ahead with a warning that names the pod
        await core.create_namespaced_pod(namespace, waiting_pod(second, node, slices=5))
        forced = await gpushare(
            cluster, "setup", "--replicas", "8", "--yes", "--force", "--timeout", CLI_TIMEOUT
        )
        assert forced.code == 0, forced.text
        assert second in forced.err
        assert (await node_state(core, node))["gpu"] == "8"
        # with eight slices the pod that wanted five now fits
        await wait_for(
            lambda: _is(pod_phase(core, namespace, second), "Running"), 60, "the waiting pod to run"
        )
    finally:
        for pod in (first, second):
            with contextlib.suppress(ApiException):
                await core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)


async def _is(awaitable, expected) -> bool:
    return (await awaitable) == expected


async def test_dry_run_prints_the_plan_and_changes_nothing(cluster, core, custom, policy, gpu_node):
    await policy()
    node = await gpu_node(gpus=2)
    before = await snapshot(core, custom, [node])
    dry = await gpushare(cluster, "setup", "--replicas", "4", "--dry-run")
    assert dry.code == 0, dry.text
    assert f"ConfigMap {NS}/{ts.CONFIG_MAP_NAME}: create" in dry.out
    assert "gpushare-time-slicing-4: |" in dry.out  # the config itself, as YAML
    assert "replicas: 4" in dry.out
    assert f"ClusterPolicy {ts.CLUSTER_POLICY_NAME}: merge patch" in dry.out
    assert "default: gpushare-time-slicing-4" in dry.out
    assert f"node {node}: restart the device plugin" in dry.out
    assert "dry run: nothing was changed" in dry.out
    assert await snapshot(core, custom, [node]) == before

    as_json = await gpushare(cluster, "setup", "--replicas", "4", "--dry-run", "--json")
    assert as_json.code == 0, as_json.text
    document = json.loads(as_json.out)
    assert document["dry_run"] is True and document["changed"] is False
    assert document["plan"]["restart_nodes"] == [node]
    assert document["plan"]["expected"][node]["replicas"] == 4
    assert await snapshot(core, custom, [node]) == before


async def test_per_node_configs_rename_mps_and_status(cluster, core, custom, policy, gpu_node):
    """Different GPU models get different replica counts through the node label."""
    await policy()
    small = await gpu_node(gpus=1, labels={"gpushare.dev/test-model": "small"})
    large = await gpu_node(gpus=2, labels={"gpushare.dev/test-model": "large"})

    first = await gpushare(
        cluster,
        "setup",
        "--replicas",
        "4",
        "--nodes",
        "gpushare.dev/test-model=small",
        "--yes",
        "--json",
        "--timeout",
        CLI_TIMEOUT,
    )
    assert first.code == 0, first.text
    document = json.loads(first.out)
    assert document["ok"] and document["changed"]
    assert document["summary"]["virtual_gpus"] == 4 + 2  # the large node is not shared yet
    second = await gpushare(
        cluster,
        "setup",
        "--replicas",
        "3",
        "--strategy",
        "mps",
        "--rename",
        "--nodes",
        "gpushare.dev/test-model=large",
        "--yes",
        "--timeout",
        CLI_TIMEOUT,
    )
    assert second.code == 0, second.text
    assert "1/N of the GPU's memory and compute" in second.out

    small_state, large_state = await node_state(core, small), await node_state(core, large)
    assert (small_state["gpu"], small_state["strategy"]) == ("4", "time-slicing")
    assert small_state["config"] == "gpushare-time-slicing-4"
    assert (large_state["shared"], large_state["gpu"]) == ("6", "0")
    assert (large_state["strategy"], large_state["replicas"]) == ("mps", "3")
    assert not large_state["product"].endswith("-SHARED")  # renamed: product unchanged
    # the cluster-wide default was never touched
    assert (await read_policy(custom))["spec"]["devicePlugin"]["config"]["default"] == ""

    status = await gpushare(cluster, "status", "--json")
    assert status.code == 0, status.text
    rows = {row["node"]: row for row in json.loads(status.out)["nodes"]}
    assert (rows[small]["slices"], rows[small]["replicas"], rows[small]["gpus"]) == (4, 4, 1)
    assert (rows[large]["resource"], rows[large]["slices"]) == (ts.SHARED_RESOURCE, 6)
    assert rows[large]["strategy"] == "mps"

    disable = await gpushare(cluster, "disable", "--yes", "--timeout", CLI_TIMEOUT)
    assert disable.code == 0, disable.text
    for node, gpus in ((small, "1"), (large, "2")):
        state = await node_state(core, node)
        assert (state["gpu"], state["shared"], state["config"]) == (gpus, None, None)
        annotations = (await core.read_node(node)).metadata.annotations or {}
        assert ts.NODE_RECORD_ANNOTATION not in annotations


async def test_status_shows_holders_free_slices_and_who_waits(cluster, core, namespace, gpu_nodes):
    node = await gpu_nodes(gpus=1, replicas=2)  # already shared: 2 slices
    pods = [unique("holder"), unique("holder"), unique("waiter")]
    try:
        for pod in pods:
            await core.create_namespaced_pod(namespace, waiting_pod(pod, node))
        for pod in pods[:2]:
            await wait_for(
                lambda p=pod: _is(pod_phase(core, namespace, p), "Running"), 60, f"{pod} running"
            )

        async def unschedulable():
            found = await core.read_namespaced_pod(pods[2], namespace)
            return any(
                c.type == "PodScheduled" and c.reason == "Unschedulable"
                for c in found.status.conditions or []
            )

        await wait_for(unschedulable, 60, "the third pod to be unschedulable")
        result = await gpushare(cluster, "status", "--json")
        assert result.code == 0, result.text
        report = json.loads(result.out)
        row = next(r for r in report["nodes"] if r["node"] == node)
        assert (row["slices"], row["used"], row["free"]) == (2, 2, 0)
        assert row["pods"] == sorted(f"{namespace}/{p}" for p in pods[:2])
        assert row["pending"] == [f"{namespace}/{pods[2]}"]
        waiting = next(p for p in report["pending"] if p["pod"] == f"{namespace}/{pods[2]}")
        assert waiting["lack_of_slices"] and waiting["requests"] == {"nvidia.com/gpu": 1}

        text = await gpushare(cluster, "status")
        assert text.code == 0, text.text
        assert node in text.out and f"{namespace}/{pods[2]} wants 1 nvidia.com/gpu" in text.out
        assert "lack of slices" in text.out
    finally:
        for pod in pods:
            await core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)


async def test_keys_we_do_not_own_are_kept_and_the_original_comes_back(
    cluster, core, custom, policy, gpu_node
):
    """An existing ConfigMap the policy already names: we add our key, and disable
    leaves it exactly as it was, with the original default selected again."""
    theirs = {
        "two": GPU_CONFIG_2,
        "plain": "version: v1\nflags:\n  migStrategy: none\n",
    }
    await core.create_namespaced_config_map(
        NS, {"metadata": {"name": "their-config", "labels": {"team": "ml"}}, "data": theirs}
    )
    original = await policy(
        {"devicePlugin": {"enabled": True, "config": {"name": "their-config", "default": "two"}}}
    )
    node = await gpu_node(gpus=1)
    assert (await node_state(core, node))["gpu"] == "2"  # their config applies

    setup = await gpushare(cluster, "setup", "--replicas", "4", "--yes", "--timeout", CLI_TIMEOUT)
    assert setup.code == 0, setup.text
    assert (await node_state(core, node))["gpu"] == "4"
    cm = await core.read_namespaced_config_map("their-config", NS)
    assert {k: cm.data[k] for k in theirs} == theirs
    assert set(cm.data) == {*theirs, "gpushare-time-slicing-4"}
    assert cm.metadata.labels == {"team": "ml"}

    disable = await gpushare(cluster, "disable", "--yes", "--timeout", CLI_TIMEOUT)
    assert disable.code == 0, disable.text
    assert (await node_state(core, node))["gpu"] == "2"
    cm = await core.read_namespaced_config_map("their-config", NS)
    assert cm.data == theirs
    assert not (cm.metadata.annotations or {})
    assert cm.metadata.labels == {"team": "ml"}
    assert (await read_policy(custom))["spec"] == original["spec"]


# -- bad input and bad clusters: one line, non-zero exit, nothing changed -----------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--replicas", "1"], "--replicas must be at least 2"),
        (["--replicas", "abc"], "--replicas must be a whole number"),
        (["--replicas", "4", "--nodes", "model in (a"], "not a valid label selector"),
    ],
)
async def test_bad_input(cluster, core, custom, policy, gpu_node, args, expected):
    await policy()
    node = await gpu_node()
    before = await snapshot(core, custom, [node])
    result = await gpushare(cluster, "setup", *args, "--yes")
    assert result.code == 2, result.text
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.err
    assert lines[0].startswith("✗")
    assert await snapshot(core, custom, [node]) == before


async def test_without_a_cluster_policy_points_to_the_plain_device_plugin(
    cluster, core, custom, operator, gpu_node
):
    node = await gpu_node()
    before = await snapshot(core, custom, [node])
    assert before["policy"] is None
    result = await gpushare(cluster, "setup", "--replicas", "4", "--yes")
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "no GPU operator ClusterPolicy" in lines[0]
    assert "--print-config" in lines[0] and "helm upgrade" in lines[0]
    assert await snapshot(core, custom, [node]) == before

    as_json = await gpushare(cluster, "disable", "--yes", "--json")
    assert as_json.code == 1
    assert json.loads(as_json.out)["ok"] is False


async def test_missing_permission_names_the_verb_and_resource(
    cluster, kube, core, custom, policy, gpu_node
):
    await policy()
    node = await gpu_node()
    rbac = client.RbacAuthorizationV1Api(kube)
    user, role = unique("operator-admin"), unique("gpushare-no-policy-patch")
    await rbac.create_cluster_role(
        {
            "metadata": {"name": role},
            "rules": [
                # everything setup needs except patching the ClusterPolicy
                {"apiGroups": ["nvidia.com"], "resources": ["clusterpolicies"], "verbs": ["get"]},
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "verbs": ["get", "create", "update", "delete"],
                },
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "patch"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "delete"]},
            ],
        }
    )
    await rbac.create_cluster_role_binding(
        {
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
        }
    )
    authz = client.AuthorizationV1Api(kube)

    async def granted():
        review = await authz.create_subject_access_review(
            {
                "spec": {
                    "user": user,
                    "resourceAttributes": {"verb": "list", "resource": "nodes"},
                }
            }
        )
        return review.status.allowed

    try:
        await wait_for(granted, 30, "RBAC to grant the new role")
        before = await snapshot(core, custom, [node])
        result = await gpushare(
            cluster, "setup", "--replicas", "4", "--yes", kubeconfig=cluster.kubeconfig_for(user)
        )
        assert result.code == 1, result.text
        lines = result.err.strip().splitlines()
        assert len(lines) == 1, result.err
        assert "cannot patch clusterpolicies.nvidia.com (cluster-wide)" in lines[0]
        assert user in lines[0]
        assert await snapshot(core, custom, [node]) == before
    finally:
        await rbac.delete_cluster_role_binding(role)
        await rbac.delete_cluster_role(role)


TYPO = (
    "version: v1\nsharing:\n  timeSlicing:\n    renameByDefualt: true\n    resources:\n"
    "    - name: nvidia.com/gpu\n      replicas: 2\n"
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # the device plugin would silently ignore the misspelt key; we name it
        (
            {"t4": TYPO},
            'config "t4" in ConfigMap gpu-operator/time-slicing-config: unknown field '
            '"sharing.timeSlicing.renameByDefualt"',
        ),
        # a key with the name we would write, that we did not write: not ours to replace
        (
            {"gpushare-time-slicing-4": GPU_CONFIG_2},
            'already has a key "gpushare-time-slicing-4" that gpushare did not write',
        ),
    ],
    ids=["typo", "name-clash"],
)
async def test_configs_we_must_not_build_on_are_refused(
    cluster, core, custom, policy, gpu_node, data, expected
):
    await core.create_namespaced_config_map(
        NS, {"metadata": {"name": ts.CONFIG_MAP_NAME}, "data": data}
    )
    await policy(
        {"devicePlugin": {"enabled": True, "config": {"name": ts.CONFIG_MAP_NAME, "default": ""}}}
    )
    node = await gpu_node()
    before = await snapshot(core, custom, [node])
    result = await gpushare(cluster, "setup", "--replicas", "4", "--yes")
    assert result.code == 1, result.text
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert expected in lines[0]
    assert await snapshot(core, custom, [node]) == before


async def test_a_write_that_fails_midway_is_undone(cluster, kube, core, custom, policy, gpu_node):
    """RBAC allows everything, but an admission policy (as Kyverno or Gatekeeper would)
    refuses the ClusterPolicy change after the ConfigMap was written: it is removed again."""
    await policy()
    node = await gpu_node()
    admission = client.AdmissionregistrationV1Api(kube)
    name = unique("freeze-cluster-policy")
    await admission.create_validating_admission_policy(
        {
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [ts.CLUSTER_POLICY_GROUP],
                            "apiVersions": [ts.CLUSTER_POLICY_VERSION],
                            "operations": ["UPDATE"],
                            "resources": [ts.CLUSTER_POLICY_PLURAL],
                        }
                    ]
                },
                "validations": [{"expression": "false", "message": "frozen by the platform team"}],
            },
        }
    )
    await admission.create_validating_admission_policy_binding(
        {"metadata": {"name": name}, "spec": {"policyName": name, "validationActions": ["Deny"]}}
    )

    async def frozen():
        try:
            await custom.patch_cluster_custom_object(
                ts.CLUSTER_POLICY_GROUP,
                ts.CLUSTER_POLICY_VERSION,
                ts.CLUSTER_POLICY_PLURAL,
                ts.CLUSTER_POLICY_NAME,
                {"metadata": {"annotations": {"probe": "x"}}},
                dry_run="All",
                _content_type="application/merge-patch+json",
            )
        except ApiException as e:
            return "frozen" in str(e.body)
        return False

    try:
        await wait_for(frozen, 30, "the admission policy to take effect")
        before = await snapshot(core, custom, [node])
        result = await gpushare(cluster, "setup", "--replicas", "4", "--yes")
        assert result.code == 1, result.text
        lines = result.err.strip().splitlines()
        assert len(lines) == 1, result.err
        assert "frozen by the platform team" in lines[0]
        assert "undone: delete the ConfigMap" in lines[0]
        assert await snapshot(core, custom, [node]) == before
    finally:
        await admission.delete_validating_admission_policy_binding(name)
        await admission.delete_validating_admission_policy(name)
