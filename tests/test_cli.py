"""``gpushare setup|status|disable`` against the real local API server and real objects.

The GPU operator's own ClusterPolicy CRD (v26.7.0, with its structural schema and
required fields) is applied from ``../shared/nvidia/``, and so are the policies it
is used with: the ``cluster-policy`` the operator's Helm chart renders, and the
operator's sample ``gpu-cluster-policy`` (the name an OLM install uses).
:mod:`jupyterhub_gpushare.testing.deviceplugin` stands in for the device plugin
DaemonSet: each pod finds the policy the operator would use, parses the config its
node selects with the device plugin's own Go code, and sets capacity and GFD labels
from what that code says. The CLI runs as a real subprocess.
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

from jupyterhub_gpushare.sharing.cluster import (
    CLUSTER_POLICY_GROUP,
    CLUSTER_POLICY_PLURAL,
    CLUSTER_POLICY_RESOURCE,
    CLUSTER_POLICY_VERSION,
    CONFIG_MAP_NAME,
    DEVICE_PLUGIN_SELECTOR,
    NODE_CONFIG_LABEL,
    NODE_RECORD_ANNOTATION,
    OPERATOR_NAMESPACE,
    POLICY_RECORD_ANNOTATION,
    PRODUCT_LABEL,
    REPLICAS_LABEL,
    STRATEGY_LABEL,
)
from jupyterhub_gpushare.sharing.pluginconfig import SHARED_RESOURCE
from jupyterhub_gpushare.testing.deviceplugin import DEPLOY_LABEL, StandInDaemonSet
from jupyterhub_gpushare.testing.waiting import wait_for
from tests.conftest import unique

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
NVIDIA = ROOT.parent / "shared" / "nvidia"
CRD_FILE = "nvidia.com_clusterpolicies.yaml"
HELM = "clusterpolicy-helm-default.yaml"  # cluster-policy, no devicePlugin.config
OLM = "v1_clusterpolicy.yaml"  # gpu-cluster-policy, devicePlugin.config {name: "", default: ""}
SEED_CONFIG_MAP = ROOT / "helm-snippets" / "time-slicing-configmap.yaml"  # key "any", 4 replicas
NS = OPERATOR_NAMESPACE
GPU_CONFIG_2 = (
    "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
    "    - name: nvidia.com/gpu\n      replicas: 2\n"
)
CLI_TIMEOUT = "90"  # seconds the CLI may wait for capacity on a loaded 2-core machine


def nvidia_object(name: str) -> dict:
    """An object as the GPU operator ships it (read fresh: tests change their copy)."""
    path = NVIDIA / name
    if not path.exists():
        pytest.skip(f"{path} is missing: these tests need the GPU operator's real objects")
    return yaml.safe_load(path.read_text())


# -- fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="module")
async def operator(cluster, kube, core):
    """The GPU operator's real ClusterPolicy CRD, and the stand-in device plugin DaemonSet."""
    crd = nvidia_object(CRD_FILE)
    extensions = client.ApiextensionsV1Api(kube)
    custom = client.CustomObjectsApi(kube)
    # without a controller manager a deleted namespace stays Terminating: keep it
    with contextlib.suppress(ApiException):
        await core.create_namespace({"metadata": {"name": NS}})
    await extensions.create_custom_resource_definition(crd)

    async def served():
        try:
            await custom.list_cluster_custom_object(
                CLUSTER_POLICY_GROUP, CLUSTER_POLICY_VERSION, CLUSTER_POLICY_PLURAL
            )
            return True
        except ApiException:
            return False

    await wait_for(served, 60, "the ClusterPolicy CRD to be served")
    daemonset = StandInDaemonSet(core, NS, str(cluster.kubeconfig))
    daemonset.start()
    yield daemonset
    await daemonset.stop()
    await extensions.delete_custom_resource_definition(crd["metadata"]["name"])


@pytest.fixture
def custom(kube) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


@pytest.fixture
async def policy(operator, custom, core):
    """Create ClusterPolicies from the operator's own objects; they and every ConfigMap in
    gpu-operator go afterwards."""
    created: list[str] = []

    async def create(source: str = HELM, config: dict | None = None) -> dict:
        body = nvidia_object(source)
        if config is not None:
            body["spec"]["devicePlugin"]["config"] = config
        created.append(body["metadata"]["name"])
        return await custom.create_cluster_custom_object(
            CLUSTER_POLICY_GROUP, CLUSTER_POLICY_VERSION, CLUSTER_POLICY_PLURAL, body
        )

    yield create
    for name in created:
        with contextlib.suppress(ApiException):
            await custom.delete_cluster_custom_object(
                CLUSTER_POLICY_GROUP, CLUSTER_POLICY_VERSION, CLUSTER_POLICY_PLURAL, name
            )
    for cm in (await core.list_namespaced_config_map(NS)).items:
        if cm.metadata.name != "kube-root-ca.crt":
            with contextlib.suppress(ApiException):
                await core.delete_namespaced_config_map(cm.metadata.name, NS)


@pytest.fixture
async def gpu_node(gpu_nodes, operator):
    """A GPU node without sharing, whose stand-in device plugin has started."""

    async def make(gpus: int = 1, labels: dict | None = None, ready: bool = True, **kwargs) -> str:
        name = await gpu_nodes(
            gpus=gpus, replicas=1, labels={DEPLOY_LABEL: "true", **(labels or {})}, **kwargs
        )
        if ready:
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

    @property
    def last_error(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


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
        cwd=ROOT,
    )


async def gpushare(cluster, *args: str, kubeconfig=None, timeout: float = 180) -> Result:
    """Run the CLI to the end."""
    return await finish(await start_gpushare(cluster, *args, kubeconfig=kubeconfig), timeout)


async def finish(
    process: asyncio.subprocess.Process, timeout: float = 180, err: str = ""
) -> Result:
    try:
        out, rest = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    return Result(process.returncode, out.decode(), err + rest.decode())


async def read_until(process: asyncio.subprocess.Process, text: str, timeout: float = 60) -> str:
    """The CLI's stderr up to the first line that contains ``text``."""
    seen = ""

    async def read() -> str:
        nonlocal seen
        while True:
            line = (await process.stderr.readline()).decode()
            if not line:
                raise AssertionError(f"the CLI ended without printing {text!r}: {seen}")
            seen += line
            if text in line:
                return seen

    return await asyncio.wait_for(read(), timeout)


async def read_policy(custom, name: str = "cluster-policy") -> dict | None:
    try:
        return await custom.get_cluster_custom_object(
            CLUSTER_POLICY_GROUP, CLUSTER_POLICY_VERSION, CLUSTER_POLICY_PLURAL, name
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
        "replicas": labels.get(REPLICAS_LABEL),
        "strategy": labels.get(STRATEGY_LABEL),
        "product": labels.get(PRODUCT_LABEL),
        "config": labels.get(NODE_CONFIG_LABEL),
    }


async def snapshot(core, custom, nodes: list[str]) -> dict:
    """Everything the CLI could change: compare before and after to prove it changed nothing."""
    policies = await custom.list_cluster_custom_object(
        CLUSTER_POLICY_GROUP, CLUSTER_POLICY_VERSION, CLUSTER_POLICY_PLURAL
    )
    config_maps = await core.list_namespaced_config_map(NS)
    plugin_pods = await core.list_namespaced_pod(NS, label_selector=DEVICE_PLUGIN_SELECTOR)
    state = {
        "policies": {
            p["metadata"]["name"]: (
                p["metadata"]["resourceVersion"],
                p["spec"],
                p["metadata"].get("annotations"),
            )
            for p in policies["items"]
        },
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


def one_line_failure(result: Result, code: int = 1) -> str:
    """The CLI failed with ``code`` and said why in one line on stderr, nothing on stdout."""
    assert result.code == code, result.text
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("✗ ")
    return lines[0]


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


async def _is(awaitable, expected) -> bool:
    return (await awaitable) == expected


async def plugin_pod(core, node: str):
    pods = await core.list_namespaced_pod(NS, label_selector=DEVICE_PLUGIN_SELECTOR)
    return next((p for p in pods.items if p.spec.node_name == node), None)


def container_log(cluster, pod) -> str:
    """What a pod's process printed (our simulated kubelet keeps it per pod uid)."""
    path = cluster.run_dir / "pods" / pod.metadata.uid / "container.log"
    return path.read_text() if path.exists() else ""


async def status_of(cluster, nodes: list[str]) -> tuple[dict, list[dict]]:
    """gpushare status --json, and its findings about ``nodes`` or the ClusterPolicy."""
    result = await gpushare(cluster, "status", "--json")
    assert result.code == 0, result.text
    report = json.loads(result.out)
    mine = [
        f
        for f in report["health"]
        if "ClusterPolicy" in f["problem"] or any(n in f["problem"] for n in nodes)
    ]
    return report, mine


# -- the Helm chart's policy ----------------------------------------------------------------
async def test_helm_policy_setup_again_then_disable(cluster, core, custom, policy, gpu_node):
    original = await policy(HELM)
    assert "config" not in original["spec"]["devicePlugin"]  # the chart's default
    node = await gpu_node(gpus=1)
    assert (await node_state(core, node))["gpu"] == "1"

    first = await gpushare(cluster, "setup", "--replicas", "4", "--yes", "--timeout", CLI_TIMEOUT)
    assert first.code == 0, first.text
    assert f"→ ClusterPolicy cluster-policy, ConfigMap {NS}/{CONFIG_MAP_NAME}" in first.out
    assert "GPU sharing is on: time-slicing, 4 replicas per GPU as nvidia.com/gpu" in first.out
    state = await node_state(core, node)
    assert (state["gpu"], state["replicas"], state["strategy"]) == ("4", "4", "time-slicing")
    assert state["product"].endswith("-SHARED")
    assert re.search(r"Physical GPUs:\s+1\n", first.out)
    assert re.search(r"Max concurrent users:\s+4\n", first.out)
    found = await read_policy(custom)
    assert found["spec"]["devicePlugin"]["config"] == {
        "name": CONFIG_MAP_NAME,
        "default": "gpushare-time-slicing-4",
    }
    record = json.loads(found["metadata"]["annotations"][POLICY_RECORD_ANNOTATION])
    assert record == {"configMap": CONFIG_MAP_NAME, "config": None, "devicePlugin": True}
    cm = await core.read_namespaced_config_map(CONFIG_MAP_NAME, NS)
    assert yaml.safe_load(cm.data["gpushare-time-slicing-4"]) == {
        "version": "v1",
        "sharing": {"timeSlicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}},
    }

    before = await snapshot(core, custom, [node])
    second = await gpushare(cluster, "setup", "--replicas", "4", "--yes", "--timeout", CLI_TIMEOUT)
    assert second.code == 0, second.text
    assert "nothing to change" in second.out and "(ClusterPolicy cluster-policy)" in second.out
    assert await snapshot(core, custom, [node]) == before

    disable = await gpushare(cluster, "disable", "--yes", "--timeout", CLI_TIMEOUT)
    assert disable.code == 0, disable.text
    assert "the earlier config is back (ClusterPolicy cluster-policy)" in disable.out
    state = await node_state(core, node)
    assert (state["gpu"], state["replicas"], state["strategy"]) == ("1", "1", "none")
    restored = await read_policy(custom)
    assert restored["spec"] == original["spec"]  # exactly what the chart rendered
    assert POLICY_RECORD_ANNOTATION not in (restored["metadata"].get("annotations") or {})
    # the ConfigMap was ours alone: it is gone
    names = {cm.metadata.name for cm in (await core.list_namespaced_config_map(NS)).items}
    assert CONFIG_MAP_NAME not in names

    again = await gpushare(cluster, "disable", "--yes")
    assert again.code == 0, again.text
    assert "has not set up GPU sharing through ClusterPolicy cluster-policy" in again.out


# -- the seed's own manual set-up ----------------------------------------------------------
async def test_the_seeds_manual_set_up_is_adopted_and_comes_back(
    cluster, core, custom, policy, gpu_node
):
    """ConfigMap time-slicing-config with key "any" (4 replicas), applied with kubectl as
    helm-snippets/time-slicing-configmap.yaml says: setup 4 finds it in place; setup 8
    replaces it, and disable brings it back exactly."""
    seed = yaml.safe_load(SEED_CONFIG_MAP.read_text())
    await core.create_namespaced_config_map(NS, seed)
    patch = json.loads(re.search(r"-p '(\{.*\})'", SEED_CONFIG_MAP.read_text()).group(1))
    original = await policy(HELM, config=patch["spec"]["devicePlugin"]["config"])
    node = await gpu_node(gpus=1)
    assert (await node_state(core, node))["gpu"] == "4"  # the seed's config applies

    before = await snapshot(core, custom, [node])
    four = await gpushare(cluster, "setup", "--replicas", "4", "--yes", "--timeout", CLI_TIMEOUT)
    assert four.code == 0, four.text
    assert "nothing to change" in four.out
    assert f"config 'any' in ConfigMap {NS}/{CONFIG_MAP_NAME} already gives" in four.out
    # nothing written, no key added, the device plugin not restarted
    assert await snapshot(core, custom, [node]) == before

    eight = await gpushare(cluster, "setup", "--replicas", "8", "--yes", "--timeout", CLI_TIMEOUT)
    assert eight.code == 0, eight.text
    assert (await node_state(core, node))["gpu"] == "8"
    cm = await core.read_namespaced_config_map(CONFIG_MAP_NAME, NS)
    assert set(cm.data) == {"any", "gpushare-time-slicing-8"}

    disable = await gpushare(cluster, "disable", "--yes", "--timeout", CLI_TIMEOUT)
    assert disable.code == 0, disable.text
    assert (await node_state(core, node))["gpu"] == "4"
    cm = await core.read_namespaced_config_map(CONFIG_MAP_NAME, NS)
    assert cm.data == seed["data"]
    assert cm.metadata.labels == seed["metadata"]["labels"]
    assert not cm.metadata.annotations
    restored = await read_policy(custom)
    assert restored["spec"] == original["spec"]
    assert POLICY_RECORD_ANNOTATION not in (restored["metadata"].get("annotations") or {})


# -- the OLM name, and several policies --------------------------------------------------------
async def test_an_olm_named_policy_is_found_and_named(cluster, core, custom, policy, gpu_node):
    original = await policy(OLM)
    assert original["metadata"]["name"] == "gpu-cluster-policy"
    node = await gpu_node(gpus=2)

    setup = await gpushare(cluster, "setup", "--replicas", "2", "--yes", "--timeout", CLI_TIMEOUT)
    assert setup.code == 0, setup.text
    assert "→ ClusterPolicy gpu-cluster-policy" in setup.out
    assert "(ClusterPolicy gpu-cluster-policy)" in setup.out
    assert (await node_state(core, node))["gpu"] == "4"
    found = await read_policy(custom, "gpu-cluster-policy")
    assert found["spec"]["devicePlugin"]["config"] == {
        "name": CONFIG_MAP_NAME,
        "default": "gpushare-time-slicing-2",
    }

    report, findings = await status_of(cluster, [node])
    assert report["cluster_policy"]["name"] == "gpu-cluster-policy"
    assert report["cluster_policy"]["set_up_by_gpushare"]
    assert findings == []
    text = await gpushare(cluster, "status")
    assert "ClusterPolicy gpu-cluster-policy: device plugin config" in text.out
    assert "no problems found" in text.out

    disable = await gpushare(cluster, "disable", "--yes", "--timeout", CLI_TIMEOUT)
    assert disable.code == 0, disable.text
    assert (await read_policy(custom, "gpu-cluster-policy"))["spec"] == original["spec"]
    assert (await node_state(core, node))["gpu"] == "2"


async def test_several_policies_need_a_choice(cluster, core, custom, policy, gpu_node):
    await policy(HELM)  # the older one: the operator uses it
    await policy(OLM)
    node = await gpu_node()
    before = await snapshot(core, custom, [node])

    several = one_line_failure(await gpushare(cluster, "setup", "--replicas", "4", "--yes"))
    assert "there are 2 ClusterPolicies (cluster-policy, gpu-cluster-policy)" in several
    assert "uses the oldest, cluster-policy" in several and "--policy cluster-policy" in several

    ignored = one_line_failure(
        await gpushare(
            cluster, "setup", "--replicas", "4", "--policy", "gpu-cluster-policy", "--yes"
        )
    )
    assert "the GPU operator ignores ClusterPolicy gpu-cluster-policy" in ignored
    assert "changing it shares nothing: use --policy cluster-policy" in ignored

    unknown = one_line_failure(await gpushare(cluster, "disable", "--policy", "nvidia", "--yes"))
    assert (
        "no ClusterPolicy named 'nvidia' (there is cluster-policy, gpu-cluster-policy)" in unknown
    )
    assert await snapshot(core, custom, [node]) == before

    dry = await gpushare(
        cluster, "setup", "--replicas", "4", "--policy", "cluster-policy", "--dry-run"
    )
    assert dry.code == 0, dry.text
    assert "ClusterPolicy cluster-policy: merge patch" in dry.out
    status = await gpushare(cluster, "status")
    assert "showing cluster-policy, the one the GPU operator uses" in status.out
    assert await snapshot(core, custom, [node]) == before


# -- disable always has a way out -------------------------------------------------------------
async def test_disable_when_the_recorded_original_is_gone(cluster, core, custom, policy, gpu_node):
    theirs = {"two": GPU_CONFIG_2, "plain": "version: v1\nflags:\n  migStrategy: none\n"}
    await core.create_namespaced_config_map(
        NS, {"metadata": {"name": "their-config"}, "data": theirs}
    )
    created = await policy(HELM, config={"name": "their-config", "default": "two"})
    node = await gpu_node(gpus=1)
    assert (await node_state(core, node))["gpu"] == "2"
    setup = await gpushare(cluster, "setup", "--replicas", "4", "--yes", "--timeout", CLI_TIMEOUT)
    assert setup.code == 0, setup.text

    # someone removes the key the original config selected
    await core.patch_namespaced_config_map(
        "their-config", NS, [{"op": "remove", "path": "/data/two"}]
    )
    before = await snapshot(core, custom, [node])
    stuck = one_line_failure(await gpushare(cluster, "disable", "--yes"))
    assert stuck.startswith(
        "✗ putting back the device plugin config that ClusterPolicy cluster-policy had before "
        f"gpushare set up sharing would stop the device plugin on {node}: the default selects "
        f'config "two", which ConfigMap {NS}/their-config does not have.'
    )
    assert "gpushare disable --unshared" in stuck
    assert await snapshot(core, custom, [node]) == before
    _, findings = await status_of(cluster, [node])
    assert findings == []  # nothing is broken yet: the nodes run gpushare's config

    out = await gpushare(cluster, "disable", "--unshared", "--yes", "--timeout", CLI_TIMEOUT)
    assert out.code == 0, out.text
    assert "no sharing is back (ClusterPolicy cluster-policy)" in out.out
    restored = await read_policy(custom)
    # as the chart renders it (with the CRD's defaults): no devicePlugin.config
    del created["spec"]["devicePlugin"]["config"]
    assert restored["spec"] == created["spec"]
    assert POLICY_RECORD_ANNOTATION not in (restored["metadata"].get("annotations") or {})
    cm = await core.read_namespaced_config_map("their-config", NS)
    assert cm.data == {"plain": theirs["plain"]}  # our key went, theirs stays
    state = await node_state(core, node)
    assert (state["gpu"], state["strategy"]) == ("1", "none")


# -- limits on replicas --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--replicas", "1"], "--replicas must be at least 2"),
        (["--replicas", "abc"], "--replicas must be a whole number"),
        (["--replicas", "99999999999999999999"], "in one message of at most 4 MiB"),
        (["--replicas", "60001"], "room for about 60000 slices per node"),
        (["--replicas", "49", "--strategy", "mps"], "at most 48 clients per GPU"),
        (["--replicas", "4", "--nodes", "model in (a"], "not a valid label selector"),
    ],
)
async def test_bad_input(cluster, core, custom, policy, gpu_node, args, expected):
    await policy()
    node = await gpu_node()
    before = await snapshot(core, custom, [node])
    result = await gpushare(cluster, "setup", *args, "--yes")
    assert result.out == ""
    assert expected in one_line_failure(result, code=2)
    assert await snapshot(core, custom, [node]) == before


async def test_a_replica_count_a_node_cannot_serve_is_refused(
    cluster, core, custom, policy, gpu_node
):
    await policy()
    node = await gpu_node(gpus=8)
    before = await snapshot(core, custom, [node])
    line = one_line_failure(await gpushare(cluster, "setup", "--replicas", "10000", "--yes"))
    assert line == (
        f"✗ ClusterPolicy cluster-policy: node {node}: 8 GPUs x 10000 replicas are 80000 slices, "
        "more than the 60000 that fit the one 4 MiB message in which the device plugin lists "
        "them to the kubelet: the node would offer no GPU"
    )
    assert await snapshot(core, custom, [node]) == before
    # 7500 slices per GPU still fit
    dry = await gpushare(cluster, "setup", "--replicas", "7500", "--dry-run")
    assert dry.code == 0, dry.text


# -- a status write racing with setup --------------------------------------------------------
async def test_a_status_write_during_setup_is_retried_a_spec_change_is_not(
    cluster, core, custom, namespace, policy, gpu_node
):
    """The operator writes the ClusterPolicy's status while setup waits for a Pending pod
    (after it planned, before it writes): setup patches again and succeeds. Someone
    changing the spec at that moment makes it fail and undo its ConfigMap."""
    await policy()
    node = await gpu_node()
    blocker = unique("wants-five")

    async def start_and_wait(replicas: str) -> tuple[asyncio.subprocess.Process, str]:
        await core.create_namespaced_pod(namespace, waiting_pod(blocker, node, slices=5))
        process = await start_gpushare(
            cluster,
            "-v",
            "setup",
            "--replicas",
            replicas,
            "--yes",
            "--wait",
            "--timeout",
            CLI_TIMEOUT,
        )
        return process, await read_until(process, "waiting for Pending GPU pods")

    process, err = await start_and_wait("4")
    try:
        planned = await read_policy(custom)
        await custom.patch_cluster_custom_object_status(
            CLUSTER_POLICY_GROUP,
            CLUSTER_POLICY_VERSION,
            CLUSTER_POLICY_PLURAL,
            "cluster-policy",
            {"status": {"state": "ready", "namespace": NS}},
            _content_type="application/merge-patch+json",
        )
        written = await read_policy(custom)
        assert written["metadata"]["resourceVersion"] != planned["metadata"]["resourceVersion"]
        assert written["spec"] == planned["spec"]
        await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
        result = await finish(process, err=err)
    finally:
        with contextlib.suppress(ApiException):
            await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
    assert result.code == 0, result.text
    # the CLI's log says what happened
    assert "ClusterPolicy cluster-policy: only its status changed (resourceVersion" in result.err
    assert (await node_state(core, node))["gpu"] == "4"
    after = await read_policy(custom)
    assert after["spec"]["devicePlugin"]["config"]["default"] == "gpushare-time-slicing-4"
    assert after["status"]["state"] == "ready"

    # now a real change of the spec by someone else, at the same moment
    await wait_for(lambda: _is(pod_phase(core, namespace, blocker), None), 30, "the blocker gone")
    process, err = await start_and_wait("8")
    try:
        await custom.patch_cluster_custom_object(
            CLUSTER_POLICY_GROUP,
            CLUSTER_POLICY_VERSION,
            CLUSTER_POLICY_PLURAL,
            "cluster-policy",
            {"spec": {"devicePlugin": {"config": {"name": "theirs", "default": "x"}}}},
            _content_type="application/merge-patch+json",
        )
        theirs = await read_policy(custom)
        await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
        result = await finish(process, err=err)
    finally:
        with contextlib.suppress(ApiException):
            await core.delete_namespaced_pod(blocker, namespace, grace_period_seconds=0)
    assert result.code == 1, result.text
    assert result.last_error == (
        "✗ ClusterPolicy cluster-policy: someone changed spec.devicePlugin while gpushare ran; "
        "run it again to plan from what is there now (undone: restore the ConfigMap)"
    )
    now = await read_policy(custom)
    assert now["spec"] == theirs["spec"]  # their change stands, ours is not there
    cm = await core.read_namespaced_config_map(CONFIG_MAP_NAME, NS)
    assert set(cm.data) == {"gpushare-time-slicing-4"}


# -- status shows what is broken, with the fix -----------------------------------------------
async def test_status_shows_a_broken_set_up_and_the_fixes_work(
    cluster, core, custom, policy, gpu_node, operator
):
    await core.create_namespaced_config_map(NS, yaml.safe_load(SEED_CONFIG_MAP.read_text()))
    await policy(HELM, config={"name": CONFIG_MAP_NAME, "default": "any"})
    good = await gpu_node()
    bad = await gpu_node(labels={NODE_CONFIG_LABEL: "t4"}, ready=False)

    async def failed():
        pod = await plugin_pod(core, bad)
        return pod if pod is not None and pod.status.phase == "Failed" else None

    failed_pod = await wait_for(failed, 60, "the device plugin on the node labelled t4 to fail")
    # the stand-in says why, as the config-manager would
    assert "cannot start: specified config t4 does not exist" in container_log(cluster, failed_pod)

    _, findings = await status_of(cluster, [good, bad])
    assert findings == [
        {
            "problem": f'node {bad} selects config "t4" (label {NODE_CONFIG_LABEL}), which '
            f"ConfigMap {NS}/{CONFIG_MAP_NAME} does not have: its device plugin cannot start",
            "fix": f"kubectl label node {bad} {NODE_CONFIG_LABEL}-",
        },
        {
            "problem": f"the device-plugin pod {NS}/{failed_pod.metadata.name} on {bad} is "
            "Failed (exit 1), not running, because of the config above",
            "fix": f"kubectl label node {bad} {NODE_CONFIG_LABEL}-",
        },
    ]
    text = await gpushare(cluster, "status")
    assert f"fix: kubectl label node {bad} {NODE_CONFIG_LABEL}-" in text.out

    # the fix: the label goes; the crashed pod is then the only problem, with its own fix
    await core.patch_node(bad, {"metadata": {"labels": {NODE_CONFIG_LABEL: None}}})
    _, findings = await status_of(cluster, [good, bad])
    assert [f["fix"] for f in findings] == [
        f"kubectl -n {NS} delete pod {failed_pod.metadata.name}  # the DaemonSet starts it again"
    ]
    await core.delete_namespaced_pod(failed_pod.metadata.name, NS)
    await wait_for(lambda: operator.pod_on(bad), 60, "the device plugin on the fixed node")

    # GPU feature discovery and the device plugin disagree on the good node
    await core.patch_node(good, {"metadata": {"labels": {REPLICAS_LABEL: "3"}}})
    _, findings = await status_of(cluster, [good, bad])
    (finding,) = findings
    assert finding["problem"] == (
        f"node {good} advertises 4 nvidia.com/gpu, but its labels say 1 GPUs x 3 replicas = 3: "
        "the device plugin and GPU feature discovery disagree"
    )
    await restart_as_told(core, operator, finding["fix"], good)

    # the policy names a ConfigMap that is gone
    await core.delete_namespaced_config_map(CONFIG_MAP_NAME, NS)
    _, findings = await status_of(cluster, [good, bad])
    assert findings == [
        {
            "problem": f"ClusterPolicy cluster-policy names ConfigMap {NS}/{CONFIG_MAP_NAME}, "
            "which does not exist: the device plugin cannot start on any GPU node",
            "fix": f"kubectl patch {CLUSTER_POLICY_RESOURCE}/cluster-policy --type merge "
            '-p \'{"spec":{"devicePlugin":{"config":null}}}\'',
        }
    ]
    await custom.patch_cluster_custom_object(
        CLUSTER_POLICY_GROUP,
        CLUSTER_POLICY_VERSION,
        CLUSTER_POLICY_PLURAL,
        "cluster-policy",
        {"spec": {"devicePlugin": {"config": None}}},
        _content_type="application/merge-patch+json",
    )
    # the operator would now restart every device plugin; until they restart, status says so
    _, findings = await status_of(cluster, [good, bad])
    assert {f["problem"].split(" shows ")[0] for f in findings} == {f"node {good}", f"node {bad}"}
    for finding in findings:
        assert "but with no config it should be not shared" in finding["problem"]
        node = good if f"node {good} " in finding["problem"] else bad
        await restart_as_told(core, operator, finding["fix"], node)
    _, findings = await status_of(cluster, [good, bad])
    assert findings == []
    assert (await node_state(core, good))["gpu"] == "1"


async def restart_as_told(core, operator, fix: str, node: str) -> None:
    """Run a "kubectl -n NS delete pod NAME" fix, and wait for the new device plugin."""
    pod = await plugin_pod(core, node)
    assert fix.startswith(f"kubectl -n {NS} delete pod {pod.metadata.name}"), fix
    await core.delete_namespaced_pod(pod.metadata.name, NS)

    async def replaced():
        ready = await operator.pod_on(node)
        return ready is not None and ready.metadata.uid != pod.metadata.uid

    await wait_for(replaced, 60, f"a new device plugin on {node}")


# -- the rest of the CLI -----------------------------------------------------------------------
async def test_pending_gpu_pods_block_the_restart_unless_waited_for_or_forced(
    cluster, core, custom, namespace, policy, gpu_node
):
    await policy()
    node = await gpu_node(gpus=1)
    first, second = unique("wants-two"), unique("wants-five")
    await core.create_namespaced_pod(namespace, waiting_pod(first, node, slices=2))
    try:
        before = await snapshot(core, custom, [node])
        refused = one_line_failure(await gpushare(cluster, "setup", "--replicas", "4", "--yes"))
        assert f"{namespace}/{first}" in refused
        assert "Pending" in refused and "--force" in refused
        dry = await gpushare(cluster, "setup", "--replicas", "4", "--dry-run")
        assert dry.code == 0 and f"{namespace}/{first}" in dry.err, dry.text
        assert await snapshot(core, custom, [node]) == before

        # --wait: the CLI waits, says for what, and goes ahead once the pod is gone
        waiting = await start_gpushare(
            cluster, "setup", "--replicas", "4", "--yes", "--wait", "--timeout", CLI_TIMEOUT
        )
        line = await read_until(waiting, "waiting for Pending GPU pods")
        assert first in line.splitlines()[-1], line
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


async def test_dry_run_prints_the_plan_and_changes_nothing(cluster, core, custom, policy, gpu_node):
    await policy()
    node = await gpu_node(gpus=2)
    before = await snapshot(core, custom, [node])
    dry = await gpushare(cluster, "setup", "--replicas", "4", "--dry-run")
    assert dry.code == 0, dry.text
    assert f"ConfigMap {NS}/{CONFIG_MAP_NAME}: create" in dry.out
    assert "gpushare-time-slicing-4: |" in dry.out  # the config itself, as YAML
    assert "replicas: 4" in dry.out
    assert "ClusterPolicy cluster-policy: merge patch" in dry.out
    assert "default: gpushare-time-slicing-4" in dry.out
    assert f"node {node}: restart the device plugin" in dry.out
    assert "dry run: nothing was changed" in dry.out
    assert await snapshot(core, custom, [node]) == before

    as_json = await gpushare(cluster, "setup", "--replicas", "4", "--dry-run", "--json")
    assert as_json.code == 0, as_json.text
    document = json.loads(as_json.out)
    assert document["dry_run"] is True and document["changed"] is False
    assert document["cluster_policy"] == "cluster-policy"
    assert document["plan"]["restart_nodes"] == [node]
    assert document["plan"]["expected"][node]["replicas"] == 4
    assert await snapshot(core, custom, [node]) == before


async def test_per_node_configs_rename_mps_and_status(cluster, core, custom, policy, gpu_node):
    """Different GPU models get different replica counts through the node label."""
    await policy(OLM)
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
    found = await read_policy(custom, "gpu-cluster-policy")
    assert found["spec"]["devicePlugin"]["config"]["default"] == ""

    report, findings = await status_of(cluster, [small, large])
    rows = {row["node"]: row for row in report["nodes"]}
    assert (rows[small]["slices"], rows[small]["replicas"], rows[small]["gpus"]) == (4, 4, 1)
    assert (rows[large]["resource"], rows[large]["slices"]) == (SHARED_RESOURCE, 6)
    assert rows[large]["strategy"] == "mps"
    assert findings == []

    disable = await gpushare(cluster, "disable", "--yes", "--timeout", CLI_TIMEOUT)
    assert disable.code == 0, disable.text
    for node, gpus in ((small, "1"), (large, "2")):
        state = await node_state(core, node)
        assert (state["gpu"], state["shared"], state["config"]) == (gpus, None, None)
        annotations = (await core.read_node(node)).metadata.annotations or {}
        assert NODE_RECORD_ANNOTATION not in annotations


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
        report, findings = await status_of(cluster, [node])
        row = next(r for r in report["nodes"] if r["node"] == node)
        assert (row["slices"], row["used"], row["free"]) == (2, 2, 0)
        assert row["pods"] == sorted(f"{namespace}/{p}" for p in pods[:2])
        assert row["pending"] == [f"{namespace}/{pods[2]}"]
        waiting = next(p for p in report["pending"] if p["pod"] == f"{namespace}/{pods[2]}")
        assert waiting["lack_of_slices"] and waiting["requests"] == {"nvidia.com/gpu": 1}
        assert findings == []

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
    leaves it exactly as it was, with the original default selected again. A key no
    node selects may hold what the plugin ignores or refuses: that is a warning."""
    theirs = {
        "two": GPU_CONFIG_2,
        "plain": "version: v1\nflags:\n  migStrategy: none\n",
        "t4": GPU_CONFIG_2.replace("replicas:", "replica:"),  # the plugin refuses it
    }
    await core.create_namespaced_config_map(
        NS, {"metadata": {"name": "their-config", "labels": {"team": "ml"}}, "data": theirs}
    )
    original = await policy(HELM, config={"name": "their-config", "default": "two"})
    node = await gpu_node(gpus=1)
    assert (await node_state(core, node))["gpu"] == "2"  # their config applies

    setup = await gpushare(cluster, "setup", "--replicas", "4", "--yes", "--timeout", CLI_TIMEOUT)
    assert setup.code == 0, setup.text
    assert (
        f'! config "t4" in ConfigMap {NS}/their-config, which no node selects: the device '
        "plugin refuses it: sharing.timeSlicing.resources[0]: no replicas specified"
    ) in setup.err
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


async def test_without_a_cluster_policy_points_to_the_plain_device_plugin(
    cluster, core, custom, operator, gpu_node
):
    node = await gpu_node()
    before = await snapshot(core, custom, [node])
    assert before["policies"] == {}
    line = one_line_failure(await gpushare(cluster, "setup", "--replicas", "4", "--yes"))
    assert "no GPU operator ClusterPolicy" in line
    assert "--print-config" in line and "helm upgrade" in line
    assert await snapshot(core, custom, [node]) == before

    as_json = await gpushare(cluster, "disable", "--yes", "--json")
    assert as_json.code == 1
    assert json.loads(as_json.out)["ok"] is False


async def test_a_name_clash_is_refused(cluster, core, custom, policy, gpu_node):
    # a key with the name we would write, that we did not write: not ours to replace
    await core.create_namespaced_config_map(
        NS,
        {"metadata": {"name": CONFIG_MAP_NAME}, "data": {"gpushare-time-slicing-4": GPU_CONFIG_2}},
    )
    await policy(HELM, config={"name": CONFIG_MAP_NAME, "default": ""})
    node = await gpu_node()
    before = await snapshot(core, custom, [node])
    line = one_line_failure(await gpushare(cluster, "setup", "--replicas", "4", "--yes"))
    assert line == (
        f"✗ ClusterPolicy cluster-policy: ConfigMap {NS}/{CONFIG_MAP_NAME} already has a key "
        '"gpushare-time-slicing-4" that gpushare did not write; rename or remove it, then run '
        "gpushare again"
    )
    assert await snapshot(core, custom, [node]) == before


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
                {
                    "apiGroups": ["nvidia.com"],
                    "resources": ["clusterpolicies"],
                    "verbs": ["get", "list"],
                },
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
        line = one_line_failure(result)
        assert "cannot patch clusterpolicies.nvidia.com (cluster-wide)" in line
        assert user in line and "ClusterPolicy cluster-policy" in line
        assert await snapshot(core, custom, [node]) == before
    finally:
        await rbac.delete_cluster_role_binding(role)
        await rbac.delete_cluster_role(role)


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
                            "apiGroups": [CLUSTER_POLICY_GROUP],
                            "apiVersions": [CLUSTER_POLICY_VERSION],
                            "operations": ["UPDATE"],
                            "resources": [CLUSTER_POLICY_PLURAL],
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
                CLUSTER_POLICY_GROUP,
                CLUSTER_POLICY_VERSION,
                CLUSTER_POLICY_PLURAL,
                "cluster-policy",
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
        line = one_line_failure(await gpushare(cluster, "setup", "--replicas", "4", "--yes"))
        assert "frozen by the platform team" in line
        assert "undone: delete the ConfigMap" in line
        assert await snapshot(core, custom, [node]) == before
    finally:
        await admission.delete_validating_admission_policy_binding(name)
        await admission.delete_validating_admission_policy(name)


async def test_the_real_crd_refuses_a_policy_without_its_required_fields(custom, operator):
    """The objects these tests create are the operator's own, changed only in
    spec.devicePlugin.config: the real CRD would refuse anything less."""
    body = nvidia_object(HELM)
    body["metadata"]["name"] = unique("incomplete")
    del body["spec"]["toolkit"]
    with pytest.raises(ApiException) as error:
        await custom.create_cluster_custom_object(
            CLUSTER_POLICY_GROUP, CLUSTER_POLICY_VERSION, CLUSTER_POLICY_PLURAL, body
        )
    assert error.value.status == 422
    assert "spec.toolkit: Required value" in error.value.body
