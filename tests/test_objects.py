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


def test_alloc_conf_refuses_cuda_malloc_async_only_without_the_guard():
    # measured: the guard's call caps the async backend; the allocator key alone does not
    assert objects.pytorch_alloc_conf("backend:cudaMallocAsync", 0.25, True) == (
        "backend:cudaMallocAsync,per_process_memory_fraction:0.25"
    )
    for allocator_fraction in (False, True):
        with pytest.raises(GPUShareConfigError, match="cudaMallocAsync while memory_guard is off"):
            objects.pytorch_alloc_conf(
                "backend:cudaMallocAsync", 0.25, allocator_fraction, memory_guard=False
            )


def test_the_default_alloc_conf_is_expandable_segments():
    assert objects.pytorch_alloc_conf(objects.DEFAULT_PYTORCH_ALLOC_CONF, 0.25, False) == (
        "expandable_segments:True"
    )


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
    share = GPUShare(
        "nvidia.com/gpu",
        1,
        4,
        0.2264,
        32607,
        "expandable_segments:True",
        "/opt/gpushare/startup",
        sharing="time-slicing",
    )
    env = share.environment()
    assert env == {
        "GPUSHARE_MEMORY_FRACTION": "0.2264",
        "GPUSHARE_GPU_SLICES": "1",
        "GPUSHARE_GPU_REPLICAS": "4",
        "GPUSHARE_GPU_MEMORY_MIB": "32607",
        "GPUSHARE_SHARING": "time-slicing",
        "GPUSHARE_NOTICE": "1",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2264",
        "CUPY_GPU_MEMORY_LIMIT": "22.64%",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "PYTHONPATH": "/opt/gpushare/startup",
    }


def test_notices_can_be_switched_off():
    share = GPUShare("nvidia.com/gpu", 1, 4, 0.25, notice=False)
    assert share.environment()["GPUSHARE_NOTICE"] == "0"


def test_cpu_only_share_hides_the_gpus():
    # CUDA images set NVIDIA_VISIBLE_DEVICES=all; the container toolkit honours it
    assert GPUShare("nvidia.com/gpu", 0, startup_path="/opt/g").environment() == {
        "NVIDIA_VISIBLE_DEVICES": "void"
    }


def test_only_mps_is_a_hard_cap():
    assert GPUShare("nvidia.com/gpu", 1, 4, 0.24, sharing="mps").hard_cap
    assert not GPUShare("nvidia.com/gpu", 0, sharing="mps").hard_cap
    for sharing in ("time-slicing", "mixed", "", "none"):
        assert not GPUShare("nvidia.com/gpu", 1, 4, 0.24, sharing=sharing).hard_cap


_path_parts = st.lists(
    st.sampled_from(["", " ", "/opt/app/lib", "/srv/lib", "relative", ".", "/opt/app/lib/"]),
    max_size=5,
).map(":".join)


@given(image=_path_parts, admin=st.one_of(st.none(), _path_parts))
def test_pythonpath_starts_with_the_guard_and_has_no_empty_entry(image, admin):
    share = GPUShare("nvidia.com/gpu", 1, 4, 0.25, startup_path="/opt/g", image_pythonpath=image)
    path = share.pythonpath(admin)
    entries = path.split(":")
    assert entries[0] == "/opt/g"
    # an empty entry would put the working directory on sys.path
    assert all(entry.strip() for entry in entries)
    assert len(entries) == len(set(entries))
    # every path given is kept, image paths before the admin's, in order
    given_paths = objects.split_path(image, admin)
    assert [e for e in entries[1:]] == [p for p in given_paths if p != "/opt/g"]


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


def test_apply_cpu_only_removes_gpu_resource_and_hides_the_gpus():
    pod = make_pod(limits={"nvidia.com/gpu": "1"})
    objects.apply_gpu_share(pod, GPUShare("nvidia.com/gpu", 0), guard_configmap="guard")
    container = pod.spec.containers[0]
    assert container.resources.limits is None
    assert [(e.name, e.value) for e in container.env] == [("NVIDIA_VISIBLE_DEVICES", "void")]
    assert not pod.spec.volumes


def test_apply_cpu_only_keeps_the_admins_visible_devices():
    pod = make_pod(env=[V1EnvVar(name="NVIDIA_VISIBLE_DEVICES", value="none")])
    objects.apply_gpu_share(
        pod, GPUShare("nvidia.com/gpu", 0), admin_env={"NVIDIA_VISIBLE_DEVICES": "none"}
    )
    assert [(e.name, e.value) for e in pod.spec.containers[0].env] == [
        ("NVIDIA_VISIBLE_DEVICES", "none")
    ]


@pytest.mark.parametrize(
    ("admin", "image", "expected"),
    [
        # an empty admin value must not become "/opt/g:" (the working directory)
        ("", "", "/opt/g"),
        (":", "", "/opt/g"),
        ("/srv/lib:", "/opt/app", "/opt/g:/opt/app:/srv/lib"),
        (None, "/opt/app::/opt/more", "/opt/g:/opt/app:/opt/more"),
    ],
)
def test_apply_pythonpath_never_has_an_empty_entry(admin, image, expected):
    pod = make_pod()
    share = GPUShare("nvidia.com/gpu", 1, 4, 0.25, startup_path="/opt/g", image_pythonpath=image)
    admin_env = {} if admin is None else {"PYTHONPATH": admin}
    objects.apply_gpu_share(pod, share, admin_env=admin_env, guard_configmap="guard")
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["PYTHONPATH"] == expected


def test_without_the_guard_the_images_pythonpath_is_left_alone():
    pod = make_pod()
    share = GPUShare("nvidia.com/gpu", 1, 4, 0.25, image_pythonpath="/opt/app")
    objects.apply_gpu_share(pod, share, admin_env={})
    assert "PYTHONPATH" not in {e.name for e in pod.spec.containers[0].env}


def node(replicas, memory, slices, strategy="time-slicing", resource="nvidia.com/gpu"):
    prefix = objects.label_prefix(resource)
    labels = {f"{prefix}.replicas": str(replicas), f"{prefix}.memory": str(memory)}
    if strategy is not None:
        labels[f"{prefix}.sharing-strategy"] = strategy
    return {"metadata": {"labels": labels}, "status": {"allocatable": {resource: str(slices)}}}


def test_node_facts_pick_the_most_shared_and_smallest():
    facts = objects.node_gpu_facts(
        [node(4, 32607, 4), node(8, 143771, 16), {"metadata": {}, "status": {}}],
        "nvidia.com/gpu",
    )
    assert facts == {
        "replicas": 8,
        "gpu_memory_mib": 32607,
        "largest_node_slices": 16,
        "nodes": 2,
        "sharing": "time-slicing",
    }


def test_node_facts_say_how_the_nodes_share():
    def sharing(*strategies):
        nodes = [node(4, 81559, 4, strategy) for strategy in strategies]
        return objects.node_gpu_facts(nodes, "nvidia.com/gpu")["sharing"]

    assert sharing("mps", "mps") == "mps"
    assert sharing("mps", "time-slicing") == "mixed"
    assert sharing(None) == ""
    # nodes without slices do not count
    nodes = [node(4, 81559, 4, "mps"), node(4, 81559, 0, "time-slicing")]
    assert objects.node_gpu_facts(nodes, "nvidia.com/gpu")["sharing"] == "mps"


def test_node_facts_without_the_replicas_label():
    bare = {"metadata": {"labels": {}}, "status": {"allocatable": {"nvidia.com/gpu": "1"}}}
    facts = objects.node_gpu_facts([bare], "nvidia.com/gpu")
    assert facts["replicas"] is None
    assert facts["nodes"] == 1
    assert objects.node_gpu_facts([], "nvidia.com/gpu")["nodes"] == 0


def test_node_facts_read_zero_replicas_as_unshared():
    # GPU feature discovery writes 0 where sharing is switched off
    facts = objects.node_gpu_facts([node(0, 81559, 1, "none")], "nvidia.com/gpu")
    assert facts["replicas"] == 1


@pytest.mark.parametrize(
    ("resource", "prefix"),
    [
        ("nvidia.com/gpu", "nvidia.com/gpu"),
        ("nvidia.com/gpu.shared", "nvidia.com/gpu"),
        ("nvidia.com/mig-1g.10gb", "nvidia.com/mig-1g.10gb"),
        ("nvidia.com/mig-1g.10gb.shared", "nvidia.com/mig-1g.10gb"),
    ],
)
def test_labels_of_whole_gpus_and_mig_devices(resource, prefix):
    assert objects.label_prefix(resource) == prefix
    facts = objects.node_gpu_facts([node(2, 9728, 14, "time-slicing", resource)], resource)
    assert (facts["replicas"], facts["gpu_memory_mib"]) == (2, 9728)


def test_the_spawn_page_says_which_kind_of_cap():
    from jupyterhub_gpushare.messages import share_message

    quarter = GPUShare("nvidia.com/gpu", 1, 4, 0.2447, 143771, sharing="time-slicing")
    assert share_message(quarter) == (
        "Your server gets 1 of the 4 slices of a GPU and 34.4 GiB of its memory (a cooperative "
        "cap: PyTorch, JAX, CuPy and TensorFlow keep to it, and while the others are idle your "
        "work gets the whole GPU's compute)."
    )
    mps = GPUShare("nvidia.com/gpu", 1, 4, 0.2447, sharing="mps")
    assert share_message(mps) == (
        "Your server gets 1 of the 4 slices of a GPU and 24% of its memory (a hard cap: with "
        "MPS the GPU itself holds every process to it, and to 1/4 of the GPU's compute)."
    )
    assert share_message(GPUShare("nvidia.com/gpu", 1, 1, 0.99)) == "Your server gets a whole GPU."
