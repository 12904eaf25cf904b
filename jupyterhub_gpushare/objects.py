"""Pure builders: the GPU share of a user server and what it adds to the pod.

Nothing here talks to Kubernetes or the hub, so all of it is unit-tested
without a cluster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kubernetes_asyncio.client import (
    V1Affinity,
    V1ConfigMap,
    V1ConfigMapVolumeSource,
    V1EnvVar,
    V1NodeAffinity,
    V1NodeSelector,
    V1NodeSelectorRequirement,
    V1NodeSelectorTerm,
    V1ObjectMeta,
    V1Pod,
    V1Volume,
    V1VolumeMount,
)

# Labels NVIDIA GPU Feature Discovery puts on GPU nodes. Whole GPUs (shared
# under the name nvidia.com/gpu.shared too) are labelled under nvidia.com/gpu;
# MIG devices of the mixed strategy under their own resource name
# (nvidia.com/mig-1g.10gb.replicas, ...): see label_prefix().
REPLICAS_LABEL = "nvidia.com/gpu.replicas"
MEMORY_LABEL = "nvidia.com/gpu.memory"
PRODUCT_LABEL = "nvidia.com/gpu.product"
COUNT_LABEL = "nvidia.com/gpu.count"
STRATEGY_LABEL = "nvidia.com/gpu.sharing-strategy"
# Values of the sharing-strategy label.
MPS = "mps"
TIME_SLICING = "time-slicing"
UNSHARED = "none"
# Nodes that disagree about how they share.
MIXED = "mixed"

# nvidia.com/gpu, nvidia.com/gpu.shared (renamed shared GPUs) and MIG devices
# such as nvidia.com/mig-1g.10gb (which can be time-sliced too).
RESOURCE_NAME_PATTERN = re.compile(r"^nvidia\.com/(gpu|mig-\d+g\.\d+gb)(\.shared)?$")

# Variables that carry the share; anything the admin sets in `environment` wins.
FRACTION_ENV = "GPUSHARE_MEMORY_FRACTION"
# The spawner's defaults, here so that the GPU benchmarks build exactly what it builds.
DEFAULT_HEADROOM_MIB = 768
DEFAULT_PYTORCH_ALLOC_CONF = "expandable_segments:True"
DEFAULT_GUARD_CONFIGMAP = "gpushare-memory-guard"
DEFAULT_STARTUP_PATH = "/opt/gpushare/startup"

# Keeps CPU-only servers off the GPUs of the node they run on: CUDA images set
# NVIDIA_VISIBLE_DEVICES=all, which the NVIDIA container toolkit honours by default.
NO_GPU_ENV = {"NVIDIA_VISIBLE_DEVICES": "void"}


class GPUShareConfigError(ValueError):
    """A configuration problem, worded for the admin who has to fix it."""


def check_resource_name(name: str) -> str:
    if not RESOURCE_NAME_PATTERN.match(name):
        raise GPUShareConfigError(
            f"gpu_resource_name {name!r} is not a resource the NVIDIA device plugin "
            "advertises: use 'nvidia.com/gpu', 'nvidia.com/gpu.shared' (shared GPUs "
            "renamed by the device plugin) or a MIG resource such as 'nvidia.com/mig-1g.10gb'"
        )
    return name


def check_slices(slices: object) -> int:
    if isinstance(slices, bool) or not isinstance(slices, int):
        raise GPUShareConfigError(
            f"gpu_slices must be a whole number of slices (0 for no GPU), not {slices!r}"
        )
    if slices < 0:
        raise GPUShareConfigError(f"gpu_slices must be 0 or more, not {slices}")
    return slices


def check_replicas(replicas: int) -> int:
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise GPUShareConfigError(
            f"gpu_replicas must be a whole number of 1 or more (slices per physical GPU), "
            f"not {replicas!r}"
        )
    return replicas


def check_fraction(fraction: float, what: str = "memory_fraction") -> float:
    if not 0 < fraction <= 1:
        raise GPUShareConfigError(f"{what} must lie in (0, 1], not {fraction!r}")
    return fraction


def memory_fraction(
    slices: int, replicas: int, gpu_memory_mib: int | None, headroom_mib: int
) -> float:
    """The share of GPU memory a server's allocators may use.

    ``slices / replicas`` of the memory, less ``headroom_mib`` that each process
    needs outside any allocator (the CUDA context, cuBLAS workspaces). Without
    the GPU's size the headroom cannot be expressed as a fraction and is left out.
    """
    share = min(slices / replicas, 1.0)
    if gpu_memory_mib:
        share -= headroom_mib / gpu_memory_mib
        if share <= 0:
            raise GPUShareConfigError(
                f"a share of {slices}/{replicas} of {gpu_memory_mib} MiB leaves nothing after "
                f"the {headroom_mib} MiB headroom per process: lower memory_headroom_mib "
                "or use fewer replicas"
            )
    return round(share, 4)


def parse_alloc_conf(conf: str) -> dict[str, str]:
    """``"a:1,b:2"`` (PyTorch's allocator option syntax) as a dict."""
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in conf.split(","))):
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise GPUShareConfigError(
                f"pytorch_cuda_alloc_conf item {item!r} is not of the form key:value"
            )
        options[key.strip()] = value.strip()
    return options


def pytorch_alloc_conf(
    admin_conf: str, fraction: float, allocator_fraction: bool, memory_guard: bool = True
) -> str:
    """The admin's PyTorch allocator options, plus the fraction where it is safe.

    ``per_process_memory_fraction`` is only known to PyTorch 2.10 and newer; older
    versions fail every CUDA call on an unknown key, so the key is added only when
    the admin says the image's PyTorch knows it. The memory guard applies the
    fraction in any case, by a call that holds under every allocator backend.

    Without the guard, the allocator option is all that caps PyTorch, and
    ``backend:cudaMallocAsync`` does not enforce it (measured,
    ``benchmarks/gpu_memory_guard.py``): that combination is refused.
    """
    options = parse_alloc_conf(admin_conf)
    if options.get("backend") == "cudaMallocAsync" and not memory_guard:
        raise GPUShareConfigError(
            "pytorch_cuda_alloc_conf sets backend:cudaMallocAsync while memory_guard is off: "
            "that allocator ignores the per_process_memory_fraction option, so nothing would "
            "keep PyTorch to its share. Turn memory_guard on or remove the backend option"
        )
    if allocator_fraction and "per_process_memory_fraction" not in options:
        options["per_process_memory_fraction"] = f"{fraction:g}"
    return ",".join(f"{key}:{value}" for key, value in options.items())


def split_path(*values: str | None) -> list[str]:
    """The entries of ``PYTHONPATH``-style strings, in order, without empty or repeated ones.

    An empty entry would put the working directory on ``sys.path``.
    """
    entries: list[str] = []
    for value in values:
        for entry in (value or "").split(":"):
            entry = entry.strip()
            if entry and entry not in entries:
                entries.append(entry)
    return entries


@dataclass(frozen=True)
class GPUShare:
    """What one server gets: its slices, and the memory share that goes with them."""

    resource_name: str
    slices: int
    replicas: int = 1
    fraction: float = 1.0
    gpu_memory_mib: int | None = None
    alloc_conf: str = ""
    startup_path: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # how the nodes share their GPUs (the GFD label): "mps", "time-slicing", ...
    sharing: str = ""
    # tell the user their share (a line at the first GPU use, a hint on out of memory)
    notice: bool = True
    # the image's own PYTHONPATH, kept after the guard's folder
    image_pythonpath: str = ""

    @property
    def uses_gpu(self) -> bool:
        return self.slices > 0

    @property
    def hard_cap(self) -> bool:
        """Whether the driver enforces the memory share (MPS), not only the frameworks."""
        return self.uses_gpu and self.sharing == MPS

    @property
    def memory_mib(self) -> int | None:
        """The share in MiB, where the GPU's size is known."""
        if not self.gpu_memory_mib:
            return None
        return int(self.fraction * self.gpu_memory_mib)

    def pythonpath(self, admin_pythonpath: str | None = None) -> str | None:
        """The guard's folder first, then the image's paths and the admin's; None without guard."""
        if not (self.uses_gpu and self.startup_path):
            return None
        return ":".join(split_path(self.startup_path, self.image_pythonpath, admin_pythonpath))

    def environment(self) -> dict[str, str]:
        """Variables for PyTorch, JAX, CuPy, TensorFlow and our guard.

        A CPU-only server gets ``NVIDIA_VISIBLE_DEVICES=void`` and nothing else.
        """
        if not self.uses_gpu:
            return dict(NO_GPU_ENV)
        fraction = f"{self.fraction:g}"
        env = {
            FRACTION_ENV: fraction,
            "GPUSHARE_GPU_SLICES": str(self.slices),
            "GPUSHARE_GPU_REPLICAS": str(self.replicas),
            "GPUSHARE_NOTICE": "1" if self.notice else "0",
            # JAX preallocates 75% of the GPU unless told otherwise. Only the old
            # name: every JAX knows it, and JAX 0.11 refuses to use the GPU at
            # all when both it and the new XLA_CLIENT_MEM_FRACTION are set.
            "XLA_PYTHON_CLIENT_MEM_FRACTION": fraction,
            "CUPY_GPU_MEMORY_LIMIT": f"{self.fraction * 100:.2f}%",
            # TensorFlow grabs nearly all memory at start without this; the guard
            # adds the hard limit when TensorFlow is imported.
            "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        }
        if self.sharing:
            env["GPUSHARE_SHARING"] = self.sharing
        if self.gpu_memory_mib:
            env["GPUSHARE_GPU_MEMORY_MIB"] = str(self.gpu_memory_mib)
        if self.alloc_conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = self.alloc_conf
        path = self.pythonpath()
        if path:
            env["PYTHONPATH"] = path
        env.update(self.extra_env)
        return env


def apply_gpu_share(
    pod: V1Pod,
    share: GPUShare,
    admin_env: Mapping[str, object] | None = None,
    guard_configmap: str | None = None,
    ticket: str | None = None,
) -> V1Pod:
    """Set the GPU limit, the environment and the guard volume on a pod manifest.

    Extended resources take a limit only (Kubernetes requires request == limit
    and fills in the request). Variables the admin set (``admin_env``) are kept,
    except that the guard's folder goes in front of the admin's ``PYTHONPATH``.
    """
    if ticket:
        # lets the queue service match the pod to the spawn it admitted
        pod.metadata.annotations = {
            **(pod.metadata.annotations or {}),
            "gpushare.jupyter.org/ticket": ticket,
        }
    container = pod.spec.containers[0]
    limits = dict(container.resources.limits or {}) if container.resources else {}
    requests = dict(container.resources.requests or {}) if container.resources else {}
    requests.pop(share.resource_name, None)
    if share.uses_gpu:
        limits[share.resource_name] = str(share.slices)
    else:
        limits.pop(share.resource_name, None)
    container.resources.limits = limits or None
    container.resources.requests = requests or None

    admin_env = admin_env or {}
    env = [e for e in container.env or []]
    present = {e.name for e in env}
    ours = share.environment()
    if "PYTHONPATH" in ours:
        # A pod's PYTHONPATH replaces the image's, so the admin's paths must
        # stay; the guard goes first so that its sitecustomize is found.
        admin_path = admin_env.get("PYTHONPATH")
        ours["PYTHONPATH"] = share.pythonpath(admin_path if isinstance(admin_path, str) else None)
        admin_env = {k: v for k, v in admin_env.items() if k != "PYTHONPATH"}
    for name, value in ours.items():
        if name in admin_env:
            continue
        if name in present:
            env = [e for e in env if e.name != name]
        env.append(V1EnvVar(name=name, value=value))
    container.env = env

    if share.uses_gpu and guard_configmap and share.startup_path:
        volume_name = "gpushare-startup"
        pod.spec.volumes = [v for v in pod.spec.volumes or [] if v.name != volume_name] + [
            V1Volume(
                name=volume_name,
                config_map=V1ConfigMapVolumeSource(name=guard_configmap),
            )
        ]
        container.volume_mounts = [
            m for m in container.volume_mounts or [] if m.name != volume_name
        ] + [V1VolumeMount(name=volume_name, mount_path=share.startup_path, read_only=True)]
    return pod


def guard_configmap(
    name: str, namespace: str, files: Mapping[str, str], version: str
) -> V1ConfigMap:
    """The ConfigMap that carries the memory guard into images that lack our package."""
    return V1ConfigMap(
        metadata=V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels={
                "app.kubernetes.io/name": "jupyterhub-gpushare",
                "app.kubernetes.io/component": "memory-guard",
            },
            annotations={"gpushare.jupyter.org/version": version},
        ),
        data=dict(files),
    )


def label_prefix(resource_name: str) -> str:
    """Where GPU feature discovery labels a resource: ``nvidia.com/gpu`` for whole
    GPUs (also when shared under ``nvidia.com/gpu.shared``), the MIG resource's
    own name for MIG devices of the mixed strategy."""
    base = resource_name.removesuffix(".shared")
    return base if base.startswith("nvidia.com/mig-") else "nvidia.com/gpu"


def node_gpu_facts(nodes: Iterable[Mapping], resource_name: str) -> dict:
    """Replicas, memory, sharing and the largest slice count over the nodes a server may use.

    ``nodes`` are Node objects as dicts; only nodes that offer ``resource_name``
    count. Where nodes differ, the most shared one decides the replicas and the
    smallest GPU the memory: the share must fit wherever the scheduler puts the
    pod. ``replicas`` is None when none of them carries the replicas label;
    ``sharing`` is ``"mixed"`` when they share in different ways, ``""`` when
    none says.
    """
    prefix = label_prefix(resource_name)
    replicas: list[int] = []
    memory: list[int] = []
    strategies: set[str] = set()
    largest = 0
    nodes_with_slices = 0
    for node in nodes:
        labels = node.get("metadata", {}).get("labels") or {}
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        try:
            slices = int(allocatable.get(resource_name, 0))
        except ValueError:
            slices = 0
        if slices <= 0:
            continue
        nodes_with_slices += 1
        largest = max(largest, slices)
        value = labels.get(f"{prefix}.replicas", "")
        if value.isdigit():
            # GPU feature discovery writes 0 where sharing is switched off
            replicas.append(max(int(value), 1))
        value = labels.get(f"{prefix}.memory", "")
        if value.isdigit() and int(value) > 0:
            memory.append(int(value))
        strategy = labels.get(f"{prefix}.sharing-strategy", "").strip()
        if strategy:
            strategies.add(strategy)
    if len(strategies) > 1:
        sharing = MIXED
    else:
        sharing = next(iter(strategies), "")
    return {
        "replicas": max(replicas) if replicas else None,
        "gpu_memory_mib": min(memory) if memory else None,
        "largest_node_slices": largest,
        "nodes": nodes_with_slices,
        "sharing": sharing,
    }


def profile_gpu_slices(profile: Mapping, user_options: Mapping, default: int) -> int | None:
    """The ``gpu_slices`` a KubeSpawner profile gives a spawn, as ``_load_profile``
    will apply it: the profile's override, then the chosen (or default) option's.
    None when it cannot be known in advance (a callable override, a value typed
    in by the user)."""
    slices: object = default

    def apply(overrides: Mapping | None) -> None:
        nonlocal slices
        if overrides and "gpu_slices" in overrides:
            slices = overrides["gpu_slices"]

    apply(profile.get("kubespawner_override"))
    for name, option in (profile.get("profile_options") or {}).items():
        choices = option.get("choices") or {}
        if user_options.get(f"{name}--unlisted-choice"):
            apply((option.get("unlisted_choice") or {}).get("kubespawner_override"))
        elif user_options.get(name) in choices:
            apply(choices[user_options[name]].get("kubespawner_override"))
        else:
            default_choice = next((c for c in choices.values() if c.get("default")), None)
            apply((default_choice or {}).get("kubespawner_override"))
    if isinstance(slices, bool) or not isinstance(slices, int):
        return None
    return slices


def pin_to_node(pod: V1Pod, node: str) -> V1Pod:
    """Require the pod to run on ``node``, where its slices were booked.

    Added to every required node-affinity term (terms are alternatives, so each
    must carry it); a field match on the node's name, as DaemonSets pin theirs.
    """
    requirement = V1NodeSelectorRequirement(key="metadata.name", operator="In", values=[node])
    spec = pod.spec
    spec.affinity = spec.affinity or V1Affinity()
    affinity = spec.affinity.node_affinity = spec.affinity.node_affinity or V1NodeAffinity()
    selector = affinity.required_during_scheduling_ignored_during_execution
    if selector is None or not selector.node_selector_terms:
        affinity.required_during_scheduling_ignored_during_execution = V1NodeSelector(
            node_selector_terms=[V1NodeSelectorTerm(match_fields=[requirement])]
        )
        return pod
    for term in selector.node_selector_terms:
        if isinstance(term, dict):
            fields = [f for f in term.get("matchFields") or [] if f.get("key") != "metadata.name"]
            term["matchFields"] = [
                *fields,
                {"key": "metadata.name", "operator": "In", "values": [node]},
            ]
        else:
            fields = [f for f in term.match_fields or [] if f.key != "metadata.name"]
            term.match_fields = [*fields, requirement]
    return pod
