"""GPUShareSpawner in a real hub: slices, the memory share as the process sees it,
profiles, replica discovery from node labels, MPS nodes, and clear errors when the
share cannot be worked out (missing label, no permission to list nodes)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from tests.spawning import (
    process_environment,
    progress_events,
    request_server,
    stop_server,
    user_pod,
    wait_ready,
)

pytestmark = [pytest.mark.cluster, pytest.mark.hub]

HEADROOM = 768
RTX_5090_MIB = 32607

HUB_CONFIG = """
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
c.KubeSpawner.environment = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
c.KubeSpawner.profile_list = [
    {"display_name": "One slice", "slug": "one", "default": True},
    {"display_name": "CPU only", "slug": "cpu", "kubespawner_override": {"gpu_slices": 0}},
    {"display_name": "Two slices", "slug": "two", "kubespawner_override": {"gpu_slices": 2}},
    {"display_name": "Too many", "slug": "huge", "kubespawner_override": {"gpu_slices": 64}},
    {
        "display_name": "An image with a PYTHONPATH of its own",
        "slug": "own-path",
        "kubespawner_override": {"image_pythonpath": "/opt/app/lib::/opt/app/plugins:"},
    },
]
"""


@pytest.fixture(scope="module")
async def hub(hub_factory, core, namespace):
    hub = hub_factory(HUB_CONFIG)
    yield hub
    with contextlib.suppress(ApiException):
        await core.delete_namespaced_config_map("gpushare-memory-guard", namespace)


def fraction(slices: int, replicas: int) -> str:
    return f"{round(slices / replicas - HEADROOM / RTX_5090_MIB, 4):g}"


async def test_one_slice_and_the_share_the_process_sees(hub, cluster, core, namespace, gpu_nodes):
    await gpu_nodes(replicas=4, memory_mib=RTX_5090_MIB)
    assert await request_server(hub, "ada") == 202
    await wait_ready(hub, "ada")
    try:
        pod = await user_pod(core, namespace, "ada")
        limits = pod.spec.containers[0].resources.limits
        assert limits["nvidia.com/gpu"] == "1"
        env = process_environment(cluster, pod)
        share = fraction(1, 4)
        assert share == "0.2264"
        assert env["GPUSHARE_MEMORY_FRACTION"] == share
        assert env["GPUSHARE_GPU_SLICES"] == "1"
        assert env["GPUSHARE_GPU_REPLICAS"] == "4"
        assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"  # the admin's environment wins
        assert "XLA_CLIENT_MEM_FRACTION" not in env  # JAX 0.11 refuses both names at once
        assert env["CUPY_GPU_MEMORY_LIMIT"] == "22.64%"
        assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
        # the shipped default: less fragmentation, the cap kept (measured)
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        # from the node's GPU feature discovery label; the notice is on by default
        assert env["GPUSHARE_SHARING"] == "time-slicing"
        assert env["GPUSHARE_NOTICE"] == "1"
        assert "NVIDIA_VISIBLE_DEVICES" not in env  # the device plugin's to set
        # the guard arrived through the ConfigMap volume and is the whole PYTHONPATH
        (startup,) = env["PYTHONPATH"].split(":")
        assert (Path(startup) / "sitecustomize.py").exists()
    finally:
        await stop_server(hub, core, namespace, "ada")


async def test_two_slices_get_twice_the_share(hub, cluster, core, namespace, gpu_nodes):
    await gpu_nodes(replicas=4, memory_mib=RTX_5090_MIB)
    assert await request_server(hub, "bo", {"profile": "two"}) == 202
    await wait_ready(hub, "bo")
    try:
        pod = await user_pod(core, namespace, "bo")
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"
        env = process_environment(cluster, pod)
        assert env["GPUSHARE_MEMORY_FRACTION"] == fraction(2, 4) == "0.4764"
        assert env["GPUSHARE_GPU_SLICES"] == "2"
    finally:
        await stop_server(hub, core, namespace, "bo")


async def test_cpu_only_profile_gets_no_gpu(hub, cluster, core, namespace, gpu_nodes):
    await gpu_nodes(replicas=4)
    assert await request_server(hub, "cy", {"profile": "cpu"}) == 202
    await wait_ready(hub, "cy")
    try:
        pod = await user_pod(core, namespace, "cy")
        limits = pod.spec.containers[0].resources.limits or {}
        assert "nvidia.com/gpu" not in limits
        env = process_environment(cluster, pod)
        gpu_vars = [k for k in env if k.startswith(("GPUSHARE_", "XLA_", "CUPY_", "TF_FORCE"))]
        # only the admin's own variable is there
        assert gpu_vars == ["XLA_PYTHON_CLIENT_MEM_FRACTION"]
        assert "PYTORCH_CUDA_ALLOC_CONF" not in env
        # CUDA images ask for every GPU; the container toolkit then hides them all
        assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
        assert not pod.spec.volumes or all(v.config_map is None for v in pod.spec.volumes)
    finally:
        await stop_server(hub, core, namespace, "cy")


async def test_replicas_follow_the_node_label(hub, cluster, core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=4, memory_mib=RTX_5090_MIB)
    assert await request_server(hub, "di") == 202
    await wait_ready(hub, "di")
    env = process_environment(cluster, await user_pod(core, namespace, "di"))
    assert env["GPUSHARE_GPU_REPLICAS"] == "4"
    await stop_server(hub, core, namespace, "di")

    # the device plugin now shares the GPU 8 ways
    await core.patch_node(node, {"metadata": {"labels": {"nvidia.com/gpu.replicas": "8"}}})
    await core.patch_node_status(
        node,
        {"status": {"capacity": {"nvidia.com/gpu": "8"}, "allocatable": {"nvidia.com/gpu": "8"}}},
    )
    assert await request_server(hub, "di") == 202
    await wait_ready(hub, "di")
    try:
        env = process_environment(cluster, await user_pod(core, namespace, "di"))
        assert env["GPUSHARE_GPU_REPLICAS"] == "8"
        assert env["GPUSHARE_MEMORY_FRACTION"] == fraction(1, 8)
    finally:
        await stop_server(hub, core, namespace, "di")


async def test_too_many_slices_fail_clearly_before_any_pod(hub, core, namespace, gpu_nodes):
    await gpu_nodes(replicas=4)
    assert await request_server(hub, "ed", {"profile": "huge"}) == 202
    events = await progress_events(hub, "ed")
    assert events[-1]["failed"] is True
    message = events[-1]["message"]
    assert "asks for 64 GPU slices, but the largest node it can use offers 4" in message
    pods = await core.list_namespaced_pod(namespace, label_selector="hub.jupyter.org/username=ed")
    assert pods.items == []


async def test_a_profile_keeps_the_images_pythonpath(hub, cluster, core, namespace, gpu_nodes):
    await gpu_nodes(replicas=4, memory_mib=RTX_5090_MIB)
    assert await request_server(hub, "fay", {"profile": "own-path"}) == 202
    await wait_ready(hub, "fay")
    try:
        env = process_environment(cluster, await user_pod(core, namespace, "fay"))
        startup, *image = env["PYTHONPATH"].split(":")
        assert (Path(startup) / "sitecustomize.py").exists()
        # in order, and no empty entry (which would put the working directory on sys.path)
        assert image == ["/opt/app/lib", "/opt/app/plugins"]
    finally:
        await stop_server(hub, core, namespace, "fay")


async def test_mps_nodes_give_a_hard_cap_of_one_slice(hub, cluster, core, namespace, gpu_nodes):
    await gpu_nodes(replicas=4, memory_mib=RTX_5090_MIB, strategy="mps")
    assert await request_server(hub, "gil") == 202
    events = await progress_events(hub, "gil", timeout=120)
    try:
        assert events[-1].get("ready"), events[-1]
        (cap,) = [e["message"] for e in events if "of its memory" in e.get("message", "")]
        assert cap == (
            "A GPU slice is free: starting your server. Your server gets 1 of the 4 slices of a "
            "GPU and 7.2 GiB of its memory (a hard cap: with MPS the GPU itself holds every "
            "process to it, and to 1/4 of the GPU's compute)."
        )
        env = process_environment(cluster, await user_pod(core, namespace, "gil"))
        assert env["GPUSHARE_SHARING"] == "mps"
        assert env["GPUSHARE_MEMORY_FRACTION"] == fraction(1, 4)
    finally:
        await stop_server(hub, core, namespace, "gil")

    # MPS holds every process to one slice, whatever it asks for
    assert await request_server(hub, "gil", {"profile": "two"}) == 202
    events = await progress_events(hub, "gil")
    assert events[-1]["failed"] is True
    assert "its GPUs are shared with MPS" in events[-1]["message"]
    assert "gpu_slices = 1" in events[-1]["message"]


async def test_without_the_replicas_label_gpu_spawns_fail_closed(hub, core, namespace, gpu_nodes):
    node = await gpu_nodes(replicas=4)
    await core.patch_node(node, {"metadata": {"labels": {"nvidia.com/gpu.replicas": None}}})
    assert await request_server(hub, "hal") == 202
    events = await progress_events(hub, "hal")
    assert events[-1]["failed"] is True
    message = events[-1]["message"]
    assert "cannot work out this server's share of the GPU" in message
    assert "carries the label nvidia.com/gpu.replicas" in message
    assert "c.GPUShareSpawner.gpu_replicas" in message
    pods = await core.list_namespaced_pod(namespace, label_selector="hub.jupyter.org/username=hal")
    assert pods.items == []
    # a CPU-only server does not need the share
    assert await request_server(hub, "ida", {"profile": "cpu"}) == 202
    await wait_ready(hub, "ida")
    await stop_server(hub, core, namespace, "ida")


# What z2jh's hub Role allows in its namespace, and the memory guard's ConfigMap
# (helm-snippets/rbac.yaml), but not helm-snippets' ClusterRole: the hub may not
# list nodes.
NO_NODES_IDENTITY = "system:serviceaccount:gpushare-test:hub-without-nodes"


def namespace_only_rbac(namespace: str) -> tuple[dict, dict]:
    rules = [
        {
            "apiGroups": [""],
            "resources": ["pods", "persistentvolumeclaims", "secrets", "services"],
            "verbs": ["get", "watch", "list", "create", "delete"],
        },
        {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "watch", "list"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "update"]},
    ]
    name = "hub-without-nodes"
    role = {"metadata": {"name": name, "namespace": namespace}, "rules": rules}
    binding = {
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "User", "name": NO_NODES_IDENTITY}],
    }
    return role, binding


@pytest.fixture(scope="module")
async def hub_without_node_access(hub_factory, cluster, kube, namespace):
    rbac = client.RbacAuthorizationV1Api(kube)
    role, binding = namespace_only_rbac(namespace)
    await rbac.create_namespaced_role(namespace, role)
    await rbac.create_namespaced_role_binding(namespace, binding)
    kubeconfig = cluster.kubeconfig_for(NO_NODES_IDENTITY)
    try:
        yield hub_factory(HUB_CONFIG, kubeconfig=kubeconfig)
    finally:
        with contextlib.suppress(ApiException):
            await rbac.delete_namespaced_role_binding(binding["metadata"]["name"], namespace)
        with contextlib.suppress(ApiException):
            await rbac.delete_namespaced_role(role["metadata"]["name"], namespace)


async def test_without_permission_to_list_nodes_gpu_spawns_fail_closed(
    hub_without_node_access, core, namespace, gpu_nodes
):
    hub = hub_without_node_access
    await gpu_nodes(replicas=4)
    assert await request_server(hub, "jo") == 202
    events = await progress_events(hub, "jo")
    assert events[-1]["failed"] is True
    message = events[-1]["message"]
    assert "cannot work out this server's share of the GPU" in message
    assert "the hub may not list nodes (403 Forbidden)" in message
    assert "helm-snippets/rbac.yaml" in message
    pods = await core.list_namespaced_pod(namespace, label_selector="hub.jupyter.org/username=jo")
    assert pods.items == []
    # the same hub starts CPU-only servers
    assert await request_server(hub, "kim", {"profile": "cpu"}) == 202
    await wait_ready(hub, "kim")
    await stop_server(hub, core, namespace, "kim")
