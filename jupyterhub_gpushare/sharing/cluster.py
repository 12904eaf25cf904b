"""The Kubernetes objects that decide GPU sharing, as plain data: no API calls here.

The GPU operator's ClusterPolicy names a ConfigMap of device plugin configs
(``spec.devicePlugin.config``: ``name``, and the ``default`` key). The operator's
config-manager picks a node's key: the node's ``nvidia.com/device-plugin.config``
label, else the default, else none, and then the plugin runs unshared (its
fallback is ``empty``). A key the ConfigMap lacks makes the config-manager exit,
and a missing ConfigMap keeps the pod from starting: either way the node offers no
GPU. The operator acts on one ClusterPolicy, the oldest (then the first by name);
it marks the others ``ignored``. The Helm chart names it ``cluster-policy``, an
OLM install ``gpu-cluster-policy``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .pluginconfig import (
    GPU_RESOURCE,
    MAX_SLICES_PER_NODE,
    MPS_MAX_CLIENTS,
    MPS_MAX_CLIENTS_OLD_GPUS,
    MPS_NEW_GPUS_FROM,
    NOT_SHARED,
    SHARED_RESOURCE,
    ConfigError,
    PluginReading,
    Sharing,
)

# -- names the GPU operator, the device plugin and GFD use -------------------------------
OPERATOR_NAMESPACE = "gpu-operator"
CONFIG_MAP_NAME = "time-slicing-config"
CLUSTER_POLICY_GROUP = "nvidia.com"
CLUSTER_POLICY_VERSION = "v1"
CLUSTER_POLICY_PLURAL = "clusterpolicies"
CLUSTER_POLICY_RESOURCE = f"{CLUSTER_POLICY_PLURAL}.{CLUSTER_POLICY_GROUP}"
DEVICE_PLUGIN_APP = "nvidia-device-plugin-daemonset"
DEVICE_PLUGIN_SELECTOR = f"app={DEVICE_PLUGIN_APP}"
NODE_CONFIG_LABEL = "nvidia.com/device-plugin.config"
DEPLOY_LABEL = "nvidia.com/gpu.deploy.device-plugin"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
COUNT_LABEL = "nvidia.com/gpu.count"
REPLICAS_LABEL = "nvidia.com/gpu.replicas"
STRATEGY_LABEL = "nvidia.com/gpu.sharing-strategy"
PRODUCT_LABEL = "nvidia.com/gpu.product"
COMPUTE_MAJOR_LABEL = "nvidia.com/gpu.compute.major"
COMPUTE_MINOR_LABEL = "nvidia.com/gpu.compute.minor"
SHARED_SUFFIX = "-SHARED"

# -- what gpushare records so that ``disable`` can undo exactly ----------------------------
# On the ClusterPolicy: JSON {"configMap": name, "config": <spec.devicePlugin.config
# before the first setup, or null>, "devicePlugin": <whether spec.devicePlugin existed>}.
POLICY_RECORD_ANNOTATION = "gpushare.dev/original-device-plugin-config"
# On a node that setup --nodes labelled: JSON of the label's earlier value (or null).
NODE_RECORD_ANNOTATION = "gpushare.dev/original-device-plugin-config"
# On the ConfigMap: JSON list of the keys gpushare wrote; other keys are never touched.
OWNED_KEYS_ANNOTATION = "gpushare.dev/owned-keys"
# On a ConfigMap gpushare created: "true", so disable may delete it once it is empty.
CREATED_ANNOTATION = "gpushare.dev/created"

NO_POLICY_MESSAGE = (
    f"no GPU operator ClusterPolicy ({CLUSTER_POLICY_RESOURCE}) in this cluster. With the "
    "plain NVIDIA device plugin Helm chart instead, give the plugin the config directly: "
    "gpushare setup --replicas N --print-config > sharing.yaml && helm upgrade -i nvdp "
    "nvdp/nvidia-device-plugin -n nvidia-device-plugin --reuse-values "
    "--set-file config.map.gpushare=sharing.yaml --set config.default=gpushare"
)


def annotations(obj: Mapping | None) -> dict:
    return dict(((obj or {}).get("metadata") or {}).get("annotations") or {})


# -- ClusterPolicies --------------------------------------------------------------------------
def policy_name(policy: Mapping) -> str:
    return (policy.get("metadata") or {}).get("name") or "?"


def policy_config(policy: Mapping) -> dict:
    """``spec.devicePlugin.config``: the ConfigMap ``name`` and the ``default`` key."""
    return dict(((policy.get("spec") or {}).get("devicePlugin") or {}).get("config") or {})


def device_plugin_enabled(policy: Mapping) -> bool:
    enabled = ((policy.get("spec") or {}).get("devicePlugin") or {}).get("enabled")
    return enabled is not False  # the operator's default is on


def policy_record(policy: Mapping) -> dict | None:
    """What the first ``gpushare setup`` found, or None where it did not set up."""
    raw = annotations(policy).get(POLICY_RECORD_ANNOTATION)
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ConfigError(
            f"ClusterPolicy {policy_name(policy)}: the annotation {POLICY_RECORD_ANNOTATION} "
            "is not what gpushare wrote; someone edited it: fix or remove it by hand, or go "
            "back to no sharing with `gpushare disable --unshared`"
        )
    return record


def active_policy(policies: Iterable[Mapping]) -> Mapping | None:
    """The ClusterPolicy the operator acts on: the oldest, then the first by name."""

    def age(policy: Mapping) -> tuple[str, str]:
        meta = policy.get("metadata") or {}
        return (meta.get("creationTimestamp") or "", meta.get("name") or "")

    return min(policies, key=age, default=None)


def choose_policy(policies: list[Mapping], wanted: str | None) -> Mapping:
    """The ClusterPolicy to use: the only one, or the one ``--policy`` names."""
    names = sorted(policy_name(p) for p in policies)
    if wanted is not None:
        for policy in policies:
            if policy_name(policy) == wanted:
                return policy
        found = f" (there is {', '.join(names)})" if names else ""
        raise ConfigError(f"no ClusterPolicy named {wanted!r}{found}")
    if not policies:
        raise ConfigError(NO_POLICY_MESSAGE)
    if len(policies) > 1:
        active = policy_name(active_policy(policies))
        raise ConfigError(
            f"there are {len(policies)} ClusterPolicies ({', '.join(names)}); the GPU operator "
            f"uses the oldest, {active}, and ignores the others: pick one with --policy {active}"
        )
    return policies[0]


def ignored_note(policy: Mapping, policies: list[Mapping]) -> str | None:
    """Why changing ``policy`` changes nothing, if the operator ignores it."""
    active = active_policy(policies)
    if active is None or policy_name(active) == policy_name(policy):
        return None
    return (
        f"the GPU operator ignores ClusterPolicy {policy_name(policy)}: it uses the oldest, "
        f"{policy_name(active)}"
    )


def config_map_name(policy: Mapping, action: str = "setup") -> str:
    """The ConfigMap that holds (or will hold) our configs.

    The one the ClusterPolicy already names, so that keys others put there keep
    working; for ``disable`` the one the first ``setup`` recorded.
    """
    try:
        record = policy_record(policy) or {}
    except ConfigError:
        record = {}  # planning says what is wrong with it
    named = policy_config(policy).get("name")
    if action == "disable":
        return record.get("configMap") or named or CONFIG_MAP_NAME
    return named or record.get("configMap") or CONFIG_MAP_NAME


def owned_keys(config_map: Mapping | None) -> set[str]:
    raw = annotations(config_map).get(OWNED_KEYS_ANNOTATION)
    try:
        keys = json.loads(raw) if raw else []
    except ValueError:
        keys = []
    return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set()


def selected_key(labels: Mapping[str, str], config: Mapping) -> str | None:
    """The ConfigMap key the operator's config-manager picks for a node, or None."""
    if not config.get("name"):
        return None  # no config at all: the operator runs the plugin without one
    return labels.get(NODE_CONFIG_LABEL) or config.get("default") or None


def node_sharing(
    labels: Mapping[str, str],
    config: Mapping,
    readings: Mapping[str, PluginReading] | None,
) -> Sharing | None:
    """The sharing a node gets; None when its device plugin cannot start.

    ``readings`` is None when the ConfigMap does not exist.
    """
    key = selected_key(labels, config)
    if key is None:
        return NOT_SHARED
    if readings is None or key not in readings or not readings[key].runs:
        return None
    return readings[key].sharing


def why_broken(
    labels: Mapping[str, str],
    config: Mapping,
    readings: Mapping[str, PluginReading] | None,
    where: str,
) -> str | None:
    """Why a node's device plugin cannot start, in words; None if it can."""
    key = selected_key(labels, config)
    if key is None:
        return None
    how = "its label" if labels.get(NODE_CONFIG_LABEL) else "the default"
    if readings is None:
        return f"{where} does not exist"
    if key not in readings:
        return f'{how} selects config "{key}", which {where} does not have'
    if not readings[key].runs:
        return f'{how} selects config "{key}" in {where}: {readings[key].problem}'
    return None


# -- nodes --------------------------------------------------------------------------------------
def parse_count(quantity: object) -> int:
    """An extended-resource quantity ("4", 4, "0") as an int; odd values count as 0."""
    try:
        return int(str(quantity))
    except (TypeError, ValueError):
        try:
            return int(float(str(quantity)))
        except ValueError:
            return 0


@dataclass
class GpuNode:
    """What we need of a GPU node, from its API object."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    allocatable: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_api(cls, node: Mapping) -> GpuNode:
        meta = node.get("metadata") or {}
        status = node.get("status") or {}
        return cls(
            name=meta["name"],
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            allocatable={
                k: parse_count(v)
                for k, v in (status.get("allocatable") or {}).items()
                if k.startswith("nvidia.com/")
            },
        )

    @property
    def gpus(self) -> int | None:
        """Physical GPUs (GFD's count label), None when GFD has not labelled the node."""
        try:
            return int(self.labels[COUNT_LABEL])
        except (KeyError, ValueError):
            return None

    @property
    def product(self) -> str:
        return self.labels.get(PRODUCT_LABEL, "").removesuffix(SHARED_SUFFIX)

    @property
    def replicas(self) -> int:
        try:
            return int(self.labels.get(REPLICAS_LABEL, "1"))
        except ValueError:
            return 1

    @property
    def strategy(self) -> str:
        return self.labels.get(STRATEGY_LABEL, "none")

    @property
    def resource(self) -> str:
        return SHARED_RESOURCE if self.allocatable.get(SHARED_RESOURCE, 0) > 0 else GPU_RESOURCE

    @property
    def slices(self) -> int:
        return self.allocatable.get(self.resource, 0)

    @property
    def runs_device_plugin(self) -> bool:
        """The operator's device-plugin DaemonSet runs here (its node selector)."""
        return self.labels.get(DEPLOY_LABEL) == "true"

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        try:
            return (int(self.labels[COMPUTE_MAJOR_LABEL]), int(self.labels[COMPUTE_MINOR_LABEL]))
        except (KeyError, ValueError):
            return None


def node_limit(node: GpuNode, sharing: Sharing) -> str | None:
    """Why ``sharing`` cannot work on ``node`` (too many slices, too many MPS clients)."""
    if sharing.strategy == "mps":
        capability = node.compute_capability
        if capability is not None and capability < MPS_NEW_GPUS_FROM:
            limit = MPS_MAX_CLIENTS_OLD_GPUS
        else:
            limit = MPS_MAX_CLIENTS
        if sharing.replicas > limit:
            cc = f" (compute capability {capability[0]}.{capability[1]})" if capability else ""
            return (
                f"node {node.name}: MPS serves at most {limit} clients per GPU on its GPUs{cc}, "
                f"not {sharing.replicas}; the device plugin's MPS daemon would not start"
            )
    slices = (node.gpus or 1) * sharing.replicas
    if slices > MAX_SLICES_PER_NODE:
        return (
            f"node {node.name}: {node.gpus or 1} GPUs x {sharing.replicas} replicas are {slices} "
            f"slices, more than the {MAX_SLICES_PER_NODE} that fit the one 4 MiB message in "
            "which the device plugin lists them to the kubelet: the node would offer no GPU"
        )
    return None


def mismatches(node: GpuNode, sharing: Sharing) -> list[str]:
    """How the node differs from what ``sharing`` makes the plugin and GFD show."""
    gpus = node.gpus
    if gpus is None:
        return [f"has no {COUNT_LABEL} label"]
    problems = []
    want = gpus * sharing.replicas
    have = node.allocatable.get(sharing.resource, 0)
    if have != want:
        problems.append(f"{sharing.resource} allocatable {have}, expected {want}")
    other = GPU_RESOURCE if sharing.resource == SHARED_RESOURCE else SHARED_RESOURCE
    if node.allocatable.get(other, 0) > 0:
        problems.append(f"{other} allocatable {node.allocatable[other]}, expected 0")
    if node.labels.get(REPLICAS_LABEL) != str(sharing.replicas):
        problems.append(
            f"label {REPLICAS_LABEL}={node.labels.get(REPLICAS_LABEL)}, expected {sharing.replicas}"
        )
    if node.strategy != sharing.strategy:
        problems.append(f"label {STRATEGY_LABEL}={node.strategy}, expected {sharing.strategy}")
    product = node.labels.get(PRODUCT_LABEL)
    if product is not None:
        want_suffix = sharing.shared and not sharing.renamed
        if product.endswith(SHARED_SUFFIX) != want_suffix:
            problems.append(f"label {PRODUCT_LABEL}={product}")
    return problems


def _split_selector(selector: str) -> list[str]:
    terms, depth, start = [], 0, 0
    for index, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(selector[start:index])
            start = index + 1
    terms.append(selector[start:])
    return [t.strip() for t in terms]


def selector_variants(selector: str) -> list[str]:
    """``selector``, plus a variant with the shared product name where it pins one.

    GFD appends ``-SHARED`` to ``nvidia.com/gpu.product`` once a GPU is shared,
    so ``--nodes nvidia.com/gpu.product=Tesla-T4`` would find nothing the second
    time; the variant lets a repeated ``setup`` select the same nodes.
    """
    terms = _split_selector(selector)
    changed = []
    for term in terms:
        for operator in ("==", "="):
            name, sep, value = term.partition(operator)
            if sep and name.strip() == PRODUCT_LABEL and "!" not in name:
                value = value.strip()
                if not value.endswith(SHARED_SUFFIX):
                    term = f"{PRODUCT_LABEL}={value}{SHARED_SUFFIX}"
                break
        changed.append(term)
    variant = ",".join(changed)
    return [selector] if variant == ",".join(terms) else [selector, variant]


# -- pods ---------------------------------------------------------------------------------------
def _container_requests(container: Mapping) -> dict[str, int]:
    resources = container.get("resources") or {}
    # for extended resources requests equal limits; either may be given alone
    merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {k: parse_count(v) for k, v in merged.items() if k.startswith("nvidia.com/")}


def pod_gpu_requests(pod: Mapping) -> dict[str, int]:
    """The NVIDIA resources a pod holds: max(sum of containers, largest init container)."""
    spec = pod.get("spec") or {}
    total: dict[str, int] = {}
    for container in spec.get("containers") or []:
        for name, count in _container_requests(container).items():
            total[name] = total.get(name, 0) + count
    for container in spec.get("initContainers") or []:
        for name, count in _container_requests(container).items():
            total[name] = max(total.get(name, 0), count)
    return {k: v for k, v in total.items() if v > 0}


def pod_name(pod: Mapping) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def is_terminal(pod: Mapping) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def pod_ready(pod: Mapping) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def pod_state(pod: Mapping) -> str:
    """A pod's state in a word or two: Running, Pending, CrashLoopBackOff, Failed (exit 1)."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        if (state.get("waiting") or {}).get("reason"):
            return state["waiting"]["reason"]
        terminated = state.get("terminated")
        if terminated and status.get("phase") == "Failed":
            return f"Failed (exit {terminated.get('exitCode')})"
    return status.get("reason") or status.get("phase") or "Pending"


def plugin_pods_by_node(pods: Iterable[Mapping]) -> dict[str, list[dict]]:
    """Device-plugin pods per node, without those being deleted."""
    by_node: dict[str, list[dict]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if node and not (pod.get("metadata") or {}).get("deletionTimestamp"):
            by_node.setdefault(node, []).append(dict(pod))
    return by_node


def selector_matches(node_selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (node_selector or {}).items())


def pending_gpu_pods(pods: Iterable[Mapping], nodes: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Pending pods wanting GPUs that could be admitted on one of ``nodes`` (name: labels).

    Both those already bound to such a node (being admitted) and unscheduled ones
    whose nodeSelector fits such a node count: when the plugin re-registers, the
    scheduler may place them there, and the kubelet then rejects them for good.
    """
    found = []
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Pending":
            continue
        if (pod.get("metadata") or {}).get("deletionTimestamp") or not pod_gpu_requests(pod):
            continue
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if node:
            if node in nodes:
                found.append(pod_name(pod))
        elif any(selector_matches(spec.get("nodeSelector"), labels) for labels in nodes.values()):
            found.append(pod_name(pod))
    return sorted(found)
