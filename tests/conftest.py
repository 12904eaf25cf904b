"""Fixtures: the local cluster (one per test session), nodes, namespaces and hubs."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from jupyterhub_gpushare.testing.cluster import ClusterError, LocalCluster, build_binaries
from jupyterhub_gpushare.testing.hub import LocalHub
from jupyterhub_gpushare.testing.nodes import create_gpu_node, delete_node

_figures: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if _figures:
        terminalreporter.section("local cluster")
        for name, value in _figures.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def cluster() -> LocalCluster:
    try:
        bin_dir, _ = build_binaries()
    except ClusterError as e:
        pytest.exit(str(e), returncode=3)
    recorded = bin_dir / "build-seconds"
    if recorded.exists():
        built_at = time.strftime("%Y-%m-%d %H:%M", time.localtime(recorded.stat().st_mtime))
        _figures["control-plane cold build seconds"] = (
            f"{recorded.read_text().strip()} (built {built_at}, cached in {bin_dir})"
        )
    run_dir = Path(tempfile.mkdtemp(prefix="gpushare-cluster-"))
    local = LocalCluster(run_dir=run_dir, bin_dir=bin_dir)
    try:
        local.start()
    except ClusterError as e:
        local.remove()
        pytest.exit(str(e), returncode=3)
    _figures["cluster start seconds"] = f"{local.start_seconds:.1f}"
    yield local
    peaks = local.peak_memory()
    control_plane = sum(v for k, v in peaks.items() if k != "kubelet")
    _figures["control-plane peak memory"] = (
        f"{control_plane / 2**20:.0f} MiB ("
        + ", ".join(f"{name} {value / 2**20:.0f} MiB" for name, value in peaks.items())
        + ")"
    )
    if os.environ.get("GPUSHARE_KEEP_CLUSTER_LOGS"):
        local.stop()
    else:
        local.remove()


@pytest.fixture(scope="session")
async def kube(cluster: LocalCluster) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(cluster.kubeconfig), client_configuration=configuration
    )
    api = client.ApiClient(configuration)
    yield api
    await api.close()


@pytest.fixture(scope="session")
def core(kube: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube)


@pytest.fixture(scope="session")
async def namespace(core: client.CoreV1Api) -> str:
    """One namespace for the session: without a controller manager, deleted
    namespaces would stay Terminating, so tests delete their own objects instead."""
    name = "gpushare-test"
    await core.create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture
async def gpu_nodes(core: client.CoreV1Api) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Create simulated GPU nodes; they and their pods are removed afterwards."""
    created: list[str] = []

    async def make(**kwargs) -> str:
        name = kwargs.pop("name", None) or f"gpu-{uuid.uuid4().hex[:6]}"
        await create_gpu_node(core, name, **kwargs)
        created.append(name)
        return name

    yield make
    for name in created:
        await delete_node(core, name)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
async def hub_factory(cluster: LocalCluster, namespace: str, core: client.CoreV1Api):
    """Start real hubs; each is stopped at the end of the module, and the user
    servers it leaves behind (z2jh's hubs leave them running) are deleted."""
    hubs: list[LocalHub] = []

    def start(extra_config: str = "", kubeconfig: Path | None = None, **kwargs) -> LocalHub:
        run_dir = Path(tempfile.mkdtemp(prefix="gpushare-hub-"))
        hub = LocalHub(run_dir, kubeconfig or cluster.kubeconfig, namespace, extra_config, **kwargs)
        hubs.append(hub)
        hub.start()
        return hub

    yield start
    for hub in hubs:
        hub.stop()
        if not os.environ.get("GPUSHARE_KEEP_CLUSTER_LOGS"):
            shutil.rmtree(hub.run_dir, ignore_errors=True)
    await core.delete_collection_namespaced_pod(
        namespace, label_selector="component=singleuser-server", grace_period_seconds=0
    )
