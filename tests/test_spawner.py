"""GPUShareSpawner in a real hub: slices, the memory share as the process sees it,
profiles, replica discovery from node labels, and clear errors."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
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
c.GPUShareSpawner.pytorch_cuda_alloc_conf = "expandable_segments:True"
c.GPUShareSpawner.pytorch_allocator_fraction = True
c.KubeSpawner.profile_list = [
    {"display_name": "One slice", "slug": "one", "default": True},
    {"display_name": "CPU only", "slug": "cpu", "kubespawner_override": {"gpu_slices": 0}},
    {"display_name": "Two slices", "slug": "two", "kubespawner_override": {"gpu_slices": 2}},
    {"display_name": "Too many", "slug": "huge", "kubespawner_override": {"gpu_slices": 64}},
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
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == (
            f"expandable_segments:True,per_process_memory_fraction:{share}"
        )
        # the guard arrived through the ConfigMap volume and is first on PYTHONPATH
        startup = Path(env["PYTHONPATH"].split(":")[0])
        assert (startup / "sitecustomize.py").exists()
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
