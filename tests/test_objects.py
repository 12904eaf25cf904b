"""The GPU share arithmetic and the pod changes, without a cluster."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes_asyncio.client import (
    V1Container,
    V1EnvVar,
    V1Pod,
    V1PodSpec,
    V1ResourceRequirements,
)

from jupyterhub_gpushare import objects
from jupyterhub_gpushare.objects import GPUShare, GPUShareConfigError


def test_quarter_share_less_headroom():
    assert objects.memory_fraction(1, 4, 32607, 768) == pytest.approx(0.25 - 768 / 32607, abs=1e-4)
    assert objects.memory_fraction(2, 4, 32607, 768) == pytest.approx(0.5 - 768 / 32607, abs=1e-4)


def test_share_without_known_memory_has_no_headroom():
    assert objects.memory_fraction(1, 4, None, 768) == 0.25


def test_headroom_larger_than_share_is_an_error():
    with pytest.raises(GPUShareConfigError, match="leaves nothing"):
        objects.memory_fraction(1, 64, 16000, 768)


@given(
    slices=st.integers(1, 16),
    replicas=st.integers(1, 32),
    memory=st.integers(8_000, 200_000),
    headroom=st.integers(0, 2048),
)
def test_fraction_is_within_bounds_and_grows_with_slices(slices, replicas, memory, headroom):
    try:
        one = objects.memory_fraction(1, replicas, memory, headroom)
    except GPUShareConfigError:
        return
    more = objects.memory_fraction(slices, replicas, memory, headroom)
    assert 0 < one <= more <= 1
    assert more <= min(slices / replicas, 1) + 1e-4  # rounded to 4 places


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_bad_slices(value):
    with pytest.raises(GPUShareConfigError, match="gpu_slices"):
        objects.check_slices(value)


@pytest.mark.parametrize("value", [0, -3, 2.0])
def test_bad_replicas(value):
    with pytest.raises(GPUShareConfigError, match="gpu_replicas"):
        objects.check_replicas(value)


@pytest.mark.parametrize("value", [0, -0.1, 1.01])
def test_bad_fraction(value):
    with pytest.raises(GPUShareConfigError, match=r"\(0, 1\]"):
        objects.check_fraction(value)


@pytest.mark.parametrize(
    "name", ["nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-1g.10gb"]
)
def test_known_resource_names(name):
    assert objects.check_resource_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "nvidia.com/gpus", "amd.com/gpu", "nvidia.com/gpu/1"])
def test_unknown_resource_names(name):
    with pytest.raises(GPUShareConfigError, match=r"nvidia\.com/gpu\.shared"):
        objects.check_resource_name(name)


def test_alloc_conf_adds_fraction_only_when_asked():
    assert objects.pytorch_alloc_conf("expandable_segments:True", 0.25, False) == (
        "expandable_segments:True"
    )
    assert objects.pytorch_alloc_conf("expandable_segments:True", 0.25, True) == (
        "expandable_segments:True,per_process_memory_fraction:0.25"
    )
    # the admin's own value is kept
    assert objects.pytorch_alloc_conf("per_process_memory_fraction:0.1", 0.25, True) == (
        "per_process_memory_fraction:0.1"
    )


def test_alloc_conf_refuses_cuda_malloc_async():
    with pytest.raises(GPUShareConfigError, match="cudaMallocAsync"):
        objects.pytorch_alloc_conf("backend:cudaMallocAsync", 0.25, False)


def test_alloc_conf_syntax_error():
    with pytest.raises(GPUShareConfigError, match="key:value"):
        objects.parse_alloc_conf("expandable_segments")


@given(
    st.dictionaries(
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9.]{1,8}", fullmatch=True),
    )
)
def test_alloc_conf_round_trip(options):
    options.pop("backend", None)
    text = ",".join(f"{k}:{v}" for k, v in options.items())
    assert objects.parse_alloc_conf(objects.pytorch_alloc_conf(text, 0.5, False)) == options


def test_environment_for_a_quarter():
    share = GPUShare("nvidia.com/gpu", 1, 4, 0.2264, 32607, "", "/opt/gpushare/startup")
    env = share.environment()
    assert env == {
        "GPUSHARE_MEMORY_FRACTION": "0.2264",
        "GPUSHARE_GPU_SLICES": "1",
        "GPUSHARE_GPU_REPLICAS": "4",
        "GPUSHARE_GPU_MEMORY_MIB": "32607",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2264",
        "CUPY_GPU_MEMORY_LIMIT": "22.64%",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        "PYTHONPATH": "/opt/gpushare/startup",
    }


def test_cpu_only_share_has_no_environment():
    assert GPUShare("nvidia.com/gpu", 0).environment() == {}


def make_pod(env=None, limits=None, requests=None) -> V1Pod:
    return V1Pod(
        spec=V1PodSpec(
            containers=[
                V1Container(
                    name="notebook",
                    env=env or [],
                    resources=V1ResourceRequirements(limits=limits, requests=requests),
                )
            ]
        )
    )


def test_apply_sets_limit_only_and_keeps_admin_env():
    pod = make_pod(
        env=[V1EnvVar(name="XLA_PYTHON_CLIENT_MEM_FRACTION", value="0.9")],
        limits={"cpu": "2"},
        requests={"nvidia.com/gpu": "1", "cpu": "1"},
    )
    share = GPUShare("nvidia.com/gpu", 2, 4, 0.5, startup_path="/opt/g")
    objects.apply_gpu_share(
        pod,
        share,
        admin_env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9", "PYTHONPATH": "/srv/lib"},
        guard_configmap="guard",
    )
    container = pod.spec.containers[0]
    assert container.resources.limits == {"cpu": "2", "nvidia.com/gpu": "2"}
    assert container.resources.requests == {"cpu": "1"}
    env = {e.name: e.value for e in container.env}
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
    assert env["GPUSHARE_MEMORY_FRACTION"] == "0.5"
    assert env["PYTHONPATH"] == "/opt/g:/srv/lib"  # the guard first, the admin's paths kept
    assert [v.config_map.name for v in pod.spec.volumes] == ["guard"]
    assert [(m.mount_path, m.read_only) for m in container.volume_mounts] == [("/opt/g", True)]


def test_apply_cpu_only_removes_gpu_resource():
    pod = make_pod(limits={"nvidia.com/gpu": "1"})
    objects.apply_gpu_share(pod, GPUShare("nvidia.com/gpu", 0), guard_configmap="guard")
    container = pod.spec.containers[0]
    assert container.resources.limits is None
    assert container.env == []
    assert not pod.spec.volumes


def test_node_facts_pick_the_most_shared_and_smallest():
    def node(replicas, memory, slices):
        return {
            "metadata": {
                "labels": {objects.REPLICAS_LABEL: str(replicas), objects.MEMORY_LABEL: str(memory)}
            },
            "status": {"allocatable": {"nvidia.com/gpu": str(slices)}},
        }

    facts = objects.node_gpu_facts(
        [node(4, 32607, 4), node(8, 143771, 16), {"metadata": {}, "status": {}}],
        "nvidia.com/gpu",
    )
    assert facts == {"replicas": 8, "gpu_memory_mib": 32607, "largest_node_slices": 16}
